"""Shared benchmark tools.

Every benchmark states the compulsory bytes its op moves (each input read once, each output
written once), synchronises the device inside the timed call, and records in `extra_info`:
op, case, dtype, provider, bytes, gbps, pct_copy_bw (of a device-to-device copy measured in the
same run), device. On CUDA the suite runs the real shapes; on a CPU it runs tiny ones under the
Triton interpreter only to keep the code alive (CPU timings are not performance claims), and
skips the `compile` provider.
"""
from __future__ import annotations

import functools
from typing import Callable

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


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written) / s, best of a few runs."""
    n = (512 << 20) // 4 if CUDA else (8 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    best = float("inf")
    import time
    for _ in range(10 if CUDA else 3):
        t0 = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        sync()
        best = min(best, (time.perf_counter() - t0) / 10)
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


def make_provider_fn(provider: str, fmrt_fn: Callable, eager_fn: Callable) -> Callable:
    """The callable a provider times: fmrt's op, the eager function, or the eager function
    compiled with torch.compile."""
    maybe_skip_provider(provider)
    if provider == "fmrt":
        return fmrt_fn
    if provider == "eager":
        return eager_fn
    return torch.compile(eager_fn)


def run_bench(benchmark, fn: Callable, *, op: str, case: str, dtype: torch.dtype, provider: str,
              nbytes: int, warmup: int = 3, rounds: int = 20, **extra) -> None:
    """Time `fn()` (device synchronised inside the timed call; `rounds` timed calls on CUDA,
    one on a CPU) and record extra_info."""
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
                device=device_name(), torch_version=torch.__version__,
                triton_version=_triton_version(), **extra)
    stats = getattr(benchmark, "stats", None)
    mean = None
    if stats is not None:
        try:
            mean = stats.stats.median
        except AttributeError:
            mean = None
    if mean:
        gbps = nbytes / mean / 1e9
        info.update(ms=mean * 1e3, gbps=gbps, pct_copy_bw=100.0 * gbps / copy_bandwidth_gbps())
    if CUDA:
        info["peak_extra_mem_bytes"] = int(torch.cuda.max_memory_allocated() - base)
