"""Flash attention benchmarks: the JVP that MeanFlow needs (output + tangent), fmrt's Triton
kernel against torch SDPA's math backend (the only SDPA backend with forward-mode AD), both
under torch.func.jvp; and the primal forward against SDPA's flash backend and flash-attn (when
installed).

Cases (CUDA): B = 1, S = 4096, H = 16, D = 64 and 128, bf16 (a Wan-style video DiT block);
tiny on CPU (interpreter, only to keep the code alive). Providers:
  jvp:     fmrt        torch.func.jvp over ops.flash_attention (the autograd.Function path:
                       primal forward + the one-pass output-and-tangent kernel)
           fmrt_1pass  ops.flash_attention_jvp (the one-pass kernel alone)
           math        torch.func.jvp over SDPA (math backend: materialises S x S)
  forward: fmrt, sdpa_flash (SDPA flash backend; cuDNN/efficient are not forced), flash_attn
FLOPs: forward 4 B H S_q S_k D (two matmuls); output + tangent 12 B H S_q S_k D (QK^T, dQ K^T,
Q dK^T, P V, P dV, (P o dS) V). Compulsory bytes: forward reads q, k, v and writes O (4 B S H D
e); the JVP also reads three tangents and writes the output tangent (8 B S H D e).
extra_info adds `tflops`; on CUDA run_bench records `peak_extra_mem_bytes`.

Run on a GPU: `pytest benchmarks/bench_flash_attention.py --benchmark-enable
--benchmark-json=benchmarks/results/<gpu>_flash_attention.json`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import CUDA, DEVICE, run_bench
from fmrt import ops, use_backend

DTYPE = torch.bfloat16 if CUDA else torch.float32
CASES = {"s4096_d64": (1, 4096, 16, 64), "s4096_d128": (1, 4096, 16, 128)} if CUDA else \
    {"tiny_d16": (1, 32, 1, 16)}


def _inputs(shape, tangents: bool):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    n = 6 if tangents else 3
    return [torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(DTYPE)
            for _ in range(n)]


def _sdpa(q, k, v, backend):
    with torch.nn.attention.sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2))
    return out.transpose(1, 2)


def _tflops(flops: float, benchmark):
    ms = benchmark.extra_info.get("ms")   # the device time (run_bench)
    if ms:
        benchmark.extra_info["tflops"] = flops / (ms * 1e-3) / 1e12


@pytest.mark.goal
@pytest.mark.parametrize("provider", ["fmrt", "fmrt_1pass", "math"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_attention_jvp(benchmark, case, provider):
    B, S, H, D = CASES[case]
    q, k, v, tq, tk, tv = _inputs((B, S, H, D), True)
    if provider == "fmrt":
        def fn():
            with use_backend("triton"):
                return torch.func.jvp(lambda a, b, c: ops.flash_attention(a, b, c), (q, k, v),
                                      (tq, tk, tv))
    elif provider == "fmrt_1pass":
        def fn():
            with use_backend("triton"):
                return ops.flash_attention_jvp(q, k, v, tq, tk, tv)
    else:
        math = torch.nn.attention.SDPBackend.MATH

        def fn():
            return torch.func.jvp(lambda a, b, c: _sdpa(a, b, c, math), (q, k, v), (tq, tk, tv))
    run_bench(benchmark, fn, op="flash_attention_jvp", case=case, dtype=DTYPE, provider=provider,
              nbytes=8 * q.numel() * q.element_size())
    _tflops(12.0 * B * H * S * S * D, benchmark)


@pytest.mark.goal
@pytest.mark.parametrize("provider", ["fmrt", "sdpa_flash", "flash_attn"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_attention_forward(benchmark, case, provider):
    B, S, H, D = CASES[case]
    q, k, v = _inputs((B, S, H, D), False)
    if provider == "fmrt":
        def fn():
            with use_backend("triton"):
                return ops.flash_attention(q, k, v)
    elif provider == "sdpa_flash":
        if not CUDA:
            pytest.skip("SDPA's flash backend needs CUDA")

        def fn():
            return _sdpa(q, k, v, torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    else:
        fa = pytest.importorskip("flash_attn")
        if not CUDA:
            pytest.skip("flash-attn needs CUDA")

        def fn():
            return fa.flash_attn_func(q, k, v)
    with torch.no_grad():
        run_bench(benchmark, fn, op="flash_attention_fwd", case=case, dtype=DTYPE,
                  provider=provider, nbytes=4 * q.numel() * q.element_size())
    _tflops(4.0 * B * H * S * S * D, benchmark)


@pytest.mark.parametrize("provider", ["fmrt", "math"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_attention_jvp_backward(benchmark, case, provider):
    """MeanFlow's pattern: (out, tangent) = jvp, then a backward through out."""
    B, S, H, D = CASES[case]
    q, k, v, tq, tk, tv = _inputs((B, S, H, D), True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    cot = torch.randn_like(q)
    math = torch.nn.attention.SDPBackend.MATH

    def attn(a, b, c):
        if provider == "fmrt":
            with use_backend("triton"):
                return ops.flash_attention(a, b, c)
        return _sdpa(a, b, c, math)

    def fn():
        out, tan = torch.func.jvp(attn, tuple(leaves), (tq, tk, tv))
        out.backward(cot)
        return tan

    run_bench(benchmark, fn, op="flash_attention_jvp_bwd", case=case, dtype=DTYPE,
              provider=provider, nbytes=11 * q.numel() * q.element_size())
    # jvp (12) + backward (dV, dP, dQ, dK: 8) units of B H S^2 D
    _tflops(20.0 * B * H * S * S * D, benchmark)
