"""Sampling-step kernels: Euler, CFG combine, guided Euler (CFG + optional norm rescale +
diagnostics + step in one pass) and Euler-Maruyama (Flow-GRPO SDE) steps.

Sigmas reach a kernel either as fp32 scalars (Python floats: no tensor, no sync) or as a pointer
to a `[B]` fp32 tensor read on the device (per sample; `inner` = elements per sample), so no
step ever reads a tensor back to the host.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fmrt.kernels.noise import _round_to, fast_math, philox_normal4
from fmrt.reference import NOISE_Q


@triton.jit
def _load_sigma(ptr, scalar, stride, b, IS_TENSOR: tl.constexpr):
    """sigma for the batch indices `b`: from a 0-d / [B] tensor (element b * stride; stride 0
    broadcasts one value), or the scalar argument."""
    # if / else, not an early return: Triton compiles the code after a constexpr-true `if` that
    # returns too, and a block-shaped load would then clash with the scalar's return type
    if IS_TENSOR:
        return tl.load(ptr + b * stride).to(tl.float32)
    else:
        return scalar


@triton.jit
def _euler_kernel(x_ptr, v_ptr, out_ptr, s_ptr, s_val, s_st, sn_ptr, sn_val, sn_st, n, inner,
                  S_TENSOR: tl.constexpr, SN_TENSOR: tl.constexpr, EAGER_ROUNDING: tl.constexpr,
                  BLOCK: tl.constexpr):
    """out = x + (sigma_next - sigma) * v, fp32 math, one rounding to out's dtype.
    EAGER_ROUNDING: h = sigma_next - sigma, then h * v, each rounded to v's dtype before the add
    (diffusers' scheduler; launched without FMA contraction so fp32 rounds twice as well)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    b = tl.where(m, offs // inner, 0)  # masked tail lanes must not read sigma out of bounds
    s = _load_sigma(s_ptr, s_val, s_st, b, S_TENSOR)
    sn = _load_sigma(sn_ptr, sn_val, sn_st, b, SN_TENSOR)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    h = sn - s
    if EAGER_ROUNDING:
        vt = v_ptr.dtype.element_ty
        y = _round_to(x + _round_to(_round_to(h, vt) * v, vt), out_ptr.dtype.element_ty)
    else:
        y = x + h * v
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


NSTAT = 8  # partial sums per program: c, c^2, u, u^2, d, d^2, v^2 (v before rescale), pad


@triton.jit
def _guided_kernel(x_ptr, c_ptr, u_ptr, out_ptr, g_ptr, g_val, g_st, s_ptr, s_val, s_st,
                   sn_ptr, sn_val, sn_st, ratio_ptr, part_ptr, inner, C, n_chunks,
                   STEP: tl.constexpr, WRITE: tl.constexpr, G_TENSOR: tl.constexpr,
                   S_TENSOR: tl.constexpr, SN_TENSOR: tl.constexpr, RESCALE: tl.constexpr,
                   STATS: tl.constexpr, TOKEN: tl.constexpr, EAGER_ROUNDING: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Guided velocity and step for one tile of one sample (grid = (chunks, B)).

    d = c - u;  v = u + g * d                        (g = guidance scale, per sample)
    RESCALE 1:  v *= ratio[b]                        (per-sample ||c|| / ||v||, from pass 1)
    RESCALE 2:  v *= ||c_row|| / ||v_row||           (per token: rows of C elements; 1 if 0)
    out = x + (sigma_next - sigma) * v  if STEP else v      (fp32 math, one rounding)
    STATS 1: this program's partial sums of c, c^2, u, u^2, d, d^2, v^2 (v before any rescale)
    go to part[b, chunk, :] (`_stats_kernel` finishes the statistics from them); STATS 2 (one
    chunk per sample, STEP): the program's sums are the sample's, and it writes the finished
    statistics (`_write_stats`) to part = out [11, B] itself.
    EAGER_ROUNDING (RESCALE 0): d, g * d, v, dt and dt * v each rounded to the model (c's)
    dtype, as eager torch evaluates a pipeline's combine and diffusers' scheduler step.
    The tile is [ROWS, BLOCK_C] rows of length C; the flat (per-sample) layout is ROWS = 1,
    C = BLOCK_C, so chunk k covers elements [k * C, (k + 1) * C) of the sample.
    """
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    rows = chunk.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    if TOKEN:  # rows of C elements (C <= BLOCK_C)
        local = rows[:, None] * C + cols[None, :]
        m = (cols[None, :] < C) & (local < inner)
    else:  # flat: ROWS = 1, a contiguous block of BLOCK_C elements (compile-time stride)
        local = rows[:, None] * BLOCK_C + cols[None, :]
        m = local < inner
    offs = b.to(tl.int64) * inner + local
    g = _load_sigma(g_ptr, g_val, g_st, b, G_TENSOR)
    c = tl.load(c_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if EAGER_ROUNDING:
        ct = c_ptr.dtype.element_ty
        d = _round_to(c - u, ct)
        v = _round_to(u + _round_to(g * d, ct), ct)
    else:
        d = c - u
        v = u + g * d
    if STATS == 1:
        p = part_ptr + (b.to(tl.int64) * n_chunks + chunk) * 8
        tl.store(p + 0, tl.sum(tl.sum(c, axis=1), axis=0))
        tl.store(p + 1, tl.sum(tl.sum(c * c, axis=1), axis=0))
        tl.store(p + 2, tl.sum(tl.sum(u, axis=1), axis=0))
        tl.store(p + 3, tl.sum(tl.sum(u * u, axis=1), axis=0))
        tl.store(p + 4, tl.sum(tl.sum(d, axis=1), axis=0))
        tl.store(p + 5, tl.sum(tl.sum(d * d, axis=1), axis=0))
        tl.store(p + 6, tl.sum(tl.sum(v * v, axis=1), axis=0))
    if STATS == 2:
        f64 = tl.float64
        _write_stats(part_ptr, tl.num_programs(1), b.to(tl.int64),
                     tl.sum(tl.sum(c, axis=1), axis=0).to(f64),
                     tl.sum(tl.sum(c * c, axis=1), axis=0).to(f64),
                     tl.sum(tl.sum(u, axis=1), axis=0).to(f64),
                     tl.sum(tl.sum(u * u, axis=1), axis=0).to(f64),
                     tl.sum(tl.sum(d, axis=1), axis=0).to(f64),
                     tl.sum(tl.sum(d * d, axis=1), axis=0).to(f64),
                     tl.sum(tl.sum(v * v, axis=1), axis=0).to(f64), inner,
                     _load_sigma(s_ptr, s_val, s_st, b, S_TENSOR))
    if WRITE:
        if RESCALE == 1:
            v = v * tl.load(ratio_ptr + b)
        if RESCALE == 2:
            nc = tl.sum(c * c, axis=1)
            nv = tl.sum(v * v, axis=1)
            ok = nv > 0.0
            r = tl.where(ok, tl.sqrt(nc) / tl.sqrt(tl.where(ok, nv, 1.0)), 1.0)
            v = v * r[:, None]
        if STEP:
            s = _load_sigma(s_ptr, s_val, s_st, b, S_TENSOR)
            sn = _load_sigma(sn_ptr, sn_val, sn_st, b, SN_TENSOR)
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if EAGER_ROUNDING:
                ct = c_ptr.dtype.element_ty
                v = _round_to(x + _round_to(_round_to(sn - s, ct) * v, ct),
                              out_ptr.dtype.element_ty)
            else:
                v = x + (sn - s) * v
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ratio_kernel(part_ptr, ratio_ptr, n_chunks, BLOCK: tl.constexpr):
    """Per-sample rescale factor from pass 1's partial sums (grid = (B,)):
    ratio[b] = sqrt(sum_k part[b, k, 1] / sum_k part[b, k, 6]) = ||c|| / ||v||, 1 where ||v|| = 0.
    """
    b = tl.program_id(0).to(tl.int64)
    acc_c = tl.zeros((BLOCK,), tl.float32)
    acc_v = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_chunks, BLOCK):
        k = start + tl.arange(0, BLOCK)
        m = k < n_chunks
        row = part_ptr + (b * n_chunks + k) * 8
        acc_c += tl.load(row + 1, mask=m, other=0.0)
        acc_v += tl.load(row + 6, mask=m, other=0.0)
    cc = tl.sum(acc_c, axis=0)
    vv = tl.sum(acc_v, axis=0)
    ok = vv > 0.0
    tl.store(ratio_ptr + b, tl.where(ok, tl.sqrt(cc) / tl.sqrt(tl.where(ok, vv, 1.0)), 1.0))


@triton.jit
def _write_stats(out_ptr, B, b, t0, t1, t2, t3, t4, t5, t6, n, sig):
    """Seed 000's guidance diagnostics of sample b from its fp64 sums t = (sum c, sum c^2,
    sum u, sum u^2, sum d, sum d^2, sum v^2) over n elements, to out[i, b] for the rows of
    `STAT_KEYS`: sigma, c mean/std, u mean/std, d mean/std, ||d||, vel_diff_norm,
    x0_diff_norm, rescale_ratio. mean = t_i / n, std = sqrt((t_i+1 - t_i^2 / n) / (n - 1))
    (unbiased; NaN for n = 1); ||d|| = sqrt(t_5); vel_diff_norm = x0_diff_norm = |sigma| ||d||;
    rescale_ratio = sqrt(t_1 / t_6) (1 where ||v|| = 0)."""
    nf = n.to(tl.float64)
    one = n > 1
    den = tl.where(one, nf - 1.0, 1.0)
    nan = float("nan")
    dn = tl.sqrt(t5)
    vel = tl.abs(sig).to(tl.float64) * dn
    ok = t6 > 0.0
    ratio = tl.where(ok, tl.sqrt(t1) / tl.sqrt(tl.where(ok, t6, 1.0)), 1.0)
    tl.store(out_ptr + 0 * B + b, sig)
    tl.store(out_ptr + 1 * B + b, (t0 / nf).to(tl.float32))
    tl.store(out_ptr + 2 * B + b, tl.where(one, tl.sqrt(tl.maximum(t1 - t0 * t0 / nf, 0.0) / den),
                                           nan).to(tl.float32))
    tl.store(out_ptr + 3 * B + b, (t2 / nf).to(tl.float32))
    tl.store(out_ptr + 4 * B + b, tl.where(one, tl.sqrt(tl.maximum(t3 - t2 * t2 / nf, 0.0) / den),
                                           nan).to(tl.float32))
    tl.store(out_ptr + 5 * B + b, (t4 / nf).to(tl.float32))
    tl.store(out_ptr + 6 * B + b, tl.where(one, tl.sqrt(tl.maximum(t5 - t4 * t4 / nf, 0.0) / den),
                                           nan).to(tl.float32))
    tl.store(out_ptr + 7 * B + b, dn.to(tl.float32))
    tl.store(out_ptr + 8 * B + b, vel.to(tl.float32))
    tl.store(out_ptr + 9 * B + b, vel.to(tl.float32))
    tl.store(out_ptr + 10 * B + b, ratio.to(tl.float32))


@triton.jit
def _stats_kernel(part_ptr, out_ptr, s_ptr, s_val, s_st, n_chunks, n, B,
                  S_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    """The statistics of sample b (`_write_stats`) from the guided kernel's partial sums
    part[b, :, :] (grid = (B,)), summed over the chunks in fp64 in a fixed order
    (deterministic)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, 8)
    acc = tl.zeros((BLOCK, 8), tl.float64)
    for start in range(0, n_chunks, BLOCK):
        k = start + tl.arange(0, BLOCK)
        ptrs = part_ptr + (b * n_chunks + k)[:, None] * 8 + cols[None, :]
        m = (k < n_chunks)[:, None] & (cols < 7)[None, :]
        acc += tl.load(ptrs, mask=m, other=0.0).to(tl.float64)
    t = tl.sum(acc, axis=0)
    _write_stats(out_ptr, B, b, tl.sum(tl.where(cols == 0, t, 0.0)),
                 tl.sum(tl.where(cols == 1, t, 0.0)), tl.sum(tl.where(cols == 2, t, 0.0)),
                 tl.sum(tl.where(cols == 3, t, 0.0)), tl.sum(tl.where(cols == 4, t, 0.0)),
                 tl.sum(tl.where(cols == 5, t, 0.0)), tl.sum(tl.where(cols == 6, t, 0.0)), n,
                 _load_sigma(s_ptr, s_val, s_st, b, S_TENSOR))


@triton.jit
def _sde_lane(x_ptr, v_ptr, z_ptr, out_ptr, z, b, j, inner, s, sn, k, std_dt,
              HAS_NOISE: tl.constexpr):
    """One lane of Q elements; returns its sum of z^2 (masked)."""
    m = j < inner
    offs = b * inner + j
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_NOISE:
        z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dt = sn - s
    out = x * (1.0 + k * dt) + v * (1.0 + k * (1.0 - s)) * dt + std_dt * z
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)
    return tl.sum(tl.where(m, z * z, 0.0), axis=0)


@triton.jit
def _sde_kernel(x_ptr, v_ptr, z_ptr, out_ptr, s_ptr, s_val, s_st, sn_ptr, sn_val, sn_st, eta,
                seed_ptr, part_ptr, inner, n_groups, HAS_NOISE: tl.constexpr,
                S_TENSOR: tl.constexpr, SN_TENSOR: tl.constexpr, LOGP: tl.constexpr,
                Q: tl.constexpr, FAST: tl.constexpr):
    """Euler-Maruyama step of the flow SDE (Flow-GRPO discretisation), grid = (groups, B).

    dt = sn - s (<= 0), s' = sn if s >= 1 else s, k = eta^2 / (2 (1 - s'))  (= std^2 / (2 s);
    0 when s' = 1, i.e. sigma = sigma_next = 1: then, as for any sigma = sigma_next, out = x),
    mean = x (1 + k dt) + v (1 + k (1 - s)) dt,  out = mean + sqrt(2 k s (s - sn)) * z,
    z = noise, or fmrt's seeded Philox noise (kernels/noise.py's offset scheme: program (g, b)
    owns elements [4Qg, 4Q(g+1)) of sample b in four lanes of Q, one Philox call per 4
    elements; FAST: the hardware log/sin/cos of compiled CUDA kernels), so the same seed gives
    the same noise as `ops.add_noise`. eta = 0 is exactly Euler. LOGP: the program's sum of
    z^2 to part[b, g].
    """
    g = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    s = _load_sigma(s_ptr, s_val, s_st, b, S_TENSOR)
    sn = _load_sigma(sn_ptr, sn_val, sn_st, b, SN_TENSOR)
    s_den = tl.where(s >= 1.0, sn, s)
    ok = s_den < 1.0   # else sigma = sigma_next = 1: a zero step (k = 0, no noise)
    k = tl.where(ok, eta * eta / (2.0 * tl.where(ok, 1.0 - s_den, 1.0)), 0.0)
    std_dt = tl.sqrt(tl.maximum(2.0 * k * s * (s - sn), 0.0))
    j0 = g * (4 * Q) + tl.arange(0, Q).to(tl.int64)
    if HAS_NOISE:
        n1 = tl.zeros((Q,), tl.float32)
        n2, n3, n4 = n1, n1, n1
    else:
        n1, n2, n3, n4 = philox_normal4(tl.load(seed_ptr), b, g, Q, FAST)
    zz = _sde_lane(x_ptr, v_ptr, z_ptr, out_ptr, n1, b, j0, inner, s, sn, k, std_dt, HAS_NOISE)
    zz += _sde_lane(x_ptr, v_ptr, z_ptr, out_ptr, n2, b, j0 + Q, inner, s, sn, k, std_dt,
                    HAS_NOISE)
    zz += _sde_lane(x_ptr, v_ptr, z_ptr, out_ptr, n3, b, j0 + 2 * Q, inner, s, sn, k, std_dt,
                    HAS_NOISE)
    zz += _sde_lane(x_ptr, v_ptr, z_ptr, out_ptr, n4, b, j0 + 3 * Q, inner, s, sn, k, std_dt,
                    HAS_NOISE)
    if LOGP:
        tl.store(part_ptr + b * n_groups + g, zz)


# ---------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------

# Host launchers compute only what the launch needs: no `triton.cdiv` / `next_power_of_2` on
# the host (each a ~4 us Python call), outputs by `empty_like`, tile choices cached per shape.
CONTIGUOUS = torch.contiguous_format
EULER_BLOCK = 1024


def sigma_args(sigma, like: torch.Tensor, batch: int):
    """(pointer tensor, scalar, stride, is_tensor) kernel arguments for a per-sample value: a
    float (passed by value), or a 0-d / [1] / [B] tensor read on the device without a copy
    when it is already float32 (stride 0 broadcasts one value)."""
    if not isinstance(sigma, torch.Tensor):
        return like, float(sigma), 0, False
    t = sigma if (sigma.dtype is torch.float32 and sigma.device == like.device) else \
        sigma.to(device=like.device, dtype=torch.float32)
    if t.ndim == 0 or t.numel() == 1:
        return t, 0.0, 0, True
    return t, 0.0, t.stride(0), True


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next,
               out_dtype=None, eager_rounding: bool = False) -> torch.Tensor:
    """x, v contiguous with the same shape (any float dtypes, loaded as they are); sigma /
    sigma_next floats or `[B]` / 0-d tensors; the result in out_dtype (default x's dtype)."""
    out = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=CONTIGUOUS)
    n = x.numel()
    if n == 0:
        return out
    batch = x.shape[0] if x.ndim else 1
    s_ptr, s_val, s_st, s_t = sigma_args(sigma, x, batch)
    sn_ptr, sn_val, sn_st, sn_t = sigma_args(sigma_next, x, batch)
    _euler_kernel[(-(-n // EULER_BLOCK),)](
        x, v, out, s_ptr, s_val, s_st, sn_ptr, sn_val, sn_st, n, max(n // batch, 1),
        S_TENSOR=s_t, SN_TENSOR=sn_t, EAGER_ROUNDING=eager_rounding, BLOCK=EULER_BLOCK,
        enable_fp_fusion=not eager_rounding)
    return out


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.lru_cache(maxsize=256)
def _tile(inner: int, row: int):
    """(ROWS, BLOCK_C, C, chunks, num_warps) for the guided kernel: per-token rows of `row`
    elements, or the flat layout (row = 0) in blocks of up to 4096 elements."""
    if row:
        bc = _pow2(row)
        n_rows = inner // row
        rows = max(1, min(max(4096 // bc, 1), _pow2(n_rows)))
        return rows, bc, row, -(-n_rows // rows), 8 if rows * bc >= 4096 else 4
    block = min(4096, max(128, _pow2(inner)))
    return 1, block, block, -(-inner // block), 8 if block >= 4096 else 4


STAT_KEYS = ("sigma", "cond_mean", "cond_std", "uncond_mean", "uncond_std", "cfg_diff_mean",
             "cfg_diff_std", "cfg_diff_norm", "vel_diff_norm", "x0_diff_norm", "rescale_ratio")


def finish_stats(part: torch.Tensor, n: int, sigma) -> torch.Tensor:
    """Per-sample statistics, float32 `[11, B]` on the device (rows: `STAT_KEYS`), from the
    guided kernel's partial sums `part [B, chunks, NSTAT]` over n elements per sample: one
    launch of `_stats_kernel`, no host sync."""
    B, chunks = part.shape[0], part.shape[1]
    out = torch.empty((len(STAT_KEYS), B), dtype=torch.float32, device=part.device)
    if B:
        s_ptr, s_val, s_st, s_t = sigma_args(sigma, part, B)
        _stats_kernel[(B,)](part, out, s_ptr, s_val, s_st, chunks, n, B, S_TENSOR=s_t,
                            BLOCK=_stats_block(chunks), num_warps=1)
    return out


@functools.lru_cache(maxsize=None)
def _stats_block(chunks: int) -> int:
    return min(256, max(2, _pow2(chunks)))


def guided_step(x, c, u, scale, sigma, sigma_next, *, rescale: str, row: int, stats: bool,
                stats_sigma=None, out_dtype=None, eager_rounding: bool = False):
    """CFG combine (+ norm rescale) (+ Euler step when x is not None) (+ statistics).

    c, u (and x) contiguous with the same shape `[B, ...]` (x may have another float dtype);
    row > 0: per-token rescale over rows of `row` elements (the last dim). The result is in
    out_dtype (default: x's dtype for a step, c's otherwise).
    Returns (out, statistics float32 `[11, B]` (rows `STAT_KEYS`; sigma = stats_sigma, default
    sigma) or None).

    Bytes moved (N elements of size e): rescale "none" or per token: one pass, reads x, c, u and
    writes out: 4 N e (cfg_combine: 3 N e). Per-sample rescale: pass 1 reads c, u (2 N e) and
    writes the partial norms; pass 2 reads x, c, u and writes out: 6 N e (cfg_combine 5 N e).
    Statistics add only the partial sums (8 floats per program) and one tiny finishing kernel;
    a step whose samples fit one program each (small latents, where the host cost matters)
    writes the finished statistics from that program (no partial sums, no second launch).
    """
    step = x is not None
    xx = x if step else c
    out = torch.empty_like(xx, dtype=out_dtype or xx.dtype, memory_format=CONTIGUOUS)
    B = c.shape[0]
    n = c.numel()
    inner = n // B if B else 0
    if stats_sigma is None:
        stats_sigma = sigma
    if n == 0:
        zeros = torch.zeros(B, 1, NSTAT, device=c.device)
        return out, (finish_stats(zeros, inner, stats_sigma) if stats else None)
    token = rescale == "norm" and row > 0
    per_sample = rescale == "norm" and not token
    rows, bc, C, chunks, warps = _tile(inner, row if token else 0)
    g_ptr, g_val, g_st, g_t = sigma_args(scale, c, B)
    s_ptr, s_val, s_st, s_t = sigma_args(sigma, c, B) if step else (c, 0.0, 0, False)
    sn_ptr, sn_val, sn_st, sn_t = sigma_args(sigma_next, c, B) if step else (c, 0.0, 0, False)
    grid = (chunks, B)
    fused = stats and step and chunks == 1 and not per_sample and stats_sigma is sigma
    if fused:   # the kernel writes the finished statistics
        part = torch.empty((len(STAT_KEYS), B), dtype=torch.float32, device=c.device)
    elif stats or per_sample:
        part = torch.empty((B, chunks, NSTAT), dtype=torch.float32, device=c.device)
    else:
        part = c
    ratio = c
    if per_sample:
        _guided_kernel[grid](xx, c, u, out, g_ptr, g_val, g_st, s_ptr, s_val, s_st, sn_ptr,
                             sn_val, sn_st, ratio, part, inner, C, chunks, STEP=False,
                             WRITE=False, G_TENSOR=g_t, S_TENSOR=s_t, SN_TENSOR=sn_t,
                             RESCALE=0, STATS=1, TOKEN=token, EAGER_ROUNDING=False,
                             ROWS=rows, BLOCK_C=bc, num_warps=warps)
        ratio = torch.empty((B,), dtype=torch.float32, device=c.device)
        _ratio_kernel[(B,)](part, ratio, chunks, BLOCK=min(1024, max(32, _pow2(chunks))),
                            num_warps=1)
    _guided_kernel[grid](xx, c, u, out, g_ptr, g_val, g_st, s_ptr, s_val, s_st, sn_ptr, sn_val,
                         sn_st, ratio, part, inner, C, chunks, STEP=step, WRITE=True,
                         G_TENSOR=g_t, S_TENSOR=s_t, SN_TENSOR=sn_t,
                         RESCALE=1 if per_sample else (2 if token else 0),
                         STATS=0 if not stats or per_sample else (2 if fused else 1),
                         TOKEN=token, EAGER_ROUNDING=eager_rounding, ROWS=rows, BLOCK_C=bc,
                         num_warps=warps, enable_fp_fusion=not eager_rounding)
    if not stats:
        return out, None
    return out, (part if fused else finish_stats(part, inner, stats_sigma))


def sde_step(x, v, sigma, sigma_next, eta: float, noise, seed, logp: bool):
    """x, v (and noise) contiguous, same shape `[B, ...]`; seed a 0-d int64 device tensor when
    noise is None. Returns (out, per-sample sums of z^2 `[B]` float64, or None).
    Bytes: reads x, v (and noise), writes out: 3 N e (4 N e with noise)."""
    out = torch.empty_like(x, memory_format=CONTIGUOUS)
    B = x.shape[0]
    n = x.numel()
    inner = n // B if B else 0
    if n == 0:
        return out, (torch.zeros(B, device=x.device, dtype=torch.float64) if logp else None)
    groups = -(-inner // (4 * NOISE_Q))
    s_ptr, s_val, s_st, s_t = sigma_args(sigma, x, B)
    sn_ptr, sn_val, sn_st, sn_t = sigma_args(sigma_next, x, B)
    part = torch.empty(B, groups, dtype=torch.float32, device=x.device) if logp else x
    _sde_kernel[(groups, B)](x, v, noise if noise is not None else x, out, s_ptr, s_val, s_st,
                             sn_ptr, sn_val, sn_st, float(eta),
                             seed if seed is not None else x, part, inner, groups,
                             HAS_NOISE=noise is not None, S_TENSOR=s_t, SN_TENSOR=sn_t,
                             LOGP=logp, Q=NOISE_Q, FAST=fast_math(x), num_warps=4)
    return out, (part.double().sum(1) if logp else None)


# ---------------------------------------------------------------------------------------------
# guidance reuse (fmrt.guidance): refresh step writes d, reuse step steps from c and d
# ---------------------------------------------------------------------------------------------

NSTAT_REUSE = 4  # partial sums per program: c^2, d^2, (d - prev)^2 or (c - prev)^2, pad


@triton.jit
def _reuse_kernel(x_ptr, c_ptr, ud_ptr, prev_ptr, out_ptr, d_ptr, g_ptr, g_val, g_st,
                  s_ptr, s_val, s_st, sn_ptr, sn_val, sn_st, part_ptr, inner, n_chunks,
                  REFRESH: tl.constexpr, HAS_PREV: tl.constexpr, STATS: tl.constexpr,
                  G_TENSOR: tl.constexpr, S_TENSOR: tl.constexpr, SN_TENSOR: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Guided Euler step with guidance reuse, one block of one sample (grid = (chunks, B)).

    REFRESH:  ud = u;  d = c - u (stored, fp32);  v = u + g * d
    reuse:    ud = d;  v = c + (g - 1) * d                  (no u read)
    out = x + (sigma_next - sigma) * v                      (fp32 math, one rounding)
    STATS: partial sums of c^2, d^2 and (d - prev)^2 (REFRESH, prev = the previous d) or
    (c - prev)^2 (reuse, prev = the cond output of the last refresh; HAS_PREV) to
    part[b, chunk, :].
    """
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    local = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = local < inner
    offs = b.to(tl.int64) * inner + local
    g = _load_sigma(g_ptr, g_val, g_st, b, G_TENSOR)
    s = _load_sigma(s_ptr, s_val, s_st, b, S_TENSOR)
    sn = _load_sigma(sn_ptr, sn_val, sn_st, b, SN_TENSOR)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ud = tl.load(ud_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if REFRESH:
        d = c - ud
        v = ud + g * d
        tl.store(d_ptr + offs, d, mask=m)
    else:
        d = ud
        v = c + (g - 1.0) * d
    tl.store(out_ptr + offs, (x + (sn - s) * v).to(out_ptr.dtype.element_ty), mask=m)
    if STATS:
        p = part_ptr + (b.to(tl.int64) * n_chunks + chunk) * 4
        tl.store(p + 0, tl.sum(c * c, axis=0))
        tl.store(p + 1, tl.sum(d * d, axis=0))
        if HAS_PREV:
            q = tl.load(prev_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if REFRESH:
                e = d - q
            else:
                e = c - q
            tl.store(p + 2, tl.sum(e * e, axis=0))
        else:
            tl.store(p + 2, 0.0)


def reuse_step(x, c, ud, scale, sigma, sigma_next, *, refresh: bool, prev=None,
               stats: bool = False):
    """Refresh (ud = u: returns x', d fp32) or reuse (ud = d: returns x', None) step, plus the
    per-sample statistics `[B, 3]` float32 (||c||^2, ||d||^2, ||change||^2) when `stats`.
    x, c, ud (and prev) contiguous with the same shape `[B, ...]`.

    Bytes (N elements of e bytes; d fp32): refresh reads x, c, u, writes x' and d:
    4 N e + 4 N (+ 4 N reading the previous d with stats); reuse reads x, c, d and writes x':
    3 N e + 4 N (+ N e reading c_ref with stats)."""
    out = torch.empty_like(x)
    d = torch.empty(c.shape, dtype=torch.float32, device=c.device) if refresh else None
    B = c.shape[0]
    n = c.numel()
    inner = n // B if B else 0
    if n == 0:
        return out, d, (torch.zeros(B, 3, device=c.device) if stats else None)
    block = min(4096, max(128, _pow2(inner)))
    chunks = triton.cdiv(inner, block)
    g_args = sigma_args(scale, c, B)
    s_args = sigma_args(sigma, c, B)
    sn_args = sigma_args(sigma_next, c, B)
    part = torch.empty(B, chunks, NSTAT_REUSE, dtype=torch.float32, device=c.device) \
        if stats else c
    _reuse_kernel[(chunks, B)](x, c, ud, prev if prev is not None else c, out,
                               d if d is not None else c, *g_args[:3], *s_args[:3],
                               *sn_args[:3], part, inner, chunks, REFRESH=refresh,
                               HAS_PREV=prev is not None, STATS=stats, G_TENSOR=g_args[3],
                               S_TENSOR=s_args[3], SN_TENSOR=sn_args[3], BLOCK=block,
                               num_warps=8 if block >= 4096 else 4)
    return out, d, (part.sum(1)[:, :3] if stats else None)
