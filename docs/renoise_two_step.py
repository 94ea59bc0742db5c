"""Does re-noising at the midpoint help a reflow student's 2-step sample? Consistency models
sample in several steps by predicting x0, then noising it again with fresh noise; a deterministic
2-step Euler sample of a flow model is the special case that reuses the noise it started from.

    python docs/renoise_two_step.py MODEL SEED [GAMMA ...] [--mid SIGMA]

With x0_hat = z - v(z, 1) (the 1-step sample from noise z) the second step starts from
    x_mid = (1 - s) x0_hat + s (sqrt(1 - gamma^2) z + gamma xi),   xi fresh noise, s = SIGMA,
and takes one Euler step to sigma 0. gamma = 0 is plain 2-step Euler at that midpoint (the
`fmrt eval --steps 2` number at shift 1 when SIGMA = 0.5); gamma = 1 is the consistency model's
multistep sampler. Prints the accuracy and FD of `fmrt eval` (32 clips per class, the noise of
`--seed SEED`) for each gamma.
"""
import argparse
import math

import torch

from fmrt.checkpoint import load_model
from fmrt.eval import evaluate_clips, load_classifier
from fmrt.sampling import sample


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("seed", type=int)
    p.add_argument("gamma", type=float, nargs="*", default=[0.0, 0.3, 0.6, 1.0])
    p.add_argument("--mid", type=float, default=0.5)
    p.add_argument("--num-per-class", type=int, default=32)
    args = p.parse_args(argv)
    if not all(0.0 <= g <= 1.0 for g in args.gamma) or not 0.0 < args.mid < 1.0:
        p.error("each GAMMA must be in [0, 1] and --mid in (0, 1)")
    model, meta = load_model(args.model)
    clf, _ = load_classifier()
    labels = torch.arange(model.config.num_classes).repeat_interleave(args.num_per_class)
    shape = (len(labels), *meta["sample"]["sample_shape"])
    z = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))   # fmrt eval's
    xi = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 10 ** 6))
    s = args.mid
    with torch.no_grad():
        x0 = sample(model, z, sigmas=[1.0, 0.0], solver="euler", cond=labels).float()
        for g in args.gamma:
            x_mid = (1 - s) * x0 + s * (math.sqrt(1 - g * g) * z + g * xi)
            x = sample(model, x_mid, sigmas=[s, 0.0], solver="euler", cond=labels)
            q = evaluate_clips(x.float().clamp(-1, 1), labels, classifier=clf)
            print(f"seed {args.seed} mid {s:g} gamma {g:g}: accuracy {q['accuracy']:.3f} "
                  f"FD {q['fd']:.2f}", flush=True)


if __name__ == "__main__":
    main()
