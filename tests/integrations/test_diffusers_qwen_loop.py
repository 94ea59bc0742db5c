"""`qwen_image_true_cfg_loop`: QwenImagePipeline's text-to-image run with the true-CFG combine,
per-token norm rescale and Euler step fused into `step_cfg`, against the untouched pipeline on a
tiny random Qwen-Image pipeline (fp32 2e-5, torch path and Triton interpreter; bf16 within the
stock pipeline's own bf16 error); bad input."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fmrt.integrations.diffusers import (FlowMatchEulerDiscreteScheduler, accelerate,  # noqa
                                         qwen_image_true_cfg_loop)
from tests.helpers import use_backend  # noqa: E402
from tests.tiny_image import tiny_qwen_image_pipeline  # noqa: E402

RUN = dict(height=32, width=32, num_inference_steps=3, true_cfg_scale=3.0)


@pytest.fixture(scope="module")
def pipes():
    stock = tiny_qwen_image_pipeline()
    fast = tiny_qwen_image_pipeline()
    fast.scheduler = FlowMatchEulerDiscreteScheduler.from_config(fast.scheduler.config)
    return stock, fast


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def _stock(pipe, prompt="a red cat runs", negative_prompt="blue dog", **kw):
    return pipe(prompt=prompt, negative_prompt=negative_prompt, generator=_gen(),
                **{**RUN, **kw}).images


def _loop(pipe, prompt="a red cat runs", negative_prompt="blue dog", **kw):
    return qwen_image_true_cfg_loop(pipe, prompt, negative_prompt=negative_prompt,
                                    generator=_gen(), **{**RUN, **kw}).images


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_the_pipeline_fp32(pipes, backend):
    stock, fast = pipes
    want = _stock(stock, output_type="np")
    lat = _stock(stock, output_type="latent")
    with use_backend(backend):
        got = _loop(fast, output_type="np")
        got_lat = _loop(fast, output_type="latent")
    assert got.shape == want.shape == (1, 32, 32, 3) and want.std() > 0.01
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    torch.testing.assert_close(got_lat, lat, atol=2e-5, rtol=0)


@pytest.mark.parametrize("prompt, n", [(["a red cat runs", "a dog jumps"], 1),
                                       ("a red cat runs", 2)])
def test_accelerated_batch_and_default_negative(pipes, prompt, n):
    """Two prompts, or two images of one (diffusers' pipeline fails on both at once: its
    img_shapes count prompts, not images), fmrt attention, the default negative prompt " "."""
    from fmrt.integrations.diffusers import restore
    stock, fast = pipes
    want = _stock(stock, prompt=prompt, negative_prompt=" ", num_images_per_prompt=n,
                  output_type="latent")
    accelerate(fast)
    try:
        got = qwen_image_true_cfg_loop(fast, prompt, generator=_gen(), num_images_per_prompt=n,
                                       **RUN, output_type="latent").images
    finally:
        restore(fast)
    assert got.shape == want.shape and got.shape[0] == 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_bf16_within_the_pipelines_bf16_error(pipes):
    stock, fast = pipes
    ref = _stock(stock, output_type="latent").float()
    stock16 = tiny_qwen_image_pipeline().to(torch.bfloat16)
    fast16 = tiny_qwen_image_pipeline().to(torch.bfloat16)
    fast16.scheduler = FlowMatchEulerDiscreteScheduler.from_config(fast16.scheduler.config)
    want = _stock(stock16, output_type="latent")
    got = _loop(fast16, output_type="latent")
    assert got.dtype == want.dtype == torch.bfloat16
    err_stock = (want.float() - ref).abs().max().item()
    err_fmrt = (got.float() - ref).abs().max().item()
    assert err_stock > 0
    assert err_fmrt <= 1.5 * err_stock + 2 * 2 ** -8 * ref.abs().max().item()


def test_bad_input(pipes):
    stock, fast = pipes
    with pytest.raises(TypeError, match="fmrt's FlowMatchEulerDiscreteScheduler"):
        _loop(stock)
    with pytest.raises(ValueError, match="true_cfg_scale must be a number > 1"):
        _loop(fast, true_cfg_scale=1.0)
    with pytest.raises(ValueError, match="negative_prompt is None"):
        _loop(fast, negative_prompt=None)

    class MyQwen(type(fast)):
        pass
    with pytest.raises(ValueError, match="got MyQwen"):
        qwen_image_true_cfg_loop(MyQwen(**fast.components), "a cat")
