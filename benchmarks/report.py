"""Turn a pytest-benchmark JSON of this suite into the README's performance tables.

    python benchmarks/report.py benchmarks/results/H100_ops.json H100_models.json    # print
    python benchmarks/report.py benchmarks/results/H100_*.json --readme README.md

The first table has one row per (op, case, dtype): each provider's median device time, fmrt's GB/s
and % of the copy bandwidth measured in the same run, fmrt's speed-up over every other provider
and its synced per-call latency (see benchmarks/conftest.py). The second checks the performance
goals of the issues (`GOALS`): met, short (with the measured figure), or not measured; the
">= 64 MB" goals judge the largest tensor of the op (`tensor_bytes`). `--readme` rewrites the text between `<!-- bench:start -->` and
`<!-- bench:end -->` in the given file.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
MB64 = 64 << 20


@dataclass(frozen=True)
class Row:
    """One timed benchmark: extra_info of `benchmarks/conftest.py:run_bench` plus the median."""
    op: str
    case: str
    dtype: str
    provider: str
    ms: float
    nbytes: int
    gbps: Optional[float]
    pct_copy_bw: Optional[float]
    device: str
    extra: dict


def load(path: str | Path) -> tuple[dict, list[Row]]:
    """(header, rows) of a pytest-benchmark JSON written with `--benchmark-json`, or of the
    JSON-lines file the suite streams to `$FMRT_BENCH_JSONL` (one benchmark per line)."""
    text = Path(path).read_text()
    if str(path).endswith(".jsonl"):
        data = dict(benchmarks=[json.loads(line) for line in text.splitlines() if line.strip()])
    else:
        data = json.loads(text)
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if "op" not in info or "provider" not in info:
            continue
        ms = info.get("ms")
        if ms is None:
            ms = b["stats"]["median"] * 1e3
        rows.append(Row(op=info.pop("op"), case=str(info.pop("case", "")),
                        dtype=str(info.pop("dtype", "")), provider=info.pop("provider"),
                        ms=float(ms), nbytes=int(info.pop("bytes", 0) or 0),
                        gbps=info.pop("gbps", None), pct_copy_bw=info.pop("pct_copy_bw", None),
                        device=str(info.pop("device", "?")), extra=info))
    devices = sorted({r.device for r in rows})
    header = dict(devices=devices, datetime=data.get("datetime", "?"),
                  commit=(data.get("commit_info") or {}).get("id", "?"),
                  torch=_version(data, "torch"), triton=_version(data, "triton"))
    return header, rows


def _version(data: dict, name: str) -> str:
    for b in data.get("benchmarks", []):
        v = (b.get("extra_info") or {}).get(f"{name}_version")
        if v:
            return str(v)
    return "?"


def groups(rows: list[Row]) -> dict[tuple[str, str, str], dict[str, Row]]:
    """{(op, case, dtype): {provider: row}} in the order the rows came."""
    out: dict[tuple[str, str, str], dict[str, Row]] = {}
    for r in rows:
        out.setdefault((r.op, r.case, r.dtype), {})[r.provider] = r
    return out


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def results_table(rows: list[Row]) -> str:
    """Markdown: op | case | dtype | MiB | each provider's ms (device time; TFLOP/s where
    recorded) | fmrt's GB/s | % copy | speed-ups | fmrt's synced per-call latency."""
    lines = ["| op | case | dtype | MiB moved | ms by provider | fmrt GB/s | fmrt % copy BW "
             "| fmrt speed-up | fmrt latency ms |", "|---|---|---|---:|---|---:|---:|---|---:|"]
    for (op, case, dtype), by in groups(rows).items():
        times = ", ".join(f"{p} {r.ms:.3f}" + (f" ({r.extra['tflops']:.0f} TFLOP/s)"
                                                if r.extra.get("tflops") else "")
                          for p, r in by.items())
        f = by.get("fmrt")
        ups = ", ".join(f"{r.ms / f.ms:.2f}x vs {p}" for p, r in by.items()
                        if f is not None and p != "fmrt" and f.ms > 0)
        mb = max(r.nbytes for r in by.values()) / 2**20
        lines.append(f"| {op} | {case} | {dtype} | {_fmt(mb, '.1f') if mb else '-'} | {times} "
                     f"| {_fmt(f.gbps if f else None, '.0f')} "
                     f"| {_fmt(f.pct_copy_bw if f else None, '.0f')} | {ups or '-'} "
                     f"| {_fmt(f.extra.get('latency_ms') if f else None, '.3f')} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Goal:
    """A performance goal: `measure(providers) -> value or None` compared to `target` with `cmp`
    (">=" or "<="), over every group whose op matches `op` (a regex) and `where(row)` holds."""
    issue: int
    text: str
    op: str
    measure: Callable[[dict[str, Row]], Optional[float]]
    cmp: str
    target: float
    unit: str = "x"
    where: Callable[[Row], bool] = lambda r: True
    partner: Optional[str] = None  # another op whose rows of the same (case, dtype) join `by`
                                   # as "<partner>:<provider>"


def _ratio(base: str, of: str = "fmrt") -> Callable[[dict[str, Row]], Optional[float]]:
    """How many times faster `of` is than `base` (base ms / of ms)."""
    def m(by):
        return by[base].ms / by[of].ms if base in by and of in by and by[of].ms > 0 else None
    return m


def _pct(by):
    f = by.get("fmrt")
    return f.pct_copy_bw if f is not None else None


def _auto_vs_best(by):
    if "auto" not in by:
        return None
    others = [r.ms for p, r in by.items() if p != "auto"]
    return by["auto"].ms / min(others) if others else None


def _fwd_vs_best_peer(by):
    peers = [r.ms for p, r in by.items() if p in ("sdpa_flash", "flash_attn")]
    return min(peers) / by["fmrt"].ms if peers and "fmrt" in by else None


def _big(r: Row) -> bool:
    """The ">= 64 MB" goals judge the op's largest tensor (extra_info `tensor_bytes`), not the
    bytes it moves: a 19 MB latent moves 76 MB through a guided step and still sits in an
    H200's 60 MB L2. Rows without `tensor_bytes` (older JSON) are not judged."""
    return int(r.extra.get("tensor_bytes") or 0) >= MB64


def _jvp_vs_fa2_forward(by):
    """fmrt's JVP (primal + tangent, torch.func.jvp over ops.flash_attention) TFLOP/s over the
    best FA2-class forward's TFLOP/s (SDPA's flash backend, flash-attn) at the same case: the
    partner rows arrive as "flash_attention_fwd:<provider>" (Goal.partner)."""
    f = by.get("fmrt")
    peers = [by[p].extra.get("tflops") for p in ("flash_attention_fwd:sdpa_flash",
                                                   "flash_attention_fwd:flash_attn") if p in by]
    peers = [t for t in peers if t]
    if f is None or not f.extra.get("tflops") or not peers:
        return None
    return f.extra["tflops"] / max(peers)


GOALS = (
    Goal(3, "add_noise >= 90% of copy BW at >= 64 MB", r"add_noise$", _pct, ">=", 90, "%", _big),
    Goal(3, "add_noise >= 3x eager at >= 64 MB", r"add_noise$", _ratio("eager"), ">=", 3,
         where=_big),
    Goal(3, "add_noise >= 1.2x compile at >= 64 MB", r"add_noise$", _ratio("compile"), ">=", 1.2,
         where=_big),
    Goal(3, "add_noise + loss fwd+bwd >= 3x eager at >= 64 MB", r"add_noise\+loss_fwd_bwd",
         _ratio("eager"), ">=", 3, where=_big),
    Goal(3, "add_noise + loss fwd+bwd >= 1.2x compile at >= 64 MB", r"add_noise\+loss_fwd_bwd",
         _ratio("compile"), ">=", 1.2, where=_big),
    Goal(4, "guided step >= 90% of copy BW at >= 64 MB", r"guided_euler_step$", _pct, ">=", 90,
         "%", _big),
    Goal(4, "guided step >= 3x eager at >= 64 MB", r"guided_euler_step$", _ratio("eager"), ">=", 3,
         where=_big),
    Goal(4, "guided step >= 1.2x compile at >= 64 MB", r"guided_euler_step$", _ratio("compile"),
         ">=", 1.2, where=_big),
    Goal(4, "sampling-loop host overhead >= 5x lower than diffusers'", r"sampling_loop$",
         _ratio("diffusers"), ">=", 5),
    Goal(5, "qk_norm_rope fwd+bwd >= 5x eager (diffusers' math)", r"qk_norm_rope_fwd_bwd",
         _ratio("eager"), ">=", 5),
    Goal(5, "qk_norm_rope fwd+bwd >= 1.5x compile", r"qk_norm_rope_fwd_bwd", _ratio("compile"),
         ">=", 1.5),
    Goal(5, "qk_norm_rope fwd+bwd >= 70% of copy BW", r"qk_norm_rope_fwd_bwd", _pct, ">=", 70, "%"),
    Goal(5, "attention(auto) within 5% of the best installed backend", r"attention$",
         _auto_vs_best, "<=", 1.05, "x of best"),
    Goal(6, "DiT CFG sampling step >= 1.15x the reference path", r"dit$", _ratio("reference"),
         ">=", 1.15, where=lambda r: r.case.startswith("cfg_sample_step")),
    Goal(6, "DiT CFG sampling step >= 1.15x diffusers", r"dit$", _ratio("diffusers"), ">=", 1.15,
         where=lambda r: r.case.startswith("cfg_sample_step")),
    Goal(6, "DiT training step >= 1.1x the reference path", r"dit$", _ratio("reference"), ">=", 1.1,
         where=lambda r: r.case.startswith("train_step")),
    Goal(6, "DiT training step >= 1.1x diffusers", r"dit$", _ratio("diffusers"), ">=", 1.1,
         where=lambda r: r.case.startswith("train_step")),
    Goal(7, "JVP attention >= 4x the math backend under torch.func.jvp", r"flash_attention_jvp$",
         _ratio("math"), ">=", 4),
    Goal(7, "JVP attention (primal + tangent) >= 60% of the FA2 forward's TFLOP/s",
         r"flash_attention_jvp$", _jvp_vs_fa2_forward, ">=", 0.6, "x of FA2 fwd",
         partner="flash_attention_fwd"),
    Goal(7, "flash attention forward >= 60% of the best flash peer's speed",
         r"flash_attention_fwd$", _fwd_vs_best_peer, ">=", 0.6, "x of best"),
    Goal(7, "MeanFlow training step <= 2.5x a flow-matching step", r"meanflow_step$",
         lambda by: (by["meanflow"].ms / by["flow_matching"].ms
                     if "meanflow" in by and "flow_matching" in by else None), "<=", 2.5),
    Goal(8, "diffusers Wan CFG step with accelerate_wan >= 1.15x stock diffusers",
         r"wan_diffusers_cfg_step$", _ratio("diffusers"), ">=", 1.15),
)


def check_goals(rows: list[Row], goals=GOALS) -> list[tuple[Goal, str, str]]:
    """[(goal, status, detail)]: status "met", "short" or "not measured"; detail lists each
    matching (case, dtype) with its value."""
    out = []
    gs = groups(rows)
    for goal in goals:
        vals = []
        for (op, case, dtype), by in gs.items():
            if not re.fullmatch(goal.op, op) or not all(goal.where(r) for r in by.values()):
                continue
            if goal.partner:
                by = {**by, **{f"{goal.partner}:{p}": r
                               for p, r in gs.get((goal.partner, case, dtype), {}).items()}}
            v = goal.measure(by)
            if v is not None:
                vals.append((case, dtype, v))
        if not vals:
            out.append((goal, "not measured", ""))
            continue
        ok = [(v >= goal.target) if goal.cmp == ">=" else (v <= goal.target) for _, _, v in vals]
        unit = "%" if goal.unit == "%" else goal.unit
        detail = "; ".join(f"{c} {d}: {v:.2f}{unit}" + ("" if k else " (short)")
                           for (c, d, v), k in zip(vals, ok))
        out.append((goal, "met" if all(ok) else "short", detail))
    return out


def goals_table(rows: list[Row]) -> str:
    lines = ["| issue | goal | status | measured |", "|---:|---|---|---|"]
    for goal, status, detail in check_goals(rows):
        lines.append(f"| #{goal.issue} | {goal.text} | {status} | {detail or '-'} |")
    return "\n".join(lines)


def report(paths, command: str) -> str:
    """The markdown of one or more JSON files (e.g. the phases of benchmarks/run_gpu.sh)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows, devices, runs = [], set(), []
    for path in paths:
        header, part = load(path)
        rows += part
        devices.update(header["devices"])
        commit = header["commit"]   # run_gpu.sh runs from a copy without .git: "unversioned"
        commit = f"commit `{commit[:10]}`, " if commit not in ("?", "unversioned") else ""
        runs.append(f"`{Path(path).name}` ({header['datetime']}, {commit}torch "
                    f"{header['torch']}, triton {header['triton']})")
    return "\n".join([
        f"Device: **{', '.join(sorted(devices)) or '?'}**. Runs: {'; '.join(runs)}.",
        f"Reproduce: `{command}`.",
        "",
        results_table(rows),
        "",
        "Performance goals:",
        "",
        goals_table(rows),
    ])


def write_readme(readme: str | Path, text: str) -> None:
    """Replace the text between START and END in `readme` (both markers must be there)."""
    p = Path(readme)
    src = p.read_text()
    i, j = src.find(START), src.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{readme} has no {START} ... {END} block")
    p.write_text(src[:i + len(START)] + "\n" + text + "\n" + src[j:])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json) files")
    ap.add_argument("--readme",
                    help="rewrite this file's bench:start/end block instead of printing")
    ap.add_argument("--command", default="bash benchmarks/run_gpu.sh ops; bash benchmarks/"
                    "run_gpu.sh models  (on the GPU machine, after benchmarks/gpu_wheels.sh)",
                    help="the command that reproduces the JSON, quoted in the report")
    args = ap.parse_args(argv)
    text = report(args.json, args.command)
    if args.readme:
        write_readme(args.readme, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
