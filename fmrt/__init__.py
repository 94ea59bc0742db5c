"""fmrt: a flow-matching runtime for NVIDIA GPUs.

Fused Triton kernels for the memory-bound math of flow-matching training and sampling
(`fmrt.ops`), global 3D-RoPE attention (`fmrt.attention`), and a thin runtime for training and
sampling Wan / FLUX / SD3-style DiTs and MeanFlow models.
"""
from fmrt._dispatch import use_backend
from fmrt.schedule import FlowMatchScheduler

__version__ = "0.1.0"

__all__ = ["__version__", "use_backend", "FlowMatchScheduler"]
