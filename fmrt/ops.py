"""fmrt's public ops: argument checks (once, before any launch), dispatch between the Triton
kernels (`fmrt.kernels`) and the pure-torch reference (`fmrt.reference`), autograd.

Dispatch: `FMRT_BACKEND` = auto | triton | torch (see `fmrt._dispatch`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fmrt import reference as ref
from fmrt._dispatch import use_triton

Sigma = Union[float, Tensor]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# argument checks shared by every op
# ---------------------------------------------------------------------------------------------

def check_float_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def check_same(name: str, t: Tensor, like_name: str, like: Tensor, *, dtype: bool = True) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, "
                         f"got {tuple(t.shape)}")
    if dtype and t.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def check_sigma(name: str, sigma, x: Tensor, *, per_sample_only: bool = False) -> None:
    """A float in [0, 1], a 0-d tensor, a `[B]` tensor, or (unless per_sample_only) a tensor
    broadcastable to x. Tensor values are not read back to the host."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(sigma).__name__}")
    if not isinstance(sigma, Tensor):
        if not 0.0 <= float(sigma) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {sigma}")
        return
    if not sigma.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {sigma.dtype}")
    if sigma.device != x.device:
        raise ValueError(f"{name} is on {sigma.device} but the data is on {x.device}")
    if sigma.ndim == 0:
        return
    batch = x.shape[0] if x.ndim else 1
    if sigma.ndim == 1 and sigma.shape[0] in (1, batch):
        return
    if per_sample_only:
        raise ValueError(f"{name} must be a float, 0-d or [B={batch}] tensor, "
                         f"got shape {tuple(sigma.shape)}")
    if sigma.ndim != x.ndim:
        raise ValueError(f"{name} of shape {tuple(sigma.shape)} must be [B={batch}] or have "
                         f"{x.ndim} dims broadcastable to {tuple(x.shape)}")
    try:
        torch.broadcast_shapes(sigma.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(sigma.shape)} does not broadcast to "
                         f"{tuple(x.shape)}") from None


# ---------------------------------------------------------------------------------------------
# training ops: add_noise, flow_matching_loss
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# sampling ops: euler_step, cfg_combine, guided_euler_step, sde_step
# ---------------------------------------------------------------------------------------------

def euler_step(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """One Euler step of the flow ODE: `x + (sigma_next - sigma) * v`.

    x, v: same shape `[B, ...]` and dtype; sigma, sigma_next: floats, 0-d or `[B]` tensors on
    x's device. Returns a new tensor of x's dtype (fp32 math, one rounding).
    """
    check_float_tensor("x", x)
    check_float_tensor("v", v)
    check_same("v", v, "x", x)
    check_sigma("sigma", sigma, x, per_sample_only=True)
    check_sigma("sigma_next", sigma_next, x, per_sample_only=True)
    if not use_triton(x, v):
        return ref.euler_step(x, v, sigma, sigma_next)
    from fmrt.kernels import step as K
    return K.euler_step(x.contiguous(), v.contiguous(), sigma, sigma_next)


# ---------------------------------------------------------------------------------------------
# attention ops: qk_norm_rope, Triton flash attention with JVP
# ---------------------------------------------------------------------------------------------

NORMS = ("across_heads", "per_head", None)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                 cos: Tensor, sin: Tensor, *, eps: float = 1e-6,
                 norm: Optional[str] = "across_heads") -> tuple[Tensor, Tensor]:
    """RMSNorm q and k (over H*D with weight [H*D], over D with weight [D], or not at all), then
    rotate interleaved pairs by cos/sin `[S, D/2]`. q, k: `[B, S, H, D]`, any strides."""
    check_float_tensor("q", q)
    check_float_tensor("k", k)
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S, H, D], got shape {tuple(q.shape)}")
    check_same("k", k, "q", q)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    B, S, H, D = q.shape
    if D % 2:
        raise ValueError(f"head dim D must be even for the rotary, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_float_tensor(name, t, dtypes=(torch.float32, torch.float64, torch.float16,
                                            torch.bfloat16))
        if tuple(t.shape) != (S, D // 2):
            raise ValueError(f"{name} must be [S={S}, D/2={D // 2}], got {tuple(t.shape)}")
    want = {"across_heads": H * D, "per_head": D}.get(norm)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is None:
            continue
        check_float_tensor(name, w, dtypes=(torch.float32, torch.float16, torch.bfloat16))
        if want is not None and w.numel() != want:
            raise ValueError(f"{name} must have {want} elements for norm={norm!r}, "
                             f"got {tuple(w.shape)}")
    return ref.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, norm)


# ---------------------------------------------------------------------------------------------
# flash attention (Triton, with forward-mode JVP): see kernels/attention.py
# ---------------------------------------------------------------------------------------------
