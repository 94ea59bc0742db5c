"""q/k RMSNorm + interleaved rotary (Wan's 3D RoPE), forward and backward.

Forward: one program per token row of q or k (grid axis 1 picks q (0) or k (1), so both go in one
launch). The row of H*D elements (up to 40 x 128 = 5120 for Wan 14B) is walked in chunks of
BLOCK_H heads x BLOCK_D, BLOCK_H the largest power of two dividing H (up to 512 elements: 4 for
Wan's 12 and 40 heads at D = 128), so no lane is padded (a single `next_pow2(H)` tile would waste 25 % / 37 % of its
lanes there); for the norm across heads a first pass sums the squares, the second re-reads the
row (an L1 hit) to normalise, rotate and store. Loads use the caller's strides (q and k are
usually views of a fused qkv projection: never copied); each chunk is split into the even/odd
halves of each rotary pair with `reshape + split`, computed in fp32, re-joined and stored once,
contiguous.

Backward: a persistent-style grid sized by occupancy (`_backward_programs`: every program of q
and k resident at once, one wave, no tail), each program looping over a contiguous run of rows
with the next row's loads issued before the current row is computed (software prefetch), its
weight-gradient partial kept in registers and stored once.

Norm codes: 0 none, 1 across heads (Wan: RMS over H*D, weight [H*D]), 2 per head (FLUX / SD3:
RMS over D, weight [D]).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from fmrt._dispatch import interpreter_enabled

NORM_CODES = {None: 0, "none": 0, "across_heads": 1, "per_head": 2}


@triton.jit
def _rotate(x, c, s, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Interleaved pairs (a, b) = (x[..., 2i], x[..., 2i+1]) -> (a c - b s, a s + b c).
    x `[BLOCK_H, 2 * BLOCK_P]`, c / s `[1, BLOCK_P]` (pass -s for the transpose)."""
    a, b = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_P, 2)))
    y = tl.join(a * c - b * s, a * s + b * c)
    return tl.reshape(y, (BLOCK_H, 2 * BLOCK_P))


@triton.jit
def _rstd(x, H, D, eps, NORM: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps): a scalar over the row (NORM 1) or `[BLOCK_H, 1]` per head
    (NORM 2); padded lanes hold 0."""
    if NORM == 1:
        return tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (H * D) + eps)
    else:
        return tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]


@triton.jit
def _load_weight(w_ptr, h, d, m, D, NORM: tl.constexpr):
    if NORM == 1:
        return tl.load(w_ptr + h[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        return tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _load_chunk(x_ptr, s_h, s_d, i, H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Heads [i BLOCK_H, (i + 1) BLOCK_H) of a row, fp32 `[BLOCK_H, BLOCK_D]` (0 where masked)."""
    h = i * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < H) & (d[None, :] < D)
    return tl.load(x_ptr + h[:, None] * s_h + d[None, :] * s_d, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _fwd_row(x_ptr, s_h, s_d, o_ptr, w_ptr, c, s, H, D, eps, NORM: tl.constexpr,
             HAS_W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
             N_CHUNKS: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    if NORM == 1:  # the row's statistic first: sum of squares over all H*D
        x = _load_chunk(x_ptr, s_h, s_d, 0, H, D, BLOCK_H, BLOCK_D)
        ss = tl.sum(tl.sum(x * x, axis=1), axis=0)
        for i in tl.static_range(1, N_CHUNKS):
            x = _load_chunk(x_ptr, s_h, s_d, i, H, D, BLOCK_H, BLOCK_D)
            ss += tl.sum(tl.sum(x * x, axis=1), axis=0)
        rstd_row = tl.rsqrt(ss / (H * D) + eps)
    for i in tl.static_range(N_CHUNKS):
        h = i * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (h[:, None] < H) & (d[None, :] < D)
        x = _load_chunk(x_ptr, s_h, s_d, i, H, D, BLOCK_H, BLOCK_D)
        if NORM == 1:
            x = x * rstd_row
        elif NORM == 2:
            x = x * _rstd(x, H, D, eps, NORM)
        if NORM != 0:
            if HAS_W:
                x = x * _load_weight(w_ptr, h, d, m, D, NORM)
        y = _rotate(x, c, s, BLOCK_H, BLOCK_D // 2)
        tl.store(o_ptr + h[:, None] * D + d[None, :], y.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _qk_norm_rope_fwd_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr,
                             S, H, D, q_sb, q_ss, q_sh, q_sd, k_sb, k_ss, k_sh, k_sd,
                             c_ss, c_sp, s_ss, s_sp, eps, NORM: tl.constexpr,
                             HAS_WQ: tl.constexpr, HAS_WK: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                             N_CHUNKS: tl.constexpr):
    """Row (b, s) of x = q (axis 1 = 0) or k (1), all H*D elements, N_CHUNKS chunks of BLOCK_H
    heads:

    NORM 1: n = x / sqrt(mean_{h,d}(x^2) + eps) * w[h*D + d]
    NORM 2: n = x / sqrt(mean_d(x^2) + eps) * w[d]
    NORM 0: n = x
    out[2i] = n[2i] cos[s, i] - n[2i+1] sin[s, i];  out[2i+1] = n[2i] sin[s, i] + n[2i+1] cos[s, i]
    fp32 math, one rounding; out contiguous `[B, S, H, D]`.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    t = row % S
    p = tl.arange(0, BLOCK_D // 2)
    pm = p < D // 2
    c = tl.load(cos_ptr + t * c_ss + p * c_sp, mask=pm, other=1.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * s_ss + p * s_sp, mask=pm, other=0.0).to(tl.float32)[None, :]
    out = row * H * D
    if tl.program_id(1) == 0:
        _fwd_row(q_ptr + b * q_sb + t * q_ss, q_sh, q_sd, qo_ptr + out, wq_ptr, c, s, H, D,
                 eps, NORM, HAS_WQ, BLOCK_H, BLOCK_D, N_CHUNKS)
    else:
        _fwd_row(k_ptr + b * k_sb + t * k_ss, k_sh, k_sd, ko_ptr + out, wk_ptr, c, s, H, D,
                 eps, NORM, HAS_WK, BLOCK_H, BLOCK_D, N_CHUNKS)


@triton.jit
def _bwd_load(x_ptr, x_sb, x_ss, x_sh, x_sd, g_ptr, g_sb, g_ss, g_sh, g_sd, cos_ptr, sin_ptr,
              c_ss, c_sp, s_ss, s_sp, row, S, H, D, NORM: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Everything row `row` needs: (x (or d out when NORM 0: x is not read), d out, cos, sin),
    x and d out in their storage dtype (a prefetched bf16 row takes half the registers)."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < H) & (d[None, :] < D)
    p = tl.arange(0, BLOCK_D // 2)
    pm = p < D // 2
    b = row // S
    t = row % S
    c = tl.load(cos_ptr + t * c_ss + p * c_sp, mask=pm, other=1.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * s_ss + p * s_sp, mask=pm, other=0.0).to(tl.float32)[None, :]
    go = tl.load(g_ptr + b * g_sb + t * g_ss + h[:, None] * g_sh + d[None, :] * g_sd,
                 mask=m, other=0.0)
    if NORM == 0:
        x = go
    else:
        x = tl.load(x_ptr + b * x_sb + t * x_ss + h[:, None] * x_sh + d[None, :] * x_sd,
                    mask=m, other=0.0)
    return x, go, c, s


@triton.jit
def _bwd_rows(x_ptr, x_sb, x_ss, x_sh, x_sd, g_ptr, g_sb, g_ss, g_sh, g_sd, dx_ptr, w_ptr,
              part_ptr, cos_ptr, sin_ptr, c_ss, c_sp, s_ss, s_sp, row0, row1, S, H, D, eps,
              NORM: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < H) & (d[None, :] < D)
    w = 1.0
    if NORM == 2:
        if HAS_W:  # [1, BLOCK_D]: kept in registers
            w = _load_weight(w_ptr, h, d, m, D, NORM)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    x, go, c, s = _bwd_load(x_ptr, x_sb, x_ss, x_sh, x_sd, g_ptr, g_sb, g_ss, g_sh, g_sd,
                            cos_ptr, sin_ptr, c_ss, c_sp, s_ss, s_sp, row0, S, H, D, NORM,
                            BLOCK_H, BLOCK_D)
    for row in range(row0, row1):
        if PREFETCH:  # the next row's loads go out before this row's math (the last row
            # re-loads itself)
            x_n, go_n, c_n, s_n = _bwd_load(x_ptr, x_sb, x_ss, x_sh, x_sd, g_ptr, g_sb, g_ss,
                                            g_sh, g_sd, cos_ptr, sin_ptr, c_ss, c_sp, s_ss,
                                            s_sp, tl.minimum(row + 1, row1 - 1), S, H, D, NORM,
                                            BLOCK_H, BLOCK_D)
        else:
            x, go, c, s = _bwd_load(x_ptr, x_sb, x_ss, x_sh, x_sd, g_ptr, g_sb, g_ss, g_sh,
                                    g_sd, cos_ptr, sin_ptr, c_ss, c_sp, s_ss, s_sp, row, S, H, D,
                                    NORM, BLOCK_H, BLOCK_D)
        g = _rotate(go.to(tl.float32), c, -s, BLOCK_H, BLOCK_D // 2)  # rotary transpose
        if NORM == 0:
            dx = g
        else:
            xf = x.to(tl.float32)
            rstd = _rstd(xf, H, D, eps, NORM)
            if HAS_W:
                if NEED_DW:
                    acc += g * (xf * rstd)
                if NORM == 1:  # [H*D]: re-read per row (an L1 hit) rather than held in
                    gw = g * _load_weight(w_ptr, h, d, m, D, NORM)  # registers all along
                else:
                    gw = g * w
            else:
                gw = g
            # mean(gw * xhat) over the norm group with xhat = x * rstd never held as a tile
            # (one fewer row-sized temporary: the 64-register build at 32 warps does not spill)
            if NORM == 1:
                dot = tl.sum(tl.sum(gw * xf, axis=1), axis=0) * rstd / (H * D)
            else:
                dot = (tl.sum(gw * xf, axis=1) / D)[:, None] * rstd
            dx = rstd * gw - (rstd * rstd * dot) * xf   # = rstd (gw - xhat dot)
        tl.store(dx_ptr + row * H * D + h[:, None] * D + d[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=m)
        if PREFETCH:
            x, go, c, s = x_n, go_n, c_n, s_n
    if NEED_DW:
        if NORM == 1:
            tl.store(part_ptr + h[:, None] * D + d[None, :], acc, mask=m)
        else:
            tl.store(part_ptr + d, tl.sum(acc, axis=0), mask=d < D)


@triton.jit
def _qk_norm_rope_bwd_kernel(q_ptr, k_ptr, gq_ptr, gk_ptr, dq_ptr, dk_ptr, wq_ptr, wk_ptr,
                             part_ptr, cos_ptr, sin_ptr, n_rows, rows_per_prog, n_progs, S, H, D,
                             q_sb, q_ss, q_sh, q_sd, k_sb, k_ss, k_sh, k_sd,
                             gq_sb, gq_ss, gq_sh, gq_sd, gk_sb, gk_ss, gk_sh, gk_sd,
                             c_ss, c_sp, s_ss, s_sp, part_n, eps, NORM: tl.constexpr,
                             HAS_WQ: tl.constexpr, HAS_WK: tl.constexpr,
                             NEED_DW: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr):
    """Rows [p * R, (p + 1) * R) of q (axis 1 = 0) or k (1); with g = rot^T(d out):

    NORM 0: dx = g
    else:   xhat = x * rstd;  gw = g * w;  dx = rstd * (gw - xhat * mean(gw * xhat))
            (mean over the norm group: H*D or D);  dw partial = sum_rows g * xhat
            (per head: also summed over heads), stored to part[which, p, :]
    Partials are summed on the host in a fixed order (deterministic).
    """
    pid = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    row0 = pid * rows_per_prog
    row1 = tl.minimum(row0 + rows_per_prog, n_rows)
    if which == 0:
        _bwd_rows(q_ptr, q_sb, q_ss, q_sh, q_sd, gq_ptr, gq_sb, gq_ss, gq_sh, gq_sd, dq_ptr, wq_ptr,
                  part_ptr + pid * part_n, cos_ptr, sin_ptr, c_ss, c_sp, s_ss, s_sp, row0, row1,
                  S, H, D, eps, NORM, HAS_WQ, NEED_DW, BLOCK_H, BLOCK_D, PREFETCH)
    else:
        _bwd_rows(k_ptr, k_sb, k_ss, k_sh, k_sd, gk_ptr, gk_sb, gk_ss, gk_sh, gk_sd, dk_ptr, wk_ptr,
                  part_ptr + (n_progs + pid) * part_n, cos_ptr, sin_ptr, c_ss, c_sp, s_ss, s_sp,
                  row0, row1, S, H, D, eps, NORM, HAS_WK, NEED_DW, BLOCK_H, BLOCK_D, PREFETCH)


# ---------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    """The next power of two >= n (triton.next_power_of_2 without its call overhead)."""
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _fwd_blocks(H: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_D, N_CHUNKS, num_warps) of the forward: chunks of BLOCK_H heads, the
    largest power of two dividing H up to 512 elements per chunk (no padded lanes: Wan's 12
    heads in 3 chunks of 4, 40 in 10 of 4; triton 3.6's sm_90 build of 1024-element chunks of 40
    heads used 8 bytes of stack); a padded single chunk only where that would take more than 16
    chunks (H with a small power-of-two part, e.g. 17). ~8 elements per thread: 16-byte bf16
    accesses."""
    BLOCK_D = max(_pow2(D), 2)
    BLOCK_H = min(H & -H, max(512 // BLOCK_D, 1))
    if H // BLOCK_H > 16:
        BLOCK_H = _pow2(H)
    n_chunks = -(-H // BLOCK_H)
    num_warps = min(max((BLOCK_H * BLOCK_D) // 256, 1), 8)
    return BLOCK_H, BLOCK_D, n_chunks, num_warps


@functools.lru_cache(maxsize=None)
def _bwd_blocks(H: int, D: int) -> tuple[int, int, int, bool]:
    """(BLOCK_H, BLOCK_D, num_warps, PREFETCH) of the backward: the whole row as one padded tile
    (the weight-gradient partial of every head stays in registers across rows), 8 fp32 elements
    of it per thread (4 warps for 1024 elements, 8 from 2048 (Wan 1.3B's 16 x 128), 32 for Wan
    14B's 64 x 128), the next row prefetched where a thread may hold 128 registers (<= 16 warps).
    At 32 warps (64 registers a thread, one program per SM) the prefetched row would spill (48 /
    104 bytes of stack in bf16 / fp32), and at 16 warps even the plain loop spills in fp32: Wan
    14B's backward runs 32 warps without the prefetch, its 32 warps' loads of one row in flight
    per SM. Checked by compiling for sm_90 (benchmarks/aot_compile.py: no spills at Wan's
    shapes); whether it reaches the bandwidth goal is for a GPU run to say."""
    BLOCK_H = _pow2(H)
    BLOCK_D = max(_pow2(D), 2)
    num_warps = min(max((BLOCK_H * BLOCK_D) // 256, 1), 32)
    return BLOCK_H, BLOCK_D, num_warps, num_warps <= 16


def _bwd_regs(num_warps: int) -> int:
    """Registers per thread the backward's sm_90 builds are held to (the launch's `maxnreg`;
    triton 3.6 would otherwise take 147 for fp32 at 8 warps, one program per SM instead of
    two): 128, or what 64 K registers leave for one program of that many threads (64 at 32
    warps)."""
    return min(128, 65536 // (32 * num_warps))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _backward_programs(n_rows: int, device: torch.device, num_warps: int) -> int:
    """Programs per tensor (q, k) in the backward on CUDA: as many as fit on the device at once
    (registers: 64 K per SM / (`_bwd_regs` x threads per program); at most 64 warps and 32
    programs per SM), halved for q and k: one resident wave and no tail, each program looping over
    ~n_rows / programs rows with its weight-gradient partial in registers. 8 under the
    interpreter."""
    if device.type == "cuda":
        per_sm = max(min(65536 // (_bwd_regs(num_warps) * 32 * num_warps), 64 // num_warps,
                         32), 1)
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = max(_sm_count(index) * per_sm // 2, 1)
    else:
        target = 8
    return max(min(n_rows, target), 1)


def qk_norm_rope_fwd(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor],
                     k_weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                     eps: float, norm: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k `[B, S, H, D]` (any strides, same shape and dtype); weights `[H*D]` / `[D]`
    (contiguous) or None; cos, sin `[S, D/2]`. Returns contiguous (q_out, k_out)."""
    B, S, H, D = q.shape
    qo = torch.empty_like(q, memory_format=torch.contiguous_format)  # (cheaper on the host
    ko = torch.empty_like(k, memory_format=torch.contiguous_format)  # than torch.empty(shape))
    if q.numel() == 0:
        return qo, ko
    code = NORM_CODES[norm]
    BLOCK_H, BLOCK_D, n_chunks, nw = _fwd_blocks(H, D)
    _qk_norm_rope_fwd_kernel[(B * S, 2)](
        q, k, qo, ko, q_weight if q_weight is not None else q,
        k_weight if k_weight is not None else k, cos, sin, S, H, D, *q.stride(), *k.stride(),
        *cos.stride(), *sin.stride(), float(eps), NORM=code,
        HAS_WQ=q_weight is not None, HAS_WK=k_weight is not None, BLOCK_H=BLOCK_H,
        BLOCK_D=BLOCK_D, N_CHUNKS=n_chunks, num_warps=nw)
    return qo, ko


def qk_norm_rope_bwd(gq: torch.Tensor, gk: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                     cos: torch.Tensor, sin: torch.Tensor, eps: float, norm: Optional[str],
                     need_dw: bool):
    """(dq, dk, dq_weight, dk_weight): dq, dk contiguous in q's / k's dtype; weight gradients
    float32 of the weights' shapes (empty when not need_dw or the weight is None; two rows of one
    tensor when both are there). The upstream
    gradients gq, gk may have any strides (stride 0 included)."""
    B, S, H, D = q.shape
    dev = q.device
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    code = NORM_CODES[norm]
    wn = {1: H * D, 2: D}.get(code, 0)
    need_dw = need_dw and code != 0 and (q_weight is not None or k_weight is not None)
    n_rows = B * S
    BLOCK_H, BLOCK_D, nw, prefetch = _bwd_blocks(H, D)
    n_progs = _backward_programs(n_rows, dev, nw)
    rows_per_prog = -(-max(n_rows, 1) // n_progs)
    n_progs = -(-max(n_rows, 1) // rows_per_prog)
    # every program stores its whole partial once: no zero fill needed
    part = torch.empty((2, n_progs, wn) if need_dw else (1,), dtype=torch.float32, device=dev)
    if n_rows and H * D:
        _qk_norm_rope_bwd_kernel[(n_progs, 2)](
            q, k, gq, gk, dq, dk, q_weight if q_weight is not None else q,
            k_weight if k_weight is not None else k, part, cos, sin, n_rows, rows_per_prog,
            n_progs, S, H, D, *q.stride(), *k.stride(), *gq.stride(), *gk.stride(),
            *cos.stride(), *sin.stride(), wn, float(eps), NORM=code,
            HAS_WQ=q_weight is not None, HAS_WK=k_weight is not None, NEED_DW=need_dw,
            BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, PREFETCH=prefetch, num_warps=nw,
            **({} if interpreter_enabled() else {"maxnreg": _bwd_regs(nw)}))
    sums = part.sum(1) if need_dw else None  # [2, wn]: both weights' partials in one reduction

    def dw(i, w):  # rows of one tensor: a custom op returning them must clone them
        if not need_dw or w is None:
            return q.new_empty(0, dtype=torch.float32)
        return sums[i]
    return dq, dk, dw(0, q_weight), dw(1, k_weight)
