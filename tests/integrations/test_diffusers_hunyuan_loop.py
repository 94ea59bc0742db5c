"""`hunyuan_video_true_cfg_loop`: HunyuanVideoPipeline's run with its optional true CFG, the
combine and Euler step fused into `step_cfg`, against the untouched pipeline on a tiny random
HunyuanVideo pipeline (fp32 2e-5, torch path and Triton interpreter, with and without fmrt
attention, two prompts; bf16 the pipeline's own bf16 run); bad input."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fmrt.integrations.diffusers import hunyuan_video_true_cfg_loop  # noqa: E402
from tests.integrations.guided_loops import GuidedLoop, gen  # noqa: E402
from tests.tiny_video import tiny_hunyuan_video_pipeline  # noqa: E402

RUN = dict(height=16, width=16, num_frames=5, num_inference_steps=3, true_cfg_scale=3.0)
LOOP = GuidedLoop(hunyuan_video_true_cfg_loop, RUN, "frames", tiny_hunyuan_video_pipeline)


@pytest.fixture(scope="module")
def pipes():
    return LOOP.pipes()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_the_pipeline_fp32(pipes, backend):
    stock, fast = pipes
    lat = LOOP.check_fp32(stock, fast, backend, (2, 5, 16, 16, 3))
    assert lat.shape == (2, 4, 2, 2, 2) and lat.dtype == torch.float32
    # the comparison can fail: without true CFG, or with another scale, the latents move
    plain = stock(prompt=LOOP.prompt, generator=gen(), output_type="latent", **RUN).frames
    other = LOOP.fused(fast, output_type="latent", true_cfg_scale=2.0)
    assert (plain - lat).abs().max() > 1e-2 and (other - lat).abs().max() > 1e-2


# fmrt attention under the Triton interpreter: two steps
@pytest.mark.parametrize("backend, kw", [("torch", {}), ("triton", dict(num_inference_steps=2))])
def test_matches_the_pipeline_with_fmrt_attention(pipes, backend, kw):
    LOOP.check_fmrt_attention(*pipes, backend, 2, **kw)


def test_second_prompts_sigmas_guidance_and_videos_per_prompt(pipes):
    """prompt_2 / negative_prompt_2, custom sigmas, another distilled guidance_scale, two
    videos of one prompt."""
    stock, fast = pipes
    kw = dict(prompt="a red cat runs", negative_prompt="blue dog", prompt_2="a cat",
              negative_prompt_2="a dog", sigmas=[1.0, 0.7, 0.2], guidance_scale=3.5,
              num_videos_per_prompt=2, output_type="latent")
    want = stock(generator=gen(), **{**RUN, **kw}).frames
    got = hunyuan_video_true_cfg_loop(fast, generator=gen(), **{**RUN, **kw}).frames
    assert got.shape == want.shape and got.shape[0] == 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


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
    for name, value in (("latents", torch.zeros(2, 4, 2, 2, 2)), ("prompt_embeds", emb),
                        ("negative_prompt_embeds", emb), ("callback_on_step_end", print),
                        ("return_dict", False), ("attention_kwargs", {"scale": 1.0})):
        with pytest.raises(ValueError, match=f"does not support {name}="):
            LOOP.fused(fast, **{name: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidance_rescale'"):
        LOOP.fused(fast, guidance_rescale=0.5)
    with pytest.raises(ValueError, match="divisible by 16"):
        LOOP.fused(fast, height=24)

    class MyHunyuan(type(fast)):
        pass
    with pytest.raises(ValueError, match="got MyHunyuan"):
        hunyuan_video_true_cfg_loop(MyHunyuan(**fast.components), "a cat",
                                    negative_prompt="a dog", true_cfg_scale=3.0)
    # the pipeline's defaults pass
    got = LOOP.fused(fast, latents=None, return_dict=True, output_type="latent",
                num_inference_steps=1)
    assert got.shape == (2, 4, 2, 2, 2)
