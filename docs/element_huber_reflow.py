"""Prototype (not a shipped option): `fmrt train` with a per-element pseudo-Huber loss in place
of the MSE, to test whether an L1-like loss (whose optimum is the per-pixel median of the
outcomes a student cannot tell apart, not their mean) sharpens a reflow student.

    python docs/element_huber_reflow.py train --couplings ... --huber-c C [fmrt train flags]

The loss per sample is weight * mean over elements of sqrt(d^2 + C^2) - C with d = v - (z - x0)
(C = 0.01: L1 for all but the smallest errors; the form diffusers' training scripts call
`--loss_type huber`, up to a constant factor). `fmrt train`'s own `--huber-c` is the per-sample
pseudo-Huber loss of iCT, sqrt(mse + C^2) - C, whose optimum is still a mean; this script
replaces `fmrt.losses.flow_loss` for this process only, and takes the couplings path only
(the noise is given, no TI2V mask)."""
import sys

import torch

import fmrt.losses
from fmrt.cli import main


def element_huber_loss(pred, x0, noise=None, *, seed=None, weight=None, mask=None,
                       reduction="mean", huber_c=None):
    if noise is None or mask is not None or huber_c is None or reduction != "mean":
        raise SystemExit("element_huber_reflow.py: --couplings and --huber-c only")
    d = pred.float() - (noise.float() - x0.float())
    per = (torch.sqrt(d * d + huber_c * huber_c) - huber_c).flatten(1).mean(1)
    if weight is not None:
        per = per * weight
    return per.mean()


if __name__ == "__main__":
    fmrt.losses.flow_loss = element_huber_loss
    sys.exit(main(sys.argv[1:]))
