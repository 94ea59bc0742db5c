"""Backend and device choice: `FMRT_BACKEND` = auto (default) | triton | torch, and
`resolve_device` for the `--device` flags.

- auto:   Triton kernels for CUDA tensors when Triton imports; the torch reference otherwise.
- triton: always the Triton kernels; CPU tensors need `TRITON_INTERPRET=1` (how CI runs them).
- torch:  always the pure-torch reference.

`use_backend(name)` overrides the environment inside a `with` block (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "torch")
_override: Optional[str] = None


_TRITON_OK: Optional[bool] = None


def triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            _TRITON_OK = True
        except Exception:
            _TRITON_OK = False
    return _TRITON_OK


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_parsed: dict = {}   # raw FMRT_BACKEND value -> backend name (the parse runs once per value)


def requested_backend() -> str:
    if _override is not None:
        return _override
    raw = os.environ.get("FMRT_BACKEND", "auto")
    name = _parsed.get(raw)
    if name is None:
        name = raw.strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"FMRT_BACKEND must be one of {BACKENDS}, got {name!r}")
        _parsed[raw] = name
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside the block: `with use_backend("triton"): ...`."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    prev, _override = _override, name
    try:
        yield
    finally:
        _override = prev


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel for these tensors.

    Raises ValueError when `triton` is forced on CPU tensors without the interpreter, or Triton
    does not import.
    """
    name = requested_backend()
    if name == "torch":
        return False
    on_cuda = True
    for t in tensors:   # called once per op call: a plain loop (no generator)
        if isinstance(t, torch.Tensor) and not t.is_cuda:
            on_cuda = False
            break
    if name == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise ValueError("FMRT_BACKEND=triton but Triton does not import (pip install triton)")
    if not on_cuda and not interpreter_enabled():
        raise ValueError(
            "FMRT_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before Triton is "
            "imported; use FMRT_BACKEND=torch (or auto) for the CPU reference path"
        )
    return True


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; otherwise `torch.device(name)`, checked
    (ValueError for a malformed name or CUDA asked for on a machine without it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"not a device: {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev
