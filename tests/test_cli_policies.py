"""`fmrt sample` / `fmrt eval` with --guidance-reuse, --guidance-interval and --cache: the flags
reach fmrt.sampling.sample (checked by the model forwards that run); bad settings are one-line
errors (exit 2) before any model is loaded."""
import json

import pytest
import torch

import fmrt.eval
from fmrt.cli import main
from fmrt.models.dit import DiT

TINY = ["--dim", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-dim", "64", "--frames",
        "2", "--size", "8", "--batch-size", "4", "--no-progress", "--device", "cpu",
        "--sample-steps", "4", "--sample-guidance", "3"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    assert main(["train", "--out-dir", str(d), "--steps", "2", *TINY]) == 0
    return str(d / "model.safetensors")


@pytest.fixture
def forwards(monkeypatch):
    """Batch size of every DiT forward, and its cache mode (None without a cache)."""
    seen = []
    orig = DiT.forward

    def spy(self, x, sigma, cond=None, **kw):
        c = kw.get("cache")
        seen.append((x.shape[0], None if c is None else c.mode))
        return orig(self, x, sigma, cond, **kw)

    monkeypatch.setattr(DiT, "forward", spy)
    return seen


def test_sample_flags_reach_the_loop(tiny_model, tmp_path, forwards):
    out = str(tmp_path / "s.png")
    base = ["sample", "--checkpoint", tiny_model, "--out", out, "--num", "2", "--steps", "4",
            "--guidance-scale", "3"]
    assert main(base) == 0
    assert [b for b, _ in forwards] == [4] * 4          # batched CFG at every step
    forwards.clear()
    assert main(base + ["--guidance-reuse", "static:2"]) == 0
    assert [b for b, _ in forwards] == [4, 2, 4, 2]     # refresh, reuse, refresh, reuse
    forwards.clear()
    assert main(base + ["--cache", "first-block:1e9"]) == 0
    # separate cond / uncond calls; every call after the first probes
    assert [m for _, m in forwards] == ["all", "all"] + ["probe"] * 6
    forwards.clear()
    ratios = tmp_path / "r.json"
    ratios.write_text(json.dumps([1.0, 1.0, 1.0, 1.0]))
    assert main(base + ["--cache", "mag:0.5:1:0", "--cache-ratios", str(ratios),
                        "--guidance-reuse", "static:2"]) == 0
    assert [m for _, m in forwards] == ["all", "all", "skip", "all", "all", "skip"]


def test_eval_takes_the_policies(tiny_model, tmp_path, forwards):
    js = tmp_path / "q.json"
    assert main(["eval", "--checkpoint", tiny_model, "--steps", "4", "--guidance-scale", "3",
                 "--num-per-class", "2", "--json", str(js), "--guidance-interval", "0.3",
                 "0.9"]) == 0
    from fmrt.checkpoint import load_model
    from fmrt.sampling import checkpoint_sigma_grid
    _, meta = load_model(tiny_model)[:2]
    sig = checkpoint_sigma_grid(meta, 4, None, "cpu")[:4].tolist()
    n = 12   # 6 classes x 2
    assert [b for b, _ in forwards] == [2 * n if 0.3 <= s <= 0.9 else n for s in sig]
    assert {b for b, _ in forwards} == {n, 2 * n}   # both kinds of step occur
    assert json.load(open(js))["results"][1]["steps"] == 4


def _one_line_error(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def test_bad_settings(capsys, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("fmrt.cli._load", no_load)
    for argv, match in [
        (["sample", "--guidance-reuse", "static:0"], "every"),
        (["sample", "--guidance-reuse", "adaptive:-1"], "tol"),
        (["sample", "--guidance-reuse", "often"], "unknown guidance reuse"),
        (["sample", "--guidance-interval", "0.8", "0.2"], "LO must be <= HI"),
        (["sample", "--guidance-interval", "0.2", "1.5"], "--guidance-interval"),
        (["sample", "--cache", "tea:0.1"], "unknown cache"),
        (["sample", "--cache", "first-block:-1"], "threshold"),
        (["sample", "--cache", "mag:0.1"], "ratios"),
        (["sample", "--cache", "mag:0.1", "--cache-ratios", str(tmp_path / "none.json")],
         "--cache-ratios"),
        (["sample", "--guidance-reuse", "static:2", "--solver", "heun"], "--solver euler"),
        (["sample", "--cache", "first-block:0.1", "--solver", "heun"], "--solver heun"),
        (["eval", "--guidance-reuse", "static:0"], "every"),
        (["sample", "--diffusers", str(tmp_path), "--prompt", "a cat", "--guidance-reuse",
          "static:2", "--no-accelerate"], "drop --no-accelerate"),
    ]:
        _one_line_error(capsys, argv, match)


def test_diffusers_pipeline_takes_the_policies(tmp_path, capsys):
    pytest.importorskip("transformers")
    import numpy as np

    from tests.tiny_wan import tiny_wan_pipeline
    d = tmp_path / "pipe"
    tiny_wan_pipeline().save_pretrained(d)
    run = ["sample", "--diffusers", str(d), "--prompt", "a red cat runs", "--negative-prompt",
           "blue", "--height", "16", "--width", "16", "--frames", "5", "--steps", "4",
           "--seed", "3"]
    full, reuse = tmp_path / "full.npy", tmp_path / "reuse.npy"
    assert main(run + ["--out", str(full)]) == 0
    assert main(run + ["--out", str(reuse), "--guidance-reuse", "static:2",
                       "--cache", "periodic:2:2"]) == 0
    a, b = np.load(full), np.load(reuse)
    assert a.shape == b.shape and 0 < np.abs(a - b).max() < 0.2
