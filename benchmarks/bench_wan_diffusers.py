"""diffusers' Wan transformer, stock vs fmrt: one CFG sampling step as `WanPipeline` runs it
(a cond and an uncond forward, the guidance combine, a flow-matching Euler step). GPU only.

Providers (extra_info["provider"]), both on the same model and weights:
- "diffusers": stock diffusers: `WanAttnProcessor` (SDPA through diffusers' attention dispatch),
               combine in eager torch, diffusers' `FlowMatchEulerDiscreteScheduler.step`;
- "fmrt":      `fmrt.integrations.diffusers.accelerate_wan(model)` (fused q/k RMSNorm + RoPE,
               `fmrt.attention.attention` with the "auto" backend: FA3 / FA4 / FA2 when
               installed, else SDPA) and fmrt's `FlowMatchEulerDiscreteScheduler.step_cfg`
               (combine and Euler step fused); `restore_wan` afterwards.

Shapes: `WanTransformer3DModel` at the Wan2.1-1.3B config (dim 1536, 30 layers, 12 heads of 128,
ffn 8960, text 4096, freq 256, 16 in/out channels, patch (1, 2, 2)), random weights, bf16; latent
`[1, 16, F, 60, 104]` with F = 21 latent frames (480p x 81 video frames, 32760 tokens) or
`FMRT_BENCH_WAN_FRAMES` (e.g. 1 for a quick run); text context `[1, 512, 4096]`; guidance 5.0.

extra_info adds `speedup` (the diffusers median / this median, on the fmrt case when both ran in
this session), `rel_err_vs_diffusers` (the fmrt step's result against stock's, relative L2 error),
the attention backend fmrt resolved, and the processors' fmrt / fallback call counts. `bytes`
is the weight bytes the two forwards read (a lower bound); the number to compare is `ms`.

Run on a GPU: `pytest benchmarks/bench_wan_diffusers.py --benchmark-enable
--benchmark-json=benchmarks/results/<gpu>_wan_diffusers.json`.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks.conftest import CUDA, DEVICE, median_s, run_bench

pytestmark = pytest.mark.gpu  # skipped without CUDA (root conftest)

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
DTYPE = torch.bfloat16
TEXT_LEN = 512
GUIDANCE = 5.0
STEPS, STEP_INDEX = 50, 10  # the step timed: the 11th of a 50-step schedule
SCHEDULER = dict(shift=3.0)  # Wan 480p flow shift


def _frames() -> int:
    frames = int(os.environ.get("FMRT_BENCH_WAN_FRAMES", "21"))
    if frames < 1:
        raise ValueError(f"FMRT_BENCH_WAN_FRAMES must be >= 1, got {frames}")
    return frames


@functools.lru_cache(maxsize=1)
def _setup():
    """The model (random weights, bf16) and inputs: latent `[1, 16, F, 60, 104]`, cond and
    uncond text contexts `[1, 512, 4096]`."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    with DEVICE:  # initialised on the device (a CPU init of 1.3 B parameters is slow)
        model = diffusers.WanTransformer3DModel(**WAN_1_3B).to(DEVICE, DTYPE).eval()
    model.requires_grad_(False)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn((1, 16, _frames(), 60, 104), generator=g, device=DEVICE).to(DTYPE)
    ctx, neg = (torch.randn((1, TEXT_LEN, 4096), generator=g, device=DEVICE).to(DTYPE)
                for _ in range(2))
    return model, x, ctx, neg


def _forward(model, x, t, ctx) -> torch.Tensor:
    return model(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=ctx,
                 return_dict=False)[0]


def _step_fn(provider: str, model, x: torch.Tensor, ctx: torch.Tensor, neg: torch.Tensor):
    """One CFG step for `provider`. The scheduler is rewound each call (`set_timesteps`: the
    same small host cost for both; `step` then starts at `timesteps[STEP_INDEX]`), so every call
    times the same step."""
    if provider == "diffusers":
        from diffusers import FlowMatchEulerDiscreteScheduler
        sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)

        def guided_step(c, u, t):  # the pipeline's eager combine, then the scheduler's step
            return sched.step(u + GUIDANCE * (c - u), t, x, return_dict=False)[0]
    else:
        from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler
        sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)

        def guided_step(c, u, t):  # combine and step fused
            return sched.step_cfg(c, u, GUIDANCE, t, x, return_dict=False)[0]

    def step():
        sched.set_timesteps(STEPS, device=DEVICE)
        t = sched.timesteps[STEP_INDEX]
        with torch.no_grad():
            return guided_step(_forward(model, x, t, ctx), _forward(model, x, t, neg), t)
    return step


_MEDIAN_S: dict[str, float] = {}  # provider -> median seconds, for the speed-up
_RESULT: dict[str, torch.Tensor] = {}  # provider -> the step's output, for the error check


@pytest.mark.parametrize("provider", ["diffusers", "fmrt"])
def test_wan_cfg_step(benchmark, provider):
    from fmrt.attention import resolve_backend
    from fmrt.integrations.diffusers import FmrtWanAttnProcessor, accelerate_wan, restore_wan
    model, x, ctx, neg = _setup()
    extra = {}
    if provider == "fmrt":
        extra["modules"] = accelerate_wan(model)
        heads, head_dim = WAN_1_3B["num_attention_heads"], WAN_1_3B["attention_head_dim"]
        extra["attention_backend"] = resolve_backend("auto", x.new_empty(1, 1, heads, head_dim))
    try:
        fn = _step_fn(provider, model, x, ctx, neg)
        _RESULT[provider] = fn().float()
        if provider == "fmrt" and "diffusers" in _RESULT:
            ref = _RESULT["diffusers"]
            extra["rel_err_vs_diffusers"] = ((_RESULT["fmrt"] - ref).norm() / ref.norm()).item()
        run_bench(benchmark, fn, op="wan_diffusers_cfg_step",
                  case=f"wan2.1-1.3b:{'x'.join(map(str, x.shape))}", dtype=DTYPE,
                  provider=provider, nbytes=2 * sum(p.numel() * p.element_size()
                                                    for p in model.parameters()),
                  warmup=2, device_timing=False,
                  tokens=x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2), **extra)
        if provider == "fmrt":
            procs = [m.processor for m in model.modules()
                     if isinstance(getattr(m, "processor", None), FmrtWanAttnProcessor)]
            benchmark.extra_info["fmrt_calls"] = sum(p.fmrt_calls for p in procs)
            benchmark.extra_info["fallback_calls"] = sum(p.fallback_calls for p in procs)
    finally:
        if provider == "fmrt":
            restore_wan(model)
    median = median_s(benchmark)
    if median:
        _MEDIAN_S[provider] = median
        if provider == "fmrt" and "diffusers" in _MEDIAN_S:
            benchmark.extra_info["speedup"] = _MEDIAN_S["diffusers"] / median
    if CUDA:
        torch.cuda.empty_cache()
