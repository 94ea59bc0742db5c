"""Shared benchmark tools.

Every benchmark states the compulsory bytes its op moves (each input read once, each output
written once) and records in `extra_info`: op, case, dtype, provider, bytes, tensor_bytes (the
largest tensor the op reads or writes: what the ">= 64 MB" goals judge), ms, gbps, pct_copy_bw
(of a device-to-device copy measured in the same run the same way), latency_ms, device.

Two times per benchmark on CUDA:
- `ms`, the device time (`device_ms`: triton.testing.do_bench's method, CUDA events around each
  of many back-to-back calls, the L2 flushed by a 256 MB write between calls, the median; plus a
  spin kernel that keeps the host's cost out of the events), the same way for fmrt, eager and
  torch.compile. GB/s and % of copy come from it. An H200 has 60 MB of
  L2, which holds every bf16 sampling shape: without the flush a kernel would be timed out of
  cache.
- `latency_ms`, one call plus `torch.cuda.synchronize()` timed on the host (pytest-benchmark's
  median): what a caller waits for, host cost (argument checks, dispatch, launches) included.
torch.compile runs with `dynamic=False`, Dynamo reset per benchmark and an explicit recompile
limit (the same closures at 8 shape / dtype pairs would otherwise sit at Dynamo's default limit,
past which it silently runs eager). Whole-model steps pass `device_timing=False` (their ms is
the synced time: host cost is small beside a step of hundreds of ms).

On a CPU the suite runs tiny shapes under the Triton interpreter only to keep the code alive (CPU
timings are not performance claims; ms = latency_ms there) and skips the `compile` provider.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Optional

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PROVIDERS = ("fmrt", "eager", "compile")
BENCH_DTYPES = (torch.bfloat16, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def device_ms(fn: Callable, *, rep_ms: float = 100.0, min_reps: int = 10,
              max_reps: int = 200) -> float:
    """Median device milliseconds per call of `fn` (CUDA only), `triton.testing.do_bench`-style:
    CUDA events around each of many back-to-back calls, the L2 flushed between calls (a 256 MB
    write), the median. One addition: before each call a spin kernel (`torch.cuda._sleep`) as
    long as a whole synced call keeps the GPU busy while the host enqueues `fn`'s launches, so the
    start event fires only when they are all queued; do_bench alone would count the GPU idling
    through the op's host cost (tens to hundreds of us here) as device time."""
    import time
    flush = torch.empty(256 << 20, dtype=torch.int8, device=DEVICE)
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
        torch.cuda.synchronize()
    call_s = (time.perf_counter() - t0) / 3
    reps = int(min(max(rep_ms * 1e-3 / max(call_s, 1e-6), min_reps), max_reps))
    cycles = int(min(call_s, 0.05) * 2.5e9) + 20000   # >= one call at up to 2.5 GHz, + 10 us
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        torch.cuda._sleep(cycles)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return float(times[len(times) // 2])


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written) / s: the device time of a 512 MB
    copy, measured as `device_ms` measures every op (a few host-timed MB on CPU)."""
    n = (512 << 20) // 4 if CUDA else (8 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    if CUDA:
        return 2 * src.numel() * 4 / (device_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    import time
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


def maybe_skip_provider(provider: str) -> None:
    if provider == "compile" and not CUDA:
        pytest.skip("torch.compile provider runs on CUDA only (CPU compile time is not useful)")


def pytest_configure(config):
    config.addinivalue_line("markers", "goal: a case a performance goal of the issues judges "
                                       "(benchmarks/run_gpu.sh first runs these)")


def goal_cases(cases, goals) -> list:
    """`cases` as parametrize values, those in `goals` marked `goal`."""
    return [pytest.param(c, marks=pytest.mark.goal) if c in goals else c for c in cases]


# Where set, every benchmark appends its record to this JSON-lines file as soon as it is timed
# (a run cut off by the GPU machine's command limit keeps what it measured; pytest-benchmark's
# own --benchmark-json is written only at the end). report.py reads either.
JSONL_ENV = "FMRT_BENCH_JSONL"


def _append_record(benchmark, info: dict, latency_s: Optional[float]) -> None:
    path = os.environ.get(JSONL_ENV)
    if not path:
        return
    rec = dict(name=getattr(benchmark, "name", info.get("op")), extra_info=dict(info),
               stats=dict(median=latency_s))
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


RECOMPILE_LIMIT = 64


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn, dynamic=False) on a fresh Dynamo cache with an explicit recompile limit
    (and, where this torch has the switch, an error instead of a silent eager fallback past it)."""
    import torch._dynamo as dynamo
    dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across releases
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, RECOMPILE_LIMIT)
    if hasattr(dynamo.config, "fail_on_recompile_limit_hit"):
        dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False)


def make_provider_fn(provider: str, fmrt_fn: Callable, eager_fn: Callable) -> Callable:
    """The callable a provider times: fmrt's op, the eager function, or the eager function
    compiled (`compiled`)."""
    maybe_skip_provider(provider)
    if provider == "fmrt":
        return fmrt_fn
    if provider == "eager":
        return eager_fn
    return compiled(eager_fn)


def median_s(benchmark) -> Optional[float]:
    """The benchmark's median seconds, or None when it was not timed (--benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    try:
        return stats.stats.median if stats is not None else None
    except AttributeError:
        return None


def run_bench(benchmark, fn: Callable, *, op: str, case: str, dtype: torch.dtype, provider: str,
              nbytes: int, tensor_bytes: int = 0, warmup: int = 3, rounds: int = 20,
              device_timing: bool = True, **extra) -> None:
    """Time `fn()` and record extra_info (module docstring): on CUDA the device time
    (`device_ms`, unless device_timing=False) and the synced per-call latency (`rounds` timed
    calls after `warmup`); on a CPU one timed call."""
    def timed():
        out = fn()
        sync()
        return out

    if CUDA:
        for _ in range(warmup):
            timed()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(timed, rounds=rounds if CUDA else 1, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info.update(op=op, case=case, dtype=dtype_name(dtype), provider=provider, bytes=int(nbytes),
                tensor_bytes=int(tensor_bytes), device=device_name(),
                torch_version=torch.__version__, triton_version=_triton_version(), **extra)
    if CUDA:
        info["peak_extra_mem_bytes"] = int(torch.cuda.max_memory_allocated() - base)
    latency = median_s(benchmark)
    if latency:
        info["latency_ms"] = latency * 1e3
    ms = device_ms(fn) if CUDA and device_timing else (latency * 1e3 if latency else None)
    if ms:
        info["ms"] = ms
        info["timing"] = "device" if CUDA and device_timing else "host_synced"
        if nbytes:
            gbps = nbytes / (ms * 1e-3) / 1e9
            info.update(gbps=gbps, pct_copy_bw=100.0 * gbps / copy_bandwidth_gbps())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """After each benchmark test's body (its extra_info complete, the fixture not yet torn
    down): append its record to FMRT_BENCH_JSONL."""
    yield
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    if benchmark is not None and "op" in benchmark.extra_info:
        _append_record(benchmark, benchmark.extra_info, median_s(benchmark))
