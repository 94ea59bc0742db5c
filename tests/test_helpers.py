"""tests/helpers.py: cotangents land on the outputs' device; the version-stable randn_like."""
import torch

from tests.helpers import cotangents, stable_randn_like


def test_cotangents_follow_the_outputs_device_and_dtype():
    # meta tensors stand in for CUDA ones: a cotangent built on the CPU for a non-CPU output is
    # what made autograd.grad raise on the GPU
    outs = [torch.empty(2, 3, device="meta", dtype=torch.bfloat16),
            torch.empty(4, dtype=torch.float32)]
    cots = cotangents(outs, seed=3)
    assert [c.device.type for c in cots] == ["meta", "cpu"]
    assert [c.dtype for c in cots] == [torch.bfloat16, torch.float32]
    assert [c.shape for c in cots] == [o.shape for o in outs]
    # the values do not depend on where the outputs live
    again = cotangents([torch.empty(2, 3, dtype=torch.bfloat16), outs[1]], seed=3)
    assert torch.equal(again[1], cots[1])


def test_stable_randn_like_draws_fp32_then_casts():
    x = torch.empty(5, 7, dtype=torch.bfloat16)
    torch.manual_seed(11)
    with stable_randn_like():
        a = torch.randn_like(x)
        after = torch.rand(())            # the global stream advanced as by an fp32 draw
    torch.manual_seed(11)
    want = torch.randn(5, 7).to(torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, want)
    assert torch.equal(after, torch.rand(()))
    with stable_randn_like():             # fp32 and explicit dtypes behave as torch's own
        torch.manual_seed(2)
        b = torch.randn_like(x, dtype=torch.float32)
    torch.manual_seed(2)
    assert torch.equal(b, torch.randn(5, 7))
    assert torch.randn_like.__module__ != __name__   # restored on exit
