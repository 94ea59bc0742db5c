"""Prototype (not a shipped option): give a MeanFlow student the teacher's own two-step path,
keeping its one-step map.

    python docs/two_step_flow_map.py targets STUDENT --seed S --num-per-class N --out T.safetensors
        [--teacher MODEL] [--mid 0.5] [--teacher-steps 25] [--batch-size 256]
    python docs/two_step_flow_map.py train STUDENT T.safetensors [T2 ...] --out OUT.safetensors
        [--steps 1000] [--batch-size 32] [--lr 1e-4] [--warmup-steps 20] [--ema-decay 0.995]
        [--seed 0]
    python docs/two_step_flow_map.py distances MODEL T.safetensors [--every 8]

A velocity model's two Euler steps start with half its one step, x_mid = z - (1 - MID) v(z, 1),
a point off the teacher's path at MID that no second step finishes well from
(`docs/teacher_from_midpoint.py`). A MeanFlow model's average velocity u(z, r, t) takes each
jump t -> r on its own, so 2-step sampling, z -> MID -> 0, can follow the teacher while 1-step
sampling, z -> 0, stays what it is.

`targets` draws noise z (class-balanced labels, `--seed`), takes the student's 1-step sample
x0_hat = z - u(z, 0, 1), and lets the teacher, with its recorded guidance, integrate from z in
`--teacher-steps` Euler steps to x_mid at MID and as many more to x_teacher at 0 (at MID 0.5 and
25 steps, its 50-step sampling grid: x_teacher is its 50-step sample). `train` (the loop of
`docs/second_step_distill.py`) starts from the student and regresses, on each sample of a batch,
with probability 1/3 each,
    u(z, 0, 1)       on z - x0_hat                    (the one step: pinned to the student's own)
    u(z, MID, 1)     on (z - x_mid) / (1 - MID)       (two steps' first: to the teacher's x_mid)
    u(x_mid, 0, MID) on (x_mid - x_teacher) / MID     (and their second: to the teacher's end)
the three jumps 1- and 2-step MeanFlow sampling make, and exports the EMA with 2-step defaults
at shift MID / (1 - MID) (MID is then 2-step sampling's midpoint; 1 step is untouched)."""
import argparse
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from fmrt.checkpoint import load_model, read_meta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from second_step_distill import (add_targets_args, add_train_args,  # noqa: E402
                                 load_targets_models, run_train)
from teacher_from_midpoint import teacher_euler  # noqa: E402


def make_targets(student, teacher, teacher_meta: dict, *, seed: int, num_per_class: int,
                 mid: float, teacher_steps: int, batch_size: int) -> dict:
    labels = torch.arange(student.config.num_classes).repeat_interleave(num_per_class)
    shape = (len(labels), *teacher_meta["sample"]["sample_shape"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    first = torch.linspace(1.0, mid, teacher_steps + 1).tolist()
    second = torch.linspace(mid, 0.0, teacher_steps + 1).tolist()
    parts = {"noise": [], "x0_hat": [], "x_mid": [], "x_teacher": []}
    t0 = time.time()
    for i in range(0, len(labels), batch_size):
        z, c = noise[i:i + batch_size], labels[i:i + batch_size]
        with torch.no_grad():
            x0_hat = z - student(z, 1.0, c, r=0.0).float()
        x_mid = teacher_euler(teacher, teacher_meta, z, c, first)
        x_t = teacher_euler(teacher, teacher_meta, x_mid, c, second)
        for k, v in zip(parts, (z, x0_hat, x_mid, x_t)):
            parts[k].append(v)
        print(f"targets {i + len(c)}/{len(labels)} ({time.time() - t0:.0f} s)", flush=True)
    out = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    out["labels"] = labels
    out["mid"] = torch.tensor(mid)
    return out


def flow_map_loss(model, batch: dict, term: torch.Tensor) -> torch.Tensor:
    """Mean squared error of u on the jump `term` (per sample: 0 = 1 -> 0 against z - x0_hat,
    1 = 1 -> MID against (z - x_mid) / (1 - MID), 2 = MID -> 0 against (x_mid - x_teacher) /
    MID)."""
    mid = float(batch["mid"])
    z, x_mid = batch["noise"], batch["x_mid"]
    view = (-1, *([1] * (z.dim() - 1)))
    at_mid = (term == 2).view(view)
    x = torch.where(at_mid, x_mid, z)
    target = torch.where(at_mid, (x_mid - batch["x_teacher"]) / mid,
                         torch.where((term == 1).view(view), (z - x_mid) / (1.0 - mid),
                                     z - batch["x0_hat"]))
    t = torch.where(term == 2, torch.tensor(mid), torch.tensor(1.0))
    r = torch.where(term == 1, torch.tensor(mid), torch.tensor(0.0))
    return (model(x, t, batch["labels"], r=r).float() - target).pow(2).mean()


def jump_distances(model, targets: dict, every: int = 1) -> dict:
    """Mean squared distances of the model's jumps on every `every`-th target: its 1 step to
    x0_hat and to x_teacher, its first of 2 jumps to x_mid, its 2 steps to x_teacher, and its
    second jump from the teacher's own x_mid to x_teacher."""
    mid = float(targets["mid"])
    z, x_mid, x_t, x0, c = (targets[k][::every] for k in
                            ("noise", "x_mid", "x_teacher", "x0_hat", "labels"))
    with torch.no_grad():
        one = z - model(z, 1.0, c, r=0.0).float()
        half = z - (1.0 - mid) * model(z, 1.0, c, r=mid).float()
        two = half - mid * model(half, mid, c, r=0.0).float()
        second = x_mid - mid * model(x_mid, mid, c, r=0.0).float()
    d = lambda a, b: float((a - b).pow(2).mean())      # noqa: E731
    return {"one_vs_x0_hat": d(one, x0), "one_vs_teacher": d(one, x_t),
            "mid_vs_x_mid": d(half, x_mid), "two_vs_teacher": d(two, x_t),
            "second_from_x_mid_vs_teacher": d(second, x_t)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    add_targets_args(sub.add_parser("targets"), teacher_steps=25)
    add_train_args(sub.add_parser("train"))
    dd = sub.add_parser("distances", help="jump_distances of a model on a targets file")
    dd.add_argument("student")
    dd.add_argument("targets")
    dd.add_argument("--every", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "distances":
        if args.every < 1:
            p.error("--every must be >= 1")
        model = load_model(args.student)[0].eval()
        for k, v in jump_distances(model, load_file(args.targets), args.every).items():
            print(f"{k:30s} {v:.5f}")
        return
    if os.path.exists(args.out):
        p.error(f"{args.out} exists: not overwriting it")
    if not read_meta(args.student)["model"].get("meanflow"):
        p.error(f"{args.student} is not a MeanFlow model (u(z, r, t)): its 2-step path cannot "
                f"leave its 1-step one")
    if args.cmd == "targets":
        student, teacher, tmeta = load_targets_models(p, args)
        out = make_targets(student, teacher, tmeta, seed=args.seed,
                           num_per_class=args.num_per_class, mid=args.mid,
                           teacher_steps=args.teacher_steps, batch_size=args.batch_size)
        save_file(out, args.out)
    else:
        run_train(p, args, tag="two_step_flow_map",
                  loss_fn=lambda model, batch, u: flow_map_loss(model, batch, (3 * u).long()))


if __name__ == "__main__":
    main()
