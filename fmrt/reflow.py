"""Reflow (SPEC 5, rectified flow): sample (noise, generated) pairs with a trained model, save
them, and train again on those fixed couplings (straighter paths, fewer sampling steps).

Convention: sigma = 1 is noise; a coupling is (noise, sample) where `sample` is the model's ODE
solution from `noise`; a trainer uses x0 = sample and that same noise (not a fresh draw).
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

KEYS = ("noise", "sample", "cond")


def make_couplings(model: Callable, num: int, shape: Sequence[int], *,
                   sample_fn: Optional[Callable] = None, steps: int = 50, solver: str = "euler",
                   cond: Optional[Tensor] = None, uncond=None, guidance_scale: float = 1.0,
                   shift: float = 1.0, seed: int = 0, batch_size: int = 64,
                   device=None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Generate `num` couplings: `dict(noise=[num, *shape], sample=[num, *shape][, cond])` on the
    CPU, in `dtype`.

    The noise is drawn on the CPU from `torch.Generator().manual_seed(seed)` in one go (the same
    pairs for any batch_size or device), then integrated in batches of `batch_size` on `device`
    by `sample_fn(model, noise, cond=c)` (default: `fmrt.sampling.sample` with steps, solver,
    uncond, guidance_scale, shift), without gradient. cond: `[num, ...]` per-sample conditions
    (sliced per batch, stored with the pairs)."""
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be the non-empty per-sample shape, got {shape}")
    if cond is not None:
        if not isinstance(cond, Tensor) or cond.ndim < 1 or cond.shape[0] != num:
            raise ValueError(f"cond must be a [num={num}, ...] tensor")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if sample_fn is None:
        from fmrt.sampling import sample

        def sample_fn(m, noise, cond=None):
            return sample(m, noise, steps=steps, solver=solver, cond=cond, uncond=uncond,
                          guidance_scale=guidance_scale, shift=shift)

    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((num, *shape), generator=g, dtype=torch.float32).to(dtype)
    out = torch.empty_like(noise)
    with torch.no_grad():
        for i in range(0, num, batch_size):
            n = noise[i:i + batch_size].to(device)
            c = None if cond is None else cond[i:i + batch_size].to(device)
            x = sample_fn(model, n, cond=c)
            if not isinstance(x, Tensor) or x.shape != n.shape:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"sample_fn must return the noise's shape {tuple(n.shape)}, "
                                 f"got {got}")
            out[i:i + batch_size] = x.to(device="cpu", dtype=dtype)
    couplings = {"noise": noise, "sample": out}
    if cond is not None:
        couplings["cond"] = cond.detach().cpu()
    return couplings


def _check_couplings(couplings) -> None:
    if not isinstance(couplings, dict):
        raise TypeError(f"couplings must be a dict, got {type(couplings).__name__}")
    for key in ("noise", "sample"):
        if not isinstance(couplings.get(key), Tensor):
            raise ValueError(f"couplings needs a tensor under {key!r}")
    extra = set(couplings) - set(KEYS)
    if extra:
        raise ValueError(f"couplings has unknown keys {sorted(extra)}; allowed {KEYS}")
    if couplings["noise"].shape != couplings["sample"].shape:
        raise ValueError(f"couplings noise {tuple(couplings['noise'].shape)} and sample "
                         f"{tuple(couplings['sample'].shape)} differ in shape")
    cond = couplings.get("cond")
    if cond is not None and (not isinstance(cond, Tensor) or cond.ndim < 1
                             or cond.shape[0] != couplings["noise"].shape[0]):
        raise ValueError("couplings cond must be a tensor with one row per pair")


def save_couplings(path: Union[str, os.PathLike], couplings: dict[str, Tensor]) -> None:
    """Write couplings to a safetensors file atomically (temporary file, then rename)."""
    from safetensors.torch import save_file
    _check_couplings(couplings)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tensors = {k: v.detach().cpu().contiguous() for k, v in couplings.items() if v is not None}
    fd, tmp = tempfile.mkstemp(prefix=".couplings-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "fmrt-couplings-v1"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_couplings(path: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """Read couplings written by `save_couplings` (CPU tensors)."""
    from safetensors.torch import load_file
    couplings = load_file(os.fspath(path))
    _check_couplings(couplings)
    return couplings
