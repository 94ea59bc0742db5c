"""Prototype (not a shipped option): train a few-step student's second step by distribution
matching (DMD, Yin et al. 2024, with DMD2's two time-scale updates), keeping its first step.

    python docs/second_step_dmd.py STUDENT --out-dir DIR [--teacher MODEL] [--mid 0.5]
        [--steps 400] [--batch-size 32] [--lr 2e-5] [--fake-lr 1e-4] [--fake-updates 2]
        [--fake-warmup 100] [--pin 10] [--ema-decay 0.99] [--checkpoint-every 100] [--seed 0]
        [--real-guidance G] [--fake-init MODEL]

The generator is the student's 2-step Euler sample with the midpoint at MID and its first step
frozen (v0: the student as loaded, never trained; v: the copy being trained):
    x_mid = z - (1 - MID) v0(z, 1),     x0 = x_mid - MID v(x_mid, MID).
Each step draws noise z with class-balanced labels, noises x0 again, x_s = (1 - s) x0 + s n with
s ~ U[0.02, 0.98], and compares two denoisers there:
    x0_real = x_s - s v_T(x_s, s)    the teacher with its recorded guidance (scale and interval;
                                     `--real-guidance` replaces the scale, 1: no guidance)
    x0_fake = x_s - s v_F(x_s, s)    a copy of the teacher (or of `--fake-init`) trained on the
                                     generator's samples
    g = (x0_fake - x0_real) / mean|x0 - x0_real|    (the mean per sample, no gradient)
    loss = 0.5 mean((x0 - sg(x0 - g))^2) + PIN mean((v(z, 1) - v0(z, 1))^2)
The first term's gradient in x0 is g / numel: x0 moves towards where the teacher's
denoiser points and away from where the fake one does, the gradient of the KL divergence from
the generator's distribution to the teacher's (DMD, eq. 7, in x0-prediction form). The second
pins the 1-step sample to the student's own. F learns by flow matching on the generator's
detached samples (velocity target n - x0, the same law of s, fresh s and n each time),
`--fake-updates` times per generator step on that step's samples before g is taken, and alone
for `--fake-warmup` steps before the first. Both use AdamW (betas 0, 0.999), a linear warm-up of 20 steps and cosine decay for the generator, and gradient
clipping at 1; the generator's EMA is exported every `--checkpoint-every` steps as
DIR/step_NNNNN.safetensors and at the end as DIR/model.safetensors, with the student's meta
and sampling defaults of 2 steps at shift MID / (1 - MID) (`fmrt eval --steps 2` puts the
midpoint at MID; 1 step is untouched by the shift)."""
import argparse
import json
import os
import time

import torch

from fmrt.checkpoint import export_model, load_model, with_sampling_defaults
from fmrt.sampling import recorded_guidance, recorded_interval
from fmrt.train import EMA, TrainConfig, _lr_at

S_LO, S_HI = 0.02, 0.98


def guided_velocity(teacher, meta: dict, x, s, labels):
    """The teacher's velocity at (x, s) with its recorded guidance: v_u + g (v_c - v_u) where s
    lies in the recorded interval (both ends included, as `fmrt.sampling` does), v_c elsewhere."""
    g, interval = recorded_guidance(meta), recorded_interval(meta)
    if g == 1.0:
        return teacher(x, s, labels).float()
    uncond = torch.full_like(labels, int(teacher.config.num_classes))
    both = teacher(torch.cat([x, x]), torch.cat([s, s]), torch.cat([labels, uncond]))
    c, u = both.float().chunk(2)
    guided = u + g * (c - u)
    if interval is None:
        return guided
    inside = ((s >= interval[0]) & (s <= interval[1])).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(inside, guided, c)


def generator_sample(student, frozen, z, labels, *, mid: float):
    """(x0, v(z, 1), v0(z, 1)): the 2-step sample with the frozen first step and the trained
    second, and the trained and frozen velocities at sigma 1 (for the pin). One forward of the
    trained model on [z; x_mid]."""
    B = z.shape[0]
    with torch.no_grad():
        v0 = frozen(z, torch.ones(B), labels).float()
    x_mid = z - (1.0 - mid) * v0
    sig = torch.cat([torch.ones(B), torch.full((B,), mid)])
    v1, vm = student(torch.cat([z, x_mid]), sig, torch.cat([labels, labels])).float().chunk(2)
    return x_mid - mid * vm, v1, v0


def dmd_direction(teacher, tmeta: dict, fake, x0, labels, s, n):
    """g = (x0_fake - x0_real) / mean|x0 - x0_real| at x_s = (1 - s) x0 + s n; no gradient."""
    with torch.no_grad():
        sv = s.view(-1, *([1] * (x0.dim() - 1)))
        x_s = (1.0 - sv) * x0 + sv * n
        x0_real = x_s - sv * guided_velocity(teacher, tmeta, x_s, s, labels)
        x0_fake = x_s - sv * fake(x_s, s, labels).float()
        norm = (x0 - x0_real).abs().flatten(1).mean(1).clamp_min(1e-6)
        return (x0_fake - x0_real) / norm.view_as(sv)


def fake_loss(fake, x0, labels, s, n):
    """Flow matching of the fake denoiser on the generator's samples x0 (detached)."""
    sv = s.view(-1, *([1] * (x0.dim() - 1)))
    x_s = (1.0 - sv) * x0 + sv * n
    return (fake(x_s, s, labels).float() - (n - x0)).pow(2).mean()


def train(student_path: str, teacher_path: str, out_dir: str, *, mid: float, steps: int,
          batch_size: int, lr: float, fake_lr: float, fake_updates: int, fake_warmup: int,
          pin: float, ema_decay: float, checkpoint_every: int, seed: int,
          real_guidance=None, fake_init=None, log_every: int = 10) -> list[dict]:
    student, smeta = load_model(student_path)
    frozen, _ = load_model(student_path)
    teacher, tmeta = load_model(teacher_path)
    fake, _ = load_model(fake_init or teacher_path)
    if real_guidance is not None:
        tmeta = with_sampling_defaults(tmeta, guidance_scale=real_guidance)
    if smeta["sample"]["sample_shape"] != tmeta["sample"]["sample_shape"]:
        raise SystemExit("the student and the teacher sample clips of different shapes")
    if len({m.config.num_classes for m in (student, teacher, fake)}) != 1:
        raise SystemExit("the student, the teacher and the fake have different numbers of classes")
    for m in (frozen, teacher):
        m.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    fake.train().requires_grad_(True)
    params, fparams = list(student.parameters()), list(fake.parameters())
    ema = EMA(list(student.named_parameters()), ema_decay)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.999), weight_decay=0.0)
    fopt = torch.optim.AdamW(fparams, lr=fake_lr, betas=(0.0, 0.999), weight_decay=0.0)
    schedule = TrainConfig(lr=lr, steps=steps, warmup_steps=20, lr_schedule="cosine")
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(smeta["sample"]["sample_shape"])
    K = int(student.config.num_classes)
    out_meta = with_sampling_defaults(smeta, steps=2, shift=mid / (1.0 - mid))
    out_meta["second_step_dmd"] = dict(student=student_path, teacher=teacher_path, mid=mid,
                                       steps=steps, batch_size=batch_size, lr=lr,
                                       fake_lr=fake_lr, fake_updates=fake_updates,
                                       fake_warmup=fake_warmup, pin=pin, ema_decay=ema_decay,
                                       seed=seed, real_guidance=recorded_guidance(tmeta),
                                       real_interval=recorded_interval(tmeta),
                                       fake_init=fake_init or teacher_path)

    def draw():
        labels = torch.randperm(batch_size, generator=gen) % K
        z = torch.randn((batch_size, *shape), generator=gen)
        s = S_LO + (S_HI - S_LO) * torch.rand(batch_size, generator=gen)
        return z, labels, s, torch.randn((batch_size, *shape), generator=gen)

    def fake_step(x0, labels):
        s = S_LO + (S_HI - S_LO) * torch.rand(batch_size, generator=gen)
        loss = fake_loss(fake, x0, labels, s, torch.randn(x0.shape, generator=gen))
        fopt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fparams, 1.0)
        fopt.step()
        return float(loss.detach())

    def export(path):
        state = dict(student.state_dict(), **ema.state())
        export_model(path, {k: v.detach().contiguous() for k, v in state.items()}, out_meta)

    log, t0 = [], time.time()
    for i in range(fake_warmup):
        z, labels, _, _ = draw()
        with torch.no_grad():
            x0, _, _ = generator_sample(student, frozen, z, labels, mid=mid)
        fl = fake_step(x0, labels)
        if (i + 1) % log_every == 0:
            print(f"fake warm-up {i + 1}/{fake_warmup} fake loss {fl:.5f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    for step in range(steps):
        z, labels, s, n = draw()
        x0, v1, v0 = generator_sample(student, frozen, z, labels, mid=mid)
        fls = [fake_step(x0.detach(), labels) for _ in range(fake_updates)]
        g = dmd_direction(teacher, tmeta, fake, x0.detach(), labels, s, n)
        dmd = 0.5 * (x0 - (x0 - g).detach()).pow(2).mean()
        pin_mse = (v1 - v0).pow(2).mean()
        loss = dmd + pin * pin_mse
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss at step {step}")
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(schedule, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(params, step)
        rec = dict(step=step + 1, g_rms=float(g.pow(2).mean().sqrt()),
                   pin_mse=float(pin_mse.detach()),
                   fake_loss=sum(fls) / max(len(fls), 1), seconds=round(time.time() - t0, 1))
        log.append(rec)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(" ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in rec.items()), flush=True)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            export(os.path.join(out_dir, f"step_{step + 1:05d}.safetensors"))
    export(os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "log.json"), "w") as f:
        json.dump(log, f)
    return log


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("student")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--teacher", default="fmrt/assets/default_dit.safetensors")
    p.add_argument("--mid", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--fake-lr", type=float, default=1e-4)
    p.add_argument("--fake-updates", type=int, default=2)
    p.add_argument("--fake-warmup", type=int, default=100)
    p.add_argument("--pin", type=float, default=10.0)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-guidance", type=float, default=None,
                   help="the teacher's guidance scale for the real denoiser (default: recorded)")
    p.add_argument("--fake-init", default=None,
                   help="the fake denoiser's initial weights (default: the teacher's)")
    args = p.parse_args(argv)
    if not 0.0 < args.mid < 1.0:
        p.error("--mid must be in (0, 1)")
    if (args.steps < 1 or args.batch_size < 1 or args.fake_updates < 0 or args.fake_warmup < 0
            or args.checkpoint_every < 0 or args.lr <= 0 or args.fake_lr <= 0 or args.pin < 0
            or (args.real_guidance is not None and args.real_guidance < 1)):
        p.error("--steps, --batch-size >= 1; --fake-updates, --fake-warmup, --checkpoint-every,"
                " --pin >= 0; --lr, --fake-lr > 0; --real-guidance >= 1")
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        p.error(f"{args.out_dir} is not empty: not overwriting it")
    os.makedirs(args.out_dir, exist_ok=True)
    train(args.student, args.teacher, args.out_dir, mid=args.mid, steps=args.steps,
          batch_size=args.batch_size, lr=args.lr, fake_lr=args.fake_lr,
          fake_updates=args.fake_updates, fake_warmup=args.fake_warmup, pin=args.pin,
          ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every, seed=args.seed,
          real_guidance=args.real_guidance, fake_init=args.fake_init)


if __name__ == "__main__":
    main()
