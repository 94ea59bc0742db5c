"""Quality of generated clips, measured independently of the generator.

A small 3D-conv classifier (`ClipClassifier`) is trained on real clips of the built-in data
(`fmrt.data.ShapesVideo`); on generated clips it reports
- the accuracy: the fraction of clips generated for class c that it classifies as c;
- the Frechet distance between real and generated clips in its feature space (the pooled
  activations before the last layer), as FID does with Inception features.

The classifier trains deterministically in seconds on a CPU (`train_classifier`); fmrt ships its
weights (`fmrt/assets/classifier.safetensors`, written by `python -m fmrt.eval --write-asset`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fmrt.data import NUM_CLASSES, ShapesVideo

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
CLASSIFIER_PATH = os.path.join(ASSETS, "classifier.safetensors")


class ClipClassifier(nn.Module):
    """x `[B, 3, T, H, W]` in [-1, 1] -> logits `[B, num_classes]`; `features(x)` -> `[B, width*4]`."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16, in_channels: int = 3):
        super().__init__()
        self.num_classes, self.width, self.in_channels = num_classes, width, in_channels
        w = width
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, w, 3, padding=1), nn.GELU(),
            nn.Conv3d(w, 2 * w, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv3d(4 * w, 4 * w, 3, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.net(x).mean(dim=(2, 3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def config(self) -> dict:
        return dict(num_classes=self.num_classes, width=self.width,
                    in_channels=self.in_channels)


@dataclass
class ClassifierTraining:
    """How the shipped classifier was trained (recorded beside its weights)."""
    frames: int = 4
    size: int = 16
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    data_seed: int = 12345     # disjoint from the generator's training data (seed 0)


def train_classifier(cfg: ClassifierTraining = ClassifierTraining(),
                     log: Optional[callable] = None) -> ClipClassifier:
    """Train the classifier on real clips; deterministic for a given config (CPU)."""
    torch.manual_seed(cfg.seed)
    model = ClipClassifier()
    ds = ShapesVideo(cfg.steps * cfg.batch_size, frames=cfg.frames, size=cfg.size,
                     seed=cfg.data_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(ds), generator=g)
    for step in range(cfg.steps):
        idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
        x = torch.stack([ds[i][0] for i in idx])
        y = torch.tensor([ds[i][1] for i in idx])
        # a little noise so that the features are not brittle on imperfect generated clips
        x = x + 0.1 * torch.randn(x.shape, generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 50 == 0 or step == cfg.steps - 1):
            log(f"classifier step {step} loss {loss.item():.4f}")
    return model.eval()


def save_classifier(model: ClipClassifier, path: str, training: ClassifierTraining) -> None:
    from safetensors.torch import save_file
    meta = {"config": json.dumps(model.config()), "training": json.dumps(asdict(training))}
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_classifier(path: str = CLASSIFIER_PATH) -> tuple[ClipClassifier, dict]:
    """(classifier in eval mode, its training config as a dict)."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no classifier weights at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        model = ClipClassifier(**json.loads(meta["config"]))
        model.load_state_dict(state)
    except Exception as e:
        raise ValueError(f"{path}: not a valid classifier checkpoint ({e})") from None
    return model.eval(), json.loads(meta.get("training", "{}"))


def _sqrtm_psd(a: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets `[N, D]`:
    `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)` (float64)."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got "
                         f"{tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("need at least 2 samples per set for a Frechet distance")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    ra = _sqrtm_psd(ca)
    cross = _sqrtm_psd(ra @ cb @ ra)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(ca) + torch.trace(cb)
                 - 2 * torch.trace(cross))


def frechet_distance_infinity(feats: Tensor, ref_feats: Tensor, *,
                              labels: Optional[Tensor] = None,
                              fractions: Sequence[float] = (1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 1),
                              draws: int = 8, blocks: int = 8, seed: int = 0) -> dict:
    """The Frechet distance extrapolated to infinitely many generated samples ("FID_inf",
    Chong & Forsyth 2020). FD from N samples is biased upwards by about `slope / N` (the
    sample mean and covariance's own noise), which at small N can dwarf the distance itself:
    FD of `feats` `[N, D]` against `ref_feats` `[R, D]` is measured on random subsets of
    `fraction` of the samples (`draws` each, the full set once) and fitted by least squares
    as FD_n = fd_inf + slope / n. The reference's own finite size adds a constant this cannot
    see: use a large reference, and real samples scored the same way as the floor.

    `labels` `[N]`: draw every subset, and every jackknife block, as the same fraction of each
    class (stratified), as an evaluation with fixed class counts samples; without it, class
    proportions vary between subsets and add their own noise. `blocks` > 1: a delete-one-block
    jackknife gives `se`, the standard error of fd_inf; each replicate draws its subsets from
    the same random orders as the full fit, without the block's rows, so the subsets' own
    randomness cancels instead of inflating the se.
    Returns dict(fd_inf, slope, se (None when blocks < 2), fd (of all N, as
    `frechet_distance`), fd_se (its jackknife standard error, or None), points=[[n, mean FD_n],
    ...], replicates and fd_replicates (fd_inf and fd without each block, or None), design (a
    string naming N, the labels, seed, blocks, draws and fractions: two calls with the same
    design draw the same subsets and blocks, which `paired_margin` needs)); deterministic for
    a given seed."""
    if feats.ndim != 2 or ref_feats.ndim != 2 or feats.shape[1] != ref_feats.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got "
                         f"{tuple(feats.shape)} and {tuple(ref_feats.shape)}")
    if not fractions or any(not 0 < f <= 1 for f in fractions) or len(set(fractions)) < 2:
        raise ValueError(f"fractions: at least two distinct values in (0, 1], got {fractions}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    n = feats.shape[0]
    if labels is None:
        groups = [torch.arange(n)]
    else:
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"labels must have {n} entries, got {labels.shape[0]}")
        groups = [(labels == c).nonzero().flatten() for c in labels.unique()]
    smallest = min(len(g) for g in groups) * (1 - 1 / blocks if blocks > 1 else 1)
    if int(min(fractions) * smallest) < 1 or int(min(fractions) * n) < 2:
        raise ValueError(f"{n} samples are too few for subsets of {min(fractions):g} of them "
                         f"(of each class, without a jackknife block)")
    gen = torch.Generator().manual_seed(seed)
    x, ref = feats.double(), ref_feats.double()
    mu_r, c_r = ref.mean(0), torch.cov(ref.T)      # the reference's Gaussian, once
    root_r, tr_r = _sqrtm_psd(c_r), torch.trace(c_r)

    def fd_to_ref(a: Tensor) -> float:             # frechet_distance(ref, a), ref cached
        c = torch.cov(a.T)
        cross = torch.linalg.eigvalsh(root_r @ c @ root_r).clamp(min=0).sqrt().sum()
        return float((a.mean(0) - mu_r).pow(2).sum() + tr_r + torch.trace(c) - 2 * cross)
    orders = [[[g[torch.randperm(len(g), generator=gen)] for g in groups]
               for _ in range(1 if f == 1 else draws)] for f in fractions]
    block = torch.zeros(n, dtype=torch.long)
    for g in groups:
        block[g[torch.randperm(len(g), generator=gen)]] = torch.arange(len(g)) % max(blocks, 1)

    def fit(keep: Tensor) -> tuple[float, float, list]:
        points = []
        for f, draws_f in zip(fractions, orders):
            fd, size = [], 0
            for order in draws_f:
                idx = torch.cat([o[keep[o]][:max(1, int(f * int(keep[o].sum())))]
                                 for o in order])
                fd.append(fd_to_ref(x[idx]))
                size = idx.numel()
            points.append((size, sum(fd) / len(fd)))
        inv = torch.tensor([1.0 / m for m, _ in points], dtype=torch.float64)
        y = torch.tensor([v for _, v in points], dtype=torch.float64)
        ic = inv - inv.mean()
        slope = float((ic * (y - y.mean())).sum() / ic.pow(2).sum())
        return float(y.mean() - slope * inv.mean()), slope, points

    fd_inf, slope, points = fit(torch.ones(n, dtype=torch.bool))
    se = fd_se = reps = fd_reps = None
    if blocks > 1:
        reps = [fit(block != b)[0] for b in range(blocks)]
        fd_reps = [fd_to_ref(x[block != b]) for b in range(blocks)]
        se, fd_se = _jackknife_se(reps), _jackknife_se(fd_reps)
    lab = torch.zeros(n, dtype=torch.long) if labels is None else labels.long().cpu()
    tag = int(((lab + 1) * (torch.arange(n) % 9973 + 1)).sum())    # the labels' order, cheaply
    design = (f"n={n} labels={tag} seed={seed} blocks={blocks} draws={draws} "
              f"fractions={','.join(f'{f:.6g}' for f in fractions)}")
    return dict(fd_inf=fd_inf, slope=slope, se=se, fd=frechet_distance(x, ref), fd_se=fd_se,
                points=[[m, v] for m, v in points], replicates=reps, fd_replicates=fd_reps,
                design=design)


def _jackknife_se(est: Sequence[float]) -> float:
    """Delete-one-block jackknife standard error from the block replicates `est`."""
    e = torch.tensor(list(est), dtype=torch.float64)
    return float(((len(est) - 1) / len(est) * (e - e.mean()).pow(2).sum()).sqrt())


def paired_margin(a: dict, b: dict, factor: float = 1.0,
                  key: str = "fd_inf") -> tuple[float, float]:
    """`a[key] - factor * b[key]` and its jackknife standard error, for two
    `frechet_distance_infinity` results (key "fd_inf", or "fd" for FD at N) on paired samples:
    row i of one set drawn with row i of the other (the same noise and class through two
    samplers), scored with the same labels, seed and blocks (the same `design`). Each block's
    replicate of the difference drops the same noises from both sides, so whatever the two
    sets share cancels from the error instead of adding to it, as `sqrt(se_a^2 + factor^2
    se_b^2)` (independent sets) would have it. Against the same reference both ways; the
    reference's own draw is not in either error."""
    if key not in ("fd_inf", "fd"):
        raise ValueError(f"key must be 'fd_inf' or 'fd', got {key!r}")
    reps = "replicates" if key == "fd_inf" else "fd_replicates"
    if a.get(reps) is None or b.get(reps) is None:
        raise ValueError("paired_margin needs jackknife replicates: blocks > 1 on both sides")
    if a.get("design") != b.get("design"):
        raise ValueError(f"the two results were not scored with the same design (paired rows, "
                         f"labels, seed, blocks): {a.get('design')!r} vs {b.get('design')!r}")
    diff = [x - factor * y for x, y in zip(a[reps], b[reps])]
    return a[key] - factor * b[key], _jackknife_se(diff)


@torch.no_grad()
def _features_logits(model: ClipClassifier, x: Tensor, batch: int = 64) -> tuple[Tensor, Tensor]:
    """(features, logits) of clips x, on the classifier's device in batches; returned on CPU."""
    device = next(model.parameters()).device
    fs, ls = [], []
    for i in range(0, x.shape[0], batch):
        f = model.features(x[i:i + batch].to(device).float())
        fs.append(f.cpu())
        ls.append(model.head(f).cpu())
    return torch.cat(fs), torch.cat(ls)


@torch.no_grad()
def reference_features(classifier: ClipClassifier, labels: Tensor, *, frames: int, size: int,
                       data_seed: int = 999) -> Tensor:
    """Classifier features `[N, D]` (CPU) of the real clips `evaluate_clips` compares with by
    default: as many clips of each class as `labels` holds, from the built-in data with
    `data_seed`. Computed once, they serve every call with labels of the same class counts."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    ds = ShapesVideo(10 ** 6, frames=frames, size=size, seed=data_seed)
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    real = torch.cat([ds.clips_of_class(c, int(n)) for c, n in enumerate(counts.tolist())
                      if n > 0])
    return _features_logits(classifier, real)[0]


@torch.no_grad()
def evaluate_clips(clips: Tensor, labels: Tensor, *, classifier: Optional[ClipClassifier] = None,
                   real: Optional[Tensor] = None, data_seed: int = 999,
                   real_features: Optional[Tensor] = None) -> dict:
    """Quality of generated clips `[N, 3, T, H, W]` (in [-1, 1]) meant to be of classes
    `labels` `[N]`. Returns {"accuracy", "per_class_accuracy": {name: acc}, "fd"} where fd is
    the Frechet distance to `real` clips (default: `reference_features`, as many real clips of
    the same classes from the built-in data with `data_seed`), or to `real_features`, their
    classifier features computed beforehand. The classifier runs on its own device."""
    from fmrt.data import CLASS_NAMES
    if clips.ndim != 5:
        raise ValueError(f"clips must be [N, C, T, H, W], got {tuple(clips.shape)}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != clips.shape[0]:
        raise ValueError(f"labels must have {clips.shape[0]} entries, got {labels.shape[0]}")
    if real is not None and real_features is not None:
        raise ValueError("give real clips or their real_features, not both")
    model = classifier if classifier is not None else load_classifier()[0]
    if real_features is not None:
        fr = real_features
    elif real is not None:
        fr = _features_logits(model, real)[0]
    else:
        fr = reference_features(model, labels, frames=clips.shape[2], size=clips.shape[3],
                                data_seed=data_seed)
    fg, lg = _features_logits(model, clips.clamp(-1, 1))
    pred = lg.argmax(-1)
    per_class = {CLASS_NAMES[c]: float((pred[labels == c] == c).float().mean())
                 for c in labels.unique().tolist()}
    return dict(accuracy=float((pred == labels).float().mean()), per_class_accuracy=per_class,
                fd=frechet_distance(fr, fg), num=int(clips.shape[0]))


def over_seeds(rows: list[dict]) -> list[dict]:
    """`fmrt eval` rows of one setting (steps, guidance scale) at several seeds, summarised:
    mean accuracy, mean FD and its spread (sample sd; None with one seed), in the rows' order."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["steps"], r["guidance_scale"]), []).append(r)
    out = []
    for (steps, scale), rs in groups.items():
        fd = [r["fd"] for r in rs]
        mean = sum(fd) / len(fd)
        sd = ((sum((x - mean) ** 2 for x in fd) / (len(fd) - 1)) ** 0.5 if len(fd) > 1
              else None)
        out.append(dict(steps=steps, guidance_scale=scale, seeds=[r["seed"] for r in rs],
                        accuracy_mean=sum(r["accuracy"] for r in rs) / len(rs), fd_mean=mean,
                        fd_sd=sd, fd_min=min(fd), fd_max=max(fd)))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m fmrt.eval --write-asset`: (re)train the shipped classifier."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m fmrt.eval")
    p.add_argument("--write-asset", action="store_true",
                   help=f"train the classifier and write {CLASSIFIER_PATH}")
    p.add_argument("--out", default=CLASSIFIER_PATH)
    args = p.parse_args(argv)
    if not args.write_asset:
        p.print_help()
        return 0
    cfg = ClassifierTraining()
    t0 = time.time()
    model = train_classifier(cfg, log=print)
    ds = ShapesVideo(600, frames=cfg.frames, size=cfg.size, seed=777)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    print(f"trained in {time.time() - t0:.1f}s; accuracy on 600 held-out real clips: {acc:.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_classifier(model, args.out, cfg)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
