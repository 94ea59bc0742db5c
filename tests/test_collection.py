"""`pytest -m gpu` on an image without diffusers (the GPU machine's) must collect and run the gpu
tests rather than stop at an ImportError: here with `import diffusers` made to fail (a
sitecustomize on PYTHONPATH raising ModuleNotFoundError, as a missing package does)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = '''import sys
class _NoDiffusers:
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoDiffusers())
'''


def test_gpu_tests_collect_without_diffusers(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "-m", "gpu", "tests"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "error" not in out.lower().split("short test summary")[-1], out[-3000:]
    assert "could not import 'diffusers" in out            # the blocker did block
    # gpu tests of modules that need no diffusers are still there
    for name in ("test_fast_math_noise_is_finite_over_2_30_draws",
                 "test_cuda_backends_agree_with_math"):
        assert name in out, out[-3000:]


def test_interpreter_numpy_clash_is_named():
    from conftest import interpreter_numpy_clash
    assert interpreter_numpy_clash("3.6.0", "2.4.6") and interpreter_numpy_clash("3.5.1", "2.5.2")
    assert not interpreter_numpy_clash("3.6.0", "2.3.5")
    assert not interpreter_numpy_clash("3.8.0", "2.4.6") and not interpreter_numpy_clash("3.9.0",
                                                                                        "2.5.0")
