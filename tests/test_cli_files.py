"""No fmrt command destroys its own input, a model, or a file fmrt did not write; outputs are in
the format their names say. Every refusal is checked byte for byte on the files it protects."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fmrt import cli
from tests.cli_run import assert_one_line_error, assert_unchanged, run_fmrt, snapshot

FAST = ["--num", "2", "--steps", "1", "--no-progress"]


@pytest.fixture
def model(tmp_path):
    """A copy of the embedded model, M.safetensors + M.json, in the test's folder."""
    base = cli.DEFAULT_CHECKPOINT[: -len(".safetensors")]
    for ext in (".safetensors", ".json"):
        (tmp_path / f"M{ext}").write_bytes(open(base + ext, "rb").read())
    return tmp_path / "M.safetensors"


def _user_png(path):
    Image.new("RGB", (5, 5), (1, 2, 3)).save(path)
    return path


# -- a command never writes over its own input ---------------------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["sample", "--checkpoint", "M.safetensors", "--out", "M.safetensors"], "M.safetensors"),
    (["sample", "--checkpoint", "M.safetensors", "--out", "M.json"], "M.json"),
    (["reflow", "--checkpoint", "M.safetensors", "--out", "M.safetensors"], "M.safetensors"),
    (["reflow", "--checkpoint", "M.safetensors", "--out", "./sub/../M.safetensors",
      "--overwrite"], "M.safetensors"),
    (["eval", "--checkpoint", "M.safetensors", "--json", "M.json"], "M.json"),
    (["eval", "--checkpoint", "M.safetensors", "--json", "M.json", "--overwrite"], "M.json"),
    (["sample", "--checkpoint", "M.safetensors", "--gif", "p.png", "--out", "p.png"], "p.png"),
    (["sample", "--checkpoint", "M.safetensors", "--out", "q.gif", "--gif"], "q.gif"),
    (["sample", "--checkpoint", "M.safetensors", "--diagnostics", "p.png", "--out", "p.png",
      "--overwrite"], "p.png"),
])
def test_refuses_an_output_that_is_an_input(model, tmp_path, argv, named):
    (tmp_path / "sub").mkdir()
    _user_png(tmp_path / "p.png")
    (tmp_path / "q.gif").write_bytes(b"GIF89a not really")
    before = snapshot(model, model.with_suffix(".json"), tmp_path / "p.png", tmp_path / "q.gif")
    r = run_fmrt(*argv, cwd=tmp_path)
    err = assert_one_line_error(r, named)
    assert "same file" in err
    assert_unchanged(before)


def test_links_to_an_input_are_the_input(model, tmp_path):
    os.symlink(model, tmp_path / "link.safetensors")
    os.link(model, tmp_path / "hard.safetensors")
    before = snapshot(model, model.with_suffix(".json"))
    for out in ("link.safetensors", "hard.safetensors"):
        r = run_fmrt("reflow", "--checkpoint", "M.safetensors", "--out", out, "--overwrite",
                     cwd=tmp_path)
        assert_one_line_error(r, out, "same file as --checkpoint")
    r = run_fmrt("reflow", "--checkpoint", "link.safetensors", "--out", "M.safetensors",
                 cwd=tmp_path)
    assert_one_line_error(r, "M.safetensors", "same file")
    assert_unchanged(before)


# -- models, their metadata and files fmrt did not write ------------------------------------------

def test_never_writes_over_another_model(model, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for ext in (".safetensors", ".json"):
        (other / f"model{ext}").write_bytes(model.with_suffix(ext).read_bytes())
    before = snapshot(other / "model.safetensors", other / "model.json")
    r = run_fmrt("reflow", "--checkpoint", model, "--out", other / "model.safetensors",
                 "--overwrite", cwd=tmp_path)
    assert_one_line_error(r, "model.safetensors", "fmrt model")
    r = run_fmrt("eval", "--checkpoint", model, "--json", other / "model.json", "--overwrite",
                 cwd=tmp_path)
    assert_one_line_error(r, "model.json", "metadata of the model")
    assert_unchanged(before)


def test_existing_files_need_overwrite_unless_fmrt_wrote_them(model, tmp_path, capsys):
    mine = _user_png(tmp_path / "mine.png")
    (tmp_path / "mine.json").write_text('{"my": "notes"}')
    (tmp_path / "c.safetensors").write_bytes(b"earlier couplings")
    (tmp_path / "v.npy").write_bytes(b"a user's array")
    before = snapshot(mine, tmp_path / "mine.json", tmp_path / "c.safetensors",
                      tmp_path / "v.npy")
    for argv, named in [
        (["sample", "--out", "mine.png"], "mine.png"),
        (["sample", "--out", "v.npy"], "v.npy"),
        (["eval", "--json", "mine.json"], "mine.json"),
        (["reflow", "--out", "c.safetensors"], "c.safetensors"),
    ]:
        r = run_fmrt(*argv, "--checkpoint", model, cwd=tmp_path)
        assert_one_line_error(r, named, "--overwrite")
    assert_unchanged(before)
    # fmrt's own earlier output is replaced (rerunning a command works as before) ...
    # (in-process from here: the same main() as the command, without a second torch start-up)
    out = str(tmp_path / "s.png")
    assert cli.main(["sample", "--checkpoint", str(model), "--out", out, *FAST]) == 0
    assert cli._written_by_fmrt(out)
    assert cli.main(["sample", "--checkpoint", str(model), "--out", out, "--seed", "5",
                     *FAST]) == 0
    # ... and --overwrite replaces a user's file
    assert cli.main(["sample", "--checkpoint", str(model), "--out", str(mine), "--overwrite",
                     *FAST]) == 0
    assert Image.open(mine).size[1] > 5 and cli._written_by_fmrt(str(mine))
    assert_unchanged({k: v for k, v in before.items() if not k.endswith("mine.png")})
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# -- formats: what the extension names ------------------------------------------------------------

def _clips(n=3, t=2, h=8, w=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, 3, t, h, w), generator=g) * 2 - 1


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"),
                                         (".webp", "WEBP"), (".PNG", "PNG"), (".gif", "GIF")])
def test_save_clips_writes_the_named_format(tmp_path, suffix, fmt):
    path = str(tmp_path / f"x{suffix}")
    cli.save_clips(_clips(), path, ["a", "b", "c"])
    with Image.open(path) as im:
        assert im.format == fmt
        if fmt == "GIF":
            assert im.n_frames == 2
        else:
            assert im.size[1] > 3 * 8 * 4      # three rows of 8-pixel frames upscaled 4x
    assert cli._written_by_fmrt(path)
    assert os.listdir(tmp_path) == [f"x{suffix}"]   # no temporary file left


def test_save_clips_npy_is_the_frames(tmp_path):
    clips = _clips()
    path = str(tmp_path / "x.npy")
    cli.save_clips(clips, path)
    a = np.load(path)
    assert a.dtype == np.float32 and a.shape == (3, 2, 8, 8, 3)
    np.testing.assert_allclose(a, ((clips + 1) / 2).permute(0, 2, 3, 4, 1).numpy(), atol=1e-6)


def test_unknown_or_missing_extensions_are_refused(model, tmp_path):
    for argv, named in [
        (["sample", "--out", "x.txt"], "'.txt'"), (["sample", "--out", "noext"], "noext"),
        (["sample", "--out", "x.png", "--gif", "x.webm"], "x.webm"),
        (["sample", "--out", "x.png", "--diagnostics", "d.jpg"], "d.jpg"),
        (["eval", "--json", "r.txt"], "r.txt"), (["reflow", "--out", "c.pt"], "c.pt"),
        (["reflow", "--out", "c"], "no file extension"),
    ]:
        r = run_fmrt(*argv, "--checkpoint", model, cwd=tmp_path)
        assert_one_line_error(r, named)
    assert sorted(os.listdir(tmp_path)) == ["M.json", "M.safetensors"]


def test_sample_writes_jpeg_and_npy_end_to_end(model, tmp_path, capsys):
    assert cli.main(["sample", "--checkpoint", str(model), "--out", str(tmp_path / "s.jpg"),
                     "--gif", *FAST]) == 0
    assert Image.open(tmp_path / "s.jpg").format == "JPEG"
    assert Image.open(tmp_path / "s.gif").format == "GIF"
    assert cli.main(["sample", "--checkpoint", str(model), "--out", str(tmp_path / "s.npy"),
                     *FAST]) == 0
    assert np.load(tmp_path / "s.npy").shape == (2, 4, 16, 16, 3)


def test_mp4_needs_the_video_extra(model, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    assert cli.main(["sample", "--checkpoint", str(model), "--out", str(tmp_path / "v.mp4")]) == 2
    assert 'pip install "fmrt[video]"' in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["sample", "--checkpoint", str(model), "--diagnostics",
                     str(tmp_path / "d.png")]) == 2
    assert 'pip install "fmrt[plot]"' in capsys.readouterr().err


def test_mp4(model, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    imageio = pytest.importorskip("imageio.v2")
    r = run_fmrt("sample", "--checkpoint", model, "--out", "v.mp4", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with imageio.get_reader(str(tmp_path / "v.mp4"), format="FFMPEG") as rd:
        assert sum(1 for _ in rd) == 4       # one video frame per clip frame


def test_eval_json_is_marked(model, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(model), "--json", str(tmp_path / "r.json"), "--steps",
            "1", "--guidance-scale", "1", "--num-per-class", "2"]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["written_by"] == f"fmrt {cli.__version__}" and len(res["results"]) == 2
    assert cli.main(argv) == 0       # its own earlier results: replaced
