"""Is a few-step student's output blurred? Sharpness statistics of its Euler samples against the
teacher's coupled samples from the same noise.

    python docs/reflow_sharpness.py COUPLINGS MODEL [MODEL ...]

For the couplings' teacher samples and each model's 1- and 2-step Euler samples from the
couplings' noise (unclamped), prints: the mean absolute difference of neighbouring pixels along
W (|dx|) and between frames (|dt|); the share of the spatial power spectrum above half the
Nyquist frequency (hf, per frame, the frame mean removed); the share of values in (-0.8, 0.8)
once clamped (mid-tones: the clips are flat colours on a flat background, so a blurred edge
adds mid-tones); the MSE to the teacher's sample; and the part of that error explained by the
starting noise (alpha = <err, z> / <z, z>: a student that leaves noise in its sample has
alpha > 0). A blurred student has lower |dx| and hf than the teacher; a noisy one higher.
"""
import sys

import torch

from fmrt.checkpoint import load_model
from fmrt.reflow import load_couplings
from fmrt.sampling import generate_clips


def hf_share(x: torch.Tensor) -> float:
    h, w = x.shape[-2:]
    p = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    fy, fx = torch.fft.fftfreq(h).abs(), torch.fft.fftfreq(w).abs()
    hi = (fy[:, None] > 0.25) | (fx[None, :] > 0.25)
    return (p[..., hi].sum() / p.sum()).item()


def row(name: str, x: torch.Tensor, target: torch.Tensor, noise: torch.Tensor) -> str:
    dx = (x[..., 1:] - x[..., :-1]).abs().mean().item()
    dt = (x[:, :, 1:] - x[:, :, :-1]).abs().mean().item()
    xc = x.clamp(-1, 1)
    mid = ((xc > -0.8) & (xc < 0.8)).float().mean().item()
    err = x - target
    alpha = ((err * noise).sum() / (noise * noise).sum()).item()
    return (f"{name:28} |dx| {dx:.4f}  |dt| {dt:.4f}  hf {hf_share(x):.4f}  mid-tones {mid:.4f}  "
            f"mse {err.pow(2).mean().item():.4f}  alpha {alpha:+.4f}")


def main(argv) -> None:
    c = load_couplings(argv[0])
    noise, target, cond = c["noise"].float(), c["sample"].float(), c["cond"]
    print(row("teacher (coupled samples)", target, target, noise), flush=True)
    for path in argv[1:]:
        model, meta = load_model(path)
        for k in (1, 2):
            with torch.no_grad():
                x = generate_clips(model, meta, cond, steps=k, noise=noise, clamp=False)
            print(row(f"{path.rsplit('/', 1)[-1][:20]} {k}-step", x, target, noise), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
