"""The disc-fall clips of `fmrt eval`'s set, measured as shapes: how far the disc falls, how much
its size wobbles from frame to frame, how soft its edge is. Real clips against a model's.

    python docs/disc_fall_motion.py real
    python docs/disc_fall_motion.py MODEL STEPS [GUIDANCE [GUIDE_MODEL]]

A real disc falls 0.45 of the frame (7.2 pixels on 16) over a clip, with a constant radius and a
one-pixel anti-aliased edge. Per clip, the coverage of a pixel is its brightest channel mapped
to [0, 1] (one channel of every shape's colour is saturated); the disc's centre is the
coverage-weighted centroid (faint pixels count: a faint trail left behind shortens the fall),
its core's the centroid of the pixels over half covered; its radius sqrt(area / pi). The model rows use the eval set's noise
rows of the disc-fall class (32 per class, class 1: rows 32-63) at seeds 0, 1 and 2.
"""
import sys

import torch

from fmrt.data import ShapesVideo

DISC_FALL = 1


def shape_stats(clips: torch.Tensor) -> dict:
    """clips `[N, 3, T, H, W]` in [-1, 1] -> per clip: the fall (pixels) of the
    coverage-weighted centroid and of the core's (pixels over half covered), the radius and its
    sd over frames, and the fraction of pixels with partial coverage (0.1 < c < 0.9)."""
    cov = clips.float().clamp(-1, 1).add(1).div(2).amax(1)            # [N, T, H, W]
    rows = torch.arange(cov.shape[-2], dtype=torch.float32).view(1, 1, -1, 1) + 0.5

    def centre_row(w):
        return (w * rows).sum((2, 3)) / w.sum((2, 3)).clamp(min=1e-3)
    cy, core = centre_row(cov), centre_row((cov > 0.5).float())
    radius = (cov.sum((2, 3)) / torch.pi).sqrt()
    return dict(fall=cy[:, -1] - cy[:, 0], core_fall=core[:, -1] - core[:, 0],
                radius=radius.mean(1), radius_sd=radius.std(1),
                soft=((cov > 0.1) & (cov < 0.9)).float().mean((1, 2, 3)))


def show(name: str, stats: dict) -> None:
    print(f"{name:24s}" + "  ".join(f"{k} {v.mean():.2f} ({v.std():.2f})"
                                    for k, v in stats.items()), flush=True)


def main(argv) -> None:
    if argv[0] == "real":
        ds = ShapesVideo(10 ** 6, frames=4, size=16, seed=999)
        show("real (reference set)", shape_stats(ds.clips_of_class(DISC_FALL, 32)))
        return
    from fmrt.checkpoint import load_model
    from fmrt.sampling import generate_clips
    path, steps = argv[0], int(argv[1])
    scale = float(argv[2]) if len(argv) > 2 else 1.0
    guide = load_model(argv[3])[0] if len(argv) > 3 else None
    model, meta = load_model(path)
    shape = meta["sample"]["sample_shape"]
    for seed in (0, 1, 2):
        noise = torch.randn((6 * 32, *shape), generator=torch.Generator().manual_seed(seed))
        rows = slice(32 * DISC_FALL, 32 * DISC_FALL + 32)
        with torch.no_grad():
            clips = generate_clips(model, meta, torch.full((32,), DISC_FALL), steps=steps,
                                   noise=noise[rows], guidance_scale=scale, guide_model=guide,
                                   solver="meanflow" if model.config.meanflow else "euler")
        show(f"seed {seed}, {steps} steps", shape_stats(clips))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
