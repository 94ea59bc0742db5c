"""Where does a few-step student's second step lose? Take the student's first Euler step, from
noise to the midpoint sigma MID, then let the teacher finish: K Euler steps from MID to 0 with
its recorded sampling defaults (guidance scale and interval). If even the teacher, started from
the student's midpoint, lands worse than the student's one step, a second student step distilled
from the teacher there cannot do better.

    python docs/teacher_from_midpoint.py STUDENT SEED [K ...] [--mid SIGMA] [--num-per-class N]
        [--teacher MODEL]

With z `fmrt eval`'s noise of `--seed SEED` and v the student's velocity,
    x_mid = z - (1 - MID) v(z, 1)          (one Euler step: MID = 0.5 is 2-step Euler at shift 1)
and the teacher integrates from x_mid at sigma MID to 0 over linspace(MID, 0, K + 1). Prints
the accuracy and FD of `fmrt eval` (the same classifier and reference) of the student's 1-step
samples and of each K's.
"""
import argparse
import time

import torch

from fmrt.checkpoint import load_model
from fmrt.eval import evaluate_clips, load_classifier
from fmrt.sampling import recorded_guidance, recorded_interval, sample


def student_step(student, noise, labels, *, mid: float):
    """(the student's 1-step samples, its first Euler step's point at sigma `mid`); float32."""
    with torch.no_grad():
        x0 = sample(student, noise, sigmas=[1.0, 0.0], solver="euler", cond=labels).float()
    return x0, mid * noise.float() + (1.0 - mid) * x0             # = z - (1 - mid) v(z, 1)


def teacher_finish(teacher, teacher_meta: dict, x_mid, labels, *, mid: float, steps: int):
    """The teacher's `steps` Euler steps from `x_mid` at sigma `mid` to 0, with its recorded
    guidance scale and interval; float32, not clamped."""
    return teacher_euler(teacher, teacher_meta, x_mid, labels,
                         torch.linspace(mid, 0.0, steps + 1).tolist())


def teacher_euler(teacher, teacher_meta: dict, x, labels, sigmas):
    """The teacher's Euler steps over the grid `sigmas` (x at sigmas[0]), with its recorded
    guidance scale and interval; float32, not clamped."""
    kw = {}
    if recorded_guidance(teacher_meta) != 1.0:
        kw = dict(guidance_scale=recorded_guidance(teacher_meta),
                  uncond=torch.full_like(labels, int(teacher.config.num_classes)),
                  guidance_interval=recorded_interval(teacher_meta))
    with torch.no_grad():
        return sample(teacher, x, sigmas=sigmas, solver="euler", cond=labels, **kw).float()


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("student")
    p.add_argument("seed", type=int)
    p.add_argument("K", type=int, nargs="*", default=[10])
    p.add_argument("--mid", type=float, default=0.5)
    p.add_argument("--num-per-class", type=int, default=32)
    p.add_argument("--teacher", default="fmrt/assets/default_dit.safetensors")
    args = p.parse_args(argv)
    if not 0.0 < args.mid < 1.0 or not all(k >= 1 for k in args.K) or args.num_per_class < 2:
        p.error("--mid must be in (0, 1), each K >= 1 and --num-per-class >= 2")
    student, smeta = load_model(args.student)
    teacher, tmeta = load_model(args.teacher)
    if smeta["sample"]["sample_shape"] != tmeta["sample"]["sample_shape"]:
        p.error("the student and the teacher sample clips of different shapes")
    clf, _ = load_classifier()
    labels = torch.arange(student.config.num_classes).repeat_interleave(args.num_per_class)
    shape = (len(labels), *smeta["sample"]["sample_shape"])
    z = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))   # fmrt eval's
    x0, x_mid = student_step(student, z, labels, mid=args.mid)
    q = evaluate_clips(x0.clamp(-1, 1), labels, classifier=clf)
    print(f"seed {args.seed}: the student's 1 step: accuracy {q['accuracy']:.3f} "
          f"FD {q['fd']:.3f}", flush=True)
    for k in args.K:
        t0 = time.time()
        x = teacher_finish(teacher, tmeta, x_mid, labels, mid=args.mid, steps=k)
        q = evaluate_clips(x.clamp(-1, 1), labels, classifier=clf)
        print(f"seed {args.seed}: the student to sigma {args.mid:g}, then the teacher in {k} "
              f"steps: accuracy {q['accuracy']:.3f} FD {q['fd']:.3f} ({time.time() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
