import os

import pytest
import torch
from safetensors.torch import save_file

from fmrt.data import (CLASS_NAMES, NUM_CLASSES, CouplingDataset, LatentFolderDataset,
                       ShapesVideo, collate)


def _mask(clip):
    """Foreground coverage of a clip [3, T, H, W]: the brightest channel, 0 (bg) .. 1."""
    return ((clip.max(dim=0).values + 1) / 2).clamp(0, 1)


def _centroid(m):
    """m [T, H, W] -> (x, y) per frame."""
    T, H, W = m.shape
    ys = torch.arange(H, dtype=torch.float32)[:, None]
    xs = torch.arange(W, dtype=torch.float32)[None, :]
    tot = m.sum(dim=(1, 2))
    return (m * xs).sum(dim=(1, 2)) / tot, (m * ys).sum(dim=(1, 2)) / tot


def test_shapes_deterministic_range_and_labels():
    ds = ShapesVideo(100, frames=4, size=16, seed=3)
    a, la = ds[7]
    b, lb = ShapesVideo(100, frames=4, size=16, seed=3)[7]
    c, _ = ShapesVideo(100, frames=4, size=16, seed=4)[7]
    assert a.shape == (3, 4, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and la == lb == 7 % NUM_CLASSES
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert a.min() == -1                      # background
    m = _mask(a)
    assert ((m > 0.05) & (m < 0.95)).any()    # anti-aliased edges
    assert [ds[i][1] for i in range(12)] == [i % NUM_CLASSES for i in range(12)]
    with pytest.raises(IndexError):
        ds[100]


@pytest.mark.parametrize("bad", [dict(num_samples=0), dict(frames=0), dict(size=4),
                                 dict(num_classes=7)])
def test_shapes_bad_args(bad):
    with pytest.raises(ValueError):
        ShapesVideo(**{"num_samples": 10, **bad})


def test_each_class_moves_its_own_way():
    ds = ShapesVideo(10_000, frames=8, size=32, seed=0)
    for label in range(NUM_CLASSES):
        for clip in ds.clips_of_class(label, 3):
            m = _mask(clip)
            x, y = _centroid(m)
            area = m.sum(dim=(1, 2))
            name = CLASS_NAMES[label]
            if name == "square-right":
                assert (x.diff() > 0.5).all() and (y.diff().abs() < 0.05).all()
            elif name == "disc-fall":
                assert (y.diff() > 0).all() and (x.diff().abs() < 0.05).all()
                assert y.diff()[-1] > 2 * y.diff()[0]            # accelerating
            elif name == "triangle-rotate":
                assert (x.diff().abs() < 0.3).all() and (y.diff().abs() < 0.3).all()
                assert (area.max() - area.min()) / area.mean() < 0.1
                assert (m[0] - m[-1]).abs().sum() > 0.2 * area.mean()   # it turned
            elif name == "cross-pulse":
                assert area[3] > 1.5 * area[0] and area[4] > 1.5 * area[-1]
            elif name == "ring-bounce":
                assert y[2] < y[0] - 3 and y[4] > y[2] + 2       # up, then down
            elif name == "diamond-drift":
                assert (x.diff() < 0).all() and (y.diff() < 0).all()


def test_latent_folder(tmp_path):
    save_file({"latents": torch.randn(4, 2, 6, 6), "label": torch.tensor(3)},
              str(tmp_path / "a.safetensors"))
    save_file({"latents": torch.randn(2, 4, 2, 6, 6), "label": torch.tensor([1, 2])},
              str(tmp_path / "b.safetensors"))
    (tmp_path / "notes.txt").write_text("ignored")
    ds = LatentFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.sample_shape == (4, 2, 6, 6) and ds.cond_key == "label"
    assert [ds[i][1] for i in range(3)] == [3, 1, 2]
    x, y = collate([ds[0], ds[2]])
    assert x.shape == (2, 4, 2, 6, 6) and y.tolist() == [3, 2] and y.dtype == torch.long


def test_latent_folder_text_cond(tmp_path):
    save_file({"latents": torch.randn(2, 4, 1, 4, 4), "cond": torch.randn(2, 5, 8)},
              str(tmp_path / "a.safetensors"))
    ds = LatentFolderDataset(tmp_path)
    x, c = collate([ds[0], ds[1]])
    assert x.shape == (2, 4, 1, 4, 4) and c.shape == (2, 5, 8)


def test_latent_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        LatentFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .safetensors"):
        LatentFolderDataset(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="missing key 'latents'"):
        LatentFolderDataset(tmp_path)
    os.remove(tmp_path / "a.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        LatentFolderDataset(tmp_path)
    os.remove(tmp_path / "bad.safetensors")
    save_file({"latents": torch.zeros(4, 1, 4, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"latents": torch.zeros(4, 1, 8, 8)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="differ"):
        LatentFolderDataset(tmp_path)


def test_couplings(tmp_path):
    from fmrt.reflow import save_couplings
    p = str(tmp_path / "c.safetensors")
    save_couplings(p, {"noise": torch.randn(3, 3, 2, 8, 8), "sample": torch.randn(3, 3, 2, 8, 8),
                       "cond": torch.tensor([0, 1, 2])})
    ds = CouplingDataset(p)
    x, y, n = collate([ds[0], ds[2]])
    assert torch.equal(x, ds.samples[[0, 2]]) and torch.equal(n, ds.noise[[0, 2]])
    assert y.tolist() == [0, 2]
    save_file({"noise": torch.randn(3, 4), "sample": torch.randn(2, 4)}, p)
    with pytest.raises(ValueError, match="shape"):
        CouplingDataset(p)
    with pytest.raises(FileNotFoundError):
        CouplingDataset(str(tmp_path / "none.safetensors"))


def _shard(path, n, seed, cond="labels", shape=(3, 2, 8, 8)):
    from fmrt.reflow import save_couplings
    g = torch.Generator().manual_seed(seed)
    t = {"noise": torch.randn(n, *shape, generator=g), "sample": torch.randn(n, *shape, generator=g)}
    if cond == "labels":
        t["cond"] = torch.arange(n) % 3
    elif cond == "embeddings":
        t["cond"] = torch.randn(n, 4, 5, generator=g)
    save_couplings(str(path), t)
    return t


def test_couplings_from_shards_concatenate_in_order(tmp_path):
    a = _shard(tmp_path / "a.safetensors", 3, seed=0)
    b = _shard(tmp_path / "b.safetensors", 2, seed=1)
    ds = CouplingDataset([tmp_path / "a.safetensors", str(tmp_path / "b.safetensors")])
    assert len(ds) == 5 and ds.sample_shape == (3, 2, 8, 8) and ds.cond_key == "labels"
    assert torch.equal(ds.noise, torch.cat([a["noise"], b["noise"]]))
    assert torch.equal(ds.samples, torch.cat([a["sample"], b["sample"]]))
    x, y, n = ds[4]
    assert torch.equal(x, b["sample"][1]) and torch.equal(n, b["noise"][1]) and y == 1
    assert ds.config() == dict(kind="couplings", paths=[str(tmp_path / "a.safetensors"),
                                                        str(tmp_path / "b.safetensors")])
    # one file, given alone or as a one-element list, records `path` as before shards existed
    one = str(tmp_path / "a.safetensors")
    assert CouplingDataset(one).config() == CouplingDataset([one]).config() == dict(
        kind="couplings", path=one)


@pytest.mark.parametrize("other, match", [
    (dict(shape=(3, 2, 8, 4)), "sample shape .*differs"),
    (dict(cond=None), "conditioning \\(none\\) differs"),
    (dict(cond="embeddings"), "conditioning \\(float \\[4, 5\\].*differs .*labels"),
])
def test_couplings_shards_must_agree(tmp_path, other, match):
    _shard(tmp_path / "a.safetensors", 3, seed=0)
    _shard(tmp_path / "b.safetensors", 2, seed=1, **other)
    with pytest.raises(ValueError, match=match):
        CouplingDataset([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


def test_couplings_shards_from_one_seed_are_refused(tmp_path):
    """Two reflow runs with the same --seed (or one file twice) repeat every coupling."""
    _shard(tmp_path / "a.safetensors", 3, seed=0)
    _shard(tmp_path / "b.safetensors", 2, seed=1)
    _shard(tmp_path / "a2.safetensors", 3, seed=0)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for again in (tmp_path / "a.safetensors", tmp_path / "a2.safetensors"):
        with pytest.raises(ValueError, match="a2?.safetensors starts from the same noise as "
                                             ".*a.safetensors"):
            CouplingDataset(paths + [again])
    with pytest.raises(ValueError, match="no couplings file"):
        CouplingDataset([])
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        CouplingDataset(paths + [tmp_path / "none.safetensors"])
    _shard(tmp_path / "empty.safetensors", 0, seed=2)
    for given in ([tmp_path / "empty.safetensors"], paths + [tmp_path / "empty.safetensors"]):
        with pytest.raises(ValueError, match="empty.safetensors holds no couplings"):
            CouplingDataset(given)
