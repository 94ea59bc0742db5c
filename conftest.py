"""Root conftest (tests/ and benchmarks/): without CUDA, turn on Triton's interpreter before
anything imports Triton, so every kernel runs on CPU tensors; skip `gpu` tests without CUDA."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in keywords`: a checkout folder
            # named "gpu" is a keyword of every test
            item.add_marker(skip)
