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

MEANFLOW_TIME_SAMPLERS = ("logit_normal", "uniform")


def meanflow_time_sample(batch: int, *, sampler: str = "logit_normal", mu: float = -0.4,
                         sigma: float = 1.0, ratio_r_neq_t: float = 0.25,
                         generator: Optional[torch.Generator] = None,
                         device=None) -> tuple[Tensor, Tensor]:
    """(t, r), each `[B]` float32 in [0, 1] with t >= r: two draws (logit-normal(mu, sigma) or
    uniform), sorted; then `round((1 - ratio_r_neq_t) * B)` samples (a random subset) get r = t
    (plain flow matching), as in the official MeanFlow code."""
    if sampler not in MEANFLOW_TIME_SAMPLERS:
        raise ValueError(f"time_sampler must be one of {MEANFLOW_TIME_SAMPLERS}, got {sampler!r}")
    if not 0.0 <= ratio_r_neq_t <= 1.0:
        raise ValueError(f"ratio_r_neq_t must lie in [0, 1], got {ratio_r_neq_t}")
    gdev = generator.device if generator is not None else device
    if sampler == "logit_normal":
        a = torch.sigmoid(torch.randn(2, batch, generator=generator, device=gdev) * sigma + mu)
    else:
        a = torch.rand(2, batch, generator=generator, device=gdev)
    t, r = a.max(0).values, a.min(0).values
    n_eq = int(round((1.0 - ratio_r_neq_t) * batch))
    if n_eq:
        idx = torch.randperm(batch, generator=generator, device=gdev)[:n_eq]
        r = r.clone()
        r[idx] = t[idx]
    return t.to(device=device), r.to(device=device)


def _meanflow_check_time(name: str, t, x0: Tensor) -> Tensor:
    B = x0.shape[0]
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point [B={B}] tensor")
    if t.shape != (B,):
        raise ValueError(f"{name} must be [B={B}], got shape {tuple(t.shape)}")
    if t.device != x0.device:
        raise ValueError(f"{name} is on {t.device} but x0 is on {x0.device}")
    if bool(((t < 0) | (t > 1) | t.isnan()).any()):  # user-given: one host read
        raise ValueError(f"{name} must lie in [0, 1]")
    return t.to(torch.float32)


def _per_sample(x: Tensor, like: Tensor) -> Tensor:
    """A `[B]` tensor viewed to broadcast against like `[B, ...]`."""
    return x.view(-1, *([1] * (like.ndim - 1)))


def _select_cond(drop: Tensor, uncond: Tensor, cond: Tensor) -> Tensor:
    """Per sample: uncond where drop, else cond (uncond broadcast to cond's shape)."""
    u = uncond.to(device=cond.device, dtype=cond.dtype).expand_as(cond)
    return torch.where(_per_sample(drop, cond), u, cond)


def _call_u(model, z, r, t, cond):
    return model(z, r, t) if cond is None else model(z, r, t, cond)


def meanflow_loss(model, x0: Tensor, *, noise: Optional[Tensor] = None,
                  t: Optional[Tensor] = None, r: Optional[Tensor] = None, cond=None,
                  uncond=None, time_sampler: str = "logit_normal", time_mu: float = -0.4,
                  time_sigma: float = 1.0, ratio_r_neq_t: float = 0.25, p: float = 1.0,
                  c: float = 1e-3, cfg_omega: float = 1.0, cfg_kappa: float = 0.0,
                  cond_drop_prob: float = 0.1, generator: Optional[torch.Generator] = None,
                  stats: Optional[dict] = None) -> Tensor:
    """MeanFlow loss (SPEC 6, arXiv 2505.13447). Returns the 0-d float32 loss.

    `model(z, r, t)` (or `model(z, r, t, cond)` when cond is given) -> u, same shape as z; z `[B,
    ...]`, r <= t `[B]` float32. With `z = (1 - t) x0 + t noise`, `v = noise - x0`:
    `(u, du/dt) = torch.func.jvp(u, (z, r, t), (v~, 0, 1))` (run inside
    `fmrt.attention.backend_override("triton")`, so attention backend="auto" uses fmrt's
    forward-mode flash attention); `u_tgt = sg(v~ - (t - r) du/dt)`; per sample
    `L = sum((u - u_tgt)^2)` (sum over all non-batch elements, fp32);
    `loss = mean(L / sg((L + c)^p))`. The model must compute h = t - r itself.

    CFG in training (needs cond and uncond): `v~ = omega v + kappa u(z, t, t | cond) +
    (1 - omega - kappa) u(z, t, t | uncond)` without gradient; a random `cond_drop_prob` share of
    samples gets `uncond` as its condition and `v~ = v`. uncond broadcasts to cond's shape (a null
    class label, an empty-text embedding). Without uncond there is no dropping and `v~ = v`.
    noise, t, r default to draws from `generator` (t and r by `meanflow_time_sample`); given
    explicitly (t and r together) the loss is deterministic (when no condition is dropped);
    explicit t / r are validated (in [0, 1], t >= r) with one host read. Sampled draws need no
    host sync.
    `stats`, if a dict, receives detached per-sample tensors: L, weight, u_norm, u_tgt_norm, t,
    r, dropped.
    """
    from fmrt import ops
    ops.check_float_tensor("x0", x0)
    if x0.ndim < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be [B, ...] with B >= 1, got shape {tuple(x0.shape)}")
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    B = x0.shape[0]
    if noise is None:
        gdev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gdev,
                            dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
    else:
        ops.check_float_tensor("noise", noise)
        ops.check_same("noise", noise, "x0", x0)
    if (t is None) != (r is None):
        raise ValueError("give both t and r, or neither (then they are sampled)")
    if t is None:
        t, r = meanflow_time_sample(B, sampler=time_sampler, mu=time_mu, sigma=time_sigma,
                                    ratio_r_neq_t=ratio_r_neq_t, generator=generator,
                                    device=x0.device)
    else:
        t = _meanflow_check_time("t", t, x0)
        r = _meanflow_check_time("r", r, x0)
        if bool((t < r).any()):
            raise ValueError("t must be >= r for every sample (t < r given)")
    if p < 0 or c <= 0:
        raise ValueError(f"need p >= 0 and c > 0, got p={p}, c={c}")
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob}")
    cfg = cfg_omega != 1.0 or cfg_kappa != 0.0
    if uncond is not None and cond is None:
        raise ValueError("uncond needs cond")
    if cfg and uncond is None:
        raise ValueError("cfg_omega != 1 or cfg_kappa != 0 needs cond and uncond")
    if cond is not None and uncond is not None:
        if not isinstance(cond, Tensor) or not isinstance(uncond, Tensor):
            raise TypeError("cond and uncond must be tensors to drop / guide per sample")
        if cond.ndim < 1 or cond.shape[0] != B:
            raise ValueError(f"cond must be [B={B}, ...], got {tuple(cond.shape)}")
        try:
            uncond.expand_as(cond)
        except RuntimeError:
            raise ValueError(f"uncond {tuple(uncond.shape)} must broadcast to cond "
                             f"{tuple(cond.shape)}") from None

    dt = torch.float32
    x0f, nf = x0.to(dt), noise.to(dt)
    tb = _per_sample(t, x0f)
    z = ((1.0 - tb) * x0f + tb * nf).to(x0.dtype)
    v = (nf - x0f)
    dropped = torch.zeros(B, dtype=torch.bool, device=x0.device)
    cond_in = cond
    if uncond is not None:
        gdev = generator.device if generator is not None else x0.device
        dropped = (torch.rand(B, generator=generator, device=gdev) < cond_drop_prob).to(x0.device)
        cond_in = _select_cond(dropped, uncond, cond)
    v_tilde = v
    if cfg:
        with torch.no_grad():
            unc = uncond.to(device=cond.device, dtype=cond.dtype).expand_as(cond)
            guided = cfg_omega * v
            if cfg_kappa != 0.0:
                guided = guided + cfg_kappa * _checked_u(_call_u(model, z, t, t, cond), z).to(dt)
            if 1.0 - cfg_omega - cfg_kappa != 0.0:
                guided = guided + (1.0 - cfg_omega - cfg_kappa) * _checked_u(
                    _call_u(model, z, t, t, unc), z).to(dt)
        v_tilde = torch.where(_per_sample(dropped, v), v, guided)

    def u_fn(z_, r_, t_):
        return _call_u(model, z_, r_, t_, cond_in)

    from fmrt.attention import backend_override
    with backend_override("triton"):
        u, dudt = torch.func.jvp(u_fn, (z, r, t),
                                 (v_tilde.to(z.dtype), torch.zeros_like(r), torch.ones_like(t)))
    _checked_u(u, z)
    u_tgt = (v_tilde - _per_sample(t - r, v) * dudt.detach().to(dt)).detach()
    err = u.to(dt) - u_tgt
    L = err.pow(2).reshape(B, -1).sum(1)
    w = (L.detach() + c).pow(-p)
    loss = (L * w).mean()
    if stats is not None:
        stats.update(L=L.detach(), weight=w, u_norm=u.detach().to(dt).reshape(B, -1).norm(dim=1),
                     u_tgt_norm=u_tgt.reshape(B, -1).norm(dim=1), t=t, r=r, dropped=dropped)
    return loss


def _checked_u(u, z: Tensor) -> Tensor:
    if not isinstance(u, Tensor) or u.shape != z.shape:
        got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"model must return u with the shape of its input z {tuple(z.shape)}, "
                         f"got {got}")
    return u
