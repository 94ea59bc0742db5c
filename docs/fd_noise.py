"""How far apart two sets of *real* clips score in `fmrt eval`'s FD: the floor a perfect sampler
would reach, and how much it moves from one draw to the next.

    python docs/fd_noise.py [NUM_PER_CLASS] [NUM_SETS]

draws NUM_SETS (default 200) sets of NUM_PER_CLASS (default 32) real clips per class, each from
its own data seed (10000, 10001, ...), scores each against the evaluator's reference set (data
seed 999, the set every `fmrt eval` run compares with) and prints the quantiles of the FD, and
the set `fmrt eval` prints as its "real" row (data seed 4242). A sampler's FD at one noise seed
carries noise of the same size on top of its own error: a ratio of two FDs near this floor says
little, a mean over several seeds (`fmrt eval --seed 0 1 2 ...`) or more clips says more.
"""
import sys

import torch

from fmrt.data import NUM_CLASSES, ShapesVideo
from fmrt.eval import _features_logits, frechet_distance, load_classifier


def real_features(clf, seed: int, n: int) -> torch.Tensor:
    ds = ShapesVideo(10 ** 6, frames=4, size=16, seed=seed)
    clips = torch.cat([ds.clips_of_class(c, n) for c in range(NUM_CLASSES)])
    return _features_logits(clf, clips)[0]


def quantile(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[round(q * (len(xs) - 1))]


def main(argv) -> None:
    n = int(argv[0]) if argv else 32
    sets = int(argv[1]) if len(argv) > 1 else 200
    clf, _ = load_classifier()
    ref = real_features(clf, 999, n)
    fds = []
    for i in range(sets):
        fds.append(frechet_distance(ref, real_features(clf, 10000 + i, n)))
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    print(f"{sets} sets of {n} real clips per class against the reference (data seed 999):")
    print("  FD quantiles " + "  ".join(f"{int(q * 100)}%: {quantile(fds, q):.2f}" for q in qs)
          + f"  (min {min(fds):.2f}, max {max(fds):.2f})")
    print(f"  fmrt eval's real row (data seed 4242): "
          f"{frechet_distance(ref, real_features(clf, 4242, n)):.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
