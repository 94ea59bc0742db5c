"""Data for fmrt's runtime.

- `ShapesVideo`: a procedurally generated, class-conditional video dataset that needs no
  download. Each class is one shape with its own motion (a square moving left to right, a falling
  disc, a rotating triangle, a pulsing cross, a bouncing ring, a diamond drifting up and left),
  rendered with torch ops as anti-aliased masks (signed distance functions), colour and position
  randomised. Clips are float32 `[C=3, T, H, W]` in [-1, 1] (background -1), deterministic per
  (seed, index).
- `LatentFolderDataset`: a folder of `.safetensors` files holding pre-encoded latents (key
  `latents`) and their conditioning (key `cond`: e.g. text embeddings, or `label`: class ids).
- `CouplingDataset`: (noise, sample) couplings written by `fmrt reflow`
  (`fmrt.reflow.save_couplings`: keys `noise`, `sample`, optional `cond`) for reflow training,
  from one file or several shards.
- `collate`: stacks `(x, cond)` items into a batch.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

CLASS_NAMES = (
    "square-right",      # a square moving left to right
    "disc-fall",         # a disc falling (accelerating downwards)
    "triangle-rotate",   # a triangle rotating about its centre
    "cross-pulse",       # a cross growing then shrinking
    "ring-bounce",       # a ring bouncing up and down
    "diamond-drift",     # a diamond drifting up and to the left
)
NUM_CLASSES = len(CLASS_NAMES)


# ---------------------------------------------------------------------------------------------
# signed distance functions (pixels; negative inside), p: [..., 2] = (x, y)
# ---------------------------------------------------------------------------------------------

def _sd_box(p: Tensor, bx: Tensor, by: Tensor) -> Tensor:
    qx, qy = p[..., 0].abs() - bx, p[..., 1].abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sd_disc(p: Tensor, r: Tensor) -> Tensor:
    return p.norm(dim=-1) - r


def _sd_triangle(p: Tensor, r: Tensor) -> Tensor:
    """Equilateral triangle of circumradius-ish size r, pointing up (y grows downwards)."""
    k = math.sqrt(3.0)
    x = p[..., 0].abs() - r
    y = -p[..., 1] + r / k
    fold = (x + k * y) > 0
    x2 = torch.where(fold, (x - k * y) / 2, x)
    y2 = torch.where(fold, (-k * x - y) / 2, y)
    x3 = x2 - torch.minimum(torch.maximum(x2, -2 * r), torch.zeros_like(x2))
    return -torch.sqrt(x3 ** 2 + y2 ** 2) * torch.sign(y2)


def _rotate(p: Tensor, angle: Tensor) -> Tensor:
    c, s = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    x, y = p[..., 0], p[..., 1]
    return torch.stack((c * x + s * y, -s * x + c * y), dim=-1)


def _coverage(sd: Tensor) -> Tensor:
    """Anti-aliased coverage of a pixel from the signed distance at its centre."""
    return (0.5 - sd).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# the built-in dataset
# ---------------------------------------------------------------------------------------------

def _mix_seed(seed: int, index: int) -> int:
    return (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63 - 1)


def render_clip(label: int, frames: int, size: int, generator: torch.Generator) -> Tensor:
    """One clip of class `label`: float32 `[3, frames, size, size]` in [-1, 1]."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
    g = generator

    def u(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand((), generator=g)

    S = float(size)
    t = torch.linspace(0.0, 1.0, frames) if frames > 1 else torch.zeros(1)
    r = u(0.2, 0.26) * S                            # shape size
    colour = torch.rand(3, generator=g) * 0.7 + 0.3  # [0.3, 1] per channel
    colour[torch.randint(0, 3, (), generator=g)] = 1.0  # one saturated channel: never dark
    ones = torch.ones_like(t)
    angle = u(0.0, math.pi / 2) * ones
    if label == 0:      # square, left to right
        cx = u(0.22, 0.32) * S + t * 0.4 * S
        cy = u(0.25, 0.75) * S * ones
        size_t, kind = r * 0.85 * ones, "box"
        angle = 0.0 * ones
    elif label == 1:    # disc, falling with constant acceleration
        cx = u(0.25, 0.75) * S * ones
        cy = u(0.2, 0.3) * S + t ** 2 * 0.45 * S
        size_t, kind = r * ones, "disc"
    elif label == 2:    # triangle, rotating (90 degrees over the clip)
        cx, cy = u(0.35, 0.65) * S * ones, u(0.35, 0.65) * S * ones
        angle = u(0.0, 2 * math.pi / 3) + t * (math.pi / 2)
        size_t, kind = r * 1.2 * ones, "triangle"
    elif label == 3:    # cross, growing then shrinking
        cx, cy = u(0.35, 0.65) * S * ones, u(0.35, 0.65) * S * ones
        size_t, kind = r * (0.55 + 0.6 * torch.sin(math.pi * t)), "cross"
        angle = 0.0 * ones
    elif label == 4:    # ring, bouncing: up then down twice
        cx = u(0.3, 0.7) * S * ones
        cy = 0.72 * S - torch.sin(2 * math.pi * t).abs() * u(0.3, 0.4) * S
        size_t, kind = r * 1.05 * ones, "ring"
    else:               # diamond, drifting up and to the left
        cx = u(0.6, 0.72) * S - t * 0.3 * S
        cy = u(0.6, 0.72) * S - t * 0.3 * S
        size_t, kind = r * ones, "diamond"
        angle = (math.pi / 4) * ones

    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    p = torch.stack((xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]), dim=-1)
    p = _rotate(p, angle)
    s = size_t[:, None, None]
    if kind in ("box", "diamond"):
        sd = _sd_box(p, s, s)
    elif kind == "disc":
        sd = _sd_disc(p, s)
    elif kind == "triangle":
        sd = _sd_triangle(p, s)
    elif kind == "cross":
        w = 0.32 * s
        sd = torch.minimum(_sd_box(p, s, w), _sd_box(p, w, s))
    else:  # ring
        sd = (p.norm(dim=-1) - s).abs() - 0.28 * s
    m = _coverage(sd)                                # [T, H, W]
    img = -1.0 + m[None] * (colour[:, None, None, None] * 2.0)  # background -1
    return img.clamp(-1.0, 1.0).contiguous()


class ShapesVideo(torch.utils.data.Dataset):
    """The built-in class-conditional video dataset (no download).

    Item i: `(clip, label)`, clip float32 `[3, frames, size, size]` in [-1, 1], label
    `i % num_classes` (balanced). Deterministic per (seed, i). `num_classes` <= 6 uses the first
    classes of `CLASS_NAMES`.
    """

    channels = 3

    def __init__(self, num_samples: int = 100_000, *, frames: int = 8, size: int = 16,
                 seed: int = 0, num_classes: int = NUM_CLASSES):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if frames < 1 or size < 8:
            raise ValueError(f"frames must be >= 1 and size >= 8, got frames={frames}, "
                             f"size={size}")
        if not 1 <= num_classes <= NUM_CLASSES:
            raise ValueError(f"num_classes must be in [1, {NUM_CLASSES}], got {num_classes}")
        self.num_samples, self.frames, self.size = int(num_samples), int(frames), int(size)
        self.seed, self.num_classes = int(seed), int(num_classes)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def sample_shape(self) -> tuple[int, int, int, int]:
        return (3, self.frames, self.size, self.size)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(index)
        index = index % self.num_samples
        label = index % self.num_classes
        g = torch.Generator().manual_seed(_mix_seed(self.seed, index))
        return render_clip(label, self.frames, self.size, g), label

    def clips_of_class(self, label: int, n: int, *, offset: int = 0) -> Tensor:
        """`n` clips of one class, `[n, 3, T, H, W]` (indices label, label + K, ...)."""
        idx = [label + self.num_classes * (offset + j) for j in range(n)]
        return torch.stack([self[i % self.num_samples][0] for i in idx])

    def config(self) -> dict:
        return dict(kind="shapes", frames=self.frames, size=self.size, seed=self.seed,
                    num_classes=self.num_classes, num_samples=self.num_samples)


# ---------------------------------------------------------------------------------------------
# latents on disk
# ---------------------------------------------------------------------------------------------

def _list_safetensors(folder: Union[str, os.PathLike]) -> list[str]:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder: {folder}")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {folder}")
    return files


def _open(path: str):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


class LatentFolderDataset(torch.utils.data.Dataset):
    """A folder of `.safetensors` files of pre-encoded latents with their conditioning.

    Each file holds `latents` (`[C, T, H, W]`, one sample, or `[N, C, T, H, W]`, N samples) and
    optionally `cond` (conditioning per sample, e.g. text embeddings `[L, D]` / `[N, L, D]`) or
    `label` (class ids: a 0-d / `[N]` integer tensor). Item: `(latents float32, cond or label or
    None)`. Files are read lazily, one sample at a time.
    """

    def __init__(self, folder: Union[str, os.PathLike]):
        self.files = _list_safetensors(folder)
        self.index: list[tuple[int, Optional[int]]] = []
        shape, self.cond_key = None, "unset"
        for fi, path in enumerate(self.files):
            with _open(path) as f:
                keys = set(f.keys())
                if "latents" not in keys:
                    raise ValueError(f"{path}: missing key 'latents' (has {sorted(keys)})")
                lat = f.get_slice("latents").get_shape()
                ck = "cond" if "cond" in keys else ("label" if "label" in keys else None)
                if self.cond_key != "unset" and ck != self.cond_key:
                    raise ValueError(f"{path}: conditioning key {ck!r} differs from the other "
                                     f"files' {self.cond_key!r}")
                self.cond_key = ck
            if len(lat) == 4:
                one = tuple(lat)
                self.index.append((fi, None))
            elif len(lat) == 5:
                one = tuple(lat[1:])
                self.index.extend((fi, j) for j in range(lat[0]))
            else:
                raise ValueError(f"{path}: 'latents' must be [C, T, H, W] or [N, C, T, H, W], "
                                 f"got {list(lat)}")
            if shape is not None and one != shape:
                raise ValueError(f"{path}: latents of shape {list(one)} differ from the other "
                                 f"files' {list(shape)}")
            shape = one
        self.sample_shape = shape
        if self.cond_key == "unset":
            self.cond_key = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        fi, j = self.index[i]
        with _open(self.files[fi]) as f:
            sl = f.get_slice("latents")
            lat = f.get_tensor("latents") if j is None else sl[j:j + 1][0]
            cond = None
            if self.cond_key is not None:
                cs = f.get_slice(self.cond_key)
                cond = f.get_tensor(self.cond_key) if j is None else cs[j:j + 1][0]
        if self.cond_key == "label":
            cond = int(cond.reshape(()).item())
        return lat.float(), cond

    def config(self) -> dict:
        return dict(kind="latents", folder=os.path.dirname(self.files[0]))


class CouplingDataset(torch.utils.data.Dataset):
    """(noise, sample) couplings for reflow training, as `fmrt.reflow.save_couplings` writes
    them (`fmrt reflow`): `noise` and `sample` `[N, C, T, H, W]`, optional `cond` (`[N]` class
    labels or `[N, ...]` embeddings). Item: `(sample, label or cond or None, noise)`.

    `paths` is one file or several (shards written by separate `fmrt reflow` runs with their own
    `--seed`), concatenated in the order given. The shards must agree in sample shape and in
    their conditioning (all class labels, all embeddings of one shape, or none), and no two may
    start from the same noise: two runs with the same seed would repeat every coupling."""

    def __init__(self, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("no couplings file given")
        shards = [self._load(p) for p in paths]
        first_path, first = paths[0], shards[0]
        for path, t in zip(paths[1:], shards[1:]):
            for key, what in (("sample", "sample shape"), ("cond", "conditioning")):
                a, b = first.get(key), t.get(key)
                if _describe_part(a) != _describe_part(b):
                    raise ValueError(f"{path}: its {what} ({_describe_part(b)}) differs from "
                                     f"{first_path}'s ({_describe_part(a)})")
        for i, (path, t) in enumerate(zip(paths, shards)):
            for other_path, u in zip(paths[:i], shards[:i]):
                if torch.equal(t["noise"][0], u["noise"][0]):
                    raise ValueError(f"{path} starts from the same noise as {other_path} (the "
                                     f"same file, or fmrt reflow run twice with one --seed): "
                                     f"its couplings would be counted twice")
        self.noise = torch.cat([t["noise"].float() for t in shards])
        self.samples = torch.cat([t["sample"].float() for t in shards])
        self.cond = None if first.get("cond") is None else torch.cat([t["cond"] for t in shards])
        self.cond_key = None
        if self.cond is not None:
            self.cond_key = "cond" if self.cond.is_floating_point() else "labels"
        self.sample_shape = tuple(self.samples.shape[1:])
        self.paths = paths

    @staticmethod
    def _load(path: str) -> dict[str, Tensor]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such couplings file: {path}")
        from fmrt.reflow import load_couplings
        try:
            t = load_couplings(path)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if t["noise"].ndim < 2:
            raise ValueError(f"{path}: 'noise' and 'sample' must be [N, ...]")
        if t["noise"].shape[0] == 0:
            raise ValueError(f"{path} holds no couplings (N = 0)")
        return t

    def __len__(self) -> int:
        return self.samples.shape[0]

    def __getitem__(self, i: int):
        c = None
        if self.cond is not None:
            c = int(self.cond[i]) if self.cond_key == "labels" else self.cond[i]
        return self.samples[i], c, self.noise[i]

    def config(self) -> dict:
        """The data part of model.json: `path` for one file (as before shards existed),
        `paths` for several."""
        if len(self.paths) == 1:
            return dict(kind="couplings", path=self.paths[0])
        return dict(kind="couplings", paths=list(self.paths))


def _describe_part(t: Optional[Tensor]) -> str:
    if t is None:
        return "none"
    kind = "float" if t.is_floating_point() else "labels"
    return f"{kind} {list(t.shape[1:])} per coupling"


def collate(items: Sequence[tuple]) -> tuple:
    """Stack `(x, cond[, noise])` items: x `[B, ...]`; cond -> LongTensor `[B]` for ints, a
    stacked tensor for tensors, None when absent."""
    xs = torch.stack([it[0] for it in items])
    conds = [it[1] for it in items]
    if conds[0] is None:
        cond = None
    elif isinstance(conds[0], int):
        cond = torch.tensor(conds, dtype=torch.long)
    else:
        cond = torch.stack([c.float() for c in conds])
    if len(items[0]) > 2:
        return xs, cond, torch.stack([it[2] for it in items])
    return xs, cond
