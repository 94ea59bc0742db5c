"""Models used by fmrt's runtime, tests, demos and benchmarks."""
from fmrt.models.attention import WanSelfAttention
from fmrt.models.convert import load_dit, save_dit
from fmrt.models.dit import PRESETS, DiT, DiTConfig

__all__ = ["DiT", "DiTConfig", "PRESETS", "WanSelfAttention", "load_dit", "save_dit"]
