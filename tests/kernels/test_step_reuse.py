"""The guidance-reuse step ops: refresh (writes d = c - u with the guided step) and reuse
(steps from x, c and d) against their references, under the Triton interpreter."""
import pytest
import torch

from fmrt import ops, reference as ref, use_backend
from tests.helpers import DTYPES, assert_close, check_against_reference

SHAPES = [(3, 5, 7, 11), (1, 16, 3, 9, 13), (1, 1), (3, 4099)]


def _make(shape, dtype, kind, *, refresh, transpose=False, grad=False, prev=False):
    def make():
        g = torch.Generator().manual_seed(5)
        x, c, o = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        if not refresh:
            o = o.float()  # d is float32
        if transpose and x.ndim >= 3:
            x, c, o = x.transpose(1, 2), c.transpose(1, 2), o.transpose(1, 2)
        for t in (x, c, o):
            t.requires_grad_(grad)
        B = x.shape[0]
        if kind == "float":
            scale, s, sn = 4.5, 0.75, 0.5
        else:
            scale = torch.rand(B, generator=g) * 5
            s = torch.rand(B, generator=g)
            sn = s * 0.5
        kw = {"prev": torch.randn(x.shape, generator=g)} if prev else {}
        return (x, c, o, scale, s, sn), kw
    return make


def _ref_refresh(x, c, u, scale, s, sn, prev=None):
    return ref.guided_euler_step_refresh(x, c, u, scale, s, sn)


def _ref_reuse(x, c, d, scale, s, sn, prev=None):
    return ref.reused_guided_euler_step(x, c, d, scale, s, sn)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_refresh_and_reuse_match_reference(shape, dtype, kind):
    check_against_reference(ops.guided_euler_step_refresh, _ref_refresh,
                            _make(shape, dtype, kind, refresh=True), grad=False)
    check_against_reference(ops.reused_guided_euler_step, _ref_reuse,
                            _make(shape, dtype, kind, refresh=False), grad=False)


@pytest.mark.parametrize("refresh", [True, False])
def test_strided_inputs_and_gradients(refresh):
    op, rf = ((ops.guided_euler_step_refresh, _ref_refresh) if refresh
              else (ops.reused_guided_euler_step, _ref_reuse))
    check_against_reference(op, rf, _make((3, 5, 7, 11), torch.float32, "tensor",
                                          refresh=refresh, transpose=True, grad=True))
    check_against_reference(op, rf, _make((2, 33), torch.bfloat16, "float", refresh=refresh,
                                          grad=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reuse_with_the_current_d_is_the_guided_step(backend):
    g = torch.Generator().manual_seed(1)
    x, c, u = (torch.randn(3, 6, 10, generator=g) for _ in range(3))
    scale, s, sn = torch.tensor([1.0, 3.0, 7.5]), 0.8, 0.6
    with use_backend(backend):
        want = ops.guided_euler_step(x, c, u, scale, s, sn)
        a, d = ops.guided_euler_step_refresh(x, c, u, scale, s, sn)
        b = ops.reused_guided_euler_step(x, c, d, scale, s, sn)
    assert d.dtype == torch.float32
    assert torch.equal(d, c - u)
    assert_close(a, want)
    assert_close(b, want, scale=2)


def test_jvp_is_the_op_on_the_tangents():
    g = torch.Generator().manual_seed(2)
    x, c, u, tx, tc, tu = (torch.randn(2, 9, generator=g) for _ in range(6))
    for backend in ("torch", "triton"):
        with use_backend(backend):
            (out, d), (tout, td) = torch.func.jvp(
                lambda a, b, e: ops.guided_euler_step_refresh(a, b, e, 3.0, 0.9, 0.5),
                (x, c, u), (tx, tc, tu))
            want_t, want_d = ref.guided_euler_step_refresh(tx, tc, tu, 3.0, 0.9, 0.5)
            assert_close(tout, want_t)
            assert_close(td, want_d)
            _, tr = torch.func.jvp(
                lambda a, b, e: ops.reused_guided_euler_step(a, b, e, 3.0, 0.9, 0.5),
                (x, c, d), (tx, tc, td))
            assert_close(tr, ref.reused_guided_euler_step(tx, tc, td, 3.0, 0.9, 0.5))


@pytest.mark.parametrize("refresh", [True, False])
def test_in_pass_statistics(refresh):
    g = torch.Generator().manual_seed(3)
    x, c, o, prev = (torch.randn(3, 4, 1000, generator=g) for _ in range(4))
    outs = {}
    for backend in ("torch", "triton"):
        st = {}
        with use_backend(backend):
            if refresh:
                ops.guided_euler_step_refresh(x, c, o, 2.0, 0.5, 0.25, prev=prev, stats=st)
            else:
                ops.reused_guided_euler_step(x, c, o, 2.0, 0.5, 0.25, prev=prev, stats=st)
        outs[backend] = st
    d = c - o if refresh else o
    want = {"cond_norm": c.flatten(1).norm(dim=1), "d_norm": d.flatten(1).norm(dim=1),
            "change": ((d if refresh else c) - prev).flatten(1).norm(dim=1)}
    for st in outs.values():
        assert set(st) == set(want)
        for k in want:
            assert_close(st[k], want[k], scale=10, msg=k)


def test_bad_input():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="v_uncond"):
        ops.guided_euler_step_refresh(x, x, torch.randn(2, 6), 3.0, 0.5, 0.4)
    with pytest.raises(TypeError, match="d"):
        ops.reused_guided_euler_step(x, x, x.long(), 3.0, 0.5, 0.4)
    with pytest.raises(ValueError, match="sigma"):
        ops.reused_guided_euler_step(x, x, x, 3.0, torch.rand(3), 0.4)
    with pytest.raises(TypeError, match="scale"):
        ops.reused_guided_euler_step(x, x, x, "3", 0.5, 0.4)
    with pytest.raises(ValueError, match="prev"):
        ops.reused_guided_euler_step(x, x, x, 3.0, 0.5, 0.4, prev=torch.randn(2, 4))
    with pytest.raises(TypeError, match="stats"):
        ops.reused_guided_euler_step(x, x, x, 3.0, 0.5, 0.4, stats=[])


@pytest.mark.parametrize("used", ["out", "d", "both"])
def test_refresh_backward_with_an_unused_output(used):
    # an unused output gets no materialised zeros of the latent's size, and the gradients equal
    # the reference's (whose autograd treats the unused output as having zero gradient)
    from tests.helpers import large_allocations
    g = torch.Generator().manual_seed(3)
    x, c, u = (torch.randn(2, 3, 40, generator=g).requires_grad_() for _ in range(3))
    w1, w2 = (torch.randn(2, 3, 40, generator=g) for _ in range(2))

    def loss(fn):
        out, d = fn(x, c, u, 3.0, 0.9, 0.5)
        return {"out": (out * w1).sum(), "d": (d * w2).sum(),
                "both": (out * w1).sum() + (d * w2).sum()}[used]

    with use_backend("triton"):
        lt = loss(ops.guided_euler_step_refresh)
    with large_allocations(x.numel()) as found:
        got = torch.autograd.grad(lt, (x, c, u), allow_unused=True)
    assert "aten.zeros.default" not in found
    want = torch.autograd.grad(loss(ref.guided_euler_step_refresh), (x, c, u),
                               allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None and (b is None or not b.any())) or torch.allclose(a, b, atol=1e-6)
