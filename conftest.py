"""Root conftest (tests/ and benchmarks/): without CUDA, turn on Triton's interpreter before
anything imports Triton, so every kernel runs on CPU tensors; skip `gpu` tests without CUDA."""
import importlib
import importlib.metadata
import os
import sys

import torch


def _installed_kernels_first() -> None:
    """This repository's kernels/ (installed as `fmrt.kernels`) sits at its root, which pytest
    puts on sys.path, so a bare `import kernels` finds it. Hugging Face's `kernels`
    distribution has that name too, and transformers >= 5.25 requires and imports it (through
    diffusers' LoRA loaders): when it is installed, import it first, from where pip put it."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    root = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


_installed_kernels_first()

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def interpreter_numpy_clash(triton_version: str, numpy_version: str) -> bool:
    """Triton < 3.7's interpreter breaks on numpy >= 2.4 (seen with 3.6; 3.8 is fixed; 3.7 is
    not checked): every kernel test would fail with "only 0-dimensional arrays can be converted
    to Python scalars"."""
    def major_minor(v):
        return tuple(int(p) for p in v.split(".")[:2])
    return major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4)


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    if interpreter_numpy_clash(triton.__version__, numpy.__version__):
        pytest.exit(f"triton {triton.__version__}'s interpreter fails with numpy "
                    f"{numpy.__version__}: pip install 'numpy<2.4' (the `test` extra pins it)",
                    returncode=2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: a checkout folder
            # named "gpu" is a keyword of every test
            item.add_marker(skip)
