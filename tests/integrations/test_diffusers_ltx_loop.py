"""`ltx_cfg_loop`: LTXPipeline's text-to-video run with the batched CFG combine and Euler step
fused into `step_cfg`, against the untouched pipeline on a tiny random LTX-Video pipeline (fp32
2e-5, torch path and Triton interpreter, with and without fmrt attention, two prompts; a
timestep-conditioned VAE; bf16 within the stock pipeline's own bf16 error); bad input."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fmrt.integrations.diffusers import ltx_cfg_loop  # noqa: E402
from tests.integrations.guided_loops import GuidedLoop, gen, with_fmrt_scheduler  # noqa: E402
from tests.tiny_video import tiny_ltx_pipeline  # noqa: E402

RUN = dict(height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=3.0)
LOOP = GuidedLoop(ltx_cfg_loop, RUN, "frames", tiny_ltx_pipeline)


@pytest.fixture(scope="module")
def pipes():
    return LOOP.pipes()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_the_pipeline_fp32(pipes, backend):
    stock, fast = pipes
    lat = LOOP.check_fp32(stock, fast, backend, (2, 9, 32, 32, 3))
    assert lat.shape == (2, 3 * 8 * 8, 8) and lat.dtype == torch.float32


# fmrt attention under the Triton interpreter costs seconds per transformer call: one latent
# frame (64 tokens), and one step there
@pytest.mark.parametrize("backend, kw", [("torch", {}),
                                         ("triton", dict(num_frames=1, num_inference_steps=1))])
def test_matches_the_pipeline_with_fmrt_attention(pipes, backend, kw):
    LOOP.check_fmrt_attention(*pipes, backend, 4, **kw)


def test_guidance_matters(pipes):
    """The comparison above can fail: cond and uncond swapped, or another scale, move the
    latents far beyond 2e-5."""
    stock, fast = pipes
    want = LOOP.stock(stock, output_type="latent")
    other = LOOP.fused(fast, output_type="latent", guidance_scale=2.0)
    swapped = LOOP.fused(fast, prompt=LOOP.negative_prompt, negative_prompt=LOOP.prompt, output_type="latent")
    assert (other - want).abs().max() > 1e-2 and (swapped - want).abs().max() > 1e-2


def test_default_negative_prompt_frame_rate_and_videos_per_prompt(pipes):
    """negative_prompt None ("" as the pipeline encodes it), frame_rate (the rope
    interpolation scale), two videos of one prompt."""
    stock, fast = pipes
    kw = dict(negative_prompt=None, prompt="a red cat runs", frame_rate=12,
              num_videos_per_prompt=2, output_type="latent")
    want = stock(generator=gen(), **RUN, **kw).frames
    got = ltx_cfg_loop(fast, generator=gen(), **RUN, **kw).frames
    assert got.shape == want.shape and got.shape[0] == 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_timestep_conditioned_vae():
    """LTX-Video 0.9.1+ decoders: noise from the generator mixed in at decode_noise_scale and
    decode_timestep handed to the decoder, as the pipeline does."""
    stock = tiny_ltx_pipeline(timestep_conditioning=True)
    fast = with_fmrt_scheduler(tiny_ltx_pipeline(timestep_conditioning=True))
    kw = dict(decode_timestep=[0.05, 0.1], decode_noise_scale=0.025, output_type="np")
    want = LOOP.stock(stock, **kw)
    got = LOOP.fused(fast, **kw)
    plain = LOOP.fused(fast, output_type="np")
    assert got.shape == want.shape == (2, 9, 32, 32, 3)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert np.abs(plain - want).max() > 1e-3   # the decode arguments reached the decoder


def test_bf16_is_the_pipelines_bf16_run(pipes):
    # the pipeline keeps latents, the combine and the step in fp32 whatever the model dtype:
    # fmrt's bf16 run is the pipeline's (on the torch path bit for bit)
    fast16 = LOOP.check_bf16(pipes[0], latent_dtype=torch.float32)
    frames = LOOP.fused(fast16, output_type="np")
    assert frames.shape == (2, 9, 32, 32, 3) and np.isfinite(frames).all()


def test_bad_input(pipes):
    stock, fast = pipes
    with pytest.raises(TypeError, match="fmrt's FlowMatchEulerDiscreteScheduler"):
        LOOP.fused(stock)
    for g in (1.0, 0.5, "3", True):
        with pytest.raises(ValueError, match="guidance_scale must be a number > 1"):
            LOOP.fused(fast, guidance_scale=g)
    with pytest.raises(ValueError, match="guidance_rescale=0.7"):
        LOOP.fused(fast, guidance_rescale=0.7)
    lat = torch.zeros(2, 192, 8)
    emb = torch.zeros(2, 4, 16)
    for name, value in (("latents", lat), ("prompt_embeds", emb), ("timesteps", [900, 500]),
                        ("callback_on_step_end", lambda *a: {}), ("return_dict", False),
                        ("attention_kwargs", {"scale": 1.0})):
        with pytest.raises(ValueError, match=f"does not support {name}="):
            LOOP.fused(fast, **{name: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'true_cfg_scale'"):
        LOOP.fused(fast, true_cfg_scale=4.0)
    with pytest.raises(ValueError, match="divisible by 32"):
        LOOP.fused(fast, height=48)

    class MyLTX(type(fast)):
        pass
    with pytest.raises(ValueError, match="got MyLTX"):
        ltx_cfg_loop(MyLTX(**fast.components), "a cat")
    with pytest.raises(ValueError, match="got LTXVideoTransformer3DModel"):
        ltx_cfg_loop(fast.transformer, "a cat")
    # the pipeline's defaults pass
    got = LOOP.fused(fast, latents=None, return_dict=True, callback_on_step_end_tensor_inputs=[
        "latents"], output_type="latent", num_inference_steps=1)
    assert got.shape == (2, 192, 8)
