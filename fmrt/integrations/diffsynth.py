"""Drop-in fused SFT loss for DiffSynth-Studio trainers.

    from fmrt.integrations.diffsynth import FlowMatchSFTLoss   # instead of
    # from diffsynth.diffusion.loss import FlowMatchSFTLoss     (same call, same RNG draws)
    loss = FlowMatchSFTLoss(pipe, **inputs_shared, **inputs_posi)

`pipe.scheduler` may be DiffSynth's `FlowMatchScheduler` or `fmrt.FlowMatchScheduler` (both
after `set_timesteps(1000, training=True)`, which the training modules do).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fmrt import ops

__all__ = ["FlowMatchSFTLoss"]

_PIPE_ATTRS = ("scheduler", "torch_dtype", "device", "in_iteration_models", "model_fn")


def _scheduler_tables(scheduler) -> tuple[Tensor, Tensor, Tensor]:
    """(timesteps, sigmas, training weights), each `[N]`, of a DiffSynth-like scheduler."""
    tables = []
    for name in ("timesteps", "sigmas", "linear_timesteps_weights"):
        t = getattr(scheduler, name, None)
        if not isinstance(t, Tensor) or t.ndim != 1 or not t.is_floating_point():
            hint = (" (call scheduler.set_timesteps(1000, training=True) first)"
                    if name == "linear_timesteps_weights" else "")
            raise ValueError(f"pipe.scheduler must be DiffSynth-like (DiffSynth's or fmrt's "
                             f"FlowMatchScheduler): its {name!r} must be a 1-d float tensor, "
                             f"got {type(t).__name__}{hint}")
        tables.append(t)
    n = tables[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in tables):
        raise ValueError(f"pipe.scheduler's timesteps, sigmas and linear_timesteps_weights must "
                         f"have one (non-zero) length, got "
                         f"{[tuple(t.shape) for t in tables]}")
    return tables[0], tables[1], tables[2]


def _boundary(inputs: dict, name: str, default: float) -> float:
    value = inputs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def FlowMatchSFTLoss(pipe, **inputs) -> Tensor:
    """DiffSynth-Studio's `FlowMatchSFTLoss(pipe, **inputs)` on fmrt's fused ops: float32 0-d.

    As DiffSynth: one timestep per batch, index `torch.randint(int(min_timestep_boundary N),
    int(max_timestep_boundary N), (1,))` on the CPU's default generator, `timestep =
    scheduler.timesteps[index]` cast to `pipe.torch_dtype` (bf16 models: a bf16 timestep) and
    looked up to the nearest grid entry for sigma and the training weight; noise
    `torch.randn_like(input_latents) * noise_scale`; `latents = (1 - sigma) x0 + sigma noise`;
    TI2V (`first_frame_latents` `[B, C, 1, H, W]`): frame 0 of the latents pinned to it and
    left out of the loss; `pipe.model_fn(**models, **inputs, latents=..., timestep=timestep)`;
    loss `mean((pred - (noise - x0))^2) * weight`. `lora` inputs are loaded as DiffSynth does.

    fmrt: the noising is one kernel (`ops.add_noise` math) and the loss one fused forward and
    backward (`ops.flow_matching_loss`: the target is never stored, TI2V by a frame mask); the
    lookup is host math on the scheduler's CPU tables (DiffSynth reads the timestep back from
    the device instead). Same `torch.manual_seed` -> same timestep, same noise; the loss agrees
    with DiffSynth's to fp32 rounding for fp32 latents, and for bf16 latents to bf16 rounding
    (DiffSynth rounds x_t and the target to bf16 after every op, fmrt once).
    """
    for name in _PIPE_ATTRS:
        if not hasattr(pipe, name):
            raise TypeError(f"pipe must be a DiffSynth pipeline: it has no {name!r} "
                            f"(needs {', '.join(_PIPE_ATTRS)})")
    if "input_latents" not in inputs or inputs["input_latents"] is None:
        raise ValueError("FlowMatchSFTLoss needs inputs['input_latents'] (the clean latents "
                         "[B, ...]), as DiffSynth's does")
    x0 = ops.check_float_tensor("input_latents", inputs["input_latents"])
    if x0.ndim == 0:
        raise ValueError("input_latents must be [B, ...], got a 0-d tensor")
    timesteps, sigmas, weights = _scheduler_tables(pipe.scheduler)
    first = inputs.get("first_frame_latents")
    if first is not None:
        ops.check_first_frame(first, x0, "input_latents")
    n = timesteps.shape[0]
    lo = int(_boundary(inputs, "min_timestep_boundary", 0) * n)
    hi = int(_boundary(inputs, "max_timestep_boundary", 1) * n)
    if not 0 <= lo < hi <= n:
        raise ValueError(f"min_timestep_boundary / max_timestep_boundary select the index range "
                         f"[{lo}, {hi}) of the {n}-entry grid: it must be non-empty within it")

    if "lora" in inputs:   # Image-to-LoRA models (DiffSynth does the same)
        pipe.clear_lora(verbose=0)
        pipe.load_lora(pipe.dit, state_dict=inputs["lora"], hotload=True, verbose=0)

    timestep_id = torch.randint(lo, hi, (1,))
    t_host = timesteps[timestep_id].to(dtype=pipe.torch_dtype)       # DiffSynth's rounding
    timestep = t_host.to(device=pipe.device)
    noise = torch.randn_like(x0) * inputs.get("noise_scale", 1.0)
    idx = int((timesteps - t_host.to(timesteps.device)).abs().argmin())   # CPU tables: no sync
    sigma, weight = float(sigmas[idx]), float(weights[idx])

    latents, _, _ = ops.noised_sample(x0, sigma, noise, None, return_target=False)
    mask = None
    if first is not None:
        latents[:, :, 0:1] = first                                    # ours: pin frame 0
        T = x0.shape[2]
        mask = (torch.arange(T, device=x0.device) > 0).to(torch.float32).view(1, 1, T, 1, 1)
    inputs["latents"] = latents
    models = {name: getattr(pipe, name) for name in pipe.in_iteration_models}
    pred = pipe.model_fn(**models, **inputs, timestep=timestep)
    if not isinstance(pred, Tensor) or tuple(pred.shape) != tuple(x0.shape):
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"pipe.model_fn must return input_latents' shape {tuple(x0.shape)}, "
                         f"got {got}")
    return ops.flow_matching_loss(pred, x0, noise, weight=weight, mask=mask)
