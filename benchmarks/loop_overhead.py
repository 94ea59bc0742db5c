"""Host cost per step of a 50-step guided Euler loop with a do-nothing model, fmrt's `sample`
against diffusers' FlowMatchEulerDiscreteScheduler loop: the same functions and timing as
`bench_sampling.py::test_bench_loop_host_overhead` (best of N calls after 2 warm-up calls),
written as `benchmarks/results/<device>_sampling_loop_host_overhead.json`.

    python -m benchmarks.loop_overhead [--rounds 20] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from benchmarks.bench_sampling import LOOP_STEPS, _diffusers_loop, _fmrt_loop, loop_inputs


def _machine() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(rounds: int = 20, device: str = "cpu") -> list[dict]:
    noise, v, cond, uncond, sched, grid = loop_inputs(device)
    fns = {"fmrt": lambda: _fmrt_loop(noise, v, cond, uncond, grid),
           "diffusers": lambda: _diffusers_loop(noise, v, cond, uncond, sched)}
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn(), fn()
    for _ in range(rounds):          # interleaved, so both see the same machine load
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    return [dict(provider=k, us_per_step=best[k] / LOOP_STEPS * 1e6, steps=LOOP_STEPS,
                 device=device) for k in fns]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "cpu_sampling_loop_host_overhead.json"))
    args = p.parse_args()
    res = measure(args.rounds)
    doc = {"note": f"CPU (shared 2-core VM, loaded; torch reference path: auto backend on CPU "
                   f"tensors), {LOOP_STEPS}-step guided Euler loop, do-nothing model, latent "
                   f"[1,4,2,8,8] fp32; best of {args.rounds} (interleaved); us_per_step = host "
                   f"cost per step; made by `python -m benchmarks.loop_overhead`",
           "machine": _machine(), "torch_version": torch.__version__, "results": res}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    for r in res:
        print(f"{r['provider']:<10} {r['us_per_step']:7.2f} us/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
