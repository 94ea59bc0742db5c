"""fmrt: a flow-matching runtime for NVIDIA GPUs.

Fused Triton kernels for the memory-bound math of flow-matching training and sampling
(`fmrt.ops`), global 3D-RoPE attention (`fmrt.attention`), and a thin runtime for training and
sampling Wan / FLUX / SD3-style DiTs and MeanFlow models.

`import fmrt` does not import torch: `fmrt.use_backend`, `fmrt.FlowMatchScheduler` and the
submodules (`fmrt.ops`, ...) load on first use, so that the `fmrt` command answers `--version`,
`--help` and argument errors without the seconds torch takes to import.
"""
import importlib

__version__ = "0.1.0"

__all__ = ["__version__", "use_backend", "FlowMatchScheduler"]

_EXPORTS = {"use_backend": "fmrt._dispatch", "FlowMatchScheduler": "fmrt.schedule"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
