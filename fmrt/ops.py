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

def _flash_custom_ops():
    """The torch.library custom ops wrapping each kernel launch (created on first use).

    A Triton launch made directly inside an autograd.Function fails under torch.func.jvp
    (functorch wrappers have no storage); an opaque custom op is unwrapped by the dispatcher."""
    global _FLASH_OPS
    if _FLASH_OPS is not None:
        return _FLASH_OPS
    from fmrt.kernels import attention as K

    @torch.library.custom_op("fmrt::flash_attn_fwd", mutates_args=())
    def fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], bias_kind: int,
            scale: float) -> tuple[Tensor, Tensor]:
        return K.attention_fwd(q, k, v, bias, bias_kind, scale)

    @fwd.register_fake
    def _(q, k, v, bias, bias_kind, scale):
        B, S, H, D = q.shape
        return q.new_empty((B, S, H, D)), q.new_empty((B, H, S), dtype=torch.float32)

    @torch.library.custom_op("fmrt::flash_attn_fwd_jvp", mutates_args=())
    def fwd_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                bias: Optional[Tensor], bias_kind: int, scale: float) -> Tensor:
        return K.attention_fwd(q, k, v, bias, bias_kind, scale, tq, tk, tv)[2]

    @fwd_jvp.register_fake
    def _(q, k, v, tq, tk, tv, bias, bias_kind, scale):
        return q.new_empty(q.shape)

    @torch.library.custom_op("fmrt::flash_attn_bwd", mutates_args=())
    def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
            bias_kind: int, out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor,
                                                                             Tensor]:
        return K.attention_bwd(dout, q, k, v, bias, bias_kind, out, lse, scale)

    @bwd.register_fake
    def _(dout, q, k, v, bias, bias_kind, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    _FLASH_OPS = (fwd, fwd_jvp, bwd)
    return _FLASH_OPS


_FLASH_OPS = None


class _FlashAttention(torch.autograd.Function):
    """out = softmax(scale q k^T + bias) v with a reverse (FA2) and a forward-mode rule (the
    fused one-pass tangent kernel). Under torch.func.jvp the primal runs in `forward` and the
    fused kernel (primal + tangent) in `jvp`."""

    @staticmethod
    def forward(q, k, v, bias, bias_kind, scale):
        fwd, _, _ = _flash_custom_ops()
        return fwd(q, k, v, bias, bias_kind, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, bias_kind, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.save_for_forward(q, k, v, bias)
        ctx.bias_kind, ctx.scale = bias_kind, scale

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        _, _, bwd = _flash_custom_ops()
        dq, dk, dv = bwd(dout, q, k, v, bias, ctx.bias_kind, out, lse, ctx.scale)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, tbias, tkind, tscale):
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "fmrt.ops.flash_attention: torch.func.jvp inside torch.compile is not supported "
                "(torch 2.13 returns wrong tangents silently, pytorch #192985); keep the JVP "
                "out of compiled regions")
        # the mask is a constant: a tangent on it (if any) is ignored
        q, k, v, bias = ctx.saved_tensors
        _, fwd_jvp, _ = _flash_custom_ops()
        tq = torch.zeros_like(q) if tq is None else tq
        tk = torch.zeros_like(k) if tk is None else tk
        tv = torch.zeros_like(v) if tv is None else tv
        return fwd_jvp(q, k, v, tq, tk, tv, bias, ctx.bias_kind, ctx.scale), None


def _flash_mask(mask, q: Tensor, k: Tensor) -> tuple[Optional[Tensor], int, Optional[Tensor]]:
    """(kernel bias, kind, mask for the reference). Boolean `[B, S_k]` is key padding
    (True = keep); boolean 4-d masks become additive 0 / -inf; float masks are additive and
    broadcast to `[B, H, S_q, S_k]` (dims of size 1 are not copied)."""
    if mask is None:
        return None, 0, None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    B, S_q, H, _ = q.shape
    S_k = k.shape[1]
    if mask.dtype == torch.bool and mask.ndim == 2:
        if tuple(mask.shape) != (B, S_k):
            raise ValueError(f"a boolean 2-d mask is key padding [B={B}, S_k={S_k}], "
                             f"got {tuple(mask.shape)}")
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias = bias.masked_fill(~mask, float("-inf"))
        return bias, 2, mask[:, None, None, :]
    if mask.dtype != torch.bool:
        check_float_tensor("mask", mask)
    if mask.ndim != 4:
        raise ValueError(f"mask must be [B or 1, H or 1, S_q, S_k] (or boolean key padding "
                         f"[B, S_k]), got shape {tuple(mask.shape)}")
    for i, (got, want, nm) in enumerate(zip(mask.shape, (B, H, S_q, S_k),
                                            ("B", "H", "S_q", "S_k"))):
        if got != want and not (i < 2 and got == 1):
            raise ValueError(f"mask dim {i} must be {nm}={want}"
                             f"{' or 1' if i < 2 else ''}, got shape {tuple(mask.shape)}")
    bias = mask
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias = bias.masked_fill(~mask, float("-inf"))
    return bias.expand(B, H, S_q, S_k), 1, mask


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                    mask: Optional[Tensor] = None) -> Tensor:
    """Non-causal attention `softmax(scale q k^T + mask) v`, layout `[B, S, H, D]` (any strides,
    no transposed copies), differentiable in reverse mode AND forward mode (`torch.func.jvp`,
    MeanFlow): the Triton kernel computes the output and its tangent in one pass.

    q `[B, S_q, H, D]`, k / v `[B, S_k, H, D]`, one dtype of fp32 / fp16 / bf16, D <= 256 (padded
    to a power of two >= 16 inside the kernel). mask: additive float `[B or 1, H or 1, S_q, S_k]`,
    a boolean mask of that shape (True = keep), or boolean key padding `[B, S_k]`; it is a
    constant (no gradient, no tangent). scale defaults to D ** -0.5. Returns `[B, S_q, H, D]`.
    Under `torch.compile` the op is a graph break (`torch.compiler.disable`): a compiled
    `torch.func.jvp` over it silently returned zero tangents in torch 2.13.
    """
    check_float_tensor("q", q)
    check_float_tensor("k", k)
    check_float_tensor("v", v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be [B, S, H, D], got shape {tuple(t.shape)}")
    check_same("v", v, "k", k)
    B, S_q, H, D = q.shape
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, S_k, H={H}, D={D}], got {tuple(k.shape)}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim D must be in [1, 256], got {D}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
    scale = float(D ** -0.5 if scale is None else scale)
    bias, kind, ref_mask = _flash_mask(mask, q, k)
    if not use_triton(q, k, v):
        return ref.attention(q, k, v, scale=scale, mask=ref_mask)
    return _flash_apply(q, k, v, bias, kind, scale)


@torch.compiler.disable
def _flash_apply(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], kind: int,
                 scale: float) -> Tensor:
    # Kept out of dynamo on purpose: a compiled torch.func.jvp over the Function returned zero
    # tangents silently (torch 2.13, tested). Dynamo graph-breaks here; inside a functorch
    # transform it then runs the whole transform eagerly, which is correct.
    return _FlashAttention.apply(q, k, v, bias, kind, scale)[0]
