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

import math  # noqa: E402  (kept inside this section for clean merges)

RESCALES = ("none", "norm")


def _per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def norm_ratio(v_cond: Tensor, v: Tensor, norm_dim: Optional[int] = None) -> Tensor:
    """||v_cond|| / ||v|| per sample (norm_dim None, shape [B, 1, ..., 1]) or over one dim
    (keepdim); 1 where ||v|| = 0 (diffusers would give nan there)."""
    if norm_dim is None:
        dims = tuple(range(1, v.ndim))
        nc = v_cond.pow(2).sum(dims, keepdim=True).sqrt()
        nv = v.pow(2).sum(dims, keepdim=True).sqrt()
    else:
        nc = v_cond.pow(2).sum(norm_dim, keepdim=True).sqrt()
        nv = v.pow(2).sum(norm_dim, keepdim=True).sqrt()
    return torch.where(nv > 0, nc / torch.where(nv > 0, nv, torch.ones_like(nv)),
                       torch.ones_like(nv))


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale, rescale: str = "none",
                    norm_dim: Optional[int] = None) -> Tensor:
    """CFG `v = v_uncond + scale * (v_cond - v_uncond)` in the compute dtype (not rounded);
    rescale "norm" ("true CFG", diffusers' Qwen-Image): `v *= ||v_cond|| / ||v||` per sample
    (norm_dim None) or per token over `norm_dim`. scale: float or `[B]`."""
    dt = compute_dtype(v_cond.dtype)
    c, u = v_cond.to(dt), v_uncond.to(dt)
    g = broadcast_sigma(scale, c) if isinstance(scale, Tensor) else float(scale)
    v = u + g * (c - u)
    if rescale == "norm":
        v = v * norm_ratio(c, v, norm_dim)
    return v


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale, rescale: str = "none",
                norm_dim: Optional[int] = None) -> Tensor:
    """The guided velocity (see guided_velocity), rounded once to v_cond's dtype."""
    return guided_velocity(v_cond, v_uncond, scale, rescale, norm_dim).to(v_cond.dtype)


def guided_euler_step(x: Tensor, v_cond: Tensor, v_uncond: Tensor, scale, sigma: Sigma,
                      sigma_next: Sigma, rescale: str = "none",
                      norm_dim: Optional[int] = None) -> Tensor:
    """x' = x + (sigma_next - sigma) * guided_velocity(...), fp32 math, one rounding."""
    dt = compute_dtype(x.dtype)
    v = guided_velocity(v_cond, v_uncond, scale, rescale, norm_dim)
    h = broadcast_sigma(sigma_next, x) - broadcast_sigma(sigma, x)
    return (x.to(dt) + h * v).to(x.dtype)


def guidance_stats(v_cond: Tensor, v_uncond: Tensor, scale, sigma: Sigma) -> dict:
    """Seed 000's per-step guidance diagnostics, per sample, float32 `[B]` tensors:
    sigma; cond/uncond mean and std (unbiased); cfg_diff = v_cond - v_uncond: mean, std, L2 norm;
    vel_diff_norm = ||sigma * cfg_diff|| (the seed's "velocity space" difference);
    x0_diff_norm = ||x0_cond - x0_uncond|| with x0 = x - sigma * v (= vel_diff_norm exactly in
    exact arithmetic for flow prediction: the seed plots both); rescale_ratio = ||v_cond|| / ||v||
    with v the (unrescaled) guided velocity, i.e. the factor true-CFG's per-sample rescale uses."""
    c = _per_sample(v_cond).double()
    u = _per_sample(v_uncond).double()
    B = c.shape[0]
    sig = broadcast_sigma(sigma, v_cond).double().expand(B, *([1] * (v_cond.ndim - 1)))
    sig = sig.reshape(B, 1)
    d = c - u
    v = u + broadcast_sigma(scale, v_cond).double().reshape(-1, 1) * d
    x0_c, x0_u = -sig * c, -sig * u  # x cancels in x0_cond - x0_uncond
    out = {
        "sigma": sig[:, 0],
        "cond_mean": c.mean(1), "cond_std": c.std(1),
        "uncond_mean": u.mean(1), "uncond_std": u.std(1),
        "cfg_diff_mean": d.mean(1), "cfg_diff_std": d.std(1),
        "cfg_diff_norm": d.norm(dim=1),
        "vel_diff_norm": (sig * d).norm(dim=1),
        "x0_diff_norm": (x0_c - x0_u).norm(dim=1),
        "rescale_ratio": norm_ratio(c, v).reshape(B),
    }
    return {k: t.float() for k, t in out.items()}


def cfg_zero_star_scale(v_cond: Tensor, v_uncond: Tensor) -> Tensor:
    """CFG-Zero*'s optimised scale per sample: <c, u> / (||u||^2 + 1e-8) (as diffusers), float32
    `[B]`."""
    c = _per_sample(v_cond).float()
    u = _per_sample(v_uncond).float()
    return (c * u).sum(1) / (u.pow(2).sum(1) + 1e-8)


def sde_coefficients(sigma: Sigma, sigma_next: Sigma, eta: float, like: Tensor):
    """Flow-GRPO's Euler-Maruyama coefficients, broadcast against `like`:
    (k, std_dt) with std_t = eta * sqrt(sigma / (1 - sigma')), sigma' = sigma_next where
    sigma >= 1 (Flow-GRPO uses the grid's second sigma there), k = std_t^2 / (2 sigma) =
    eta^2 / (2 (1 - sigma')), std_dt = std_t * sqrt(sigma - sigma_next)."""
    s = broadcast_sigma(sigma, like)
    sn = broadcast_sigma(sigma_next, like)
    s_den = torch.where(s >= 1.0, sn, s)
    k = eta * eta / (2.0 * (1.0 - s_den))
    std_dt = (2.0 * k * s * (s - sn)).clamp_min(0.0).sqrt()
    return k, std_dt


def sde_step(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, eta: float, noise: Tensor,
             return_log_prob: bool = False):
    """Euler-Maruyama step of the reverse-time flow SDE with the score from the velocity
    (score = -eps_pred / sigma, eps_pred = x + (1 - sigma) v), Flow-GRPO's discretisation:
        mean = x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] * dt,   dt = sigma_next - sigma
        x'   = mean + std_t * sqrt(-dt) * noise,    std_t = eta * sqrt(sigma / (1 - sigma))
    eta = 0 is exactly Euler. With return_log_prob, also the Gaussian log-density of x' (fp32,
    before rounding) under N(mean, (std_t sqrt(-dt))^2), averaged over the elements of each
    sample (Flow-GRPO's convention): (x', log_prob [B] float32)."""
    dt = compute_dtype(x.dtype)
    xf, vf, z = x.to(dt), v.to(dt), noise.to(dt)
    k, std_dt = sde_coefficients(sigma, sigma_next, eta, xf)
    h = broadcast_sigma(sigma_next, xf) - broadcast_sigma(sigma, xf)
    s = broadcast_sigma(sigma, xf)
    mean = xf * (1.0 + k * h) + vf * (1.0 + k * (1.0 - s)) * h
    out = mean + std_dt * z
    if not return_log_prob:
        return out.to(x.dtype)
    std = std_dt.expand_as(out)
    lp = (-(out - mean) ** 2 / (2 * std ** 2) - torch.log(std)
          - 0.5 * math.log(2 * math.pi))
    return out.to(x.dtype), _per_sample(lp).mean(1).float()


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
