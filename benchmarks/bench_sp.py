"""Sequence parallelism (Ulysses, fmrt.parallel) on GPUs: one training step (SFT loss forward +
backward, gradient checkpointing, bf16) and one sampling step (batched CFG model call + fused
guided Euler step) of the Wan2.1-1.3B DiT at 480p x 81 frames (latent [1, 16, 21, 60, 104]:
32760 tokens, text [1, 512, 4096]), N = 1, 2, 4 GPUs: time (max over ranks, median of the
timed repeats) and peak memory per rank (torch.cuda.max_memory_allocated).

    pytest benchmarks/bench_sp.py -m gpu -s        # launches torchrun for each N the node has
    torchrun --nproc-per-node 2 -m benchmarks.bench_sp -- --out result.json   # one N by hand
    torchrun --nproc-per-node 2 -m benchmarks.bench_sp -- --tiny --repeats 1   # CPU smoke run

Results: benchmarks/results/<gpu>_sp.json. No GPU result is committed yet.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

WAN_480P = dict(latent=(1, 16, 21, 60, 104), text=(1, 512, 4096), preset="wan2.1-1.3b",
                overrides={})
TINY = dict(latent=(1, 4, 3, 8, 8), text=(1, 8, 32), preset="wan2.1-1.3b",
            overrides=dict(in_channels=4, dim=96, num_layers=2, num_heads=4, ffn_dim=192,
                           text_dim=32, freq_dim=32))


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _timed(fn, cuda: bool, repeats: int) -> float:
    fn()                                  # warm-up (kernel compiles, allocator)
    times = []
    for _ in range(repeats):
        _sync(cuda)
        t0 = time.perf_counter()
        fn()
        _sync(cuda)
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64,
                     device="cuda" if cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run(case: dict, repeats: int) -> dict:
    from fmrt import ops
    from fmrt.losses import sft_loss
    from fmrt.models import DiT, DiTConfig
    from fmrt.parallel import enable_sequence_parallel
    from fmrt.schedule import FlowMatchScheduler
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    world = dist.get_world_size()
    torch.manual_seed(0)
    with torch.device(dev):
        model = DiT(DiTConfig.preset(case["preset"], gradient_checkpointing=True,
                                     **case["overrides"])).to(dtype)
    if world > 1:
        enable_sequence_parallel(model)
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(case["latent"], generator=g, device=dev).to(dtype)
    text = torch.randn(case["text"], generator=g, device=dev).to(dtype)
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)
    sigma = torch.tensor([0.6], device=dev)

    def train_step():
        model.zero_grad(set_to_none=True)
        sft_loss(model, x0, text, scheduler=sched, seed=1, sigma=sigma).backward()

    def sample_step():
        with torch.no_grad():
            v = model(torch.cat([x0, x0]), torch.tensor([0.6, 0.6], device=dev),
                      torch.cat([text, torch.zeros_like(text)]))
            ops.guided_euler_step(x0, v[:1], v[1:], 5.0, 0.6, 0.55)

    res = {}
    for name, fn in (("train_step", train_step), ("sample_step", sample_step)):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = _timed(fn, cuda, repeats)
        peak = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0], dtype=torch.int64,
                            device=dev)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        res[name] = dict(seconds=seconds, peak_mem_bytes_per_rank=int(peak))
    out = dict(device=torch.cuda.get_device_name() if cuda else "cpu (smoke run, not a timing)",
               sp=world, latent=list(case["latent"]), text=list(case["text"]),
               preset=case["preset"], overrides=case["overrides"], dtype=str(dtype),
               gradient_checkpointing=True, repeats=repeats, **res)
    dist.destroy_process_group()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = run(TINY if args.tiny else WAN_480P, args.repeats)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)


@pytest.mark.gpu
def test_bench_sp(tmp_path):
    """N = 1, 2, 4 (as many as the node has): one torchrun per N; results printed and written
    to $OUT or benchmarks/results/<gpu>_sp.json."""
    n_gpu = torch.cuda.device_count()
    rows = []
    for n in (1, 2, 4):
        if n > n_gpu:
            break
        path = tmp_path / f"sp{n}.json"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                            str(n), "-m", "benchmarks.bench_sp", "--", "--out", str(path)],
                           capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stderr[-4000:]
        rows.append(json.loads(path.read_text()))
        print(json.dumps(rows[-1]))
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    name = torch.cuda.get_device_name().replace(" ", "_")
    with open(os.path.join(out_dir, f"{name}_sp.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
