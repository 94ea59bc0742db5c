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

def add_noise(x0: Tensor, sigma: Sigma, noise: Tensor,
              eager_rounding: bool = False) -> tuple[Tensor, Tensor]:
    """x_t = (1 - sigma) x0 + sigma * noise, target = noise - x0; both in x0's dtype.
    eager_rounding: x_t as torch rounds diffusers' scale_noise `sigma * noise + (1.0 - sigma) *
    x0` (sigma a tensor in x0's dtype): sigma, 1 - sigma and (1 - sigma) x0 rounded to x0's
    dtype, sigma * noise and the sum to R, the promotion of x0's and noise's dtypes, x_t's."""
    dt = compute_dtype(x0.dtype)
    s = broadcast_sigma(sigma, x0)
    a, n = x0.to(dt), noise.to(dt)
    if eager_rounding:
        r = torch.promote_types(x0.dtype, noise.dtype)
        s = s.to(x0.dtype).to(dt)
        x_t = (s * n).to(r).to(dt) + ((1.0 - s).to(x0.dtype).to(dt) * a).to(x0.dtype).to(dt)
        return x_t.to(r), (n - a).to(x0.dtype)
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

NOISE_Q = 1024          # a power of two (the kernels rely on it)
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

def euler_step(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma,
               out_dtype: Optional[torch.dtype] = None, eager_rounding: bool = False) -> Tensor:
    """x' = x + (sigma_next - sigma) * v, rounded once to out_dtype (default x's dtype);
    x and v may differ in dtype (both go to the compute dtype). eager_rounding: h = sigma_next -
    sigma and then h * v are each rounded to v's dtype before the add (diffusers' scheduler)."""
    dt = compute_dtype(x.dtype)
    h = broadcast_sigma(sigma_next, x) - broadcast_sigma(sigma, x)
    if eager_rounding:
        p = (h.to(v.dtype).to(dt) * v.to(dt)).to(v.dtype).to(dt)
        return (x.to(dt) + p).to(out_dtype or x.dtype)
    return (x.to(dt) + h * v.to(dt)).to(out_dtype or x.dtype)


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
    v = torch.lerp(u, c, g)  # u + g (c - u), one fp32 op
    if rescale == "norm":
        v = v * norm_ratio(c, v, norm_dim)
    return v


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale, rescale: str = "none",
                norm_dim: Optional[int] = None) -> Tensor:
    """The guided velocity (see guided_velocity), rounded once to v_cond's dtype."""
    return guided_velocity(v_cond, v_uncond, scale, rescale, norm_dim).to(v_cond.dtype)


def guided_euler_step(x: Tensor, v_cond: Tensor, v_uncond: Tensor, scale, sigma: Sigma,
                      sigma_next: Sigma, rescale: str = "none",
                      norm_dim: Optional[int] = None,
                      out_dtype: Optional[torch.dtype] = None,
                      eager_rounding: bool = False) -> Tensor:
    """x' = x + (sigma_next - sigma) * guided_velocity(...), fp32 math, one rounding to
    out_dtype (default x's dtype); x may differ in dtype from v_cond / v_uncond.
    eager_rounding (rescale "none", a float scale): d = c - u, scale * d and v = u + scale * d
    each rounded to the model dtype (a pipeline's eager combine), then
    `euler_step(..., eager_rounding=True)` (diffusers' scheduler step)."""
    if eager_rounding:
        md = v_cond.dtype
        cd = compute_dtype(md)
        c, u = v_cond.to(cd), v_uncond.to(cd)
        d = (c - u).to(md).to(cd)
        v = (u + (float(scale) * d).to(md).to(cd)).to(md)
        return euler_step(x, v, sigma, sigma_next, out_dtype, eager_rounding=True)
    dt = compute_dtype(x.dtype)
    v = guided_velocity(v_cond, v_uncond, scale, rescale, norm_dim)
    h = broadcast_sigma(sigma_next, x) - broadcast_sigma(sigma, x)
    return torch.addcmul(x.to(dt), h, v.to(dt)).to(out_dtype or x.dtype)  # x + h v


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
    eta^2 / (2 (1 - sigma')), std_dt = std_t * sqrt(sigma - sigma_next). sigma = sigma_next
    (also both 1, where k is defined as 0) is a zero step: x' = x, std_dt = 0."""
    s = broadcast_sigma(sigma, like)
    sn = broadcast_sigma(sigma_next, like)
    s_den = torch.where(s >= 1.0, sn, s)
    ok = s_den < 1.0  # else sigma = sigma_next = 1: a zero step (k = 0, std_dt = 0, x' = x)
    k = torch.where(ok, eta * eta / (2.0 * torch.where(ok, 1.0 - s_den, 1.0)), 0.0)
    std_dt = (2.0 * k * s * (s - sn)).clamp_min(0.0).sqrt()
    return k, std_dt


def sde_mean(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, eta: float):
    """(mean, std_dt) of the SDE step's Gaussian in the compute dtype (see sde_step):
    mean = x (1 + k dt) + v (1 + k (1 - sigma)) dt."""
    dt = compute_dtype(x.dtype)
    xf, vf = x.to(dt), v.to(dt)
    k, std_dt = sde_coefficients(sigma, sigma_next, eta, xf)
    h = broadcast_sigma(sigma_next, xf) - broadcast_sigma(sigma, xf)
    s = broadcast_sigma(sigma, xf)
    return xf * (1.0 + k * h) + vf * (1.0 + k * (1.0 - s)) * h, std_dt


def sde_step(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, eta: float, noise: Tensor,
             return_log_prob: bool = False):
    """Euler-Maruyama step of the reverse-time flow SDE with the score from the velocity
    (score = -eps_pred / sigma, eps_pred = x + (1 - sigma) v), Flow-GRPO's discretisation:
        mean = x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] * dt,   dt = sigma_next - sigma
        x'   = mean + std_t * sqrt(-dt) * noise,    std_t = eta * sqrt(sigma / (1 - sigma))
    eta = 0 is exactly Euler. With return_log_prob, also the Gaussian log-density of x' (fp32,
    before rounding) under N(mean, (std_t sqrt(-dt))^2), averaged over the elements of each
    sample (Flow-GRPO's convention): (x', log_prob [B] float32). As in Flow-GRPO the sample is
    a constant in the log-density (`prev_sample.detach()`), so log_prob is differentiable in v
    (and x) through the mean: d log_prob / d mean = (x' - mean) / std^2 / n."""
    mean, std_dt = sde_mean(x, v, sigma, sigma_next, eta)
    out = mean + std_dt * noise.to(mean.dtype)
    if not return_log_prob:
        return out.to(x.dtype)
    return out.to(x.dtype), _gaussian_log_prob(out.detach(), mean, std_dt)


def _gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(sample; mean, std^2) averaged over the elements of each sample: `[B]` in the
    compute dtype (float32; float64 for float64 inputs)."""
    std = std.expand_as(mean)
    lp = (-(sample - mean) ** 2 / (2 * std ** 2) - torch.log(std)
          - 0.5 * math.log(2 * math.pi))
    return _per_sample(lp).mean(1)


def sde_log_prob(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, eta: float,
                 prev_sample: Tensor) -> Tensor:
    """Flow-GRPO's log-probability of a given step result `prev_sample` (e.g. one stored while
    sampling) under the SDE step's Gaussian N(mean(x, v), std_dt^2) (see sde_step), averaged
    over the elements of each sample: float32 `[B]`, differentiable in x and v through the mean
    (prev_sample is a constant, as Flow-GRPO's `prev_sample.detach()`)."""
    mean, std_dt = sde_mean(x, v, sigma, sigma_next, eta)
    return _gaussian_log_prob(prev_sample.detach().to(mean.dtype), mean, std_dt)


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


def rms_norm_jvp(x: Tensor, weight: Optional[Tensor], tx: Optional[Tensor],
                 tweight: Optional[Tensor], norm: Optional[str], eps: float) -> Tensor:
    """Forward-mode derivative of `rms_norm` along tangents (tx, tweight), in fp32:
    with xhat = x * rstd, d xhat = rstd * (tx - xhat * mean(xhat * tx)) (mean over the norm
    group), d out = d xhat * w + xhat * tweight. tx / tweight None mean zero tangents."""
    dt = compute_dtype(x.dtype)
    zero = torch.zeros((), dtype=dt, device=x.device)
    if norm is None:
        return tx.to(dt) if tx is not None else torch.zeros(x.shape, dtype=dt, device=x.device)
    B, S, H, D = x.shape
    shape = (B, S, H * D) if norm == "across_heads" else (B, S, H, D)
    xf = x.to(dt).reshape(shape)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    out = zero.expand(shape)
    if tx is not None:
        t = tx.to(dt).reshape(shape)
        out = rstd * (t - xhat * (xhat * t).mean(-1, keepdim=True))
        if weight is not None:
            out = out * weight.to(dt)
    if tweight is not None and weight is not None:
        out = out + xhat * tweight.to(dt)
    return out.reshape(B, S, H, D)


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

def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                    key_padding_mask: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None) -> Tensor:
    """`attention` with an optional boolean key padding mask `[B, S_k]` (True = keep) on top of
    the optional mask (additive float or boolean keep, broadcastable to `[B, H, S_q, S_k]`).
    A query row whose keys are all masked gives 0 with zero derivatives (as the Triton kernel;
    plain softmax would give NaN): such rows attend with the mask lifted, then are zeroed.
    Differentiable in reverse and forward mode (torch.func.jvp) by plain autograd."""
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.to(compute_dtype(q.dtype)).masked_fill(~keep, float("-inf"))
    if mask is None:
        return attention(q, k, v, scale, mask)
    while mask.ndim < 4:
        mask = mask[None]
    alive = (mask if mask.dtype == torch.bool else mask > float("-inf")).any(-1, keepdim=True)
    if mask.dtype == torch.bool:
        mask = mask | ~alive
    else:
        mask = torch.where(alive, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    out = attention(q, k, v, scale, mask)
    B, S_q, H, _ = out.shape
    return out * alive.expand(B, H, S_q, 1).transpose(1, 2).to(out.dtype)



# ---------------------------------------------------------------------------------------------
# guidance reuse: refresh and reuse steps (see fmrt.guidance, kernels/step.py _reuse_kernel)
# ---------------------------------------------------------------------------------------------

def guided_euler_step_refresh(x: Tensor, v_cond: Tensor, v_uncond: Tensor, scale, sigma: Sigma,
                              sigma_next: Sigma) -> tuple[Tensor, Tensor]:
    """A guided Euler step that also returns d = v_cond - v_uncond (float32) for later reuse:
    x' = x + (sigma_next - sigma) * (u + scale * d), fp32 math, one rounding to x's dtype."""
    dt = compute_dtype(x.dtype)
    c, u = v_cond.to(dt), v_uncond.to(dt)
    d = c - u
    h = broadcast_sigma(sigma_next, x) - broadcast_sigma(sigma, x)
    v = u + broadcast_sigma(scale, x) * d
    return (x.to(dt) + h * v).to(x.dtype), d.float()


def reused_guided_euler_step(x: Tensor, v_cond: Tensor, d: Tensor, scale, sigma: Sigma,
                             sigma_next: Sigma) -> Tensor:
    """A guided Euler step from the cond output and a reused d = c - u (no v_uncond):
    v = c + (scale - 1) * d (= u + scale * (c - u) when d is the current c - u),
    x' = x + (sigma_next - sigma) * v, fp32 math, one rounding to x's dtype."""
    dt = compute_dtype(x.dtype)
    h = broadcast_sigma(sigma_next, x) - broadcast_sigma(sigma, x)
    v = v_cond.to(dt) + (broadcast_sigma(scale, x) - 1.0) * d.to(dt)
    return (x.to(dt) + h * v).to(x.dtype)


def reuse_stats(v_cond: Tensor, d: Tensor, prev: Optional[Tensor], refresh: bool) -> dict:
    """Per-sample float32 `[B]` statistics of a refresh / reuse step: cond_norm = ||c||,
    d_norm = ||d||, change = ||d - prev|| (refresh: prev = the previous d) or ||c - prev||
    (reuse: prev = the cond output of the last refresh); 0 without prev."""
    B = v_cond.shape[0]
    c = v_cond.reshape(B, -1).double()
    dd = d.reshape(B, -1).double()
    out = {"cond_norm": c.norm(dim=1), "d_norm": dd.norm(dim=1)}
    if prev is None:
        out["change"] = torch.zeros(B, dtype=torch.float64, device=c.device)
    else:
        out["change"] = ((dd if refresh else c) - prev.reshape(B, -1).double()).norm(dim=1)
    return {k: v.float() for k, v in out.items()}
