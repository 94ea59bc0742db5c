"""`fmrt sample --diffusers PATH` on image pipelines: tiny random FLUX.1 and Qwen-Image pipelines
saved to disk give stock diffusers' images (fp32, 2e-5) accelerated; the flags reach the call as
the pipeline defines them (FLUX.1: --guidance-scale is the distilled guidance; Qwen-Image: it is
true_cfg_scale, with " " as the negative prompt when none is given); bad flags fail in one
line before any sampling."""
import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fmrt.cli import main  # noqa: E402

RUN = ["--prompt", "a red cat runs", "--height", "16", "--width", "16", "--steps", "3",
       "--seed", "3"]


def _save(pipe, tmp_path_factory, name):
    d = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from tests.tiny_image import tiny_flux_pipeline
    return _save(tiny_flux_pipeline(), tmp_path_factory, "flux_pipe")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from tests.tiny_image import tiny_qwen_image_pipeline
    return _save(tiny_qwen_image_pipeline(), tmp_path_factory, "qwen_pipe")


def _images(pipe_dir, tmp_path, name, *extra, run=RUN):
    out = tmp_path / f"{name}.npy"
    assert main(["sample", "--diffusers", pipe_dir, *run, "--out", str(out), *extra]) == 0
    return np.load(out)


def _direct(pipe_dir, **kw):
    """The stock pipeline called directly, as the CLI should call it."""
    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    return pipe(prompt="a red cat runs", generator=torch.Generator().manual_seed(3),
                output_type="np", **kw).images


def test_flux_accelerated_run_matches_stock(flux_dir, tmp_path, capsys):
    stock = _images(flux_dir, tmp_path, "stock", "--no-accelerate", "--num", "2",
                    "--guidance-scale", "2.5")
    assert "stock diffusers" in capsys.readouterr().out
    want = _direct(flux_dir, height=16, width=16, num_inference_steps=3, guidance_scale=2.5,
                   num_images_per_prompt=2)
    np.testing.assert_array_equal(stock, want)  # the flags reach FluxPipeline as it names them
    fast = _images(flux_dir, tmp_path, "fast", "--num", "2", "--guidance-scale", "2.5")
    out = capsys.readouterr().out
    assert "fmrt attention on 3 modules" in out and "fmrt Euler scheduler" in out
    assert "guidance 2.5" in out
    assert stock.shape == fast.shape == (2, 16, 16, 3) and stock.std() > 0.01
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)
    other = _images(flux_dir, tmp_path, "other", "--num", "2", "--guidance-scale", "9")
    assert np.abs(other - fast).max() > 1e-3  # the distilled guidance embedding is used


def test_flux_defaults_are_the_pipelines(flux_dir, tmp_path):
    got = _images(flux_dir, tmp_path, "defaults", "--no-accelerate",
                  run=["--prompt", "a red cat runs", "--seed", "3", "--steps", "2"])
    want = _direct(flux_dir, num_inference_steps=2)  # height / width / guidance: FLUX's own
    np.testing.assert_array_equal(got, want)


def test_flux_png_puts_the_images_side_by_side(flux_dir, tmp_path, capsys):
    from PIL import Image
    arr = _images(flux_dir, tmp_path, "arr", "--num", "2")
    out = tmp_path / "two.png"
    assert main(["sample", "--diffusers", flux_dir, *RUN, "--num", "2", "--out", str(out)]) == 0
    with Image.open(out) as im:
        x = np.asarray(im.convert("RGB"))
    assert x.shape == (16, 16 + 2 + 16, 3)
    np.testing.assert_array_equal(x[:, :16], (arr[0] * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(x[:, 18:], (arr[1] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("extra, match", [
    (["--frames", "5"], "--frames: FluxPipeline takes no num_frames"),
    (["--negative-prompt", "blue"], "--negative-prompt: FluxPipeline's --guidance-scale is its "
                                    "distilled guidance"),
    (["--image", "IMAGE"], "--image: FluxPipeline takes no image"),
    (["--out", "OUT.gif"], "--out: FluxPipeline makes images"),
])
def test_flux_bad_flags_one_line(flux_dir, tmp_path, capsys, extra, match):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "first.png")
    extra = [e.replace("IMAGE", str(tmp_path / "first.png")).replace("OUT", str(tmp_path / "o"))
             for e in extra]
    out = tmp_path / "x.npy"
    assert main(["sample", "--diffusers", flux_dir, *RUN, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err  # after diffusers' loading bars: the error, one line
    assert match in err.splitlines()[-1] and err.endswith("\n") and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "o.gif").exists()


def test_qwen_image_accelerated_run_matches_stock(qwen_dir, tmp_path, capsys):
    run = [*RUN[:2], "--height", "32", "--width", "32", *RUN[6:]]
    stock = _images(qwen_dir, tmp_path, "stock", "--no-accelerate", "--guidance-scale", "3",
                    run=run)
    # --guidance-scale is true_cfg_scale; no --negative-prompt gives " " (true CFG stays on)
    want = _direct(qwen_dir, height=32, width=32, num_inference_steps=3, true_cfg_scale=3.0,
                   negative_prompt=" ")
    np.testing.assert_array_equal(stock, want)
    capsys.readouterr()
    fast = _images(qwen_dir, tmp_path, "fast", "--guidance-scale", "3", run=run)
    out = capsys.readouterr().out
    assert "fmrt attention on 2 modules" in out and "true CFG 3" in out
    assert "fused true-CFG step" in out  # qwen_image_true_cfg_loop ran
    assert stock.shape == fast.shape == (1, 32, 32, 3) and stock.std() > 0.01
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)
    neg = _images(qwen_dir, tmp_path, "neg", "--guidance-scale", "3", "--negative-prompt",
                  "blue dog", run=run)
    want = _direct(qwen_dir, height=32, width=32, num_inference_steps=3, true_cfg_scale=3.0,
                   negative_prompt="blue dog")
    np.testing.assert_allclose(neg, want, atol=2e-5, rtol=0)
    assert np.abs(neg - fast).max() > 1e-4
    capsys.readouterr()
    kept = _images(qwen_dir, tmp_path, "kept", "--guidance-scale", "3", "--scheduler",
                   "pipeline", run=run)  # diffusers' scheduler: the pipeline's own loop
    out = capsys.readouterr().out
    assert "fused true-CFG step" not in out and "FlowMatchEulerDiscreteScheduler" in out
    np.testing.assert_allclose(kept, stock, atol=2e-5, rtol=0)


def test_flux_true_cfg_runs_the_fused_loop(flux_dir, tmp_path, capsys):
    """--true-cfg-scale on FLUX.1: the pipeline's optional true CFG against --negative-prompt
    (default " "), its --guidance-scale still the distilled embedding; with fmrt's scheduler
    through flux_true_cfg_loop's fused step, equal to the stock pipeline's own loop."""
    tc = ["--guidance-scale", "2.5", "--true-cfg-scale", "3", "--negative-prompt", "blue"]
    stock = _images(flux_dir, tmp_path, "stock", "--no-accelerate", "--scheduler", "pipeline",
                    *tc)
    want = _direct(flux_dir, height=16, width=16, num_inference_steps=3, guidance_scale=2.5,
                   true_cfg_scale=3.0, negative_prompt="blue", num_images_per_prompt=1)
    np.testing.assert_array_equal(stock, want)
    capsys.readouterr()
    fast = _images(flux_dir, tmp_path, "fast", *tc)
    out = capsys.readouterr().out
    assert "fused true-CFG step" in out and "guidance 2.5, true CFG 3" in out
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)
    plain = _images(flux_dir, tmp_path, "plain", "--guidance-scale", "2.5")
    assert np.abs(plain - fast).max() > 1e-3   # true CFG changed the images
    off = _images(flux_dir, tmp_path, "off", "--guidance-scale", "2.5", "--true-cfg-scale", "1")
    assert "fused true-CFG step" not in capsys.readouterr().out
    np.testing.assert_allclose(off, plain, atol=2e-5, rtol=0)


def test_true_cfg_scale_bad_uses_one_line(qwen_dir, tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert main(["sample", "--diffusers", qwen_dir, *RUN, "--out", str(out),
                 "--true-cfg-scale", "3"]) == 2
    err = capsys.readouterr().err
    assert "--true-cfg-scale: QwenImagePipeline's true CFG scale is --guidance-scale" in \
        err.splitlines()[-1] and not out.exists()
    assert main(["sample", "--out", str(out), "--true-cfg-scale", "3"]) == 2
    assert "--true-cfg-scale applies to --diffusers PATH only" in capsys.readouterr().err
