"""A frozen teacher's velocity as a training target (distillation into a flow map, or into a
flow model that needs no guidance at sampling).

MeanFlow (SPEC 6) regresses the average velocity u(z, r, t) on `v~ - (t - r) du/dt` along the
tangent `v~`. From data, `v~ = noise - x0` is the *conditional* velocity, an unbiased but
noisy sample of the marginal one. A trained flow-matching model already predicts the marginal
velocity (and, with CFG, the guided one that sampling actually integrates); using it as `v~`
(`fmrt.losses.meanflow_loss(..., velocity=TeacherVelocity(...))`) removes that noise from the
target and makes the student learn the flow map of exactly the teacher's sampling ODE: the
distillation setting of Decoupled MeanFlow / flow-map distillation ("Align Your Flow", Sabour
et al. 2025), and the v-reparameterisation of Improved MeanFlow with the network's own v
replaced by a frozen teacher's.

    TeacherVelocity(model, guidance_scale=s, interval=(lo, hi), null_class=K)(z, t, c)
        = v(z, t | null) + g (v(z, t | c) - v(z, t | null)),
          g = s where lo <= t <= hi (per sample, compared in float64 like the sampler's host
          grid), else 1 (the conditional velocity); a sample whose c is the null condition
          gets v(z, t | null) itself. Computed in float32.

    TeacherVelocity(model, guidance_scale=s, interval=(lo, hi), guide=G)(z, t, c)
        = G(z, t | c) + g (v(z, t | c) - G(z, t | c))

autoguidance (Karras et al. 2024): the guided branch is a weaker model G of the same classes
instead of the null condition (a reflow student has no unconditional branch); g as above.

The flow-matching objective regresses the student's v(z, t) on this velocity directly
(`fmrt.train.compute_loss`): guidance distillation (Meng et al. 2023), the student then needs
no guidance and one model call per sampler step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fmrt.guidance import check_interval


class TeacherVelocity:
    """The guided instantaneous velocity of a frozen flow-matching model `model(z, t, cond)`
    (an fmrt DiT): see the module docstring. Conditions are class labels `[B]` (the
    unconditional branch: `null_class`) or embeddings `[B, ...]` (unconditional: zeros), as in
    `fmrt train`."""

    def __init__(self, model: nn.Module, *, guidance_scale: float = 1.0,
                 interval: Optional[tuple[float, float]] = None,
                 null_class: Optional[int] = None, guide: Optional[nn.Module] = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if getattr(getattr(model, "config", None), "meanflow", False):
            raise ValueError("the teacher must be a flow-matching model (v(z, t)), not a "
                             "MeanFlow one")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not guidance_scale >= 0 or guidance_scale == float("inf"):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got "
                             f"{guidance_scale!r}")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.interval = check_interval(interval)
        self.null_class = null_class
        if guide is not None:
            if not callable(guide):
                raise TypeError(f"guide must be callable, got {type(guide).__name__}")
            if getattr(getattr(guide, "config", None), "meanflow", False):
                raise ValueError("the guide must be a flow-matching model (v(z, t)), not a "
                                 "MeanFlow one")
        self.guide = guide

    def _uncond(self, cond: Tensor) -> Tensor:
        if cond.dtype == torch.long:
            if self.null_class is None:
                raise ValueError("guidance with class labels needs null_class (the "
                                 "unconditional label)")
            return torch.full_like(cond, self.null_class)
        return torch.zeros_like(cond)

    @torch.no_grad()
    def __call__(self, z: Tensor, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        if cond is None or self.guidance_scale == 1.0:
            return self.model(z, t, cond)
        if self.guide is not None:
            v_c, v_g = self.model(z, t, cond).float(), self.guide(z, t, cond).float()
            g = self._scale(t, v_c)
            return v_g + g * (v_c - v_g)
        B = z.shape[0]
        unc = self._uncond(cond)
        # both branches for every row (rows outside the interval or already unconditional
        # discard their second half): a fixed-shape batch needs no host sync on a GPU
        out = self.model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, unc]))
        v_c, v_u = out[:B].float(), out[B:].float()
        guided = v_u + self._scale(t, v_c) * (v_c - v_u)
        null = (cond == unc).reshape(B, -1).all(dim=1).view((B,) + (1,) * (z.ndim - 1))
        return torch.where(null, v_u, guided)

    def _scale(self, t: Tensor, v: Tensor) -> Tensor:
        """Per-sample guidance `[B, 1, ...]` in v's dtype: the scale inside the interval, else
        1 (compared in float64, like the sampler's host grid)."""
        B = v.shape[0]
        g = torch.full((B,), self.guidance_scale, dtype=torch.float64, device=v.device)
        if self.interval is not None:
            lo, hi = self.interval
            td = t.detach().to(torch.float64).reshape(-1).expand(B)
            g = torch.where((td >= lo) & (td <= hi), g, torch.ones_like(g))
        return g.to(v.dtype).view((B,) + (1,) * (v.ndim - 1))
