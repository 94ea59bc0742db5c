"""Shared test tools: the dtype tolerance table and the Triton-vs-reference checker."""
from __future__ import annotations

import contextlib

from typing import Callable, Optional

import torch
from torch import Tensor

from fmrt import use_backend

# Kernels compute in fp32 and round once; the reference too, in another order. So fp32 agrees to
# a few fp32 ulps and half types to a couple of their ulps (the interpreter's fp32->bf16 cast is
# not round-to-nearest). bf16 ulp = 2^-8 relative, fp16 ulp = 2^-11.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2 * 2.0 ** -11),
    torch.bfloat16: dict(atol=1e-2, rtol=2 * 2.0 ** -8),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    t = TOL[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def assert_close(actual, expected, dtype: Optional[torch.dtype] = None, scale: float = 1.0,
                 msg: str = "") -> None:
    """Compare tensors (or tuples of them) with the tolerance of `dtype` (default: expected's)."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, dtype, scale, msg=f"{msg}[{i}]")
        return
    if expected is None:
        assert actual is None, msg
        return
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    t = tol(dtype or expected.dtype, scale)
    torch.testing.assert_close(actual.double(), expected.double(), msg=lambda m: f"{msg}: {m}",
                               **t)


def _tensors(args, kwargs) -> list[Tensor]:
    items = list(args) + list(kwargs.values())
    return [t for t in items if isinstance(t, Tensor) and t.requires_grad]


def _flat(out) -> list[Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, Tensor)]


def cotangents(outs: list[Tensor], seed: int = 0) -> list[Tensor]:
    """One random cotangent per output, drawn on the CPU in fp32 (the same values whatever the
    device or the torch version) and placed on the output's device in its dtype: autograd.grad
    refuses a CPU cotangent for a CUDA output."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]


@contextlib.contextmanager
def stable_randn_like():
    """Make `torch.randn_like` of a half-precision tensor draw fp32 normals and cast them.

    torch's CPU bf16 / fp16 `randn` stream changed between releases (2.11 and 2.13 draw
    different bf16 noise from the same seed); its fp32 stream did not. Golden values that depend
    on a `randn_like(bf16)` somewhere (DiffSynth's FlowMatchSFTLoss and fmrt's compat mode alike)
    are made and checked under this patch, so they hold on any torch version. It consumes the
    global generator exactly as an fp32 draw of the same shape does."""
    real = torch.randn_like

    def randn_like(x, *, dtype=None, **kw):
        dt = dtype or x.dtype
        if dt in (torch.bfloat16, torch.float16):
            return real(x, dtype=torch.float32, **kw).to(dt)
        return real(x, dtype=dtype, **kw)

    torch.randn_like = randn_like
    try:
        yield
    finally:
        torch.randn_like = real


def check_against_reference(op: Callable, reference: Callable, make_args: Callable, *,
                            grad: bool = True, scale: float = 1.0, grad_scale: float = 4.0,
                            seed: int = 0) -> None:
    """Check an op's Triton path against its pure-torch reference, forward and gradients.

    `make_args()` returns fresh `(args, kwargs)` each call (same values: seed inside), so
    non-contiguous views survive. `op` runs with FMRT_BACKEND=triton, `reference` as it is.
    With `grad`, the same random cotangent is pulled back through both, and the gradients of
    every input that requires grad are compared.
    """
    args_t, kw_t = make_args()
    with use_backend("triton"):
        out_t = op(*args_t, **kw_t)
    args_r, kw_r = make_args()
    out_r = reference(*args_r, **kw_r)
    assert_close(out_t, out_r, scale=scale, msg="forward")
    if not grad:
        return
    ins_t, ins_r = _tensors(args_t, kw_t), _tensors(args_r, kw_r)
    if not ins_t:
        return
    outs_t, outs_r = _flat(out_t), _flat(out_r)
    cots = cotangents(outs_r, seed)
    used = [i for i, o in enumerate(outs_r) if o.requires_grad]
    grads_t = torch.autograd.grad([outs_t[i] for i in used], ins_t, [cots[i] for i in used],
                                  allow_unused=True)
    grads_r = torch.autograd.grad([outs_r[i] for i in used], ins_r, [cots[i] for i in used],
                                  allow_unused=True)
    for i, (a, e) in enumerate(zip(grads_t, grads_r)):
        assert_close(a, e, scale=grad_scale, msg=f"grad of input {i}")


@contextlib.contextmanager
def large_allocations(min_numel: int):
    """Yields a list that collects, while the block runs on this thread, the aten ops whose
    output is a new tensor of at least `min_numel` elements (an output sharing no storage with
    the op's inputs): e.g. the zeros autograd materialises for an unused output's gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode
    found: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            from torch.utils._pytree import tree_leaves
            out = func(*args, **(kwargs or {}))
            ins = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                   if isinstance(t, Tensor)}
            for o in tree_leaves(out):
                if (isinstance(o, Tensor) and o.numel() >= min_numel
                        and o.untyped_storage().data_ptr() not in ins):
                    found.append(str(func))
            return out

    with Watch():
        yield found
