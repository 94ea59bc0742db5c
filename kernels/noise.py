"""Noise kernels: `x_t = (1 - sigma) x0 + sigma eps` and the target `eps - x0` in one pass, with
eps either loaded or drawn in registers by Philox from (seed, logical element index), so the
noise is never written unless asked for.

Offset scheme (see `fmrt.reference`, "training ops"): x0 is `[B, inner]`; one program owns one
group of 4 Q consecutive elements of one sample (Q = NOISE_Q); one Philox-4x32-10 call on the
counter (g Q + q as two 32-bit words, b, 0) with key (seed lo, seed hi) yields the normals of
the elements g 4Q + k Q + q, k = 0..3. Each of the four lanes is a contiguous run of Q
elements, so loads and stores stay coalesced and vectorised. Programs never straddle samples,
so a sample much smaller than 4 Q = 4096 elements leaves lanes idle (fine for latents, which
have 10^5 - 10^7 elements per sample). Compiled for CUDA, Box-Muller uses the hardware
log / sin / cos approximations (`box_muller`, FAST): the IEEE-accurate libdevice versions
would make the kernels compute-bound in bf16.

Broadcast operands (sigma here, the loss mask in `loss.py`) arrive in one of three modes:
0 = a Python float; 1 = one value per sample (`ptr[b * bstride]`, bstride 0 for one value);
2 = a pattern `ptr[b * bstride + (j // R) % T]` over the within-sample index j (per frame
`[B, 1, T, 1, 1]`: T frames, R = H W; per token; per element: T = inner, R = 1); the
division and modulo use precomputed magic numbers (`magic31`) below 2^31.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from fmrt._dispatch import interpreter_enabled
from fmrt.reference import NOISE_Q


@triton.jit
def box_muller_radius(log_u1):
    """r = sqrt(-2 log u1), clamped at 0: the hardware log of a u1 just below 1 (u1 reaches
    1 - 2^-24) can come out as a tiny positive number, whose -2x has no real root (NaN noise,
    a few draws per call at video-latent sizes). The exact r there is < 2^-11: 0 is as good."""
    return tl.sqrt(tl.maximum(-2.0 * log_u1, 0.0))


@triton.jit
def box_muller(u1, u2, FAST: tl.constexpr):
    """triton's `pair_uniform_to_normal`; FAST (compiled for CUDA) uses the hardware
    approximations of log / cos / sin (angle reduced to [-pi, pi), where they are accurate to
    ~2^-21 absolute): the same numbers to float tolerance, at a fraction of the instructions of
    libdevice's IEEE-accurate versions, which would make the noise kernels compute-bound.
    u1 is clamped to [1e-7, 1) (no log of 0) and the radius to a real root (`box_muller_radius`)."""
    if FAST:
        u1 = tl.maximum(1.0e-7, u1)
        th = 6.283185307179586 * u2
        th = tl.where(u2 >= 0.5, th - 6.283185307179586, th)
        r = box_muller_radius(libdevice.fast_logf(u1))
        return r * libdevice.fast_cosf(th), r * libdevice.fast_sinf(th)
    else:
        return tl.pair_uniform_to_normal(u1, u2)


@triton.jit
def philox_normal4(seed, b, g, Q: tl.constexpr, FAST: tl.constexpr = False):
    """The four normal lanes (each `[Q]` float32) of group g of sample b:
    Philox(key=seed, counter=(lo(gQ+q), hi(gQ+q), b, 0)) -> 4 uniforms -> 2 Box-Muller pairs."""
    # gQ is a multiple of Q (a power of two), so lo(gQ) + q never carries into the high word
    base = g.to(tl.int64) * Q
    zero = tl.zeros((Q,), dtype=tl.uint32)
    c0 = (base & 0xFFFFFFFF).to(tl.uint32) + tl.arange(0, Q).to(tl.uint32)
    c1 = zero + (base >> 32).to(tl.uint32)
    c2 = zero + b.to(tl.uint32)
    c3 = zero
    i1, i2, i3, i4 = tl.philox(seed, c0, c1, c2, c3)
    n1, n2 = box_muller(tl.uint_to_uniform_float(i1), tl.uint_to_uniform_float(i2), FAST)
    n3, n4 = box_muller(tl.uint_to_uniform_float(i3), tl.uint_to_uniform_float(i4), FAST)
    return n1, n2, n3, n4


@triton.jit
def _rne_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even; NaN kept), as fp32: the GPU's cast,
    written out because the interpreter's fp32 -> bf16 cast truncates."""
    b = x.to(tl.uint32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def _round_to(x, DT: tl.constexpr):
    """fp32 x rounded to DT (round to nearest even), kept in fp32."""
    if DT == tl.bfloat16:
        return _rne_bf16(x)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def udiv31(n, m, l):
    """floor(n / d) for uint32 n < 2^31 by the magic pair (m, l) = `magic31(d)`: a multiply-high
    and a shift instead of a ~20-instruction integer division."""
    return tl.umulhi(n * 2, m.to(tl.uint32)) >> l.to(tl.uint32)


@triton.jit
def load_bcast(ptr, val, b, j, m, bstride, T, R, mT, lT, mR, lR, MODE: tl.constexpr,
               IDX64: tl.constexpr):
    """A broadcast operand for within-sample indices j of sample b (modes: module docstring)."""
    if MODE == 0:
        return val
    elif MODE == 1:
        return tl.load(ptr + b * bstride).to(tl.float32)
    else:
        if IDX64:
            idx = (j // R) % T
        else:   # j < 2^31: (j // R) % T by magic-number division
            q = udiv31(j.to(tl.uint32), mR, lR)
            idx = (q - udiv31(q, mT, lT) * T.to(tl.uint32)).to(tl.int64)
        return tl.load(ptr + b * bstride + idx, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _add_noise_lane(x_ptr, n_ptr, xt_ptr, tgt_ptr, nout_ptr, s_ptr, s_val, s_bstride, s_T, s_R,
                    s_mT, s_lT, s_mR, s_lR, eps, b, j, inner,
                    SIGMA_MODE: tl.constexpr, HAS_NOISE: tl.constexpr,
                    STORE_NOISE: tl.constexpr, STORE_TARGET: tl.constexpr, IDX64: tl.constexpr,
                    EAGER_ROUNDING: tl.constexpr):
    m = j < inner
    offs = b * inner + j
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = load_bcast(s_ptr, s_val, b, j, m, s_bstride, s_T, s_R, s_mT, s_lT, s_mR, s_lR,
                   SIGMA_MODE, IDX64)
    ty = xt_ptr.dtype.element_ty
    if EAGER_ROUNDING:   # diffusers' scale_noise: `s * eps + (1 - s) * x` op by op in torch
        xty = x_ptr.dtype.element_ty
        s = _round_to(s, xty)
        y = _round_to(_round_to(s * eps, ty) + _round_to(_round_to(1.0 - s, xty) * x, xty), ty)
    else:
        y = (1.0 - s) * x + s * eps
    tl.store(xt_ptr + offs, y.to(ty), mask=m)
    if STORE_TARGET:
        tl.store(tgt_ptr + offs, (eps - x).to(ty), mask=m)
    if STORE_NOISE:
        tl.store(nout_ptr + offs, eps.to(ty), mask=m)


@triton.jit
def _add_noise_kernel(x_ptr, n_ptr, seed_ptr, xt_ptr, tgt_ptr, nout_ptr,
                      s_ptr, s_val, s_bstride, s_T, s_R, s_mT, s_lT, s_mR, s_lR, inner, n_groups,
                      SIGMA_MODE: tl.constexpr, HAS_NOISE: tl.constexpr,
                      STORE_NOISE: tl.constexpr, STORE_TARGET: tl.constexpr,
                      IDX64: tl.constexpr, Q: tl.constexpr, FAST: tl.constexpr,
                      EAGER_ROUNDING: tl.constexpr = False):
    """x_t = (1 - sigma) x0 + sigma eps, target = eps - x0 (fp32 math, one rounding each;
    target skipped unless STORE_TARGET);
    EAGER_ROUNDING (with loaded eps, no target): x_t rounded as torch rounds diffusers'
    `sigma * eps + (1.0 - sigma) * x0` with sigma in x0's dtype: sigma, 1 - sigma and
    (1 - sigma) x0 to x0's dtype, sigma eps and the sum to x_t's (torch's promotion of x0's and
    eps's dtypes); launched without FMA contraction;
    eps loaded (HAS_NOISE) or Philox noise, stored to nout when STORE_NOISE.
    Grid: B * n_groups programs; program (b, g) covers within-sample indices [4Qg, 4Q(g+1))."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_groups
    g = pid % n_groups
    q = tl.arange(0, Q).to(tl.int64)
    j0 = g * (4 * Q) + q
    if HAS_NOISE:
        n1 = tl.zeros((Q,), tl.float32)
        n2, n3, n4 = n1, n1, n1
    else:
        n1, n2, n3, n4 = philox_normal4(tl.load(seed_ptr), b, g, Q, FAST)
    _add_noise_lane(x_ptr, n_ptr, xt_ptr, tgt_ptr, nout_ptr, s_ptr, s_val, s_bstride, s_T, s_R,
                    s_mT, s_lT, s_mR, s_lR, n1, b, j0, inner, SIGMA_MODE, HAS_NOISE,
                    STORE_NOISE, STORE_TARGET, IDX64, EAGER_ROUNDING)
    _add_noise_lane(x_ptr, n_ptr, xt_ptr, tgt_ptr, nout_ptr, s_ptr, s_val, s_bstride, s_T, s_R,
                    s_mT, s_lT, s_mR, s_lR, n2, b, j0 + Q, inner, SIGMA_MODE, HAS_NOISE,
                    STORE_NOISE, STORE_TARGET, IDX64, EAGER_ROUNDING)
    _add_noise_lane(x_ptr, n_ptr, xt_ptr, tgt_ptr, nout_ptr, s_ptr, s_val, s_bstride, s_T, s_R,
                    s_mT, s_lT, s_mR, s_lR, n3, b, j0 + 2 * Q, inner, SIGMA_MODE, HAS_NOISE,
                    STORE_NOISE, STORE_TARGET, IDX64, EAGER_ROUNDING)
    _add_noise_lane(x_ptr, n_ptr, xt_ptr, tgt_ptr, nout_ptr, s_ptr, s_val, s_bstride, s_T, s_R,
                    s_mT, s_lT, s_mR, s_lR, n4, b, j0 + 3 * Q, inner, SIGMA_MODE, HAS_NOISE,
                    STORE_NOISE, STORE_TARGET, IDX64, EAGER_ROUNDING)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def magic31(d: int) -> tuple[int, int]:
    """(m, l) with floor(n / d) = (umulhi(2 n, m) >> l) for all 0 <= n < 2^31, 1 <= d < 2^31
    (Granlund-Montgomery: l = ceil(log2 d), m = ceil(2^(31 + l) / d) < 2^32)."""
    if d >= 2 ** 31:
        return 0, 0            # only used with 64-bit index math, which divides exactly
    l = (d - 1).bit_length()
    return -(-(1 << (31 + l)) // d), l


_MAGIC_1 = magic31(1) + magic31(1)
_DUMMIES: dict = {}


def _dummy(device) -> torch.Tensor:
    """A 1-element pointer argument the kernel never reads (made once per device)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.empty(1, device=device)
    return t


def bcast_args(t: Optional[torch.Tensor], value: float, shape, device, *,
               per_sample_1d: bool = True):
    """Kernel arguments (ptr, value, bstride, T, R, mT, lT, mR, lR, MODE) of a broadcast operand
    (`magic31` pairs for T and R): None with a
    float `value` (mode 0), or a tensor broadcastable to `shape` = `[B, ...]` (modes 1, 2).
    With per_sample_1d a 1-D `[B]` tensor is per sample (sigma); else torch's right-aligned
    broadcasting applies (mask)."""
    if t is None:
        return (_dummy(device), float(value), 0, 1, 1) + _MAGIC_1 + (0,)
    if per_sample_1d and t.ndim <= 1 and t.dtype is torch.float32 and t.is_contiguous() and \
            t.device == device and (t.ndim == 0 or t.shape[0] in (1, shape[0])):
        # host fast path (a float32 0-d / [1] / [B] sigma): what the general path returns
        return (t, 0.0, int(t.ndim == 1 and t.shape[0] != 1), 1, 1) + _MAGIC_1 + (1,)
    nd = len(shape)
    if per_sample_1d and t.ndim == 1 and nd >= 2 and t.shape[0] == shape[0] and shape[0] != 1:
        t = t.view(-1, *([1] * (nd - 1)))                     # [B] sigma: per sample
    tv = t.reshape((1,) * (nd - t.ndim) + tuple(t.shape)).to(device=device, dtype=torch.float32)
    batched = nd > 0 and tv.shape[0] != 1
    full = [d for d in range(1, nd) if tv.shape[d] != 1 and shape[d] != 1]
    if not full:
        flat = tv.reshape(-1).contiguous()
        return (flat, 0.0, int(batched), 1, 1) + magic31(1) + magic31(1) + (1,)
    d0, d1 = full[0], full[-1]
    if all(tv.shape[d] == shape[d] or shape[d] == 1 for d in range(d0, d1 + 1)):
        T = 1
        for d in range(d0, d1 + 1):
            T *= shape[d]
        R = 1
        for d in range(d1 + 1, nd):
            R *= shape[d]
        flat = tv.reshape(tv.shape[0], T).contiguous()   # the varying run, contiguous
        return (flat, 0.0, T if batched else 0, T, R) + magic31(T) + magic31(R) + (2,)
    # several separate varying runs: materialise per element (rare: correct, not fast)
    inner = 1
    for d in shape[1:]:
        inner *= d
    flat = tv.expand((tv.shape[0],) + tuple(shape[1:])).reshape(tv.shape[0], inner).contiguous()
    return (flat, 0.0, inner if batched else 0, inner, 1) + magic31(inner) + magic31(1) + (2,)


# within-sample indices at or above this use 64-bit index math in the broadcast loads
IDX64_FROM = 2 ** 31


def fast_math(t: torch.Tensor) -> bool:
    """Hardware log/sin/cos approximations for compiled CUDA kernels (not the interpreter)."""
    return t.is_cuda and not interpreter_enabled()


def _layout(x: torch.Tensor):
    batch = x.shape[0] if x.ndim else 1
    inner = x.numel() // batch if batch else 0
    n_groups = -(-inner // (4 * NOISE_Q))  # not triton.cdiv: a ~4 us call on the host
    return batch, inner, n_groups


def add_noise(x0: torch.Tensor, sigma: Optional[torch.Tensor], sigma_value: float,
              noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], store_noise: bool,
              store_target: bool = True, eager_rounding: bool = False):
    """(x_t, target, noise_out): x0 (and noise) contiguous `[B, ...]`; sigma a tensor
    broadcastable to x0 or None with `sigma_value`; seed a 0-d int64 tensor on x0's device when
    noise is None. noise_out is the generated noise in x0's dtype when store_noise, else empty;
    target is empty unless store_target. eager_rounding (noise given, no target): x_t rounded
    as torch rounds diffusers' scale_noise, in the promoted dtype of x0 and noise."""
    x_t = torch.empty(x0.shape, device=x0.device, dtype=torch.promote_types(
        x0.dtype, noise.dtype) if eager_rounding else x0.dtype)
    target = torch.empty_like(x0) if store_target else x0.new_empty(0)
    store = store_noise and noise is None
    nout = torch.empty_like(x0) if store else x0.new_empty(0)
    batch, inner, n_groups = _layout(x0)
    if batch * n_groups == 0:
        return x_t, target, nout
    *s_args, mode = bcast_args(sigma, sigma_value, x0.shape, x0.device)
    grid = (batch * n_groups,)
    _add_noise_kernel[grid](
        x0, noise if noise is not None else x0, seed if seed is not None else x0,
        x_t, target if store_target else x_t, nout if store else x_t,
        *s_args, inner, n_groups,
        SIGMA_MODE=mode, HAS_NOISE=noise is not None, STORE_NOISE=store,
        STORE_TARGET=store_target,
        IDX64=inner >= IDX64_FROM, Q=NOISE_Q, FAST=fast_math(x0), EAGER_ROUNDING=eager_rounding,
        num_warps=4, enable_fp_fusion=not eager_rounding)
    return x_t, target, nout


def philox_normal(shape, seed: torch.Tensor) -> torch.Tensor:
    """The seeded noise alone, float32 (tests, debugging): add_noise at sigma 1 stores it."""
    x0 = torch.zeros(shape, dtype=torch.float32, device=seed.device)
    return add_noise(x0, None, 1.0, None, seed, False)[0]
