"""Training losses: the SFT flow-matching loss (SPEC 1-3) and the MeanFlow loss (SPEC 6)."""
from __future__ import annotations


# ---------------------------------------------------------------------------------------------
# SFT flow-matching loss
# ---------------------------------------------------------------------------------------------

from typing import Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

COMPAT_MODES = (None, "diffsynth")


def _sft_check(x0, first_frame, compat, sampler, weighting, reduction, sigma) -> None:
    from fmrt import ops
    from fmrt.schedule import SAMPLERS, WEIGHTINGS
    ops.check_float_tensor("x0", x0)
    if x0.ndim == 0:
        raise ValueError("x0 must be [B, ...], got a 0-d tensor")
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if reduction not in ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {ops.REDUCTIONS}, got {reduction!r}")
    if sigma is not None:
        if compat is not None:
            raise ValueError("sigma= cannot be combined with compat (DiffSynth samples it)")
        if not isinstance(sigma, Tensor) or sigma.ndim != 1 or sigma.shape[0] != x0.shape[0]:
            raise ValueError(f"sigma must be a [B={x0.shape[0]}] tensor")
        ops.check_sigma("sigma", sigma, x0, per_sample_only=True)
    if first_frame is not None:
        ops.check_float_tensor("first_frame", first_frame)
        if x0.ndim != 5:
            raise ValueError(f"first_frame needs video latents x0 [B, C, T, H, W], got "
                             f"{tuple(x0.shape)}")
        B, C, T, H, W = x0.shape
        if tuple(first_frame.shape) != (B, C, 1, H, W):
            raise ValueError(f"first_frame must be [B, C, 1, H, W] = {(B, C, 1, H, W)}, got "
                             f"{tuple(first_frame.shape)}")
        if first_frame.device != x0.device:
            raise ValueError(f"first_frame is on {first_frame.device} but x0 is on {x0.device}")
        if T < 2:
            raise ValueError("first_frame needs at least 2 latent frames (frame 0 is not trained)")


def _frame_sigma(sigma: Tensor, frames: int) -> Tensor:
    """Per-frame model sigma `[B, T]`: frame 0 (the pinned clean image) at 0."""
    s = sigma.to(torch.float32)[:, None].expand(sigma.shape[0], frames)
    keep = torch.arange(frames, device=sigma.device) > 0
    return torch.where(keep, s, torch.zeros_like(s))


def _check_pred(pred, x0: Tensor) -> None:
    if not isinstance(pred, Tensor) or tuple(pred.shape) != tuple(x0.shape):
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"model output must have x0's shape {tuple(x0.shape)}, got {got}")


def sft_loss(model, x0: Tensor, cond=None, *, scheduler, sampler: str = "uniform_index",
             weighting: str = "table", first_frame: Optional[Tensor] = None,
             min_timestep_boundary: float = 0.0, max_timestep_boundary: float = 1.0,
             seed=None, generator: Optional[torch.Generator] = None,
             compat: Optional[str] = None, sigma: Optional[Tensor] = None,
             reduction: str = "mean", logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29) -> Tensor:
    """One supervised flow-matching step's loss (SPEC 1-3): float32 scalar (`[B]` with
    reduction="none").

    Per sample: sigma from `scheduler.sample_sigmas(B, sampler=..., generator=...,
    min_boundary=min_timestep_boundary, max_boundary=max_timestep_boundary)` (or the given
    `sigma` `[B]`); `x_t = (1 - sigma) x0 + sigma eps` with Philox noise drawn in the kernel from
    `seed` (int / 0-d tensor; None: drawn from `generator`, else torch's default generator);
    `v = model(x_t, sigma, cond)`; loss `scheduler.loss_weight(sigma, weighting) *
    mean((v - (eps - x0))^2)`, the noise regenerated from the seed inside the loss kernel (never
    stored). TI2V (`first_frame` `[B, C, 1, H, W]`, x0 `[B, C, T, H, W]`): frame 0 of x_t is
    pinned to first_frame, the model gets a per-frame sigma `[B, T]` with frame 0 at 0, and
    frame 0 is left out of the loss.

    compat="diffsynth" reproduces DiffSynth-Studio's `FlowMatchSFTLoss` numbers instead: one
    timestep index per batch drawn by `torch.randint` on the CPU (from `generator`, a CPU
    generator, or the default one), the timestep cast to bf16 when the scheduler was built with
    `bf16_timestep_lookup=True` (DiffSynth's `timestep.to(torch_dtype)` for bf16 models) and
    looked up to the nearest grid sigma, noise from `torch.randn_like(x0)` in x0's dtype, every
    elementwise op rounding to x0's dtype, `mse_loss(pred.float(), target.float()) * table
    weight`. The model then gets `sigma = timestep / 1000` (the DiT embeds `1000 sigma`, i.e.
    DiffSynth's timestep). seed, sampler, weighting and reduction are ignored there.
    """
    _sft_check(x0, first_frame, compat, sampler, weighting, reduction, sigma)
    if compat == "diffsynth":
        return _sft_loss_diffsynth(model, x0, cond, scheduler, first_frame,
                                   min_timestep_boundary, max_timestep_boundary, generator)
    from fmrt import ops
    ops.check_seed("seed", seed)
    B = x0.shape[0]
    dev = x0.device
    if sigma is None:
        gdev = generator.device if generator is not None else dev
        sigma = scheduler.sample_sigmas(B, sampler=sampler, generator=generator, device=gdev,
                                        min_boundary=min_timestep_boundary,
                                        max_boundary=max_timestep_boundary,
                                        logit_mean=logit_mean, logit_std=logit_std,
                                        mode_scale=mode_scale)
    sigma = sigma.to(device=dev, dtype=torch.float32, non_blocking=True)
    if seed is None and generator is not None:
        seed = torch.randint(0, ops.SEED_LIMIT - 1, (), dtype=torch.int64, generator=generator,
                             device=generator.device)
    seed_t = ops.seed_tensor(seed, dev)

    x_t, _, _ = ops.noised_sample(x0, sigma, None, seed_t, return_target=False)
    mask = None
    model_sigma = sigma
    if first_frame is not None:
        T = x0.shape[2]
        x_t[:, :, :1] = first_frame.to(x_t.dtype)        # x_t is ours: pin the clean frame
        model_sigma = _frame_sigma(sigma, T)
        mask = (torch.arange(T, device=dev) > 0).to(torch.float32).view(1, 1, T, 1, 1)
    pred = model(x_t, model_sigma, cond)
    _check_pred(pred, x0)
    weight = scheduler.loss_weight(sigma, weighting)
    return ops.flow_matching_loss(pred, x0, seed=seed_t, weight=weight, mask=mask,
                                  reduction=reduction)


def _sft_loss_diffsynth(model, x0: Tensor, cond, scheduler, first_frame, min_boundary: float,
                        max_boundary: float, generator) -> Tensor:
    """DiffSynth-Studio's FlowMatchSFTLoss, op for op (see `sft_loss`)."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("compat='diffsynth' draws the timestep on the CPU: pass a CPU "
                         f"generator, got one on {generator.device}")
    n = scheduler.timesteps.shape[0]
    lo, hi = int(min_boundary * n), int(max_boundary * n)
    if not 0 <= lo < hi <= n:
        raise ValueError(f"min_timestep_boundary={min_boundary}, max_timestep_boundary="
                         f"{max_boundary} select no index of the {n}-entry grid")
    tid = torch.randint(lo, hi, (1,), generator=generator)
    tdt = torch.bfloat16 if getattr(scheduler, "bf16_timestep_lookup", False) else torch.float32
    timestep = scheduler.timesteps[tid].to(dtype=tdt, device=x0.device)
    noise = torch.randn_like(x0)
    idx = scheduler.timestep_index(timestep).reshape(())
    s = scheduler.sigma_grid(x0.device)[idx]                # 0-d: ops round in x0's dtype
    latents = (1 - s) * x0 + s * noise
    target = noise - x0
    B = x0.shape[0]
    model_sigma = (timestep.to(torch.float32) / 1000.0).expand(B)
    if first_frame is not None:
        latents[:, :, 0:1] = first_frame
        model_sigma = _frame_sigma(model_sigma, x0.shape[2])
    pred = model(latents, model_sigma, cond)
    _check_pred(pred, x0)
    if first_frame is not None:
        pred, target = pred[:, :, 1:], target[:, :, 1:]
    loss = F.mse_loss(pred.float(), target.float())
    return (loss * scheduler.training_weight(timestep)).reshape(())



# ---------------------------------------------------------------------------------------------
# MeanFlow loss
# ---------------------------------------------------------------------------------------------
