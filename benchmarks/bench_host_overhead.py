"""Host cost per op call: what each `fmrt.ops` call costs the CPU before Triton's own dispatch.

On a GPU the host cost of a call is what remains when the kernel itself is short (small
latents, the sampling loop): argument checks, dispatch, autograd bookkeeping, allocation,
launch arguments. Here every Triton kernel's launch (`JITFunction.run`, also the interpreter's)
is replaced by a no-op, so a call runs all of fmrt's host code and allocates its outputs but
computes nothing; many calls are timed with `time.perf_counter_ns` (and the thread's CPU time)
and the median microseconds per call is recorded. The backend is forced to `triton`: CUDA
tensors on a GPU machine, else CPU tensors under `TRITON_INTERPRET=1`.

Goals (issue 14 item 4): <= 20 us per elementwise op call (add_noise, euler_step, cfg_combine,
guided_euler_step without statistics, flow_matching_loss forward), <= 30 us for the guided step
with statistics; `torch.func.jvp(ops.flash_attention)` as low as it goes. The pytest entry
points only record the numbers (they assert nothing about time: a loaded CI box would flake);
`python -m benchmarks.bench_host_overhead --json PATH` writes them for the committed JSON
(`benchmarks/results/cpu_host_overhead.json`).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Iterator

import pytest
import torch

from fmrt import ops, use_backend

# CUDA tensors where there is a GPU (the real host path); else CPU tensors, which the Triton
# backend accepts under TRITON_INTERPRET=1 (set by the root conftest, or by main() below)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

GOALS_US = {"add_noise": 20, "euler_step": 20, "cfg_combine": 20, "guided_euler_step": 20,
            "flow_matching_loss_fwd": 20, "guided_euler_step_stats": 30}


def _jit_kernels() -> list:
    """Every Triton kernel object of fmrt.kernels (whatever the interpreter setting)."""
    from importlib import import_module
    out = {}
    for name in ("noise", "loss", "step", "rope", "attention"):
        mod = import_module(f"fmrt.kernels.{name}")
        for obj in vars(mod).values():
            if callable(getattr(obj, "run", None)) and hasattr(obj, "__getitem__") and \
                    type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                out[id(obj)] = obj
    return list(out.values())


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Inside the block every fmrt kernel launch is a no-op (outputs stay uninitialised)."""
    kernels = _jit_kernels()
    for k in kernels:
        k.run = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for k in kernels:
            del k.run


def _cases() -> dict[str, Callable[[], Callable[[], object]]]:
    """name -> builder of a zero-argument call (inputs made once, outside the timing)."""
    g = torch.Generator().manual_seed(0)
    B, shape = 2, (2, 4, 3, 8, 8)

    def rnd(*s, grad=False):
        t = torch.randn(s or shape, generator=g).to(DEVICE)
        return t.requires_grad_(grad)

    x, c, u = rnd(), rnd(), rnd()
    s, sn = torch.tensor([0.8, 0.6], device=DEVICE), torch.tensor([0.7, 0.5], device=DEVICE)
    pred = rnd(grad=True)
    q = rnd(1, 16, 2, 32, grad=True)
    k, v = rnd(1, 16, 2, 32, grad=True), rnd(1, 16, 2, 32, grad=True)
    tq, tk, tv = rnd(1, 16, 2, 32), rnd(1, 16, 2, 32), rnd(1, 16, 2, 32)
    cos, sin = torch.rand(16, 16, device=DEVICE), torch.rand(16, 16, device=DEVICE)
    wq = torch.ones(64, device=DEVICE, requires_grad=True)
    wk = torch.ones(64, device=DEVICE, requires_grad=True)

    def fm_fwd_bwd():
        ops.flow_matching_loss(pred, x, seed=7).backward()

    class Trivial(torch.autograd.Function):   # the floor of any Function under torch.func.jvp
        @staticmethod
        def forward(a):
            return a * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, ta):
            return ta * 2

    def qk_fwd_bwd():
        a, b = ops.qk_norm_rope(q, k, wq, wk, cos, sin)
        torch.autograd.backward((a, b), (tq, tk))

    return {
        "add_noise": lambda: lambda: ops.add_noise(x, s, seed=7),
        "euler_step": lambda: lambda: ops.euler_step(x, c, 0.8, 0.7),
        "euler_step_tensor_sigma": lambda: lambda: ops.euler_step(x, c, s, sn),
        "cfg_combine": lambda: lambda: ops.cfg_combine(c, u, 5.0),
        "guided_euler_step": lambda: lambda: ops.guided_euler_step(x, c, u, 5.0, s, sn),
        "guided_euler_step_stats":
            lambda: lambda: ops.guided_euler_step(x, c, u, 5.0, s, sn, stats={}),
        "sde_step": lambda: lambda: ops.sde_step(x, c, 0.8, 0.7, eta=0.5, seed=3),
        "flow_matching_loss_fwd":
            lambda: lambda: ops.flow_matching_loss(pred.detach(), x, seed=7),
        "flow_matching_loss_fwd_bwd": lambda: fm_fwd_bwd,
        "qk_norm_rope_fwd_bwd": lambda: qk_fwd_bwd,
        "jvp_flash_attention": lambda: lambda: torch.func.jvp(
            lambda a, b, cc: ops.flash_attention(a, b, cc), (q.detach(), k.detach(), v.detach()),
            (tq, tk, tv)),
        "jvp_trivial_autograd_function": lambda: lambda: torch.func.jvp(
            Trivial.apply, (q.detach(),), (tq,)),
    }


CASES = tuple(_cases())


def host_us_per_call(fn: Callable[[], object], *, calls: int = 200, repeats: int = 15
                     ) -> tuple[float, float]:
    """(wall, cpu): medians over `repeats` batches of `calls` calls of the microseconds per
    call, launches stubbed, Triton backend forced. wall: `time.perf_counter_ns`; cpu: the
    thread's CPU time (`time.thread_time_ns`), which on a shared, loaded machine excludes the
    time the thread waited for a core."""
    with use_backend("triton"), stubbed_launches():
        for _ in range(20):
            fn()
        wall, cpu = [], []
        for _ in range(repeats):
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(calls):
                fn()
            wall.append((time.perf_counter_ns() - t0) / calls / 1e3)
            cpu.append((time.thread_time_ns() - c0) / calls / 1e3)
    return statistics.median(wall), statistics.median(cpu)


@pytest.mark.parametrize("case", CASES)
def test_bench_host_overhead(benchmark, case):
    """Records us per call (launches stubbed) in extra_info; asserts only that it ran."""
    fn = _cases()[case]()
    wall, cpu = host_us_per_call(fn, calls=20, repeats=3)
    with use_backend("triton"), stubbed_launches():
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(op=case, case="host_overhead_stubbed_launch", provider="fmrt",
                                us_per_call=wall, cpu_us_per_call=cpu,
                                goal_us=GOALS_US.get(case), device=str(DEVICE))
    assert wall > 0 and cpu > 0


def main() -> None:
    import argparse
    import json
    import platform
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write {case: us_per_call} here")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args()
    if DEVICE.type == "cpu":   # before the first op imports (and so decorates) the kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    wall, cpu = {}, {}
    for name, build in _cases().items():
        w, c = host_us_per_call(build(), calls=args.calls, repeats=args.repeats)
        wall[name], cpu[name] = round(w, 1), round(c, 1)
        goal = GOALS_US.get(name)
        print(f"{name:28s} wall {w:8.1f} us  cpu {c:8.1f} us"
              + (f"   (goal <= {goal})" if goal else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(),
                       "load_average": os.getloadavg(), "torch": torch.__version__,
                       "wall_us_per_call": wall, "cpu_us_per_call": cpu}, f, indent=1)


if __name__ == "__main__":
    main()
