"""Prototype (not a shipped option): a reflow continuation with an adversarial term on the
student's own 1- and 2-step samples, to test whether a loss that is not the MSE sharpens them.

    python docs/adversarial_reflow.py --init MODEL --out OUT --couplings FILE [FILE ...]
        [--steps 800] [--lr 1e-4] [--dlr 2e-4] [--w-adv 0.1] [--d-warmup 50] [--seed 7]

Each step, on a batch of 32 couplings (noise z, the teacher's sample x0, class y):
- the reflow loss: sigma ~ logit-normal(1, 1), x_t = (1 - sigma) x0 + sigma z, MSE between
  v(x_t, sigma, y) and z - x0 (what `fmrt train --couplings` trains);
- on the first 16: the 1-step sample x1 = z - v(z, 1, y) and the 2-step sample x2 = x_m -
  0.5 v(x_m, 0.5, y) with x_m = z - 0.5 v(z, 1, y) (the midpoint detached);
- a discriminator D (a small spectral-normalised 3D conv net with a class projection, trained
  from scratch; not the evaluator's classifier) learns the teacher's samples against x1 and
  x2 with the logistic loss, and the student adds lambda * softplus(-D(x1 | x2, y)), lambda set
  each step so that the adversarial gradient on the output layer's weight is w_adv times the
  MSE's (VQGAN's adaptive weight); D only learns for the first d_warmup steps.
AdamW (no weight decay), cosine learning rate with 20 warm-up steps, gradient clipping at 1,
EMA 0.995; writes the EMA weights as an exported model (OUT.safetensors, OUT_stepNNNN at
every half) with the init model's metadata, which `fmrt eval` reads, and OUT.log.jsonl.
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fmrt.checkpoint import export_model, load_model
from fmrt.reflow import load_couplings


class Discriminator(nn.Module):
    """[B, 3, T, H, W] clips and classes [B] -> logits [B] (projection discriminator)."""

    def __init__(self, num_classes: int, ch: int = 48):
        super().__init__()
        self.convs = nn.ModuleList([
            spectral_norm(nn.Conv3d(3, ch, 3, padding=1)),
            spectral_norm(nn.Conv3d(ch, 2 * ch, (3, 4, 4), stride=(1, 2, 2), padding=1)),
            spectral_norm(nn.Conv3d(2 * ch, 4 * ch, (3, 4, 4), stride=2, padding=1)),
            spectral_norm(nn.Conv3d(4 * ch, 4 * ch, 3, padding=1))])
        self.out = spectral_norm(nn.Linear(4 * ch, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, 4 * ch))

    def forward(self, x, y):
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        h = x.sum(dim=(2, 3, 4))
        return self.out(h).squeeze(1) + (self.embed(y) * h).sum(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--couplings", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dlr", type=float, default=2e-4)
    p.add_argument("--w-adv", type=float, default=0.1)
    p.add_argument("--d-warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    half = f"_step{max(1, a.steps // 2):04d}"
    outs = [f"{a.out}{suffix}" for suffix in (".safetensors", ".json", ".log.jsonl",
                                              f"{half}.safetensors", f"{half}.json")]
    taken = [f for f in outs if os.path.exists(f)]
    if taken:           # never replace a file, the --init model least of all
        raise SystemExit(f"adversarial_reflow.py: {taken[0]} exists; pick another --out")
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    model, meta = load_model(a.init)
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    cs = [load_couplings(f) for f in a.couplings]
    Z, X, Y = (torch.cat([c[k] for c in cs]) for k in ("noise", "sample", "cond"))
    Z, X, Y = Z.float(), X.float(), Y.long()
    disc = Discriminator(int(meta["model"]["num_classes"]))
    opt_g = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    opt_d = torch.optim.Adam(disc.parameters(), lr=a.dlr, betas=(0.0, 0.99))
    head = model.head.head.weight
    t0 = time.time()
    log = open(a.out + ".log.jsonl", "w")
    for step in range(a.steps):
        for group in opt_g.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        i = torch.randint(0, Z.shape[0], (32,), generator=gen)
        z, x0, y = Z[i], X[i], Y[i]
        sigma = torch.sigmoid(torch.randn(32, generator=gen) + 1.0)
        s = sigma.view(-1, 1, 1, 1, 1)
        mse = ((model((1 - s) * x0 + s * z, sigma, y) - (z - x0)) ** 2).mean()
        zb, yb, xb = z[:16], y[:16], x0[:16]
        v1 = model(zb, torch.ones(16), yb)
        xm = zb - 0.5 * v1.detach()
        fake = torch.cat([zb - v1, xm - 0.5 * model(xm, torch.full((16,), 0.5), yb)])
        yy = torch.cat([yb, yb])
        disc.requires_grad_(True)
        loss_d = F.softplus(disc(fake.detach(), yy)).mean() + F.softplus(-disc(xb, yb)).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        disc.requires_grad_(False)
        loss_g, lam = torch.zeros(()), torch.zeros(())
        loss = mse
        if step >= a.d_warmup:
            loss_g = F.softplus(-disc(fake, yy)).mean()
            g_mse = torch.autograd.grad(mse, head, retain_graph=True)[0].norm()
            g_adv = torch.autograd.grad(loss_g, head, retain_graph=True)[0].norm()
            lam = (a.w_adv * g_mse / (g_adv + 1e-8)).clamp(max=1e4).detach()
            loss = mse + lam * loss_g
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_g.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - 0.995)
        if step % 25 == 0 or step == a.steps - 1:
            rec = dict(step=step, mse=mse.item(), loss_d=loss_d.item(), loss_g=loss_g.item(),
                       lam=lam.item(), time=time.time() - t0)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
        if (step + 1) % max(1, a.steps // 2) == 0 or step == a.steps - 1:
            m = dict(meta, train=dict(meta.get("train", {}), adversarial_prototype=vars(a),
                                      step=step + 1))
            suffix = "" if step == a.steps - 1 else f"_step{step + 1:04d}"
            export_model(f"{a.out}{suffix}.safetensors",
                         {k: v.detach().clone() for k, v in ema.state_dict().items()}, m)
    print(f"wall {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
