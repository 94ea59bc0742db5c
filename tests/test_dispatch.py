import pytest
import torch

from fmrt import _dispatch, use_backend


def test_env_selects_backend(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("FMRT_BACKEND", "torch")
    assert not _dispatch.use_triton(x)
    monkeypatch.setenv("FMRT_BACKEND", "auto")
    assert _dispatch.use_triton(x) == (x.is_cuda and _dispatch.triton_available())
    monkeypatch.setenv("FMRT_BACKEND", "triton")
    assert _dispatch.use_triton(x)  # the interpreter is on in this test session without CUDA


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("FMRT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FMRT_BACKEND"):
        _dispatch.use_triton(torch.zeros(1))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _dispatch.use_triton(torch.zeros(1))


def test_use_backend_restores():
    with use_backend("torch"):
        assert _dispatch.requested_backend() == "torch"
        with use_backend("triton"):
            assert _dispatch.requested_backend() == "triton"
        assert _dispatch.requested_backend() == "torch"
    with pytest.raises(ValueError):
        with use_backend("nope"):
            pass
