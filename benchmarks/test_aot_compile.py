"""benchmarks/aot_compile.py: the sm_90 builds of the launches that broke before it existed
(a per-sample sigma tensor in euler_step: a return-type clash; the fp32 flash-attention jvp at
D = 128: 260 KB of shared memory), and a kernel it must reject."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    """python ARGS with the interpreter off (the compiler, not the interpreter, is under test)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_fixed_launches_compile_for_h100(tmp_path):
    out = tmp_path / "aot.json"
    for k in ("euler_step/", "flash_attention_jvp/D128/float32"):
        res = _run("benchmarks/aot_compile.py", "-k", k, "--json", str(out))
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        rep = json.loads(out.read_text())
        assert rep["compiled"] >= 1 and rep["failed"] == 0
        assert all(r["shared"] <= 232448 for r in rep["results"])


def test_diffusers_rounding_is_built_without_fma(tmp_path):
    """eager_rounding promises diffusers' two roundings in fp32 too: no fused multiply-add in the
    sm_90 build of that launch (the default launch may contract, and does)."""
    out = tmp_path / "aot.json"
    res = _run("benchmarks/aot_compile.py", "-k", "step", "--json", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    fma = {r["scenario"]: r["fma"] for r in json.loads(out.read_text())["results"]}
    assert fma["euler_step_fp32_sample/float32"] == fma["guided_step_fp32_sample/float32"] == 0
    assert fma["euler_step/float32"] > 0 and fma["guided_step/float32"] > 0


BAD = r'''
import sys, torch, triton, triton.language as tl
sys.path.insert(0, ROOT + "/benchmarks")
import aot_compile as A

@triton.jit
def _pick(p, v, b, T: tl.constexpr):
    if T:
        return tl.load(p + b)
    return v

@triton.jit
def _k(p, v, o, T: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.arange(0, BLOCK)
    tl.store(o + b, _pick(p, v, b, T))

x = torch.zeros(64)
calls = A.record_launches(lambda: _k[(1,)](x, 1.5, x, T=True, BLOCK=64))
src, opts, key = A.source(*calls[0])
try:
    triton.compile(src, target=A.GPUTarget("cuda", 90, 32), options=opts)
except Exception as e:
    print("rejected", type(e).__name__)
'''


def test_harness_rejects_what_the_gpu_compiler_rejects(tmp_path):
    bad = tmp_path / "bad_kernel.py"  # @triton.jit needs its source in a file
    bad.write_text(f"ROOT = {str(ROOT)!r}\n" + BAD)
    res = _run(str(bad))
    assert "rejected CompilationError" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_meanflow_tangent_and_rope_backward_fit_with_margin(tmp_path):
    """The two launches the first report missed: the tangent kernel torch.func.jvp over
    ops.flash_attention runs (fp32 D = 128 sat 3 KB under the shared-memory limit) and the
    q/k-norm backward with its real row loop at Wan 14B's 40 heads (it spilled)."""
    out = tmp_path / "aot.json"
    res = _run("benchmarks/aot_compile.py", "-k", "func_jvp/D128/float32", "--json", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    shared = [r["shared"] for r in json.loads(out.read_text())["results"]]
    assert len(shared) == 2 and max(shared) <= 232448 - 32 * 1024   # >= 32 KB to spare
    res = _run("benchmarks/aot_compile.py", "-k", "qk_norm_rope/H40xD128/float32", "--json",
               str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    bwd = [r for r in json.loads(out.read_text())["results"]
           if r["kernel"] == "_qk_norm_rope_bwd_kernel"]
    assert len(bwd) == 1 and bwd[0]["stack"] == 0 and bwd[0]["local"] == 0, bwd


def test_scale_noise_rounding_is_built_without_fma(tmp_path):
    """add_noise(eager_rounding=True) (diffusers' scale_noise) rounds sigma * eps on its own in
    fp32 too: no fused multiply-add in its sm_90 build."""
    out = tmp_path / "aot.json"
    res = _run("benchmarks/aot_compile.py", "-k", "noise", "--json", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    fma = {r["scenario"]: r["fma"] for r in json.loads(out.read_text())["results"]}
    assert fma["scale_noise_eager/float32"] == fma["scale_noise_eager/bfloat16"] == 0
