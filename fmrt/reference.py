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
#
# Seeded noise ("Philox offset scheme"). x0 is viewed as [B, inner] (B = x0.shape[0], inner =
# elements per sample, row-major logical order, whatever the memory layout). Element j of sample
# b lives in group g = j // (4 Q), lane k = (j % (4 Q)) // Q, slot q = j % Q (Q = NOISE_Q = 1024).
# One Philox-4x32-10 call (triton's `tl.philox`, key = (seed low 32 bits, seed high 32 bits)) on
# the counter (c0, c1, c2, c3) = (low and high 32 bits of the 64-bit counter g Q + q, b, 0) gives
# four uint32; triton's `uint_to_uniform_float` maps them to four uniforms, Box-Muller
# (`pair_uniform_to_normal`) on (u1, u2) and (u3, u4) to four normals n1..n4, and lane k takes
# n_{k+1}. So a block of 4 Q consecutive elements costs Q Philox calls, every lane reads and
# writes contiguous memory, the 64-bit counter covers 2^64 elements per sample, and the batch
# index (up to 2^32 samples) has its own counter word: different per sample and per seed.

NOISE_Q = 1024
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_ROUNDS = 10


def _mul_hi_lo(a: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the uint32 constant a and the uint32
    values x (int64 tensor), without overflowing int64 (16-bit limbs)."""
    xh, xl = x >> 16, x & 0xFFFF
    th, tl_ = a * xh, a * xl
    hi = (th + (tl_ >> 16)) >> 16
    lo = (((th & 0xFFFF) << 16) + tl_) & _M32
    return hi, lo


def philox4x32(seed: Union[int, Tensor], c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton's `tl.philox(seed, c0, c1, c2, c3)` (10 rounds, 32-bit words) in int64 torch
    arithmetic masked to 32 bits. Counter words: int64 tensors in [0, 2^32); seed: an int or
    int64 tensor in [0, 2^63)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(_PHILOX_ROUNDS):
        hb, lb = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        ha, la = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hb ^ c1 ^ k0, lb, ha ^ c3 ^ k1, la
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def uint_to_uniform(x: Tensor) -> Tensor:
    """Triton's `uint_to_uniform_float` for uint32 words (int64 tensor): float32 in [0, 1)."""
    s = torch.where(x >= 2 ** 31, x - 2 ** 32, x)          # bitcast to int32
    s = torch.where(s < 0, -s - 1, s)                       # ~s
    return s.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def box_muller(u1: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    """Triton's `pair_uniform_to_normal` in float32."""
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def philox_normal(shape, seed: Union[int, Tensor], device=None) -> Tensor:
    """N(0, 1) float32 noise of `shape` (`[B, ...]`) from `seed` with the offset scheme above:
    exactly the noise the Triton kernels generate in registers (to float tolerance)."""
    shape = tuple(shape)
    n = 1
    for d in shape:
        n *= d
    batch = shape[0] if len(shape) else 1
    if n == 0:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    inner = n // batch
    groups = -(-inner // (4 * NOISE_Q))
    if isinstance(seed, Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    cnt = torch.arange(groups * NOISE_Q, dtype=torch.int64, device=device)
    out = torch.empty((batch, groups * 4 * NOISE_Q), dtype=torch.float32, device=device)
    for b in range(batch):
        c2 = torch.full_like(cnt, b)
        i1, i2, i3, i4 = philox4x32(seed, cnt & _M32, cnt >> 32, c2, torch.zeros_like(cnt))
        n1, n2 = box_muller(uint_to_uniform(i1), uint_to_uniform(i2))
        n3, n4 = box_muller(uint_to_uniform(i3), uint_to_uniform(i4))
        out[b] = torch.stack([t.view(groups, NOISE_Q) for t in (n1, n2, n3, n4)], 1).reshape(-1)
    return out[:, :inner].reshape(shape)


def mask_denominator(mask: Optional[Tensor], shape, device=None) -> Tensor:
    """Per-sample `sum(mask)` of the mask broadcast to `shape` (`[B, ...]`): float32 `[B]`
    (`inner` for every sample without a mask). Computed on the small mask, not the broadcast."""
    shape = tuple(shape)
    batch = shape[0]
    if mask is None:
        inner = 1
        for d in shape[1:]:
            inner *= d
        return torch.full((batch,), float(inner), dtype=torch.float32, device=device)
    m = mask.reshape((1,) * (len(shape) - mask.ndim) + tuple(mask.shape)).to(torch.float32)
    rep = 1
    for d in range(1, len(shape)):
        if m.shape[d] == 1:
            rep *= shape[d]
    per = m.reshape(m.shape[0], -1).sum(1) * rep
    return per.expand(batch)


def finish_loss(num: Tensor, den: Tensor, weight, reduction: str) -> Tensor:
    """From per-sample sums of masked squared errors `num` `[B]` and `mask_denominator` `den`:
    `L_b = num_b / den_b * weight_b` (0 for an all-masked sample), then the reduction."""
    den = den.to(num.device)
    per = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                      torch.zeros_like(num))
    if weight is not None:
        if isinstance(weight, Tensor):
            per = per * weight.to(device=num.device, dtype=num.dtype).reshape(-1)
        else:
            per = per * float(weight)
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


def flow_matching_loss(pred: Tensor, x0: Tensor, noise: Tensor, weight=None,
                       mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Per-sample `L_b = sum(mask (pred - (noise - x0))^2) / sum(mask)` over sample b (mask
    broadcast to pred; no mask: the mean), times `weight` (float, 0-d or `[B]`), reduced by
    "mean" | "sum" | "none" (`[B]`). float32 result (float64 for float64 pred). The target is
    constant: gradients flow to pred only."""
    dt = compute_dtype(pred.dtype)
    target = (noise.detach().to(dt) - x0.detach().to(dt))
    d = pred.to(dt) - target
    sq = d * d
    if mask is not None:
        sq = sq * mask.to(dt)
    num = sq.reshape(pred.shape[0], -1).sum(1)
    den = mask_denominator(mask, pred.shape, device=pred.device).to(dt)
    return finish_loss(num, den, weight, reduction)


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
