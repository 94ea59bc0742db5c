"""`fmrt sample --diffusers PATH` on the video pipelines beyond the Wan family: tiny random
HunyuanVideo and LTX-Video pipelines saved to disk run through the video path, accelerated
frames equal to stock diffusers' (fp32, 2e-5), the flags reaching the call as the pipeline
names them (--guidance-scale: HunyuanVideo's distilled guidance, LTX's CFG scale); LTX's CFG
through `ltx_cfg_loop`'s fused step when fmrt's scheduler is in, the pipeline's loop otherwise."""
import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fmrt.cli import main  # noqa: E402

CASES = {  # maker, flags, accelerated modules
    "hunyuan": ("tiny_hunyuan_video_pipeline", ["--height", "16", "--width", "16",
                                                "--frames", "5"], 2),
    "ltx": ("tiny_ltx_pipeline", ["--height", "32", "--width", "32", "--frames", "9",
                                  "--negative-prompt", "blue"], 4),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    import tests.tiny_video as tiny
    maker, flags, n = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    getattr(tiny, maker)().save_pretrained(d)
    return request.param, str(d), flags, n


def _frames(pipe_dir, tmp_path, name, flags, *extra):
    out = tmp_path / f"{name}.npy"
    run = ["--prompt", "a red cat runs", *flags, "--steps", "3", "--seed", "3",
           "--guidance-scale", "4"]
    assert main(["sample", "--diffusers", pipe_dir, *run, "--out", str(out), *extra]) == 0
    return np.load(out)


def test_accelerated_run_matches_stock(case, tmp_path, capsys):
    import torch
    from diffusers import DiffusionPipeline
    name, pipe_dir, flags, n = case
    stock = _frames(pipe_dir, tmp_path, "stock", flags, "--no-accelerate")
    kw = dict(height=int(flags[1]), width=int(flags[3]), num_frames=int(flags[5]),
              negative_prompt=flags[7] if len(flags) > 6 else None)
    want = DiffusionPipeline.from_pretrained(pipe_dir)(
        prompt="a red cat runs", num_inference_steps=3, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3), output_type="np", **kw).frames
    np.testing.assert_array_equal(stock, want)
    capsys.readouterr()
    fast = _frames(pipe_dir, tmp_path, "fast", flags)
    out = capsys.readouterr().out
    assert f"fmrt attention on {n} modules" in out and "fmrt Euler scheduler" in out
    # LTX's CFG runs as ltx_cfg_loop's fused step; HunyuanVideo's distilled guidance has no CFG
    assert ("fused CFG step" in out) == (name == "ltx")
    assert stock.shape == fast.shape and stock.std() > 0.01
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def ltx_dir(tmp_path_factory):
    from tests.tiny_video import tiny_ltx_pipeline
    d = tmp_path_factory.mktemp("ltx_own")
    tiny_ltx_pipeline().save_pretrained(d)
    return str(d)


def test_ltx_without_cfg_or_fmrt_scheduler_runs_the_pipeline(ltx_dir, tmp_path, capsys):
    """--guidance-scale 1 (no CFG) or the pipeline's own scheduler: the pipeline's loop."""
    pipe_dir, flags = ltx_dir, CASES["ltx"][1]
    stock = _frames(pipe_dir, tmp_path, "stock", flags, "--no-accelerate", "--guidance-scale", "1")
    capsys.readouterr()
    fast = _frames(pipe_dir, tmp_path, "fast", flags, "--guidance-scale", "1")
    out = capsys.readouterr().out
    assert "fused CFG step" not in out and "guidance 1" in out
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)
    _frames(pipe_dir, tmp_path, "own", flags, "--scheduler", "pipeline")
    out = capsys.readouterr().out
    assert "fused CFG step" not in out and "FlowMatchEulerDiscreteScheduler" in out


@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory):
    from tests.tiny_video import tiny_hunyuan_video_pipeline
    d = tmp_path_factory.mktemp("hunyuan_own")
    tiny_hunyuan_video_pipeline().save_pretrained(d)
    return str(d)


def test_hunyuan_true_cfg_runs_the_fused_loop(hunyuan_dir, tmp_path, capsys):
    """--true-cfg-scale on HunyuanVideo: its optional true CFG (negative prompt " " by
    default), fused through hunyuan_video_true_cfg_loop, equal to the pipeline's own loop."""
    flags = CASES["hunyuan"][1]
    stock = _frames(hunyuan_dir, tmp_path, "stock", flags, "--no-accelerate", "--scheduler",
                    "pipeline", "--true-cfg-scale", "3")
    capsys.readouterr()
    fast = _frames(hunyuan_dir, tmp_path, "fast", flags, "--true-cfg-scale", "3")
    out = capsys.readouterr().out
    assert "fused true-CFG step" in out and "guidance 4, true CFG 3" in out
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)
    plain = _frames(hunyuan_dir, tmp_path, "plain", flags)
    assert np.abs(plain - fast).max() > 1e-3
