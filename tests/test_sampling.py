import math

import pytest
import torch

from fmrt import use_backend
from fmrt.sampling import (CapturedSampler, DiagnosticsRecorder, default_sigma_grid,
                           plot_diagnostics, sample, unipc_orders)
from tests.helpers import assert_close

BACKENDS = ["torch", "triton"]


def _linear_velocity(D=6, seed=0):
    """A fixed deterministic velocity field v(x, s) = x W^T + 0.5 sin(3 s) x (per sample s)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g) * 0.3

    def vel(x, s):
        return x @ W.T + 0.5 * torch.sin(3 * s).reshape(-1, 1) * x

    return vel


def _trajectory(**kw):
    xs = []
    out = sample(callback=lambda i, x: xs.append(x.clone()), **kw)
    return out, xs


# ---------------------------------------------------------------------------------------------
# peers: diffusers' Euler and UniPC schedulers driven by the same velocity function
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_loop_matches_diffusers(backend, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    vel = _linear_velocity()
    x0 = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(12)
    x, want = x0.clone(), []
    for i, t in enumerate(sch.timesteps):
        x = sch.step(vel(x, sch.sigmas[i].expand(2)), t, x).prev_sample
        want.append(x)
    with use_backend(backend):
        out, got = _trajectory(model=lambda x, s, c: vel(x, s), noise=x0.clone(),
                               sigmas=sch.sigmas.clone())
    assert len(got) == len(want) == 12
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_unipc_loop_matches_diffusers_step_by_step(steps, shift):
    from diffusers import UniPCMultistepScheduler
    vel = _linear_velocity(seed=2)
    x0 = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    sch = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                  flow_shift=shift)
    assert sch.config.solver_type == "bh2" and sch.config.solver_order == 2
    sch.set_timesteps(steps)
    x, want = x0.clone(), []
    for i, t in enumerate(sch.timesteps):
        x = sch.step(vel(x, sch.sigmas[i].expand(3)), t, x).prev_sample
        want.append(x)
    out, got = _trajectory(model=lambda x, s, c: vel(x, s), noise=x0.clone(),
                           sigmas=sch.sigmas.clone(), solver="unipc")
    assert len(got) == steps
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_heun_loop_matches_diffusers_flow_match_heun(backend):
    from diffusers import FlowMatchHeunDiscreteScheduler
    vel = _linear_velocity(seed=5)
    x0 = torch.randn(2, 6, generator=torch.Generator().manual_seed(6))
    sch = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sch.set_timesteps(6)
    x = x0.clone()
    for i, t in enumerate(sch.timesteps):  # [t0, t1, t1, t2, t2, ...]: predictor, corrector
        x = sch.step(vel(x, sch.sigmas[i].expand(2)), t, x).prev_sample
    grid = torch.cat([sch.sigmas[::2], torch.zeros(1)])  # its 6 distinct sigmas, then 0
    with use_backend(backend):
        out = sample(lambda x, s, c: vel(x, s), x0.clone(), sigmas=grid, solver="heun")
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_unipc_triton_backend_and_orders():
    vel = _linear_velocity(seed=4)
    x0 = torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    grid = default_sigma_grid(6, shift=3.0)
    grid[0] = 1 - 1e-6
    a = sample(lambda x, s, c: vel(x, s), x0, sigmas=grid, solver="unipc")
    with use_backend("triton"):
        b = sample(lambda x, s, c: vel(x, s), x0, sigmas=grid, solver="unipc")
    assert_close(b, a)
    assert unipc_orders(1) == [1] and unipc_orders(4) == [1, 2, 2, 1]


# ---------------------------------------------------------------------------------------------
# exact answers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["euler", "heun", "unipc", "meanflow"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_field_recovers_the_target_exactly(solver, backend):
    # v(x, s) = (x - x0) / s is the exact velocity of the straight path to x0: every solver
    # lands on x0 (Euler is exact on it; the others too, the field is linear along the path).
    g = torch.Generator().manual_seed(6)
    target, noise = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)

    def model(x, s, c):
        return (x - target) / s.view(-1, 1, 1)

    def mf_model(z, r, t, c):
        return (z - target) / t.view(-1, 1, 1)

    grid = default_sigma_grid(5, shift=3.0)
    with use_backend(backend):
        out = sample(mf_model if solver == "meanflow" else model, noise, sigmas=grid,
                     solver=solver)
    assert_close(out, target, scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_euler_linear_field_product_solution(backend):
    # v = lam * x: Euler gives x_N = prod_i (1 + lam (s_{i+1} - s_i)) x_0
    lam = 0.7
    grid = default_sigma_grid(7, shift=2.0)
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(7))
    with use_backend(backend):
        out = sample(lambda x, s, c: lam * x, noise, sigmas=grid)
    factor = math.prod(1 + lam * (grid[i + 1].item() - grid[i].item()) for i in range(7))
    assert_close(out, noise * factor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meanflow_one_step(backend):
    g = torch.Generator().manual_seed(8)
    u_true, z1 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    seen = []

    def model(z, r, t, c):
        seen.append((r.clone(), t.clone()))
        return u_true

    with use_backend(backend):
        out = sample(model, z1, steps=1, solver="meanflow")
    assert_close(out, z1 - u_true)
    assert torch.equal(seen[0][0], torch.zeros(2)) and torch.equal(seen[0][1], torch.ones(2))


# ---------------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------------

class CountingModel:
    """v = x * (1 - sigma) + cond (cond: [B] floats); counts forwards and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        s = sigma.view(-1, *([1] * (x.ndim - 1))) if sigma.ndim == 1 else \
            sigma[:, None, :, None, None]
        c = cond.view(-1, *([1] * (x.ndim - 1))) if cond is not None else 0.0
        return 0.5 * x * (1 - s) + c


def _manual_guided_euler(model, noise, grid, scale, cond, uncond, rescale="none",
                         scales=None, zero_star=False, zero_steps=0):
    """The diffusers-style loop: two forwards, combine, scheduler step (torch ops, fp32)."""
    x = noise
    for i in range(grid.numel() - 1):
        s = grid[i].expand(x.shape[0])
        c, u = model(x, s, cond), model(x, s, uncond)
        sc = scale if scales is None else scales[i]
        if zero_star:
            pf, nf = c.flatten(1), u.flatten(1)
            alpha = (pf * nf).sum(1, keepdim=True) / ((nf ** 2).sum(1, keepdim=True) + 1e-8)
            alpha = alpha.view(-1, *([1] * (c.ndim - 1)))
            v = u * alpha + sc * (c - u * alpha)
            if i < zero_steps:
                v = v * 0
        else:
            v = u + sc * (c - u)
        if rescale == "norm":
            v = v * (c.flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
        x = x + (grid[i + 1] - grid[i]) * v
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", ["none", "norm"])
def test_batched_cfg_matches_two_forwards_and_manual_loop(backend, rescale):
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(9))
    cond, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    grid = default_sigma_grid(5, shift=3.0)
    m1, m2 = CountingModel(), CountingModel()
    with use_backend(backend):
        a = sample(m1, noise, sigmas=grid, guidance_scale=4.0, cond=cond, uncond=uncond,
                   rescale=rescale)
        b = sample(m2, noise, sigmas=grid, guidance_scale=4.0, cond=cond, uncond=uncond,
                   rescale=rescale, batch_cfg=False)
    assert m1.calls == [4] * 5 and m2.calls == [2] * 10
    assert_close(a, b)
    want = _manual_guided_euler(CountingModel(), noise, grid, 4.0, cond, uncond, rescale)
    assert_close(a, want, scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_guidance_scale_and_interval(backend):
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(10))
    cond, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    grid = default_sigma_grid(6)
    scale = torch.tensor([3.0, 6.0])
    lo, hi = 0.3, 0.8
    with use_backend(backend):
        out = sample(CountingModel(), noise, sigmas=grid, guidance_scale=scale, cond=cond,
                     uncond=uncond, guidance_interval=(lo, hi))
    scales = [scale if lo <= grid[i].item() <= hi else torch.ones(2) for i in range(6)]
    scales = [s.view(-1, 1, 1, 1) for s in scales]
    want = _manual_guided_euler(CountingModel(), noise, grid, None, cond, uncond, scales=scales)
    assert_close(out, want, scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_zero_star(backend):
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(11))
    cond, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    grid = default_sigma_grid(5, shift=2.0)
    with use_backend(backend):
        out = sample(CountingModel(), noise, sigmas=grid, guidance_scale=5.0, cond=cond,
                     uncond=uncond, cfg_zero_star=True, cfg_zero_init_steps=1)
    want = _manual_guided_euler(CountingModel(), noise, grid, 5.0, cond, uncond,
                                zero_star=True, zero_steps=1)
    assert_close(out, want, scale=4)
    rec = DiagnosticsRecorder()
    with use_backend(backend):
        sample(CountingModel(), noise, sigmas=grid, guidance_scale=5.0, cond=cond,
               uncond=uncond, cfg_zero_star=True, cfg_zero_init_steps=2, recorder=rec,
               solver="heun")
    assert len(rec) == 5 and all("cfg_diff_norm" in r for r in rec.records)


def test_unbatchable_cond_uses_two_forwards():
    seen = []

    def model(x, s, cond):
        seen.append(None if cond is None else tuple(cond.shape))
        return x * 0 + (0.0 if cond is None else cond.mean())

    noise = torch.randn(1, 4, 3)
    out = sample(model, noise, steps=2, guidance_scale=3.0, cond=torch.ones(1, 7, 8),
                 uncond=torch.zeros(1, 2, 8))
    assert seen == [(1, 7, 8), (1, 2, 8)] * 2
    seen.clear()
    sample(model, noise, steps=2, guidance_scale=2.0, cond=torch.ones(1, 7, 8))
    assert seen == [(1, 7, 8), None] * 2
    assert_close(out, noise - 3.0)


# ---------------------------------------------------------------------------------------------
# img2img, TI2V, SDE, diagnostics, progress
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_img2img_starts_from_noised_input(backend):
    g = torch.Generator().manual_seed(12)
    x_init, noise = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    first = []

    def model(x, s, c):
        if not first:
            first.append((x.clone(), s.clone()))
        return torch.zeros_like(x)

    with use_backend(backend):
        out = sample(model, noise, x_init=x_init, denoising_strength=0.4, steps=3)
    assert_close(first[0][1], torch.full((2,), 0.4))
    assert_close(first[0][0], 0.6 * x_init + 0.4 * noise)
    assert_close(out, 0.6 * x_init + 0.4 * noise)  # zero velocity: stays


@pytest.mark.parametrize("solver", ["euler", "heun", "unipc"])
def test_ti2v_pins_frame_zero_and_passes_per_frame_sigma(solver):
    g = torch.Generator().manual_seed(13)
    noise = torch.randn(2, 3, 4, 2, 3, generator=g)
    first_frame = torch.randn(2, 3, 1, 2, 3, generator=g)
    sigmas_seen = []
    model = CountingModel()

    def wrapped(x, s, c):
        sigmas_seen.append(s.clone())
        assert torch.equal(x[:B, :, :1], first_frame)
        return model(x, s, c)

    B = 2
    out, xs = _trajectory(model=wrapped, noise=noise, steps=3, solver=solver,
                          first_frame=first_frame, guidance_scale=2.0,
                          cond=torch.tensor([1.0, 2.0]), uncond=torch.zeros(2))
    for x in xs:
        assert torch.equal(x[:, :, :1], first_frame)
    assert sigmas_seen[0].shape == (4, 4)  # batched CFG: [2B, T]
    assert torch.all(sigmas_seen[0][:, 0] == 0) and torch.all(sigmas_seen[0][:, 1:] == 1)
    assert not torch.equal(out[:, :, 1:], noise[:, :, 1:])


def test_img2img_with_scheduler_strength():
    from fmrt import FlowMatchScheduler
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(4, denoising_strength=0.6)
    g = torch.Generator().manual_seed(16)
    x_init, noise = torch.randn(1, 2, 3, generator=g), torch.randn(1, 2, 3, generator=g)
    first = []
    sample(lambda x, s, c: first.append((x.clone(), s.clone())) or torch.zeros_like(x), noise,
           scheduler=sched, x_init=x_init)
    s0 = sched.sigmas[0]
    assert_close(first[0][1], s0.expand(1))
    assert_close(first[0][0], (1 - s0) * x_init + s0 * noise)
    with pytest.raises(ValueError, match="denoising_strength"):
        sample(lambda x, s, c: x, noise, scheduler=sched, x_init=x_init, denoising_strength=0.5)


def test_euler_maruyama_sampler():
    noise = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(14))
    model = CountingModel()
    with use_backend("triton"):
        a = sample(model, noise, steps=4, solver="euler_maruyama", eta=0.8, seed=3)
        b = sample(model, noise, steps=4, solver="euler_maruyama", eta=0.8, seed=3)
        c = sample(model, noise, steps=4, solver="euler_maruyama", eta=0.8, seed=4)
        d = sample(model, noise, steps=4, solver="euler_maruyama", eta=0.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # eta = 0 is the Euler sampler, on both backends
    assert torch.equal(d, sample(model, noise, steps=4, solver="euler"))
    assert_close(sample(model, noise, steps=4, solver="euler_maruyama", eta=0.0, seed=4), d)
    # the torch path draws the same Philox noise: same trajectory
    assert_close(sample(model, noise, steps=4, solver="euler_maruyama", eta=0.8, seed=3), a)


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_recorder_and_plot(tmp_path, solver):
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(15))
    cond, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    grid = default_sigma_grid(4, shift=3.0)
    rec = DiagnosticsRecorder()
    with use_backend("triton"):
        sample(CountingModel(), noise, sigmas=grid, guidance_scale=4.0, cond=cond,
               uncond=uncond, recorder=rec, solver=solver)
    assert len(rec) == 4
    assert all(isinstance(v, torch.Tensor) for v in rec.records[0].values()
               if not isinstance(v, int))
    stacked = rec.as_tensors()
    assert stacked["cfg_diff_norm"].shape == (4, 2)
    host = rec.to_host()
    assert [r["step"] for r in host] == [0, 1, 2, 3]
    assert_close(torch.tensor([r["sigma"][0] for r in host]), grid[:4])
    # CountingModel: cfg_diff = cond - uncond exactly, whatever x and sigma
    for r in host:
        assert r["cfg_diff_mean"] == pytest.approx([0.5, -2.25], rel=1e-5)
        assert r["cfg_diff_norm"] == pytest.approx([0.5 * 60 ** 0.5, 2.25 * 60 ** 0.5],
                                                   rel=1e-5)
        assert r["vel_diff_norm"] == pytest.approx([r["sigma"][0] * 0.5 * 60 ** 0.5,
                                                    r["sigma"][1] * 2.25 * 60 ** 0.5], rel=1e-5)
    path = tmp_path / "diag.png"
    plot_diagnostics(rec, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar(capsys):
    noise = torch.randn(1, 4)
    out = sample(lambda x, s, c: torch.zeros_like(x), noise, steps=3, progress=True)
    assert torch.equal(out, noise)
    assert "3/3" in capsys.readouterr().err


def test_sample_bad_input():
    noise = torch.randn(2, 3, 4)
    model = CountingModel()
    with pytest.raises(ValueError, match="solver"):
        sample(model, noise, solver="dpm")
    with pytest.raises(ValueError, match="steps"):
        sample(model, noise, steps=-1)
    with pytest.raises(ValueError, match="eta"):
        sample(model, noise, solver="euler_maruyama", eta=-1.0)
    with pytest.raises(TypeError, match="recorder"):
        sample(model, noise, recorder={})
    with pytest.raises(ValueError, match="recorder"):
        sample(model, noise, recorder=DiagnosticsRecorder())
    with pytest.raises(ValueError, match="rescale"):
        sample(model, noise, rescale="l2")
    with pytest.raises(ValueError, match="x_init"):
        sample(model, noise, x_init=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="first_frame"):
        sample(model, noise, first_frame=torch.randn(2, 3, 1, 4))
    with pytest.raises(ValueError, match="denoising_strength"):
        sample(model, noise, denoising_strength=1.5)
    with pytest.raises(ValueError, match="sigmas"):
        sample(model, noise, sigmas=[1.0])
    with pytest.raises(TypeError, match="guidance_scale"):
        sample(model, noise, guidance_scale="4")
    with pytest.raises(TypeError, match="noise"):
        sample(model, noise.long())


# ---------------------------------------------------------------------------------------------
# GPU: no host sync anywhere in the loop (CUDA graph capture of a whole sampling call)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["euler", "heun", "unipc", "euler_maruyama"])
def test_sampling_loop_captures_in_a_cuda_graph(solver):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    W = torch.randn(8, 8, device=dev) * 0.1

    def model(x, s, cond):
        return x @ W + s.view(-1, 1, 1) * cond.view(-1, 1, 1)

    noise = torch.randn(2, 16, 8, device=dev)
    cond, uncond = torch.tensor([1.0, 2.0], device=dev), torch.zeros(2, device=dev)
    grid = default_sigma_grid(6, shift=3.0, device=dev)
    stats_rec = DiagnosticsRecorder()
    kw = dict(sigmas=grid, solver=solver, guidance_scale=torch.tensor([3.0, 5.0], device=dev),
              cond=cond, uncond=uncond, seed=7, rescale="norm", recorder=stats_rec)
    eager = sample(model, noise, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles, allocator)
        sample(model, noise, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            static_out = sample(model, noise, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager)
    first = static_out.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, first)
    # the helper: same answer, new noise goes through the static input
    kw.pop("recorder")
    sampler = CapturedSampler(model, noise, **kw)
    torch.testing.assert_close(sampler(noise), sample(model, noise, **kw))
    other = torch.randn_like(noise)
    torch.testing.assert_close(sampler(other), sample(model, other, **kw))


def test_captured_sampler_refuses_cpu_and_host_grids():
    with pytest.raises(ValueError, match="CUDA"):
        CapturedSampler(lambda x, s, c: x, torch.randn(1, 4), sigmas=torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# the scheduler (branch sched): its grids drive the loop; Wan-official + UniPC = Wan's default
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["Wan", "FLUX.1"])
def test_scheduler_grid_drives_the_loop(template):
    from fmrt import FlowMatchScheduler
    sched = FlowMatchScheduler(template)
    sched.set_timesteps(6, shift=3.0)
    vel = _linear_velocity(seed=9)
    x0 = torch.randn(2, 6, generator=torch.Generator().manual_seed(10))
    seen = []

    def model(x, s, c):
        seen.append(s.clone())
        return vel(x, s)

    a = sample(model, x0, scheduler=sched)
    assert torch.equal(torch.stack([t[0] for t in seen]), sched.sigmas)
    x = x0
    for i in range(6):  # DiffSynth's loop: scheduler.step with the grid's timesteps
        x = sched.step(vel(x, sched.sigmas[i].expand(2)), sched.timesteps[i], x)
    assert_close(a, x)


def test_wan_official_unipc_matches_diffusers_unipc():
    """Wan's default sampler: FlowUniPC (bh2, order 2) on Wan's grid (sigma_max 0.999, integer
    timesteps fed to the model), against diffusers' UniPC on the same unshifted sigmas."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler
    from fmrt import FlowMatchScheduler
    N, k = 10, 5.0
    sched = FlowMatchScheduler("Wan-official")
    sched.set_timesteps(N, shift=k)
    vel = _linear_velocity(seed=11)
    x0 = torch.randn(2, 6, generator=torch.Generator().manual_seed(12))
    ref_s = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                    flow_shift=k)
    ref_s.set_timesteps(sigmas=np.linspace(0.999, 0.0, N + 1)[:-1])
    assert torch.equal(ref_s.timesteps.float(), sched.timesteps)
    x, want = x0.clone(), []
    for t in ref_s.timesteps:
        x = ref_s.step(vel(x, (t / 1000.0).float().expand(2)), t, x).prev_sample
        want.append(x)
    seen = []

    def model(x, s, c):
        seen.append(s[0].item())
        return vel(x, s)

    out, got = _trajectory(model=model, noise=x0.clone(), scheduler=sched, solver="unipc")
    assert seen == pytest.approx([t / 1000 for t in ref_s.timesteps.tolist()], abs=1e-7)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")


# ---------------------------------------------------------------------------------------------
# the plan (fmrt.guidance policies, step caching) and the loop that executes it
# ---------------------------------------------------------------------------------------------

from fmrt.cache import FirstBlockCache, MagCache  # noqa: E402
from fmrt.guidance import AdaptiveGuidanceReuse, GuidanceReuse  # noqa: E402
from fmrt.sampling import Plan, make_plan  # noqa: E402


def test_exact_plans():
    p = make_plan(8, guidance_reuse=GuidanceReuse(every=3, first=2, last=1))
    assert p.branches == ("cfg", "cfg", "reuse", "reuse", "cfg", "reuse", "reuse", "cfg")
    assert p.blocks == tuple(("all", "all" if b == "cfg" else "-") for b in p.branches)
    assert p.model_calls() == {"cond": 8, "uncond": 4} and p.static
    assert make_plan(4, guidance_reuse=GuidanceReuse(every=1)).branches == ("cfg",) * 4
    assert make_plan(3, guided=False).branches == ("cond",) * 3
    # interval: outside [lo, hi] no uncond forward; a reuse right after it refreshes first
    sig = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    p = make_plan(8, sig, guidance_interval=(0.35, 0.85), guidance_reuse=GuidanceReuse(2))
    assert p.branches == ("cond", "cond", "cfg", "reuse", "cfg", "reuse", "cfg", "cond")
    assert p.model_calls() == {"cond": 8, "uncond": 3}
    p = make_plan(5, guidance_reuse=AdaptiveGuidanceReuse(0.1, first=2, last=1))
    assert p.branches == ("cfg", "cfg", "adaptive", "adaptive", "cfg") and not p.static
    # step caching: first-block probes every call after the first; MagCache is static
    p = make_plan(4, cache=FirstBlockCache(0.1), guidance_reuse=GuidanceReuse(2))
    assert p.blocks == (("all", "all"), ("probe", "-"), ("probe", "probe"), ("probe", "-"))
    assert not p.static
    mag = MagCache([1.0, 1.0, 0.99, 1.02, 0.97, 1.0, 1.0, 1.1], threshold=0.05, max_skip=2,
                   retention=0.25)
    p = make_plan(8, cache=mag)
    # t < 2 kept; t=2: err .01 skip; t=3: prod .9898, err .0202 skip; t=4: 3rd in a row -> all;
    # t=5: 1.0 skip; t=6: skip (2 in a row); t=7: reset -> all
    assert [b[0] for b in p.blocks] == ["all", "all", "skip", "skip", "all", "skip", "skip",
                                        "all"]
    assert p.static


def test_plan_bad_settings_are_errors_before_any_work():
    model = CountingModel()
    noise = torch.randn(2, 3, 4)
    kw = dict(steps=4, guidance_scale=3.0, cond=torch.ones(2), uncond=torch.zeros(2))
    with pytest.raises(ValueError, match="every"):
        GuidanceReuse(every=0)
    with pytest.raises(ValueError, match="first"):
        GuidanceReuse(first=0)
    with pytest.raises(ValueError, match="tol"):
        AdaptiveGuidanceReuse(tol=-0.1)
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCache(-1.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(model, noise, guidance_interval=(0.8, 0.2), **kw)
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(model, noise, guidance_interval=(-0.1, 0.5), **kw)
    with pytest.raises(TypeError, match="guidance_reuse"):
        sample(model, noise, guidance_reuse="static", **kw)
    with pytest.raises(ValueError, match="euler"):
        sample(model, noise, guidance_reuse=GuidanceReuse(), solver="heun", **kw)
    with pytest.raises(ValueError, match="cannot be cached"):
        sample(model, noise, cache=FirstBlockCache(), **kw)
    with pytest.raises(TypeError, match="cache"):
        sample(model, noise, cache="first-block", **kw)
    assert model.calls == []


def _reuse_manual(model, noise, grid, scale, cond, uncond, branches):
    """The plan executed by hand: refresh steps measure d, reuse steps use c + (s - 1) d."""
    x, d = noise, None
    for i, b in enumerate(branches):
        s, sn = grid[i], grid[i + 1]
        t = s.expand(noise.shape[0])
        c = model(x, t, cond)
        if b == "cfg":
            d = c - model(x, t, uncond)
        v = c + (scale - 1) * d
        x = x + (sn - s) * v
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_reuse_runs_the_plan(backend):
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(21))
    cond, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    grid = default_sigma_grid(7, shift=3.0)
    policy = GuidanceReuse(every=3, first=1, last=1)
    plan = make_plan(7, guidance_reuse=policy)
    m = CountingModel()
    with use_backend(backend):
        out = sample(m, noise, sigmas=grid, guidance_scale=4.0, cond=cond, uncond=uncond,
                     guidance_reuse=policy)
    # batched [cond; uncond] forwards on refresh steps, cond-only forwards on reuse steps
    assert m.calls == [4 if b == "cfg" else 2 for b in plan.branches]
    want = _reuse_manual(CountingModel(), noise, grid, 4.0, cond, uncond, plan.branches)
    assert_close(out, want, scale=4)
    # every=1 is full CFG
    with use_backend(backend):
        full = sample(CountingModel(), noise, sigmas=grid, guidance_scale=4.0, cond=cond,
                      uncond=uncond, guidance_reuse=GuidanceReuse(every=1))
    assert_close(full, _manual_guided_euler(CountingModel(), noise, grid, 4.0, cond, uncond),
                 scale=4)


def test_interval_skips_the_uncond_forward():
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(22))
    cond, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    grid = default_sigma_grid(6)
    m = CountingModel()
    sample(m, noise, sigmas=grid, guidance_scale=3.0, cond=cond, uncond=uncond,
           guidance_interval=(0.3, 0.8))
    inside = [0.3 <= grid[i].item() <= 0.8 for i in range(6)]
    assert m.calls == [4 if k else 2 for k in inside]


class _DriftModel(CountingModel):
    """Constant outputs, except that the uncond one drifts with sigma: d moves by `rate` per
    unit sigma."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def __call__(self, x, sigma, cond):
        self.calls.append(x.shape[0])
        out = x * 0 + cond.view(-1, *([1] * (x.ndim - 1)))   # c: still
        if float(cond[0]) == 0.5:   # the uncond batch
            out = out + self.rate * sigma.view(-1, *([1] * (x.ndim - 1)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_reuse_refreshes_when_d_moves(backend):
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(23))
    cond, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    grid = default_sigma_grid(8)
    counts = {}
    for rate in (0.0, 50.0):
        m = _DriftModel(rate)
        with use_backend(backend):
            sample(m, noise, sigmas=grid, guidance_scale=3.0, cond=cond, uncond=uncond,
                   batch_cfg=False, guidance_reuse=AdaptiveGuidanceReuse(0.05, max_reuse=3))
        counts[rate] = len(m.calls) - 8   # uncond forwards
    # c and d still: refresh at steps 0 and 1 (no previous d at 0), then reuse up to
    # max_reuse = 3 steps in a row: refresh at 5
    assert counts[0.0] == 3
    # d moving fast: refreshed at every step
    assert counts[50.0] == 8


def test_captured_sampler_needs_a_static_plan():
    from fmrt.sampling import _static_plan
    grid = default_sigma_grid(4)
    kw = dict(sigmas=grid, guidance_scale=3.0, uncond=torch.zeros(2), cond=torch.ones(2))
    assert _static_plan(torch.randn(2, 3), dict(kw, guidance_reuse=GuidanceReuse(2))).static
    p = _static_plan(torch.randn(2, 3), dict(kw, guidance_interval=(0.3, 0.8)))
    assert p.branches == tuple("cfg" if 0.3 <= s <= 0.8 else "cond" for s in grid[:4].tolist())
    with pytest.raises(ValueError, match="static plan"):
        _static_plan(torch.randn(2, 3), dict(kw, guidance_reuse=AdaptiveGuidanceReuse()))


@pytest.mark.gpu
def test_static_reuse_and_interval_capture_in_a_cuda_graph():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    W = torch.randn(8, 8, device=dev) * 0.1

    def model(x, s, cond):
        return x @ W + s.view(-1, 1, 1) * cond.view(-1, 1, 1)

    noise = torch.randn(2, 16, 8, device=dev)
    kw = dict(sigmas=default_sigma_grid(8, shift=3.0, device=dev), guidance_scale=4.0,
              cond=torch.tensor([1.0, 2.0], device=dev), uncond=torch.zeros(2, device=dev),
              guidance_reuse=GuidanceReuse(every=3, first=1, last=1),
              guidance_interval=(0.05, 0.95))
    sampler = CapturedSampler(model, noise, **kw)
    torch.testing.assert_close(sampler(noise), sample(model, noise, **kw))
