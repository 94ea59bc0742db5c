"""`fmrt sample --diffusers PATH` on Wan-family pipelines beyond Wan (through
`fmrt.integrations.diffusers.accelerate`): a tiny random SkyReels-V2 pipeline saved to disk gives
stock diffusers' frames; a pipeline that is neither a video nor an image pipeline is refused in
one line (image pipelines: tests/test_cli_diffusers_images.py)."""
import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fmrt.cli import main  # noqa: E402
from tests.tiny_wan import _text_and_vae  # noqa: E402

RUN = ["--prompt", "a red cat runs", "--negative-prompt", "blue", "--height", "16",
       "--width", "16", "--frames", "5", "--steps", "3", "--seed", "3"]


@pytest.fixture(scope="module")
def skyreels_dir(tmp_path_factory):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SkyReelsV2Pipeline
    from diffusers import SkyReelsV2Transformer3DModel
    torch.manual_seed(0)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32)
    pipe = SkyReelsV2Pipeline(**_text_and_vae(), transformer=transformer,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    d = tmp_path_factory.mktemp("skyreels_pipe")
    pipe.save_pretrained(d)
    return str(d)


def _frames(pipe_dir, tmp_path, name, *extra):
    out = tmp_path / f"{name}.npy"
    assert main(["sample", "--diffusers", pipe_dir, *RUN, "--out", str(out), *extra]) == 0
    return np.load(out)


def test_skyreels_accelerated_run_matches_stock(skyreels_dir, tmp_path, capsys):
    stock = _frames(skyreels_dir, tmp_path, "stock", "--no-accelerate")
    assert "stock diffusers" in capsys.readouterr().out
    fast = _frames(skyreels_dir, tmp_path, "fast")
    out = capsys.readouterr().out
    assert "fmrt attention on 4 modules" in out and "fmrt Euler scheduler" in out
    assert stock.shape == fast.shape == (1, 5, 16, 16, 3) and stock.std() > 0.01
    np.testing.assert_allclose(fast, stock, atol=2e-5, rtol=0)


class _OtherPipeline:
    """Stands in for a loaded pipeline that is neither video (num_frames) nor image
    (num_images_per_prompt)."""

    def to(self, device):
        return self

    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=28):
        raise AssertionError("must not run")


def test_other_pipeline_refused_in_one_line(tmp_path, capsys, monkeypatch):
    import json
    import diffusers
    d = tmp_path / "flux_pipe"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: _OtherPipeline()))
    out = tmp_path / "x.npy"
    assert main(["sample", "--diffusers", str(d), *RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "_OtherPipeline takes neither num_frames nor num_images_per_prompt" in err
    assert not out.exists()
