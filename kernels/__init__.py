"""Triton kernels of fmrt, installed as `fmrt.kernels`. One op family per module; each module
holds the jit kernels (formula in the docstring) and their host launchers. Nothing here checks
arguments: `fmrt.ops` does that once, before any launch."""
