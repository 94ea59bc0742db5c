"""fmrt.integrations.diffsynth.FlowMatchSFTLoss against DiffSynth-Studio's FlowMatchSFTLoss:
golden values from DiffSynth's own code (tests/golden/diffsynth_sft_loss.json, made by
tests/golden/make_diffsynth_sft_golden.py), an op-by-op re-statement of DiffSynth's
`diffsynth/diffusion/loss.py` + `flow_match.py` formulas (TI2V, noise_scale, gradients), the
pipe protocol, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from fmrt import use_backend
from fmrt.integrations.diffsynth import FlowMatchSFTLoss
from fmrt.schedule import FlowMatchScheduler
from tests.helpers import assert_close, stable_randn_like
from tests.test_losses_sft import _golden_cases, diffsynth_inputs, toy_velocity


class StubPipe:
    """The parts of a DiffSynth pipeline FlowMatchSFTLoss reads; model_fn as DiffSynth's
    pipelines call it (models first, then every input, then timestep). Records its calls."""

    def __init__(self, scheduler, dtype, dit=None):
        self.scheduler, self.torch_dtype, self.device = scheduler, dtype, "cpu"
        self.dit = dit if dit is not None else ScaledToy()
        self.in_iteration_models = ("dit",)
        self.calls = []

    def model_fn(self, dit, latents, timestep, **kwargs):
        self.calls.append(dict(kwargs, latents=latents.detach().clone(), timestep=timestep))
        return dit(latents, timestep)


class ScaledToy(torch.nn.Module):
    """The golden generator's toy velocity model, times a learnable scale."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, latents, timestep):
        v = toy_velocity(latents, timestep.float().expand(latents.shape[0]))
        return v * self.scale.to(v.dtype)


def diffsynth_restated(pipe, **inputs):
    """DiffSynth-Studio's FlowMatchSFTLoss (diffsynth/diffusion/loss.py at the golden commit),
    with its scheduler's add_noise / training_target / training_weight (flow_match.py) spelt
    out op by op on the scheduler's tables: every op in the latents' dtype."""
    sched = pipe.scheduler
    n = len(sched.timesteps)
    hi = int(inputs.get("max_timestep_boundary", 1) * n)
    lo = int(inputs.get("min_timestep_boundary", 0) * n)
    timestep_id = torch.randint(lo, hi, (1,))
    timestep = sched.timesteps[timestep_id].to(dtype=pipe.torch_dtype, device=pipe.device)
    noise = torch.randn_like(inputs["input_latents"]) * inputs.get("noise_scale", 1.0)
    idx = torch.argmin((sched.timesteps - timestep.cpu()).abs())
    sigma = sched.sigmas[idx]
    x0 = inputs["input_latents"]
    inputs["latents"] = (1 - sigma) * x0 + sigma * noise
    target = noise - x0
    if "first_frame_latents" in inputs:
        inputs["latents"][:, :, 0:1] = inputs["first_frame_latents"]
    models = {name: getattr(pipe, name) for name in pipe.in_iteration_models}
    pred = pipe.model_fn(**models, **inputs, timestep=timestep)
    if "first_frame_latents" in inputs:
        pred, target = pred[:, :, 1:], target[:, :, 1:]
    loss = F.mse_loss(pred.float(), target.float())
    return loss * sched.linear_timesteps_weights[idx]


def case_inputs(case):
    x0, ff = diffsynth_inputs(case)
    inputs = {"input_latents": x0, "min_timestep_boundary": case["min_boundary"],
              "max_timestep_boundary": case["max_boundary"]}
    if ff is not None:
        inputs["first_frame_latents"] = ff
    return inputs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["name"])
def test_golden_values_from_diffsynth(case, backend):
    dtype = getattr(torch, case["dtype"])
    pipe = StubPipe(FlowMatchScheduler(case["template"]), dtype)
    torch.manual_seed(case["rng_seed"])
    with use_backend(backend), stable_randn_like():  # the generator's bf16 noise, on any torch
        loss = FlowMatchSFTLoss(pipe, **case_inputs(case))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    # DiffSynth's draws: the same timestep (in the model dtype) reaches the model
    t = pipe.calls[0]["timestep"]
    assert t.dtype == dtype and t.shape == (1,)
    assert float(t.float()) == case["timestep"]
    # fp32: to fp32 rounding; bf16: DiffSynth rounds x_t and the target to bf16 op by op
    rel = 1e-5 if dtype == torch.float32 else 5e-3   # about a bf16 ulp (2^-8)
    assert math.isclose(loss.item(), case["loss"], rel_tol=rel), (loss.item(), case["loss"])


def test_golden_cases_present():
    names = [c["name"] for c in _golden_cases()]
    assert len(names) >= 4 and any("ti2v" in n for n in names)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ti2v", [False, True])
def test_matches_restated_diffsynth_loss_and_gradient(backend, dtype, ti2v):
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 4, 4, 6, 5, generator=g).to(dtype)
    inputs = {"input_latents": x0, "max_timestep_boundary": 0.8, "min_timestep_boundary": 0.1,
              "noise_scale": 0.75, "prompt_emb": "a cat"}
    if ti2v:
        inputs["first_frame_latents"] = torch.randn(2, 4, 1, 6, 5, generator=g).to(dtype)
    pipes = [StubPipe(FlowMatchScheduler("Wan"), dtype) for _ in range(2)]
    torch.manual_seed(3)
    with use_backend(backend):
        got = FlowMatchSFTLoss(pipes[0], **inputs)
        g_got, = torch.autograd.grad(got, pipes[0].dit.scale)
    torch.manual_seed(3)
    want = diffsynth_restated(pipes[1], **inputs)
    g_want, = torch.autograd.grad(want, pipes[1].dit.scale)
    a, b = pipes[0].calls[0], pipes[1].calls[0]
    assert torch.equal(a["timestep"], b["timestep"])
    assert a["prompt_emb"] == "a cat" and a["input_latents"] is x0
    assert "latents" not in inputs                         # the caller's dict is not changed
    scale = 1.0 if dtype == torch.float32 else 2.0
    assert_close(a["latents"], b["latents"], scale=scale)  # DiffSynth rounds op by op
    if ti2v:
        assert torch.equal(a["latents"][:, :, :1], inputs["first_frame_latents"])
    fp32 = dtype == torch.float32
    torch.testing.assert_close(got, want.float(), **(dict(rtol=1e-5, atol=1e-6) if fp32 else
                                                     dict(rtol=5e-3, atol=1e-4)))
    # the bf16 gradient of the scale is a bf16 reduction on both sides: a few bf16 ulps
    torch.testing.assert_close(g_got, g_want, **(dict(rtol=1e-5, atol=1e-6) if fp32 else
                                                 dict(rtol=3e-2, atol=1e-3)))


def test_ti2v_frame_zero_prediction_is_ignored():
    x0 = torch.randn(1, 3, 4, 5, 6)
    ff = torch.randn(1, 3, 1, 5, 6)

    class Pipe(StubPipe):
        def model_fn(self, dit, latents, timestep, **kw):
            v = torch.zeros_like(latents)
            v[:, :, 0] = self.frame0
            return v
    losses = []
    for frame0 in (0.0, 100.0):
        pipe = Pipe(FlowMatchScheduler("Wan"), torch.float32)
        pipe.frame0 = frame0
        torch.manual_seed(0)
        losses.append(FlowMatchSFTLoss(pipe, input_latents=x0, first_frame_latents=ff))
    assert torch.equal(losses[0], losses[1])


def test_works_with_diffsynth_style_scheduler_object():
    # any object with DiffSynth's tables works (here: a plain namespace built from fmrt's)
    fm = FlowMatchScheduler("FLUX.1")

    class Sched:
        timesteps, sigmas = fm.timesteps.clone(), fm.sigmas.clone()
        linear_timesteps_weights = fm.linear_timesteps_weights.clone()
    x0 = torch.randn(2, 4, 6, 6)
    torch.manual_seed(5)
    a = FlowMatchSFTLoss(StubPipe(Sched(), torch.float32), input_latents=x0)
    torch.manual_seed(5)
    b = FlowMatchSFTLoss(StubPipe(fm, torch.float32), input_latents=x0)
    assert torch.equal(a, b)


def test_bad_input():
    from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler
    x0 = torch.randn(1, 3, 4, 5, 6)
    pipe = StubPipe(FlowMatchScheduler("Wan"), torch.float32)
    with pytest.raises(ValueError, match="input_latents"):
        FlowMatchSFTLoss(pipe, latents=x0)
    with pytest.raises(TypeError, match="input_latents"):
        FlowMatchSFTLoss(pipe, input_latents=x0.long())
    with pytest.raises(ValueError, match="DiffSynth-like"):
        FlowMatchSFTLoss(StubPipe(FlowMatchEulerDiscreteScheduler(), torch.float32),
                         input_latents=x0)
    infer = FlowMatchScheduler("Wan")
    infer.set_timesteps(10)
    with pytest.raises(ValueError, match="training=True"):
        FlowMatchSFTLoss(StubPipe(infer, torch.float32), input_latents=x0)
    with pytest.raises(TypeError, match="model_fn"):
        FlowMatchSFTLoss(object(), input_latents=x0)
    with pytest.raises(ValueError, match="boundary"):
        FlowMatchSFTLoss(pipe, input_latents=x0, min_timestep_boundary=0.5,
                         max_timestep_boundary=0.5)
    with pytest.raises(ValueError, match="first_frame"):
        FlowMatchSFTLoss(pipe, input_latents=x0, first_frame_latents=torch.randn(1, 3, 2, 5, 6))
    bad = StubPipe(FlowMatchScheduler("Wan"), torch.float32)
    bad.model_fn = lambda dit, latents, timestep, **kw: latents[:, :1]
    with pytest.raises(ValueError, match="model_fn"):
        FlowMatchSFTLoss(bad, input_latents=x0)
    assert not pipe.calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffsynth_loss_with_fmrt_scheduler_stays_a_scalar(dtype):
    """DiffSynth's FlowMatchSFTLoss ends in `loss * pipe.scheduler.training_weight(timestep)`
    with a `[1]` timestep (`timesteps[randint(.., (1,))]` cast to the pipe dtype): with fmrt's
    scheduler swapped in the loss is a scalar, as with DiffSynth's, and the weight is the entry
    DiffSynth's `argmin(|timesteps - timestep|)` picks."""
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)
    torch.manual_seed(0)
    for _ in range(5):
        timestep = sched.timesteps[torch.randint(0, 1000, (1,))].to(dtype)
        w = sched.training_weight(timestep)
        loss = F.mse_loss(torch.randn(2, 3), torch.randn(2, 3)) * w
        assert w.shape == () and loss.shape == ()
        idx = torch.argmin((sched.timesteps - timestep).abs())
        assert torch.equal(w, sched.linear_timesteps_weights[idx])
