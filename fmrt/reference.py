"""Pure-torch reference of every fmrt op: the executable spec, the CPU path and the test oracle.

Convention (SPEC.md): sigma in [0, 1], 0 = clean data, 1 = pure noise,
`x_t = (1 - sigma) * x0 + sigma * eps`, velocity target `v = eps - x0`.
Every function computes in float32 (float64 inputs stay float64) and rounds once to the
input dtype, as the kernels do. No argument checking here: `fmrt.ops` checks.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

Sigma = Union[float, Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def broadcast_sigma(sigma: Sigma, x: Tensor) -> Tensor:
    """sigma as a float32 tensor that broadcasts against x.

    float / 0-d -> 0-d; `[B]` with x `[B, ...]` -> `[B, 1, ..., 1]` (per sample); a tensor with
    x.ndim dims is used as it is (per frame, per token).
    """
    dt = compute_dtype(x.dtype)
    if not isinstance(sigma, Tensor):
        return torch.tensor(float(sigma), dtype=dt, device=x.device)
    s = sigma.to(device=x.device, dtype=dt)
    if s.ndim == 1 and x.ndim >= 2 and s.shape[0] == x.shape[0]:
        return s.view(-1, *([1] * (x.ndim - 1)))
    return s


# ---------------------------------------------------------------------------------------------
# SPEC 1: forward process and training target
# ---------------------------------------------------------------------------------------------

def add_noise(x0: Tensor, sigma: Sigma, noise: Tensor) -> tuple[Tensor, Tensor]:
    """x_t = (1 - sigma) x0 + sigma * noise, target = noise - x0; both in x0's dtype."""
    dt = compute_dtype(x0.dtype)
    s = broadcast_sigma(sigma, x0)
    a, n = x0.to(dt), noise.to(dt)
    x_t = (1.0 - s) * a + s * n
    return x_t.to(x0.dtype), (n - a).to(x0.dtype)


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity target d x_t / d sigma = noise - x0."""
    dt = compute_dtype(x0.dtype)
    return (noise.to(dt) - x0.to(dt)).to(x0.dtype)


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: Sigma) -> Tensor:
    """Clean estimate x0 = x_t - sigma * v."""
    dt = compute_dtype(x_t.dtype)
    s = broadcast_sigma(sigma, x_t)
    return (x_t.to(dt) - s * v.to(dt)).to(x_t.dtype)


def eps_from_velocity(x_t: Tensor, v: Tensor, sigma: Sigma) -> Tensor:
    """Noise estimate eps = x_t + (1 - sigma) * v."""
    dt = compute_dtype(x_t.dtype)
    s = broadcast_sigma(sigma, x_t)
    return (x_t.to(dt) + (1.0 - s) * v.to(dt)).to(x_t.dtype)


# --- training ops (noise / loss): Philox noise, flow_matching_loss ----------------------------


# ---------------------------------------------------------------------------------------------
# SPEC 2 / 4: sampling steps
# ---------------------------------------------------------------------------------------------

def euler_step(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """x' = x + (sigma_next - sigma) * v."""
    dt = compute_dtype(x.dtype)
    h = broadcast_sigma(sigma_next, x) - broadcast_sigma(sigma, x)
    return (x.to(dt) + h * v.to(dt)).to(x.dtype)


# --- sampling ops (cfg_combine, guided_euler_step, sde_step) ---------------------------------


# ---------------------------------------------------------------------------------------------
# SPEC 3: q/k RMSNorm + 3D RoPE, attention
# ---------------------------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Optional[Tensor], norm: Optional[str], eps: float) -> Tensor:
    """RMSNorm of x `[B, S, H, D]` in fp32: over H*D ("across_heads", weight [H*D]), over D
    ("per_head", weight [D]) or none."""
    xf = x.to(compute_dtype(x.dtype))
    if norm is None:
        return xf
    B, S, H, D = x.shape
    if norm == "across_heads":
        flat = xf.reshape(B, S, H * D)
        flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            flat = flat * weight.to(flat.dtype)
        return flat.view(B, S, H, D)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.to(y.dtype) if weight is not None else y


def rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[..., 2i], x[..., 2i+1]) of x `[B, S, H, D]` by the angles
    whose cos/sin are `[S, D/2]`: (a, b) -> (a cos - b sin, a sin + b cos). Same dtype as x."""
    c = cos.to(x.dtype)[None, :, None, :]
    s = sin.to(x.dtype)[None, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                 cos: Tensor, sin: Tensor, eps: float = 1e-6,
                 norm: Optional[str] = "across_heads") -> tuple[Tensor, Tensor]:
    """RMSNorm(q), RMSNorm(k) then the interleaved rotary; fp32 math, one rounding."""
    qo = rope_interleaved(rms_norm(q, q_weight, norm, eps), cos, sin)
    ko = rope_interleaved(rms_norm(k, k_weight, norm, eps), cos, sin)
    return qo.to(q.dtype), ko.to(k.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
              mask: Optional[Tensor] = None) -> Tensor:
    """Non-causal softmax attention, layout `[B, S, H, D]`, in fp32; mask is additive and
    broadcasts to `[B, H, S_q, S_k]` (or boolean, True = keep)."""
    dt = compute_dtype(q.dtype)
    qf, kf, vf = (t.to(dt).transpose(1, 2) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (qf @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(dt)
    out = torch.softmax(logits, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)





# ---------------------------------------------------------------------------------------------
# flash attention (Triton, with forward-mode JVP): see kernels/attention.py
# ---------------------------------------------------------------------------------------------
