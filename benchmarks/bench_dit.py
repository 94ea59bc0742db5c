"""Whole-model benchmarks: one SFT training step (forward + flow-matching loss + backward) and
one CFG sampling step (a batched [cond, uncond] forward + guided Euler step) of a Wan DiT.

Providers (extra_info["provider"]):
- "fmrt":      fmrt's DiT with fmrt's ops under FMRT_BACKEND=auto (Triton kernels on CUDA);
- "reference": the same DiT and weights with `fmrt.use_backend("torch")` (pure-torch ops);
- "diffusers": diffusers' WanTransformer3DModel with the same config (its own random weights),
               noise / loss / CFG / Euler step as diffusers' training script and pipeline do
               them in eager PyTorch.

Shapes. CUDA: the "wan2.1-1.3b" config (dim 1536, 30 layers, 12 heads, ffn 8960, text 4096),
bf16 weights and activations, the 480p latent `[1, 16, 21, 60, 104]` (21 latent frames = 81
video frames, 32760 tokens) for sampling; the training step uses the same latent with gradient
checkpointing on both models (without it the activations of 30 layers at 32760 tokens do not
fit in 80 GB), text context `[B, 512, 4096]`. CPU: a tiny config (dim 32, 2 layers) on
`[1, 4, 2, 4, 4]` in fp32, only to keep the code alive (CPU timings are not claims).

`bytes` is the weight bytes one forward reads (a lower bound on the traffic); the useful
number here is the time (`ms`), compared across providers.

Run on a GPU: `pytest benchmarks/bench_dit.py --benchmark-enable --benchmark-json=...`.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import CUDA, DEVICE, run_bench
from fmrt import use_backend

PROVIDERS_DIT = ("fmrt", "reference", "diffusers")
if CUDA:
    PRESET, OVERRIDES = "wan2.1-1.3b", {}
    LATENT, TEXT_LEN, DTYPE = (1, 16, 21, 60, 104), 512, torch.bfloat16
else:
    PRESET = "wan2.1-1.3b"
    OVERRIDES = dict(dim=32, num_layers=2, num_heads=2, ffn_dim=64, freq_dim=32, text_dim=16,
                     in_channels=4)
    LATENT, TEXT_LEN, DTYPE = (1, 4, 2, 4, 4), 8, torch.float32
GUIDANCE = 5.0


def _fmrt_dit(checkpointing: bool):
    from fmrt.models import DiT, DiTConfig
    torch.manual_seed(0)
    cfg = DiTConfig.preset(PRESET, **OVERRIDES, gradient_checkpointing=checkpointing)
    with DEVICE:  # initialise on the device: a CPU init of 1.3 B parameters takes minutes
        return DiT(cfg).to(DEVICE, DTYPE), cfg


def _diffusers_dit(cfg, checkpointing: bool):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    with DEVICE:
        m = diffusers.WanTransformer3DModel(
            patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
            out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
            qk_norm="rms_norm_across_heads", eps=cfg.eps).to(DEVICE, DTYPE)
    if checkpointing:
        m.enable_gradient_checkpointing()
    return m


def _weight_bytes(m: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _inputs(cfg, batch: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn((batch, *LATENT[1:]), generator=g, device=DEVICE).to(DTYPE)
    ctx = torch.randn((batch, TEXT_LEN, cfg.text_dim), generator=g, device=DEVICE).to(DTYPE)
    return x, ctx


def _train_fn(provider: str):
    from fmrt import FlowMatchScheduler
    from fmrt.losses import sft_loss
    if provider == "diffusers":
        _, cfg = _fmrt_dit(False)
        model = _diffusers_dit(cfg, checkpointing=CUDA)
    else:
        model, cfg = _fmrt_dit(checkpointing=CUDA)
    model.train()
    x0, ctx = _inputs(cfg, LATENT[0])
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)
    g = torch.Generator(device=DEVICE).manual_seed(1)

    if provider == "diffusers":
        def step():
            # diffusers' training scripts: noise, x_t, target and MSE in eager torch
            sigma = sched.sample_sigmas(x0.shape[0], generator=g, device=DEVICE)
            noise = torch.randn_like(x0)
            s = sigma.view(-1, 1, 1, 1, 1).to(x0.dtype)
            x_t = (1 - s) * x0 + s * noise
            pred = model(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=ctx,
                         return_dict=False)[0]
            w = sched.loss_weight(sigma)
            loss = (w * ((pred.float() - (noise - x0).float()) ** 2).flatten(1).mean(1)).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        def step():
            with use_backend("auto" if provider == "fmrt" else "torch"):
                loss = sft_loss(model, x0, ctx, scheduler=sched, generator=g)
                loss.backward()
            model.zero_grad(set_to_none=True)
    return step, _weight_bytes(model)


def _sample_fn(provider: str):
    from fmrt import ops
    if provider == "diffusers":
        _, cfg = _fmrt_dit(False)
        model = _diffusers_dit(cfg, checkpointing=False)
    else:
        model, cfg = _fmrt_dit(False)
    model.eval().requires_grad_(False)
    x, ctx = _inputs(cfg, LATENT[0])
    _, neg = _inputs(cfg, LATENT[0])
    B = x.shape[0]
    sigma = torch.full((B,), 0.75, device=DEVICE)
    sigma_next = torch.full((B,), 0.7, device=DEVICE)
    ctx2 = torch.cat([ctx, neg])

    if provider == "diffusers":
        def step():
            with torch.no_grad():
                v = model(hidden_states=torch.cat([x, x]), timestep=torch.cat([sigma, sigma]) * 1000,
                          encoder_hidden_states=ctx2, return_dict=False)[0]
                vc, vu = v.chunk(2)
                v = vu + GUIDANCE * (vc - vu)
                dt = (sigma_next - sigma).view(-1, 1, 1, 1, 1)
                return (x.float() + dt * v).to(x.dtype)   # FlowMatchEulerDiscreteScheduler.step
    else:
        def step():
            with torch.no_grad(), use_backend("auto" if provider == "fmrt" else "torch"):
                v = model(torch.cat([x, x]), torch.cat([sigma, sigma]), ctx2)
                vc, vu = v.chunk(2)
                return ops.guided_euler_step(x, vc, vu, GUIDANCE, sigma, sigma_next)
    return step, _weight_bytes(model)


@pytest.mark.parametrize("provider", PROVIDERS_DIT)
@pytest.mark.parametrize("case", ["train_step", "cfg_sample_step"])
def test_dit_step(benchmark, case, provider):
    fn, nbytes = (_train_fn if case == "train_step" else _sample_fn)(provider)
    run_bench(benchmark, fn, op="dit", case=f"{case}:{PRESET}:{'x'.join(map(str, LATENT))}",
              dtype=DTYPE, provider=provider, nbytes=nbytes, warmup=2, rounds=5,
              device_timing=False, tokens=LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2),
              gradient_checkpointing=bool(CUDA and case == "train_step"))
    if CUDA:
        torch.cuda.empty_cache()


# MeanFlow against flow matching (issue 7's goal: a MeanFlow training step <= 2.5x a
# flow-matching step on the same DiT). Fewer frames than above on CUDA (JVP keeps tangents of
# every activation and runs without gradient checkpointing): 3 latent frames, 4680 tokens.
MF_LATENT = (1, 16, 3, 60, 104) if CUDA else LATENT


def _objective_fn(objective: str):
    from fmrt import FlowMatchScheduler
    from fmrt.losses import meanflow_loss, sft_loss
    from fmrt.models import DiT, DiTConfig
    torch.manual_seed(0)
    cfg = DiTConfig.preset(PRESET, **OVERRIDES, meanflow=objective == "meanflow")
    with DEVICE:
        model = DiT(cfg).to(DEVICE, DTYPE).train()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x0 = torch.randn(MF_LATENT, generator=g, device=DEVICE).to(DTYPE)
    ctx = torch.randn((MF_LATENT[0], TEXT_LEN, cfg.text_dim), generator=g, device=DEVICE).to(DTYPE)
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)

    def step():
        if objective == "meanflow":
            loss = meanflow_loss(lambda z, r, t, c=None: model(z, t, c, r=r), x0, cond=ctx,
                                 uncond=torch.zeros_like(ctx), cond_drop_prob=0.1, generator=g)
        else:
            loss = sft_loss(model, x0, ctx, scheduler=sched, generator=g)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step, _weight_bytes(model)


@pytest.mark.parametrize("objective", ["flow_matching", "meanflow"])
def test_meanflow_step(benchmark, objective):
    fn, nbytes = _objective_fn(objective)
    run_bench(benchmark, fn, op="meanflow_step",
              case=f"train_step:{PRESET}:{'x'.join(map(str, MF_LATENT))}", dtype=DTYPE,
              provider=objective, nbytes=nbytes, warmup=2, rounds=5,
              device_timing=False, tokens=MF_LATENT[2] * (MF_LATENT[3] // 2) * (MF_LATENT[4] // 2))
    if CUDA:
        torch.cuda.empty_cache()
