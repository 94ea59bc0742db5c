"""Issue 16's few-step goal with the students and the teacher paired: every student clip drawn
from the same noise and class as a teacher clip, so the margin's jackknife drops the same
noises from both sides (`fmrt.eval.paired_margin`) instead of adding two independent errors.

    python docs/fd_paired.py --couplings runs/tc/teacher50_9100.safetensors ... \\
        --out docs/fd_paired.json [--plot docs/fd_paired.png] [--features runs/f.pt] [--device cpu]
    python docs/fd_paired.py --couplings ... --from-features runs/fd_paired_features.pt --out ...

Why: on 7680 clips a row (`docs/fd_large_n.py`) the average student's margins to the goal
were 0.2-0.3 FD with standard errors near 0.4, most of it the teacher's own clips' sampling
error. A reflow student maps a noise to roughly the teacher's sample from that noise, so the
two sets' sampling errors move together; scored on the same noises, they cancel.

Fixed before it ran (2026-12-03, night), nothing chosen on its figures:
- the teacher: its own 50-step samples (50 Euler steps, CFG 2 on sigma <= 0.775), the
  couplings of `fmrt reflow --steps 50 --seed S` for noise seeds never used in training or
  evaluation (9100, 9101, ...; the students were trained on 9000/9001 and the 5120 set);
- the students: the rows of `benchmarks/few_step_goal.py` (ROWS) at 1 and 2 steps, each
  sampled from the couplings' own noise and classes, as `fmrt eval` samples (Euler,
  float32, the rows' guidance);
- the couplings' classes are random: every class is cut to the count of the rarest one
  (the first of each, in the couplings' order), so the sets are balanced as the reference is;
- the reference: 1280 real clips per class of data seed 999 (`docs/fd_large_n.py`'s); real
  clips of data seed 4242 (as many per class) give the floor, unpaired; the same figures
  against a second reference (`--ref-seed 5151`) show how far the reference's draw moves them;
- per row: FD of all clips and FD_inf (`frechet_distance_infinity`: stratified by class, 32
  draws, 16 blocks, seed 0, the same design for every row, so the jackknife blocks pair; the
  384-clip pilot below used 8 blocks: 16 give the standard errors twice the replicates);
- the goal: margin = student - 1.25 x teacher (1 step) or 1.10 x (2 steps), on FD and FD_inf,
  se from the paired jackknife (also reported: the independent-sets se, for comparison); met
  reliably when the margin is below 0 by two paired standard errors or more on both, on the
  point estimate when it is below 0 by less. The reference's own draw is outside every error:
  the real row says how large it is.

The pilot (2026-12-03, night): 384 couplings of noise seed 9100 (`fmrt reflow --steps 50 --num
384 --seed 9100`, 1159 s on one thread beside the test suite), scored as above with 8 blocks,
to see whether pairing pays: the margins' paired errors came out 3 to 6 times below the
independent ones (the average student: 0.72-1.31 against 4.2-6.2 FD). Fixed after it, before
any figure of the run: the verdict on the couplings of noise seeds 9101 and 9102 (1536 each,
the two in parallel on one thread each), never looked at before (the pilot's clips, which
were, stay out); the same against a second reference (data seed 5151), reported beside it:

    for s in 9101 9102; do
      OMP_NUM_THREADS=1 fmrt reflow --steps 50 --num 1536 --seed $s --batch-size 64 \
          --device cpu --no-progress --out runs/tc/teacher50_$s.safetensors &
    done; wait
    python docs/fd_paired.py --couplings runs/tc/teacher50_910{1,2}.safetensors \
        --features runs/fd_paired_features.pt --out docs/fd_paired.json --plot docs/fd_paired.png
    python docs/fd_paired.py --couplings runs/tc/teacher50_910{1,2}.safetensors \
        --from-features runs/fd_paired_features.pt --ref-seed 5151 --out docs/fd_paired_ref5151.json

The second look (fixed 2026-12-03, before any of its clips existed): the run above left the
average student inside the two goals by 1.9-2.2 paired se, the teacher's heavy-tailed FD most
of the error, so more teacher clips: noise seeds 9103 and 9104 (1536 each, as above, in
parallel on one thread each). Scored twice: the 3072 new clips alone (an independent replicate,
nothing shared with the first run but the reference), and the verdict: all 6144 clips pooled
(the two runs' balanced sets together, `--from-features` of both feature files; 16 blocks,
everything else as above). The rule stays two paired se on both FD and FD_inf. Looking again
after a borderline first look is a sequential test: the pooled 2-se bar is a little less strict
than it reads, which the note beside the figures says.

    for s in 9103 9104; do ... (as above) ...; done; wait
    python docs/fd_paired.py --couplings runs/tc/teacher50_910{3,4}.safetensors \
        --features runs/fd_paired_9103_features.pt --out docs/fd_paired_9103.json
    python docs/fd_paired.py --couplings runs/tc/teacher50_910{1,2,3,4}.safetensors \
        --from-features runs/fd_paired_features.pt runs/fd_paired_9103_features.pt \
        --out docs/fd_paired_pooled.json --plot docs/fd_paired_pooled.png

The third look, the last on this CPU (fixed 2026-12-04, before any of its clips existed): the
pooled second look left the average student inside both goals by 1.4-2.0 paired se, short of
its bar. One more replicate of the same design and size as each run before: noise seeds 9105
and 9106 (1536 each, as above, in parallel on one thread each), scored alone as above
(docs/fd_paired_9105.json). The verdict is read on the three 3072-clip runs (9101/9102,
9103/9104, 9105/9106), independent replicates of one design: per row and goal, the plain mean
of their margins (equal weights: weights from their own se's would favour the runs whose
heavy-tailed teacher happened to draw well) with se = sqrt(sum of the paired se's squared) / 3
(`--combine`, which reads the three JSON files). Met reliably when the mean margin is below 0
by at least 2.29 se on both FD and FD_inf: Pocock's constant boundary for three looks at a
two-sided 5 % (the looks were not planned as one group-sequential design, so it is an
approximation, and stricter than the 2 se of a single look, as a third look must be); on the
point estimate when below 0 by less. Whatever it shows, the next figure for item 2 comes from a
GPU run of benchmarks/few_step_goal.py, not from more CPU looks.

    for s in 9105 9106; do ... (as above) ...; done; wait
    python docs/fd_paired.py --couplings runs/tc/teacher50_910{5,6}.safetensors \\
        --features runs/fd_paired_9105_features.pt --out docs/fd_paired_9105.json
    python docs/fd_paired.py --combine docs/fd_paired.json docs/fd_paired_9103.json \\
        docs/fd_paired_9105.json --bar 2.29 --out docs/fd_paired_combined.json \\
        --plot docs/fd_paired_combined.png

Writes --out (JSON: every figure, the settings, the seconds each row took) and prints a
markdown table; --features keeps every row's classifier features (a torch file), from which
--from-features redoes every figure without sampling again.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.few_step_goal import GOAL, ROWS, _load_rows, goal_margin  # noqa: E402
from fmrt.checkpoint import atomic_write_json  # noqa: E402
from fmrt.data import NUM_CLASSES  # noqa: E402
from fmrt.eval import (_features_logits, frechet_distance_infinity,  # noqa: E402
                       load_classifier, paired_margin, reference_features)

DRAWS = 32                     # random subsets per size for FD_inf


def balanced_couplings(paths: list[str], per_class: int | None = None) -> dict:
    """The couplings of `paths`, cut to the same count of each class (the rarest class's, or
    `per_class`), class by class, in the files' order within a class: dict(noise, sample,
    cond, per_class)."""
    from fmrt.reflow import load_couplings
    parts = [load_couplings(p) for p in paths]
    if any("cond" not in c for c in parts):
        raise SystemExit("the couplings carry no classes (cond): not a class-conditional teacher")
    cond = torch.cat([c["cond"] for c in parts]).long()
    counts = torch.bincount(cond, minlength=NUM_CLASSES)
    m = int(counts.min()) if per_class is None else per_class
    if m < 1 or int(counts.min()) < m:
        raise SystemExit(f"the couplings hold {counts.tolist()} samples per class: too few for "
                         f"{m} of each")
    idx = torch.cat([(cond == k).nonzero().flatten()[:m] for k in range(NUM_CLASSES)])
    noise = torch.cat([c["noise"] for c in parts]).float()[idx]
    sample = torch.cat([c["sample"] for c in parts]).float()[idx].clamp(-1, 1)
    return dict(noise=noise, sample=sample, cond=cond[idx], per_class=m)


def pooled_features(paths: list[str], couplings: list[str], per_class: int | None):
    """The --features files `paths` and their balanced couplings, pooled in order: (couplings
    dict as `balanced_couplings`'s, kept dict as one --features file's). Each file's set holds
    the same count of every class, so their union does too; `couplings` must be the files'
    couplings lists one after another, and every file must hold the same rows."""
    kept = [torch.load(p) for p in paths]
    if [c for k in kept for c in k["couplings"]] != couplings:
        raise SystemExit(f"{' '.join(paths)} hold couplings "
                         f"{[k['couplings'] for k in kept]}, not --couplings {couplings}")
    if len(kept) == 1 and per_class is not None and kept[0]["per_class"] != per_class:
        raise SystemExit(f"{paths[0]} holds {kept[0]['per_class']} clips a class, not "
                         f"--per-class {per_class}")
    if len(kept) > 1 and per_class is not None:
        raise SystemExit("--per-class applies to one run, not to pooled --from-features")
    if any(sorted(k["features"]) != sorted(kept[0]["features"]) for k in kept):
        raise SystemExit(f"{' '.join(paths)} hold different rows: not one design")
    parts = [balanced_couplings(k["couplings"], k["per_class"]) for k in kept]
    coup = dict(per_class=sum(c["per_class"] for c in parts),
                **{key: torch.cat([c[key] for c in parts]) for key in ("noise", "sample", "cond")})
    rows = [dict(r, seconds=sum(k["rows"][i]["seconds"] for k in kept))
            for i, r in enumerate(kept[0]["rows"])]
    devices = sorted({k["device"] for k in kept})
    return coup, dict(couplings=couplings, per_class=coup["per_class"], rows=rows,
                      device=" + ".join(devices),
                      features={key: torch.cat([k["features"][key] for k in kept])
                                for key in kept[0]["features"]})


def sample_students(coup: dict, device: torch.device, batch_size: int) -> dict:
    """Every student row's clips from the couplings' noise and classes, as classifier features
    (computed by the caller): dict(rows=[dict(row, label, steps, seconds, source)],
    clips={"<row>_<steps>": [N, C, T, H, W]})."""
    from fmrt.sampling import generate_clips
    models = _load_rows(ROOT, device)
    out = dict(rows=[], clips={})
    for row in ROWS[1:]:
        model, meta, guide = models[row.name]
        for steps in row.steps:
            t = time.time()
            parts = []
            for i in range(0, coup["cond"].shape[0], batch_size):
                with torch.no_grad():
                    parts.append(generate_clips(
                        model, meta, coup["cond"][i:i + batch_size], steps=steps,
                        solver="euler", guidance_scale=row.guidance_scale, device=device,
                        dtype=torch.float32, noise=coup["noise"][i:i + batch_size],
                        guide_model=guide).cpu())
            out["clips"][f"{row.name}_{steps}"] = torch.cat(parts)
            out["rows"].append(dict(row=row.name, label=row.label, steps=steps,
                                    seconds=time.time() - t,
                                    source=f"{row.checkpoint}, the couplings' noise"))
            print(f"{row.label} {steps}: sampled in {time.time() - t:.0f} s", flush=True)
    return out


def goal_rows(rows: list[dict]) -> list[dict]:
    """Each student row's goal against the teacher row: ratio and margin on FD and FD_inf,
    with the paired jackknife se and, for comparison, the independent-sets se."""
    teacher = next(r for r in rows if r["row"] == "teacher")
    out = []
    for r in rows:
        if r["row"] in ("teacher", "real") or r["steps"] not in GOAL:
            continue
        k = GOAL[r["steps"]]
        g = dict(row=r["row"], label=r["label"], steps=r["steps"], factor=k)
        for key, se, short in (("fd", "fd_se", "fd"), ("fd_inf", "se", "fd_inf")):
            g[f"ratio_{short}"] = r[key] / teacher[key]
            g[f"margin_{short}"], g[f"margin_{short}_se"] = paired_margin(r, teacher, k, key)
            g[f"margin_{short}_se_independent"] = goal_margin(r[key], r[se], teacher[key],
                                                              teacher[se], k)[1]
        g["met"] = verdict(g, 2.0)
        out.append(g)
    return out


def verdict(goal: dict, bar: float) -> str:
    """"reliably" when the margins on FD and FD_inf are both below 0 by `bar` of their se's or
    more, "on the point estimate" when both are below 0, else "no"."""
    keys = ("fd", "fd_inf")
    if all(goal[f"margin_{s}"] <= -bar * goal[f"margin_{s}_se"] for s in keys):
        return "reliably"
    return "on the point estimate" if all(goal[f"margin_{s}"] < 0 for s in keys) else "no"


def combine(paths: list[str], bar: float) -> dict:
    """The goal over independent runs of this script (the same rows, design and clips a class,
    no coupling file shared): per row and goal, the plain mean of the runs' margins on FD and
    FD_inf, se = sqrt(sum of the runs' paired se's squared) / k, and the verdict at `bar` se.
    Equal weights: weights from the runs' own se's would favour the runs whose heavy-tailed
    teacher happened to draw well."""
    import json
    if len(paths) < 2:
        raise SystemExit("--combine takes two runs or more")
    docs = [json.load(open(p)) for p in paths]
    same = ("blocks", "draws", "ref_seed", "ref_per_class", "per_class")
    shape = [(g["row"], g["steps"], g["factor"]) for g in docs[0]["goal"]]
    for p, d in zip(paths[1:], docs[1:]):
        diff = [k for k in same if d[k] != docs[0][k]]
        if [(g["row"], g["steps"], g["factor"]) for g in d["goal"]] != shape:
            diff.append("rows")
        if diff:
            raise SystemExit(f"{p} differs from {paths[0]} in {', '.join(diff)}: not one design")
    files = [c for d in docs for c in d["couplings"]]
    if len(set(files)) != len(files):
        raise SystemExit("the runs share couplings: not independent replicates")
    k = len(docs)
    goals = []
    for i, first in enumerate(docs[0]["goal"]):
        runs = [d["goal"][i] for d in docs]
        g = {key: first[key] for key in ("row", "label", "steps", "factor")}
        for s in ("fd", "fd_inf"):
            g[f"runs_ratio_{s}"] = [r[f"ratio_{s}"] for r in runs]
            g[f"runs_margin_{s}"] = [r[f"margin_{s}"] for r in runs]
            g[f"runs_margin_{s}_se"] = [r[f"margin_{s}_se"] for r in runs]
            g[f"margin_{s}"] = sum(g[f"runs_margin_{s}"]) / k
            g[f"margin_{s}_se"] = sum(se ** 2 for se in g[f"runs_margin_{s}_se"]) ** 0.5 / k
        g["met"] = verdict(g, bar)
        goals.append(g)
    teacher = [next(r for r in d["rows"] if r["row"] == "teacher") for d in docs]
    return dict(runs=paths, couplings=[d["couplings"] for d in docs], bar=bar,
                num=[d["rows"][0]["num"] for d in docs],
                teacher_fd=[t["fd"] for t in teacher],
                teacher_fd_inf=[t["fd_inf"] for t in teacher], goal=goals)


def combined_table(doc: dict) -> str:
    bar = doc["bar"]
    lines = ["| row | steps | goal | margin on FD, run by run (paired se) | mean (se; in se) "
             "| margin on FD_inf, run by run (paired se) | mean (se; in se) "
             f"| met (bar {bar:g} se) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for g in doc["goal"]:
        cells = []
        for s in ("fd", "fd_inf"):
            cells.append(" / ".join(f"{m:+.2f} ({se:.2f})" for m, se in
                                    zip(g[f"runs_margin_{s}"], g[f"runs_margin_{s}_se"])))
            m, se = g[f"margin_{s}"], g[f"margin_{s}_se"]
            cells.append(f"{m:+.2f} ({se:.2f}; {m / se:+.2f})")
        lines.append(f"| {g['label']} | {g['steps']} | {g['factor']:.2f}x | "
                     f"{' | '.join(cells)} | {g['met']} |")
    return "\n".join(lines)


def table(rows: list[dict], goals: list[dict]) -> str:
    n = rows[0]["num"]
    lines = [f"| row | steps | FD at {n} (se) | FD_inf (se) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['steps'] or '-'} | {r['fd']:.2f} ({r['fd_se']:.2f}) "
                     f"| {r['fd_inf']:.2f} ({r['se']:.2f}) |")
    lines += ["", "| row | steps | goal | on FD: ratio, margin (paired se; independent se) "
              "| on FD_inf: ratio, margin (paired se; independent se) | met |",
              "|---|---:|---:|---:|---:|---|"]
    for g in goals:
        cells = [f"{g[f'ratio_{s}']:.2f}x, {g[f'margin_{s}']:+.2f} ({g[f'margin_{s}_se']:.2f}; "
                 f"{g[f'margin_{s}_se_independent']:.2f})" for s in ("fd", "fd_inf")]
        lines.append(f"| {g['label']} | {g['steps']} | {g['factor']:.2f}x | {cells[0]} | "
                     f"{cells[1]} | {g['met']} |")
    return "\n".join(lines)


def plot(goals: list[dict], path: str, title: str, bar: float = 2.0) -> None:
    """The margins on FD and FD_inf with `bar`-standard-error bars: paired (thick) and, where
    the goals carry them, independent (thin); a combined run's goals also show each run's
    margin (hollow). Left of 0 is inside the goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.55 * len(goals)), dpi=100)
    names = []
    for i, g in enumerate(goals):
        for j, (key, colour) in enumerate((("fd", "tab:blue"), ("fd_inf", "tab:orange"))):
            y = i + (j - 0.5) * 0.3
            m = g[f"margin_{key}"]
            if f"margin_{key}_se_independent" in g:
                ax.errorbar(m, y, xerr=bar * g[f"margin_{key}_se_independent"], fmt="none",
                            ecolor=colour, elinewidth=1, capsize=2, alpha=0.5)
            for r in g.get(f"runs_margin_{key}", []):
                ax.plot(r, y, "o", mfc="none", mec=colour, ms=4, alpha=0.6)
            ax.errorbar(m, y, xerr=bar * g[f"margin_{key}_se"], fmt="o", color=colour, ms=4,
                        elinewidth=3, label=(f"margin on {'FD' if key == 'fd' else 'FD_inf'}"
                                             if i == 0 else None))
        names.append(f"{g['label']}, {g['steps']} step{'s' if g['steps'] > 1 else ''} "
                     f"(goal {g['factor']:.2f}x)")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(goals)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("student FD - goal x teacher FD (left of 0: inside the goal)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python docs/fd_paired.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--couplings", nargs="+",
                   help="the teacher's couplings (fmrt reflow --steps 50), never trained on")
    p.add_argument("--combine", metavar="JSON", nargs="+",
                   help="the --out files of independent runs: their mean margins and the "
                        "verdict at --bar se (samples nothing)")
    p.add_argument("--bar", type=float, default=2.0,
                   help="--combine: standard errors below 0 for 'reliably' (default 2)")
    p.add_argument("--out", required=True, help="JSON with every figure")
    p.add_argument("--features", help="keep every row's features here (torch.save)")
    p.add_argument("--plot", help="PNG: the margins with paired and independent error bars")
    p.add_argument("--from-features", metavar="FILE", nargs="+",
                   help="a --features file of the same couplings: score it, sample nothing; "
                        "several: their runs pooled (--couplings: theirs, in order)")
    p.add_argument("--per-class", type=int, default=None,
                   help="clips per class (default: the rarest class's count in the couplings)")
    p.add_argument("--ref-per-class", type=int, default=1280)
    p.add_argument("--ref-seed", type=int, default=999,
                   help="the reference's data seed (another one: how much its draw moves things)")
    p.add_argument("--draws", type=int, default=DRAWS, help="FD_inf's subsets per size")
    p.add_argument("--blocks", type=int, default=16, help="jackknife blocks")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if bool(args.combine) == bool(args.couplings):
        p.error("give --couplings (a run) or --combine (runs' JSON files), one of the two")
    for path in (args.out, args.plot, None if args.from_features else args.features):
        if path and os.path.exists(path):      # before any sampling: nothing is lost
            raise SystemExit(f"{path} exists: not replaced")
    if args.combine:
        doc = combine(args.combine, args.bar)
        atomic_write_json(args.out, doc)
        if args.plot:
            plot(doc["goal"], args.plot, f"the mean of {len(args.combine)} runs' margins "
                 f"({' + '.join(map(str, doc['num']))} clips a row, paired by noise): bars are "
                 f"{args.bar:g} se, hollow: each run", bar=args.bar)
        print(combined_table(doc))
        return 0
    device = torch.device(args.device)
    clf, training = load_classifier()
    clf = clf.to(device)
    if args.from_features:
        coup, kept = pooled_features(args.from_features, args.couplings, args.per_class)
        m = coup["per_class"]
    else:
        coup = balanced_couplings(args.couplings, args.per_class)
        m = coup["per_class"]
        students = sample_students(coup, device, args.batch_size)
        kept = dict(couplings=args.couplings, per_class=m, rows=students["rows"],
                    device=str(device) if device.type != "cpu" else
                    f"cpu ({platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads)",
                    features={k: _features_logits(clf, v)[0]
                              for k, v in students["clips"].items()})
        if args.features:
            torch.save(kept, args.features)
    labels = coup["cond"]
    ref_big = reference_features(clf, torch.arange(NUM_CLASSES).repeat_interleave(
        args.ref_per_class), frames=training["frames"], size=training["size"],
        data_seed=args.ref_seed)
    pools = [(dict(row="real", label="real clips (data seed 4242)", steps=None,
                   source="ShapesVideo data seed 4242"),
              reference_features(clf, labels, frames=training["frames"],
                                 size=training["size"], data_seed=4242)),
             (dict(row="teacher", label=ROWS[0].label, steps=50,
                   source="couplings " + " ".join(args.couplings)),
              _features_logits(clf, coup["sample"])[0])]
    pools += [(r, kept["features"][f"{r['row']}_{r['steps']}"]) for r in kept["rows"]]
    rows = []
    for meta, f in pools:
        inf = frechet_distance_infinity(f, ref_big, labels=labels, draws=args.draws,
                                        blocks=args.blocks)
        rows.append(dict(meta, num=int(f.shape[0]), **inf))
        print(f"{meta['label']} {meta['steps'] or '-'}: FD {inf['fd']:.3f} (se "
              f"{inf['fd_se']:.3f}), FD_inf {inf['fd_inf']:.3f} (se {inf['se']:.3f})",
              flush=True)
    goals = goal_rows(rows)
    atomic_write_json(args.out, dict(
        device=kept["device"], couplings=args.couplings, per_class=m,
        ref_per_class=args.ref_per_class, ref_seed=args.ref_seed, draws=args.draws,
        blocks=args.blocks, rows=rows, goal=goals))
    if args.plot:
        plot(goals, args.plot, f"{rows[0]['num']} clips a row, paired by noise: bars are 2 se, "
                               f"thick paired, thin independent")
    print(table(rows, goals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
