"""Running the `fmrt` command in a subprocess, as a user does, for the tests/test_cli_*.py files."""
import os
import subprocess
import sys

TIMEOUT_S = 600
# A fresh interpreter puts its working directory first on sys.path: never the folder holding the
# clone (there `fmrt` would be the clone folder, an empty namespace package: see the README).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_fmrt(*argv, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python -m fmrt.cli ARGV` (the console script's code) in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "fmrt.cli", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, one line on stderr (no traceback) that contains every needle."""
    err = r.stderr
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def snapshot(*paths) -> dict:
    """{path: bytes} of files that a refused command must leave exactly as they were."""
    return {str(p): open(p, "rb").read() for p in paths}


def assert_unchanged(before: dict) -> None:
    for p, data in before.items():
        assert os.path.isfile(p), f"{p} was removed"
        with open(p, "rb") as f:
            assert f.read() == data, f"{p} changed"
