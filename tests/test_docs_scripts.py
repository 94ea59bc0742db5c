"""The experiment scripts under docs/ that the README's commands run: they load and run on a
tiny model, and give the exact answers they can be checked on."""
import importlib.util
import json
import os

import pytest
import torch

from fmrt.checkpoint import export_model, load_model
from fmrt.reflow import make_couplings, save_couplings
from fmrt.sampling import generate_clips
from tests.test_sampling_clips import _model as tiny_clip_model

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
SHAPE = (3, 2, 8, 8)              # tiny_clip_model's sample_shape


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", os.path.join(DOCS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny(tmp_path):
    """A tiny exported DiT and 8 couplings drawn from it with one Euler step."""
    model, meta = tiny_clip_model()
    meta = dict(model=model.config.to_dict(),
                sample=dict(meta["sample"], steps=1, guidance_scale=1.0, num_classes=6))
    path = str(tmp_path / "m.safetensors")
    export_model(path, model.state_dict(), meta)
    model, meta = load_model(path)
    cond = torch.arange(8) % 6

    def one_step(m, noise, cond=None):
        return generate_clips(model, meta, cond, steps=1, noise=noise, clamp=False)
    pairs = make_couplings(model, 8, SHAPE, cond=cond, seed=5, sample_fn=one_step)
    cpath = str(tmp_path / "c.safetensors")
    save_couplings(cpath, pairs)
    return path, cpath


def test_reflow_sharpness_is_exact_on_the_model_that_drew_the_couplings(tiny, capsys):
    path, cpath = tiny
    _script("reflow_sharpness").main([cpath, path])
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3
    assert "mse 0.0000" in rows[0] and "alpha +0.0000" in rows[0]
    # the couplings are this model's own 1-step samples: its 1-step row is the teacher's row
    assert rows[1].split("|dx|")[1] == rows[0].split("|dx|")[1]
    assert "mse 0.0000" not in rows[2]


def test_adversarial_reflow_trains_and_exports(tiny, tmp_path, monkeypatch, capsys):
    path, cpath = tiny
    out = str(tmp_path / "adv")
    monkeypatch.setattr("sys.argv", ["adversarial_reflow.py", "--init", path, "--out", out,
                                     "--couplings", cpath, cpath, "--steps", "2",
                                     "--d-warmup", "1", "--w-adv", "0.5"])
    _script("adversarial_reflow").main()
    logs = [json.loads(line) for line in open(out + ".log.jsonl")]
    assert [r["step"] for r in logs] == [0, 1]
    assert logs[0]["lam"] == 0.0 and logs[1]["lam"] > 0.0      # the term starts after d_warmup
    first, _ = load_model(out + "_step0001.safetensors")
    last, meta = load_model(out + ".safetensors")
    assert meta["train"]["adversarial_prototype"]["w_adv"] == 0.5
    base, _ = load_model(path)
    moved = [not torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                   last.state_dict().values())]
    assert any(moved)
    assert "wall" in capsys.readouterr().out
    # it never replaces a file: not its earlier output, not the model it starts from
    monkeypatch.setattr("sys.argv", ["adversarial_reflow.py", "--init", path, "--out",
                                     path[:-len(".safetensors")], "--couplings", cpath])
    before = open(path, "rb").read()
    with pytest.raises(SystemExit, match="exists; pick another --out"):
        _script("adversarial_reflow").main()
    assert open(path, "rb").read() == before


def test_element_huber_loss_is_the_per_element_pseudo_huber():
    loss_fn = _script("element_huber_reflow").element_huber_loss
    g = torch.Generator().manual_seed(0)
    pred, x0, noise = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    pred.requires_grad_(True)
    weight = torch.tensor([1.0, 0.5, 2.0])
    c = 0.1
    d = pred - (noise - x0)
    want = ((torch.sqrt(d * d + c * c) - c).mean(dim=(1, 2)) * weight).mean()
    got = loss_fn(pred, x0, noise, weight=weight, huber_c=c)
    torch.testing.assert_close(got, want)
    (gp,) = torch.autograd.grad(got, pred)
    torch.testing.assert_close(gp, (d / torch.sqrt(d * d + c * c) * weight.view(3, 1, 1) / 24).detach())
    # small C: the mean absolute error
    torch.testing.assert_close(loss_fn(pred, x0, noise, huber_c=1e-6), d.abs().mean(),
                               atol=1e-5, rtol=0)
    with pytest.raises(SystemExit, match="--couplings and --huber-c only"):
        loss_fn(pred, x0, None, seed=1, huber_c=c)
