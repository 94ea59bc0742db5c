import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import fmrt
from fmrt.cli import DEFAULT_CHECKPOINT, main

TINY_FLAGS = ["--dim", "32", "--num-layers", "1", "--num-heads", "2", "--ffn-dim", "64",
              "--frames", "2", "--size", "8", "--batch-size", "4", "--no-progress",
              "--device", "cpu", "--sample-steps", "3", "--sample-guidance", "2"]


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "COMMAND" in out
    for cmd in ("sample", "train", "eval", "reflow", "info"):
        assert cmd in out


def test_version_and_console_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fmrt.cli", "--version"], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    assert fmrt.__version__ in out


def test_info(capsys):
    assert main(["info"]) == 0
    assert "FMRT_BACKEND" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    assert main(["train", "--out-dir", str(d), "--steps", "2", *TINY_FLAGS]) == 0
    return str(d / "model.safetensors")


def test_train_cli_writes_model(tiny_model, capsys):
    meta = json.load(open(tiny_model[:-len(".safetensors")] + ".json"))
    assert meta["step"] == 2 and meta["model"]["dim"] == 32
    assert meta["train"]["batch_size"] == 4 and meta["sample"]["steps"] == 3


def test_train_cli_resume(tiny_model, capsys):
    d = os.path.dirname(tiny_model)
    assert main(["train", "--out-dir", d, "--steps", "3", "--resume", *TINY_FLAGS]) == 0
    assert json.load(open(os.path.join(d, "model.json")))["step"] == 3


def test_sample_cli_png_gif_diagnostics(tiny_model, tmp_path, capsys):
    out, gif, diag = tmp_path / "s.png", tmp_path / "s.gif", tmp_path / "d.png"
    assert main(["sample", "--checkpoint", tiny_model, "--out", str(out), "--gif", str(gif),
                 "--num", "3", "--diagnostics", str(diag), "--seed", "1"]) == 0
    img = Image.open(out)
    assert img.size[1] > 3 * 8 * 4          # three rows of 8-pixel frames upscaled 4x
    assert Image.open(gif).n_frames == 2
    assert Image.open(diag).size[0] > 100
    assert "3 steps" in capsys.readouterr().out    # the steps recorded in model.json


def test_sample_class_and_solver(tiny_model, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", tiny_model, "--out", str(out), "--num", "2",
                 "--class", "disc-fall", "--solver", "heun", "--steps", "2",
                 "--guidance-scale", "1", "--dtype", "bfloat16"]) == 0
    assert out.exists()


def test_meanflow_model_samples_with_its_own_solver_by_default(tmp_path, capsys):
    # a MeanFlow model's sampler is u(z, r, t): without --solver, sample and eval use it (and
    # the same samples as an explicit --solver meanflow); a flow model keeps euler; policies
    # that need euler are refused with the way out
    d = tmp_path / "mf"
    flags = TINY_FLAGS[:-2]
    assert flags[-2:] == ["--sample-steps", "3"]         # no --sample-guidance: the default
    assert main(["train", "--out-dir", str(d), "--steps", "1", "--objective", "meanflow",
                 "--cond-drop", "0.5", "--cfg-omega", "2", *flags]) == 0
    model = str(d / "model.safetensors")
    assert json.load(open(d / "model.json"))["sample"]["guidance_scale"] == 1.0   # folded
    capsys.readouterr()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["sample", "--checkpoint", model, "--out", str(a), "--num", "2",
                 "--steps", "1"]) == 0
    assert "meanflow 1 steps" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", model, "--out", str(b), "--num", "2",
                 "--steps", "1", "--solver", "meanflow"]) == 0
    assert a.read_bytes() == b.read_bytes()
    js = tmp_path / "q.json"
    assert main(["eval", "--checkpoint", model, "--steps", "1", "--num-per-class", "2",
                 "--no-progress", "--json", str(js)]) == 0
    res = json.load(open(js))["results"]
    assert [(r["solver"], r["guidance_scale"]) for r in res] == [("real data", 0.0),
                                                                  ("meanflow", 1.0)]
    assert main(["sample", "--checkpoint", model, "--out", str(tmp_path / "c.png"),
                 "--cache", "periodic:2"]) == 2
    assert "pass --solver euler" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", model, "--out", str(tmp_path / "c.png"),
                 "--guidance-reuse", "static:2"]) == 2
    assert "--guidance-reuse needs --solver euler" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", model, "--out", str(tmp_path / "c.png"),
                 "--solver", "heun", "--cache", "periodic:2"]) == 2
    assert "--cache needs a one-evaluation-per-step solver, not --solver heun" in \
        capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
    assert main(["sample", "--checkpoint", model, "--out", str(tmp_path / "c.png"), "--num",
                 "2", "--steps", "1", "--solver", "euler"]) == 0
    assert "euler 1 steps" in capsys.readouterr().out


def test_train_wan_conditioned_then_sample_and_eval(tmp_path, capsys):
    """--text-dim: class labels through fixed text-like embeddings (Wan's conditioning);
    --patch-size; the model samples and evaluates like any class-conditional one."""
    d = tmp_path / "wan"
    assert main(["train", "--out-dir", str(d), "--steps", "2", "--text-dim", "8",
                 "--class-tokens", "2", "--patch-size", "1", "4", "4", *TINY_FLAGS]) == 0
    meta = json.load(open(d / "model.json"))["model"]
    assert (meta["text_dim"], meta["num_classes"], meta["class_tokens"]) == (8, 6, 2)
    assert meta["patch_size"] == [1, 4, 4]
    from safetensors.torch import load_file
    assert load_file(str(d / "model.safetensors"))["class_text"].shape == (7, 2, 8)
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(d / "model.safetensors"), "--out", str(out),
                 "--num", "2"]) == 0
    assert out.exists()
    assert main(["eval", "--checkpoint", str(d / "model.safetensors"), "--steps", "1",
                 "--guidance-scale", "2", "--num-per-class", "2"]) == 0


def test_sample_cpu_threads(tiny_model, tmp_path):
    """On a CPU, fmrt sample uses at most two threads unless OMP_NUM_THREADS says otherwise,
    and OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the user chose."""
    from fmrt.cli import sample_threads
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    args = [sys.executable, "-c", "import os, sys; from fmrt.cli import main; code = main(sys.argv"
            "[1:]); print('policy', os.environ.get('OMP_WAIT_POLICY')); sys.exit(code)",
            "sample", "--checkpoint", tiny_model, "--num", "1", "--steps", "1",
            "--out", str(tmp_path / "s.png")]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert f"{sample_threads()} CPU threads" in r.stdout and "policy PASSIVE" in r.stdout
    assert 1 <= sample_threads() <= 2
    r = subprocess.run(args + ["--overwrite"], capture_output=True, text=True,
                       env=dict(env, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE"))
    assert r.returncode == 0 and "1 CPU threads" in r.stdout, r.stderr
    assert "policy ACTIVE" in r.stdout


def test_eval_cli(tiny_model, tmp_path, capsys):
    js = tmp_path / "q.json"
    assert main(["eval", "--checkpoint", tiny_model, "--steps", "1", "2",
                 "--guidance-scale", "1", "--num-per-class", "2", "--json", str(js)]) == 0
    res = json.load(open(js))["results"]
    assert [(r["steps"], r["guidance_scale"]) for r in res] == [(0, 0.0), (1, 1.0), (2, 1.0)]
    assert res[0]["solver"] == "real data"   # (8x8 clips: not what the classifier knows)
    assert all(0 <= r["accuracy"] <= 1 and r["fd"] >= 0 for r in res)
    assert "accuracy" in capsys.readouterr().out


def test_eval_cli_reference_per_class(tiny_model, tmp_path, capsys):
    """--reference-per-class K: every row's FD is against K real clips of each class (data seed
    999), however many clips are generated; the JSON records the reference's size."""
    from fmrt.checkpoint import load_model
    from fmrt.data import ShapesVideo
    from fmrt.eval import frechet_distance, load_classifier, reference_features, _features_logits
    js = tmp_path / "q.json"
    assert main(["eval", "--checkpoint", tiny_model, "--steps", "1", "--guidance-scale", "1",
                 "--num-per-class", "2", "--reference-per-class", "5", "--no-progress",
                 "--json", str(js)]) == 0
    doc = json.load(open(js))
    assert doc["reference_per_class"] == 5
    _, meta = load_model(tiny_model)
    _, frames, size, _ = meta["sample"]["sample_shape"]
    K = meta["sample"]["num_classes"]
    clf = load_classifier()[0]
    ref = reference_features(clf, torch.arange(K).repeat_interleave(5), frames=frames, size=size)
    assert ref.shape[0] == 5 * K
    ds = ShapesVideo(10 ** 6, frames=frames, size=size, seed=4242)
    real = torch.cat([ds.clips_of_class(c, 2) for c in range(K)])
    assert doc["results"][0]["fd"] == frechet_distance(ref, _features_logits(clf, real)[0])
    assert main(["eval", "--checkpoint", tiny_model, "--steps", "1", "--guidance-scale", "1",
                 "--num-per-class", "2", "--no-progress", "--json", str(tmp_path / "d.json")]) == 0
    assert json.load(open(tmp_path / "d.json"))["reference_per_class"] == 2
    assert json.load(open(tmp_path / "d.json"))["results"][0]["fd"] != doc["results"][0]["fd"]


def test_eval_cli_several_seeds(tiny_model, tmp_path, capsys):
    """--seed S S ...: each seed's rows are the single-seed run's, and the summary is their
    mean and spread; a seed given twice is refused before anything runs."""
    common = ["eval", "--checkpoint", tiny_model, "--steps", "1", "2", "--guidance-scale", "1",
              "--num-per-class", "2", "--no-progress"]
    assert main(common + ["--seed", "3", "5", "--json", str(tmp_path / "m.json")]) == 0
    assert "over 2 seeds" in capsys.readouterr().out
    doc = json.load(open(tmp_path / "m.json"))
    assert doc["seeds"] == [3, 5]
    rows = doc["results"][1:]
    assert [(r["steps"], r["seed"]) for r in rows] == [(1, 3), (1, 5), (2, 3), (2, 5)]
    for seed in (3, 5):
        assert main(common + ["--seed", str(seed), "--json", str(tmp_path / f"{seed}.json")]) == 0
        one = json.load(open(tmp_path / f"{seed}.json"))
        assert one["over_seeds"][0]["fd_sd"] is None
        for r1 in one["results"][1:]:
            (r,) = [r for r in rows if (r["steps"], r["seed"]) == (r1["steps"], seed)]
            assert r["fd"] == r1["fd"] and r["accuracy"] == r1["accuracy"]
    for o in doc["over_seeds"]:
        fds = [r["fd"] for r in rows if r["steps"] == o["steps"]]
        assert o["seeds"] == [3, 5] and o["fd_mean"] == pytest.approx(sum(fds) / 2)
        assert o["fd_sd"] == pytest.approx(abs(fds[0] - fds[1]) / 2 ** 0.5)
        assert (o["fd_min"], o["fd_max"]) == (min(fds), max(fds))
    capsys.readouterr()
    _one_line_error(capsys, common + ["--seed", "1", "1"], "each seed once")


def test_eval_and_sample_with_a_guide_model(tiny_model, tmp_path, capsys):
    """Autoguidance (--guide-model): guided by the model itself, g = c, so any scale gives the
    unguided clips exactly; the JSON names the guide on the guided rows."""
    js = tmp_path / "q.json"
    assert main(["eval", "--checkpoint", tiny_model, "--guide-model", tiny_model, "--steps", "2",
                 "--guidance-scale", "1", "3", "--num-per-class", "2", "--json", str(js)]) == 0
    res = json.load(open(js))["results"]
    assert [(r["guidance_scale"], r["guide_model"]) for r in res[1:]] == [(1.0, None),
                                                                          (3.0, tiny_model)]
    assert res[1]["fd"] == pytest.approx(res[2]["fd"], rel=1e-4)
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", tiny_model, "--guide-model", tiny_model, "--out",
                 str(out), "--num", "2", "--guidance-scale", "2"]) == 0
    assert f"away from {tiny_model}" in capsys.readouterr().out and out.exists()
    for argv, match in [
        (["eval", "--guidance-scale", "1"], "other than 1"),
        (["sample", "--guidance-scale", "2", "--guide-model", str(tmp_path / "none.safetensors"),
          "--checkpoint", tiny_model], "none"),
    ]:
        if "--checkpoint" not in argv:
            argv = argv[:1] + ["--checkpoint", tiny_model, "--guide-model", tiny_model] + argv[1:]
        _one_line_error(capsys, argv + ["--out" if argv[0] == "sample" else "--json",
                                        str(tmp_path / ("x.png" if argv[0] == "sample" else "x.json"))],
                        match)


def _one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def test_bad_arguments(capsys, tmp_path):
    for argv, match in [
        (["sample", "--steps", "0"], "--steps"),
        (["sample", "--steps", "x"], "--steps"),
        (["sample", "--num", "-1"], "--num"),
        (["sample", "--guidance-scale", "nan"], "--guidance-scale"),
        (["sample", "--solver", "rk45"], "--solver"),
        (["sample", "--class", "hexagon"], "--class"),
        (["sample", "--dtype", "int8"], "--dtype"),
        (["train", "--lr", "0"], "--lr"),
        (["train", "--timestep-sampler", "x"], "--timestep-sampler"),
        (["eval", "--num-per-class", "1"], "--num-per-class"),
        (["eval", "--reference-per-class", "1"], "--reference-per-class"),
        (["nonsense"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and match in err, (argv, err)


def test_checkpoint_errors(tiny_model, tmp_path, capsys):
    out = str(tmp_path / "o.png")
    _one_line_error(capsys, ["sample", "--checkpoint", str(tmp_path / "none.safetensors"),
                             "--out", out], "no such checkpoint")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x02 not safetensors")
    _one_line_error(capsys, ["sample", "--checkpoint", str(bad), "--out", out], "bad.safetensors")
    # a config of one shape over weights of another
    other = tmp_path / "other"
    assert main(["train", "--out-dir", str(other), "--steps", "1",
                 *[f if f != "32" else "64" for f in TINY_FLAGS]]) == 0
    mixed = tmp_path / "mixed.safetensors"
    mixed.write_bytes((other / "model.safetensors").read_bytes())
    (tmp_path / "mixed.json").write_text(open(tiny_model[:-len(".safetensors")] + ".json").read())
    _one_line_error(capsys, ["sample", "--checkpoint", str(mixed), "--out", out],
                    "another shape")
    _one_line_error(capsys, ["sample", "--checkpoint", tiny_model, "--class", "9",
                             "--out", out], "--class")


def test_unwritable_outputs(tiny_model, tmp_path, capsys):
    _one_line_error(capsys, ["sample", "--checkpoint", tiny_model, "--out",
                             str(tmp_path / "no" / "dir" / "x.png")], "does not exist")
    _one_line_error(capsys, ["sample", "--checkpoint", tiny_model, "--out", str(tmp_path)],
                    "is a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        _one_line_error(capsys, ["sample", "--checkpoint", tiny_model, "--out",
                                 str(ro / "x.png")], "permission denied")
    finally:
        ro.chmod(0o700)


def test_train_errors(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(capsys, ["train", "--out-dir", str(f / "sub"), "--steps", "1",
                             *TINY_FLAGS], "cannot create output directory")
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "missing"), "--out-dir",
                             str(tmp_path / "o"), *TINY_FLAGS], "no such folder")
    _one_line_error(capsys, ["train", "--resume", str(tmp_path / "none.safetensors"),
                             "--out-dir", str(tmp_path / "o"), *TINY_FLAGS], "no such checkpoint")


def test_embedded_model_sample_default(tmp_path):
    """`fmrt sample` with no arguments: the embedded model, a PNG. (How long it takes is in the
    README's Quickstart, measured; a test on a shared CPU asserts no time.)"""
    assert os.path.isfile(DEFAULT_CHECKPOINT)
    assert os.path.getsize(DEFAULT_CHECKPOINT) < 8 * 2 ** 20
    r = subprocess.run([sys.executable, "-m", "fmrt.cli", "sample"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    img = Image.open(tmp_path / "fmrt_samples.png")
    assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200


def test_reflow_then_train_on_couplings(tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file
    c = tmp_path / "c.safetensors"
    assert main(["reflow", "--checkpoint", tiny_model, "--num", "8", "--batch-size", "3",
                 "--steps", "2", "--guidance-scale", "1", "--out", str(c)]) == 0
    t = load_file(str(c))
    assert t["noise"].shape == t["sample"].shape == (8, 3, 2, 8, 8)
    assert t["cond"].tolist() == [i % 6 for i in range(8)]
    # the samples are the sampler's output from exactly that noise
    from fmrt.checkpoint import load_model
    from fmrt.sampling import generate_clips
    model, meta = load_model(tiny_model)
    again = generate_clips(model, meta, t["cond"][:2], steps=2, noise=t["noise"][:2],
                           clamp=False)
    torch.testing.assert_close(again, t["sample"][:2])
    # a second shard from another seed; training reads both as one set
    c2 = tmp_path / "c2.safetensors"
    capsys.readouterr()
    assert main(["reflow", "--checkpoint", tiny_model, "--num", "4", "--steps", "2",
                 "--guidance-scale", "1", "--seed", "1", "--out", str(c2), "--no-progress",
                 "--batch-size", "3"]) == 0
    log = capsys.readouterr().err.splitlines()   # --no-progress: a plain line per batch
    assert [x.split(", ")[0] for x in log] == ["fmrt reflow: batch 1/2 (3/4 couplings)",
                                               "fmrt reflow: batch 2/2 (4/4 couplings)"]
    out = tmp_path / "rf"
    assert main(["train", "--couplings", str(c), str(c2), "--out-dir", str(out), "--steps", "2",
                 "--init", tiny_model, *TINY_FLAGS]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["data"] == dict(kind="couplings", paths=[str(c), str(c2)])
    assert meta["train"]["couplings"] == [str(c), str(c2)]


def test_reflow_guidance_interval(tiny_model, tmp_path, capsys):
    """--guidance-interval reaches the sampler (the samples are generate_clips' with that
    interval from the same noise, and differ from guidance at every step) and is printed."""
    from safetensors.torch import load_file
    from fmrt.checkpoint import load_model
    from fmrt.sampling import generate_clips
    model, meta = load_model(tiny_model)
    got = {}
    for name, flags in (("iv", ["--guidance-interval", "0", "0.5"]), ("all", [])):
        c = tmp_path / f"{name}.safetensors"
        assert main(["reflow", "--checkpoint", tiny_model, "--num", "4", "--steps", "3",
                     "--guidance-scale", "3", "--out", str(c), "--no-progress", *flags]) == 0
        got[name] = load_file(str(c))
        out = capsys.readouterr().out
        assert ("on sigma in [0, 0.5]" in out) == (name == "iv")
    t = got["iv"]
    want = generate_clips(model, meta, t["cond"], steps=3, guidance_scale=3.0, noise=t["noise"],
                          clamp=False, guidance_interval=(0.0, 0.5))
    torch.testing.assert_close(t["sample"], want)
    assert torch.equal(t["noise"], got["all"]["noise"])
    every = generate_clips(model, meta, t["cond"], steps=3, guidance_scale=3.0,
                           noise=t["noise"], clamp=False)
    torch.testing.assert_close(got["all"]["sample"], every)
    assert not torch.equal(t["sample"], got["all"]["sample"])
    assert main(["reflow", "--checkpoint", tiny_model, "--guidance-interval", "0.6", "0.2",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "LO must be <= HI" in capsys.readouterr().err


def test_training_checkpoints_are_never_overwritten(tiny_model, tmp_path):
    """A training checkpoint (fmrt.train_state) is protected like a model, even with
    --overwrite; checked byte for byte."""
    from tests.cli_run import assert_one_line_error, assert_unchanged, run_fmrt, snapshot
    ckpts = os.path.join(os.path.dirname(tiny_model), "checkpoints")
    step = sorted(f for f in os.listdir(ckpts) if f.endswith(".safetensors"))[-1]
    path = os.path.join(ckpts, step)
    before = snapshot(path, path[: -len(".safetensors")] + ".json")
    r = run_fmrt("reflow", "--out", path, "--overwrite", cwd=tmp_path)
    assert_one_line_error(r, step, "fmrt model or training checkpoint")
    r = run_fmrt("eval", "--json", path[: -len(".safetensors")] + ".json", "--overwrite",
                 cwd=tmp_path)
    assert_one_line_error(r, "metadata of the model")
    assert_unchanged(before)


def test_export_averages_several_models(tiny_model, tmp_path, capsys):
    """fmrt export --checkpoint A B [--weights ...] writes the weight average (the first model's
    sampling defaults, the sources recorded) that fmrt sample then loads; bad input is one line
    and writes nothing."""
    from fmrt.checkpoint import load_model, read_meta
    run = os.path.dirname(tiny_model)
    ck = sorted(os.listdir(os.path.join(run, "checkpoints")))
    ck = os.path.join(run, "checkpoints", [f for f in ck if f.endswith(".safetensors")][0])
    other = str(tmp_path / "other.safetensors")       # the same model, other weights
    model, meta = load_model(tiny_model)
    from fmrt.checkpoint import export_model
    export_model(other, {k: v + 1 if v.is_floating_point() else v
                         for k, v in model.state_dict().items()},
                 {k: v for k, v in meta.items() if k != "format"})
    out = str(tmp_path / "avg.safetensors")
    assert main(["export", "--checkpoint", tiny_model, other, "--weights", "3", "1",
                 "--out", out, "--steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "the average of" in printed and "(0.75)" in printed and "(0.25)" in printed
    got = read_meta(out)
    assert got["sample"]["steps"] == 5 and [a["weight"] for a in got["averaged_from"]] == \
        [0.75, 0.25]
    avg = load_model(out)[0].state_dict()
    for k, v in model.state_dict().items():
        assert torch.allclose(avg[k], v + 0.25, atol=1e-6), k
    png = str(tmp_path / "s.png")
    assert main(["sample", "--checkpoint", out, "--num", "2", "--out", png,
                 "--no-progress"]) == 0
    capsys.readouterr()
    bad = str(tmp_path / "bad.safetensors")
    for argv, match in [
        (["--checkpoint", tiny_model, "--weights", "1"], "give several --checkpoint"),
        (["--checkpoint", tiny_model, other, "--weights", "1"], "1 weights for 2 models"),
        (["--checkpoint", tiny_model, tiny_model], "given twice"),
        (["--checkpoint", tiny_model, str(tmp_path / "none.safetensors")], "none.safetensors"),
    ]:
        _one_line_error(capsys, ["export", *argv, "--out", bad], match)
    with pytest.raises(SystemExit) as e:            # argparse: a weight must be positive
        main(["export", "--checkpoint", tiny_model, ck, "--weights", "1", "0", "--out", bad])
    assert e.value.code == 2 and "--weights: must be > 0" in capsys.readouterr().err
    _one_line_error(capsys, ["export", "--checkpoint", tiny_model, other, "--out", other],
                    "same file as --checkpoint")
    assert not os.path.exists(bad)


def test_export_records_sampling_defaults_that_sample_and_eval_use(tiny_model, tmp_path, capsys):
    from fmrt.checkpoint import load_model, read_meta
    m = str(tmp_path / "m.safetensors")
    assert main(["export", "--checkpoint", tiny_model, "--out", m, "--steps", "4",
                 "--guidance-interval", "0", "0.6"]) == 0
    assert "guidance 2.0 on sigma in [0, 0.6]" in capsys.readouterr().out
    assert read_meta(m)["sample"]["steps"] == 4
    for k, v in load_model(tiny_model)[0].state_dict().items():     # the same weights
        assert torch.equal(load_model(m)[0].state_dict()[k], v), k
    png = str(tmp_path / "s.png")
    assert main(["sample", "--checkpoint", m, "--num", "2", "--out", png, "--no-progress"]) == 0
    assert "euler 4 steps, guidance 2 on sigma in [0, 0.6]" in capsys.readouterr().out
    js = tmp_path / "q.json"
    assert main(["eval", "--checkpoint", m, "--steps", "2", "--guidance-scale", "1", "2",
                 "--num-per-class", "2", "--json", str(js), "--no-progress"]) == 0
    rows = json.load(open(js))["results"]
    assert [r["guidance_interval"] for r in rows[1:]] == [None, [0.0, 0.6]]
    assert main(["eval", "--checkpoint", m, "--steps", "2", "--guidance-scale", "2",
                 "--guidance-interval", "0", "1", "--num-per-class", "2", "--json", str(js),
                 "--overwrite", "--no-progress"]) == 0
    assert json.load(open(js))["results"][1]["guidance_interval"] == [0.0, 1.0]
    # --no-guidance-interval removes it; a model file is never replaced, an input never
    m2 = str(tmp_path / "m2.safetensors")
    assert main(["export", "--checkpoint", m, "--out", m2, "--no-guidance-interval"]) == 0
    assert "guidance_interval" not in read_meta(m2)["sample"]
    before = open(m2, "rb").read()
    capsys.readouterr()
    for argv, match in [
        (["--out", m2, "--overwrite"], "refusing to overwrite it"),
        (["--out", m], "same file as --checkpoint"),
        (["--out", str(tmp_path / "m3.pt")], "ends with .safetensors"),
        (["--out", str(tmp_path / "m3.safetensors"), "--guidance-interval", "0.7", "0.2"],
         "LO must be <= HI"),
    ]:
        _one_line_error(capsys, ["export", "--checkpoint", m, *argv], match)
    assert open(m2, "rb").read() == before and not os.path.exists(tmp_path / "m3.safetensors")
