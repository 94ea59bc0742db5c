"""Sampling-step kernels: Euler (and, later in this file, CFG combine, guided Euler and
Euler-Maruyama steps).

Sigmas reach a kernel either as fp32 scalars (Python floats: no tensor, no sync) or as a pointer
to a `[B]` fp32 tensor read on the device (per sample; `inner` = elements per sample), so no
step ever reads a tensor back to the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_sigma(ptr, scalar, b, IS_TENSOR: tl.constexpr):
    """sigma for the batch indices `b`: from a [B] tensor, or the scalar argument."""
    if IS_TENSOR:
        return tl.load(ptr + b).to(tl.float32)
    return scalar


@triton.jit
def _euler_kernel(x_ptr, v_ptr, out_ptr, s_ptr, s_val, sn_ptr, sn_val, n, inner,
                  SIGMA_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    """out = x + (sigma_next - sigma) * v, fp32 math, one rounding to x's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    b = offs // inner
    s = _load_sigma(s_ptr, s_val, b, SIGMA_TENSOR)
    sn = _load_sigma(sn_ptr, sn_val, b, SIGMA_TENSOR)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + (sn - s) * v).to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------

def sigma_args(sigma, like: torch.Tensor, batch: int):
    """(pointer tensor, scalar) kernel arguments for a float or `[B]`/0-d tensor sigma."""
    if isinstance(sigma, torch.Tensor):
        return sigma.to(device=like.device, dtype=torch.float32).expand(batch).contiguous(), 0.0
    return like, float(sigma)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x, v contiguous with the same shape; sigma / sigma_next floats or `[B]` / 0-d tensors."""
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    batch = x.shape[0] if x.ndim else 1
    is_tensor = isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor)
    if is_tensor:
        sigma = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))
        sigma_next = (sigma_next if isinstance(sigma_next, torch.Tensor)
                      else torch.tensor(float(sigma_next)))
    s_ptr, s_val = sigma_args(sigma, x, batch)
    sn_ptr, sn_val = sigma_args(sigma_next, x, batch)
    BLOCK = 1024
    grid = (triton.cdiv(n, BLOCK),)
    _euler_kernel[grid](x, v, out, s_ptr, s_val, sn_ptr, sn_val, n, max(n // batch, 1),
                        SIGMA_TENSOR=is_tensor, BLOCK=BLOCK)
    return out
