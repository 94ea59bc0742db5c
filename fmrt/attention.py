"""Global non-causal attention for video DiTs: Wan's 3D RoPE tables and backend choice.

Layout everywhere: `[B, S, H, D]`.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from fmrt import reference as ref


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


BACKENDS = ("auto", "sdpa", "math")


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto",
              scale: Optional[float] = None) -> Tensor:
    """Non-causal attention over `[B, S, H, D]` tensors; returns `[B, S, H, D]`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be [B, S, H, D]")
    if backend == "math":
        return ref.attention(q, k, v, scale=scale)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
