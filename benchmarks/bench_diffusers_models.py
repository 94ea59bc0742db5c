"""diffusers' flow-matching DiTs, stock vs `fmrt.integrations.diffusers.accelerate`: one
transformer forward + backward (every parameter's gradient, a fixed random cotangent) per family
at its real width and a realistic token count, with fewer blocks so a family fits one GPU with
random weights. GPU only.

Providers (extra_info["provider"]), both on the same model and weights, bf16:
- "diffusers": the untouched model (diffusers' processors, SDPA through its dispatch);
- "fmrt":      `accelerate(model)` (fused q/k RMSNorm + RoPE, `fmrt.attention.attention` with
               the "auto" backend); `restore(model)` afterwards.

Cases (blocks kept: double + single, or layers; `FMRT_BENCH_DIT_BLOCKS` scales them):
- flux1:   FLUX.1-dev width (24 heads of 128, text 4096, pooled 768, 64 channels), 1024x1024
           (4096 image + 512 text tokens), 2 double + 4 single blocks;
- flux2:   FLUX.2-dev width (48 heads of 128, text 15360, 128 channels), 1024x1024 (4096 + 512),
           1 double + 2 single blocks;
- qwen:    Qwen-Image width (24 heads of 128, text 3584), 1328x1328 (83 x 83 = 6889 image +
           256 text tokens), 4 blocks;
- hunyuan: HunyuanVideo width (24 heads of 128, text 4096, pooled 768, patch 2), 720p cut to 9
           latent frames (9 x 45 x 80 = 32400 video + 256 text tokens), 1 double + 2 single;
- ltx:     LTX-Video width (32 heads of 64, caption 4096, 128 channels), 704x480 x 161 frames
           (21 x 15 x 22 = 6930 tokens, 128 text), 4 blocks.

extra_info adds `speedup` (diffusers median / fmrt median when both ran in this session),
`rel_err_vs_diffusers` (fmrt's output against stock's, relative L2), and the processors' fmrt /
fallback call counts. `bytes` is the parameter bytes read by the forward (a lower bound); the
number to compare is `ms`.

Run on a GPU: `pytest benchmarks/bench_diffusers_models.py --benchmark-enable
--benchmark-json=benchmarks/results/<gpu>_diffusers_models.json`.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks.conftest import CUDA, DEVICE, median_s, run_bench

pytestmark = pytest.mark.gpu  # skipped without CUDA (root conftest)

DTYPE = torch.bfloat16


def _blocks(n: int) -> int:
    scale = float(os.environ.get("FMRT_BENCH_DIT_BLOCKS", "1"))
    return max(int(round(n * scale)), 1)


def _flux1(g):
    from diffusers import FluxTransformer2DModel
    m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=_blocks(2),
                               num_single_layers=_blocks(4), attention_head_dim=128,
                               num_attention_heads=24, joint_attention_dim=4096,
                               pooled_projection_dim=768, guidance_embeds=True,
                               axes_dims_rope=(16, 56, 56))
    h = w = 64
    img_ids = torch.stack([torch.zeros(h * w), torch.arange(h * w) // w,
                           torch.arange(h * w) % w], 1).to(DEVICE)
    kw = dict(hidden_states=torch.randn(1, h * w, 64, generator=g, device=DEVICE),
              encoder_hidden_states=torch.randn(1, 512, 4096, generator=g, device=DEVICE),
              pooled_projections=torch.randn(1, 768, generator=g, device=DEVICE),
              timestep=torch.full((1,), 0.6, device=DEVICE),
              guidance=torch.full((1,), 3.5, device=DEVICE),
              img_ids=img_ids, txt_ids=torch.zeros(512, 3, device=DEVICE))
    return m, kw


def _flux2(g):
    from diffusers import Flux2Transformer2DModel
    m = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=_blocks(1),
                                num_single_layers=_blocks(2), attention_head_dim=128,
                                num_attention_heads=48, joint_attention_dim=15360,
                                axes_dims_rope=(32, 32, 32, 32))
    h = w = 64
    z = torch.zeros(h * w)
    img_ids = torch.stack([z, torch.arange(h * w) // w, torch.arange(h * w) % w, z], 1)
    txt_ids = torch.stack([torch.zeros(512)] * 3 + [torch.arange(512).float()], 1)
    kw = dict(hidden_states=torch.randn(1, h * w, 128, generator=g, device=DEVICE),
              encoder_hidden_states=torch.randn(1, 512, 15360, generator=g, device=DEVICE),
              timestep=torch.full((1,), 0.6, device=DEVICE),
              guidance=torch.full((1,), 4.0, device=DEVICE),
              img_ids=img_ids.to(DEVICE), txt_ids=txt_ids.to(DEVICE))
    return m, kw


def _qwen(g):
    from diffusers import QwenImageTransformer2DModel
    m = QwenImageTransformer2DModel(num_layers=_blocks(4))  # the release's other dims
    h = w = 83
    kw = dict(hidden_states=torch.randn(1, h * w, 64, generator=g, device=DEVICE),
              encoder_hidden_states=torch.randn(1, 256, 3584, generator=g, device=DEVICE),
              timestep=torch.full((1,), 0.6, device=DEVICE), img_shapes=[(1, h, w)])
    return m, kw


def _hunyuan(g):
    from diffusers import HunyuanVideoTransformer3DModel
    m = HunyuanVideoTransformer3DModel(num_layers=_blocks(1), num_single_layers=_blocks(2),
                                       num_refiner_layers=1)
    kw = dict(hidden_states=torch.randn(1, 16, 9, 90, 160, generator=g, device=DEVICE),
              timestep=torch.full((1,), 600.0, device=DEVICE),
              encoder_hidden_states=torch.randn(1, 256, 4096, generator=g, device=DEVICE),
              encoder_attention_mask=torch.ones(1, 256, device=DEVICE),
              pooled_projections=torch.randn(1, 768, generator=g, device=DEVICE),
              guidance=torch.full((1,), 6000.0, device=DEVICE))
    return m, kw


def _ltx(g):
    from diffusers import LTXVideoTransformer3DModel
    m = LTXVideoTransformer3DModel(num_layers=_blocks(4))
    f, h, w = 21, 15, 22
    kw = dict(hidden_states=torch.randn(1, f * h * w, 128, generator=g, device=DEVICE),
              encoder_hidden_states=torch.randn(1, 128, 4096, generator=g, device=DEVICE),
              timestep=torch.full((1,), 600.0, device=DEVICE), encoder_attention_mask=None,
              num_frames=f, height=h, width=w, rope_interpolation_scale=(8 / 25, 32.0, 32.0))
    return m, kw


# FLUX.1 last: on the H200 (torch 2.11 + cu130) its stock backward failed inside cuDNN's SDPA
# ("mha_graph.execute(...).is_good()", then an illegal memory access that poisons the process
# for every case after it); both providers of that case run with cuDNN's attention disabled
CASES = {"qwen": _qwen, "ltx": _ltx, "hunyuan": _hunyuan, "flux2": _flux2, "flux1": _flux1}
NO_CUDNN_SDPA = {"flux1"}


@functools.lru_cache(maxsize=1)
def _setup(case: str):
    """The model (random weights, bf16, on the device) and its inputs; one case cached at a
    time (the models are large)."""
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with DEVICE:
        model, kw = CASES[case](g)
        model = model.to(DEVICE, DTYPE).train()
    kw = {k: (v.to(DTYPE) if isinstance(v, torch.Tensor) and v.is_floating_point()
              and k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v)
          for k, v in kw.items()}
    return model, kw


def _train_step(model, kw, no_cudnn_sdpa: bool = False):
    """Forward + backward with a fixed cotangent; returns the output (detached)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if not no_cudnn_sdpa:
        backends.append(SDPBackend.CUDNN_ATTENTION)

    def step():
        with sdpa_kernel(backends):
            model.zero_grad(set_to_none=True)
            out = model(**kw, return_dict=False)[0]
            w = torch.ones_like(out)  # a fixed cotangent: d sum(out)
            out.backward(w)
        return out.detach()
    return step


_MEDIAN_S: dict[tuple[str, str], float] = {}
_RESULT: dict[tuple[str, str], torch.Tensor] = {}


@pytest.mark.parametrize("provider", ["diffusers", "fmrt"])
@pytest.mark.parametrize("case", list(CASES))
def test_dit_forward_backward(benchmark, case, provider):
    from fmrt.integrations.diffusers import accelerate, restore
    model, kw = _setup(case)
    extra = {}
    if provider == "fmrt":
        extra["modules"] = accelerate(model)
    try:
        fn = _train_step(model, kw, no_cudnn_sdpa=case in NO_CUDNN_SDPA)
        _RESULT[case, provider] = fn().float()
        if provider == "fmrt" and (case, "diffusers") in _RESULT:
            ref = _RESULT[case, "diffusers"]
            extra["rel_err_vs_diffusers"] = (
                (_RESULT[case, "fmrt"] - ref).norm() / ref.norm()).item()
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        run_bench(benchmark, fn, op="diffusers_dit_fwd_bwd", case=case, dtype=DTYPE,
                  provider=provider, nbytes=nbytes, warmup=2, rounds=10, **extra)
        if provider == "fmrt":
            procs = [p for p in model.attn_processors.values() if hasattr(p, "fmrt_calls")]
            benchmark.extra_info["fmrt_calls"] = sum(p.fmrt_calls for p in procs)
            benchmark.extra_info["fallback_calls"] = sum(p.fallback_calls for p in procs)
    finally:
        if provider == "fmrt":
            restore(model)
    median = median_s(benchmark)
    if median:
        _MEDIAN_S[case, provider] = median
        if provider == "fmrt" and (case, "diffusers") in _MEDIAN_S:
            benchmark.extra_info["speedup"] = _MEDIAN_S[case, "diffusers"] / median
    if CUDA:
        torch.cuda.empty_cache()
