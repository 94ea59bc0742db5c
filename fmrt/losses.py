"""Training losses: the SFT flow-matching loss (SPEC 1-3) and the MeanFlow loss (SPEC 6)."""
from __future__ import annotations


# ---------------------------------------------------------------------------------------------
# SFT flow-matching loss
# ---------------------------------------------------------------------------------------------

from typing import Optional, Sequence  # noqa: E402

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
        ops.check_first_frame(first_frame, x0, "x0")


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
             mode_scale: float = 1.29, huber_c: Optional[float] = None,
             sigma_points: Sequence[float] = (), sigma_points_prob: float = 0.0) -> Tensor:
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

    huber_c: the per-sample pseudo-Huber loss instead of the MSE (see `flow_loss`; refused with
    compat). sigma_points / sigma_points_prob: `sample_sigmas`' points / points_prob (refused
    with compat and with a given `sigma`).
    """
    _sft_check(x0, first_frame, compat, sampler, weighting, reduction, sigma)
    if huber_c is not None:
        check_huber_c(huber_c)
        if compat is not None:
            raise ValueError("huber_c cannot be combined with compat (DiffSynth's loss is the MSE)")
    from fmrt.schedule import check_sigma_points
    if check_sigma_points(sigma_points, sigma_points_prob)[0] and (
            compat is not None or sigma is not None):
        raise ValueError("sigma_points shape the drawn sigmas: they cannot be combined with "
                         "compat (DiffSynth's own draw) or a given sigma")
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
                                        mode_scale=mode_scale, points=sigma_points,
                                        points_prob=sigma_points_prob)
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
    return flow_loss(pred, x0, seed=seed_t, weight=weight, mask=mask, reduction=reduction,
                     huber_c=huber_c)


def check_huber_c(huber_c) -> float:
    return _real("huber_c", huber_c, lo=0.0, lo_open=True)


def flow_loss(pred: Tensor, x0: Tensor, noise: Optional[Tensor] = None, *, seed=None,
              weight=None, mask: Optional[Tensor] = None, reduction: str = "mean",
              huber_c: Optional[float] = None) -> Tensor:
    """`ops.flow_matching_loss` (the weighted MSE, `noise` given or regenerated from `seed`),
    or with `huber_c` its pseudo-Huber form: per sample `weight_b (sqrt(m_b + c^2) - c)`, where
    m_b is sample b's (masked) mean squared error, then reduced as `reduction` says.

    The pseudo-Huber loss is the one iCT and "Improving the Training of Rectified Flows" (Lee et
    al. 2024) train with, sqrt(||d||^2 + C^2) - C with C = 0.00054 sqrt(dim): divided by
    sqrt(dim) it is the form above on the per-element mean with c = 0.00054 (the same loss up
    to a constant factor). Near 0 it is m_b / (2 c); for m_b >> c^2 it is the RMS error, so each
    sample's gradient is its MSE gradient scaled by 1 / (2 sqrt(m_b + c^2)): samples the model
    already fits well are not drowned out by the worst ones."""
    from fmrt import ops
    if huber_c is None:
        return ops.flow_matching_loss(pred, x0, noise, seed=seed, weight=weight, mask=mask,
                                      reduction=reduction)
    c = check_huber_c(huber_c)
    if reduction not in ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {ops.REDUCTIONS}, got {reduction!r}")
    m = ops.flow_matching_loss(pred, x0, noise, seed=seed, mask=mask, reduction="none")
    per = torch.sqrt(m + c * c) - c
    if weight is not None:
        per = per * weight
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


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

import math  # noqa: E402
from typing import Callable  # noqa: E402

MEANFLOW_TIME_SAMPLERS = ("logit_normal", "uniform")
MEANFLOW_TIME_MU = -0.4      # the MeanFlow paper's logit-normal mean (sigma 1.0)


def _real(name: str, value, *, lo: Optional[float] = None, hi: Optional[float] = None,
          lo_open: bool = False) -> float:
    """A finite Python / numpy real within [lo, hi] (or (lo, hi] with lo_open), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return v


def _mf_time(name: str, s, x0: Tensor, dtype: torch.dtype) -> Tensor:
    """t or r: a float in [0, 1], a 0-d or `[B]` float tensor on x0's device -> `[B]` `dtype`.
    Values of CPU tensors are checked on the host; CUDA tensors are not read back."""
    B = x0.shape[0]
    if isinstance(s, bool) or not isinstance(s, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a [B] float tensor, got {type(s).__name__}")
    if not isinstance(s, Tensor):
        if not 0.0 <= _real(name, s) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {s}")
        return torch.full((B,), float(s), dtype=dtype, device=x0.device)
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")
    if s.device != x0.device:
        raise ValueError(f"{name} is on {s.device} but x0 is on {x0.device}")
    if s.ndim == 0:
        s = s.expand(B)
    if tuple(s.shape) != (B,):
        raise ValueError(f"{name} must be a float, 0-d or [B={B}] tensor, got shape "
                         f"{tuple(s.shape)}")
    if s.device.type == "cpu":
        ok = torch.isfinite(s) & (s >= 0) & (s <= 1)
        if not bool(ok.all()):
            raise ValueError(f"{name} must lie in [0, 1], got {s.tolist()}")
    return s.to(dtype)


def _mf_check(model, x0, noise, cond, uncond, time_sampler, time_mu, time_sigma, ratio_r_neq_t,
              p, c, cfg_omega, cfg_kappa, cond_drop_prob, generator, seed, stats,
              velocity) -> None:
    from fmrt import ops
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if velocity is not None and not callable(velocity):
        raise TypeError(f"velocity must be callable or None, got {type(velocity).__name__}")
    ops.check_float_tensor("x0", x0, dtypes=ops.FLOAT_DTYPES + (torch.float64,))
    if x0.ndim == 0 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be [B, ...] with B >= 1, got shape {tuple(x0.shape)}")
    if noise is not None:
        ops.check_float_tensor("noise", noise, dtypes=ops.FLOAT_DTYPES + (
            (torch.float64,) if x0.dtype == torch.float64 else ()))
        ops.check_same("noise", noise, "x0", x0, dtype=False)
        if seed is not None:
            raise ValueError("pass either noise or seed, not both (seed draws the noise)")
    ops.check_seed("seed", seed)
    if isinstance(seed, Tensor) and seed.device != x0.device:
        raise ValueError(f"seed is on {seed.device} but x0 is on {x0.device}")
    if time_sampler not in MEANFLOW_TIME_SAMPLERS:
        raise ValueError(f"time_sampler must be one of {MEANFLOW_TIME_SAMPLERS}, got "
                         f"{time_sampler!r}")
    _real("time_mu", time_mu)
    _real("time_sigma", time_sigma, lo=0.0, lo_open=True)
    _real("ratio_r_neq_t", ratio_r_neq_t, lo=0.0, hi=1.0)
    _real("p", p, lo=0.0)
    _real("c", c, lo=0.0, lo_open=True)
    _real("cfg_omega", cfg_omega)
    _real("cfg_kappa", cfg_kappa)
    _real("cond_drop_prob", cond_drop_prob, lo=0.0, hi=1.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict or None, got {type(stats).__name__}")
    B = x0.shape[0]
    for name, v in (("cond", cond), ("uncond", uncond)):
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor (class labels [B] or embeddings [B, ...]) "
                            f"or None, got {type(v).__name__}")
        if v.ndim == 0 or v.shape[0] != B:
            raise ValueError(f"{name} must be [B={B}, ...], got shape {tuple(v.shape)}")
        if v.device != x0.device:
            raise ValueError(f"{name} is on {v.device} but x0 is on {x0.device}")
    if uncond is not None:
        if cond is None:
            raise ValueError("uncond needs cond (it replaces cond for dropped samples and is "
                             "the unconditional branch of the CFG target)")
        if uncond.shape != cond.shape:
            raise ValueError(f"uncond must have cond's shape {tuple(cond.shape)}, got "
                             f"{tuple(uncond.shape)}")
        if uncond.dtype != cond.dtype:
            raise TypeError(f"uncond must have cond's dtype ({cond.dtype}), got {uncond.dtype}")
    elif cond is not None and (cfg_omega != 1.0 or cfg_kappa != 0.0):
        raise ValueError("CFG in training (cfg_omega != 1 or cfg_kappa != 0) needs uncond")
    if velocity is not None and (cfg_omega != 1.0 or cfg_kappa != 0.0):
        raise ValueError("velocity (a teacher's, guidance included) replaces the CFG target: "
                         "leave cfg_omega = 1 and cfg_kappa = 0")


def _mf_sample_times(B: int, sampler: str, mu: float, sigma: float, ratio_r_neq_t: float,
                     generator: Optional[torch.Generator], device) -> tuple[Tensor, Tensor]:
    """(t, r) float32 `[B]` with t >= r: two draws per sample (sigmoid(N(mu, sigma)) or U(0, 1)),
    sorted; then exactly floor((1 - ratio_r_neq_t) * B) samples, chosen by a random permutation,
    get r = t (the official PyTorch MeanFlow scheme). Drawn on the generator's device."""
    gdev = generator.device if generator is not None else device
    if sampler == "logit_normal":
        s = torch.sigmoid(torch.randn(B, 2, generator=generator, device=gdev) * sigma + mu)
    else:
        s = torch.rand(B, 2, generator=generator, device=gdev)
    t, r = s.max(dim=1).values, s.min(dim=1).values
    n_eq = min(B, int(math.floor((1.0 - ratio_r_neq_t) * B + 1e-9)))
    # scatter, not an index assignment: index_put_ synchronises with the host on CUDA
    eq = torch.zeros(B, dtype=torch.bool, device=gdev).scatter_(
        0, torch.randperm(B, generator=generator, device=gdev)[:n_eq], True)
    r = torch.where(eq, t, r)
    return t.to(device, non_blocking=True), r.to(device, non_blocking=True)


def _jvp_attention():
    """`fmrt.attention.backend_override("triton")`: attention(backend="auto") inside the JVP
    runs fmrt's forward-AD-capable Triton flash attention (math when that is unavailable)."""
    from fmrt.attention import backend_override
    return backend_override("triton")


def _call(model, z: Tensor, r: Tensor, t: Tensor, cond) -> Tensor:
    return model(z, r, t) if cond is None else model(z, r, t, cond)


def meanflow_loss(model: Callable, x0: Tensor, *, noise: Optional[Tensor] = None, t=None,
                  r=None, cond: Optional[Tensor] = None, uncond: Optional[Tensor] = None,
                  time_sampler: str = "logit_normal", time_mu: float = MEANFLOW_TIME_MU,
                  time_sigma: float = 1.0, ratio_r_neq_t: float = 0.25, p: float = 1.0,
                  c: float = 1e-3, cfg_omega: float = 1.0, cfg_kappa: float = 0.0,
                  cond_drop_prob: float = 0.1, generator: Optional[torch.Generator] = None,
                  seed=None, stats: Optional[dict] = None,
                  velocity: Optional[Callable] = None) -> Tensor:
    """The MeanFlow training loss (SPEC 6, arXiv 2505.13447): a 0-d tensor (float32, float64
    for float64 x0).

    model: `model(z, r, t) -> u` (`model(z, r, t, cond)` when cond is given), u of z's shape;
    z `[B, ...]` in x0's dtype, r <= t `[B]` in [0, 1] (1 = noise); the model must form
    h = t - r itself (a DiT: `lambda z, r, t, c: dit(z, t, c, r=r)`).
    Times: `t`, `r` (floats, 0-d or `[B]` tensors, both or neither) or sampled by
    `time_sampler` ("logit_normal": sigmoid(N(time_mu, time_sigma)), "uniform") twice per
    sample, sorted so t >= r, then floor((1 - ratio_r_neq_t) B) random samples get r = t; from
    `generator` (else torch's default one). Times are float32 (float64 for float64 x0).
    Noise: `noise` (x0's shape), else Philox noise from `seed` through `ops.add_noise` (seed
    None: drawn from `generator`, else from torch's default generator).
    `z = (1 - t) x0 + t noise`, `v = noise - x0`; `u, du/dt = torch.func.jvp(model, (z, r, t),
    (v~, 0, 1))` inside `fmrt.attention.backend_override("triton")` (attention backend "auto"
    then supports forward AD; explicit backends must do so themselves); `u_tgt = sg(v~ - (t - r)
    du/dt)`; per sample `L = sum((u - u_tgt)^2)` over the non-batch dims (in fp32);
    loss `mean(L / sg((L + c)^p))` (p = 0: mean L). Gradients reach the model only through u.
    CFG in training (cond and uncond given): each sample's cond is replaced by uncond with
    probability `cond_drop_prob` (drawn from `generator`); when cfg_omega != 1 or
    cfg_kappa != 0, the kept samples use `v~ = omega v + kappa u(z, t, t | cond) +
    (1 - omega - kappa) u(z, t, t | uncond)` (under no_grad), the dropped ones `v~ = v`.
    Distillation: `velocity(z, t, c) -> v` (e.g. `fmrt.distill.TeacherVelocity`, a frozen flow
    model's guided velocity) gives `v~ = velocity(z, t, c)` under no_grad for every sample, c
    its condition after dropout, in place of `noise - x0`: the target then has no noise of its
    own (the conditional velocity's variance is gone), and the student learns the flow map of
    that velocity field; it excludes cfg_omega / cfg_kappa.
    stats (a dict) receives detached per-sample `[B]` tensors: "L", "weight" (1/(L+c)^p),
    "u_norm", "u_tgt_norm", "t", "r", "dropped" (bool).
    Bad input raises ValueError / TypeError naming the argument; t, r values (in [0, 1],
    r <= t) are checked only for Python floats and CPU tensors (CUDA tensors are not read
    back). Do not torch.compile this function (compiled jvp can give wrong tangents: PEERS.md).
    """
    _mf_check(model, x0, noise, cond, uncond, time_sampler, time_mu, time_sigma, ratio_r_neq_t,
              p, c, cfg_omega, cfg_kappa, cond_drop_prob, generator, seed, stats, velocity)
    if (t is None) != (r is None):
        raise ValueError("pass both t and r, or neither (then they are sampled)")
    if torch.compiler.is_compiling():
        raise RuntimeError("meanflow_loss must run eagerly: torch.compile around torch.func.jvp "
                           "can return wrong tangents (compile the model's blocks instead)")
    from fmrt import ops
    B, dev = x0.shape[0], x0.device
    tdt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    if t is None:
        t, r = _mf_sample_times(B, time_sampler, float(time_mu), float(time_sigma),
                                float(ratio_r_neq_t), generator, dev)
        t, r = t.to(tdt), r.to(tdt)
    else:
        t, r = _mf_time("t", t, x0, tdt), _mf_time("r", r, x0, tdt)
        if t.device.type == "cpu" and not bool((r <= t).all()):
            raise ValueError(f"r must be <= t for every sample, got t={t.tolist()}, "
                             f"r={r.tolist()}")

    # noised sample and the conditional velocity (float64 x0: the reference, ops take no fp64)
    seed_t = None
    if noise is None:
        if seed is None and generator is not None:
            seed = torch.randint(0, ops.SEED_LIMIT - 1, (), dtype=torch.int64,
                                 generator=generator, device=generator.device)
        seed_t = ops.seed_tensor(seed, dev)
    if x0.dtype == torch.float64:
        from fmrt import reference as ref
        eps = noise if noise is not None else ref.philox_normal(x0.shape, seed_t, dev)
        z, v = ref.add_noise(x0, t, eps)
    elif noise is None:
        z, v = ops.add_noise(x0, t, seed=seed_t)
    else:
        z, v = ops.add_noise(x0, t, noise)
    bshape = (B,) + (1,) * (x0.ndim - 1)

    # conditions: dropped samples get uncond
    dropped = torch.zeros(B, dtype=torch.bool, device=dev)
    cond_in = cond
    if uncond is not None and cond_drop_prob > 0.0:
        gdev = generator.device if generator is not None else dev
        dropped = (torch.rand(B, generator=generator, device=gdev) < cond_drop_prob).to(dev)
        cond_in = torch.where(dropped.view((B,) + (1,) * (cond.ndim - 1)), uncond, cond)

    # CFG in training: the guided instantaneous velocity (no gradient)
    tangent = v
    omega, kappa = float(cfg_omega), float(cfg_kappa)
    if uncond is not None and (omega != 1.0 or kappa != 0.0):
        with torch.no_grad():
            v_g = omega * v
            if kappa != 0.0:
                u_c = _call(model, z, t, t, cond)
                _check_pred(u_c, z)
                v_g = v_g + kappa * u_c.to(v.dtype)
            if 1.0 - omega - kappa != 0.0:
                u_u = _call(model, z, t, t, uncond)
                _check_pred(u_u, z)
                v_g = v_g + (1.0 - omega - kappa) * u_u.to(v.dtype)
            tangent = torch.where(dropped.view(bshape), v, v_g.to(v.dtype))
    if velocity is not None:
        with torch.no_grad():
            v_t = velocity(z, t, cond_in)
        _check_pred(v_t, z)
        tangent = v_t.to(v.dtype)

    # u and du/dt along (v~, 0, 1) over (z, r, t); h = t - r is formed inside the model
    def fn(z_, r_, t_):
        return _call(model, z_, r_, t_, cond_in)

    try:
        with _jvp_attention():
            u, dudt = torch.func.jvp(fn, (z, r, t),
                                     (tangent, torch.zeros_like(r), torch.ones_like(t)))
    except NotImplementedError as e:
        if "forward AD" not in str(e):
            raise
        raise NotImplementedError(
            "meanflow_loss: the model uses an op without forward-mode AD (torch.func.jvp); "
            "for attention use a JVP-capable backend (attn_backend='auto', 'triton' or 'math'). "
            f"Original error: {e}") from e
    _check_pred(u, z)

    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    h = (t - r).to(cdt).view(bshape)
    u_tgt = (tangent.to(cdt) - h * dudt.detach().to(cdt)).detach()
    uf = u.to(cdt)
    dims = tuple(range(1, x0.ndim))
    L = (uf - u_tgt).square().sum(dim=dims) if dims else (uf - u_tgt).square()
    pw = float(p)
    w = torch.ones_like(L) if pw == 0.0 else 1.0 / (L.detach() + float(c)).pow(pw)
    loss = (L * w).mean()
    if stats is not None:
        with torch.no_grad():
            norm = (lambda a: a.square().sum(dim=dims).sqrt()) if dims else (lambda a: a.abs())
            stats.update({"L": L.detach(), "weight": w.detach(), "u_norm": norm(uf.detach()),
                          "u_tgt_norm": norm(u_tgt), "t": t.detach(), "r": r.detach(),
                          "dropped": dropped})
    return loss
