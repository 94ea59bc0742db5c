"""`qwen_image_true_cfg_loop`: QwenImagePipeline's text-to-image run with the true-CFG combine,
per-token norm rescale and Euler step fused into `step_cfg`, against the untouched pipeline on a
tiny random Qwen-Image pipeline (fp32 2e-5, torch path and Triton interpreter; bf16 within the
stock pipeline's own bf16 error); bad input."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fmrt.integrations.diffusers import accelerate, qwen_image_true_cfg_loop  # noqa: E402
from tests.integrations.guided_loops import GuidedLoop, gen  # noqa: E402
from tests.tiny_image import tiny_qwen_image_pipeline  # noqa: E402

RUN = dict(height=32, width=32, num_inference_steps=3, true_cfg_scale=3.0)
LOOP = GuidedLoop(qwen_image_true_cfg_loop, RUN, "images", tiny_qwen_image_pipeline,
                  prompt="a red cat runs", negative_prompt="blue dog")


@pytest.fixture(scope="module")
def pipes():
    return LOOP.pipes()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_the_pipeline_fp32(pipes, backend):
    stock, fast = pipes
    LOOP.check_fp32(stock, fast, backend, (1, 32, 32, 3))


@pytest.mark.parametrize("prompt, n", [(["a red cat runs", "a dog jumps"], 1),
                                       ("a red cat runs", 2)])
def test_accelerated_batch_and_default_negative(pipes, prompt, n):
    """Two prompts, or two images of one (diffusers' pipeline fails on both at once: its
    img_shapes count prompts, not images), fmrt attention, the default negative prompt " "."""
    from fmrt.integrations.diffusers import restore
    stock, fast = pipes
    want = LOOP.stock(stock, prompt=prompt, negative_prompt=" ", num_images_per_prompt=n,
                  output_type="latent")
    accelerate(fast)
    try:
        got = qwen_image_true_cfg_loop(fast, prompt, generator=gen(), num_images_per_prompt=n,
                                       **RUN, output_type="latent").images
    finally:
        restore(fast)
    assert got.shape == want.shape and got.shape[0] == 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_bf16_within_the_pipelines_bf16_error(pipes):
    LOOP.check_bf16(pipes[0], exact=False)


def test_bad_input(pipes):
    stock, fast = pipes
    with pytest.raises(TypeError, match="fmrt's FlowMatchEulerDiscreteScheduler"):
        LOOP.fused(stock)
    with pytest.raises(ValueError, match="true_cfg_scale must be a number > 1"):
        LOOP.fused(fast, true_cfg_scale=1.0)
    with pytest.raises(ValueError, match="negative_prompt is None"):
        LOOP.fused(fast, negative_prompt=None)

    class MyQwen(type(fast)):
        pass
    with pytest.raises(ValueError, match="got MyQwen"):
        qwen_image_true_cfg_loop(MyQwen(**fast.components), "a cat")
