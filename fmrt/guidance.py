"""Guidance policies: which sampling steps run the unconditional branch.

Seed 000 derives that for a well-trained flow model `d = v_cond - v_uncond` (= x0_uncond -
x0_cond) barely depends on the step. So the unconditional forward can run on *refresh* steps
only; in between, the guided velocity is `v = c + (s - 1) d` with d the last measured c - u
(`ops.guided_euler_step_refresh` writes d in the pass of the guided step,
`ops.reused_guided_euler_step` steps from x, c and d without u).

Each step of a plan gets one branch label (`fmrt.sampling.make_plan`):

    "cfg"       cond + uncond forwards, full guidance (and d refreshed when a policy reuses it)
    "reuse"     cond forward only, v = c + (s - 1) d
    "adaptive"  "cfg" or "reuse", decided in the loop from the previous step's in-pass
                statistics (one scalar read back per step)
    "cond"      cond forward only, no guidance (unguided sampling, or outside the interval)

Policies:
- `GuidanceReuse(every, first, last)`: static. The first `first` (>= 1: the first step measures
  d) and the last `last` steps are full CFG; in between, every `every`-th step refreshes d and
  the others reuse it (every = 1: full CFG everywhere). Decided before the loop: a static plan
  runs without host syncs and is CUDA-graph capturable (`CapturedSampler`).
- `AdaptiveGuidanceReuse(tol, first, last, max_reuse)`: refresh when d moved (at a refresh
  step: ||d - d_prev|| / ||d||) or c moved (at a reuse step: ||c - c_ref|| / ||c_ref||, c_ref
  the cond output of the last refresh) by more than `tol` (relative L2, the largest over the
  batch), and at least every `max_reuse + 1` steps. The norms come from the step kernel's
  partial sums (no extra pass); the loop reads one scalar per step back to the host.
- The guidance interval of `sample(..., guidance_interval=(lo, hi))` composes with both: steps
  whose sigma lies outside [lo, hi] are "cond" (the unconditional forward is not run at all);
  it is decided on the host from the grid before the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

BRANCHES = ("cfg", "reuse", "adaptive", "cond")


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


@dataclass(frozen=True)
class GuidanceReuse:
    """Static guidance reuse: full CFG for the first `first` and last `last` steps, in between
    a refresh every `every` steps (the others reuse d)."""
    every: int = 2
    first: int = 1
    last: int = 0

    def __post_init__(self):
        _check_int("every", self.every, 1)
        _check_int("first", self.first, 1)
        _check_int("last", self.last, 0)

    def branches(self, n: int) -> list[str]:
        out = []
        for i in range(n):
            full = i < self.first or i >= n - self.last
            refresh = (i - self.first + 1) % self.every == 0
            out.append("cfg" if full or refresh else "reuse")
        return out


@dataclass(frozen=True)
class AdaptiveGuidanceReuse:
    """Adaptive guidance reuse: refresh d when c or d moved by more than `tol` (relative L2),
    and at least every `max_reuse + 1` steps; full CFG for the first / last steps."""
    tol: float = 0.05
    first: int = 1
    last: int = 0
    max_reuse: int = 4

    def __post_init__(self):
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)):
            raise TypeError(f"tol must be a float, got {type(self.tol).__name__}")
        if not self.tol >= 0 or self.tol != self.tol or self.tol == float("inf"):
            raise ValueError(f"tol must be a finite float >= 0, got {self.tol}")
        _check_int("first", self.first, 1)
        _check_int("last", self.last, 0)
        _check_int("max_reuse", self.max_reuse, 1)

    def branches(self, n: int) -> list[str]:
        return ["cfg" if i < self.first or i >= n - self.last else "adaptive" for i in range(n)]


def parse_guidance_reuse(spec: Optional[str]):
    """The CLI's `--guidance-reuse` string: "off", "static:EVERY[:FIRST[:LAST]]" or
    "adaptive:TOL[:FIRST[:LAST[:MAX_REUSE]]]" -> a policy (None for "off")."""
    if spec is None or spec == "off":
        return None
    if not isinstance(spec, str):
        raise TypeError(f"guidance reuse must be a string, got {type(spec).__name__}")
    kind, _, rest = spec.partition(":")
    parts = [p for p in rest.split(":")] if rest else []
    try:
        if kind == "static":
            nums = [int(p) for p in parts]
            if len(nums) > 3:
                raise ValueError
            return GuidanceReuse(*nums)
        if kind == "adaptive":
            if len(parts) > 4:
                raise ValueError
            tol = float(parts[0]) if parts else 0.05
            return AdaptiveGuidanceReuse(tol, *[int(p) for p in parts[1:]])
    except ValueError as e:
        if str(e):
            raise ValueError(f"bad guidance reuse {spec!r}: {e}") from None
        raise ValueError(f"bad guidance reuse {spec!r}: expected off, static:EVERY[:FIRST[:LAST]]"
                         f" or adaptive:TOL[:FIRST[:LAST[:MAX_REUSE]]]") from None
    raise ValueError(f"unknown guidance reuse policy {kind!r}: expected off, static:... or "
                     f"adaptive:...")


def check_interval(interval) -> Optional[tuple[float, float]]:
    """A guidance interval (lo, hi) with 0 <= lo <= hi <= 1, or None."""
    if interval is None:
        return None
    if (not isinstance(interval, (tuple, list)) or len(interval) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in interval)):
        raise TypeError("guidance_interval must be a (sigma_low, sigma_high) pair of floats")
    lo, hi = float(interval[0]), float(interval[1])
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got {interval}")
    return lo, hi


def guidance_branches(n: int, sigmas: Optional[Sequence[float]], *, guided: bool,
                      interval: Optional[tuple[float, float]], reuse) -> list[str]:
    """The per-step branch labels of a plan (see the module docstring). `sigmas`: the host copy
    of the grid's first n sigmas (needed only with an interval)."""
    if not guided:
        return ["cond"] * n
    out = reuse.branches(n) if reuse is not None else ["cfg"] * n
    if interval is not None:
        lo, hi = interval
        out = [b if lo <= sigmas[i] <= hi else "cond" for i, b in enumerate(out)]
    have_d = False  # a reuse step needs a d measured since the last unguided step
    for i, b in enumerate(out):
        if b == "cond":
            have_d = False
        elif b in ("reuse", "adaptive") and not have_d:
            out[i] = "cfg"
            have_d = True
        elif b == "cfg":
            have_d = True
    return out
