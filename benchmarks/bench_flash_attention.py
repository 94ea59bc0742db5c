"""fmrt's Triton flash attention: forward-mode JVP (MeanFlow) and the primal forward.

JVP: `torch.func.jvp(attention, (q, k, v), (dq, dk, dv))`, fmrt's fused one-pass kernel against
torch's math SDPA (the only SDPA backend with forward-mode AD; it materialises S x S). Primal
forward (and forward + backward): fmrt against SDPA-flash and flash-attn (when installed).
Shapes on CUDA: S = 4096, H = 12 and 16, D = 64 and 128, bf16 (one batch); tiny on CPU
(interpreter; not performance claims).

Compulsory bytes (N = B*S*H*D elements of e bytes): jvp reads q, k, v and their tangents and
writes out and its tangent: 8 N e; forward 4 N e; forward + backward 4 N e + (dO read, dq, dk,
dv written) 4 N e. extra_info `tflops` counts matmul flops: forward 4 B S^2 H D, jvp
12 B S^2 H D (q k^T, dq k^T, q dk^T, P v, (P dS) v, P dv), forward + backward 14 B S^2 H D (FA2
recomputes q k^T); `peak_mem_bytes` = peak CUDA memory allocated above the inputs.

Goals (H100): jvp >= 4x faster than math SDPA under torch.func.jvp with far less memory; the
primal forward >= 60% of flash-attn's / SDPA-flash's speed.
Run on a GPU: `pytest benchmarks/bench_flash_attention.py --benchmark-enable --benchmark-json=...`.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.conftest import CUDA, DEVICE, run_bench
from fmrt import ops, use_backend

if CUDA:
    CASES = {"s4096_h12_d64": (1, 4096, 12, 64), "s4096_h12_d128": (1, 4096, 12, 128),
             "s4096_h16_d128": (1, 4096, 16, 128)}
    DTYPES = (torch.bfloat16,)
else:
    CASES = {"tiny": (1, 32, 1, 16)}
    DTYPES = (torch.float32,)
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _inputs(case, dtype, *, grad=False):
    B, S, H, D = CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ts = [torch.randn(B, S, H, D, generator=g, device=DEVICE).to(dtype) for _ in range(6)]
    for t in ts[:3]:
        t.requires_grad_(grad)
    return ts[:3], ts[3:]


def _fmrt(q, k, v):
    with use_backend("triton"):
        return ops.flash_attention(q, k, v)


def _sdpa(q, k, v, backend):
    with sdpa_kernel(backend):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
    return o.transpose(1, 2)


def _flash_attn(q, k, v):
    from flash_attn import flash_attn_func
    return flash_attn_func(q, k, v)


FWD = {"fmrt": _fmrt, "sdpa_flash": lambda q, k, v: _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION),
       "flash_attn": _flash_attn}
JVP = {"fmrt": _fmrt, "math_sdpa": lambda q, k, v: _sdpa(q, k, v, SDPBackend.MATH)}


def _record(benchmark, flops):
    info = benchmark.extra_info
    if info.get("ms"):
        info["tflops"] = flops / (info["ms"] * 1e-3) / 1e12
    if "peak_extra_mem_bytes" in info:
        info["peak_mem_bytes"] = info["peak_extra_mem_bytes"]


def _skip(provider):
    if provider in ("sdpa_flash", "flash_attn") and not CUDA:
        pytest.skip(f"{provider} needs CUDA")
    if provider == "flash_attn" and not HAS_FLASH_ATTN:
        pytest.skip("flash-attn is not installed")


@pytest.mark.parametrize("provider", list(JVP))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_bench_flash_attention_jvp(benchmark, case, dtype, provider):
    (q, k, v), (tq, tk, tv) = _inputs(case, dtype)
    fn = JVP[provider]
    B, S, H, D = q.shape
    run_bench(benchmark, lambda: torch.func.jvp(fn, (q, k, v), (tq, tk, tv)),
              op="flash_attention_jvp", case=case, dtype=dtype, provider=provider,
              nbytes=8 * q.numel() * q.element_size())
    _record(benchmark, 12 * B * S * S * H * D)


@pytest.mark.parametrize("provider", list(FWD))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_bench_flash_attention_fwd(benchmark, case, dtype, provider):
    _skip(provider)
    (q, k, v), _ = _inputs(case, dtype)
    fn = FWD[provider]
    B, S, H, D = q.shape
    run_bench(benchmark, lambda: fn(q, k, v), op="flash_attention_fwd", case=case, dtype=dtype,
              provider=provider, nbytes=4 * q.numel() * q.element_size())
    _record(benchmark, 4 * B * S * S * H * D)


@pytest.mark.parametrize("provider", list(FWD))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_bench_flash_attention_fwd_bwd(benchmark, case, dtype, provider):
    _skip(provider)
    (q, k, v), (do, _, _) = _inputs(case, dtype, grad=True)
    fn = FWD[provider]
    B, S, H, D = q.shape

    def step():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    run_bench(benchmark, step, op="flash_attention_fwd_bwd", case=case, dtype=dtype,
              provider=provider, nbytes=8 * q.numel() * q.element_size())
    _record(benchmark, 14 * B * S * S * H * D)


def test_jvp_providers_agree():
    """The math-SDPA provider computes what fmrt computes (else the comparison means nothing)."""
    (q, k, v), (tq, tk, tv) = _inputs(next(iter(CASES)), torch.float32 if not CUDA
                                      else torch.bfloat16)
    a = torch.func.jvp(JVP["fmrt"], (q, k, v), (tq, tk, tv))
    b = torch.func.jvp(JVP["math_sdpa"], (q.float(), k.float(), v.float()),
                       (tq.float(), tk.float(), tv.float()))
    tol = dict(atol=1e-4, rtol=1e-4) if q.dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), **tol)
