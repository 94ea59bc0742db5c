"""`fmrt sample --diffusers PATH` end to end on a tiny random WanPipeline saved to disk: fmrt's
accelerated run gives the frames of the stock diffusers run; outputs, flags and errors."""
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from fmrt.cli import main  # noqa: E402
from tests.tiny_wan import tiny_wan_i2v_pipeline, tiny_wan_pipeline  # noqa: E402

RUN = ["--prompt", "a red cat runs", "--negative-prompt", "blue", "--height", "16",
       "--width", "16", "--frames", "5", "--steps", "3", "--seed", "3"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_pipe")
    tiny_wan_pipeline().save_pretrained(d)
    return str(d)


def _frames(pipe_dir, tmp_path, name, *extra):
    out = tmp_path / f"{name}.npy"
    assert main(["sample", "--diffusers", pipe_dir, *RUN, "--out", str(out), *extra]) == 0
    return np.load(out)


def test_accelerated_run_matches_stock_diffusers(pipe_dir, tmp_path, capsys):
    stock = _frames(pipe_dir, tmp_path, "stock", "--no-accelerate")
    assert "stock diffusers" in capsys.readouterr().out
    fast = _frames(pipe_dir, tmp_path, "fast")
    out = capsys.readouterr().out
    assert "fmrt attention on 4 modules" in out and "fmrt Euler scheduler" in out
    assert stock.shape == fast.shape == (1, 5, 16, 16, 3)
    assert stock.std() > 0.01  # a real picture, not a constant
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)
    # the seed matters (else the comparison above would be weak)
    other = _frames(pipe_dir, tmp_path, "other", "--seed", "4")
    assert np.abs(other - stock).max() > 1e-3


def test_shift_and_scheduler_flags(pipe_dir, tmp_path, capsys):
    base = _frames(pipe_dir, tmp_path, "base", "--no-accelerate", "--shift", "2")
    kept = _frames(pipe_dir, tmp_path, "kept", "--scheduler", "pipeline", "--shift", "2")
    assert "the pipeline's FlowMatchEulerDiscreteScheduler" in capsys.readouterr().out
    np.testing.assert_allclose(kept, base, atol=2e-5, rtol=0)
    default_shift = _frames(pipe_dir, tmp_path, "d7", "--no-accelerate")
    assert np.abs(default_shift - base).max() > 1e-4  # --shift changed the schedule


def test_gif_and_png_outputs(pipe_dir, tmp_path):
    gif, png = tmp_path / "v.gif", tmp_path / "v.png"
    assert main(["sample", "--diffusers", pipe_dir, *RUN, "--num", "2", "--out", str(gif)]) == 0
    with Image.open(gif) as im:
        assert im.n_frames == 5
    assert main(["sample", "--diffusers", pipe_dir, *RUN, "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size[0] > im.size[1]  # one row of 5 frames


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    pytest.importorskip("ftfy")  # diffusers' image-to-video pipeline cleans prompts with it
    d = tmp_path_factory.mktemp("wan_i2v")
    tiny_wan_i2v_pipeline().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "first.png"
    rgb = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(p)
    return str(p)


def test_image_to_video_pipeline(i2v_dir, image_path, tmp_path, capsys):
    """WanImageToVideoPipeline: the image branch of every cross-attention runs fmrt's path; the
    frames equal stock diffusers'."""
    stock = _frames(i2v_dir, tmp_path, "stock", "--image", image_path, "--no-accelerate")
    fast = _frames(i2v_dir, tmp_path, "fast", "--image", image_path)
    assert "fmrt attention on 4 modules" in capsys.readouterr().out
    assert fast.shape == (1, 5, 16, 16, 3) and stock.std() > 0.01
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)
    assert main(["sample", "--diffusers", i2v_dir, *RUN, "--out", str(tmp_path / "x.npy")]) == 2
    assert "give the first frame with --image" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["--diffusers", "{missing}", "--prompt", "x"], "no model_index.json"),
    (["--diffusers", "{pipe}"], "needs --prompt"),
    (["--diffusers", "{pipe}", "--prompt", "x", "--out", "{tmp}/a.txt"], "unknown output format"),
    (["--diffusers", "{pipe}", "--prompt", "x", "--class", "1"], "--class does not apply"),
    (["--diffusers", "{pipe}", "--prompt", "x", "--solver", "heun"], "--solver does not apply"),
    (["--prompt", "a cat"], "--prompt applies to --diffusers"),
    (["--image", "{tmp}/a.png"], "--image applies to --diffusers"),
    (["--diffusers", "{pipe}", "--prompt", "x", "--image", "{tmp}/none.png"], "no such image"),
])
def test_bad_flags(pipe_dir, tmp_path, capsys, argv, msg):
    argv = [a.format(missing=str(tmp_path / "nope"), pipe=pipe_dir, tmp=tmp_path) for a in argv]
    assert main(["sample", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_image_for_a_text_to_video_pipeline_is_refused(pipe_dir, image_path, tmp_path, capsys):
    argv = ["sample", "--diffusers", pipe_dir, *RUN, "--image", image_path,
            "--out", str(tmp_path / "x.npy")]
    assert main(argv) == 2
    assert "WanPipeline takes no image" in capsys.readouterr().err
