"""Training-step benchmarks: `add_noise` alone, and one SFT step's noise + loss forward +
backward, fmrt's fused kernels against the eager sequence DiffSynth-Studio writes
(randn_like, add_noise, target, mse_loss(pred.float(), target.float()) * w, backward) and its
torch.compile.

Compulsory bytes (N elements of e bytes per tensor):
  add_noise      reads x0, writes x_t and target: 3 N e (the noise is made in registers).
  sft_step       add_noise writing x_t only (2 N e) + the loss forward reading pred and x0
                 (2 N e) + its backward reading them again and writing d loss / d pred (3 N e):
                 7 N e, what fmrt's kernels move (the forward's scalar is needed before the
                 backward starts, so the two passes cannot share their reads). The eager
                 sequence also writes and re-reads the noise, the target and fp32 copies.
`tensor_bytes` (N e) is what the ">= 64 MB" goals judge.
On CUDA, run_bench also records `peak_extra_mem_bytes` (allocations beyond the inputs during
the timed call: for sft_step fmrt keeps x_t plus the one gradient-sized buffer).

Run on a GPU: `pytest benchmarks/bench_training.py --benchmark-enable --benchmark-json=...`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import (BENCH_DTYPES, CUDA, DEVICE, PROVIDERS, goal_cases,
                                 make_provider_fn, run_bench)
from fmrt import ops, use_backend

# Wan2.1-1.3B training latent (81 frames 480p), Wan 14B 720p, FLUX 1024^2 batch 4, and a batch
# of 8 Wan 14B 720p latents (>= 64 MB per tensor: the bandwidth-bound regime). Tiny on CPU.
SHAPES = {
    "wan1.3b": (1, 16, 21, 60, 104),
    "wan14b_720p": (1, 16, 21, 90, 160),
    "flux_b4": (4, 16, 128, 128),
    "wan14b_720p_b8": (8, 16, 21, 90, 160),
} if CUDA else {
    "wan_tiny": (1, 4, 3, 6, 10),
    "flux_tiny": (2, 4, 16, 16),
}
WEIGHT = 1.0248619
# the cases the ">= 64 MB" goals judge (on CPU the same role, tiny)
GOALS = {"wan14b_720p_b8"} if CUDA else {"flux_tiny"}


def _inputs(shape, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x0 = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)
    pred = torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)
    sigma = torch.full((shape[0],), 0.6, device=DEVICE)
    return x0, pred.requires_grad_(True), sigma


def _eager_add_noise(x0, sigma):
    """DiffSynth: noise = randn_like; (1 - s) x0 + s noise; target = noise - x0."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    noise = torch.randn_like(x0)
    return (1 - s) * x0 + s * noise, noise - x0


def _eager_sft_fwd(pred, x0, sigma):
    x_t, target = _eager_add_noise(x0, sigma)
    return F.mse_loss(pred.float(), target.float()) * WEIGHT, x_t


def _fmrt_add_noise(x0, sigma):
    with use_backend("triton"):        # CUDA: what auto picks; CPU: the interpreter
        return ops.add_noise(x0, sigma)


def _fmrt_sft_fwd(pred, x0, sigma):
    """What sft_loss runs around the model: x_t only (no target), then the fused loss
    regenerating the noise from the same per-step seed."""
    with use_backend("triton"):
        seed = ops.seed_tensor(None, x0.device)
        x_t, _, _ = ops.noised_sample(x0, sigma, None, seed, return_target=False)
        return ops.flow_matching_loss(pred, x0, seed=seed, weight=WEIGHT), x_t


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", goal_cases(SHAPES, GOALS))
def test_bench_add_noise(benchmark, case, dtype, provider):
    x0, _, sigma = _inputs(SHAPES[case], dtype)
    fn = make_provider_fn(provider, _fmrt_add_noise, _eager_add_noise)
    ne = x0.numel() * x0.element_size()
    run_bench(benchmark, lambda: fn(x0, sigma), op="add_noise", case=case, dtype=dtype,
              provider=provider, nbytes=3 * ne, tensor_bytes=ne)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", goal_cases(SHAPES, GOALS))
def test_bench_sft_step(benchmark, case, dtype, provider):
    x0, pred, sigma = _inputs(SHAPES[case], dtype)
    fwd = make_provider_fn(provider, _fmrt_sft_fwd, _eager_sft_fwd)

    def step():
        loss, x_t = fwd(pred, x0, sigma)
        (grad,) = torch.autograd.grad(loss, pred)
        return loss, x_t, grad

    ne = x0.numel() * x0.element_size()
    run_bench(benchmark, step, op="add_noise+loss_fwd_bwd", case=case, dtype=dtype,
              provider=provider, nbytes=7 * ne, tensor_bytes=ne)
