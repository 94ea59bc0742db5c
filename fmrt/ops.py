"""fmrt's public ops: argument checks (once, before any launch), dispatch between the Triton
kernels (`fmrt.kernels`) and the pure-torch reference (`fmrt.reference`), autograd.

Dispatch: `FMRT_BACKEND` = auto | triton | torch (see `fmrt._dispatch`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

import torch.autograd.forward_ad as _forward_ad
from torch._C._functorch import is_functorch_wrapped_tensor as _is_wrapped
from torch._C._functorch import maybe_current_level as _functorch_level

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


def wants_autograd(*tensors) -> bool:
    """Whether an op's result must carry derivatives: grad mode on and an input tensor that
    requires grad, a forward-mode AD level open (dual tensors), or a torch.func transform
    (grad, jvp, vmap) active. False on the hot path (sampling, data preparation): then the
    Triton path runs no autograd code at all. Non-tensors are ignored."""
    if _forward_ad._current_level >= 0 or _functorch_level() is not None:
        return True
    if torch.is_grad_enabled():
        for t in tensors:
            if isinstance(t, Tensor) and t.requires_grad:
                return True
    return False


def tracing() -> bool:
    """torch.compile, export, make_fx or a fake / functional / other dispatch mode is active:
    the Triton path then runs through its torch.library custom op (traceable); otherwise the
    launcher is called directly (the custom-op wrapper costs ~60 us per call on the host)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_first_frame(first_frame, x: Tensor, x_name: str) -> None:
    """TI2V first-frame latents: a float `[B, C, 1, H, W]` tensor matching video x `[B, C, T, H, W]`
    (T >= 2) on x's device."""
    check_float_tensor("first_frame", first_frame)
    if x.ndim != 5:
        raise ValueError(f"first_frame needs video {x_name} [B, C, T, H, W], got "
                         f"{tuple(x.shape)}")
    B, C, T, H, W = x.shape
    if tuple(first_frame.shape) != (B, C, 1, H, W):
        raise ValueError(f"first_frame must be [B, C, 1, H, W] = {(B, C, 1, H, W)}, got "
                         f"{tuple(first_frame.shape)}")
    if first_frame.device != x.device:
        raise ValueError(f"first_frame is on {first_frame.device} but {x_name} is on {x.device}")
    if T < 2:
        raise ValueError("first_frame needs at least 2 latent frames (frame 0 is pinned)")


def check_qkv(q, k, v, *, dtypes: Optional[Sequence[torch.dtype]] = None) -> None:
    """Attention inputs `[B, S, H, D]`: floating tensors (of `dtypes` when given) of one dtype
    and device; k and v agree in B, S_k, H; q and k in B, H, D (S_q may differ from S_k)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if dtypes is not None:
            check_float_tensor(name, t, dtypes=dtypes)
        elif not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        elif not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be [B, S, H, D], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in B, S, H")
    B, _, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, S_k, H={H}, D={D}]: q {tuple(q.shape)} and k "
                         f"must agree in B, H, D, got {tuple(k.shape)}")


HOST_CHECK_LIMIT = 4096   # CPU tensors up to this many elements get their values checked


def host_values(t: Tensor) -> Optional[list]:
    """The values of a small CPU tensor as a flat list, for value checks that cost no device
    sync; None for CUDA (or other device) tensors, large ones, and while tracing or under a
    torch.func transform: those values are not checked (reading a CUDA tensor back would
    sync the device and break CUDA-graph capture)."""
    if not t.is_cpu or t.numel() > HOST_CHECK_LIMIT or torch.compiler.is_compiling() or \
            torch._C._len_torch_dispatch_stack() or _functorch_level() is not None:
        return None
    v = t.tolist() if t.ndim <= 1 else t.reshape(-1).tolist()
    return v if isinstance(v, list) else [v]


def check_sigma(name: str, sigma, x: Tensor, *, per_sample_only: bool = False) -> None:
    """A float in [0, 1], a 0-d tensor, a `[B]` tensor, or (unless per_sample_only) a tensor
    broadcastable to x. The values of CPU tensors are checked too (`host_values`); those of
    CUDA tensors are not read back to the host (no sync): keeping them in [0, 1] is then
    the caller's part."""
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
    for v in host_values(sigma) or ():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got a value {v}")
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
#
# Seeds: an int in [0, 2^63), a 0-d integer tensor (device-side seeds: no host sync), or None
# (add_noise: drawn on the data's device from torch's default generator, so torch.manual_seed
# governs it). Noise of element (b, j) = Philox(seed; counter = (j-group, b)): the scheme is in
# fmrt/reference.py ("training ops"); the Triton kernels and the reference give the same noise.
# The Triton path runs through torch.library custom ops (`fmrt::add_noise`,
# `fmrt::flow_matching_loss`), so both ops trace into torch.compile graphs without a break.

REDUCTIONS = ("mean", "sum", "none")
SEED_LIMIT = 2 ** 63


def check_seed(name: str, seed) -> None:
    """None, an int in [0, 2^63) or a 0-d integer tensor."""
    if seed is None:
        return
    if isinstance(seed, bool):
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got bool")
    if isinstance(seed, Tensor):
        if seed.ndim != 0 or seed.is_floating_point() or seed.is_complex() or \
                seed.dtype == torch.bool:
            raise TypeError(f"{name} tensor must be a 0-d integer tensor, got {seed.dtype} of "
                            f"shape {tuple(seed.shape)}")
        return
    if not isinstance(seed, int):
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got "
                        f"{type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must lie in [0, 2^63), got {seed}")


def seed_tensor(seed, device) -> Tensor:
    """The seed as a 0-d int64 tensor on `device`, made there (no host-to-device copy);
    None draws one from torch's default generator for that device."""
    if seed is None:
        return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64, device=device)
    if isinstance(seed, Tensor):
        return seed.to(device=device, dtype=torch.int64)
    return torch.full((), seed, dtype=torch.int64, device=device)


def _check_noise(noise, x0: Tensor, seed) -> None:
    if noise is None:
        return
    check_float_tensor("noise", noise)
    check_same("noise", noise, "x0", x0, dtype=False)
    if seed is not None:
        raise ValueError("pass either noise or seed, not both (seed draws the noise)")


def _add_noise_impl(x0: Tensor, sigma: Optional[Tensor], sigma_value: float,
                    noise: Optional[Tensor], seed: Optional[Tensor], return_noise: bool,
                    return_target: bool, eager_rounding: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    from fmrt.kernels import noise as K
    return K.add_noise(x0.contiguous(), sigma, sigma_value,
                       None if noise is None else noise.contiguous(), seed, return_noise,
                       return_target, eager_rounding)


_add_noise_op = torch.library.custom_op("fmrt::add_noise", _add_noise_impl, mutates_args=())


@_add_noise_op.register_fake
def _add_noise_fake(x0, sigma, sigma_value, noise, seed, return_noise, return_target,
                    eager_rounding=False):
    def new(keep, dtype=x0.dtype):
        if not keep:
            return x0.new_empty(0)
        return torch.empty(x0.shape, dtype=dtype, device=x0.device)
    x_dtype = torch.promote_types(x0.dtype, noise.dtype) if eager_rounding else x0.dtype
    return new(True, x_dtype), new(return_target), new(return_noise and noise is None)


def _add_noise_setup(ctx, inputs, output):
    x0, sigma, sigma_value, noise = inputs[:4]
    ctx.sigma_value = sigma_value
    ctx.set_materialize_grads(False)   # an unused x_t or target gets no zeros of x0's size
    ctx.dtypes = (x0.dtype, None if noise is None else noise.dtype)
    ctx.save_for_backward(sigma)


def _add_noise_backward(ctx, g_xt, g_target, g_noise):
    # x_t = (1 - s) x0 + s eps, target = eps - x0: linear in x0 and eps (sigma gets no grad)
    (sigma,) = ctx.saved_tensors
    if g_target is not None and not g_target.numel():
        g_target = None   # no target was returned
    like = g_xt if g_xt is not None else g_target
    if like is None:
        return (None,) * 8
    s = ref.broadcast_sigma(sigma if sigma is not None else ctx.sigma_value, like)
    zero = torch.zeros((), dtype=s.dtype, device=like.device)
    g = g_xt.to(s.dtype) if g_xt is not None else zero
    gt = g_target.to(s.dtype) if g_target is not None and g_target.numel() else zero
    x_dtype, n_dtype = ctx.dtypes
    g_x0 = ((1.0 - s) * g - gt).to(x_dtype)
    g_n = None if n_dtype is None else (s * g + gt).to(n_dtype)
    return g_x0, None, None, g_n, None, None, None, None


_add_noise_op.register_autograd(_add_noise_backward, setup_context=_add_noise_setup)


def add_noise(x0: Tensor, sigma: Sigma, noise: Optional[Tensor] = None, *, seed=None,
              return_noise: bool = False):
    """Noise x0 `[B, ...]` to level sigma: returns `(x_t, target)`, or `(x_t, target, noise)`
    with return_noise; `x_t = (1 - sigma) x0 + sigma noise`, `target = noise - x0`, both in
    x0's dtype (fp32 math, one rounding), contiguous.

    sigma: a float in [0, 1], a 0-d or `[B]` tensor, or a tensor with x0's ndim broadcastable to
    it (per frame: `[B, 1, T, 1, 1]`). noise: a float tensor of x0's shape, or None to draw
    N(0, 1) Philox noise from `seed` in the kernel (never written unless return_noise; the
    returned noise is then rounded to x0's dtype). Differentiable in x0 and noise (not sigma).
    """
    check_float_tensor("x0", x0)
    if x0.ndim == 0:
        raise ValueError("x0 must have a batch dimension [B, ...], got a 0-d tensor")
    check_sigma("sigma", sigma, x0)
    check_seed("seed", seed)
    _check_noise(noise, x0, seed)
    check_bool("return_noise", return_noise)
    if isinstance(seed, Tensor) and seed.device != x0.device:
        raise ValueError(f"seed is on {seed.device} but x0 is on {x0.device}")
    seed_t = None if noise is not None else seed_tensor(seed, x0.device)
    x_t, target, eps = noised_sample(x0, sigma, noise, seed_t, return_noise=return_noise)
    return (x_t, target, eps) if return_noise else (x_t, target)


def noised_sample(x0: Tensor, sigma: Sigma, noise: Optional[Tensor], seed: Optional[Tensor], *,
                  return_noise: bool = False, return_target: bool = True,
                  eager_rounding: bool = False):
    """add_noise after the checks (seed: a 0-d int64 tensor on x0's device, or None with
    noise): `(x_t, target or None, noise or None)`; the kernel skips what is not asked for.
    eager_rounding (noise given, return_target=False): x_t rounded op by op as diffusers'
    scale_noise is, in the promoted dtype of x0 and noise (`reference.add_noise`)."""
    if eager_rounding and (noise is None or return_target):
        raise ValueError("eager_rounding reproduces diffusers' scale_noise: it needs the noise "
                         "and returns no target")
    if use_triton(x0, *(t for t in (noise, sigma) if isinstance(t, Tensor))):
        s_t, s_v = (sigma, 0.0) if isinstance(sigma, Tensor) else (None, float(sigma))
        # the custom op (traceable, with its backward) only where it is needed: its wrapper
        # costs more host time than the rest of the call
        fn = _add_noise_op if tracing() or wants_autograd(x0, noise) else _add_noise_impl
        x_t, target, gen = fn(x0, s_t, s_v, noise, seed, return_noise, return_target,
                              eager_rounding)
        eps = (gen if noise is None else noise) if return_noise else None
        return x_t, (target if return_target else None), eps
    eps = noise if noise is not None else ref.philox_normal(x0.shape, seed, x0.device)
    if isinstance(sigma, Tensor):
        sigma = sigma.detach()  # sigma gets no gradient (as on the Triton path)
    x_t, target = ref.add_noise(x0, sigma, eps, eager_rounding)
    if return_noise and noise is None:
        eps = eps.to(x0.dtype)
    return x_t, (target if return_target else None), (eps if return_noise else None)


def _fm_loss_impl(pred: Tensor, x0: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
                  mask: Optional[Tensor], weight: Optional[Tensor], weight_value: float,
                  reduction: str, need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    from fmrt.kernels import loss as K
    return K.flow_matching_loss(pred.contiguous(), x0.contiguous(),
                                None if noise is None else noise.contiguous(), seed, mask,
                                weight, weight_value, reduction, need_grad)


_fm_loss_op = torch.library.custom_op("fmrt::flow_matching_loss", _fm_loss_impl,
                                      mutates_args=())


@_fm_loss_op.register_fake
def _fm_loss_fake(pred, x0, noise, seed, mask, weight, weight_value, reduction, need_grad):
    B = pred.shape[0]
    loss = pred.new_empty((B,) if reduction == "none" else (), dtype=torch.float32)
    grad = (torch.empty(pred.shape, dtype=pred.dtype, device=pred.device) if need_grad
            else pred.new_empty(0))
    return loss, grad, pred.new_empty(B, dtype=torch.float32)


def _fm_loss_setup(ctx, inputs, output):
    # the gradient buffer and coef are internal outputs that get no gradient: none is
    # materialised (autograd would otherwise allocate zeros of pred's size for grad_grad in
    # every backward: the second buffer seen on the H200, test_loss_extra_memory_cuda). Not
    # marked non-differentiable: a saved non-differentiable output keeps its original tensor,
    # and the buffer could no longer become pred.grad without a copy
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2])


def _fm_loss_backward(ctx, grad_loss, grad_grad, grad_coef):
    # d loss / d pred = coef_b * (the stored 2 mask (pred - target)): scale it per sample, in
    # place in eager mode (its only use, so no second buffer; a second backward trips
    # autograd's saved-tensor version check); out of place under torch.compile, where a
    # mutation of a saved activation would be functionalised into an extra copy.
    g, coef = ctx.saved_tensors
    none = (None,) * 8
    if g.numel() == 0 or grad_loss is None:
        return (None,) + none
    scale = (coef * grad_loss).view(-1, *([1] * (g.ndim - 1)))
    if torch.compiler.is_compiling():
        return ((g * scale).to(g.dtype),) + none
    return (g.mul_(scale),) + none


_fm_loss_op.register_autograd(_fm_loss_backward, setup_context=_fm_loss_setup)


class _FMLoss(torch.autograd.Function):
    """Eager mode: the custom op's forward, setup and backward without its wrapper (which
    costs more host time than the rest of the call)."""

    @staticmethod
    def forward(*inputs):
        return _fm_loss_impl(*inputs)

    setup_context = staticmethod(_fm_loss_setup)

    backward = staticmethod(_fm_loss_backward)


def _check_weight(weight, batch: int, device) -> None:
    if weight is None:
        return
    if isinstance(weight, bool) or not isinstance(weight, (int, float, Tensor)):
        raise TypeError(f"weight must be a float or a tensor, got {type(weight).__name__}")
    if not isinstance(weight, Tensor):
        if not math.isfinite(weight):
            raise ValueError(f"weight must be finite, got {weight}")
        return
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but pred is on {device}")
    if weight.ndim > 1 or (weight.ndim == 1 and weight.shape[0] not in (1, batch)):
        raise ValueError(f"weight must be a float, 0-d or [B={batch}] tensor, got shape "
                         f"{tuple(weight.shape)}")
    vals = host_values(weight)   # CPU tensors only (no sync)
    if vals is not None and not all(math.isfinite(v) for v in vals):
        raise ValueError("weight must be finite, got a non-finite value")


def _check_mask(mask, pred: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float or bool tensor, got {mask.dtype}")
    if mask.device != pred.device:
        raise ValueError(f"mask is on {mask.device} but pred is on {pred.device}")
    try:
        ok = mask.ndim <= pred.ndim and \
            tuple(torch.broadcast_shapes(mask.shape, pred.shape)) == tuple(pred.shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to pred "
                         f"{tuple(pred.shape)}")


def flow_matching_loss(pred: Tensor, x0: Tensor, noise: Optional[Tensor] = None, *, seed=None,
                       weight=None, mask: Optional[Tensor] = None, reduction: str = "mean"
                       ) -> Tensor:
    """Weighted flow-matching MSE: per sample `L_b = sum(mask (pred - (noise - x0))^2) /
    sum(mask)` over sample b (0 if the mask is all zero), times weight (float, 0-d or `[B]`);
    reduction "mean" (float32 scalar), "sum" or "none" (`[B]` float32).

    pred, x0: `[B, ...]`, same shape (float dtypes may differ); noise: x0's shape, or None to
    regenerate in the kernel the Philox noise `add_noise(x0, ..., seed=seed)` used (seed is then
    required). mask: float or bool, broadcastable to pred (TI2V frame mask `[B, 1, T, 1, 1]`).
    With mask=None and a scalar weight, "mean" is `mse_loss(pred.float(), target.float()) * w`.
    The Triton path computes d loss / d pred in the forward pass (stored in pred's dtype: the
    only tensor of x0's size kept); the backward scales it. Gradients flow to pred only.
    """
    check_float_tensor("pred", pred)
    check_float_tensor("x0", x0)
    if pred.ndim == 0:
        raise ValueError("pred must have a batch dimension [B, ...], got a 0-d tensor")
    if pred.shape[0] == 0:
        raise ValueError(f"pred must hold at least one sample, got batch 0 "
                         f"{tuple(pred.shape)} (the loss of no samples is undefined)")
    check_same("x0", x0, "pred", pred, dtype=False)
    check_seed("seed", seed)
    _check_noise(noise, x0, seed)
    if noise is None and seed is None:
        raise ValueError("flow_matching_loss needs noise or the seed add_noise drew it from")
    if isinstance(seed, Tensor) and seed.device != pred.device:
        raise ValueError(f"seed is on {seed.device} but pred is on {pred.device}")
    _check_weight(weight, pred.shape[0], pred.device)
    _check_mask(mask, pred)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    seed_t = None if noise is not None else seed_tensor(seed, pred.device)
    if use_triton(pred, x0, *(t for t in (noise, mask, weight) if isinstance(t, Tensor))):
        need_grad = torch.is_grad_enabled() and pred.requires_grad
        w_t, w_v = (weight, 1.0) if isinstance(weight, Tensor) else (
            None, 1.0 if weight is None else float(weight))
        args = (pred, x0, noise, seed_t, mask, w_t, w_v, reduction, need_grad)
        if tracing() or _is_wrapped(pred):
            return _fm_loss_op(*args)[0]
        if need_grad:
            return _FMLoss.apply(*args)[0]
        return _fm_loss_impl(*args)[0]
    eps = noise if noise is not None else ref.philox_normal(x0.shape, seed_t, x0.device)
    if isinstance(weight, Tensor):
        weight = weight.detach()  # gradients flow to pred only (as on the Triton path)
    if mask is not None:
        mask = mask.detach()
    return ref.flow_matching_loss(pred, x0, eps, weight, mask, reduction)


# ---------------------------------------------------------------------------------------------
# sampling ops: euler_step, cfg_combine, guided_euler_step, sde_step
# ---------------------------------------------------------------------------------------------

import math  # noqa: E402  (kept inside this section for clean merges)


# Derivatives on the Triton path. A call that needs none (wants_autograd False: sampling) calls
# the launcher directly. Otherwise the launch runs inside `_RefGradJvp` (`_RefGrad` while
# compiling), whose backward and jvp differentiate the op's reference (recomputed from the
# saved inputs, with torch.func.vjp / jvp; first order): the
# Triton and torch paths then differentiate alike, in every input the reference differentiates
# (x, v, v_cond, v_uncond, noise, and scale / sigma tensors), also for the non-linear norm
# rescale and the SDE log-prob.

def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


class _RefGrad(torch.autograd.Function):
    """`plan = (launch, reference, n_diff, prepare)`: forward returns `launch(*args)` (a tensor
    or a tuple); `reference(*args)` computes its first n_diff outputs in torch (the others, e.g.
    statistics, are not differentiable); `prepare(args)` (or None), run before differentiating,
    may replace arguments by constants (the SDE step's regenerated noise). Reverse mode only
    (what torch.compile traces)."""

    @staticmethod
    def forward(plan, *args):
        return plan[0](*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        plan, *args = inputs
        ctx.plan = plan
        ctx.slots = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.consts = [None if isinstance(a, Tensor) else a for a in args]
        tensors = [args[i] for i in ctx.slots]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        outs = _as_tuple(output)
        ctx.n_out = len(outs)
        if len(outs) > plan[2]:
            ctx.mark_non_differentiable(*outs[plan[2]:])

    @staticmethod
    def backward(ctx, *grads):
        # torch.func.vjp, not autograd.grad: this also runs inside torch.func.grad
        _, reference, n_diff, _ = ctx.plan
        need = ctx.needs_input_grad[1:]
        args = _saved_args(ctx)
        wrt = [i for i in ctx.slots if need[i]]

        def f(*primals):
            a = list(args)
            for i, p in zip(wrt, primals):
                a[i] = p
            return _as_tuple(reference(*a))[:n_diff]

        outs, pullback = torch.func.vjp(f, *(args[i] for i in wrt))
        cot = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads))
        res = [None] * len(args)
        for i, g in zip(wrt, pullback(cot)):
            res[i] = g
        return (None, *res)


class _RefGradJvp(_RefGrad):
    """`_RefGrad` plus forward mode (torch.func.jvp, dual tensors): the jvp of the reference."""

    @staticmethod
    def jvp(ctx, _plan, *tangents):
        _, reference, n_diff, _ = ctx.plan
        args = _saved_args(ctx)
        moving = [i for i in ctx.slots if tangents[i] is not None]

        def f(*primals):
            a = list(args)
            for i, p in zip(moving, primals):
                a[i] = p
            return _as_tuple(reference(*a))

        _, touts = torch.func.jvp(f, tuple(args[i] for i in moving),
                                  tuple(tangents[i] for i in moving))
        touts = tuple(touts) + (None,) * (ctx.n_out - n_diff)
        return touts if ctx.n_out > 1 else touts[0]


def _saved_args(ctx) -> list:
    args = list(ctx.consts)
    for i, t in zip(ctx.slots, ctx.saved_tensors):
        args[i] = t
    prepare = ctx.plan[3]
    return prepare(args) if prepare is not None else args


def _with_ref_grad(launch, reference, n_diff: int, *args, prepare=None):
    """Run `launch(*args)` with the reference's derivatives (see `_RefGrad`)."""
    fn = _RefGrad if torch.compiler.is_compiling() else _RefGradJvp
    return fn.apply((launch, reference, n_diff, prepare), *args)


def check_out_dtype(out_dtype) -> None:
    """None (the op's default) or one of the float dtypes fmrt computes in."""
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"out_dtype must be None or one of ({names}), got {out_dtype!r}")


def euler_step(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, *,
               out_dtype: Optional[torch.dtype] = None, eager_rounding: bool = False) -> Tensor:
    """One Euler step of the flow ODE: `x + (sigma_next - sigma) * v`.

    x, v: same shape `[B, ...]`, float dtypes that may differ (both are read in their dtype and
    upcast: fp32 math, one rounding); sigma, sigma_next: floats, 0-d or `[B]` tensors on x's
    device. Returns a new tensor of `out_dtype` (default x's dtype).

    eager_rounding=True rounds `dt = sigma_next - sigma` and then `dt * v` to v's dtype before
    the add, as torch's type promotion does in diffusers' `FlowMatchEulerDiscreteScheduler.step`
    (`sample.float() + dt * model_output`, dt a 0-d fp32 tensor): with
    `out_dtype=model_output.dtype` that is diffusers' step bit for bit (fp32 too: no FMA).
    Differentiable (reverse mode and torch.func.jvp) in x, v and tensor sigmas, alike on both
    paths; a call where nothing requires grad runs no autograd code.
    """
    check_float_tensor("x", x)
    check_float_tensor("v", v)
    check_same("v", v, "x", x, dtype=False)
    check_sigma("sigma", sigma, x, per_sample_only=True)
    check_sigma("sigma_next", sigma_next, x, per_sample_only=True)
    check_out_dtype(out_dtype)
    check_bool("eager_rounding", eager_rounding)
    return _euler_step(x, v, sigma, sigma_next, use_triton(x, v), out_dtype, eager_rounding)


def _euler_step(x: Tensor, v: Tensor, sigma, sigma_next, triton: bool,
                out_dtype: Optional[torch.dtype] = None, eager_rounding: bool = False) -> Tensor:
    """euler_step after its checks (the samplers call this once per step)."""
    if not triton:
        return ref.euler_step(x, v, sigma, sigma_next, out_dtype, eager_rounding)
    from fmrt.kernels import step as K
    if not wants_autograd(x, v, sigma, sigma_next):
        return K.euler_step(x.contiguous(), v.contiguous(), sigma, sigma_next, out_dtype,
                            eager_rounding)
    return _with_ref_grad(
        lambda x, v, s, sn: K.euler_step(x.contiguous(), v.contiguous(), s, sn, out_dtype,
                                         eager_rounding),
        lambda x, v, s, sn: ref.euler_step(x, v, s, sn, out_dtype, eager_rounding),
        1, x, v, sigma, sigma_next)


def check_scale(name: str, scale, x: Tensor) -> None:
    """A guidance scale: a float, or a floating 0-d / `[B]` tensor on x's device."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(scale).__name__}")
    if not isinstance(scale, Tensor):
        if not math.isfinite(float(scale)):
            raise ValueError(f"{name} must be finite, got {scale}")
        return
    if not scale.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scale.dtype}")
    if scale.device != x.device:
        raise ValueError(f"{name} is on {scale.device} but the data is on {x.device}")
    batch = x.shape[0] if x.ndim else 1
    if not (scale.ndim == 0 or (scale.ndim == 1 and scale.shape[0] in (1, batch))):
        raise ValueError(f"{name} must be a float, 0-d or [B={batch}] tensor, "
                         f"got shape {tuple(scale.shape)}")
    vals = host_values(scale)   # CPU tensors only (no sync)
    if vals is not None and not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite, got a non-finite value")


def _check_guidance(v_cond: Tensor, v_uncond: Tensor, scale, rescale, norm_dim, stats) -> int:
    """Checks shared by cfg_combine / guided_euler_step; returns the per-token row length
    (0 unless rescale="norm" with norm_dim=-1)."""
    check_float_tensor("v_cond", v_cond)
    check_float_tensor("v_uncond", v_uncond)
    check_same("v_uncond", v_uncond, "v_cond", v_cond)
    if v_cond.ndim < 1:
        raise ValueError("v_cond must be [B, ...], got a 0-d tensor")
    check_scale("scale", scale, v_cond)
    if rescale not in ref.RESCALES:
        raise ValueError(f"rescale must be one of {ref.RESCALES}, got {rescale!r}")
    if norm_dim is not None:
        if isinstance(norm_dim, bool) or not isinstance(norm_dim, int):
            raise TypeError(f"norm_dim must be None or an int, got {type(norm_dim).__name__}")
        if v_cond.ndim < 2 or norm_dim not in (-1, v_cond.ndim - 1):
            raise ValueError(f"norm_dim must be None (per sample) or -1 (per token over the last "
                             f"dim of [B, ..., C]), got {norm_dim} for shape "
                             f"{tuple(v_cond.shape)}")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict (filled with [B] tensors) or None, "
                        f"got {type(stats).__name__}")
    return v_cond.shape[-1] if (rescale == "norm" and norm_dim is not None) else 0


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale, *, rescale: str = "none",
                norm_dim: Optional[int] = None, stats: Optional[dict] = None,
                sigma: Optional[Sigma] = None) -> Tensor:
    """Classifier-free guidance `v = v_uncond + scale * (v_cond - v_uncond)`.

    v_cond, v_uncond: same shape `[B, ...]` and dtype; scale: float or `[B]` tensor.
    rescale="norm" ("true CFG"): `v *= ||v_cond|| / ||v||` per sample (norm_dim=None) or per
    token over the last dim (norm_dim=-1, diffusers' Qwen-Image on packed `[B, L, C]`); the
    factor is 1 where ||v|| = 0. stats: optional dict, filled with the per-sample diagnostics
    (see guided_euler_step; the sigma-dependent entries only when `sigma` is given).
    Returns a new tensor of v_cond's dtype. Differentiable in v_cond, v_uncond and a tensor
    scale (also with the norm rescale), alike on both paths; the statistics never are.
    """
    row = _check_guidance(v_cond, v_uncond, scale, rescale, norm_dim, stats)
    if sigma is not None:
        check_sigma("sigma", sigma, v_cond, per_sample_only=True)
    return _cfg_combine(v_cond, v_uncond, scale, rescale, norm_dim, stats, sigma, row,
                        use_triton(v_cond, v_uncond))


def _cfg_combine(v_cond, v_uncond, scale, rescale, norm_dim, stats, sigma, row: int,
                 triton: bool) -> Tensor:
    """cfg_combine after its checks (the samplers call this once per step)."""
    if not triton:
        out = ref.cfg_combine(v_cond, v_uncond, scale, rescale, norm_dim)
        if stats is not None:
            with torch.no_grad():  # diagnostics: never differentiable (as on the Triton path)
                st = ref.guidance_stats(v_cond, v_uncond, scale, 1.0 if sigma is None else sigma)
            _fill_stats(stats, st, sigma is not None)
        return out
    from fmrt.kernels import step as K
    want_stats = stats is not None

    def launch(c, u, g):
        out, st = K.guided_step(None, c.contiguous(), u.contiguous(), g, None, None,
                                rescale=rescale, row=row, stats=want_stats,
                                stats_sigma=1.0 if sigma is None else sigma)
        return (out, st) if want_stats else out

    if not wants_autograd(v_cond, v_uncond, scale):
        res = launch(v_cond, v_uncond, scale)
    else:
        res = _with_ref_grad(
            launch, lambda c, u, g: ref.cfg_combine(c, u, g, rescale, norm_dim), 1,
            v_cond, v_uncond, scale)
    if not want_stats:
        return res
    out, st = res
    _fill_stats(stats, dict(zip(K.STAT_KEYS, st.unbind(0))), sigma is not None)
    return out


def _fill_stats(stats: dict, st: dict, with_sigma: bool) -> None:
    if not with_sigma:
        for key in ("sigma", "vel_diff_norm", "x0_diff_norm"):
            st.pop(key)
    stats.update(st)


def guided_euler_step(x: Tensor, v_cond: Tensor, v_uncond: Tensor, scale, sigma: Sigma,
                      sigma_next: Sigma, *, rescale: str = "none", norm_dim: Optional[int] = None,
                      stats: Optional[dict] = None,
                      out_dtype: Optional[torch.dtype] = None,
                      eager_rounding: bool = False) -> Tensor:
    """CFG combine (+ "true CFG" norm rescale) + Euler step in one pass:
    `x + (sigma_next - sigma) * cfg_combine(v_cond, v_uncond, scale, rescale, norm_dim)`.

    x, v_cond, v_uncond: same shape `[B, ...]` and dtype; scale: float or `[B]`; sigmas: floats,
    0-d or `[B]` tensors. One pass (reads x, v_cond, v_uncond, writes x': 4 N e bytes for N
    elements of e bytes), also with the per-token rescale (the token's row in registers). The
    per-sample rescale needs the norms before the step: a split reduction (pass 1 reads v_cond,
    v_uncond into per-program partial norms; pass 2 combines and steps): 6 N e bytes.
    stats: a dict that receives float32 `[B]` device tensors (no host sync, not
    differentiable) computed in the same pass: sigma, cond_mean, cond_std, uncond_mean, uncond_std,
    cfg_diff_mean, cfg_diff_std, cfg_diff_norm, vel_diff_norm (||sigma * cfg_diff||),
    x0_diff_norm (||x0_cond - x0_uncond||), rescale_ratio (||v_cond|| / ||v||, v unrescaled).
    x may have another float dtype than v_cond / v_uncond; the result is `out_dtype` (default
    x's dtype). eager_rounding=True (rescale "none", a float scale) rounds `v_cond - v_uncond`,
    `scale * (...)` and `v_uncond + ...` to the model dtype, as a pipeline's eager combine does,
    then steps as `euler_step(..., eager_rounding=True)`: with `out_dtype=v_cond.dtype`, a
    diffusers pipeline's combine + scheduler step bit for bit.
    Differentiable (reverse mode and torch.func.jvp) in x, v_cond, v_uncond and tensor scale /
    sigmas, alike on both paths (the Triton path differentiates the reference).
    """
    check_float_tensor("x", x)
    row = _check_guidance(v_cond, v_uncond, scale, rescale, norm_dim, stats)
    check_same("v_cond", v_cond, "x", x, dtype=False)
    check_sigma("sigma", sigma, x, per_sample_only=True)
    check_sigma("sigma_next", sigma_next, x, per_sample_only=True)
    check_out_dtype(out_dtype)
    check_bool("eager_rounding", eager_rounding)
    if eager_rounding and (rescale != "none" or isinstance(scale, Tensor)):
        raise ValueError("eager_rounding reproduces the plain combine with a float scale: "
                         "rescale must be 'none' and scale a float")
    return _guided_euler_step(x, v_cond, v_uncond, scale, sigma, sigma_next, rescale, norm_dim,
                              stats, row, use_triton(x, v_cond, v_uncond), out_dtype,
                              eager_rounding)


def _guided_euler_step(x, v_cond, v_uncond, scale, sigma, sigma_next, rescale, norm_dim, stats,
                       row: int, triton: bool, out_dtype: Optional[torch.dtype] = None,
                       eager_rounding: bool = False) -> Tensor:
    """guided_euler_step after its checks (the samplers call this once per step)."""
    if not triton:
        out = ref.guided_euler_step(x, v_cond, v_uncond, scale, sigma, sigma_next, rescale,
                                    norm_dim, out_dtype, eager_rounding)
        if stats is not None:
            with torch.no_grad():  # diagnostics: never differentiable (as on the Triton path)
                stats.update(ref.guidance_stats(v_cond, v_uncond, scale, sigma))
        return out
    from fmrt.kernels import step as K
    want_stats = stats is not None

    def launch(x, c, u, g, s, sn):
        out, st = K.guided_step(x.contiguous(), c.contiguous(), u.contiguous(), g, s, sn,
                                rescale=rescale, row=row, stats=want_stats,
                                out_dtype=out_dtype, eager_rounding=eager_rounding)
        return (out, st) if want_stats else out

    if not wants_autograd(x, v_cond, v_uncond, scale, sigma, sigma_next):
        res = launch(x, v_cond, v_uncond, scale, sigma, sigma_next)
    else:
        res = _with_ref_grad(
            launch,
            lambda x, c, u, g, s, sn: ref.guided_euler_step(x, c, u, g, s, sn, rescale, norm_dim,
                                                            out_dtype, eager_rounding),
            1, x, v_cond, v_uncond, scale, sigma, sigma_next)
    if not want_stats:
        return res
    out, st = res
    stats.update(zip(K.STAT_KEYS, st.unbind(0)))   # views of one [11, B] tensor
    return out


# guidance reuse (fmrt.guidance): a refresh step writes d = c - u in the guided step's pass, a
# reuse step steps from x, c and d alone. Both are linear in their tensor inputs; one
# autograd.Function per op serves the Triton and the torch path alike (gradients and forward-mode
# tangents of x, v_cond, v_uncond / d; scale and the sigmas are constants of the step).

def _check_reuse_args(x, v_cond, other, other_name, scale, sigma, sigma_next, prev, stats):
    check_float_tensor("x", x)
    check_float_tensor("v_cond", v_cond)
    check_float_tensor(other_name, other)
    check_same("v_cond", v_cond, "x", x, dtype=False)
    check_same(other_name, other, "x", x, dtype=False)
    if x.ndim < 1:
        raise ValueError("x must be [B, ...], got a 0-d tensor")
    check_scale("scale", scale, x)
    check_sigma("sigma", sigma, x, per_sample_only=True)
    check_sigma("sigma_next", sigma_next, x, per_sample_only=True)
    if prev is not None:
        check_float_tensor("prev", prev)
        check_same("prev", prev, "x", x, dtype=False)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict (filled with [B] tensors) or None, "
                        f"got {type(stats).__name__}")


def _reuse_coefs(ctx) -> tuple[Tensor, Tensor]:
    """(h, g) in fp32, broadcastable against x: h = sigma_next - sigma, g = scale. Built when
    the backward or jvp needs them, not in setup_context: a float scale or sigma becomes a
    device tensor (a host-to-device copy), which a CUDA-graph capture of the sampling loop
    refuses."""
    x, scale, sigma, sigma_next = ctx.coef_args
    h = ref.broadcast_sigma(sigma_next, x) - ref.broadcast_sigma(sigma, x)
    return h.float(), ref.broadcast_sigma(scale, x).float()


def _save_coef_args(ctx, x, scale, sigma, sigma_next) -> None:
    # x's shape, dtype and device without keeping x alive: a 1-element tensor expanded
    ctx.coef_args = (x.new_empty(()).expand(x.shape), scale, sigma, sigma_next)


def _reuse_forward(x, c, ud, scale, sigma, sigma_next, prev, stats, refresh: bool,
                   triton: bool):
    if triton:
        from fmrt.kernels import step as K
        out, d, part = K.reuse_step(x.contiguous(), c.contiguous(), ud.contiguous(), scale,
                                    sigma, sigma_next, refresh=refresh,
                                    prev=None if prev is None else prev.contiguous(),
                                    stats=stats is not None)
        if stats is not None:
            sq = part.clamp_min(0).sqrt()
            stats.update(cond_norm=sq[:, 0], d_norm=sq[:, 1], change=sq[:, 2])
        return out, d
    if refresh:
        out, d = ref.guided_euler_step_refresh(x, c, ud, scale, sigma, sigma_next)
    else:
        out, d = ref.reused_guided_euler_step(x, c, ud, scale, sigma, sigma_next), None
    if stats is not None:
        stats.update(ref.reuse_stats(c, d if refresh else ud, prev, refresh))
    return out, d


class _RefreshStep(torch.autograd.Function):
    @staticmethod
    def forward(x, c, u, scale, sigma, sigma_next, prev, stats, triton):
        return _reuse_forward(x, c, u, scale, sigma, sigma_next, prev, stats, True, triton)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, c, u, scale, sigma, sigma_next = inputs[:6]
        _save_coef_args(ctx, x, scale, sigma, sigma_next)
        ctx.dtypes = (x.dtype, c.dtype, u.dtype)
        ctx.set_materialize_grads(False)   # d is often unused: no zeros of its size

    @staticmethod
    def backward(ctx, g_out, g_d):
        h, g = _reuse_coefs(ctx)
        dx, dc, du = ctx.dtypes
        gx = gc = gu = None
        if g_out is not None:
            go = g_out.float()
            gx, gc, gu = go, h * g * go, h * (1 - g) * go
        if g_d is not None:
            gd = g_d.float()
            gc, gu = (gd, -gd) if gc is None else (gc + gd, gu - gd)
        return (None if gx is None else gx.to(dx), gc.to(dc), gu.to(du),
                None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, tx, tc, tu, *_):
        h, g = _reuse_coefs(ctx)
        tx = torch.zeros(()) if tx is None else tx.float()
        tc = torch.zeros(()) if tc is None else tc.float()
        tu = torch.zeros(()) if tu is None else tu.float()
        td = tc - tu
        return (tx + h * (tu + g * td)).to(ctx.dtypes[0]), td.float()


class _ReuseStep(torch.autograd.Function):
    @staticmethod
    def forward(x, c, d, scale, sigma, sigma_next, prev, stats, triton):
        return _reuse_forward(x, c, d, scale, sigma, sigma_next, prev, stats, False, triton)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, c, d, scale, sigma, sigma_next = inputs[:6]
        _save_coef_args(ctx, x, scale, sigma, sigma_next)
        ctx.dtypes = (x.dtype, c.dtype, d.dtype)

    @staticmethod
    def backward(ctx, g_out):
        h, g = _reuse_coefs(ctx)
        go = g_out.float()
        dx, dc, dd = ctx.dtypes
        return (go.to(dx), (h * go).to(dc), (h * (g - 1) * go).to(dd), None, None, None, None,
                None, None)

    @staticmethod
    def jvp(ctx, tx, tc, td, *_):
        h, g = _reuse_coefs(ctx)
        tx = torch.zeros(()) if tx is None else tx.float()
        tc = torch.zeros(()) if tc is None else tc.float()
        td = torch.zeros(()) if td is None else td.float()
        return (tx + h * (tc + (g - 1) * td)).to(ctx.dtypes[0])


def guided_euler_step_refresh(x: Tensor, v_cond: Tensor, v_uncond: Tensor, scale, sigma: Sigma,
                              sigma_next: Sigma, *, prev: Optional[Tensor] = None,
                              stats: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """Guided Euler step that also writes `d = v_cond - v_uncond` for guidance reuse, in one pass:
    returns `(x + (sigma_next - sigma) * (u + scale * d), d)`, x' in x's dtype, d float32.

    x, v_cond, v_uncond: same shape `[B, ...]` (float dtypes may differ); scale: float, 0-d or
    `[B]`; sigmas: floats, 0-d or `[B]` tensors. Reads x, c, u, writes x' and d (4 N e + 4 N
    bytes). stats: a dict receiving float32 `[B]` device tensors cond_norm = ||c||,
    d_norm = ||d|| and change = ||d - prev|| (prev: the previous d, read only when given; 0
    otherwise), from the same pass. Differentiable in x, v_cond, v_uncond (reverse and
    forward mode); scale and sigmas are constants.
    """
    _check_reuse_args(x, v_cond, v_uncond, "v_uncond", scale, sigma, sigma_next, prev, stats)
    return _RefreshStep.apply(x, v_cond, v_uncond, scale, sigma, sigma_next, prev, stats,
                              use_triton(x, v_cond, v_uncond))


def reused_guided_euler_step(x: Tensor, v_cond: Tensor, d: Tensor, scale, sigma: Sigma,
                             sigma_next: Sigma, *, prev: Optional[Tensor] = None,
                             stats: Optional[dict] = None) -> Tensor:
    """Guided Euler step reusing d = c - u of an earlier step (no unconditional output):
    `x + (sigma_next - sigma) * (v_cond + (scale - 1) * d)`, in x's dtype, one pass (reads x, c,
    d; writes x'). stats: cond_norm = ||c||, d_norm = ||d||, change = ||c - prev|| (prev: the
    cond output of the last refresh; 0 without). Differentiable in x, v_cond, d."""
    _check_reuse_args(x, v_cond, d, "d", scale, sigma, sigma_next, prev, stats)
    return _ReuseStep.apply(x, v_cond, d, scale, sigma, sigma_next, prev, stats,
                            use_triton(x, v_cond, d))


def cfg_zero_star_scale(v_cond: Tensor, v_uncond: Tensor) -> Tensor:
    """CFG-Zero*'s optimised scale `<c, u> / (||u||^2 + 1e-8)` per sample: float32 `[B]`.
    Guide with `cfg_combine(v_cond, alpha * v_uncond, scale)`."""
    check_float_tensor("v_cond", v_cond)
    check_float_tensor("v_uncond", v_uncond)
    check_same("v_uncond", v_uncond, "v_cond", v_cond)
    if v_cond.ndim == 0:
        raise ValueError("v_cond must be [B, ...], got a 0-d tensor")
    if v_cond.shape[0] == 0:
        raise ValueError(f"v_cond must hold at least one sample, got batch 0 "
                         f"{tuple(v_cond.shape)}")
    return ref.cfg_zero_star_scale(v_cond, v_uncond)


def sde_step(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, *, eta: float,
             noise: Optional[Tensor] = None, seed: Optional[int] = None,
             return_log_prob: bool = False):
    """Euler-Maruyama step of the flow SDE, score from the velocity (Flow-GRPO discretisation,
    see `fmrt.reference.sde_step`); eta = 0 is exactly `euler_step`.

    x, v: same shape `[B, ...]` and dtype; sigmas floats, 0-d or `[B]` tensors (sigma_next <=
    sigma); noise: explicit `N(0, I)` of x's shape, or None to draw Philox noise in-kernel from
    `seed` (an int, a 0-d integer device tensor, or None: drawn on x's device; the same seed
    gives the same noise as `add_noise`, on the Triton and the torch path). Returns x' of x's
    dtype, or `(x', log_prob [B] float32)` with return_log_prob (the per-element mean Gaussian
    log-density of the step, as Flow-GRPO).

    sigma == sigma_next is a zero step (x' = x; also sigma = sigma_next = 1); a log-prob then
    is refused. Float and CPU-tensor sigmas are checked (in [0, 1], sigma_next <= sigma); CUDA
    tensor sigmas are not read back (no sync), so there that is the caller's part.
    Differentiable on both paths in x, v, noise and tensor sigmas, log_prob included: as in
    Flow-GRPO the sampled x' is a constant inside the log-density, so d log_prob / d v flows
    through the mean. To re-evaluate a stored step under a new model (GRPO's ratio), use
    `sde_log_prob`.
    """
    _check_sde_args(x, v, sigma, sigma_next, eta, return_log_prob)
    if noise is not None:
        check_float_tensor("noise", noise)
        check_same("noise", noise, "x", x, dtype=False)
        if seed is not None:
            raise ValueError("give noise or seed, not both")
    check_seed("seed", seed)
    if noise is None:
        seed = seed_tensor(seed, x.device)
    return _sde_step(x, v, sigma, sigma_next, float(eta), noise, seed, return_log_prob,
                     use_triton(x, v))


def _check_sde_args(x, v, sigma, sigma_next, eta, log_prob) -> None:
    check_float_tensor("x", x)
    check_float_tensor("v", v)
    check_same("v", v, "x", x)
    if x.ndim < 1:
        raise ValueError("x must be [B, ...], got a 0-d tensor")
    check_sigma("sigma", sigma, x, per_sample_only=True)
    check_sigma("sigma_next", sigma_next, x, per_sample_only=True)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float, got {type(eta).__name__}")
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite float >= 0, got {eta}")
    check_bool("return_log_prob", log_prob)
    if log_prob and eta == 0:
        raise ValueError("return_log_prob needs eta > 0 (eta = 0 is deterministic)")
    _check_sde_sigmas(sigma, sigma_next, log_prob)


def sde_log_prob(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, prev_sample: Tensor, *,
                 eta: float) -> Tensor:
    """Flow-GRPO's log-probability of a given step result `prev_sample` (one stored while
    sampling) under the SDE step from x with velocity v: log N(prev_sample; mean(x, v),
    std_dt^2) averaged over each sample's elements, float32 `[B]` (see `sde_step`;
    `sde_log_prob(x, v, s, sn, x', eta=eta)` is the log_prob `sde_step` returned with x', up
    to x' having been rounded to its dtype).
    Differentiable in x and v (and tensor sigmas); prev_sample is a constant. A per-sample
    reduction in torch on both backends (the same code: no Triton kernel)."""
    _check_sde_args(x, v, sigma, sigma_next, eta, True)
    check_float_tensor("prev_sample", prev_sample)
    check_same("prev_sample", prev_sample, "x", x, dtype=False)
    return ref.sde_log_prob(x, v, sigma, sigma_next, float(eta), prev_sample)


def _check_sde_sigmas(sigma, sigma_next, log_prob: bool) -> None:
    """sigma_next <= sigma (sampling runs to 0), and sigma_next < sigma for a log-prob (equal
    sigmas are a zero step, x' = x, whose density is degenerate). Floats and CPU tensors are
    checked; CUDA tensors are not read back (no sync)."""
    def values(s):
        return [float(s)] if not isinstance(s, Tensor) else host_values(s)

    a, b = values(sigma), values(sigma_next)
    if a is None or b is None:
        return
    n = max(len(a), len(b))
    pairs = list(zip(a * n if len(a) == 1 else a, b * n if len(b) == 1 else b))
    if any(sn > s for s, sn in pairs):
        raise ValueError(f"sigma_next must not exceed sigma (sampling runs from 1 to 0), got "
                         f"sigma {sigma}, sigma_next {sigma_next}")
    if log_prob and any(sn == s for s, sn in pairs):
        raise ValueError(f"return_log_prob needs sigma_next < sigma (equal sigmas are a zero "
                         f"step with no noise), got sigma {sigma}, sigma_next {sigma_next}")


def _sde_step(x, v, sigma, sigma_next, eta: float, noise, seed, return_log_prob: bool,
              triton: bool):
    """sde_step after its checks (the samplers call this once per step)."""
    if not triton:
        if noise is not None:
            z = noise
        elif eta == 0:  # the noise is multiplied by 0: no need to draw it
            z = torch.zeros_like(x)
        else:
            z = ref.philox_normal(x.shape, seed, device=x.device)
        return ref.sde_step(x, v, sigma, sigma_next, eta, z, return_log_prob)
    from fmrt.kernels import step as K

    def launch(x, v, s, sn, z, seed):
        out, zz = K.sde_step(x.contiguous(), v.contiguous(), s, sn, eta,
                             None if z is None else z.contiguous(), seed, return_log_prob)
        if not return_log_prob:
            return out
        B = x.shape[0]
        n = x.numel() // B if B else 0
        _, std_dt = ref.sde_coefficients(s, sn, eta, torch.empty(B, device=x.device))
        lp = -0.5 * zz / n - torch.log(std_dt.double()).expand(B) - 0.5 * math.log(2 * math.pi)
        return out, lp.float()

    if not wants_autograd(x, v, sigma, sigma_next, noise):
        return launch(x, v, sigma, sigma_next, noise, seed)

    def regenerate_noise(args):
        x, _, _, _, z, seed = args
        if z is None:  # the kernel's Philox noise again, from its seed (a constant)
            from fmrt.kernels import noise as KN
            args[4] = torch.zeros_like(x) if eta == 0 else KN.philox_normal(x.shape, seed)
        return args

    return _with_ref_grad(
        launch, lambda x, v, s, sn, z, seed: ref.sde_step(x, v, s, sn, eta, z, return_log_prob),
        2 if return_log_prob else 1, x, v, sigma, sigma_next, noise, seed,
        prepare=regenerate_noise)


# ---------------------------------------------------------------------------------------------
# attention ops: qk_norm_rope, Triton flash attention with JVP
# ---------------------------------------------------------------------------------------------

NORMS = ("across_heads", "per_head", None)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                 cos: Tensor, sin: Tensor, *, eps: float = 1e-6,
                 norm: Optional[str] = "across_heads") -> tuple[Tensor, Tensor]:
    """RMSNorm q and k, then rotate interleaved pairs (2i, 2i+1) by cos/sin `[S, D/2]`:
    (a, b) -> (a cos - b sin, a sin + b cos). Returns contiguous `(q_out, k_out)` in q's dtype
    (fp32 math, one rounding).

    q, k: `[B, S, H, D]`, same shape and dtype, any strides (views of a fused qkv output are read
    in place). norm: "across_heads" (Wan: RMS over H*D, weights `[H*D]`), "per_head" (FLUX /
    SD3: RMS over D, weights `[D]`) or None (rotary only; weights ignored); a weight may be None
    (no scale). Differentiable in q, k and both weights (reverse mode and torch.func.jvp);
    cos / sin are treated as constants.
    """
    check_float_tensor("q", q)
    check_float_tensor("k", k)
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S, H, D], got shape {tuple(q.shape)}")
    check_same("k", k, "q", q)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    B, S, H, D = q.shape
    if D % 2:
        raise ValueError(f"head dim D must be even for the rotary, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_float_tensor(name, t, dtypes=(torch.float32, torch.float64, torch.float16,
                                            torch.bfloat16))
        if tuple(t.shape) != (S, D // 2):
            raise ValueError(f"{name} must be [S={S}, D/2={D // 2}], got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    want = {"across_heads": H * D, "per_head": D}.get(norm)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is None:
            continue
        check_float_tensor(name, w, dtypes=(torch.float32, torch.float16, torch.bfloat16))
        if w.device != q.device:
            raise ValueError(f"{name} is on {w.device} but q is on {q.device}")
        if want is not None and w.numel() != want:
            raise ValueError(f"{name} must have {want} elements for norm={norm!r}, "
                             f"got {tuple(w.shape)}")
    if use_triton(q, k, cos, sin, *(w for w in (q_weight, k_weight) if w is not None)):
        qw = None if q_weight is None or norm is None else _flat(q_weight)
        kw = None if k_weight is None or norm is None else _flat(k_weight)
        args = (q, k, qw, kw, cos, sin, float(eps), "none" if norm is None else norm)
        if torch.compiler.is_compiling():  # no forward mode inside compiled graphs
            return _qk_norm_rope_op(*args)
        if not torch._C._are_functorch_transforms_active():
            # what Function.apply does then, minus its inspect.signature binding of the (here
            # complete, positional) arguments: ~30 % of the op's remaining host cost. Plain
            # tensors with no forward-mode AD level open (the usual eager call) take the fast
            # path: no dead functorch wrappers to unwrap, launchers called directly, nothing
            # saved for a forward-mode rule
            fast = _forward_ad._current_level < 0 and _plain(q, k, qw, kw, cos, sin)
            if not fast:
                args = torch._functorch.utils.unwrap_dead_wrappers(args)
            return super(torch.autograd.Function, _QKNormRope).apply(*args, fast)
        return _QKNormRope.apply(*args, False)
    # cos / sin are constants on both paths (the Triton path gives them no gradient)
    return ref.qk_norm_rope(q, k, q_weight, k_weight, cos.detach(), sin.detach(), eps, norm)


# Triton path: an autograd.Function whose forward and backward call the `fmrt::qk_norm_rope`
# and `fmrt::qk_norm_rope_backward` custom ops (each launch wrapped in a custom op, so the op
# traces into torch.compile graphs without a break and works under torch.func.jvp); q, k reach
# the kernels with their strides (no copy of a fused qkv view). The backward recomputes the norm
# statistics from q, k (nothing but the inputs is saved) and returns deterministic weight
# gradients; the forward-mode rule (jvp) is torch math.

def _norm_arg(norm: str) -> Optional[str]:
    return None if norm == "none" else norm


def _qk_norm_rope_launch(q, k, q_weight, k_weight, cos, sin, eps, norm):
    from fmrt.kernels import rope as K
    return K.qk_norm_rope_fwd(q, k, None if q_weight is None else q_weight.contiguous(),
                              None if k_weight is None else k_weight.contiguous(), cos, sin, eps,
                              _norm_arg(norm))


def _qk_norm_rope_bwd_launch(gq, gk, q, k, q_weight, k_weight, cos, sin, eps, norm, need_dw):
    from fmrt.kernels import rope as K
    return K.qk_norm_rope_bwd(gq, gk, q, k, None if q_weight is None else q_weight.contiguous(),
                              None if k_weight is None else k_weight.contiguous(), cos, sin, eps,
                              _norm_arg(norm), need_dw)


@torch.library.custom_op("fmrt::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                     cos: Tensor, sin: Tensor, eps: float, norm: str) -> tuple[Tensor, Tensor]:
    return _qk_norm_rope_launch(q, k, q_weight, k_weight, cos, sin, eps, norm)


@_qk_norm_rope_op.register_fake
def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, eps, norm):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


@torch.library.custom_op("fmrt::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_bwd_op(gq: Tensor, gk: Tensor, q: Tensor, k: Tensor, q_weight: Optional[Tensor],
                         k_weight: Optional[Tensor], cos: Tensor, sin: Tensor, eps: float,
                         norm: str, need_dw: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dwq, dwk = _qk_norm_rope_bwd_launch(gq, gk, q, k, q_weight, k_weight, cos, sin, eps,
                                                norm, need_dw)
    return dq, dk, dwq.clone(), dwk.clone()  # custom-op outputs must not alias each other


@_qk_norm_rope_bwd_op.register_fake
def _qk_norm_rope_bwd_fake(gq, gk, q, k, q_weight, k_weight, cos, sin, eps, norm, need_dw):
    def dw(w):
        if not need_dw or w is None or norm == "none":
            return q.new_empty(0, dtype=torch.float32)
        return q.new_empty(w.shape, dtype=torch.float32)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device), dw(q_weight), dw(k_weight))


def _flat(w: Tensor) -> Tensor:
    return w if w.ndim == 1 else w.reshape(-1)


def _qk_norm_rope_setup(ctx, inputs, output):
    # inputs: the custom op's 8, or _QKNormRope's 9 (the last: `fast`, see qk_norm_rope)
    q, k, q_weight, k_weight, cos, sin, eps, norm = inputs[:8]
    ctx.eps, ctx.norm, ctx.fast = eps, norm, len(inputs) > 8 and inputs[8]
    ctx.w_dtypes = tuple(None if w is None else w.dtype for w in (q_weight, k_weight))
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)


def _plain(*ts) -> bool:
    """All plain eager tensors (no FakeTensor, no functorch wrapper, not tracing): the launchers
    may then be called directly, skipping the custom op's dispatch (most of the op's host cost:
    ~60 % of the stubbed-launch time per fwd+bwd, benchmarks/bench_host_overhead_rope.py). Anything
    else goes through the custom ops, which trace and compile."""
    if torch.compiler.is_compiling():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(t is None or (type(t) is Tensor and not wrapped(t)) for t in ts)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _qk_norm_rope_backward(ctx, gq, gk):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    need_dw = any(ctx.needs_input_grad[2:4])
    args = (gq, gk, q, k, q_weight, k_weight, cos, sin, ctx.eps, ctx.norm, need_dw)
    bwd = _qk_norm_rope_bwd_launch if ctx.fast or _plain(gq, gk, q, k, q_weight, k_weight) \
        else _qk_norm_rope_bwd_op
    dq, dk, dwq, dwk = bwd(*args)
    wq_dt, wk_dt = ctx.w_dtypes
    dwq = _as_dtype(dwq, wq_dt) if ctx.needs_input_grad[2] and dwq.numel() else None
    dwk = _as_dtype(dwk, wk_dt) if ctx.needs_input_grad[3] and dwk.numel() else None
    return (dq, dk, dwq, dwk) + (None,) * (len(ctx.needs_input_grad) - 4)


# reverse mode of the custom op itself: what torch.compile traces (Dynamo cannot trace an
# autograd.Function with a custom jvp)
_qk_norm_rope_op.register_autograd(_qk_norm_rope_backward, setup_context=_qk_norm_rope_setup)


class _QKNormRope(torch.autograd.Function):
    """Eager path: the same reverse mode, plus forward mode (torch.func.jvp, MeanFlow) through
    `reference.rms_norm_jvp` then the rotation (linear: it rotates the tangent). cos / sin are
    constants (no gradient, no tangent)."""

    @staticmethod
    def forward(q, k, q_weight, k_weight, cos, sin, eps, norm, fast):
        fwd = _qk_norm_rope_launch if fast or _plain(q, k, q_weight, k_weight) \
            else _qk_norm_rope_op
        return fwd(q, k, q_weight, k_weight, cos, sin, eps, norm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _qk_norm_rope_setup(ctx, inputs, output)
        if not ctx.fast:   # fast: no forward-mode AD level was open (see qk_norm_rope)
            ctx.save_for_forward(*inputs[:6])

    backward = staticmethod(_qk_norm_rope_backward)

    @staticmethod
    def jvp(ctx, tq, tk, tq_weight, tk_weight, tcos, tsin, teps, tnorm, tfast):
        q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
        norm = _norm_arg(ctx.norm)

        def one(x, w, tx, tw):
            t = ref.rms_norm_jvp(x, w, tx, tw, norm, ctx.eps)
            return ref.rope_interleaved(t, cos, sin).to(x.dtype)

        return one(q, q_weight, tq, tq_weight), one(k, k_weight, tk, tk_weight)


# ---------------------------------------------------------------------------------------------
# flash attention (Triton, with forward-mode JVP): see kernels/attention.py
# ---------------------------------------------------------------------------------------------
#
# `flash_attention` runs through an autograd.Function whose forward, backward and jvp each call
# a torch.library custom op (`fmrt::flash_attention_fwd`, `fmrt::flash_attention_jvp`,
# `fmrt::flash_attention_bwd`) around the Triton launch: a Triton launch directly inside the
# Function fails under torch.func.jvp. So torch.func.jvp works, and so does MeanFlow's pattern
# (jvp, then a backward through the primal output). The jvp rule runs the tangent kernel from
# the forward's O and LSE (`fmrt::flash_attention_tangent`: p already normalised, five matmuls
# per key block); `flash_attention_jvp` runs the one-pass output-and-tangent kernel. The
# tangent output has no reverse-mode derivative (MeanFlow stops its gradient). torch.compile
# around torch.func.jvp over this Function gave silently wrong tangents (PEERS.md, torch 2.13;
# dynamo never calls the jvp rule), so the Function is applied behind torch.compiler.disable (a
# graph break: a compiled JVP runs eagerly and is right) and the jvp rule also refuses to run
# while compiling, should a later torch trace it.

FLASH_MAX_HEAD_DIM = 256


def _check_flash_args(q, k, v, scale, key_padding_mask, mask) -> Optional[float]:
    """All flash_attention argument checks; returns the scale as a float (None: 1/sqrt(D))."""
    check_qkv(q, k, v, dtypes=FLOAT_DTYPES)
    check_same("v", v, "k", k)
    B, S_q, H, D = q.shape
    if not 1 <= D <= FLASH_MAX_HEAD_DIM:
        raise ValueError(f"head dim D must lie in [1, {FLASH_MAX_HEAD_DIM}], got {D}")
    S_k = k.shape[1]
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be None or a float, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")
        scale = float(scale)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor, got "
                            f"{type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = keep), got "
                            f"{key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, S_k):
            raise ValueError(f"key_padding_mask must be [B={B}, S_k={S_k}], got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on "
                             f"{q.device}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
        if not (mask.is_floating_point() or mask.dtype == torch.bool):
            raise TypeError(f"mask must be a float (additive) or bool (True = keep) tensor, "
                            f"got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
        ok = mask.ndim <= 4
        if ok:
            try:
                ok = torch.broadcast_shapes(mask.shape, (B, H, S_q, S_k)) == (B, H, S_q, S_k)
            except RuntimeError:
                ok = False
        if not ok:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"[B, H, S_q, S_k] = {(B, H, S_q, S_k)}")
    return scale


def _flash_fwd_impl(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                  mask: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    from fmrt.kernels import attention as K
    o, _, lse = K.attention_fwd(q, k, v, scale, key_padding_mask, mask)
    return o, lse


_flash_fwd_op = torch.library.custom_op("fmrt::flash_attention_fwd", _flash_fwd_impl,
                                       mutates_args=())


@_flash_fwd_op.register_fake
def _flash_fwd_fake(q, k, v, key_padding_mask, mask, scale):
    B, S_q, H, D = q.shape
    return (q.new_empty((B, S_q, H, D)),
            q.new_empty((B, H, S_q), dtype=torch.float32))


@torch.library.custom_op("fmrt::flash_attention_jvp", mutates_args=())
def _flash_jvp_op(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                  key_padding_mask: Optional[Tensor], mask: Optional[Tensor],
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from fmrt.kernels import attention as K
    return K.attention_fwd(q, k, v, scale, key_padding_mask, mask, tangents=(tq, tk, tv))


@_flash_jvp_op.register_fake
def _flash_jvp_fake(q, k, v, tq, tk, tv, key_padding_mask, mask, scale):
    B, S_q, H, D = q.shape
    return (q.new_empty((B, S_q, H, D)), q.new_empty((B, S_q, H, D)),
            q.new_empty((B, H, S_q), dtype=torch.float32))


def _flash_tangent_impl(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, tq: Tensor,
                      tk: Tensor, tv: Tensor, key_padding_mask: Optional[Tensor],
                      mask: Optional[Tensor], scale: float) -> Tensor:
    from fmrt.kernels import attention as K
    return K.attention_tangent(q, k, v, o, lse, (tq, tk, tv), scale, key_padding_mask, mask)


_flash_tangent_op = torch.library.custom_op("fmrt::flash_attention_tangent",
                                           _flash_tangent_impl, mutates_args=())


@_flash_tangent_op.register_fake
def _flash_tangent_fake(q, k, v, o, lse, tq, tk, tv, key_padding_mask, mask, scale):
    return q.new_empty(q.shape)


def _flash_bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], mask: Optional[Tensor],
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from fmrt.kernels import attention as K
    return K.attention_bwd(do, q, k, v, o, lse, scale, key_padding_mask, mask)


_flash_bwd_op = torch.library.custom_op("fmrt::flash_attention_bwd", _flash_bwd_impl,
                                       mutates_args=())


@_flash_bwd_op.register_fake
def _flash_bwd_fake(do, q, k, v, o, lse, key_padding_mask, mask, scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _flash_call(op, impl, *tensors):
    """The custom op while something traces (make_fx, export, fake modes) or for
    torch.func-wrapped tensors (the jvp rule under a reverse-mode level: the dispatcher unwraps
    them), else its launcher directly: the custom-op wrapper costs ~100 us of host time per
    call, and this Function runs eagerly anyway (`_flash_apply` is a graph break)."""
    if tracing() or any(_is_wrapped(t) for t in tensors if t is not None):
        return op
    return impl


def _zero_tangent(t: Optional[Tensor], like: Tensor) -> Tensor:
    # a missing tangent is zero: a stride-0 view, no memory (the kernel honours strides)
    return like.new_zeros(()).expand(like.shape) if t is None else t


class _FlashAttention(torch.autograd.Function):
    """(q, k, v, key_padding_mask, mask, scale) -> (O, LSE); LSE is not differentiable."""

    @staticmethod
    def forward(q, k, v, key_padding_mask, mask, scale):
        fwd = _flash_call(_flash_fwd_op, _flash_fwd_impl, q, k, v)
        return fwd(q, k, v, key_padding_mask, mask, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, key_padding_mask, mask, scale = inputs
        o, lse = output
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, mask)
        ctx.save_for_forward(q, k, v, o, lse, key_padding_mask, mask)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, key_padding_mask, mask = ctx.saved_tensors
        bwd = _flash_call(_flash_bwd_op, _flash_bwd_impl, do, q, k, v)
        dq, dk, dv = bwd(do, q, k, v, o, lse, key_padding_mask, mask, ctx.scale)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, t_kpm, t_mask, t_scale):
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "fmrt.ops.flash_attention: forward-mode AD (torch.func.jvp) inside "
                "torch.compile is not supported (torch.compile gave silently wrong tangents "
                "for this pattern, pytorch issue #192985); run the JVP eagerly, e.g. compile "
                "only the model's forward / backward or wrap the jvp in "
                "torch.compiler.disable")
        q, k, v, o, lse, key_padding_mask, mask = ctx.saved_tensors
        tangent = _flash_call(_flash_tangent_op, _flash_tangent_impl, q, k, v, tq, tk, tv)
        t_out = tangent(q, k, v, o, lse, _zero_tangent(tq, q), _zero_tangent(tk, k),
                        _zero_tangent(tv, v), key_padding_mask, mask, ctx.scale)
        return t_out, None


def _flash_ready(q, k, v, scale, key_padding_mask, mask):
    """Checks + the Triton/torch decision: (scale as float, use the Triton path)."""
    scale = _check_flash_args(q, k, v, scale, key_padding_mask, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tensors = [t for t in (q, k, v, key_padding_mask, mask) if t is not None]
    triton = use_triton(*tensors) and q.numel() > 0 and k.numel() > 0
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        # refused on both backends (they must differentiate alike)
        raise ValueError("mask requires grad, but flash_attention gives no gradient to the "
                         "mask; detach it (or use fmrt.attention.attention for a learned bias)")
    return scale, triton


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                    key_padding_mask: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None) -> Tensor:
    """Non-causal softmax attention `softmax(scale q k^T + mask) v`, layout `[B, S, H, D]`.

    q `[B, S_q, H, D]`, k and v `[B, S_k, H, D]` (any strides, e.g. views of a fused qkv), one
    float dtype, D <= 256; scale defaults to 1/sqrt(D). key_padding_mask: bool `[B, S_k]`, True =
    keep. mask: additive float or bool (True = keep), broadcastable to `[B, H, S_q, S_k]`; it
    gets no gradient. Returns a contiguous `[B, S_q, H, D]` tensor of q's dtype (fp32 math).
    Differentiable in reverse mode and in forward mode (torch.func.jvp, also followed by a
    backward through the output: MeanFlow; the tangent itself has no reverse-mode derivative:
    a backward through it raises). Under torch.compile the Triton path is a graph break
    (so a compiled torch.func.jvp runs it eagerly, correctly; fullgraph=True raises).
    Rows whose keys are all masked give 0 (and zero gradients) on both paths.
    """
    scale, triton = _flash_ready(q, k, v, scale, key_padding_mask, mask)
    if not triton:
        return ref.flash_attention(q, k, v, scale, key_padding_mask, mask)
    return _flash_apply(q, k, v, key_padding_mask, mask, scale)


def _flash_apply(q, k, v, key_padding_mask, mask, scale) -> Tensor:
    # Kept out of torch.compile graphs (a graph break): dynamo ignores the Function's jvp rule
    # and torch.compile(torch.func.jvp(...)) then returns wrong tangents silently (checked with
    # torch 2.13). With the break, a compiled JVP falls back to eager and is right, compiled
    # forward / backward still work, and fullgraph=True raises instead of being wrong.
    # torch.compiler.disable imports torch._dynamo (about 1 s), so it is applied at the first
    # Triton call rather than at import: a CPU-only `fmrt sample` never pays for it.
    global _flash_apply_uncompiled
    if _flash_apply_uncompiled is None:
        _flash_apply_uncompiled = torch.compiler.disable(_flash_apply_eager)
    return _flash_apply_uncompiled(q, k, v, key_padding_mask, mask, scale)


def _flash_apply_eager(q, k, v, key_padding_mask, mask, scale) -> Tensor:
    out, _ = _FlashAttention.apply(q, k, v, key_padding_mask, mask, scale)
    return out


_flash_apply_uncompiled = None


def flash_attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, *,
                        scale: Optional[float] = None, key_padding_mask: Optional[Tensor] = None,
                        mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`(flash_attention(q, k, v), its directional derivative along (tq, tk, tv))` in one pass
    of one kernel (no autograd on either path, the outputs never require grad: for explicit
    JVPs and benchmarks). tq, tk, tv: shaped like q, k, v, same dtype. Returns two contiguous
    `[B, S_q, H, D]` tensors of q's dtype."""
    scale, triton = _flash_ready(q, k, v, scale, key_padding_mask, mask)
    for name, t, like, like_name in (("tq", tq, q, "q"), ("tk", tk, k, "k"), ("tv", tv, v, "v")):
        check_float_tensor(name, t)
        check_same(name, t, like_name, like)
    with torch.no_grad():   # no autograd on either path (outputs never require grad)
        if not triton:
            return torch.func.jvp(
                lambda a, b, c: ref.flash_attention(a, b, c, scale, key_padding_mask, mask),
                (q, k, v), (tq, tk, tv))
        o, t, _ = _flash_jvp_op(q, k, v, tq, tk, tv, key_padding_mask, mask, scale)
        return o, t
