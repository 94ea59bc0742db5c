"""fmrt.losses.sft_loss: the fused SFT step against an unfused torch computation of the same
step, TI2V handling, the scheduler's samplers/weights, DiffSynth's FlowMatchSFTLoss numbers
(golden values from DiffSynth's own code), torch.compile and bad input."""
import json
import math
import os

import pytest
import torch

from fmrt import reference as ref, use_backend
from fmrt.losses import flow_loss, sft_loss
from fmrt.schedule import FlowMatchScheduler
from tests.helpers import assert_close, stable_randn_like

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "diffsynth_sft_loss.json")


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear "model" of the latents and the 0-1000 timestep t ([B] or scalar),
    computed in fp32 and returned in x's dtype (shared with the golden-value generator)."""
    t = t.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    xf = x.to(torch.float32)
    return (0.75 * xf - torch.sin(1.3 * xf) * (t / 1000.0) + 0.1).to(x.dtype)


class ToyModel(torch.nn.Module):
    """model(x, sigma, cond) -> v (fmrt's convention); per-frame sigma [B, T] uses the last
    frame's sigma (the sample's), like a DiT would for the noisy frames. Records its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.calls = []

    def forward(self, x, sigma, cond):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), cond))
        s = sigma[:, -1] if sigma.ndim == 2 else sigma
        return toy_velocity(x, 1000.0 * s) * self.scale


def _unfused(model, x0, sigma, seed, weight, first_frame=None):
    """The same SFT step with separate torch ops (reference noise, explicit slicing)."""
    eps = ref.philox_normal(x0.shape, seed)
    x_t, target = ref.add_noise(x0, sigma, eps)
    ms = sigma
    if first_frame is not None:
        x_t = torch.cat([first_frame.to(x_t.dtype), x_t[:, :, 1:]], 2)
        ms = torch.cat([torch.zeros(x0.shape[0], 1), sigma[:, None].expand(-1, x0.shape[2] - 1)],
                       1)
    pred = model(x_t, ms, None)
    tgt = eps - x0.float()
    if first_frame is not None:
        pred, tgt = pred[:, :, 1:], tgt[:, :, 1:]
    per = ((pred.float() - tgt) ** 2).flatten(1).mean(1)
    return (per * weight).mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ti2v", [False, True])
def test_sft_loss_matches_unfused_step(backend, ti2v):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 6, 7, generator=g)
    ff = torch.randn(3, 4, 1, 6, 7, generator=g) if ti2v else None
    sched = FlowMatchScheduler("Wan")
    sigma = torch.tensor([0.9, 0.5, 0.2])
    model = ToyModel()
    with use_backend(backend):
        loss = sft_loss(model, x0, scheduler=sched, seed=123, sigma=sigma, first_frame=ff)
        gs, = torch.autograd.grad(loss, model.scale)
    x_in, s_in, _ = model.calls[0]
    want = _unfused(model, x0, sigma, 123, sched.loss_weight(sigma), ff)
    gw, = torch.autograd.grad(want, model.scale)
    assert_close(loss, want, scale=3.0)
    assert_close(gs, gw, scale=10.0)
    if ti2v:
        assert torch.equal(x_in[:, :, :1], ff)
        assert s_in.shape == (3, 5) and torch.all(s_in[:, 0] == 0)
        assert torch.allclose(s_in[:, 1:], sigma[:, None].expand(3, 4))
    else:
        assert torch.equal(s_in, sigma)


def _pseudo_huber_reference(pred, x0, noise, c, weight, mask, reduction):
    """sqrt(||d||^2 + C^2) - C per sample with C = c sqrt(dim) (iCT's form), divided by sqrt(dim),
    on the reference's per-sample masked MSE; then weighted and reduced."""
    m = ref.flow_matching_loss(pred, x0, noise, mask=mask, reduction="none").double()
    dim = ref.mask_denominator(mask, pred.shape).double()
    C = c * dim.sqrt()
    per = (torch.sqrt(m * dim + C * C) - C) / dim.sqrt()
    per = per * (torch.as_tensor(weight, dtype=torch.float64) if weight is not None else 1.0)
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight, masked", [(None, False), ("per_sample", True), (0.5, False)])
def test_pseudo_huber_flow_loss_values_and_gradients(backend, reduction, weight, masked):
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 3, 2, 5, 6, generator=g), torch.randn(4, 3, 2, 5, 6, generator=g)
    # errors of very different sizes per sample: one nearly fitted (the Huber region)
    pred = (noise - x0) + torch.randn(4, 3, 2, 5, 6, generator=g) * torch.tensor(
        [1.0, 0.1, 1e-4, 3.0]).view(4, 1, 1, 1, 1)
    pred.requires_grad_(True)
    w = torch.tensor([1.0, 0.5, 2.0, 0.25]) if weight == "per_sample" else weight
    mask = (torch.arange(2) > 0).float().view(1, 1, 2, 1, 1) if masked else None
    c = 1e-3
    with use_backend(backend):
        got = flow_loss(pred, x0, noise, weight=w, mask=mask, reduction=reduction, huber_c=c)
        gg, = torch.autograd.grad(got.sum(), pred)
    want = _pseudo_huber_reference(pred, x0, noise, c, w, mask, reduction)
    gw, = torch.autograd.grad(want.sum(), pred)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-9)
    # far from 0 it is the RMS error, near 0 the MSE / (2c)
    per = flow_loss(pred.detach(), x0, noise, mask=mask, reduction="none", huber_c=c)
    mse = flow_loss(pred.detach(), x0, noise, mask=mask, reduction="none")
    assert torch.allclose(per[3], mse[3].sqrt() - c, rtol=1e-4)
    assert torch.allclose(per[2], mse[2] / (2 * c), rtol=0.05)
    # without huber_c it is ops.flow_matching_loss itself
    from fmrt import ops
    with use_backend(backend):
        assert torch.equal(flow_loss(pred, x0, noise, weight=w, mask=mask, reduction=reduction),
                           ops.flow_matching_loss(pred, x0, noise, weight=w, mask=mask,
                                                  reduction=reduction))


def test_sft_loss_pseudo_huber_is_the_huber_of_its_mse():
    """sft_loss(huber_c=c) = weight * (sqrt(m + c^2) - c) of the per-sample MSE the same draws
    give, for every weighting."""
    x0 = torch.randn(3, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    for weighting in ("none", "table"):
        m = sft_loss(ToyModel(), x0, scheduler=sched, seed=7, sigma=sigma, weighting="none",
                     reduction="none")
        got = sft_loss(ToyModel(), x0, scheduler=sched, seed=7, sigma=sigma,
                       weighting=weighting, reduction="none", huber_c=0.01)
        want = (torch.sqrt(m + 1e-4) - 0.01) * sched.loss_weight(sigma, weighting)
        torch.testing.assert_close(got, want)


def test_sft_loss_ti2v_ignores_frame_zero_prediction():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 5, 6, generator=g)
    ff = x0[:, :, :1].clone()
    sched = FlowMatchScheduler("Wan")
    sigma = torch.tensor([0.3, 0.6])

    def model_a(x, s, c):
        return torch.zeros_like(x)

    def model_b(x, s, c):
        v = torch.zeros_like(x)
        v[:, :, 0] = 100.0
        return v

    with use_backend("triton"):
        a = sft_loss(model_a, x0, scheduler=sched, seed=5, sigma=sigma, first_frame=ff)
        b = sft_loss(model_b, x0, scheduler=sched, seed=5, sigma=sigma, first_frame=ff)
    assert_close(a, b)


def test_sft_loss_seed_and_generator_reproducible():
    x0 = torch.randn(2, 3, 4, 5)
    sched = FlowMatchScheduler("FLUX.1")
    m = ToyModel()
    with use_backend("triton"):
        a = sft_loss(m, x0, scheduler=sched, generator=torch.Generator().manual_seed(3))
        b = sft_loss(m, x0, scheduler=sched, generator=torch.Generator().manual_seed(3))
        c = sft_loss(m, x0, scheduler=sched, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(m.calls[0][1], m.calls[1][1])


@pytest.mark.parametrize("sampler", ["uniform_index", "logit_normal", "uniform"])
@pytest.mark.parametrize("weighting", ["table", "none", "cosmap"])
def test_sft_loss_samplers_and_weights(sampler, weighting):
    # sigma sampled through the scheduler (same generator draws), weight from loss_weight
    x0 = torch.randn(3, 2, 3, 4)
    sched = FlowMatchScheduler("Wan")
    m = ToyModel()
    with use_backend("triton"):
        loss = sft_loss(m, x0, scheduler=sched, sampler=sampler, weighting=weighting, seed=9,
                        generator=torch.Generator().manual_seed(2), min_timestep_boundary=0.2,
                        max_timestep_boundary=0.9)
    sigma = sched.sample_sigmas(3, sampler=sampler, generator=torch.Generator().manual_seed(2),
                                min_boundary=0.2, max_boundary=0.9)
    assert torch.equal(m.calls[0][1], sigma)
    want = _unfused(ToyModel(), x0, sigma, 9, sched.loss_weight(sigma, weighting))
    assert_close(loss, want.detach(), scale=3.0)


def _golden_cases():
    if not os.path.exists(GOLDEN):
        return []
    with open(GOLDEN) as f:
        return json.load(f)["cases"]


def diffsynth_inputs(case):
    g = torch.Generator().manual_seed(case["data_seed"])
    dtype = getattr(torch, case["dtype"])
    x0 = torch.randn(case["shape"], generator=g).to(dtype)
    ff = None
    if case["ti2v"]:
        B, C, T, H, W = case["shape"]
        ff = torch.randn(B, C, 1, H, W, generator=g).to(dtype)
    return x0, ff


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["name"])
def test_sft_loss_diffsynth_compat_golden(case):
    x0, ff = diffsynth_inputs(case)
    sched = FlowMatchScheduler(case["template"],
                               bf16_timestep_lookup=case["dtype"] == "bfloat16")
    torch.manual_seed(case["rng_seed"])
    m = ToyModel()
    with stable_randn_like():  # bf16 noise as the golden generator drew it, on any torch
        loss = sft_loss(m, x0, scheduler=sched, first_frame=ff, compat="diffsynth",
                        min_timestep_boundary=case["min_boundary"],
                        max_timestep_boundary=case["max_boundary"])
    assert math.isclose(loss.item(), case["loss"], rel_tol=1e-6, abs_tol=1e-9), \
        (loss.item(), case["loss"])
    assert math.isclose(1000.0 * m.calls[0][1].flatten()[-1].item(), case["timestep"],
                        rel_tol=1e-6)


def test_golden_cases_present():
    assert len(_golden_cases()) >= 4


def test_sft_loss_compiles_without_graph_break():
    x0 = torch.randn(2, 3, 4, 5)
    sched = FlowMatchScheduler("Wan")
    lin = torch.nn.Linear(5, 5)
    sigma = torch.tensor([0.4, 0.8])

    def model(x, s, c):
        return lin(x) * (1 + s.view(-1, 1, 1, 1))

    def step(x0, sigma):
        return sft_loss(model, x0, scheduler=sched, seed=17, sigma=sigma)

    with use_backend("triton"):
        want = step(x0, sigma)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x0, sigma)
        gw = torch.autograd.grad(want, lin.weight)[0]
        gc = torch.autograd.grad(got, lin.weight)[0]
    assert_close(got, want)
    assert_close(gc, gw)


def test_sft_loss_bad_input():
    sched = FlowMatchScheduler("Wan")
    x0 = torch.randn(2, 3, 4, 5, 6)
    calls = []

    def model(x, s, c):
        calls.append(1)
        return x

    with pytest.raises(ValueError, match="compat"):
        sft_loss(model, x0, scheduler=sched, compat="diffusers")
    with pytest.raises(ValueError, match="sampler"):
        sft_loss(model, x0, scheduler=sched, sampler="bogus")
    with pytest.raises(ValueError, match="weighting"):
        sft_loss(model, x0, scheduler=sched, weighting="bogus")
    with pytest.raises(ValueError, match="first_frame"):
        sft_loss(model, x0, scheduler=sched, first_frame=torch.randn(2, 3, 2, 5, 6))
    with pytest.raises(ValueError, match="first_frame"):
        sft_loss(model, x0[:, :, 0], scheduler=sched, first_frame=torch.randn(2, 3, 1, 5, 6))
    with pytest.raises(TypeError, match="x0"):
        sft_loss(model, x0.long(), scheduler=sched)
    with pytest.raises(ValueError, match="seed"):
        sft_loss(model, x0, scheduler=sched, seed=-3)
    with pytest.raises(ValueError, match="sigma"):
        sft_loss(model, x0, scheduler=sched, sigma=torch.rand(3))
    with pytest.raises(ValueError, match="model output"):
        sft_loss(lambda x, s, c: x[:, :1], x0, scheduler=sched, seed=1)
    for c in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="huber_c"):
            sft_loss(model, x0, scheduler=sched, seed=1, huber_c=c)
    with pytest.raises(TypeError, match="huber_c"):
        sft_loss(model, x0, scheduler=sched, seed=1, huber_c="0.1")
    with pytest.raises(ValueError, match="huber_c cannot be combined with compat"):
        sft_loss(model, x0, scheduler=sched, compat="diffsynth", huber_c=0.1)
    with pytest.raises(ValueError, match="reduction"):
        flow_loss(x0, x0, x0, huber_c=0.1, reduction="max")
    with pytest.raises(ValueError, match="sigma_points .*compat"):
        sft_loss(model, x0, scheduler=sched, compat="diffsynth", sigma_points=(1.0,),
                 sigma_points_prob=0.5)
    with pytest.raises(ValueError, match="sigma_points .*given sigma"):
        sft_loss(model, x0, scheduler=sched, sigma=torch.rand(2), sigma_points=(1.0,),
                 sigma_points_prob=0.5)
    with pytest.raises(ValueError, match="points_prob"):
        sft_loss(model, x0, scheduler=sched, seed=1, sigma_points=(1.0,))
    assert not calls
