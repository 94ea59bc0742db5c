"""Global non-causal attention for video DiTs: Wan's 3D RoPE tables and backend choice.

Layout everywhere: `[B, S, H, D]` (what FlashAttention takes: no transposes on its paths).

Backends of `attention(..., backend=)`:
- "flash_attn": FlashAttention 2 (`flash_attn.flash_attn_func`; `pip install "fmrt[flash]"`).
- "fa3": FlashAttention 3 (`flash_attn_interface.flash_attn_func`, built from source).
- "fa4": FlashAttention 4 (`flash_attn.cute.flash_attn_func`; `pip install flash-attn-4`).
- "sdpa": torch's scaled_dot_product_attention (cuDNN / flash / efficient / math, torch picks).
- "math": `fmrt.reference.attention` (fp32 softmax; supports torch.func.jvp).
- "triton": fmrt's Triton flash attention `fmrt.ops.flash_attention` (reverse and forward mode).
- "auto": on CUDA, FA3 (Hopper) or FA4 (Hopper / Blackwell) when installed, else FA2, else SDPA;
  SDPA on CPU and for dtypes / head dims the flash kernels do not take (fp32, D > 256).
  Inside `with backend_override(name):` "auto" resolves to `name` instead.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from fmrt import ops, reference as ref


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of the head dim into (frame, height, width) rotary dims."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: int, dim: int, theta: float) -> Tensor:
    """float64 angles `[positions, dim/2]`: pos * theta^(-2j/dim)."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv)


@functools.lru_cache(maxsize=32)
def _rope_3d_tables(head_dim: int, grid: tuple[int, int, int], theta: float,
                    device: torch.device) -> tuple[Tensor, Tensor]:
    f, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    at, ah, aw = _axis_angles(f, dt, theta), _axis_angles(h, dh, theta), _axis_angles(w, dw, theta)
    ang = torch.cat([
        at[:, None, None, :].expand(f, h, w, dt // 2),
        ah[None, :, None, :].expand(f, h, w, dh // 2),
        aw[None, None, :, :].expand(f, h, w, dw // 2),
    ], dim=-1).reshape(f * h * w, head_dim // 2)
    return (ang.cos().to(torch.float32).to(device), ang.sin().to(torch.float32).to(device))


def rope_3d_tables(head_dim: int, grid: Sequence[int], theta: float = 10000.0, *,
                   device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """(cos, sin), each `[f*h*w, head_dim // 2]` float32, tokens in (f, h, w) row-major order,
    Wan's split of the head dim (h_dim = w_dim = 2 * (head_dim // 6), t_dim the rest), angles
    computed in float64. Cached per (head_dim, grid, theta, device)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6, got {head_dim}")
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive sizes (f, h, w), got {grid}")
    return _rope_3d_tables(head_dim, grid, float(theta), torch.device(device or "cpu"))


BACKENDS = ("auto", "flash_attn", "fa3", "fa4", "sdpa", "math", "triton")
FLASH_BACKENDS = ("fa3", "fa4", "flash_attn")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
_MODULES = {"flash_attn": "flash_attn", "fa3": "flash_attn_interface", "fa4": "flash_attn.cute"}
_INSTALL = {
    "flash_attn": 'pip install "fmrt[flash]" (FlashAttention 2; compiles from source)',
    "fa3": "build FlashAttention 3 from source: the hopper/ directory of "
           "github.com/Dao-AILab/flash-attention (python setup.py install)",
    "fa4": "pip install flash-attn-4",
}
_installed_cache: dict[str, bool] = {}
_override: Optional[str] = None


def _module_present(module: str) -> bool:
    if sys.modules.get(module) is not None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or broken
        return False


def backend_available(name: str) -> bool:
    """Whether an attention backend can run here (flash libraries looked up once, cached)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name in ("auto", "sdpa", "math"):
        return True
    if name not in _installed_cache:
        if name == "triton":
            from fmrt import _dispatch, ops
            _installed_cache[name] = (hasattr(ops, "flash_attention")
                                      and _dispatch.triton_available())
        else:
            _installed_cache[name] = _module_present(_MODULES[name])
    return _installed_cache[name]


def clear_backend_cache() -> None:
    """Forget which backends are installed (after installing one, or in tests)."""
    _installed_cache.clear()


@contextlib.contextmanager
def backend_override(name: str) -> Iterator[None]:
    """Inside the block, `attention(..., backend="auto")` uses `name` (explicit backends are
    untouched). `backend_override("triton")` (the MeanFlow loss: it needs forward-mode AD)
    falls back to "math" when fmrt's Triton flash attention is not available."""
    global _override
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend_override name must be one of {BACKENDS[1:]}, got {name!r}")
    prev, _override = _override, name
    try:
        yield
    finally:
        _override = prev


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete backend `attention` runs for `backend` and tensors like q."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if _override is not None:
        if _override == "triton" and not backend_available("triton"):
            return "math"
        return _override
    if not q.is_cuda or q.dtype not in FLASH_DTYPES or q.shape[-1] > FLASH_MAX_HEAD_DIM:
        return "sdpa"
    major = torch.cuda.get_device_capability(q.device)[0]
    prefer = {9: ("fa3", "fa4", "flash_attn")}.get(major, ("fa4", "flash_attn") if major >= 10
                                                    else ("flash_attn",))
    for name in prefer:
        if backend_available(name):
            return name
    return "sdpa"


def _check_qkv(q, k, v, scale) -> None:
    ops.check_qkv(q, k, v)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def _check_flash(name: str, q: Tensor, v: Tensor) -> None:
    if not backend_available(name):
        raise ValueError(f"attention backend {name!r} needs {_MODULES[name]}, which is not "
                         f"installed: {_INSTALL[name]}")
    if q.dtype not in FLASH_DTYPES:
        raise TypeError(f"attention backend {name!r} takes float16 / bfloat16 q, k, v, got "
                        f"{q.dtype} (use backend='sdpa' or 'math', or cast)")
    if max(q.shape[-1], v.shape[-1]) > FLASH_MAX_HEAD_DIM:
        raise ValueError(f"attention backend {name!r} takes head dims up to "
                         f"{FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}")


def _first(out) -> Tensor:
    """FA3 returns `out` (mid-2025 on) or `(out, lse)` (older); FA4 returns `(out, lse)`."""
    return out[0] if isinstance(out, (tuple, list)) else out


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto",
              scale: Optional[float] = None) -> Tensor:
    """Non-causal softmax attention. q `[B, S_q, H, D]`, k `[B, S_k, H, D]`, v `[B, S_k, H, D_v]`
    (same dtype and device) -> `[B, S_q, H, D_v]` in q's dtype. scale: None = D^-0.5.
    backend: one of BACKENDS (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_qkv(q, k, v, scale)
    name = resolve_backend(backend, q)
    scale = None if scale is None else float(scale)
    if name in FLASH_BACKENDS:
        _check_flash(name, q, v)
        if name == "flash_attn":
            from flash_attn import flash_attn_func
            return flash_attn_func(q, k, v, softmax_scale=scale)
        if name == "fa3":
            from flash_attn_interface import flash_attn_func as fa3_func
            return _first(fa3_func(q, k, v, softmax_scale=scale))
        from flash_attn.cute import flash_attn_func as fa4_func
        return _first(fa4_func(q, k, v, softmax_scale=scale))
    if name == "math":
        return ref.attention(q, k, v, scale=scale)
    if name == "triton":
        if not backend_available("triton"):
            raise ValueError("attention backend 'triton' needs fmrt.ops.flash_attention (fmrt's "
                             "Triton flash attention) and Triton; neither this build nor this "
                             "install has both: use backend='math' or 'sdpa'")
        from fmrt.ops import flash_attention
        return flash_attention(q, k, v, scale=scale)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
