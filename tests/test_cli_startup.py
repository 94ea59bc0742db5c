"""`fmrt --version`, `--help` and every argument error answer without importing torch; `import
fmrt` is light; the CLI's own vocabulary (solvers, class names, seed range) is the library's."""
import subprocess
import sys

import pytest

import fmrt
from fmrt import cli
from tests.cli_run import ROOT

PROBE = """
import sys
from fmrt.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("torch loaded" if "torch" in sys.modules else "no torch", file=sys.stderr)
sys.exit(code)
"""


def _probe(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A copy of the embedded model (M.safetensors + M.json) in a folder of its own."""
    d = tmp_path_factory.mktemp("model")
    base = cli.DEFAULT_CHECKPOINT[: -len(".safetensors")]
    for ext in (".safetensors", ".json"):
        (d / f"M{ext}").write_bytes(open(base + ext, "rb").read())
    return d / "M.safetensors"


@pytest.mark.parametrize("argv, code, needle", [
    (["--version"], 0, fmrt.__version__),
    (["--help"], 0, "COMMAND"),
    (["sample", "--help"], 0, "--batch-size"),
    (["sample", "--seed", "-1"], 2, "--seed"),
    (["sample", "--seed", str(2 ** 64)], 2, "--seed"),
    (["sample", "--device", "meta"], 2, "--device"),
    (["sample", "--solver", "rk45"], 2, "--solver"),
    (["sample", "--class", "hexagon"], 2, "--class"),
    (["sample", "--steps", "1000000000"], 2, "--steps"),
    (["sample", "--num", "20000"], 2, "--num"),
    (["sample", "--out", "x.txt"], 2, "x.txt"),
    (["sample", "--checkpoint", "{tmp}"], 2, "is a directory"),
    (["sample", "--checkpoint", "{tmp}/none.safetensors"], 2, "no such checkpoint"),
    (["sample", "--checkpoint", "{model}", "--gif", "{tmp}/p.png", "--out", "{tmp}/p.png"], 2,
     "p.png"),
    (["eval", "--checkpoint", "{model}", "--json", "{model_json}"], 2, "M.json"),
    (["reflow", "--checkpoint", "{model}", "--out", "{model}"], 2, "M.safetensors"),
    (["reflow", "--out", "{tmp}/c.pt"], 2, "c.pt"),
    (["train", "--steps", "1000000000"], 2, "--steps"),
    (["train", "--device", "mps"], 2, "--device"),
    (["train", "--lora-rank", "4"], 2, "--init"),
])
def test_no_torch_before_the_arguments_are_checked(argv, code, needle, model, tmp_path):
    argv = [a.format(tmp=tmp_path, model=model, model_json=model.with_suffix(".json"))
            for a in argv]
    r = _probe(*argv)
    assert r.returncode == code, r.stderr
    assert needle in r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == "no torch", r.stderr
    if code == 2:
        assert len(r.stderr.strip().splitlines()) == 2, r.stderr   # the error + the probe's line


def test_import_fmrt_is_light_and_lazy():
    r = subprocess.run([sys.executable, "-c", "import sys, fmrt; print(fmrt.__version__, "
                        "'torch' in sys.modules)"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.stdout.split() == [fmrt.__version__, "False"], r.stderr
    # the public names still come with `import fmrt`, loaded on first use
    from fmrt._dispatch import use_backend
    from fmrt.schedule import FlowMatchScheduler
    assert fmrt.use_backend is use_backend and fmrt.FlowMatchScheduler is FlowMatchScheduler
    from fmrt import ops
    assert fmrt.ops is ops
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        fmrt.nonexistent
    assert {"use_backend", "FlowMatchScheduler", "__version__"} <= set(dir(fmrt))


def test_cpu_sampling_never_imports_the_compiler(tmp_path):
    """torch._dynamo costs about a second of every `fmrt sample` start (it came with
    `torch.compiler.disable` at import of fmrt.ops): the CPU path must not load it."""
    probe = PROBE.replace('"torch" in sys.modules', '"torch._dynamo" in sys.modules').replace(
        '"torch loaded"', '"dynamo loaded"').replace('"no torch"', '"no dynamo"')
    r = subprocess.run([sys.executable, "-c", probe, "sample", "--num", "1", "--steps", "1",
                        "--out", str(tmp_path / "x.png"), "--no-progress"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "no dynamo", r.stderr


def test_cli_vocabulary_is_the_library_s():
    from fmrt.data import CLASS_NAMES
    from fmrt.ops import SEED_LIMIT
    from fmrt.sampling import SOLVERS
    assert cli.SOLVERS == tuple(SOLVERS)
    assert cli.CLASS_NAMES == tuple(CLASS_NAMES)
    assert cli.SEED_MAX == SEED_LIMIT - 1
    try:                                    # (model I/O moves from fmrt.train to fmrt.checkpoint)
        from fmrt.checkpoint import CHECKPOINT_FORMAT, MODEL_FORMAT
    except ImportError:
        from fmrt.train import CHECKPOINT_FORMAT, MODEL_FORMAT
    assert cli.MODEL_FORMATS == (MODEL_FORMAT, CHECKPOINT_FORMAT)
