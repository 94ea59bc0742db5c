"""Training cost per step: MeanFlow (`fmrt.losses.meanflow_loss`) against plain flow matching
(`fmrt.losses.sft_loss`) on the same DiT, through `fmrt.train.compute_loss` (the exact loss
`fmrt train` computes) + backward + gradient clipping + AdamW step.

Model: the embedded model's config (`fmrt/assets/default_dit.json`: the "tiny" DiT, dim 128, 4
layers, 256 tokens per clip); the MeanFlow run uses the same config with `meanflow=True` (one
more time MLP for h = t - r, +0.05 M parameters). Data: one fixed batch of built-in clips.
Settings as the embedded model's training (logit-normal sigmas, no weighting, shift 1,
cond-drop 0.1); MeanFlow with the loss's defaults (25% of samples with r != t, adaptive
weighting p = 1).

Each objective runs in a fresh subprocess, so that peak memory is its own:
- CPU: `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the process's peak resident set, which
  includes Python, torch and the model: also reported is the RSS just before the first step,
  and the difference, the training steps' own peak);
- CUDA: `torch.cuda.max_memory_allocated()` (and the same difference).
Timing: `--warmup` steps, then the median and mean of `--steps` timed steps (CUDA: synchronised).

    python benchmarks/meanflow_cost.py [--steps 20] [--warmup 3] [--batch-size 16]
        [--device auto|cpu|cuda] [--threads N] [--json PATH]

Prints one JSON object. On a CPU the numbers describe that CPU only: no GPU claim.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "fmrt", "assets", "default_dit.json")


def _rss_kib() -> int:
    """Current resident set of this process in KiB (Linux /proc), else 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child(objective: str, steps: int, warmup: int, batch_size: int, device: str,
          threads: int) -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)
    from fmrt.data import ShapesVideo, collate
    from fmrt.models import DiT, DiTConfig
    from fmrt.schedule import FlowMatchScheduler
    from fmrt._dispatch import resolve_device
    from fmrt.train import TrainConfig, _mix, compute_loss

    dev = resolve_device(device)
    with open(CONFIG) as f:
        meta = json.load(f)
    mdict = dict(meta["model"], meanflow=objective == "meanflow")
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_dict(mdict)).to(dev).train()
    cfg = TrainConfig(objective=objective, timestep_sampler="logit_normal", weighting="none",
                      shift=1.0, cond_drop=0.1, batch_size=batch_size, device=str(dev))
    sched = FlowMatchScheduler(cfg.template)
    sched.set_timesteps(1000, training=True, shift=1.0)
    ds = ShapesVideo(batch_size, frames=4, size=16, seed=0)
    x0, cond = collate([ds[i] for i in range(batch_size)])[:2]
    x0, cond = x0.to(dev), cond.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    null = model.config.num_classes

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def one(step):
        gen = torch.Generator(device=dev).manual_seed(_mix(0, 0, step))
        c = cond
        if objective != "meanflow":   # as fmrt.train: meanflow_loss drops conditions itself
            from fmrt.train import _drop_cond
            c = _drop_cond(cond, cfg.cond_drop, null, gen)
        loss = compute_loss(model, x0, c, None, sched=sched, config=cfg, gen=gen,
                            null_class=null)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    sync()
    rss_before = _rss_kib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        mem_before = torch.cuda.memory_allocated(dev)
    with torch.enable_grad():
        for s in range(warmup):
            one(s)
        times = []
        for s in range(warmup, warmup + steps):
            sync()
            t0 = time.perf_counter()
            one(s)
            sync()
            times.append(time.perf_counter() - t0)
    out = dict(objective=objective, device=str(dev), batch_size=batch_size,
               params=sum(p.numel() for p in model.parameters()),
               steps_timed=steps, warmup=warmup, threads=torch.get_num_threads(),
               median_s=statistics.median(times), mean_s=statistics.fmean(times),
               min_s=min(times), max_s=max(times))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
        out.update(memory_method="torch.cuda.max_memory_allocated",
                   peak_bytes=peak, peak_minus_before_bytes=peak - mem_before)
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
        out.update(memory_method="resource.getrusage(RUSAGE_SELF).ru_maxrss (process peak RSS)",
                   peak_bytes=peak_kib * 1024, rss_before_steps_bytes=rss_before * 1024,
                   peak_minus_before_bytes=(peak_kib - rss_before) * 1024)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.warmup, a.batch_size, a.device, a.threads)))
        return 0
    runs = {}
    for objective in ("sft", "meanflow"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", objective,
               "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--batch-size", str(a.batch_size), "--device", a.device,
               "--threads", str(a.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            return res.returncode
        runs[objective] = json.loads(res.stdout.strip().splitlines()[-1])
    import torch
    sft, mf = runs["sft"], runs["meanflow"]
    result = dict(
        benchmark="meanflow_vs_flow_matching_train_step",
        model_config=CONFIG.replace(ROOT + os.sep, ""),
        torch=torch.__version__, python=platform.python_version(),
        machine=platform.machine(), cpu_count=os.cpu_count(),
        cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        runs=runs,
        meanflow_over_sft_time=mf["median_s"] / sft["median_s"],
        meanflow_over_sft_peak_minus_before=(mf["peak_minus_before_bytes"]
                                             / max(1, sft["peak_minus_before_bytes"])),
    )
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
