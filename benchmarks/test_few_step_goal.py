"""benchmarks/few_step_goal.py and its run_gpu.sh phase, as a dry run on the CPU: the files a
device run brings back, its figures equal to `fmrt eval`'s, the seed list and stopping rule."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import few_step_goal as fsg
from fmrt.cli import main as fmrt_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seed_list_and_stopping_rule():
    assert fsg.seed_list(["13-16", "2", "14"]) == [13, 14, 15, 16, 2]
    for bad in (["x"], ["5-3"], ["-1"]):
        with pytest.raises(SystemExit, match="--seeds"):
            fsg.seed_list(bad)
    assert fsg.time_for_another(0.0, 0.0, 0.0)               # the first seed always runs
    assert fsg.time_for_another(200.0, 100.0, 300.0)
    assert not fsg.time_for_another(200.5, 100.0, 300.0)
    assert fsg.time_for_another(1e9, 1e9, None)
    with pytest.raises(SystemExit, match="both"):
        fsg.main(["--out", "x", "--seeds", "0-2", "--check-seeds", "1"])


def test_rows_name_committed_models_and_cpu_evaluations():
    """Every row's weights are in the checkout, and its committed CPU evaluation at check seed 0
    holds the row's setting (what the device run's check compares with)."""
    for row in fsg.ROWS:
        for path in (row.checkpoint, row.guide):
            assert path is None or os.path.isfile(os.path.join(ROOT, path)), path
        for steps in row.steps:
            assert fsg._cpu_figure(ROOT, row, steps, 0) is not None, (row.name, steps)


def test_fewstep_phase_dry_run_matches_fmrt_eval(tmp_path):
    """`bash benchmarks/run_gpu.sh fewstep` without CUDA: 60 clips, a 2-step teacher, check seed
    0 and verdict seed 13. Two files come back; the students' FDs are those `fmrt eval` gives
    for the same model, steps, guidance and seed; the pooled verdict (one seed here) scores
    every row against the large reference; --split writes one eval JSON per row."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["OUT"] = str(tmp_path / "out")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    res = subprocess.run(["bash", "benchmarks/run_gpu.sh", "fewstep"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    out = tmp_path / "out" / "cpu_fewstep"
    assert sorted(p.name for p in out.iterdir()) == ["few_step.json", "few_step.md"]
    docs = json.loads((out / "few_step.json").read_text())
    assert sorted(docs) == sorted([r.name for r in fsg.ROWS]
                                  + ["check_" + r.name for r in fsg.ROWS] + ["pooled"])
    pooled = docs.pop("pooled")
    assert pooled["seeds"] == [13] and pooled["ref_per_class"] == 32
    assert [(r["row"], r["steps"]) for r in pooled["rows"]] == [("real", None)] + [
        (r.name, s) for i, r in enumerate(fsg.ROWS) for s in ((2,) if i == 0 else r.steps)]
    assert [r["num"] for r in pooled["rows"]] == [240] + [60] * 7
    teacher = pooled["rows"][1]
    for r in pooled["rows"][2:]:      # FD of the one seed's clips against the 192 real clips
        assert r["margin_fd"] == pytest.approx(r["fd"] - r["factor"] * teacher["fd"])
        assert r["factor"] == {1: 1.25, 2: 1.10}[r["steps"]] and r["margin_fd_inf_se"] > 0
        assert r["margin_fd_se_paired"] > 0 and r["margin_fd_inf_se_paired"] > 0
    assert all(docs[r.name]["seeds"] == [13] and docs["check_" + r.name]["seeds"] == [0]
               for r in fsg.ROWS)
    md = (out / "few_step.md").read_text()
    assert "| teacher (2 steps, guidance 2) |" in md and "1 finished: 13" in md
    assert "pooled, against 192 real clips" in md
    assert md.count(" step, guidance ") + md.count(" steps, guidance ") == 1 + 6

    # two of the rows, one step count each (a guide model at 1 step, guidance 1 at 2 steps)
    for name, extra, scale, steps in (("reflow_v3_cfg775", ["--guide-model",
                                       "docs/models/reflow_dit_v3_5120.safetensors"], 2.0, 1),
                                      ("reflow_v3_agd_soup", [], 1.0, 2)):
        row = next(r for r in fsg.ROWS if r.name == name)
        js = tmp_path / f"{name}.json"
        assert fmrt_main(["eval", "--checkpoint", row.checkpoint, "--steps", str(steps),
                          "--guidance-scale", str(scale), "--num-per-class", "10", "--seed", "13",
                          "--no-progress", "--json", str(js), *extra]) == 0
        want = [r["fd"] for r in json.loads(js.read_text())["results"] if r["steps"] == steps]
        got = [r["fd"] for r in docs[name]["results"] if r["steps"] == steps]
        assert len(want) == 1 and got == pytest.approx(want, rel=1e-5), name

    written = fsg.split(str(out / "few_step.json"), str(tmp_path / "docs"))
    assert len(written) == 2 * len(fsg.ROWS)
    names = {os.path.basename(w) for w in written}
    assert "quality_default_dit_50_CPU_seeds13-13.json" in names
    assert "quality_reflow_v3_agd_soup_check_CPU_seeds0-0.json" in names
    with pytest.raises(SystemExit, match="not replaced"):
        fsg.split(str(out / "few_step.json"), str(tmp_path / "docs"))
