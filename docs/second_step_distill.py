"""Prototype (not a shipped option): distil a few-step student's second step from the teacher's
finish at the student's own midpoint, keeping its first step as it is.

    python docs/second_step_distill.py targets STUDENT --seed S --num-per-class N --out T.safetensors
        [--teacher MODEL] [--mid 0.5] [--teacher-steps 10] [--batch-size 256]
    python docs/second_step_distill.py train STUDENT T.safetensors [T2 ...] --out OUT.safetensors
        [--steps 1000] [--batch-size 32] [--lr 1e-4] [--warmup-steps 20] [--ema-decay 0.995]
        [--seed 0]

`targets` draws noise z (class-balanced labels, `--seed`), takes the student's first Euler step
to the midpoint x_mid = z - (1 - MID) v(z, 1) and its 1-step sample x0_hat = z - v(z, 1), and
lets the teacher finish from x_mid in `--teacher-steps` Euler steps with its recorded guidance
(`docs/teacher_from_midpoint.py`: at 960 clips, seed 0, that finish scores FD 4.85 against the
student's 2-step 5.42). `train` starts from the student and regresses, on each sample of a
batch, with probability 1/2 each,
    v(z, 1)       on z - x0_hat                 (the first step: pinned to the student's own)
    v(x_mid, MID) on (x_mid - x_teacher) / MID  (the second step: one Euler step to the finish)
the only two points 1- and 2-step Euler at that midpoint evaluate. AdamW, cosine learning rate
after a linear warm-up, gradient clipping at 1, and an EMA of the weights, which it exports with
the student's meta (sampling defaults: 2 steps at shift MID / (1 - MID), so that `fmrt eval
--steps 2` puts the midpoint at MID; 1 step is untouched by the shift)."""
import argparse
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from fmrt.checkpoint import export_model, load_model, with_sampling_defaults
from fmrt.train import EMA, TrainConfig, _lr_at

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from teacher_from_midpoint import student_step, teacher_finish  # noqa: E402


def make_targets(student, teacher, teacher_meta: dict, *, seed: int, num_per_class: int,
                 mid: float, teacher_steps: int, batch_size: int) -> dict:
    labels = torch.arange(student.config.num_classes).repeat_interleave(num_per_class)
    shape = (len(labels), *teacher_meta["sample"]["sample_shape"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    parts = {"noise": [], "x0_hat": [], "x_mid": [], "x_teacher": []}
    t0 = time.time()
    for i in range(0, len(labels), batch_size):
        z, c = noise[i:i + batch_size], labels[i:i + batch_size]
        x0_hat, x_mid = student_step(student, z, c, mid=mid)
        x_t = teacher_finish(teacher, teacher_meta, x_mid, c, mid=mid, steps=teacher_steps)
        for k, v in zip(parts, (z, x0_hat, x_mid, x_t)):
            parts[k].append(v)
        print(f"targets {i + len(c)}/{len(labels)} ({time.time() - t0:.0f} s)", flush=True)
    out = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    out["labels"] = labels
    out["mid"] = torch.tensor(mid)
    return out


def second_step_loss(model, batch: dict, pick_mid: torch.Tensor) -> torch.Tensor:
    """Mean squared error of v at (z, 1) against z - x0_hat where `pick_mid` is False, and at
    (x_mid, MID) against (x_mid - x_teacher) / MID where it is True."""
    mid = float(batch["mid"])
    sel = pick_mid.view(-1, *([1] * (batch["noise"].dim() - 1)))
    x = torch.where(sel, batch["x_mid"], batch["noise"])
    target = torch.where(sel, (batch["x_mid"] - batch["x_teacher"]) / mid,
                         batch["noise"] - batch["x0_hat"])
    sigma = torch.where(pick_mid, torch.tensor(mid), torch.tensor(1.0))
    return (model(x, sigma, batch["labels"]).float() - target).pow(2).mean()


def train(student_path: str, targets: dict, out: str, *, steps: int, batch_size: int, lr: float,
          warmup_steps: int, ema_decay: float, seed: int, log_every: int = 25,
          loss_fn=None, tag: str = "second_step") -> list[float]:
    """Fine-tune the student on `targets` and export its EMA to `out` (sampling defaults: 2 steps
    with the midpoint at MID; `meta[tag]` records the run). `loss_fn(model, batch, u)`, u uniform
    in [0, 1) per sample, picks each sample's term; default: `second_step_loss` at u < 1/2."""
    if loss_fn is None:
        def loss_fn(model, batch, u):
            return second_step_loss(model, batch, u < 0.5)
    model, meta = load_model(student_path)
    model.train().requires_grad_(True)
    params = list(model.parameters())
    ema = EMA(list(model.named_parameters()), ema_decay)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    schedule = TrainConfig(lr=lr, steps=steps, warmup_steps=warmup_steps, lr_schedule="cosine")
    gen = torch.Generator().manual_seed(seed)
    n = len(targets["labels"])
    order, pos, losses, t0 = torch.randperm(n, generator=gen), 0, [], time.time()
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx, pos = order[pos:pos + batch_size], pos + batch_size
        batch = {k: (v if v.dim() == 0 else v[idx]) for k, v in targets.items()}
        for g in opt.param_groups:
            g["lr"] = _lr_at(schedule, step)            # `fmrt train`'s warm-up + cosine
        loss = loss_fn(model, batch, torch.rand(len(idx), generator=gen))
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(params, step)
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            print(f"step {step + 1}/{steps} loss {sum(recent) / len(recent):.5f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    mid = float(targets["mid"])
    meta = with_sampling_defaults(meta, steps=2, shift=mid / (1.0 - mid))
    meta[tag] = dict(student=student_path, mid=mid, n_targets=n, steps=steps,
                     batch_size=batch_size, lr=lr, ema_decay=ema_decay, seed=seed)
    state = dict(model.state_dict(), **ema.state())       # buffers (class_text) as they are
    export_model(out, {k: v.detach().contiguous() for k, v in state.items()}, meta)
    return losses


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    add_targets_args(sub.add_parser("targets"), teacher_steps=10)
    add_train_args(sub.add_parser("train"))
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        p.error(f"{args.out} exists: not overwriting it")
    if args.cmd == "targets":
        student, teacher, tmeta = load_targets_models(p, args)
        out = make_targets(student, teacher, tmeta, seed=args.seed,
                           num_per_class=args.num_per_class, mid=args.mid,
                           teacher_steps=args.teacher_steps, batch_size=args.batch_size)
        save_file(out, args.out)
    else:
        run_train(p, args)


def add_targets_args(t: argparse.ArgumentParser, *, teacher_steps: int) -> None:
    t.add_argument("student")
    t.add_argument("--seed", type=int, required=True)
    t.add_argument("--num-per-class", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--teacher", default="fmrt/assets/default_dit.safetensors")
    t.add_argument("--mid", type=float, default=0.5)
    t.add_argument("--teacher-steps", type=int, default=teacher_steps)
    t.add_argument("--batch-size", type=int, default=256)


def load_targets_models(p: argparse.ArgumentParser, args):
    """The student, the teacher and its meta for `targets`, after checking `args`."""
    if not 0.0 < args.mid < 1.0 or args.teacher_steps < 1 or args.num_per_class < 1:
        p.error("--mid must be in (0, 1), --teacher-steps and --num-per-class >= 1")
    student, smeta = load_model(args.student)
    teacher, tmeta = load_model(args.teacher)
    if smeta["sample"]["sample_shape"] != tmeta["sample"]["sample_shape"]:
        p.error("the student and the teacher sample clips of different shapes")
    return student, teacher, tmeta


def add_train_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("student")
    r.add_argument("targets", nargs="+", help="one or more files of `targets` (same MID)")
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--warmup-steps", type=int, default=20)
    r.add_argument("--ema-decay", type=float, default=0.995)
    r.add_argument("--seed", type=int, default=0)


def run_train(p: argparse.ArgumentParser, args, **kw) -> list[float]:
    """`train` on the targets files of `args` (checked, joined); `kw` to `train`."""
    if args.steps < 1 or args.batch_size < 1 or args.warmup_steps < 0 or args.lr <= 0:
        p.error("--steps, --batch-size >= 1, --warmup-steps >= 0, --lr > 0")
    parts = [load_file(f) for f in args.targets]
    if len({float(t["mid"]) for t in parts}) != 1:
        p.error("the targets files were made at different midpoints")
    targets = {k: (parts[0][k] if k == "mid" else torch.cat([t[k] for t in parts]))
               for k in parts[0]}
    return train(args.student, targets, args.out, steps=args.steps, batch_size=args.batch_size,
                 lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
                 seed=args.seed, **kw)


if __name__ == "__main__":
    main()
