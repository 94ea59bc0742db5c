import os

import pytest
import torch

from fmrt.data import CouplingDataset, collate
from fmrt.reflow import load_couplings, make_couplings, save_couplings
from fmrt.sampling import sample


class ConstVelocity(torch.nn.Module):
    """v(x, sigma, cond) = w[cond] (or w[0]): Euler from sigma 1 to 0 ends exactly at noise - w."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, sigma, cond=None):
        w = self.w[0].expand_as(x) if cond is None else self.w[cond]
        return w.to(x.dtype)


class Linear(torch.nn.Module):
    def forward(self, x, sigma, cond=None):
        return x * (0.5 + sigma.view(-1, *[1] * (x.ndim - 1)))


def test_exact_answer_and_batching():
    m = ConstVelocity((2, 3))
    cond = torch.tensor([0, 1, 2, 1, 0])
    c = make_couplings(m, 5, (2, 3), steps=4, cond=cond, seed=3, batch_size=2)
    want_noise = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c["noise"], want_noise)
    torch.testing.assert_close(c["sample"], want_noise - m.w[cond].detach())
    assert torch.equal(c["cond"], cond)


def test_default_sampler_matches_fmrt_sample_any_batch_size():
    m = Linear()
    a = make_couplings(m, 5, (4,), steps=6, seed=1, batch_size=5)
    b = make_couplings(m, 5, (4,), steps=6, seed=1, batch_size=2)
    torch.testing.assert_close(a["sample"], b["sample"])
    torch.testing.assert_close(a["sample"], sample(m, a["noise"], steps=6))
    assert "cond" not in a


def test_custom_sample_fn_and_bad_output():
    c = make_couplings(Linear(), 3, (2,), sample_fn=lambda m, n, cond=None: 2 * n, seed=0)
    torch.testing.assert_close(c["sample"], 2 * c["noise"])
    with pytest.raises(ValueError, match="sample_fn"):
        make_couplings(Linear(), 3, (2,), sample_fn=lambda m, n, cond=None: n[:, :1])


def test_save_load_roundtrip_and_dataset(tmp_path):
    cond = torch.tensor([2, 0, 1])
    c = make_couplings(ConstVelocity((2,)), 3, (2,), steps=2, cond=cond, seed=0)
    path = tmp_path / "pairs.safetensors"
    save_couplings(path, c)
    assert os.listdir(tmp_path) == ["pairs.safetensors"]  # no temporary file left
    back = load_couplings(path)
    for k in ("noise", "sample", "cond"):
        assert torch.equal(back[k], c[k])
    ds = CouplingDataset(path)
    assert len(ds) == 3
    x, label, noise = ds[1]
    assert torch.equal(x, c["sample"][1]) and torch.equal(noise, c["noise"][1])
    assert label == 0
    xs, conds, noises = next(iter(torch.utils.data.DataLoader(ds, batch_size=3,
                                                              collate_fn=collate)))
    assert torch.equal(xs, c["sample"]) and torch.equal(conds, cond)
    assert torch.equal(noises, c["noise"])


def test_bad_input(tmp_path):
    m = Linear()
    with pytest.raises(ValueError, match="num"):
        make_couplings(m, 0, (2,))
    with pytest.raises(ValueError, match="batch_size"):
        make_couplings(m, 2, (2,), batch_size=0)
    with pytest.raises(ValueError, match="cond"):
        make_couplings(m, 2, (2,), cond=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="model"):
        make_couplings(None, 2, (2,))
    with pytest.raises(ValueError, match="shape"):
        save_couplings(tmp_path / "x.safetensors", {"noise": torch.zeros(2, 3),
                                                    "sample": torch.zeros(2, 4)})
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"noise": torch.zeros(2, 3)}, str(bad))
    with pytest.raises(ValueError, match="sample"):
        CouplingDataset(bad)
