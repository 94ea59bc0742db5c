"""FlowMatchScheduler: sigma grids, shifts, the training weight table and timestep samplers.

Drop-in for DiffSynth-Studio's `diffsynth.diffusion.flow_match.FlowMatchScheduler` (same method
names, same numbers to 1e-6), without its host syncs: every lookup from a timestep to a grid
index is an argmin computed on the data's device, and every method also takes the grid index
directly (`index=`), so a sampling loop never reads a tensor back to the host.

Convention (SPEC.md): sigma in [0, 1], 1 = noise, `x_t = (1 - sigma) x0 + sigma * noise`,
`timestep = 1000 * sigma`; the grid runs from high sigma to low, `sigma_grid()` appends the
final 0.

Templates (DiffSynth's `set_timesteps_*` functions, plus Wan's own grid):
  "Wan"          s = linspace(strength, 0, N + 1)[:-1], linear shift k (default 5)
  "FLUX.1"       s = linspace(start, 0.003/1.002, N), linear shift k (default 3)
  "Qwen-Image"   s = linspace(strength, 0, N + 1)[:-1], exponential shift mu (default 0.8,
                 `exponential_shift_mu=`, or `dynamic_shift_len=` on the line 256 -> 0.5,
                 8192 -> 0.9), then the terminal stretch to 0.02
  "FLUX.2"       s = linspace(start, 1/N, N), exponential shift mu (default 0.8, or the
                 empirical mu of (`dynamic_shift_len`, N))
  "Wan-official" Wan2.1's FlowUniPCMultistepScheduler grid: linspace(0.999 * strength, 0,
                 N + 1)[:-1] in float64, linear shift k (default 5), integer timesteps
                 (truncated 1000 * sigma, stored as float32), sigmas rounded to float32.
where start = sigma_min + (1 - sigma_min) * denoising_strength. Linear shift:
`k s / (1 + (k - 1) s)`; exponential shift: `e^mu / (e^mu + 1/s - 1)` (equal for mu = ln k).

Training (`set_timesteps(1000, training=True)`) builds DiffSynth's Gaussian weight table over
the grid: `y = exp(-2 ((1000 sigma - 500) / 1000)^2)`, `y -= min(y)`, `w = 1000 y / sum(y)`, and
for a grid of N != 1000 entries `w = w * N / 1000 + (w * N / 1000)[1]`.

Timestep samplers (`sample_sigmas`) and the shift. Every sampler draws an *unshifted* sigma u
and returns `apply_shift(u)`, the template's shift of the last `set_timesteps` call:
  "uniform_index"  DiffSynth: a grid index uniform in [int(min_boundary N), int(max_boundary N))
                   of the current grid (the grid is already shifted, so the shift enters
                   through the grid, exactly as in DiffSynth; with Qwen-Image the terminal
                   stretch too).
  "uniform"        u ~ U[0, 1)
  "logit_normal"   u = sigmoid(N(logit_mean, logit_std))    (SD3 / MeanFlow)
  "mode"           u = 1 - U - s (cos^2(pi U / 2) - 1 + U)  (SD3 mode sampling, s = mode_scale)
  "cosmap"         u = 1 - 1 / (tan(pi U / 2) + 1)          (SD3 CosMap: density 2 / (pi (1 -
                   2u + 2u^2)))
then `sigma = apply_shift(u)`: the linear shift k or the exponential shift mu; the Qwen-Image
terminal stretch is a property of a finite grid and is not applied to continuous draws. u is
the sigma itself (1 = noise), as in the SD3 paper and MeanFlow. diffusers' SD3 training script
instead indexes its descending shifted grid with u (sigma ~ shift(1 - u)); the two agree in law
for "uniform", "mode", "cosmap" and logit_mean = 0, and the random draws are diffusers' own
(`compute_density_for_timestep_sampling` with the same generator gives the same u).
The boundaries select the same part of the schedule for every sampler: a fraction p of the way
along the grid from noise (index p N) is the unshifted sigma u = 1 - p, so the window is
u in [1 - max_boundary, 1 - min_boundary]; the continuous samplers map their u (in [0, 1]) onto
that window affinely, `u' = (1 - max_boundary) + (max_boundary - min_boundary) u` (the density
is squeezed into the window, not truncated; for "uniform" that is the same thing).

Loss weightings (`loss_weight(sigma, weighting)`): "table" (the Gaussian table entry of the
nearest grid sigma, looked up on sigma's device), "sigma_sqrt" (1 / sigma^2, diffusers),
"cosmap" (2 / (pi (1 - 2 sigma + 2 sigma^2)), diffusers), "none" (ones).

DiffSynth compatibility quirk: `FlowMatchScheduler(template, bf16_timestep_lookup=True)` casts
every looked-up timestep to bfloat16 before the nearest-index search, as DiffSynth's
`FlowMatchSFTLoss` does (`timestep.to(dtype=torch_dtype)` with bf16 models). With the 1000-step
Wan training grid only 294 distinct sigmas are then reachable, and the ~1% of indices whose
timestep rounds to 1000 train at sigma 1 with weight 0. `sample_sigmas("uniform_index")`
reproduces it (it returns the sigma DiffSynth would actually train on).
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fmrt import ops
from fmrt import reference as ref

Timestep = Union[float, int, Tensor]
Device = Union[str, torch.device, None]

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("uniform_index", "uniform", "logit_normal", "mode", "cosmap")
WEIGHTINGS = ("table", "sigma_sqrt", "cosmap", "none")
# mode sampling stays a monotone map of [0, 1] onto [0, 1] only for -1 <= s <= 1 / (pi/2 - 1).
MODE_SCALE_RANGE = (-1.0, 1.0 / (math.pi / 2.0 - 1.0))
# Wan2.1's FlowUniPCMultistepScheduler: sigma_max = float32(1 - 1/1000) read back as a float.
_WAN_SIGMA_MAX = 0.9990000128746033


@dataclass(frozen=True)
class TemplatePreset:
    """One model family's sigma grid (DiffSynth's `set_timesteps_<template>`)."""

    name: str
    sigma_min: Optional[float]      # lower end of the unshifted linspace; None = 1 / N (FLUX.2)
    sigma_max: float                # upper end at denoising_strength = 1
    drop_last: bool                 # linspace(start, min, N + 1)[:-1] (else linspace(.., N))
    shift_kind: str                 # "linear" (k) or "exponential" (mu)
    default_shift: float            # k for "linear", mu for "exponential"
    mu_rule: Optional[str] = None   # how dynamic_shift_len gives mu: "qwen_image", "flux2"
    shift_terminal: Optional[float] = None
    integer_timesteps: bool = False  # Wan-official: float64 grid, int timesteps
    kwargs: tuple[str, ...] = ("shift",)


TEMPLATES: dict[str, TemplatePreset] = {
    "Wan": TemplatePreset("Wan", 0.0, 1.0, True, "linear", 5.0),
    "FLUX.1": TemplatePreset("FLUX.1", 0.003 / 1.002, 1.0, False, "linear", 3.0),
    "Qwen-Image": TemplatePreset("Qwen-Image", 0.0, 1.0, True, "exponential", 0.8,
                                 mu_rule="qwen_image", shift_terminal=0.02,
                                 kwargs=("exponential_shift_mu", "dynamic_shift_len")),
    "FLUX.2": TemplatePreset("FLUX.2", None, 1.0, False, "exponential", 0.8, mu_rule="flux2",
                             kwargs=("dynamic_shift_len", "exponential_shift_mu")),
    "Wan-official": TemplatePreset("Wan-official", 0.0, _WAN_SIGMA_MAX, True, "linear", 5.0,
                                   integer_timesteps=True),
}


def qwen_image_mu(seq_len: float, base_seq_len: float = 256, max_seq_len: float = 8192,
                  base_shift: float = 0.5, max_shift: float = 0.9) -> float:
    """Qwen-Image's dynamic mu: the line through (base_seq_len, base_shift), (max_seq_len,
    max_shift), evaluated at seq_len (not clamped)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


def flux2_empirical_mu(seq_len: float, num_steps: int) -> float:
    """FLUX.2's empirical mu of (image sequence length, number of steps)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * seq_len + b2
    if seq_len > 4300:
        return float(m_200)
    m_10 = a1 * seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def mode_map(u: Tensor, scale: float = 1.29) -> Tensor:
    """SD3's mode sampling map of U ~ U[0, 1): `1 - U - scale (cos^2(pi U / 2) - 1 + U)`."""
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def cosmap_map(u: Tensor) -> Tensor:
    """SD3's CosMap map of U ~ U[0, 1): `1 - 1 / (tan(pi U / 2) + 1)`; the result has density
    `2 / (pi (1 - 2t + 2t^2))`."""
    return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)


@dataclass(frozen=True)
class Shift:
    """The map from an unshifted sigma u to the schedule's sigma."""

    kind: str      # "linear" or "exponential"
    value: float   # k or mu

    def __call__(self, u: Tensor) -> Tensor:
        if self.kind == "linear":
            k = self.value
            return k * u / (1 + (k - 1) * u)
        e = math.exp(self.value)
        return e / (e + (1 / u - 1))


@dataclass
class _DeviceGrid:
    sigmas: Tensor              # [N]
    timesteps: Tensor           # [N]
    grid: Tensor                # [N + 1], final 0
    weights: Optional[Tensor]   # [N] or None


def check_sigma_points(points, points_prob) -> tuple[tuple[float, ...], float]:
    """`sample_sigmas`' points / points_prob checked: (points as floats, probability). Both or
    neither: points in (0, 1] (no repeats) with 0 < points_prob <= 1, or () with 0."""
    if isinstance(points, (str, bytes, numbers.Real, Tensor)) or not hasattr(points, "__iter__"):
        raise TypeError(f"points must be a sequence of sigmas, got {type(points).__name__}")
    pts = tuple(_real("points", v) for v in points)
    p = _real("points_prob", points_prob)
    if not pts:
        if p != 0.0:
            raise ValueError(f"points_prob={points_prob} needs points (the sigmas to draw)")
        return pts, 0.0
    bad = [v for v in pts if not 0.0 < v <= 1.0]
    if bad:
        raise ValueError(f"points must be sigmas in (0, 1], got {bad[0]}")
    if len(set(pts)) != len(pts):
        raise ValueError(f"points must not repeat, got {list(pts)}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"points_prob must be in (0, 1] when points are given, got {points_prob}")
    return pts, p


def _mix_points(sigma: Tensor, pts: tuple, p: float, generator) -> Tensor:
    """Each entry of sigma replaced, with probability p, by a uniformly chosen point. The
    points enter as scalars (no host-to-device copy, so no sync per training step)."""
    if not pts:
        return sigma
    b, dev = sigma.shape[0], sigma.device
    pick = torch.rand((b,), device=dev, generator=generator) < p
    idx = torch.randint(0, len(pts), (b,), device=dev, generator=generator)
    for j, v in enumerate(pts):
        sigma = torch.where(pick & (idx == j), v, sigma)
    return sigma


def _real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, "
                         f"got {value}")
    return v


class FlowMatchScheduler:
    """DiffSynth-compatible flow-matching scheduler without host syncs.

    `sigmas` `[N]` float32 and `timesteps` `[N]` float32 (1000 * sigma; Wan-official: integers)
    live on the CPU; `sigma_grid(device)` and every lookup use per-device copies made once per
    `set_timesteps`. The constructor sets the 1000-step training grid (and its weight table) so
    a fresh scheduler can sample training sigmas at once; call `set_timesteps` to change it
    (an inference `set_timesteps(N)` drops the weight table: keep one scheduler for training
    and another for sampling).

    Stepping: `step(v, timestep, x)` (DiffSynth: nearest grid timestep), `step(v, None, x,
    index=i)` (int, 0-d or `[B]` int64 tensor), or by sigmas with
    `fmrt.ops.euler_step(x, v, grid[i], grid[i + 1])` on `grid = sigma_grid(device)`.
    Wan-official: Wan feeds its model the integer `timesteps[i]` (model sigma
    `timesteps[i] / 1000`) while its solver steps with `sigmas[i]`.
    """

    num_train_timesteps = NUM_TRAIN_TIMESTEPS

    def __init__(self, template: str = "FLUX.1", *, bf16_timestep_lookup: bool = False):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
        self.template = template
        self.preset = TEMPLATES[template]
        self.bf16_timestep_lookup = bool(bf16_timestep_lookup)
        self.sigmas: Tensor
        self.timesteps: Tensor
        self.linear_timesteps_weights: Optional[Tensor] = None
        self.training = False
        self.shift = Shift(self.preset.shift_kind, self.preset.default_shift)
        self._cache: dict[torch.device, _DeviceGrid] = {}
        self.set_timesteps(NUM_TRAIN_TIMESTEPS, training=True)

    # -----------------------------------------------------------------------------------------
    # grids
    # -----------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int = 100, denoising_strength: float = 1.0,
                      training: bool = False, **template_kwargs) -> None:
        """Build the N-entry grid (`sigmas`, `timesteps`); with `training=True` also the
        Gaussian weight table (`linear_timesteps_weights`, needs N >= 2).

        template_kwargs: "shift" (Wan, FLUX.1, Wan-official), "exponential_shift_mu" and
        "dynamic_shift_len" (Qwen-Image, FLUX.2); None means the template's default.
        """
        p = self.preset
        if isinstance(num_inference_steps, bool):
            raise TypeError("num_inference_steps must be an int, got bool")
        try:
            n = operator.index(num_inference_steps)
        except TypeError:
            raise TypeError(f"num_inference_steps must be an int, got "
                            f"{type(num_inference_steps).__name__}") from None
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        strength = _real("denoising_strength", denoising_strength)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"denoising_strength must lie in (0, 1], got {denoising_strength}")
        for key in template_kwargs:
            if key not in p.kwargs:
                raise TypeError(f"set_timesteps() got an unexpected keyword argument {key!r} for "
                                f"template {p.name!r} (accepted: {', '.join(p.kwargs)})")
        if training and n < 2:
            raise ValueError(f"num_inference_steps must be >= 2 with training=True (the weight "
                             f"table needs two entries), got {n}")
        shift = self._shift_from(p, n, template_kwargs)

        dtype = torch.float64 if p.integer_timesteps else torch.float32
        sigma_min = 1.0 / n if p.sigma_min is None else p.sigma_min
        start = sigma_min + (p.sigma_max - sigma_min) * strength
        if p.drop_last:
            s = torch.linspace(start, sigma_min, n + 1, dtype=dtype)[:-1]
        else:
            s = torch.linspace(start, sigma_min, n, dtype=dtype)
        s = shift(s)
        if p.shift_terminal is not None:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - p.shift_terminal))
        if p.integer_timesteps:
            timesteps = (s * NUM_TRAIN_TIMESTEPS).to(torch.int64).to(torch.float32)
            s = s.to(torch.float32)
        else:
            timesteps = s * NUM_TRAIN_TIMESTEPS
        if not bool(torch.isfinite(s).all()):   # host-side CPU grid, built once
            raise ValueError(f"num_inference_steps={n}, denoising_strength={strength} give a "
                             f"degenerate {p.name} grid (non-finite sigmas)")
        self.sigmas, self.timesteps, self.shift = s.contiguous(), timesteps.contiguous(), shift
        self.training = bool(training)
        self.linear_timesteps_weights = self._weight_table(s) if training else None
        self._cache = {}

    @staticmethod
    def _shift_from(p: TemplatePreset, n: int, kw: dict) -> Shift:
        if p.shift_kind == "linear":
            k = kw.get("shift")
            return Shift("linear", p.default_shift if k is None
                         else _real("shift", k, positive=True))
        mu = kw.get("exponential_shift_mu")
        seq_len = kw.get("dynamic_shift_len")
        if mu is not None:
            return Shift("exponential", _real("exponential_shift_mu", mu))
        if seq_len is not None:
            seq_len = _real("dynamic_shift_len", seq_len, positive=True)
            mu = (qwen_image_mu(seq_len) if p.mu_rule == "qwen_image"
                  else flux2_empirical_mu(seq_len, n))
            return Shift("exponential", mu)
        return Shift("exponential", p.default_shift)

    @staticmethod
    def _weight_table(sigmas: Tensor) -> Tensor:
        """DiffSynth's Gaussian table over x = 1000 * sigma; `[N]` float32."""
        steps = NUM_TRAIN_TIMESTEPS
        x = sigmas * steps
        y = torch.exp(-2 * ((x - steps / 2) / steps) ** 2)
        y = y - y.min()
        w = y * (steps / y.sum())
        n = sigmas.shape[0]
        if n != steps:   # DiffSynth's empirical rescale for other table lengths
            w = w * (n / steps)
            w = w + w[1]
        return w

    def _on(self, device: Device) -> _DeviceGrid:
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type == "cuda" and dev.index is None:   # one cache entry per physical device
            dev = torch.device("cuda", torch.cuda.current_device())
        g = self._cache.get(dev)
        if g is None:
            s = self.sigmas.to(dev)
            w = self.linear_timesteps_weights
            g = _DeviceGrid(s, self.timesteps.to(dev), torch.cat([s, s.new_zeros(1)]),
                            None if w is None else w.to(dev))
            self._cache[dev] = g
        return g

    def sigma_grid(self, device: Device = None) -> Tensor:
        """The N sigmas then a final 0.0: `[N + 1]` float32 on `device` (default CPU)."""
        return self._on(device).grid.clone()

    def apply_shift(self, u: Tensor) -> Tensor:
        """The template's shift (of the last `set_timesteps`) applied to unshifted sigmas u."""
        return self.shift(u)

    # -----------------------------------------------------------------------------------------
    # timestep -> grid index, on the device
    # -----------------------------------------------------------------------------------------

    def timestep_index(self, timestep: Timestep, device: Device = None) -> Tensor:
        """Index of the nearest grid timestep for each element of `timestep` (any shape; a
        float gives a 0-d result), as an int64 tensor on the timestep's device (a float's: on
        `device`, default CPU). An argmin of |timesteps - t| on the device: no host sync.
        With `bf16_timestep_lookup` the timestep is first rounded to bfloat16 (DiffSynth).
        The distances are computed in the dtype DiffSynth's `timesteps - timestep` has under
        torch's promotion: a float or a 0-d tensor in the grid's dtype (float32; a timestep
        halfway between two entries picks DiffSynth's), a `[B]` tensor in the promotion of both;
        ties take the first entry."""
        if isinstance(timestep, bool) or not isinstance(timestep, (numbers.Real, Tensor)):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        if isinstance(timestep, Tensor):
            t = timestep if device is None else timestep.to(device, non_blocking=True)
            dev = t.device
        else:
            t = float(timestep)
            dev = torch.device("cpu") if device is None else torch.device(device)
        if self.bf16_timestep_lookup:
            t = torch.as_tensor(t, dtype=torch.float64, device=dev).to(torch.bfloat16)
        grid = self._on(dev).timesteps
        if isinstance(t, Tensor) and t.ndim > 0:
            return (grid - t.unsqueeze(-1)).abs().argmin(dim=-1)
        return (grid - t).abs().argmin(dim=-1)

    def _index(self, timestep, index, device: torch.device) -> Tensor:
        """The grid index for a step/add_noise call: `index` if given, else the lookup.
        Callers gather with `Tensor.take`: indexing with a 0-d integer tensor (`t[idx]`) would
        read idx back to the host."""
        if index is None:
            if timestep is None:
                raise ValueError("pass a timestep or an index")
            return self.timestep_index(timestep, device)
        n = self.sigmas.shape[0]
        if isinstance(index, Tensor):
            if index.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"index must be an int64 tensor, got {index.dtype}")
            if index.ndim > 1:
                raise ValueError(f"index must be an int, 0-d or [B] tensor, got shape "
                                 f"{tuple(index.shape)}")
            return index.to(device=device, dtype=torch.int64, non_blocking=True)
        if isinstance(index, bool):
            raise TypeError("index must be an int or a tensor, got bool")
        i = operator.index(index)
        if not 0 <= i < n:
            raise ValueError(f"index must lie in [0, {n}), got {i}")
        return torch.full((), i, dtype=torch.int64, device=device)

    @staticmethod
    def _check_per_sample(name: str, t, x: Tensor) -> None:
        if isinstance(t, Tensor) and t.ndim > 0:
            batch = x.shape[0] if x.ndim else 1
            if t.ndim != 1 or t.shape[0] not in (1, batch):
                raise ValueError(f"{name} must be a float, 0-d, [1] or [B={batch}] tensor, got "
                                 f"shape {tuple(t.shape)}")

    # -----------------------------------------------------------------------------------------
    # DiffSynth API
    # -----------------------------------------------------------------------------------------

    def add_noise(self, original_samples: Tensor, noise: Tensor, timestep: Optional[Timestep],
                  *, index: Union[int, Tensor, None] = None) -> Tensor:
        """`(1 - sigma) x0 + sigma noise` at the grid sigma nearest to `timestep` (or at
        `sigmas[index]`). x0, noise: `[B, ...]`; timestep/index: scalar, 0-d, [1] or [B]
        (per sample). Returns x0's dtype (fp32 math, one rounding)."""
        ops.check_float_tensor("original_samples", original_samples)
        ops.check_float_tensor("noise", noise)
        ops.check_same("noise", noise, "original_samples", original_samples)
        self._check_per_sample("timestep", timestep, original_samples)
        self._check_per_sample("index", index, original_samples)
        idx = self._index(timestep, index, original_samples.device)
        sigma = self._on(original_samples.device).sigmas.take(idx)
        return ops.noised_sample(original_samples, sigma, noise, None, return_target=False)[0]

    def training_target(self, sample: Tensor, noise: Tensor, timestep: Optional[Timestep] = None
                        ) -> Tensor:
        """The velocity target `noise - sample` (timestep unused, as in DiffSynth)."""
        ops.check_float_tensor("sample", sample)
        ops.check_float_tensor("noise", noise)
        ops.check_same("noise", noise, "sample", sample)
        return ref.flow_target(sample, noise)

    def training_weight(self, timestep: Optional[Timestep], *,
                        index: Union[int, Tensor, None] = None) -> Tensor:
        """The weight-table entry of the nearest grid timestep (or of `index`), float32 on the
        timestep's device (a float's: the CPU): 0-d for a float, a 0-d or a `[1]` timestep (as
        DiffSynth's, whose loss then stays a scalar), `[B]` for `[B > 1]`."""
        w = self._require_table()
        dev = timestep.device if isinstance(timestep, Tensor) else (
            index.device if isinstance(index, Tensor) else w.device)
        idx = self._index(timestep, index, dev)
        out = self._on(dev).weights.take(idx)
        return out.reshape(()) if out.numel() == 1 else out

    def step(self, model_output: Tensor, timestep: Optional[Timestep], sample: Tensor,
             to_final: bool = False, *, index: Union[int, Tensor, None] = None) -> Tensor:
        """One Euler step from the grid sigma nearest to `timestep` (or `sigmas[index]`) to the
        next one (0 after the last, or with to_final): `sample + (sigma' - sigma) model_output`.
        model_output, sample: same shape `[B, ...]` and dtype; timestep/index: scalar, 0-d,
        [1] or [B]. Everything stays on the sample's device (`fmrt.ops.euler_step`)."""
        ops.check_float_tensor("sample", sample)
        self._check_per_sample("timestep", timestep, sample)
        self._check_per_sample("index", index, sample)
        idx = self._index(timestep, index, sample.device)
        g = self._on(sample.device)
        sigma = g.sigmas.take(idx)
        sigma_next = torch.zeros_like(sigma) if to_final else g.grid.take(idx + 1)
        return ops.euler_step(sample, model_output, sigma, sigma_next)

    def return_to_timestep(self, timestep: Optional[Timestep], sample: Tensor,
                           sample_stablized: Tensor, *,
                           index: Union[int, Tensor, None] = None) -> Tensor:
        """The velocity that leads from `sample_stablized` to `sample` at the grid sigma:
        `(sample - sample_stablized) / sigma`, in sample's dtype."""
        ops.check_float_tensor("sample", sample)
        ops.check_float_tensor("sample_stablized", sample_stablized)
        ops.check_same("sample_stablized", sample_stablized, "sample", sample)
        self._check_per_sample("timestep", timestep, sample)
        self._check_per_sample("index", index, sample)
        idx = self._index(timestep, index, sample.device)
        sigma = ref.broadcast_sigma(self._on(sample.device).sigmas.take(idx), sample)
        dt = ref.compute_dtype(sample.dtype)
        return ((sample.to(dt) - sample_stablized.to(dt)) / sigma).to(sample.dtype)

    def _require_table(self) -> Tensor:
        if self.linear_timesteps_weights is None:
            raise RuntimeError("no training weight table: call set_timesteps(..., training=True)")
        return self.linear_timesteps_weights

    # -----------------------------------------------------------------------------------------
    # fmrt extras: training sigma samplers and loss weightings
    # -----------------------------------------------------------------------------------------

    def sample_sigmas(self, batch_size: int, *, sampler: str = "uniform_index",
                      generator: Optional[torch.Generator] = None, device: Device = None,
                      min_boundary: float = 0.0, max_boundary: float = 1.0,
                      logit_mean: float = 0.0, logit_std: float = 1.0,
                      mode_scale: float = 1.29, points: Sequence[float] = (),
                      points_prob: float = 0.0) -> Tensor:
        """Training sigmas, one per sample: `[batch_size]` float32 on `device` (default: the
        generator's device, else CPU). See the module docstring for each sampler and how the
        shift and the boundaries apply. Draws on the device: no host sync.

        points, points_prob: with probability `points_prob` a sample's sigma is instead one of
        `points` (sigmas in (0, 1], taken as given: no shift, no boundaries), each equally
        likely; typically the sigmas a few-step sampler evaluates the model at (1 and 0.5 for
        1- and 2-step Euler at shift 1), so that a few-step student spends its capacity where
        it is used. The draws for the mixture come after the sampler's own, so the sampler's
        sigmas for the same generator are unchanged where a point is not picked."""
        pts, p = check_sigma_points(points, points_prob)
        if isinstance(batch_size, bool):
            raise TypeError("batch_size must be an int, got bool")
        try:
            b = operator.index(batch_size)
        except TypeError:
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}") from None
        if b < 1:
            raise ValueError(f"batch_size must be >= 1, got {b}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        lo = _real("min_boundary", min_boundary)
        hi = _real("max_boundary", max_boundary)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"min_boundary and max_boundary must satisfy 0 <= min_boundary < "
                             f"max_boundary <= 1, got {min_boundary}, {max_boundary}")
        if generator is not None and device is None:
            device = generator.device
        dev = torch.device("cpu") if device is None else torch.device(device)
        if generator is not None and generator.device.type != dev.type:
            raise ValueError(f"generator is on {generator.device} but device is {dev}")

        if sampler == "uniform_index":
            n = self.sigmas.shape[0]
            i0, i1 = int(lo * n), int(hi * n)
            if i0 >= i1:
                raise ValueError(f"min_boundary={lo}, max_boundary={hi} select no index of the "
                                 f"{n}-entry grid")
            idx = torch.randint(i0, i1, (b,), generator=generator, device=dev)
            g = self._on(dev)
            if self.bf16_timestep_lookup:   # the index DiffSynth's add_noise really uses
                idx = self.timestep_index(g.timesteps.take(idx))
            return _mix_points(g.sigmas.take(idx), pts, p, generator)

        if sampler == "logit_normal":
            std = _real("logit_std", logit_std, positive=True)
            u = torch.normal(mean=_real("logit_mean", logit_mean), std=std, size=(b,),
                             device=dev, generator=generator)
            u = torch.sigmoid(u)
        else:
            if sampler == "mode":
                s = _real("mode_scale", mode_scale)
                if not MODE_SCALE_RANGE[0] <= s <= MODE_SCALE_RANGE[1]:
                    raise ValueError(f"mode_scale must lie in [{MODE_SCALE_RANGE[0]}, "
                                     f"{MODE_SCALE_RANGE[1]:.4f}] (a monotone map onto [0, 1]), "
                                     f"got {mode_scale}")
            u = torch.rand((b,), device=dev, generator=generator)
            if sampler == "mode":
                u = mode_map(u, s)
            elif sampler == "cosmap":
                u = cosmap_map(u)
        u = (1.0 - hi) + (hi - lo) * u
        return _mix_points(self.apply_shift(u.to(torch.float32)), pts, p, generator)

    def loss_weight(self, sigma: Union[float, Tensor], weighting: str = "table") -> Tensor:
        """Per-sample loss weight: float32 of sigma's shape on sigma's device.

        "table": the training table entry of the nearest grid sigma (argmin on the device);
        "sigma_sqrt": 1 / sigma^2; "cosmap": 2 / (pi (1 - 2 sigma + 2 sigma^2)); "none": 1."""
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (numbers.Real, Tensor)):
            raise TypeError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
        s = sigma if isinstance(sigma, Tensor) else torch.tensor(float(sigma))
        if not s.is_floating_point():
            raise TypeError(f"sigma must be a floating-point tensor, got {s.dtype}")
        s = s.to(torch.float32)
        if weighting == "table":
            self._require_table()
            g = self._on(s.device)
            return g.weights.take((g.sigmas - s.unsqueeze(-1)).abs().argmin(dim=-1))
        if weighting == "sigma_sqrt":
            return s ** -2.0
        if weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
        return torch.ones_like(s)
