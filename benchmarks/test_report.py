"""benchmarks/report.py: on a JSON the suite really wrote (CPU, a few tiny cases) and on
hand-made JSON whose goal verdicts are known."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]


def _bench(op, case, provider, ms, nbytes=0, pct=None, dtype="bfloat16", **extra):
    info = dict(op=op, case=case, dtype=dtype, provider=provider, bytes=nbytes, device="GPU X",
                ms=ms, torch_version="2.11", triton_version="3.6", **extra)
    if pct is not None:
        info.update(gbps=nbytes / (ms * 1e-3) / 1e9, pct_copy_bw=pct)
    return dict(name=f"{op}[{case}-{provider}]", extra_info=info, stats=dict(median=ms / 1e3))


def _write(tmp_path, benches):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(dict(datetime="2026-11-23T10:00:00", commit_info=dict(id="abc123def0"),
                                 benchmarks=benches)))
    return p


def _verdicts(path):
    _, rows = report.load(path)
    return {g.text: (status, detail) for g, status, detail in report.check_goals(rows)}


def test_goal_verdicts(tmp_path):
    big, small = 100 << 20, 1 << 20
    p = _write(tmp_path, [
        _bench("add_noise", "wan1.3b", "fmrt", 1.0, big, pct=92.0),
        _bench("add_noise", "wan1.3b", "eager", 4.0, big, pct=23.0),
        _bench("add_noise", "wan1.3b", "compile", 1.1, big, pct=84.0),
        _bench("add_noise", "tiny", "fmrt", 1.0, small, pct=10.0),   # < 64 MB: not judged
        _bench("attention", "wan1.3b", "auto", 2.0, tflops=350.4),
        _bench("attention", "wan1.3b", "sdpa", 1.8),
        _bench("sampling_loop", "host", "fmrt", 1.0),
        _bench("sampling_loop", "host", "diffusers", 6.0),
    ])
    v = _verdicts(p)
    assert v["add_noise >= 90% of copy BW at >= 64 MB"] == ("met", "wan1.3b bfloat16: 92.00%")
    assert v["add_noise >= 3x eager at >= 64 MB"][0] == "met"
    status, detail = v["add_noise >= 1.2x compile at >= 64 MB"]
    assert status == "short" and "1.10x (short)" in detail
    assert v["attention(auto) within 5% of the best installed backend"][0] == "short"
    assert v["sampling-loop host overhead >= 5x lower than diffusers'"][0] == "met"
    assert v["qk_norm_rope fwd+bwd >= 5x eager (diffusers' math)"] == ("not measured", "")

    text = report.report(p, "bash benchmarks/run_gpu.sh")
    assert "Device: **GPU X**" in text and "abc123def0" in text and "torch 2.11" in text
    assert "auto 2.000 (350 TFLOP/s), sdpa 1.800" in text
    assert "| add_noise | wan1.3b | bfloat16 | 100.0 | fmrt 1.000, eager 4.000, compile 1.100 " \
           "| 105 | 92 | 4.00x vs eager, 1.10x vs compile |" in text


def test_write_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\nrest\n")
    report.write_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{report.START}\nnew table\n{report.END}\nrest\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        report.write_readme(tmp_path / "bare.md", "x")


def test_report_on_a_real_run(tmp_path):
    """The suite's own JSON (two tiny CPU cases) goes through the script's command line."""
    out = tmp_path / "cpu.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "benchmarks/bench_training.py", "-k", "test_bench_add_noise and wan_tiny "
                    "and float32", "--benchmark-enable", f"--benchmark-json={out}"],
                   cwd=ROOT, check=True, capture_output=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    subprocess.run([sys.executable, "benchmarks/report.py", str(out), "--readme", str(readme)],
                   cwd=ROOT, check=True)
    text = readme.read_text()
    assert "Device: **cpu**" in text
    assert "| add_noise | wan_tiny | float32 |" in text and "x vs eager" in text
    # tiny CPU shapes never satisfy a >= 64 MB goal: they are reported as not measured
    assert "| #3 | add_noise >= 90% of copy BW at >= 64 MB | not measured | - |" in text


def test_several_files_merge(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir(), b.mkdir()
    pa = _write(a, [_bench("dit", "cfg_sample_step:x", "fmrt", 1.0),
                    _bench("dit", "cfg_sample_step:x", "diffusers", 1.3)])
    pb = _write(b, [_bench("meanflow_step", "train_step:x", "flow_matching", 1.0),
                    _bench("meanflow_step", "train_step:x", "meanflow", 2.6)])
    text = report.report([pa, pb], "cmd")
    assert text.count("`r.json`") == 2
    _, rows_a = report.load(pa)
    _, rows_b = report.load(pb)
    v = {g.text: s for g, s, _ in report.check_goals(rows_a + rows_b)}
    assert v["DiT CFG sampling step >= 1.15x diffusers"] == "met"
    assert v["MeanFlow training step <= 2.5x a flow-matching step"] == "short"
    assert v["DiT training step >= 1.1x diffusers"] == "not measured"
