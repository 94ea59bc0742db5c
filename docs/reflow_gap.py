"""Does a reflow student memorise its couplings? Its few-step Euler samples against the teacher's
coupled samples, on couplings it trained on and on held-out ones (another `fmrt reflow --seed`).

    python docs/reflow_gap.py MODEL TRAIN_COUPLINGS HELD_OUT_COUPLINGS [N]

prints, for the first N (default 128) couplings of each file, the mean squared error between the
student's 1-, 2- and 4-step Euler sample from a coupling's noise and the coupled sample. A
held-out error far above the training error means the student learnt its couplings by heart
(more couplings would help); close ones mean it underfits (more training or capacity would).
"""
import sys

import torch

from fmrt.checkpoint import load_model
from fmrt.reflow import load_couplings
from fmrt.sampling import generate_clips


def mapping_error(model, meta, couplings: dict, n: int, steps: int) -> float:
    noise, target = couplings["noise"][:n].float(), couplings["sample"][:n].float()
    with torch.no_grad():
        x = generate_clips(model, meta, couplings["cond"][:n], steps=steps, noise=noise,
                           clamp=False)
    return ((x - target) ** 2).mean().item()


def main(argv) -> None:
    model_path, train_path, held_path = argv[:3]
    n = int(argv[3]) if len(argv) > 3 else 128
    model, meta = load_model(model_path)
    model.eval()
    for name, path in (("train", train_path), ("held-out", held_path)):
        c = load_couplings(path)
        errs = "  ".join(f"{k}-step mse {mapping_error(model, meta, c, n, k):.4f}"
                         for k in (1, 2, 4))
        print(f"{name:9} {errs}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
