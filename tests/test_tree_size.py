"""The tracked tree stays small enough to travel to a GPU machine.

The device tool copies the working tree (tracked files, carried paths) to the GPU machine and
refuses more than 64 MiB; the GPU runs carry wheels (benchmarks/gpu_wheels.sh: diffusers, about
3 MB) beside it. At 90 MiB (nineteen student weights in docs/models) no run could start, so
earlier students' weights live in git history (docs/models/README.md).
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_MIB = 56      # the device tool's 64 MiB, less room for carried wheels


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def test_tracked_tree_fits_a_device_run():
    sizes = {p: os.path.getsize(os.path.join(ROOT, p)) for p in _tracked_files()
             if os.path.isfile(os.path.join(ROOT, p))}
    total = sum(sizes.values())
    largest = sorted(sizes, key=sizes.get, reverse=True)[:5]
    assert total <= LIMIT_MIB * 2 ** 20, (
        f"tracked files take {total / 2 ** 20:.1f} MiB, over {LIMIT_MIB} MiB: a device run "
        f"would be refused; largest: {', '.join(largest)} (see docs/models/README.md)")
