"""Activation memory per rank of one SFT training step under Ulysses sequence parallelism,
N = 1, 2, 4 processes on CPU (gloo).

How: the bytes of every tensor autograd saves for the backward pass during the forward of
`fmrt.losses.sft_loss` (`torch.autograd.graph.saved_tensors_hooks`; storages counted once,
parameters left out). That is what a rank holds at the end of the forward, the peak of a
training step's activation memory, and it does not depend on the CPU allocator or on the load
of the machine. Transient buffers (an all-to-all's send/receive copies) are not counted.

    python -m benchmarks.sp_memory [--out benchmarks/results/cpu_sp_activation_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODEL = dict(in_channels=16, dim=256, num_layers=2, num_heads=4, ffn_dim=768, freq_dim=64,
             text_dim=None, num_classes=10, class_tokens=4)
LATENT = (1, 16, 8, 32, 32)         # [B, C, T, H, W] -> 8 * 16 * 16 = 2048 tokens


def _saved_bytes(model, fn) -> tuple[int, object]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _worker(rank: int, world: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fmrt.losses import sft_loss
    from fmrt.models import DiT, DiTConfig
    from fmrt.parallel import enable_sequence_parallel
    from fmrt.schedule import FlowMatchScheduler
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DiT(DiTConfig(**MODEL))
        if world > 1:
            enable_sequence_parallel(model)
        sched = FlowMatchScheduler("Wan")
        sched.set_timesteps(1000, training=True)
        x0 = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
        nbytes, loss = _saved_bytes(model, lambda: sft_loss(
            model, x0, torch.tensor([3]), scheduler=sched, seed=1, sigma=torch.tensor([0.5])))
        loss.backward()
        if rank == 0:
            q.put(nbytes)
    finally:
        dist.destroy_process_group()


def measure(world: int) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_worker, args=(world, port, q), nprocs=world, join=True,
                       start_method="spawn")
    return q.get()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cpu_sp_activation_memory.json")
    args = ap.parse_args()
    by_n = {n: measure(n) for n in (1, 2, 4)}
    # per-rank bytes = fixed + seq / N: fit from N = 1 and N = 4, check at N = 2
    seq = (by_n[1] - by_n[4]) * 4 / 3
    fixed = by_n[1] - seq
    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    res = dict(
        device="CPU (gloo, this 2-core shared machine); counts, not timings",
        method="bytes of the tensors autograd saves for backward during one sft_loss forward "
               "(saved_tensors_hooks, storages once, parameters excluded), rank 0",
        model=MODEL, latent=list(LATENT), tokens=tokens,
        saved_bytes_per_rank={str(n): b for n, b in by_n.items()},
        ratio_to_n1={str(n): round(b / by_n[1], 4) for n, b in by_n.items()},
        fit=dict(fixed_bytes=round(fixed), sequence_bytes_at_n1=round(seq),
                 predicted_n2=round(fixed + seq / 2), measured_n2=by_n[2]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
