"""Samplers for flow-matching models: one loop, five solvers, classifier-free guidance,
img2img / video2video, TI2V frame-0 pinning and in-pass guidance diagnostics.

Convention (SPEC.md): sigma in [0, 1], 1 = noise; `model(x, sigma[B], cond) -> v` with
v = noise - x0 (MeanFlow: `model(z, r, t, cond) -> u`, r <= t). The loop runs over a sigma grid
`[N + 1]` (N sigmas then the final one, normally 0) that lives on the data's device, and
nothing in it reads a tensor back to the host: a whole call of `sample` can be captured in a
CUDA graph (with `sigmas` given as a device tensor).

Solvers:
- "euler":  x' = x + (s' - s) v; with guidance the fused `ops.guided_euler_step`.
- "heun":   Heun's 2nd order (trapezoid on the velocity); the last step is plain Euler (chosen
            by position, not by reading sigma, so no host sync).
- "unipc":  UniPC bh2, order 2, flow prediction (x0 = x - s v), predictor + corrector,
            lower-order warm-up and final step: diffusers' `UniPCMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction")` / Wan's default solver.
- "euler_maruyama": `ops.sde_step` (Flow-GRPO's discretisation, see fmrt.reference.sde_step)
            with `eta`, Philox noise seeded per step from `seed`.
- "meanflow": z_r = z_t - (t - r) u(z_t, r, t); one step is z0 = z1 - u(z1, 0, 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from fmrt import ops
from fmrt import reference as ref
from fmrt._dispatch import use_triton
from fmrt.cache import BranchCache, check_cacheable, check_policy
from fmrt.guidance import (AdaptiveGuidanceReuse, GuidanceReuse, check_interval,
                           guidance_branches)

SOLVERS = ("euler", "heun", "unipc", "euler_maruyama", "meanflow")
_SEED_MIX = 0x9E3779B1


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------

class DiagnosticsRecorder:
    """Collects the per-step guidance statistics (float32 `[B]` device tensors, see
    `ops.guided_euler_step`) without reading them back; `to_host()` converts after the loop."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, step: int, stats: dict) -> None:
        if not isinstance(stats, dict):
            raise TypeError(f"stats must be a dict, got {type(stats).__name__}")
        self.records.append({"step": int(step), **stats})

    def __len__(self) -> int:
        return len(self.records)

    def as_tensors(self) -> dict[str, Tensor]:
        """Each statistic stacked over the steps: `{key: [steps, B]}` on the device (no sync);
        "step" is a CPU LongTensor `[steps]`."""
        if not self.records:
            return {}
        out: dict[str, Tensor] = {"step": torch.tensor([r["step"] for r in self.records])}
        for key in self.records[0]:
            if key != "step":
                out[key] = torch.stack([r[key].detach().float() for r in self.records])
        return out

    def to_host(self) -> list[dict[str, Any]]:
        """The records with every tensor as a list of floats (one entry per sample); one
        device-to-host copy per statistic."""
        stacked = {k: v.cpu().tolist() for k, v in self.as_tensors().items()}
        return [{k: stacked[k][i] for k in stacked} for i in range(len(self.records))]


def _host_records(records) -> list[dict[str, Any]]:
    if isinstance(records, DiagnosticsRecorder):
        return records.to_host()
    if not isinstance(records, (list, tuple)):
        raise TypeError(f"records must be a DiagnosticsRecorder or a list of dicts, "
                        f"got {type(records).__name__}")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise TypeError(f"records[{i}] must be a dict, got {type(rec).__name__}")
        out.append({k: (v.detach().float().cpu().tolist() if isinstance(v, Tensor) else v)
                    for k, v in rec.items()})
    return out


def plot_diagnostics(records, path) -> None:
    """Seed 000's 2x2 figure as a PNG: CFG difference (model-output space: norm, mean, std),
    CFG difference in velocity space (||sigma * cfg_diff||), x0-prediction difference, and the
    sigma schedule, against the step; one line per sample. Needs matplotlib (Agg backend)."""
    recs = _host_records(records)
    if not recs:
        raise ValueError("records is empty: nothing to plot")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_diagnostics needs matplotlib: pip install matplotlib") from e

    def series(key):
        vals = [r[key] for r in recs]
        vals = [v if isinstance(v, list) else [v] for v in vals]
        return list(zip(*vals))  # per sample

    steps = [r.get("step", i) for i, r in enumerate(recs)]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0, 0]
    for b, ys in enumerate(series("cfg_diff_norm")):
        ax.plot(steps, ys, marker="o", ms=3, label=f"||cfg_diff|| sample {b}")
    if "cfg_diff_std" in recs[0]:
        for b, ys in enumerate(series("cfg_diff_std")):
            ax.plot(steps, ys, ls="--", label=f"std(cfg_diff) sample {b}")
    ax.set_title("CFG difference (model-output space): v_cond - v_uncond")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    panels = ((axes[0, 1], "vel_diff_norm", "CFG difference (velocity space): ||sigma * cfg_diff||"),
              (axes[1, 0], "x0_diff_norm", "x0-prediction difference: ||x0_cond - x0_uncond||\n"
               "(x0 = x - sigma v: equals the velocity-space norm for a flow model)"),
              (axes[1, 1], "sigma", "Noise schedule (sigma_t)"))
    for ax, key, title in panels:
        if key in recs[0]:
            for b, ys in enumerate(series(key)):
                ax.plot(steps, ys, marker="o", ms=3, label=f"sample {b}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# grids and UniPC coefficients
# ---------------------------------------------------------------------------------------------

def default_sigma_grid(steps: int, *, shift: float = 1.0, denoising_strength: float = 1.0,
                       device=None) -> Tensor:
    """`[steps + 1]` float32: linspace(strength, 0, steps + 1) with the shift
    `k s / (1 + (k - 1) s)` (the "Wan" grid with sigma_min 0)."""
    s = torch.linspace(float(denoising_strength), 0.0, steps + 1, dtype=torch.float64,
                       device=device)
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return s.float()


def unipc_orders(n: int) -> list[int]:
    """Predictor order per step for order-2 UniPC with warm-up and lower_order_final."""
    return [1 if (i == 0 or i == n - 1) else 2 for i in range(n)]


def unipc_coefficients(grid: Tensor) -> dict[str, Tensor]:
    """Per-step coefficients `[N]` (float64, grid's device) of UniPC-bh2 with flow prediction.

    With alpha = 1 - s, lambda = log(alpha / s), h_i = lambda_{i+1} - lambda_i, B_i = expm1(-h_i):
    predictor x_{i+1} = A_i x_i + K_i m_i + K_i rho_p (m_{i-1} - m_i) / r_i  (order 2, rho_p = 1/2)
    with A_i = s_{i+1} / s_i, K_i = -alpha_{i+1} B_i, r_i = (lambda_{i-1} - lambda_i) / h_i;
    corrector of x_{i+1} with the new m_{i+1}: A_i x_i + K_i m_i + K_i [c0_i (m_{i-1} - m_i) / r_i
    + c1_i (m_{i+1} - m_i)], (c0, c1) solving [[1, 1], [r, 1]] c = (b1, b2) (order 2) or c1 = 1/2
    (order 1); b1 = (B/hh - 1) / B, b2 = 2 ((B/hh - 1)/hh - 1/2) / B, hh = -h.
    """
    g = grid.to(torch.float64)
    alpha = 1.0 - g
    lam = torch.log(alpha) - torch.log(g)
    h = lam[1:] - lam[:-1]
    hh = -h
    bh = torch.expm1(hh)
    A = g[1:] / g[:-1]
    K = -alpha[1:] * bh
    r = torch.ones_like(h)
    r[1:] = (lam[:-2] - lam[1:-1]) / h[1:]
    phi = bh / hh - 1.0
    b1 = phi / bh
    b2 = 2.0 * (phi / hh - 0.5) / bh
    c0 = (b1 - b2) / (1.0 - r)
    c1 = b1 - c0
    return {"A": A, "K": K, "r": r, "c0": c0, "c1": c1}


# ---------------------------------------------------------------------------------------------
# the plan: which branch (cond, uncond, reuse) and which blocks each step runs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a sampling call runs, decided before the loop.

    branches[i]: "cfg" (cond + uncond forwards), "reuse" (cond only, v = c + (s - 1) d),
    "adaptive" (one of the two, decided in the loop) or "cond" (cond only, no guidance); see
    fmrt.guidance. blocks[i] = (cond, uncond) block modes under step caching: "all" (every block),
    "skip" (no block: the cached residual), "probe" (block 0, then the cache decides), "-" (the
    branch does not run at this step; for "adaptive" the uncond entry is the mode it runs with
    when the loop refreshes)."""
    branches: tuple[str, ...]
    blocks: tuple[tuple[str, str], ...]

    def __len__(self) -> int:
        return len(self.branches)

    @property
    def static(self) -> bool:
        """True when the loop needs no host decision (capturable in a CUDA graph)."""
        return ("adaptive" not in self.branches
                and not any("probe" in b for b in self.blocks))

    def model_calls(self) -> dict[str, int]:
        """Forward calls per branch, counting "adaptive" steps as refreshes (an upper bound)."""
        return {"cond": len(self.branches),
                "uncond": sum(b in ("cfg", "adaptive") for b in self.branches)}


def make_plan(n: int, sigmas: Optional[Sequence[float]] = None, *, guided: bool = True,
              guidance_interval: Optional[tuple[float, float]] = None,
              guidance_reuse=None, cache=None) -> Plan:
    """The plan of an n-step call (see `Plan`). sigmas: the grid's first n sigmas on the host
    (needed only with a guidance interval)."""
    interval = check_interval(guidance_interval)
    if guidance_reuse is not None and not isinstance(guidance_reuse,
                                                     (GuidanceReuse, AdaptiveGuidanceReuse)):
        raise TypeError(f"guidance_reuse must be None, GuidanceReuse or AdaptiveGuidanceReuse, "
                        f"got {type(guidance_reuse).__name__}")
    check_policy(cache)
    if interval is not None and (sigmas is None or len(sigmas) < n):
        raise ValueError("a guidance interval needs the grid's sigmas on the host")
    branches = guidance_branches(n, sigmas, guided=guided, interval=interval,
                                 reuse=guidance_reuse)
    if cache is None:
        cmodes = umodes = ["all"] * n
    else:
        cmodes, umodes = cache.modes(n, "cond"), cache.modes(n, "uncond")
    blocks = tuple((cmodes[i], umodes[i] if b in ("cfg", "adaptive") else "-")
                   for i, b in enumerate(branches))
    return Plan(tuple(branches), blocks)


# ---------------------------------------------------------------------------------------------
# the sampling loop
# ---------------------------------------------------------------------------------------------

def _check_args(model, noise, steps, solver, guidance_scale, eta, recorder, denoising_strength,
                x_init, first_frame, cond, uncond, rescale, norm_dim, guidance_interval,
                cfg_zero_init_steps, callback, guidance_reuse, cache) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    ops.check_float_tensor("noise", noise)
    if noise.ndim < 2:
        raise ValueError(f"noise must be [B, ...] with at least 2 dims, got {tuple(noise.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    ops.check_scale("guidance_scale", guidance_scale, noise)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float, got {type(eta).__name__}")
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite float >= 0, got {eta}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if recorder is not None and not isinstance(recorder, DiagnosticsRecorder):
        raise TypeError(f"recorder must be a DiagnosticsRecorder, got {type(recorder).__name__}")
    if not isinstance(denoising_strength, (int, float)) or isinstance(denoising_strength, bool):
        raise TypeError("denoising_strength must be a float")
    if not 0.0 < denoising_strength <= 1.0:
        raise ValueError(f"denoising_strength must lie in (0, 1], got {denoising_strength}")
    if x_init is not None:
        ops.check_float_tensor("x_init", x_init)
        ops.check_same("x_init", x_init, "noise", noise, dtype=False)
    if first_frame is not None:
        ops.check_first_frame(first_frame, noise, "noise")
        if solver == "meanflow":
            raise ValueError("first_frame (TI2V) is not supported with solver='meanflow'")
    if rescale not in ref.RESCALES:
        raise ValueError(f"rescale must be one of {ref.RESCALES}, got {rescale!r}")
    if norm_dim is not None and norm_dim not in (-1, noise.ndim - 1):
        raise ValueError(f"norm_dim must be None or -1, got {norm_dim}")
    check_interval(guidance_interval)
    if isinstance(cfg_zero_init_steps, bool) or not isinstance(cfg_zero_init_steps, int):
        raise TypeError("cfg_zero_init_steps must be an int")
    if cfg_zero_init_steps < 0:
        raise ValueError(f"cfg_zero_init_steps must be >= 0, got {cfg_zero_init_steps}")
    if guidance_reuse is not None:
        if not isinstance(guidance_reuse, (GuidanceReuse, AdaptiveGuidanceReuse)):
            raise TypeError(f"guidance_reuse must be None, GuidanceReuse or "
                            f"AdaptiveGuidanceReuse, got {type(guidance_reuse).__name__}")
        if solver != "euler":
            raise ValueError(f"guidance_reuse needs solver='euler', got {solver!r}")
        if rescale != "none":
            raise ValueError("guidance_reuse needs rescale='none'")
    check_policy(cache)
    if cache is not None:
        check_cacheable(model)
        if solver in ("heun", "meanflow"):
            raise ValueError(f"step caching needs a one-evaluation-per-step solver (euler, unipc,"
                             f" euler_maruyama), got {solver!r}")


def _model_grid(scheduler, grid: Tensor) -> Tensor:
    """The sigmas the model sees: the grid itself, except for schedulers with integer
    timesteps (the "Wan-official" template: Wan feeds its model the integer timestep t, i.e.
    sigma t / 1000, while its solver steps with the exact sigmas)."""
    preset = getattr(scheduler, "preset", None)
    if scheduler is None or not getattr(preset, "integer_timesteps", False):
        return grid
    t = scheduler.timesteps.to(device=grid.device, dtype=torch.float32) / 1000.0
    return torch.cat([t, grid[-1:]])


def _grid(noise: Tensor, scheduler, sigmas, steps: int, shift: float,
          denoising_strength: float) -> Tensor:
    if sigmas is not None:
        if isinstance(sigmas, Tensor):
            if not sigmas.is_floating_point():
                raise TypeError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")
            grid = sigmas.to(device=noise.device, dtype=torch.float32)
        elif isinstance(sigmas, Sequence):
            grid = torch.tensor([float(s) for s in sigmas], dtype=torch.float32,
                                device=noise.device)
        else:
            raise TypeError(f"sigmas must be a tensor or a sequence of floats, "
                            f"got {type(sigmas).__name__}")
        if grid.ndim != 1 or grid.numel() < 2:
            raise ValueError(f"sigmas must be a 1-D grid of N + 1 >= 2 values (ending with the "
                             f"final sigma, normally 0), got shape {tuple(grid.shape)}")
        return grid
    if scheduler is not None:
        grid = scheduler.sigma_grid(noise.device)
        return grid.to(device=noise.device, dtype=torch.float32)
    return default_sigma_grid(steps, shift=shift, denoising_strength=denoising_strength,
                              device=noise.device)


def _checked(out, x: Tensor) -> Tensor:
    """A model output, checked against x's shape and cast to x's dtype."""
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError(f"model must return a tensor of x's shape {tuple(x.shape)}, got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _step_seed(seed: Tensor, i: int) -> Tensor:
    """Step i's Philox seed, derived on the device from the loop's seed."""
    return (seed * 1_000_003 + (i + 1) * _SEED_MIX) % (2 ** 62)


class _Model:
    """The model calls of one sampling call: time inputs per grid index (views of the grid, no
    sync), batched or separate CFG forwards, CFG-Zero*'s uncond scaling, the step caches."""

    def __init__(self, model, noise, model_grid, cond, uncond, *, guided, batch_cfg,
                 first_frame, cfg_zero_star, cache, states):
        B, n = noise.shape[0], model_grid.numel() - 1
        self.model, self.cond, self.uncond, self.B = model, cond, uncond, B
        self.batched = (guided and batch_cfg and cache is None and isinstance(cond, Tensor)
                        and isinstance(uncond, Tensor) and cond.shape == uncond.shape)
        self.cond2 = torch.cat([cond, uncond]) if self.batched else None
        reps = 2 if self.batched else 1
        if first_frame is not None:
            T = noise.shape[2]
            keep = torch.ones(T, device=noise.device, dtype=torch.float32)
            keep[0] = 0.0
            frame_sigmas = model_grid[:, None] * keep[None, :]  # [N + 1, T]
            times = frame_sigmas[:, None].expand(n + 1, B * reps, T)
        else:
            times = model_grid[:, None].expand(n + 1, B * reps)
        self.times = times.unbind(0)  # one op for all the per-step views
        self.single = times[:, :B].unbind(0) if reps > 1 else self.times
        self.zero_star = cfg_zero_star
        self.states = states
        if cache is not None:
            for key in ("cond", "uncond"):
                states[key] = BranchCache(cache)

    def _one(self, x, args, cond, branch: str, mode: str, i: int) -> Tensor:
        if branch in self.states:
            st = self.states[branch]
            st.mode, st.step = mode, i
            return _checked(self.model(x, *args, cond, cache=st), x)
        return _checked(self.model(x, *args, cond), x)

    def __call__(self, x: Tensor, i: int, uncond: bool, r: Optional[int] = None,
                 modes: tuple[str, str] = ("all", "all")):
        """(c, u) at grid index i, u None when `uncond` is False (meanflow: (r, t) = (grid[r],
        grid[i]))."""
        one = self.single
        a = (one[r], one[i]) if r is not None else (one[i],)
        B = self.B
        if not uncond:
            if not self.states:
                return _checked(self.model(x, *a, self.cond), x), None
            return self._one(x, a, self.cond, "cond", modes[0], i), None
        if self.batched:
            args = (self.times[r], self.times[i]) if r is not None else (self.times[i],)
            out = self.model(torch.cat([x, x]), *args, self.cond2)
            if not isinstance(out, Tensor) or out.shape[0] != 2 * B:
                raise ValueError(f"model must return [2B={2 * B}, ...] for the batched CFG "
                                 f"input, got {getattr(out, 'shape', type(out).__name__)}")
            c, u = out.chunk(2)
            c, u = _checked(c, x), _checked(u, x)
        else:
            c = self._one(x, a, self.cond, "cond", modes[0], i)
            u = self._one(x, a, self.uncond, "uncond", modes[1], i)
        if self.zero_star:
            alpha = ops.cfg_zero_star_scale(c, u).to(x.dtype)
            u = u * alpha.view(-1, *([1] * (u.ndim - 1)))
        return c, u


class _Reuse:
    """Guidance-reuse state of one call: d (float32), the cond output of the last refresh, and
    the adaptive decision for the next step (one scalar read back per adaptive step)."""

    def __init__(self, policy):
        self.policy = policy
        self.d = self.c_ref = None
        self.refresh_next = True
        self.reused = 0

    def wants_uncond(self, branch: str) -> bool:
        if branch == "adaptive":
            return self.refresh_next or self.reused >= self.policy.max_reuse
        return branch == "cfg"

    def step(self, x, c, u, scale, s, sn, adaptive_next: bool) -> Tensor:
        st = {} if adaptive_next else None
        if u is not None:
            prev = self.d
            x, self.d = ops.guided_euler_step_refresh(x, c, u, scale, s, sn, prev=prev, stats=st)
            self.c_ref, self.reused = c, 0
            base = "d_norm"
            moved_default = prev is None
        else:
            x = ops.reused_guided_euler_step(x, c, self.d, scale, s, sn, prev=self.c_ref,
                                             stats=st)
            self.reused += 1
            base = "cond_norm"
            moved_default = False
        if st is not None:
            if moved_default:
                self.refresh_next = True
            else:
                rel = (st["change"] / st[base].clamp_min(1e-12)).max()
                self.refresh_next = bool(rel > self.policy.tol)   # the one host read per step
        return x


def sample(model: Callable, noise: Tensor, *, scheduler=None,
           sigmas: Optional[Union[Tensor, Sequence[float]]] = None, steps: int = 50,
           solver: str = "euler", guidance_scale: Union[float, Tensor] = 1.0, cond=None,
           uncond=None, batch_cfg: bool = True, rescale: str = "none",
           norm_dim: Optional[int] = None, cfg_zero_star: bool = False,
           cfg_zero_init_steps: int = 0,
           guidance_interval: Optional[tuple[float, float]] = None, eta: float = 1.0,
           shift: float = 1.0, first_frame: Optional[Tensor] = None,
           x_init: Optional[Tensor] = None, denoising_strength: float = 1.0,
           seed: Optional[int] = None, recorder: Optional[DiagnosticsRecorder] = None,
           progress: bool = False,
           callback: Optional[Callable[[int, Tensor], None]] = None,
           guidance_reuse=None, cache=None, plan: Optional[Plan] = None,
           sequence_parallel=None, _cache_states: Optional[dict] = None) -> Tensor:
    """Integrate a flow model from `noise` (sigma = grid[0]) to the grid's last sigma.

    model: `model(x, sigma[B] (or [B, T] with first_frame), cond) -> v` (solver "meanflow":
    `model(z, r[B], t[B], cond) -> u`). noise: `[B, ...]`, also the output's dtype/device.
    Grid: `sigmas` (`[N + 1]`, ends with the final sigma) if given, else
    `scheduler.sigma_grid(device)` (call its `set_timesteps` first; the "Wan-official" template
    gives Wan's own grid, and its model then sees the integer timesteps / 1000, as in Wan),
    else `linspace(denoising_strength, 0, steps + 1)` with `shift`.
    Guidance (when `uncond` is given or guidance_scale is not 1): `v = u + s (c - u)` with
    `rescale` / `norm_dim` as `ops.cfg_combine`; one batched forward over `cat([cond, uncond])`
    when both are tensors of the same shape and `batch_cfg` (and no step cache), two forwards
    otherwise. cfg_zero_star: CFG-Zero*'s optimised scale (uncond scaled by <c,u>/(||u||^2+1e-8))
    and the first `cfg_zero_init_steps` steps with zero velocity.
    guidance_interval=(lo, hi), 0 <= lo <= hi <= 1: guidance only where lo <= sigma <= hi;
    outside it the unconditional forward is not run (decided on the host from the grid before
    the loop: one read of the grid, no per-step sync). guidance_reuse: a
    `fmrt.guidance.GuidanceReuse` / `AdaptiveGuidanceReuse` (solver "euler", rescale "none"):
    the unconditional forward only on refresh steps, `v = c + (s - 1) d` in between. cache: a
    `fmrt.cache.FirstBlockCache` / `MagCache` step cache (the model must take `cache=`, as
    fmrt's DiT does); each branch keeps its own state. plan: a precomputed `make_plan` result
    (CapturedSampler passes one; it must match the other arguments).
    x_init: img2img / video2video, the start is `(1 - s0) x_init + s0 noise`.
    first_frame `[B, C, 1, H, W]`: TI2V, frame 0 pinned to it before the loop and after every
    step, and the model gets per-frame sigmas `[B, T]` with frame 0 at 0. eta, seed: the SDE
    ("euler_maruyama"). recorder: receives the guidance statistics of each step that runs both
    branches. progress: tqdm. callback(i, x): called after step i with the new x (a device
    tensor; not read back).
    sequence_parallel: the `fmrt.parallel.SequenceParallel` of a model enabled with
    `sharded_io=True` (noise, x_init and first_frame: the full tensors, the same on every rank
    of the group): the loop runs on this rank's shard of the latent (`shard_latent`, a block of
    token rows), the model takes and returns shards, the steps run on the shard with no
    communication, and the final latent is gathered on every rank (callback sees the shard).
    Options that need whole-sample statistics or per-rank decisions are refused (ValueError).
    """
    _check_args(model, noise, steps, solver, guidance_scale, eta, recorder, denoising_strength,
                x_init, first_frame, cond, uncond, rescale, norm_dim, guidance_interval,
                cfg_zero_init_steps, callback, guidance_reuse, cache)
    if scheduler is not None and sigmas is not None:
        raise ValueError("give scheduler or sigmas, not both")
    if (scheduler is not None or sigmas is not None) and denoising_strength != 1.0:
        raise ValueError("denoising_strength shapes the default grid only: with a scheduler pass "
                         "it to scheduler.set_timesteps(steps, denoising_strength=...); with "
                         "sigmas, start the grid at the strength")
    ops.check_seed("seed", seed)
    guided = (uncond is not None or isinstance(guidance_scale, Tensor)
              or float(guidance_scale) != 1.0)
    if recorder is not None and not guided:
        raise ValueError("recorder needs guidance (an uncond or a guidance_scale != 1)")
    if (guidance_reuse is not None or cache is not None) and cfg_zero_star:
        raise ValueError("cfg_zero_star does not combine with guidance_reuse or cache")
    grid = _grid(noise, scheduler, sigmas, steps, shift, denoising_strength)
    model_grid = _model_grid(scheduler, grid) if sigmas is None else grid
    n = grid.numel() - 1
    if plan is None:
        host = grid[:n].tolist() if guidance_interval is not None else None  # one read
        plan = make_plan(n, host, guided=guided, guidance_interval=guidance_interval,
                         guidance_reuse=guidance_reuse, cache=cache)
    elif not isinstance(plan, Plan) or len(plan) != n:
        raise ValueError(f"plan must be a Plan of {n} steps (make_plan), got "
                         f"{type(plan).__name__}")
    sp = sequence_parallel
    if sp is not None:
        _check_sharded(sp, solver, rescale, norm_dim, recorder, cfg_zero_star, plan)
        noise, x_init, first_frame = (None if t is None else sp.shard_latent(t)
                                      for t in (noise, x_init, first_frame))
    tri = use_triton(noise)  # dispatch once; the steps below skip the per-op checks
    states = _cache_states if _cache_states is not None else {}
    evaluate = _Model(model, noise, model_grid, cond, uncond, guided=guided, batch_cfg=batch_cfg,
                      first_frame=first_frame, cfg_zero_star=cfg_zero_star, cache=cache,
                      states=states)
    loop = _Loop(plan, grid, evaluate, noise, solver=solver, scale=guidance_scale,
                 rescale=rescale, norm_dim=norm_dim, tri=tri, first_frame=first_frame,
                 x_init=x_init, zero_steps=cfg_zero_init_steps if cfg_zero_star else 0,
                 reuse=guidance_reuse, eta=eta, seed=seed)
    x = loop.start()
    it = range(n)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=n, desc=f"fmrt {solver}")
    for i in it:
        stats = {} if (recorder is not None and loop.runs_uncond(i)) else None
        x = loop.pin(loop.step(x, i, stats))
        if stats is not None:
            recorder.record(i, stats)
        if callback is not None:
            callback(i, x)
    return x if sp is None else sp.gather_latent(x)


def _check_sharded(sp, solver, rescale, norm_dim, recorder, cfg_zero_star, plan) -> None:
    """ValueError for what sharded sampling cannot run without extra communication: per-sample
    statistics (rescale "norm" per sample, CFG-Zero*, diagnostics), per-rank host decisions
    (adaptive guidance reuse, first-block caching) and the SDE's shape-seeded noise."""
    if not getattr(sp, "sharded_io", False):
        raise ValueError("sequence_parallel needs the SequenceParallel of a model enabled with "
                         "enable_sequence_parallel(model, group, sharded_io=True)")
    bad = [(rescale == "norm" and norm_dim is None, "rescale='norm' per sample (its norm spans "
            "every rank; norm_dim=-1, per row, runs sharded)"),
           (cfg_zero_star, "cfg_zero_star (a per-sample dot product)"),
           (recorder is not None, "recorder (per-sample guidance statistics)"),
           (solver == "euler_maruyama", "solver 'euler_maruyama' (its noise is seeded by shape)"),
           (not plan.static, "adaptive guidance reuse or first-block caching (each rank would "
            "decide from its own tokens)")]
    for cond, what in bad:
        if cond:
            raise ValueError(f"sharded sampling (sequence_parallel=) does not support {what}; "
                             f"sample with a model enabled with sharded_io=False instead")


class _Loop:
    """Executes a plan: one solver step per grid index (`step`), the model calls through
    `_Model`, guidance reuse through `_Reuse`, TI2V pinning. Nothing here reads the device back
    except the adaptive policy's one scalar per step (and first-block caching's probe)."""

    def __init__(self, plan: Plan, grid: Tensor, evaluate: _Model, noise: Tensor, *, solver,
                 scale, rescale, norm_dim, tri, first_frame, x_init, zero_steps, reuse, eta,
                 seed):
        self.plan, self.grid, self.evaluate, self.noise = plan, grid, evaluate, noise
        self.n = grid.numel() - 1
        self.solver, self.scale, self.rescale, self.norm_dim, self.tri = (solver, scale, rescale,
                                                                          norm_dim, tri)
        self.row = noise.shape[-1] if (rescale == "norm" and norm_dim is not None) else 0
        self.first_frame, self.x_init, self.zero_steps = first_frame, x_init, zero_steps
        self.dtype = noise.dtype
        self.reuse = _Reuse(reuse) if reuse is not None else None
        self.eta = float(eta)
        self.sig = grid.unbind(0)  # the per-step sigma views in one op
        self._step = {"euler": self.euler, "meanflow": self.euler, "heun": self.heun,
                      "euler_maruyama": self.sde, "unipc": self.unipc}[solver]
        if solver == "euler_maruyama":
            self.seed = ops.seed_tensor(seed, noise.device)  # no host round trip per step
        if solver == "unipc":
            self.co, self.orders = unipc_coefficients(grid), unipc_orders(self.n)
            self.m_prev = self.m_prev2 = self.x_prev = None
        # The torch reference path on a CPU grid: the plain Euler step (guided by a float scale,
        # or not) is the reference's math with its sigma difference as a host float: lerp + add.
        self.host_h = None
        if (not tri and grid.device.type == "cpu" and solver == "euler" and rescale == "none"
                and reuse is None and not isinstance(scale, Tensor)
                and self.dtype in (torch.float32, torch.float64)):
            self.host_h = (grid[1:] - grid[:-1]).tolist()
            self.g = float(scale)

    # -- helpers -------------------------------------------------------------------------------
    def start(self) -> Tensor:
        x = self.noise
        if self.x_init is not None:
            x = ref.add_noise(self.x_init.to(self.dtype), self.grid[0], self.noise)[0]
        return self.pin(x)

    def pin(self, x: Tensor) -> Tensor:
        if self.first_frame is None:
            return x
        x = x.clone() if x is self.noise or x is self.x_init else x
        x[:, :, :1] = self.first_frame.to(self.dtype)
        return x

    def runs_uncond(self, i: int) -> bool:
        b = self.plan.branches[i]
        return self.reuse.wants_uncond(b) if self.reuse is not None else b == "cfg"

    def combine(self, c, u, i, stats=None) -> Tensor:
        if u is None:
            return c
        return ops._cfg_combine(c, u, self.scale, self.rescale, self.norm_dim, stats,
                                self.grid[i] if stats is not None else None, self.row, self.tri)

    def model(self, x, i, stats):
        """The velocity at step i (zero in CFG-Zero*'s first steps; stats recorded anyway)."""
        c, u = self.evaluate(x, i, self.runs_uncond(i), None, self.plan.blocks[i])
        v = self.combine(c, u, i, stats)
        return torch.zeros_like(v) if i < self.zero_steps else v

    def step(self, x: Tensor, i: int, stats: Optional[dict]) -> Tensor:
        return self._step(x, i, stats)

    # -- solvers -------------------------------------------------------------------------------
    def euler(self, x, i, stats):
        s, sn = self.sig[i], self.sig[i + 1]
        with_u = self.runs_uncond(i)
        r = i + 1 if self.solver == "meanflow" else None
        c, u = self.evaluate(x, i, with_u, r, self.plan.blocks[i])
        if self.reuse is not None and self.plan.branches[i] != "cond":
            nxt = i + 1 < self.n and self.plan.branches[i + 1] == "adaptive"
            if stats is not None:
                self.combine(c, u, i, stats)
            return self.reuse.step(x, c, u, self.scale, s, sn, nxt)
        if i < self.zero_steps:  # CFG-Zero*'s zero-init step: x stays (statistics recorded)
            if stats is not None:
                self.combine(c, u, i, stats)
            c, u = torch.zeros_like(c), None
        if self.host_h is not None and stats is None:
            return x.add(c if u is None else torch.lerp(u, c, self.g), alpha=self.host_h[i])
        if u is not None:
            return ops._guided_euler_step(x, c, u, self.scale, s, sn, self.rescale,
                                          self.norm_dim, stats, self.row, self.tri)
        return ops._euler_step(x, c, s, sn, self.tri)

    def heun(self, x, i, stats):
        s, sn = self.sig[i], self.sig[i + 1]
        v1 = self.model(x, i, stats)
        x_e = self.pin(ops._euler_step(x, v1, s, sn, self.tri))
        if i == self.n - 1:
            return x_e
        c2, u2 = self.evaluate(x_e, i + 1, self.runs_uncond(i + 1))
        v2 = torch.zeros_like(c2) if i < self.zero_steps else self.combine(c2, u2, i + 1)
        v_avg = (0.5 * (v1.float() + v2.float())).to(self.dtype)
        return ops._euler_step(x, v_avg, s, sn, self.tri)

    def sde(self, x, i, stats):
        v = self.model(x, i, stats)
        return ops._sde_step(x, v, self.sig[i], self.sig[i + 1], self.eta, None,
                             _step_seed(self.seed, i), False, self.tri)

    def unipc(self, x, i, stats):
        co, orders = self.co, self.orders
        v = self.model(x, i, stats)
        m = x.float() - self.sig[i] * v.float()  # flow prediction -> x0
        if i > 0:  # corrector of x_i with the new model output
            j = i - 1
            xf = co["A"][j] * self.x_prev + co["K"][j] * self.m_prev
            if orders[j] == 2:
                xf = xf + co["K"][j] * (co["c0"][j] * (self.m_prev2 - self.m_prev) / co["r"][j]
                                        + co["c1"][j] * (m - self.m_prev))
            else:
                xf = xf + co["K"][j] * 0.5 * (m - self.m_prev)
            x = self.pin(xf.to(self.dtype))
        self.m_prev2, self.m_prev = self.m_prev, m
        self.x_prev = x.float()
        xf = co["A"][i] * self.x_prev + co["K"][i] * m
        if orders[i] == 2:
            xf = xf + co["K"][i] * 0.5 * (self.m_prev2 - m) / co["r"][i]
        return xf.to(self.dtype)


def _static_plan(noise: Tensor, kwargs: dict) -> Plan:
    """The plan of `sample(model, noise, **kwargs)` for a captured loop (static only)."""
    grid = kwargs["sigmas"]
    scale = kwargs.get("guidance_scale", 1.0)
    guided = (kwargs.get("uncond") is not None or isinstance(scale, Tensor)
              or float(scale) != 1.0)
    interval = kwargs.get("guidance_interval")
    n = grid.numel() - 1
    plan = make_plan(n, grid[:n].tolist() if interval is not None else None, guided=guided,
                     guidance_interval=interval, guidance_reuse=kwargs.get("guidance_reuse"),
                     cache=kwargs.get("cache"))
    if not plan.static:
        raise ValueError("CapturedSampler needs a static plan: adaptive guidance reuse and "
                         "first-block caching decide on the host at every step")
    return plan


class CapturedSampler:
    """A whole `sample` call captured once in a CUDA graph, then replayed: one graph launch per
    call, no per-step host cost. The model must be capturable (static shapes, no host syncs).

        sampler = CapturedSampler(model, noise_like, sigmas=grid_on_cuda, solver=..., ...)
        x = sampler(noise)          # copies noise into the static input, replays, clones out

    `sigmas` must be a CUDA tensor (use `scheduler.sigma_grid(device)`); cond, uncond,
    guidance_scale, first_frame, x_init and a 0-d device `seed` tensor are captured by reference:
    update them in place between calls (an int seed replays the same noise every call).
    """

    def __init__(self, model: Callable, noise: Tensor, *, warmup: int = 1, **kwargs) -> None:
        ops.check_float_tensor("noise", noise)
        if not noise.is_cuda:
            raise ValueError("CapturedSampler needs CUDA tensors (noise is on "
                             f"{noise.device})")
        sig = kwargs.get("sigmas")
        if kwargs.get("scheduler") is not None or not isinstance(sig, Tensor) or not sig.is_cuda:
            raise ValueError("CapturedSampler needs sigmas= as a CUDA tensor "
                             "(scheduler.sigma_grid(device)), not a scheduler or a list")
        for key in ("progress", "recorder", "callback"):
            if kwargs.get(key):
                raise ValueError(f"{key} cannot be used inside a captured sampling loop")
        kwargs["plan"] = _static_plan(noise, kwargs)  # decided here: no host read in capture
        self.noise = noise.clone()
        stream = torch.cuda.Stream(device=noise.device)
        stream.wait_stream(torch.cuda.current_stream(noise.device))
        with torch.cuda.stream(stream):  # compile the kernels, warm the allocator
            for _ in range(max(int(warmup), 1)):
                sample(model, self.noise, **kwargs)
        torch.cuda.current_stream(noise.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = sample(model, self.noise, **kwargs)

    def __call__(self, noise: Optional[Tensor] = None) -> Tensor:
        if noise is not None:
            ops.check_float_tensor("noise", noise)
            ops.check_same("noise", noise, "the captured noise", self.noise)
            self.noise.copy_(noise)
        self.graph.replay()
        return self.out.clone()


# ---------------------------------------------------------------------------------------------
# generating clips from an fmrt model file
# ---------------------------------------------------------------------------------------------

def checkpoint_sigma_grid(meta: dict, steps: int, shift: Optional[float] = None,
                          device=None) -> Tensor:
    """The sigma grid `[steps + 1]` of a model's recorded sampling setup (`meta["sample"]`:
    its FlowMatchScheduler template and shift; `shift` overrides the latter) on `device`."""
    from fmrt.schedule import FlowMatchScheduler
    s = meta.get("sample", {}) or {}
    sched = FlowMatchScheduler(s.get("template") or "Wan")
    k = shift if shift is not None else s.get("shift")
    sched.set_timesteps(steps, **({} if k is None else {"shift": k}))
    return sched.sigma_grid(device)


def recorded_guidance(meta: dict) -> float:
    """The guidance scale a model file records as its sampling default (1: none recorded)."""
    return float((meta.get("sample") or {}).get("guidance_scale") or 1.0)


def recorded_interval(meta: dict) -> Optional[tuple[float, float]]:
    """The guidance interval a model file records as its sampling default, or None."""
    iv = (meta.get("sample") or {}).get("guidance_interval")
    return None if iv is None else (float(iv[0]), float(iv[1]))


class _AutoGuided:
    """Autoguidance's network (Karras et al. 2024, "Guiding a diffusion model with a bad version
    of itself"): called with the condition object `guide_cond` it runs `guide` on `labels` (the
    same classes), with anything else `model`. `generate_clips` passes `guide_cond` as the
    sampler's unconditional condition, with separate (unbatched) CFG forwards, so that CFG's
    `v = u + s (c - u)` becomes `v = g + s (c - g)`, g the guide's velocity for the same class.
    The branch is told by object identity, not by the values: no device sync per call."""

    def __init__(self, model, guide, labels: Tensor):
        self.model, self.guide, self.labels = model, guide, labels
        self.guide_cond = labels.clone()

    def __call__(self, x: Tensor, sigma, cond, **kw) -> Tensor:
        if cond is self.guide_cond:
            return self.guide(x, sigma, self.labels, **kw)
        if isinstance(cond, Tensor) and cond.shape[0] != self.labels.shape[0]:
            raise ValueError("autoguidance runs the model and its guide separately: a batched "
                             "CFG call reached it")
        return self.model(x, sigma, cond, **kw)


def check_guide_model(model, guide) -> None:
    """A guide for autoguidance must take the model's inputs: same classes, channels, patch
    size and time inputs (both flow models, or both MeanFlow models)."""
    a, b = model.config, guide.config
    for field in ("num_classes", "in_channels", "out_channels", "patch_size", "meanflow"):
        if getattr(a, field) != getattr(b, field):
            raise ValueError(f"the guide model's {field} ({getattr(b, field)}) is not the "
                             f"model's ({getattr(a, field)})")


@torch.no_grad()
def generate_clips(model, meta: dict, labels: Tensor, *, steps: int = 20, solver: str = "euler",
                   guidance_scale: float = 1.0, seed: int = 0, shift: Optional[float] = None,
                   device=None, dtype: Optional[torch.dtype] = None,
                   noise: Optional[Tensor] = None, clamp: bool = True,
                   guidance_interval: Optional[Sequence[float]] = None,
                   guide_model=None, **sample_kwargs) -> Tensor:
    """Sample clips of classes `labels` `[N]` from a class-conditional DiT loaded with
    `fmrt.checkpoint.load_model` (`meta`: its metadata): noise from `seed` (sample i is the i-th
    draw of one CPU generator; `noise` `[N, C, T, H, W]`: use this noise instead), the grid of
    the model's scheduler template and shift over `steps` steps, CFG against the null class
    when guidance_scale != 1, only where lo <= sigma <= hi when a guidance interval applies:
    `guidance_interval` (lo, hi), or else the model's recorded one (`meta["sample"]
    ["guidance_interval"]`, see `fmrt.checkpoint.with_sampling_defaults`); (0, 1) guides every
    step. `guide_model`: autoguidance instead of CFG (Karras et al. 2024): the guided velocity
    is `g + guidance_scale (c - g)` with g this weaker model's velocity for the same classes
    (`check_guide_model`; Euler-type solvers, not meanflow), as many model calls as CFG; the
    guidance interval applies as for CFG. Other keyword arguments (recorder, progress, ...) go
    to `sample`.
    Returns float32 `[N, C, T, H, W]`, clamped to [-1, 1] unless clamp=False."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shape = tuple((meta.get("sample") or {}).get("sample_shape") or ())
    if len(shape) != 4:
        raise ValueError("checkpoint has no sample_shape: cannot tell the clip size")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    n = labels.shape[0]
    if noise is None:
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((n, *shape), generator=g)
    elif tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must be {[n, *shape]}, got {list(noise.shape)}")
    sigmas = checkpoint_sigma_grid(meta, steps, shift, device)
    uncond = torch.full_like(labels, int(model.config.num_classes))
    dt = dtype or next(model.parameters()).dtype
    if guide_model is not None:
        if solver == "meanflow":
            raise ValueError("guide_model (autoguidance) runs with the Euler-type solvers, "
                             "not meanflow")
        check_guide_model(model, guide_model)
        if guidance_scale != 1.0:
            model = _AutoGuided(model, guide_model, labels)
            uncond = model.guide_cond
            sample_kwargs["batch_cfg"] = False
    if solver == "meanflow":
        def net(z, r, t, c):   # the sampler's u(z, r, t) convention -> the DiT's
            return model(z, t, c, r=r)
    else:
        net = model
    if guidance_scale != 1.0:
        iv = recorded_interval(meta) if guidance_interval is None else guidance_interval
        if iv is not None:
            sample_kwargs["guidance_interval"] = tuple(iv)
    x = sample(net, noise.to(device=device, dtype=dt), sigmas=sigmas, solver=solver,
               guidance_scale=guidance_scale, cond=labels,
               uncond=uncond if guidance_scale != 1.0 else None, seed=seed, **sample_kwargs)
    return x.float().clamp(-1, 1) if clamp else x.float()
