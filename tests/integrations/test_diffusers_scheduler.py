"""fmrt.integrations.diffusers.FlowMatchEulerDiscreteScheduler against diffusers' own
FlowMatchEulerDiscreteScheduler (the oracle): same schedules, same guided sampling loops, same
scale_noise, same step-index rules and errors, and no host sync in the step."""
import numpy as np
import pytest
import torch

# an image without diffusers skips this module instead of failing the whole collection
pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler as DiffusersScheduler  # noqa: E402
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (  # noqa: E402
    FlowMatchEulerDiscreteSchedulerOutput)

from fmrt import ops, use_backend  # noqa: E402
from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

N = 10
# name: (scheduler config, set_timesteps kwargs) as the pipelines use them
CONFIGS = {
    "wan_shift5": (dict(shift=5.0), dict(num_inference_steps=N)),
    "wan_shift3": (dict(shift=3.0), dict(num_inference_steps=N)),
    "flux_dynamic_mu": (dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                             base_image_seq_len=256, max_image_seq_len=4096),
                        dict(num_inference_steps=N, sigmas=np.linspace(1.0, 1 / N, N), mu=0.93)),
    "ltx_shift_terminal": (dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                shift_terminal=0.1), dict(num_inference_steps=N, mu=1.6)),
    "linear_time_shift": (dict(use_dynamic_shifting=True, time_shift_type="linear",
                               shift_terminal=0.02), dict(num_inference_steps=N, mu=0.8)),
    "mochi_invert": (dict(invert_sigmas=True),
                     dict(sigmas=list(1.0 - np.linspace(0.0, 0.9, N) ** 2))),
    "karras": (dict(shift=3.0, use_karras_sigmas=True), dict(num_inference_steps=N)),
    "exponential": (dict(use_exponential_sigmas=True), dict(num_inference_steps=N)),
    "beta": (dict(shift=2.0, use_beta_sigmas=True), dict(num_inference_steps=N)),
    "timesteps_given": (dict(), dict(timesteps=[990.0, 900.0, 700.0, 400.0, 100.0],
                                     sigmas=[0.99, 0.9, 0.7, 0.4, 0.1])),
}


def pair(name):
    """(diffusers scheduler, fmrt scheduler built with from_config of its config)."""
    d = DiffusersScheduler(**CONFIGS[name][0])
    return d, FlowMatchEulerDiscreteScheduler.from_config(d.config)


W = torch.linspace(-0.6, 0.4, 8)


def model(x, t, cond: bool):
    """A toy velocity model: linear in x along the last dim, depends on t; fp32 math, output in
    x's dtype (the transformer's)."""
    xf = x.float()
    v = 0.5 * xf + W.to(x.device) * xf.roll(1, -1) + (t.float() / 1000.0) * (0.3 if cond else -0.2)
    return v.to(x.dtype)


def guided_loop(sched, x, timesteps, dtype, *, fused=False, scale=4.0):
    """A pipeline's denoising loop (Wan / FLUX style): fp32 latents fed to the model in its
    dtype, CFG combined in the model dtype, then `scheduler.step`."""
    for t in timesteps:
        xin = x.to(dtype)
        c, u = model(xin, t, True), model(xin, t, False)
        if fused:
            x = sched.step_cfg(c, u, scale, t, x).prev_sample
        else:
            x = sched.step(u + scale * (c - u), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("name", CONFIGS)
def test_from_config_same_schedule(name):
    d, f = pair(name)
    assert f.config == d.config
    assert f.order == d.order and len(f) == len(d)
    assert torch.equal(f.sigmas, d.sigmas) and torch.equal(f.timesteps, d.timesteps)
    kw = CONFIGS[name][1]
    d.set_timesteps(**kw)
    f.set_timesteps(**kw)
    assert torch.equal(f.sigmas, d.sigmas)
    assert torch.equal(f.timesteps, d.timesteps)


def test_pipeline_retrieve_timesteps_sees_sigmas_and_timesteps_arguments():
    # pipelines inspect set_timesteps' signature before passing sigmas= / timesteps=
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
    d, f = pair("flux_dynamic_mu")
    sigmas = np.linspace(1.0, 1 / N, N)
    ts_d, n_d = retrieve_timesteps(d, N, "cpu", sigmas=sigmas, mu=0.93)
    ts_f, n_f = retrieve_timesteps(f, N, "cpu", sigmas=sigmas, mu=0.93)
    assert n_d == n_f == N and torch.equal(ts_d, ts_f)
    ts_f, _ = retrieve_timesteps(f, None, "cpu", timesteps=[900.0, 500.0], mu=0.93)
    assert ts_f.tolist() == [900.0, 500.0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", CONFIGS)
def test_guided_loop_fp32_matches_diffusers(name, backend):
    d, f = pair(name)
    for s in (d, f):
        s.set_timesteps(**CONFIGS[name][1])
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    want = guided_loop(d, x, d.timesteps, torch.float32)
    with use_backend(backend):
        got = guided_loop(f, x, f.timesteps, torch.float32)
    assert got.dtype == want.dtype == torch.float32
    assert f.step_index == d.step_index == len(d.timesteps)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def bf16_ulp(m: torch.Tensor) -> torch.Tensor:
    """The bf16 ulp at magnitude m (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(m.clamp_min(2.0 ** -100))) - 7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["wan_shift5", "flux_dynamic_mu", "karras"])
def test_bf16_steps_within_a_bf16_ulp_of_diffusers(name, backend, fused):
    # fp32 latents and a bf16 model: diffusers returns bf16 from the first step on. Each step
    # (fed diffusers' own trajectory) agrees within 2 bf16 ulps of the terms' magnitude
    # |x| + |dt v|: `step` exactly (test_whole_loop_bit_for_bit), `step_cfg` (the guided
    # velocity kept in fp32, where the pipeline rounds its CFG combine to bf16 op by op) within
    # the rounding of the |u| + 4 |c - u| terms.
    d, f = pair(name)
    for s in (d, f):
        s.set_timesteps(**CONFIGS[name][1])
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(d.timesteps):
        xin = x.to(torch.bfloat16)
        c, u = model(xin, t, True), model(xin, t, False)
        v = u + 4.0 * (c - u)
        want = d.step(v, t, x).prev_sample
        with use_backend(backend):
            got = f.step_cfg(c, u, 4.0, t, x).prev_sample if fused else f.step(v, t, x).prev_sample
        assert got.dtype == want.dtype == torch.bfloat16
        dt = (d.sigmas[i + 1] - d.sigmas[i]).abs()
        terms = v.float().abs() + (4.0 * (c.float() - u.float()).abs() + u.float().abs()
                                   if fused else 0.0)
        bound = 2 * bf16_ulp(x.float().abs() + dt * terms)
        err = (got.float() - want.float()).abs()
        assert bool((err <= bound).all()), (i, float((err / bound).max()))
        x = want
    assert f.step_index == d.step_index


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_whole_loop_close_to_diffusers(backend):
    # (now exact for `step`: test_whole_loop_bit_for_bit; kept as the coarse whole-loop check)
    d, f = pair("wan_shift5")
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(1))
    want = guided_loop(d, x, _set(d, "wan_shift5"), torch.bfloat16)
    with use_backend(backend):
        got = guided_loop(f, x, _set(f, "wan_shift5"), torch.bfloat16)
    scale = float(want.float().abs().max())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=scale / 16, rtol=0)


def _set(sched, name):
    sched.set_timesteps(**CONFIGS[name][1])
    return sched.timesteps


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["none", "norm", "token"])
def test_step_cfg_equals_combine_then_step(backend, mode):
    rescale = "none" if mode == "none" else "norm"
    norm_dim = -1 if mode == "token" else None
    a, b = (FlowMatchEulerDiscreteScheduler(shift=5.0) for _ in range(2))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 8, generator=g)
    c, u = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    scale = torch.tensor([1.0, 3.5, 7.0])
    with use_backend(backend):
        for s in (a, b):
            s.set_timesteps(4)
        for t in a.timesteps:
            x_a = a.step_cfg(c, u, scale, t, x, rescale=rescale, norm_dim=norm_dim).prev_sample
            v = ops.cfg_combine(c, u, scale, rescale=rescale, norm_dim=norm_dim)
            x_b = b.step(v, t, x).prev_sample
            torch.testing.assert_close(x_a, x_b, atol=2e-6, rtol=2e-6)
            x = x_a
    # and the plain CFG formula against diffusers' own step
    d = DiffusersScheduler(shift=5.0)
    d.set_timesteps(4)
    f = FlowMatchEulerDiscreteScheduler.from_config(d.config)
    f.set_timesteps(4)
    t = d.timesteps[0]
    want = d.step(u + scale.view(-1, 1, 1) * (c - u), t, x).prev_sample
    torch.testing.assert_close(f.step_cfg(c, u, scale, t, x).prev_sample, want,
                               atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("begin", [True, False])
def test_img2img_scale_noise_and_partial_loop(backend, begin):
    # FluxImg2Img-style: start at t_start, set_begin_index (or not: first step looks it up),
    # scale_noise the image latents at the first timestep, then denoise
    name = "flux_dynamic_mu"
    d, f = pair(name)
    t_start = 4
    g = torch.Generator().manual_seed(3)
    image, noise = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    outs = []
    for s in (d, f):
        s.set_timesteps(**CONFIGS[name][1])
        ts = s.timesteps[t_start:]
        if begin:
            s.set_begin_index(t_start)
        lat = s.scale_noise(image, ts[:1].repeat(2), noise)
        with use_backend(backend):
            outs.append((lat, guided_loop(s, lat, ts, torch.float32)))
    (lat_d, out_d), (lat_f, out_f) = outs
    assert torch.equal(lat_f, lat_d)
    torch.testing.assert_close(out_f, out_d, atol=2e-6, rtol=2e-6)
    assert f.step_index == d.step_index == N


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_noise_matches_diffusers(backend, dtype):
    d, f = pair("wan_shift5")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 6, generator=g).to(dtype)
    noise = torch.randn(3, 4, 6, generator=g).to(dtype)
    # training use (no set_timesteps, no begin_index): per-sample timesteps from the grid
    t = d.timesteps[torch.tensor([0, 517, 999])]
    with use_backend(backend):
        got = f.scale_noise(x, t, noise)
        f.set_timesteps(N)
        d.set_timesteps(N)
        f.set_begin_index(0)
        d.set_begin_index(0)
        f.step(noise, f.timesteps[0], x)
        d.step(noise, d.timesteps[0], x)
        got_after_step = f.scale_noise(x, f.timesteps[1:2], noise)   # inpainting: step_index
    want = DiffusersScheduler(shift=5.0).scale_noise(x, t, noise)
    want_after_step = d.scale_noise(x, d.timesteps[1:2], noise)
    assert got.dtype == dtype
    # sigma rounded to the sample dtype and every op rounded, as in diffusers: the same bits
    assert torch.equal(got, want)
    assert torch.equal(got_after_step, want_after_step)


def test_repeated_timesteps_take_the_second_like_diffusers():
    cfg = dict(timesteps=[1000.0, 1000.0, 750.0, 500.0], sigmas=[1.0, 0.95, 0.75, 0.5])
    d, f = DiffusersScheduler(), FlowMatchEulerDiscreteScheduler()
    for s in (d, f):
        s.set_timesteps(**cfg)
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    for t in d.timesteps[:3]:
        x_d = d.step(v, t, x).prev_sample
        x_f = f.step(v, t, x).prev_sample
        torch.testing.assert_close(x_f, x_d, atol=1e-7, rtol=1e-7)
    assert d.step_index == f.step_index == 4
    # img2img from the repeated timestep, no begin_index: the lookup also takes the second
    d.set_timesteps(**cfg)
    f.set_timesteps(**cfg)
    lat_d = d.scale_noise(x, d.timesteps[:1].repeat(2), v)
    lat_f = f.scale_noise(x, f.timesteps[:1].repeat(2), v)
    assert torch.equal(lat_f, lat_d)


def test_return_dict_both_ways():
    f = FlowMatchEulerDiscreteScheduler(shift=3.0)
    f.set_timesteps(3)
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    out = f.step(v, f.timesteps[0], x)
    assert isinstance(out, FlowMatchEulerDiscreteSchedulerOutput)
    tup = f.step(v, f.timesteps[1], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and isinstance(tup[0], torch.Tensor)
    tup = f.step_cfg(v, v, 2.0, f.timesteps[2], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1


def test_integer_timestep_error_like_diffusers():
    d, f = pair("wan_shift5")
    for s in (d, f):
        s.set_timesteps(N)
    x = torch.randn(2, 4)
    msgs = []
    for bad in (3, torch.tensor(3), torch.tensor([3], dtype=torch.int32)):
        for s in (d, f):
            with pytest.raises(ValueError, match="integer indices") as e:
                s.step(x, bad, x)
            msgs.append(str(e.value))
    assert msgs[0] == msgs[1]
    assert f.step_index is None          # nothing advanced


def test_rejected_configs_and_arguments():
    d = DiffusersScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowMatchEulerDiscreteScheduler.from_config(d.config)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    f = FlowMatchEulerDiscreteScheduler(shift=5.0)
    f.set_timesteps(N)
    x = torch.randn(2, 4)
    t = f.timesteps[0]
    with pytest.raises(ValueError, match="per_token_timesteps"):   # [B, L] for [B, L, C]
        f.step(x, t, x, per_token_timesteps=torch.full((2, 4), 900.0))
    with pytest.raises(TypeError, match="per_token_timesteps"):
        f.step(x, t, x, per_token_timesteps=torch.full((2,), 900))
    with pytest.raises(ValueError, match="one value per step"):
        f.step(x, f.timesteps[:2], x)
    with pytest.raises(ValueError, match="shape"):
        f.step(torch.randn(2, 5), t, x)
    with pytest.raises(TypeError, match="model_output"):
        f.step(x.long(), t, x)
    with pytest.raises(TypeError, match="noise"):
        f.scale_noise(x, t, None)
    with pytest.raises(ValueError, match="timestep"):
        f.scale_noise(x, f.timesteps[:3], x)
    with pytest.raises(TypeError, match="timestep"):
        f.step(x, "999", x)
    with pytest.raises(ValueError, match="rescale"):
        f.step_cfg(x, x, 2.0, t, x, rescale="bogus")
    assert f.step_index is None          # bad calls did not step
    f.set_begin_index(N - 1)
    f.step(x, t, x)
    with pytest.raises(IndexError, match="past the end"):
        f.step(x, t, x)


def test_loop_on_meta_tensors_never_reads_a_value():
    # meta tensors have no data: any .item(), nonzero(), bool() or host copy raises
    f = FlowMatchEulerDiscreteScheduler(shift=5.0)
    d = DiffusersScheduler(shift=5.0)
    x = torch.empty(2, 3, 8, device="meta")
    for s in (f, d):
        s.set_timesteps(N, device="meta")
    with use_backend("torch"):
        lat = f.scale_noise(x, f.timesteps[:1].repeat(2), x)
        lat = guided_loop(f, lat, f.timesteps, torch.bfloat16)
        f.set_timesteps(N, device="meta")
        lat = guided_loop(f, lat, f.timesteps, torch.bfloat16, fused=True)
    assert lat.device.type == "meta" and lat.shape == x.shape and lat.dtype == torch.bfloat16
    with pytest.raises(Exception):        # diffusers' own first step reads the index back
        d.step(x, d.timesteps[0], x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loop_without_item_or_nonzero(backend, monkeypatch):
    f = FlowMatchEulerDiscreteScheduler(shift=5.0)
    f.set_timesteps(N)
    x = torch.randn(2, 3, 8)
    d = DiffusersScheduler(shift=5.0)
    d.set_timesteps(N)
    want = guided_loop(d, x, d.timesteps, torch.float32)
    f2 = FlowMatchEulerDiscreteScheduler(shift=5.0)
    f2.set_timesteps(N)

    def forbidden(*a, **k):
        raise AssertionError("host sync in the sampling loop")
    # ops check the values of small CPU tensors (no device to sync there); CUDA tensors are
    # never read back (ops.host_values gives None): make these CPU tensors behave like them
    import fmrt.ops
    monkeypatch.setattr(fmrt.ops, "host_values", lambda t: None)
    for name in ("item", "nonzero", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with use_backend(backend):
        lat = guided_loop(f, x, f.timesteps, torch.float32)
        fused = guided_loop(f2, x, f2.timesteps, torch.float32, fused=True)
    monkeypatch.undo()
    torch.testing.assert_close(lat, want, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(fused, want, atol=2e-6, rtol=2e-6)
    assert f.step_index == f2.step_index == N


@pytest.mark.gpu
def test_cuda_loop_has_no_sync(monkeypatch):
    # torch's sync debug mode raises on any synchronizing call (item, nonzero, blocking copies)
    import sys
    monkeypatch.setattr(sys.modules[__name__], "W", W.cuda())   # the toy model's weight
    x = torch.randn(2, 16, W.numel(), device="cuda")
    d = DiffusersScheduler(shift=5.0)
    d.set_timesteps(N, device="cuda")
    want = guided_loop(d, x, d.timesteps, torch.bfloat16)
    f, f2 = FlowMatchEulerDiscreteScheduler(shift=5.0), FlowMatchEulerDiscreteScheduler(shift=5.0)
    for s in (f, f2):
        s.set_timesteps(N, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = guided_loop(f, x, f.timesteps, torch.bfloat16)
        fused = guided_loop(f2, x, f2.timesteps, torch.bfloat16, fused=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    scale = float(want.float().abs().max())
    for out in (got, fused):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want.float(), atol=scale / 16, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["wan_shift5", "flux_dynamic_mu", "karras"])
@pytest.mark.parametrize("fused", [False, True], ids=["step", "step_cfg"])
def test_whole_loop_bit_for_bit(name, dtype, backend, fused):
    """`step` rounds as diffusers' step does (dt and dt * v in the model dtype, no FMA), and
    `step_cfg` rounds the combine as the pipeline's eager `u + s * (c - u)` does: a whole guided
    loop from fp32 latents with a model of `dtype` gives diffusers' samples exactly, on the
    torch path and in the kernel."""
    d, f = pair(name)
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(1))
    want = guided_loop(d, x, _set(d, name), dtype)
    with use_backend(backend):
        got = guided_loop(f, x, _set(f, name), dtype, fused=fused)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# scale_noise bit for bit; timesteps off the schedule; degenerate schedules; per-token steps
# ---------------------------------------------------------------------------------------------

BF, HF, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtypes", [(BF, BF), (HF, HF), (F32, F32), (BF, F32), (F32, BF),
                                    (HF, BF), (F32, HF)], ids=lambda d: "-".join(
                                        str(t).replace("torch.", "") for t in d))
@pytest.mark.parametrize("name", ["wan_shift5", "flux_dynamic_mu", "karras"])
def test_scale_noise_bit_for_bit(name, dtypes, backend):
    """diffusers' `sigma * noise + (1.0 - sigma) * sample` with sigma in the sample's dtype,
    rounded op by op under torch's promotion: fmrt gives the same bits and the same dtype (a
    bf16 sample with fp32 noise: fp32), per-sample timesteps, after begin_index and after a
    step (inpainting), on the torch path and in the kernel."""
    sd, nd = dtypes
    d, f = pair(name)
    for s in (d, f):
        s.set_timesteps(**CONFIGS[name][1])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 37, generator=g).to(sd)       # 148 elements per sample: odd tails
    noise = torch.randn(3, 4, 37, generator=g).to(nd)
    t = d.timesteps[torch.tensor([0, 4, N - 1])]
    with use_backend(backend):
        got = [f.scale_noise(x, t, noise), f.scale_noise(x, t[1:2], noise)]
        f.set_begin_index(2)
        got.append(f.scale_noise(x, t[:1], noise))
        f.step(noise.float(), f.timesteps[2], x.float())
        got.append(f.scale_noise(x, t[:1], noise))
    want = [d.scale_noise(x, t, noise), d.scale_noise(x, t[1:2], noise)]
    d.set_begin_index(2)
    want.append(d.scale_noise(x, t[:1], noise))
    d.step(noise.float(), d.timesteps[2], x.float())
    want.append(d.scale_noise(x, t[:1], noise))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.promote_types(sd, nd)
        assert torch.equal(a, b)


def test_scale_noise_rounds_unlike_a_single_rounding():
    """The cases above are not vacuous: in bf16, one fp32 rounding (fmrt's training add_noise)
    differs from diffusers' op-by-op rounding on many elements."""
    d = DiffusersScheduler(shift=5.0)
    x, noise = torch.randn(4, 512).to(BF), torch.randn(4, 512).to(BF)
    t = d.timesteps[torch.tensor([100, 300, 600, 900])]
    once = ops.noised_sample(x, d.sigmas[[100, 300, 600, 900]], noise, None,
                             return_target=False)[0]
    assert (once != d.scale_noise(x, t, noise)).float().mean() > 0.1


def test_timestep_off_the_schedule_raises_like_diffusers():
    d, f = pair("wan_shift5")
    for s in (d, f):
        s.set_timesteps(N)
    x = torch.randn(2, 4)
    off = float(d.timesteps[3]) + 0.25
    with pytest.raises(IndexError):                      # diffusers: an empty nonzero()
        d.step(x, off, x)
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
        f.step(x, off, x)
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
        f.step_cfg(x, x, 2.0, torch.tensor(off), x)
    with pytest.raises(IndexError):
        d.scale_noise(x, torch.tensor([off, float(d.timesteps[0])]), x)
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
        f.scale_noise(x, torch.tensor([float(f.timesteps[0]), off]), x)
    assert f.step_index is None
    # on the schedule, as a Python float or a float64 tensor (compared in float32 as diffusers
    # does): both step the same
    on = float(d.timesteps[3])
    for t in (on, torch.tensor(on, dtype=torch.float64)):
        for s in (d, f):
            s.set_timesteps(N)
        assert torch.equal(f.step(x, t, x).prev_sample, d.step(x, t, x).prev_sample)
        assert f.step_index == d.step_index == 4
    # with begin_index nothing is looked up, in either
    for s in (d, f):
        s.set_timesteps(N)
        s.set_begin_index(0)
    assert torch.equal(f.step(x, off, x).prev_sample, d.step(x, off, x).prev_sample)


def test_degenerate_shift_terminal_schedule_raises():
    """One step with shift_terminal: diffusers' stretch divides by 1 - sigma_last = 0 and
    its schedule is NaN; its first step raises; fmrt refuses the schedule in set_timesteps."""
    d, f = pair("ltx_shift_terminal")
    with np.errstate(divide="ignore", invalid="ignore"):   # diffusers' own 0 / 0
        d.set_timesteps(1, mu=1.6)
    assert torch.isnan(d.sigmas[:1]).all()
    with pytest.raises(IndexError):
        d.step(torch.zeros(1, 4), d.timesteps[0], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="shift_terminal"):
        f.set_timesteps(1, mu=1.6)
    f.set_timesteps(2, mu=1.6)                          # two steps are fine, as in diffusers
    d.set_timesteps(2, mu=1.6)
    assert torch.equal(f.sigmas, d.sigmas) and torch.isfinite(f.sigmas).all()


def _ltx_condition_loop(sched, x, timesteps, mask, dtype):
    """LTXConditionPipeline's loop: per-token timesteps `min(t, (1 - mask) * 1000)` (the
    conditioning tokens are clean), the model output negated, fp32 latents kept."""
    for t in timesteps:
        tok = torch.min(t.expand(x.shape[0]).unsqueeze(-1).float(), (1 - mask) * 1000.0)
        v = model(x.to(dtype), t, True)
        x = sched.step(-v, t, x, per_token_timesteps=tok, return_dict=False)[0]
    return x


@pytest.mark.parametrize("dtype", [F32, BF, HF])
@pytest.mark.parametrize("name", ["ltx_shift_terminal", "wan_shift5"])
def test_per_token_timesteps_bit_for_bit(name, dtype):
    d, f = pair(name)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 8, generator=g)
    mask = (torch.rand(2, 7, generator=g) < 0.3).float()
    mask[:, 0] = 1.0
    outs = []
    for s in (d, f):
        s.set_timesteps(**CONFIGS[name][1])
        outs.append(_ltx_condition_loop(s, x, s.timesteps, mask, dtype))
    assert outs[0].dtype == outs[1].dtype == torch.float32
    assert torch.equal(outs[1], outs[0])
    assert f.step_index == d.step_index == N
    # a token halfway between two grid sigmas steps to the one below, as in diffusers
    for s in (d, f):
        s.set_timesteps(**CONFIGS[name][1])
    tok = (d.timesteps[2] + d.timesteps[3]).reshape(1, 1).expand(2, 7) / 2
    v = torch.randn(2, 7, 8, generator=g)
    assert torch.equal(f.step(v, f.timesteps[0], x, per_token_timesteps=tok).prev_sample,
                       d.step(v, d.timesteps[0], x, per_token_timesteps=tok).prev_sample)


def test_per_token_loop_never_reads_a_value():
    """On meta tensors (no values: any read back raises) the per-token loop runs through."""
    f = FlowMatchEulerDiscreteScheduler(shift=5.0)
    f.set_timesteps(N, device="meta")
    x = torch.empty(2, 7, 8, device="meta")
    mask = torch.empty(2, 7, device="meta")
    for t in f.timesteps:
        tok = torch.min(t.expand(2).unsqueeze(-1), (1 - mask) * 1000.0)
        x = f.step(x.to(BF), t, x, per_token_timesteps=tok).prev_sample
    assert x.device.type == "meta" and x.dtype == torch.float32
