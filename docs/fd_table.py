"""FD per noise seed against a teacher, as a markdown table: item 2's goal seed by seed.

    python docs/fd_table.py [--summary] TEACHER=EVAL.json[,EVAL.json ...] LABEL=EVAL.json[,...] ...

(EVAL.json@SEED names the seed of a one-seed file written before `fmrt eval --json` recorded it.)

The first LABEL=files is the teacher; it must hold one (steps, guidance) setting. Every other
label gets a row per (steps, guidance) setting in its `fmrt eval --json` files (read as
`docs/fd_over_seeds.py` reads them), over the seeds the teacher has: FD and its ratio to the
teacher's FD at that seed, then the mean FD over those seeds, the ratio of the means, at how
many seeds the row is within the goal (1 step: <= 1.25x the teacher, 2 steps: <= 1.10x; other
step counts: no goal, "-"), and the goal margin: the mean over seeds of FD - goal x the
teacher's FD (negative: within the goal on the mean) with its standard error over seeds in
brackets (the seeds' sample standard deviation / sqrt(n); "-" with one seed), so a margin
smaller than about twice its error is not a verdict. A row missing a seed the teacher has stops
with an error. `--summary` leaves out the per-seed columns (for many seeds).
"""
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fd_over_seeds import series  # noqa: E402

GOAL = {1: 1.25, 2: 1.10}


def read(files: list) -> dict:
    """`series` of the files; a file named as PATH@SEED is a one-seed file whose rows lack it."""
    plain = [f for f in files if "@" not in f]
    out = series(plain) if plain else {}
    for f in files:
        if "@" not in f:
            continue
        path, seed = f.rsplit("@", 1)
        doc = json.load(open(path))
        recorded = {r.get("seed") for r in doc["results"]} | set(doc.get("seeds") or [])
        if recorded - {None} and recorded - {None} != {int(seed)}:
            raise SystemExit(f"{path} records seed(s) {sorted(recorded - {None})}, not {seed}")
        for r in doc["results"]:
            if r["steps"]:
                out.setdefault((r["steps"], r["guidance_scale"]), {})[int(seed)] = r["fd"]
    return out


def margin(diffs: list) -> str:
    """'mean (standard error)' of per-seed differences; '-' for the error of a single seed."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return f"{mean:+.2f} (-)"
    return f"{mean:+.2f} ({statistics.stdev(diffs) / math.sqrt(n):.2f})"


def table(specs: list, per_seed: bool = True) -> str:
    """The markdown table of `specs` (LABEL=files, the teacher first); without `per_seed`, only
    the columns from "mean" on (for many seeds)."""
    parsed = []
    for spec in specs:
        if "=" not in spec:
            raise SystemExit(f"expected LABEL=EVAL.json[,EVAL.json ...], got {spec!r}")
        label, files = spec.split("=", 1)
        parsed.append((label, read(files.split(","))))
    (tlabel, tseries), rows = parsed[0], parsed[1:]
    if len(tseries) != 1:
        raise SystemExit(f"the teacher {tlabel!r} must have one (steps, guidance) setting, "
                         f"got {sorted(tseries)}")
    (tsteps, tscale), teacher = next(iter(tseries.items()))
    seeds = sorted(teacher)
    tmean = sum(teacher.values()) / len(seeds)
    shown = seeds if per_seed else []
    head = ["", *[f"seed {s}" for s in shown], "mean", "mean / teacher", "seeds in goal",
            "goal margin (se)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    lines.append("| " + " | ".join([f"{tlabel} ({tsteps} steps, guidance {tscale:g})",
                                    *[f"{teacher[s]:.2f}" for s in shown], f"{tmean:.2f}",
                                    "1.00x", "-", "-"]) + " |")
    for label, ser in rows:
        for (steps, scale), fds in sorted(ser.items()):
            missing = [s for s in seeds if s not in fds]
            if missing:
                raise SystemExit(f"{label}, {steps} steps: no FD at seed(s) {missing}")
            ratios = [fds[s] / teacher[s] for s in seeds]
            mean = sum(fds[s] for s in seeds) / len(seeds)
            goal = GOAL.get(steps)
            inside = "-" if goal is None else f"{sum(r <= goal for r in ratios)} of {len(seeds)}"
            slack = "-" if goal is None else margin([fds[s] - goal * teacher[s] for s in seeds])
            cells = [f"{fds[s]:.2f} ({r:.2f}x)" for s, r in zip(seeds, ratios)] if per_seed else []
            name = f"{label} ({steps} step{'s' if steps > 1 else ''}, guidance {scale:g})"
            lines.append("| " + " | ".join([name, *cells, f"{mean:.2f}", f"{mean / tmean:.2f}x",
                                            inside, slack]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    summary = "--summary" in sys.argv[1:]
    specs = [a for a in sys.argv[1:] if a != "--summary"]
    if len(specs) < 2:
        raise SystemExit(__doc__)
    print(table(specs, per_seed=not summary))
