"""Guidance reuse on a GPU: one CFG sampling step of the Wan2.1-1.3B transformer (diffusers'
`WanTransformer3DModel`, random bf16 weights, the shapes of `bench_wan_diffusers.py`) with and
without reuse, and the step ops alone at the Wan latent size. GPU only.

Step cases (extra_info["provider"]):
- "cfg":      cond + uncond forwards, `ops.guided_euler_step` (plain CFG);
- "refresh":  cond + uncond forwards, `ops.guided_euler_step_refresh` (also writes d = c - u);
- "reuse":    the cond forward only, `ops.reused_guided_euler_step` (v = c + (s - 1) d).
Op cases (op = "step_op"): the three steps without the model, bytes = what each must move
(guided 4 N e; refresh 4 N e + 4 N (d in fp32); reuse 3 N e + 4 N).

Run on a GPU: `pytest benchmarks/bench_reuse.py --benchmark-enable
--benchmark-json=benchmarks/results/<gpu>_reuse.json`.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_wan_diffusers import GUIDANCE, _forward, _setup
from benchmarks.conftest import DEVICE, run_bench
from fmrt import ops

pytestmark = pytest.mark.gpu  # skipped without CUDA (root conftest)

SIGMA, SIGMA_NEXT = 0.8, 0.78


@pytest.mark.parametrize("provider", ["cfg", "refresh", "reuse"])
def test_wan_step_with_and_without_reuse(benchmark, provider):
    model, x, ctx, neg = _setup()
    t = torch.tensor(1000.0 * SIGMA, device=DEVICE)
    with torch.no_grad():
        d = (_forward(model, x, t, ctx).float() - _forward(model, x, t, neg).float())

    def step():
        with torch.no_grad():
            c = _forward(model, x, t, ctx)
            if provider == "reuse":
                return ops.reused_guided_euler_step(x, c, d, GUIDANCE, SIGMA, SIGMA_NEXT)
            u = _forward(model, x, t, neg)
            if provider == "refresh":
                return ops.guided_euler_step_refresh(x, c, u, GUIDANCE, SIGMA, SIGMA_NEXT)[0]
            return ops.guided_euler_step(x, c, u, GUIDANCE, SIGMA, SIGMA_NEXT)

    run_bench(benchmark, step, op="wan_cfg_step_reuse", case=f"1.3b_{tuple(x.shape)}",
              dtype=x.dtype, provider=provider, nbytes=0, rounds=5)


@pytest.mark.parametrize("provider", ["guided", "refresh", "reuse"])
def test_step_ops(benchmark, provider):
    shape = (1, 16, 21, 60, 104)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x, c, u = (torch.randn(shape, generator=g, device=DEVICE).to(torch.bfloat16)
               for _ in range(3))
    d = (c.float() - u.float())
    n, e = x.numel(), x.element_size()
    fns = {"guided": (lambda: ops.guided_euler_step(x, c, u, GUIDANCE, SIGMA, SIGMA_NEXT),
                      4 * n * e),
           "refresh": (lambda: ops.guided_euler_step_refresh(x, c, u, GUIDANCE, SIGMA,
                                                             SIGMA_NEXT), 4 * n * e + 4 * n),
           "reuse": (lambda: ops.reused_guided_euler_step(x, c, d, GUIDANCE, SIGMA, SIGMA_NEXT),
                     3 * n * e + 4 * n)}
    fn, nbytes = fns[provider]
    run_bench(benchmark, fn, op="step_op", case=f"wan1.3b_{shape}", dtype=x.dtype,
              provider=provider, nbytes=nbytes)
