"""Flow-matching loss kernel: per-sample sums of masked squared errors against the target
`eps - x0` and, in the same pass, the gradient `2 mask (pred - target)` with respect to pred,
so the backward is a single per-sample scale (the fused-loss idea of Liger-Kernel).

eps is loaded or regenerated in registers from the seed with exactly the offset scheme of
`noise.py` (program (b, g) owns group g of sample b, four lanes of Q elements), so the loss
sees the very noise `add_noise(..., seed=s)` used. Each program writes one fp32 partial sum;
`partial.view(B, n_groups).sum(1)` finishes the reduction: deterministic, no atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fmrt.kernels.noise import _layout, bcast_args, load_bcast, philox_normal4
from fmrt.reference import NOISE_Q


@triton.jit
def _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, eps, b, j, inner,
               HAS_NOISE: tl.constexpr, MASK_MODE: tl.constexpr, NEED_GRAD: tl.constexpr,
               IDX64: tl.constexpr):
    m = j < inner
    offs = b * inner + j
    p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(n_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = p - (eps - x)
    mk = load_bcast(m_ptr, 1.0, b, j, m, m_bstride, m_T, m_R, MASK_MODE, IDX64)
    if NEED_GRAD:
        tl.store(g_ptr + offs, (2.0 * mk * d).to(g_ptr.dtype.element_ty), mask=m)
    return tl.where(m, d * d * mk, 0.0)


@triton.jit
def _fm_loss_kernel(p_ptr, x_ptr, n_ptr, seed_ptr, m_ptr, m_bstride, m_T, m_R, g_ptr, part_ptr,
                    inner, n_groups, HAS_NOISE: tl.constexpr, MASK_MODE: tl.constexpr,
                    NEED_GRAD: tl.constexpr, IDX64: tl.constexpr, Q: tl.constexpr):
    """part[b, g] = sum over group g of sample b of mask (pred - (eps - x0))^2, and (NEED_GRAD)
    grad = 2 mask (pred - (eps - x0)) in pred's dtype; fp32 math.
    Grid: B * n_groups programs, as `_add_noise_kernel`."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_groups
    g = pid % n_groups
    j0 = g * (4 * Q) + tl.arange(0, Q).to(tl.int64)
    if HAS_NOISE:
        n1 = tl.zeros((Q,), tl.float32)
        n2, n3, n4 = n1, n1, n1
    else:
        n1, n2, n3, n4 = philox_normal4(tl.load(seed_ptr), b, g, Q)
    acc = _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, n1, b, j0, inner,
                     HAS_NOISE, MASK_MODE, NEED_GRAD, IDX64)
    acc += _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, n2, b, j0 + Q,
                      inner, HAS_NOISE, MASK_MODE, NEED_GRAD, IDX64)
    acc += _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, n3, b, j0 + 2 * Q,
                      inner, HAS_NOISE, MASK_MODE, NEED_GRAD, IDX64)
    acc += _loss_lane(p_ptr, x_ptr, n_ptr, g_ptr, m_ptr, m_bstride, m_T, m_R, n4, b, j0 + 3 * Q,
                      inner, HAS_NOISE, MASK_MODE, NEED_GRAD, IDX64)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


# ---------------------------------------------------------------------------------------------
# host launcher
# ---------------------------------------------------------------------------------------------

def fm_loss_fwd(pred: torch.Tensor, x0: torch.Tensor, noise: Optional[torch.Tensor],
                seed: Optional[torch.Tensor], mask: Optional[torch.Tensor], need_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, grad): num `[B]` float32 per-sample sums of mask (pred - (noise - x0))^2, grad
    `2 mask (pred - (noise - x0))` in pred's dtype (empty unless need_grad). pred, x0, noise
    contiguous `[B, ...]`; seed a 0-d int64 tensor when noise is None; mask broadcastable."""
    batch, inner, n_groups = _layout(pred)
    grad = torch.empty_like(pred) if need_grad else pred.new_empty(0)
    if batch * n_groups == 0:
        return torch.zeros(batch, dtype=torch.float32, device=pred.device), grad
    part = torch.empty(batch * n_groups, dtype=torch.float32, device=pred.device)
    m_ptr, _, m_bs, m_T, m_R, mode = bcast_args(mask, 1.0, pred.shape, pred.device,
                                                per_sample_1d=False)
    _fm_loss_kernel[(batch * n_groups,)](
        pred, x0, noise if noise is not None else x0, seed if seed is not None else x0,
        m_ptr, m_bs, m_T, m_R, grad if need_grad else part, part, inner, n_groups,
        HAS_NOISE=noise is not None, MASK_MODE=mode, NEED_GRAD=need_grad,
        IDX64=inner >= 2 ** 31, Q=NOISE_Q, num_warps=4)
    return part.view(batch, n_groups).sum(1), grad
