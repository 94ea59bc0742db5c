"""benchmarks/report.py: on a JSON the suite really wrote (CPU, a few tiny cases) and on
hand-made JSON whose goal verdicts are known."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]


def _outer_env(**extra) -> dict:
    """This process's environment for a pytest run of its own, without pytest-xdist's worker
    variables: a child that inherits PYTEST_XDIST_WORKER takes itself for an xdist worker, and
    pytest-benchmark then times nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return dict(env, **extra)


def _bench(op, case, provider, ms, nbytes=0, pct=None, dtype="bfloat16", tensor_bytes=None,
           **extra):
    if tensor_bytes is None:     # a 3-tensor op (add_noise: x0 in, x_t and target out)
        tensor_bytes = nbytes // 3
    info = dict(op=op, case=case, dtype=dtype, provider=provider, bytes=nbytes, device="GPU X",
                ms=ms, torch_version="2.11", triton_version="3.6", tensor_bytes=tensor_bytes,
                **extra)
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
    big, small = 300 << 20, 3 << 20
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
    assert "| add_noise | wan1.3b | bfloat16 | 300.0 | fmrt 1.000, eager 4.000, compile 1.100 " \
           "| 315 | 92 | 4.00x vs eager, 1.10x vs compile | - |" in text


def test_big_means_a_big_tensor_not_many_bytes_moved(tmp_path):
    mb = 1 << 20
    p = _write(tmp_path, [   # 19 MB latents: 76 MB moved, still L2-resident on an H200
        _bench("guided_euler_step", "wan14b_720p", "fmrt", 1.0, 76 * mb, pct=50.0,
               tensor_bytes=19 * mb),
        _bench("guided_euler_step", "wan14b_720p", "eager", 2.0, 76 * mb, tensor_bytes=19 * mb),
        _bench("add_noise+loss_fwd_bwd", "tiny", "fmrt", 1.0, 7 * mb, tensor_bytes=mb),
        _bench("add_noise+loss_fwd_bwd", "tiny", "eager", 1.5, 7 * mb, tensor_bytes=mb),
    ])
    v = _verdicts(p)
    assert v["guided step >= 90% of copy BW at >= 64 MB"] == ("not measured", "")
    assert v["guided step >= 3x eager at >= 64 MB"] == ("not measured", "")
    assert v["add_noise + loss fwd+bwd >= 3x eager at >= 64 MB"] == ("not measured", "")
    p = _write(tmp_path, [
        _bench("guided_euler_step", "b8", "fmrt", 1.0, 620 * mb, pct=91.0, tensor_bytes=155 * mb),
        _bench("guided_euler_step", "b8", "eager", 3.5, 620 * mb, tensor_bytes=155 * mb),
        _bench("add_noise+loss_fwd_bwd", "b8", "fmrt", 1.0, 7 * 155 * mb, tensor_bytes=155 * mb),
        _bench("add_noise+loss_fwd_bwd", "b8", "eager", 2.5, 7 * 155 * mb, tensor_bytes=155 * mb),
    ])
    v = _verdicts(p)
    assert v["guided step >= 90% of copy BW at >= 64 MB"] == ("met", "b8 bfloat16: 91.00%")
    assert v["guided step >= 3x eager at >= 64 MB"][0] == "met"
    assert v["add_noise + loss fwd+bwd >= 3x eager at >= 64 MB"] == \
        ("short", "b8 bfloat16: 2.50x (short)")


def test_jvp_against_the_fa2_forward(tmp_path):
    def rows(jvp_tflops):
        return [_bench("flash_attention_jvp", "s4096_d128", "fmrt", 1.0, tflops=jvp_tflops),
                _bench("flash_attention_jvp", "s4096_d128", "math", 9.0, tflops=30.0),
                _bench("flash_attention_fwd", "s4096_d128", "sdpa_flash", 0.2, tflops=400.0),
                _bench("flash_attention_fwd", "s4096_d128", "fmrt", 0.3, tflops=270.0),
                _bench("flash_attention_fwd", "s4096_d64", "sdpa_flash", 0.1, tflops=350.0)]
    goal = "JVP attention (primal + tangent) >= 60% of the FA2 forward's TFLOP/s"
    assert _verdicts(_write(tmp_path, rows(260.0)))[goal] == \
        ("met", "s4096_d128 bfloat16: 0.65x of FA2 fwd")
    assert _verdicts(_write(tmp_path, rows(200.0)))[goal][0] == "short"
    # no FA2-class forward in the run: not measured (never judged against fmrt's own forward)
    only = [r for r in rows(260.0) if r["extra_info"]["provider"] != "sdpa_flash"]
    assert _verdicts(_write(tmp_path, only))[goal] == ("not measured", "")


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
                   cwd=ROOT, check=True, capture_output=True, env=_outer_env())
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    subprocess.run([sys.executable, "benchmarks/report.py", str(out), "--readme", str(readme)],
                   cwd=ROOT, check=True)
    text = readme.read_text()
    assert "Device: **cpu**" in text
    assert "| add_noise | wan_tiny | float32 |" in text and "x vs eager" in text
    # tiny CPU shapes never satisfy a >= 64 MB goal: they are reported as not measured
    assert "| #3 | add_noise >= 90% of copy BW at >= 64 MB | not measured | - |" in text


def test_suite_records_the_bytes_each_goal_counts(tmp_path):
    """The suite's own rows (CPU, tiny): bytes moved as the goals count them (sft_step 7 N e,
    q/k norm + RoPE fwd+bwd 10 N e + the tables twice, guided step 4 N e), the tensor size the
    ">= 64 MB" goals judge, and both times (device time = synced time on a CPU)."""
    out = tmp_path / "cpu.json"
    stream = tmp_path / "cpu.jsonl"
    sel = ("fmrt and float32 and (sft_step and wan_tiny or qk_norm_rope_fwd_bwd "
           "or guided_euler_step-b8_tiny)")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "benchmarks/bench_training.py", "benchmarks/bench_attention.py",
                          "benchmarks/bench_sampling.py", "-k", sel, "--benchmark-enable",
                          f"--benchmark-json={out}"], cwd=ROOT, capture_output=True, text=True,
                         env=_outer_env(FMRT_BENCH_JSONL=str(stream)))
    assert res.returncode == 0, res.stdout[-2000:]
    _, rows = report.load(out)
    # the records streamed as each benchmark finished are the same rows
    _, streamed = report.load(stream)
    assert sorted((r.op, r.nbytes, r.ms) for r in streamed) == \
        sorted((r.op, r.nbytes, r.ms) for r in rows)
    by_op = {r.op: r for r in rows}
    assert set(by_op) == {"add_noise+loss_fwd_bwd", "qk_norm_rope_fwd_bwd", "guided_euler_step"}
    sft = by_op["add_noise+loss_fwd_bwd"]
    assert sft.nbytes == 7 * sft.extra["tensor_bytes"] == 7 * 4 * (1 * 4 * 3 * 6 * 10)
    qk = by_op["qk_norm_rope_fwd_bwd"]
    ne, tables = 4 * 12 * 2 * 16, 2 * 2 * 12 * 8 * 4      # [1, 12, 2, 16] fp32; cos, sin [12, 8]
    assert qk.extra["tensor_bytes"] == ne and qk.nbytes == 10 * ne + tables
    g = by_op["guided_euler_step"]
    assert g.case == "b8_tiny" and g.nbytes == 4 * g.extra["tensor_bytes"]
    for r in rows:
        assert r.ms > 0 and r.extra["latency_ms"] == pytest.approx(r.ms)
        assert r.extra["timing"] == "host_synced"


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


def test_first_gpu_call_selects_every_kernel_level_goal_case():
    """`run_gpu.sh first` runs `pytest -m goal` over the fused-op benchmark files: each
    kernel-level goal of report.GOALS has its cases there, and nothing else is."""
    files = ["benchmarks/bench_training.py", "benchmarks/bench_sampling.py",
             "benchmarks/bench_attention.py", "benchmarks/bench_flash_attention.py"]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "-m", "goal", *files], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:]
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    funcs = {i.split("::")[1].split("[")[0] for i in ids}
    assert funcs == {"test_bench_add_noise", "test_bench_sft_step", "test_bench_sampling_op",
                     "test_bench_loop_host_overhead", "test_bench_qk_norm_rope_fwd_bwd",
                     "test_bench_attention_jvp", "test_bench_attention_forward"}
    sampling = {i.split("[")[1].split("-")[0] for i in ids if "test_bench_sampling_op" in i}
    assert sampling == {"guided_euler_step"}
    # every provider of a judged case is there (fmrt, eager, compile)
    for f in ("test_bench_add_noise", "test_bench_sft_step", "test_bench_qk_norm_rope_fwd_bwd"):
        assert {i.rsplit("-", 1)[1].rstrip("]") for i in ids if f + "[" in i} == \
            {"fmrt", "eager", "compile"}
    # (attention(auto) against the other backends is the `attention` phase's: seconds a call at
    # S = 32760)
    ops_judged = {"add_noise", "add_noise+loss_fwd_bwd", "guided_euler_step", "sampling_loop",
                  "qk_norm_rope_fwd_bwd", "flash_attention_jvp", "flash_attention_fwd"}
    kernel_goals = [g for g in report.GOALS if any(re.fullmatch(g.op, o) for o in ops_judged)]
    assert len(kernel_goals) >= 14


@pytest.mark.slow
def test_run_gpu_first_phase_dry_run_on_cpu(tmp_path):
    """benchmarks/run_gpu.sh end to end on a CPU (its dry-run mode: tiny shapes, the gpu tests
    skipped): the scratch layout imports, the phase streams its JSONL and writes the report."""
    env = {k: v for k, v in _outer_env().items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["OUT"] = str(tmp_path)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    res = subprocess.run(["bash", "benchmarks/run_gpu.sh", "first",
                          "add_noise and float32 and fmrt"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "[run_gpu first" in res.stdout and "done" in res.stdout
    _, rows = report.load(tmp_path / "cpu_first.jsonl")
    assert {(r.op, r.provider) for r in rows} == {("add_noise", "fmrt")}
    assert "| add_noise |" in (tmp_path / "cpu_first_report.md").read_text()
    assert (tmp_path / "cpu_gpu_tests.txt").exists()


def test_attention_auto_is_benchmarked():
    """The goal "attention(auto) within 5% of the best installed backend" needs an auto row."""
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "benchmarks/bench_attention.py", "-k",
                          "test_bench_attention["], cwd=ROOT, capture_output=True, text=True)
    assert "-auto]" in res.stdout, res.stdout[-2000:]
