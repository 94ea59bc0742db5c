"""FD at each noise seed, model by model: the picture behind a mean over seeds.

    python docs/fd_over_seeds.py OUT.png LABEL=EVAL.json[,EVAL.json ...] ...

Each LABEL gets one line per (steps, guidance) setting found in its `fmrt eval --json` files
(several seeds in one file from `fmrt eval --seed S S ...`, or one file per seed), FD against
the noise seed, and a dashed line at its mean over those seeds. The grey band is the spread of
FD between real clip sets (10 % to 90 %, `docs/fd_noise.py`) at 32 clips per class.
"""
import json
import sys

REAL_BAND = (3.51, 15.87)      # docs/fd_noise.py 32 200: 10 % and 90 % quantiles


def series(paths: list) -> dict:
    """{(steps, guidance): {seed: fd}} from eval JSONs (a row without a seed: the file's)."""
    out: dict = {}
    for p in paths:
        doc = json.load(open(p))
        for r in doc["results"]:
            if not r["steps"]:
                continue
            seed = r.get("seed", (doc.get("seeds") or [None])[0])
            if seed is None:
                raise SystemExit(f"{p}: a row without a seed (an eval JSON from before --seed "
                                 f"took several values); pass files written with --seed")
            out.setdefault((r["steps"], r["guidance_scale"]), {})[seed] = r["fd"]
    return out


def main(argv) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, specs = argv[0], argv[1:]
    inputs = {f for spec in specs for f in spec.split("=", 1)[-1].split(",")}
    if not out.endswith(".png") or out in inputs:
        raise SystemExit(f"OUT must be a .png that is not one of the eval JSONs, got {out}")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axhspan(*REAL_BAND, color="0.9", label="real clips vs real (10-90 %)")
    for spec in specs:
        label, files = spec.split("=", 1)
        for (steps, scale), fds in sorted(series(files.split(",")).items()):
            seeds = sorted(fds)
            ys = [fds[s] for s in seeds]
            name = f"{label}, {steps} step{'s' if steps > 1 else ''}"
            line, = ax.plot(seeds, ys, marker="o", ms=3, label=name)
            ax.axhline(sum(ys) / len(ys), color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("noise seed (fmrt eval --seed)")
    ax.set_ylabel("FD (32 clips per class)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
