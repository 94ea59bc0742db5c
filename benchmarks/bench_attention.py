"""Attention-path benchmarks: `qk_norm_rope` (q/k RMSNorm across heads + 3D RoPE) forward and
forward + backward, fmrt's fused kernel against the eager math of diffusers' WanAttnProcessor
(`nn.RMSNorm` over heads*dim, then the rotation in float64 with repeat-interleaved tables and a
cast back) and its torch.compile; and `attention` for every backend installed here.

Shapes: S = 32760 tokens = 21 x 30 x 52 (Wan2.1: 81 frames at 480 x 832 after the VAE's
4 x 8 x 8 and the (1, 2, 2) patch), head dim 128, 12 heads (1.3B) and 40 heads (14B).
Tiny shapes on CPU (interpreter; not performance claims). q and k are views of a fused `[B, S, 3, H, D]` qkv output, as in the model.

Compulsory bytes (N = B*S*H*D elements of e bytes):
  qk_norm_rope fwd      read q, k, write q, k: 4 N e, + the fp32 cos/sin tables once (S*D*4).
  qk_norm_rope fwd+bwd  + the backward: read q, k again (the norm statistics are recomputed:
                        nothing but the inputs is saved), read d q_out, d k_out, write dq, dk:
                        10 N e + tables twice.
  attention             read q, k, v, write out: 4 N e; extra_info `tflops` = 4 B S^2 H D / t.

Run on a GPU: `pytest benchmarks/bench_attention.py --benchmark-enable --benchmark-json=...`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import (BENCH_DTYPES, CUDA, DEVICE, PROVIDERS, make_provider_fn,
                                 run_bench)
from fmrt import ops, use_backend
from fmrt.attention import BACKENDS, attention, backend_available, rope_3d_tables

GRID = (21, 30, 52) if CUDA else (2, 2, 3)          # S = 32760 on CUDA, 12 on CPU
SHAPES = {"wan1.3b": (12, 128), "wan14b": (40, 128)} if CUDA else {"wan_tiny": (2, 16)}
EPS = 1e-6


def _inputs(H, D, dtype, *, grad=False):
    cos, sin = rope_3d_tables(D, GRID, device=DEVICE)
    S = cos.shape[0]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(1, S, 3, H, D, generator=g, device=DEVICE).to(dtype)
    qkv.requires_grad_(grad)
    q, k, v = qkv.unbind(2)
    wq = (1 + 0.1 * torch.randn(H * D, generator=g, device=DEVICE)).to(dtype).requires_grad_(grad)
    wk = (1 + 0.1 * torch.randn(H * D, generator=g, device=DEVICE)).to(dtype).requires_grad_(grad)
    return q, k, v, wq, wk, cos, sin


def _diffusers_tables(cos, sin):
    """diffusers' float64 tables `[1, S, 1, D]` (repeat-interleaved), sliced as its processor
    slices them: cos[..., 0::2], sin[..., 1::2] -> `[1, S, 1, D/2]` float64."""
    c = cos.double().repeat_interleave(2, dim=-1)[None, :, None, :]
    s = sin.double().repeat_interleave(2, dim=-1)[None, :, None, :]
    return c[..., 0::2], s[..., 1::2]


def _eager_qk_norm_rope(q, k, wq, wk, cos64, sin64):
    """diffusers' WanAttnProcessor q/k math: RMSNorm over heads*dim, float64 rotation."""
    B, S, H, D = q.shape

    def one(x, w):
        x = F.rms_norm(x.reshape(B, S, H * D), (H * D,), w, EPS).view(B, S, H, D)
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos64 - x2 * sin64
        out[..., 1::2] = x1 * sin64 + x2 * cos64
        return out.type_as(x)

    return one(q, wq), one(k, wk)


def _fmrt_qk_norm_rope(q, k, wq, wk, cos, sin):
    with use_backend("triton"):        # CUDA: what auto picks; CPU: the interpreter
        return ops.qk_norm_rope(q, k, wq, wk, cos, sin, eps=EPS)


def _table_bytes(cos) -> int:
    return 2 * cos.numel() * 4


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(SHAPES))
def test_bench_qk_norm_rope(benchmark, case, dtype, provider):
    q, k, _, wq, wk, cos, sin = _inputs(*SHAPES[case], dtype)
    fn = make_provider_fn(provider, _fmrt_qk_norm_rope, _eager_qk_norm_rope)
    tables = (cos, sin) if provider == "fmrt" else _diffusers_tables(cos, sin)
    ne = q.numel() * q.element_size()
    run_bench(benchmark, lambda: fn(q, k, wq, wk, *tables), op="qk_norm_rope", case=case,
              dtype=dtype, provider=provider, nbytes=4 * ne + _table_bytes(cos), tensor_bytes=ne)


@pytest.mark.goal
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(SHAPES))
def test_bench_qk_norm_rope_fwd_bwd(benchmark, case, dtype, provider):
    q, k, _, wq, wk, cos, sin = _inputs(*SHAPES[case], dtype, grad=True)
    fwd = make_provider_fn(provider, _fmrt_qk_norm_rope, _eager_qk_norm_rope)
    tables = (cos, sin) if provider == "fmrt" else _diffusers_tables(cos, sin)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    gq = torch.randn(q.shape, generator=g, device=DEVICE).to(dtype)
    gk = torch.randn(k.shape, generator=g, device=DEVICE).to(dtype)

    def step():
        qo, ko = fwd(q, k, wq, wk, *tables)
        return torch.autograd.grad((qo, ko), (q, k, wq, wk), (gq, gk))

    ne = q.numel() * q.element_size()
    run_bench(benchmark, step, op="qk_norm_rope_fwd_bwd", case=case, dtype=dtype,
              provider=provider, nbytes=10 * ne + 2 * _table_bytes(cos), tensor_bytes=ne)


# "auto" too: the goal "attention(auto) within 5% of the best installed backend" compares it
ATTN_BACKENDS = [b for b in BACKENDS if CUDA or b in ("auto", "sdpa", "math")]


@pytest.mark.parametrize("backend", ATTN_BACKENDS)  # not in the first GPU call: seconds a call
@pytest.mark.parametrize("dtype", BENCH_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(SHAPES))
def test_bench_attention(benchmark, case, dtype, backend):
    if not backend_available(backend):
        pytest.skip(f"attention backend {backend!r} is not installed")
    if backend in ("flash_attn", "fa3", "fa4") and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip(f"{backend} takes fp16 / bf16 only")
    if backend == "math" and CUDA:
        pytest.skip("math materialises the S x S logits (tens of GB at S = 32760)")
    q, k, v, _, _, _, _ = _inputs(*SHAPES[case], dtype)
    B, S, H, D = q.shape
    nbytes = 4 * q.numel() * q.element_size()
    run_bench(benchmark, lambda: attention(q, k, v, backend=backend), op="attention", case=case,
              dtype=dtype, provider=backend, nbytes=nbytes)
    ms = benchmark.extra_info.get("ms")
    if ms:
        benchmark.extra_info["tflops"] = 4 * B * S * S * H * D / (ms * 1e-3) / 1e12


def test_eager_provider_is_the_same_math():
    """The eager provider computes what fmrt computes (else the comparison means nothing)."""
    q, k, _, wq, wk, cos, sin = _inputs(*SHAPES[next(iter(SHAPES))], torch.float32)
    want = ops.qk_norm_rope(q, k, wq, wk, cos, sin, eps=EPS)
    got = _eager_qk_norm_rope(q, k, wq, wk, *_diffusers_tables(cos, sin))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
