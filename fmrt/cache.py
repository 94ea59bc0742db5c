"""Step caching for fmrt's DiT: reuse the transformer blocks' residual across sampling steps.

A model call runs `embed -> blocks -> head`; the blocks are nearly all of the compute. Between
neighbouring steps their total residual `R = blocks(h) - h` changes slowly, so on a *skipped*
call the blocks are replaced by `h + R_cached`. Two policies decide which calls skip:

- `FirstBlockCache(threshold)` (diffusers' FirstBlockCache / ParaAttention's "first block
  cache"): block 0 always runs; its residual r0 is the probe. With r0_prev the probe of the last
  *computed* call, the rest of the blocks are skipped when
  `mean|r0 - r0_prev| / mean|r0_prev| < threshold`, and the output is
  `out0 + (tail_out - out0)_cached`. The probe folds into block 0's work (two reductions over
  its output, no extra pass over the model); the decision reads one scalar back per call.
- `MagCache(ratios, threshold, max_skip, retention)` (MagCache, arXiv 2506.09045; diffusers'
  `apply_mag_cache`): `ratios[t]` is the calibrated mean over tokens of
  `||R_t|| / ||R_{t-1}||` (`calibrate_mag_ratios`). Before the loop the plan accumulates the
  ratio product and its error `sum |1 - prod|` over consecutive skipped steps and skips while
  the error stays <= threshold and at most `max_skip` steps in a row, never in the first
  `retention` fraction of the steps. The whole skip pattern is known before the loop: no probe,
  no sync, capturable. A skipped call runs no block at all.

Each branch (cond, uncond) has its own `BranchCache` state; they compose with guidance reuse
(on a reuse step only the cond branch runs, and only its state advances).
A model can be cached when it has `supports_step_cache = True` and takes `cache=` (fmrt's DiT);
`check_cacheable` gives the error for anything else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

BLOCK_MODES = ("all", "skip", "probe", "-")


def _check_float(name: str, value, lo: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= lo):
        raise ValueError(f"{name} must be a finite float >= {lo}, got {value}")


def _check_order(order) -> None:
    if isinstance(order, bool) or order not in (0, 1):
        raise ValueError(f"order must be 0 (reuse the residual) or 1 (extrapolate it linearly "
                         f"from the last two computed steps), got {order!r}")


@dataclass(frozen=True)
class FirstBlockCache:
    """Skip blocks 1.. when block 0's residual moved less than `threshold` (relative mean abs)
    since the last computed call. order 1: the skipped residual is extrapolated linearly in the
    step index from the last two computed calls (TaylorSeer's first order, on the residual)."""
    threshold: float = 0.05
    order: int = 0

    def __post_init__(self):
        _check_float("threshold", self.threshold)
        _check_order(self.order)

    def modes(self, n: int, branch: str) -> list[str]:
        return ["all"] + ["probe"] * (n - 1)


def nearest_interp(ratios: Sequence[float], n: int) -> list[float]:
    """A ratio list resampled to n steps by nearest index (diffusers' MagCache rule:
    idx = round(arange(n) * (L - 1) / (n - 1)); n = 1 takes the last)."""
    L = len(ratios)
    if L == n:
        return [float(r) for r in ratios]
    if n == 1:
        return [float(ratios[-1])]
    return [float(ratios[int(round(i * (L - 1) / (n - 1)))]) for i in range(n)]


@dataclass(frozen=True)
class MagCache:
    """Skip calls whose accumulated calibrated magnitude-ratio error stays <= threshold.
    ratios: one list for every branch, or {"cond": [...], "uncond": [...]} (separate
    calibration per branch, as `calibrate_mag_ratios` returns)."""
    ratios: Union[Sequence[float], dict]
    threshold: float = 0.06
    max_skip: int = 3
    retention: float = 0.2
    order: int = 0

    def __post_init__(self):
        _check_float("threshold", self.threshold)
        _check_order(self.order)
        if isinstance(self.max_skip, bool) or not isinstance(self.max_skip, int):
            raise TypeError("max_skip must be an int")
        if self.max_skip < 1:
            raise ValueError(f"max_skip must be >= 1, got {self.max_skip}")
        _check_float("retention", self.retention)
        if self.retention > 1:
            raise ValueError(f"retention must lie in [0, 1], got {self.retention}")
        lists = self.ratios.values() if isinstance(self.ratios, dict) else [self.ratios]
        if isinstance(self.ratios, dict) and not set(self.ratios) <= {"cond", "uncond"}:
            raise ValueError(f"ratios keys must be 'cond' / 'uncond', got {sorted(self.ratios)}")
        for r in lists:
            if isinstance(r, (str, bytes)) or not isinstance(r, Sequence) or len(r) < 1:
                raise TypeError("ratios must be a non-empty list of floats (or a dict of them)")
            for v in r:
                _check_float("ratios[...]", v)

    def ratios_for(self, branch: str, n: int) -> list[float]:
        r = self.ratios
        if isinstance(r, dict):
            r = r.get(branch, r.get("cond"))
        return nearest_interp(r, n)

    def modes(self, n: int, branch: str) -> list[str]:
        ratios = self.ratios_for(branch, n)
        keep = int(self.retention * n + 0.5)
        acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        out = []
        for t in range(n):
            if t >= keep and t > 0:
                acc_ratio *= ratios[t]
                acc_steps += 1
                acc_err += abs(1.0 - acc_ratio)
                if acc_err <= self.threshold and acc_steps <= self.max_skip:
                    out.append("skip")
                    continue
                acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
            out.append("all")
        return out


@dataclass(frozen=True)
class PeriodicCache:
    """A fixed schedule (like TaylorSeer's): every block computed for the first `warmup` steps,
    then on every `every`-th step (step warmup, warmup + every, ...) and the last `last` steps;
    the other calls skip all blocks. Static: no probe, no sync, capturable. order 1 (default)
    extrapolates the stack's residual linearly from the last two computed steps."""
    every: int = 3
    warmup: int = 3
    last: int = 0
    order: int = 1

    def __post_init__(self):
        for name, lo in (("every", 1), ("warmup", 1), ("last", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        _check_order(self.order)

    def modes(self, n: int, branch: str) -> list[str]:
        return ["all" if (t < self.warmup or t >= n - self.last
                          or (t - self.warmup) % self.every == 0) else "skip"
                for t in range(n)]


@dataclass(frozen=True)
class Calibrate:
    """Run every block and record the per-step residual-norm ratios (`calibrate_mag_ratios`)."""
    order: int = 0

    def modes(self, n: int, branch: str) -> list[str]:
        return ["all"] * n


Policy = Union[FirstBlockCache, MagCache, PeriodicCache, Calibrate]


def check_policy(cache) -> None:
    if cache is not None and not isinstance(cache, (FirstBlockCache, MagCache, PeriodicCache,
                                                    Calibrate)):
        raise TypeError(f"cache must be None, FirstBlockCache, MagCache, PeriodicCache or "
                        f"Calibrate, got {type(cache).__name__}")


def check_cacheable(model) -> None:
    """A clear error unless `model` runs its blocks through a `BranchCache`."""
    if not getattr(model, "supports_step_cache", False):
        raise ValueError(f"step caching needs a model that takes cache= (fmrt's DiT); "
                         f"{type(model).__name__} cannot be cached")


def parse_cache(spec: Optional[str], ratios=None):
    """The CLI's `--cache` string: "off", "first-block:THRESHOLD[:ORDER]",
    "mag:THRESHOLD[:MAX_SKIP[:RETENTION[:ORDER]]]" (needs `ratios`, e.g. from a JSON file) or
    "periodic:EVERY[:WARMUP[:LAST[:ORDER]]]"."""
    if spec is None or spec == "off":
        return None
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind == "first-block" and len(parts) <= 2:
            return FirstBlockCache(*(float(parts[0]),) if parts else (),
                                   *(int(parts[1]),) if len(parts) > 1 else ())
        if kind == "periodic" and len(parts) <= 4:
            return PeriodicCache(*(int(p) for p in parts))
        if kind == "mag" and len(parts) <= 4:
            if ratios is None:
                raise ValueError("mag caching needs calibrated ratios (--cache-ratios FILE)")
            args = [float(parts[0])] if parts else []
            if len(parts) > 1:
                args.append(int(parts[1]))
            if len(parts) > 2:
                args.append(float(parts[2]))
            if len(parts) > 3:
                args.append(int(parts[3]))
            return MagCache(ratios, *args)
    except ValueError as e:
        raise ValueError(f"bad cache {spec!r}: {e}") from None
    raise ValueError(f"unknown cache {spec!r}: expected off, first-block:THRESHOLD[:ORDER], "
                     f"mag:THRESHOLD[:MAX_SKIP[:RETENTION[:ORDER]]] or "
                     f"periodic:EVERY[:WARMUP[:LAST[:ORDER]]]")


@dataclass
class BranchCache:
    """Runtime state of one branch (cond or uncond) over one sampling call. The loop sets
    `mode` ("all", "skip", "probe") and `step` (the step index) before each model call; the
    model runs its block list through `run`. Counters: `calls`, `blocks_run` (block
    evaluations), `skipped` (calls whose blocks after the probe were skipped)."""
    policy: Policy
    mode: str = "all"
    step: Optional[int] = None
    calls: int = 0
    blocks_run: int = 0
    skipped: int = 0
    decisions: list = field(default_factory=list)   # per call: True = blocks computed
    ratios: list = field(default_factory=list)      # Calibrate: ||R_t|| / ||R_{t-1}||
    _r0: Optional[Tensor] = None       # first block's residual at the last computed call
    _tail: Optional[Tensor] = None     # tail_out - out0 (first-block) at the last computed call
    _res: Optional[Tensor] = None      # tail_out - block-0 input at the last computed call
    _prev: Optional[tuple] = None      # (step, residual) of the computed call before (order 1)
    _at: Optional[int] = None          # step of the last computed call

    def _now(self) -> int:
        return self.step if self.step is not None else self.calls

    def _cached(self, r: Tensor) -> Tensor:
        """The cached residual r (order 0) or its linear extrapolation to this step (order 1)."""
        if self.policy.order == 0 or self._prev is None:
            return r
        t0, r0 = self._prev
        if self._at == t0:
            return r
        return r + (r - r0) * ((self._now() - self._at) / (self._at - t0))

    def run(self, blocks: Sequence, h: Tensor, call: Callable[[object, Tensor], Tensor]) -> Tensor:
        """Run `blocks` on tokens h (`call(block, h) -> h`), or reuse the cached residual."""
        self.calls += 1
        mode = self.mode
        if mode == "skip":
            if self._res is None:
                raise RuntimeError("step cache: a skipped call before any computed call")
            self.skipped += 1
            self.decisions.append(False)
            return (h.float() + self._cached(self._res)).to(h.dtype)
        if mode == "probe" and len(blocks) > 1 and self._r0 is not None:
            out0 = call(blocks[0], h)
            self.blocks_run += 1
            r0 = out0.float() - h.float()
            rel = (r0 - self._r0).abs().mean() / self._r0.abs().mean().clamp_min(1e-12)
            if float(rel) < self.policy.threshold:  # one scalar read per call (documented)
                self.skipped += 1
                self.decisions.append(False)
                return (out0.float() + self._cached(self._tail)).to(h.dtype)
            return self._compute(blocks, h, call, out0=out0, r0=r0)
        return self._compute(blocks, h, call)

    def _compute(self, blocks, h: Tensor, call, out0: Optional[Tensor] = None,
                 r0: Optional[Tensor] = None) -> Tensor:
        self.decisions.append(True)
        x = h
        for j, block in enumerate(blocks):
            if j == 0 and out0 is not None:
                x = out0
                continue
            x = call(block, x)
            self.blocks_run += 1
            if j == 0:
                out0 = x
        kept = self._tail if isinstance(self.policy, FirstBlockCache) else self._res
        if kept is not None and self.policy.order:
            self._prev = (self._at, kept)
        self._at = self._now()
        if isinstance(self.policy, FirstBlockCache):
            self._r0 = r0 if r0 is not None else out0.float() - h.float()
            self._tail = x.float() - out0.float()
        res = x.float() - h.float()
        if isinstance(self.policy, Calibrate):
            if self._res is None:
                self.ratios.append(1.0)
            else:
                num = res.norm(dim=-1)
                den = self._res.norm(dim=-1) + 1e-8
                self.ratios.append(float((num / den).mean()))
        if not isinstance(self.policy, FirstBlockCache):
            self._res = res
        return x


def calibrate_mag_ratios(model, noise: Tensor, **sample_kwargs) -> dict[str, list[float]]:
    """MagCache's calibration: one full `fmrt.sampling.sample` call (same arguments as the
    runs to be cached, every block computed) recording the per-step ratio
    `mean_tokens(||R_t|| / ||R_{t-1}||)` of each branch (ratio_0 = 1). Returns
    {"cond": [...], "uncond": [...]} ("uncond" only with guidance), ready for `MagCache`."""
    from fmrt.sampling import sample
    states: dict = {}
    sample(model, noise, cache=Calibrate(), _cache_states=states, **sample_kwargs)
    return {k: list(s.ratios) for k, s in states.items() if s.ratios}
