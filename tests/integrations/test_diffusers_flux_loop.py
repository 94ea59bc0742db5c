"""`flux_true_cfg_loop`: FluxPipeline's text-to-image run with its optional true CFG, the
combine and Euler step fused into `step_cfg`, against the untouched pipeline on tiny random
FLUX.1-dev / schnell pipelines (fp32 2e-5, torch path and Triton interpreter, with and without
fmrt attention, two prompts; bf16 the pipeline's own bf16 run); bad input."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fmrt.integrations.diffusers import flux_true_cfg_loop  # noqa: E402
from tests.integrations.guided_loops import GuidedLoop, gen, with_fmrt_scheduler  # noqa: E402
from tests.tiny_image import tiny_flux_pipeline  # noqa: E402

RUN = dict(height=16, width=16, num_inference_steps=3, true_cfg_scale=3.0)
LOOP = GuidedLoop(flux_true_cfg_loop, RUN, "images", tiny_flux_pipeline)


@pytest.fixture(scope="module")
def pipes():
    return LOOP.pipes()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_the_pipeline_fp32(pipes, backend):
    stock, fast = pipes
    lat = LOOP.check_fp32(stock, fast, backend, (2, 16, 16, 3))
    assert lat.shape == (2, 64, 4) and lat.dtype == torch.float32
    # the comparison can fail: without true CFG, or with another scale, the latents move
    plain = stock(prompt=LOOP.prompt, generator=gen(), output_type="latent", **RUN).images
    other = LOOP.fused(fast, output_type="latent", true_cfg_scale=2.0)
    assert (plain - lat).abs().max() > 1e-2 and (other - lat).abs().max() > 1e-2


# fmrt attention under the Triton interpreter (its fused q/k norm + RoPE runs a program per
# token): 8x8 images, 8 text tokens (not 512), one step
@pytest.mark.parametrize("backend, kw", [("torch", {}), ("triton", dict(
    height=8, width=8, num_inference_steps=1, max_sequence_length=8))])
def test_matches_the_pipeline_with_fmrt_attention(pipes, backend, kw):
    LOOP.check_fmrt_attention(*pipes, backend, 3, **kw)


def test_second_prompts_sigmas_guidance_and_images_per_prompt(pipes):
    """prompt_2 / negative_prompt_2, custom sigmas, another distilled guidance_scale, two
    images of one prompt."""
    stock, fast = pipes
    kw = dict(prompt="a red cat runs", negative_prompt="blue dog", prompt_2="a cat",
              negative_prompt_2="a dog", sigmas=[1.0, 0.7, 0.2], guidance_scale=3.5,
              num_images_per_prompt=2, output_type="latent")
    want = stock(generator=gen(), **{**RUN, **kw}).images
    got = flux_true_cfg_loop(fast, generator=gen(), **{**RUN, **kw}).images
    assert got.shape == want.shape and got.shape[0] == 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_schnell_without_guidance_embedding():
    stock, fast = (tiny_flux_pipeline(guidance_embeds=False) for _ in range(2))
    LOOP.check_fp32(stock, with_fmrt_scheduler(fast), "torch", (2, 16, 16, 3))


def test_bf16_is_the_pipelines_bf16_run(pipes):
    """The pipeline combines in the model dtype op by op and steps to the model dtype;
    `step_cfg` rounds as those eager ops do, so fmrt's bf16 run is the pipeline's bf16 run (on
    the torch path bit for bit), as far from the fp32 run as diffusers' own."""
    LOOP.check_bf16(pipes[0])


def test_bad_input(pipes):
    stock, fast = pipes
    with pytest.raises(TypeError, match="fmrt's FlowMatchEulerDiscreteScheduler"):
        LOOP.fused(stock)
    for s in (1.0, 0.5, "3", True):
        with pytest.raises(ValueError, match="true_cfg_scale must be a number > 1"):
            LOOP.fused(fast, true_cfg_scale=s)
    with pytest.raises(ValueError, match="negative_prompt is None"):
        LOOP.fused(fast, negative_prompt=None)
    emb = torch.zeros(2, 4, 16)
    for name, value in (("latents", torch.zeros(2, 64, 4)), ("prompt_embeds", emb),
                        ("negative_prompt_embeds", emb), ("callback_on_step_end", print),
                        ("return_dict", False), ("joint_attention_kwargs", {"scale": 1.0}),
                        ("ip_adapter_image", np.zeros((16, 16, 3), np.uint8))):
        with pytest.raises(ValueError, match=f"does not support {name}="):
            LOOP.fused(fast, **{name: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_frames'"):
        LOOP.fused(fast, num_frames=5)
    with pytest.raises(ValueError, match="cannot be greater than 512 but is 513"):
        LOOP.fused(fast, max_sequence_length=513)

    class MyFlux(type(fast)):
        pass
    with pytest.raises(ValueError, match="got MyFlux"):
        flux_true_cfg_loop(MyFlux(**fast.components), "a cat",
                                    negative_prompt="a dog", true_cfg_scale=3.0)
    # the pipeline's defaults pass
    got = LOOP.fused(fast, latents=None, return_dict=True, output_type="latent",
                num_inference_steps=1)
    assert got.shape == (2, 64, 4)
