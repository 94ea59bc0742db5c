"""Flow-matching loss kernels: per-sample sums of masked squared errors against the target
`eps - x0` and, in the same pass, the gradient `2 mask (pred - target)` with respect to pred,
so the backward is a single per-sample scale (the fused-loss idea of Liger-Kernel).

eps is loaded or regenerated in registers from the seed with exactly the offset scheme of
`noise.py` (program (b, g) owns group g of sample b, four lanes of Q elements), so the loss
sees the very noise `add_noise(..., seed=s)` used. Each program writes two fp32 partial sums
(masked squared error, mask); one tiny single-program kernel then sums them per sample in a
fixed order (deterministic, no atomics), divides, weights, reduces, and writes the per-sample
gradient coefficients `weight_b / sum(mask_b)` (/ B for "mean").
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from fmrt.kernels import noise as N
from fmrt.kernels.noise import _layout, bcast_args, load_bcast, philox_normal4
from fmrt.reference import NOISE_Q

REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}
FINISH_TILE = 4096   # elements of the finishing kernel's [BLOCK_B, BLOCK_G] tile


@triton.jit
def _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, m_mT, m_lT, m_mR, m_lR,
               eps, b, j, inner,
               HAS_NOISE: tl.constexpr, MASK_MODE: tl.constexpr, NEED_GRAD: tl.constexpr,
               IDX64: tl.constexpr):
    m = j < inner
    offs = b * inner + j
    p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = p - (eps - x)
    mk = load_bcast(m_ptr, 1.0, b, j, m, m_bstride, m_T, m_R, m_mT, m_lT, m_mR, m_lR,
                    MASK_MODE, IDX64)
    if NEED_GRAD:
        tl.store(g_ptr + offs, (2.0 * mk * d).to(g_ptr.dtype.element_ty), mask=m)
    return tl.where(m, d * d * mk, 0.0), tl.where(m, mk, 0.0)


@triton.jit
def _fm_loss_kernel(p_ptr, x_ptr, n_ptr, seed_ptr, m_ptr, m_bstride, m_T, m_R, m_mT, m_lT, m_mR,
                    m_lR, g_ptr, part_ptr,
                    inner, n_groups, n_progs, HAS_NOISE: tl.constexpr, MASK_MODE: tl.constexpr,
                    NEED_GRAD: tl.constexpr, IDX64: tl.constexpr, Q: tl.constexpr,
                    FAST: tl.constexpr):
    """part[0, b, g] = sum over group g of sample b of mask (pred - (eps - x0))^2,
    part[1, b, g] = sum of mask there, and (NEED_GRAD) grad = 2 mask (pred - (eps - x0)) in
    pred's dtype; fp32 math. Grid: B * n_groups programs, as `_add_noise_kernel`."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_groups
    g = pid % n_groups
    j0 = g * (4 * Q) + tl.arange(0, Q).to(tl.int64)
    if HAS_NOISE:
        n1 = tl.zeros((Q,), tl.float32)
        n2, n3, n4 = n1, n1, n1
    else:
        n1, n2, n3, n4 = philox_normal4(tl.load(seed_ptr), b, g, Q, FAST)
    acc, accm = _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, m_mT, m_lT,
                           m_mR, m_lR, n1, b, j0, inner, HAS_NOISE, MASK_MODE, NEED_GRAD, IDX64)
    a, am = _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, m_mT, m_lT, m_mR,
                       m_lR, n2, b, j0 + Q, inner, HAS_NOISE, MASK_MODE, NEED_GRAD, IDX64)
    acc, accm = acc + a, accm + am
    a, am = _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, m_mT, m_lT, m_mR,
                       m_lR, n3, b, j0 + 2 * Q, inner, HAS_NOISE, MASK_MODE, NEED_GRAD, IDX64)
    acc, accm = acc + a, accm + am
    a, am = _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, m_mT, m_lT, m_mR,
                       m_lR, n4, b, j0 + 3 * Q, inner, HAS_NOISE, MASK_MODE, NEED_GRAD, IDX64)
    acc, accm = acc + a, accm + am
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))
    tl.store(part_ptr + n_progs + pid, tl.sum(accm, axis=0))


@triton.jit
def _fm_loss_finish_kernel(part_ptr, n_groups, n_progs, w_ptr, w_val, loss_ptr, coef_ptr, B,
                           W_TENSOR: tl.constexpr, REDUCTION: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    """One program: num_b, den_b = sums of the partials of sample b (fixed order);
    L_b = w_b num_b / den_b (0 if den_b = 0); loss = mean / sum / [B] of L_b;
    coef_b = w_b / den_b (/ B for mean) = d loss / d num_b."""
    b = tl.arange(0, BLOCK_B)
    bm = b < B
    # elementwise tile accumulators, reduced once after the loop: a reduction inside the loop
    # feeding a loop-carried sum with several uses trips an assertion in triton 3.6's
    # OptimizeThreadLocality pass on sm_90 (seen on an H200 at B = 8, BLOCK_G = 512)
    num2 = tl.zeros((BLOCK_B, BLOCK_G), tl.float32)
    den2 = tl.zeros((BLOCK_B, BLOCK_G), tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        gi = g0 + tl.arange(0, BLOCK_G)
        m2 = bm[:, None] & (gi < n_groups)[None, :]
        offs = b[:, None].to(tl.int64) * n_groups + gi[None, :]
        num2 += tl.load(part_ptr + offs, mask=m2, other=0.0)
        den2 += tl.load(part_ptr + n_progs + offs, mask=m2, other=0.0)
    num = tl.sum(num2, axis=1)
    den = tl.sum(den2, axis=1)
    if W_TENSOR:
        w = tl.load(w_ptr + b, mask=bm, other=0.0)
    else:
        w = tl.zeros((BLOCK_B,), tl.float32) + w_val
    ok = den > 0
    safe = tl.where(ok, den, 1.0)
    per = tl.where(ok, num / safe, 0.0) * w
    coef = tl.where(ok, w / safe, 0.0)
    if REDUCTION == 2:
        tl.store(loss_ptr + b, per, mask=bm)
    else:
        total = tl.sum(tl.where(bm, per, 0.0), axis=0)
        if REDUCTION == 0:
            total = total / B
            coef = coef / B
        tl.store(loss_ptr, total)
    tl.store(coef_ptr + b, coef, mask=bm)


# ---------------------------------------------------------------------------------------------
# host launcher
# ---------------------------------------------------------------------------------------------

_NO_MASK = (0, 1, 1) + N.magic31(1) + N.magic31(1)   # bcast_args' (bstride, T, R, magics)


@functools.lru_cache(maxsize=256)
def _finish_blocks(batch: int, n_groups: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_G) of the finishing kernel (cached: `triton.next_power_of_2` is a ~4 us
    Python call on the host)."""
    block_b = max(triton.next_power_of_2(batch), 2)
    return block_b, max(min(triton.next_power_of_2(max(n_groups, 1)), FINISH_TILE // block_b), 2)


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: Optional[torch.Tensor],
                       seed: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                       weight: Optional[torch.Tensor], weight_value: float, reduction: str,
                       need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad, coef): the reduced float32 loss (0-d, or `[B]` for "none"); grad
    `2 mask (pred - (noise - x0))` in pred's dtype (empty unless need_grad); coef `[B]` float32
    = d loss / d (per-sample sum of squared errors), so d loss / d pred = coef_b * grad.
    pred, x0, noise contiguous `[B, ...]`; seed a 0-d int64 tensor when noise is None; mask
    broadcastable to pred; weight a `[B]`/`[1]`/0-d tensor or None with `weight_value`."""
    batch, inner, n_groups = _layout(pred)
    dev = pred.device
    grad = torch.empty_like(pred) if need_grad else pred.new_empty(0)
    loss = torch.empty((batch,) if reduction == "none" else (), dtype=torch.float32, device=dev)
    coef = torch.empty(batch, dtype=torch.float32, device=dev)
    n_progs = batch * n_groups
    part = torch.empty(2 * max(n_progs, 1), dtype=torch.float32, device=dev)
    if n_progs:
        if mask is None:
            m_ptr, m_args, mode = part, _NO_MASK, 0
        else:
            m_ptr, _, *m_args, mode = bcast_args(mask, 1.0, pred.shape, dev, per_sample_1d=False)
        _fm_loss_kernel[(n_progs,)](
            pred, x0, noise if noise is not None else x0, seed if seed is not None else x0,
            m_ptr, *m_args, grad if need_grad else part, part, inner, n_groups, n_progs,
            HAS_NOISE=noise is not None, MASK_MODE=mode, NEED_GRAD=need_grad,
            IDX64=inner >= N.IDX64_FROM, Q=NOISE_Q, FAST=N.fast_math(pred), num_warps=4)
    w = None
    if weight is not None:
        w = weight.to(device=dev, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
    BLOCK_B, BLOCK_G = _finish_blocks(batch, n_groups)
    _fm_loss_finish_kernel[(1,)](
        part, n_groups, n_progs, w if w is not None else coef, float(weight_value), loss, coef,
        batch, W_TENSOR=w is not None, REDUCTION=REDUCTION_CODES[reduction], BLOCK_B=BLOCK_B,
        BLOCK_G=BLOCK_G, num_warps=4)
    return loss, grad, coef
