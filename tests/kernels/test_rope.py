"""ops.qk_norm_rope: the Triton kernels (interpreter on CPU) against fmrt.reference, forward and
gradients of q, k and both weights, for every norm, dtype and awkward layout."""
import pytest
import torch

from fmrt import ops, reference as ref, use_backend
from fmrt.attention import rope_3d_tables
from tests.helpers import DTYPES, assert_close, check_against_reference

NORMS = ["across_heads", "per_head", None]


def _make(B, grid, H, D, dtype, norm, *, fused=True, seed=0, w_dtype=torch.float32):
    cos, sin = rope_3d_tables(D, grid)
    S = cos.shape[0]
    wn = {"across_heads": H * D, "per_head": D, None: H * D}[norm]

    def make():
        g = torch.Generator().manual_seed(seed)
        if fused:  # q, k: strided views of a fused [B, S, 3, H, D] projection output
            qkv = torch.randn(B, S, 3, H, D, generator=g).to(dtype).requires_grad_()
            q, k, _ = qkv.unbind(2)
        else:
            q = torch.randn(B, S, H, D, generator=g).to(dtype).requires_grad_()
            k = torch.randn(B, S, H, D, generator=g).to(dtype).requires_grad_()
        wq = (1 + 0.5 * torch.randn(wn, generator=g)).to(w_dtype).requires_grad_()
        wk = (1 + 0.5 * torch.randn(wn, generator=g)).to(w_dtype).requires_grad_()
        return (q, k, wq, wk, cos, sin), dict(eps=1e-6, norm=norm)
    return make


def _ref(q, k, wq, wk, cos, sin, *, eps, norm):
    return ref.qk_norm_rope(q, k, wq, wk, cos, sin, eps, norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_small(norm, dtype):
    # D = 16 keeps the interpreter fast; odd grid and batch 3
    check_against_reference(ops.qk_norm_rope, _ref, _make(3, (1, 3, 2), 3, 16, dtype, norm))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("D", [64, 128])
def test_matches_reference_head_dims(norm, D):
    check_against_reference(ops.qk_norm_rope, _ref,
                            _make(1, (3, 5, 7), 2, D, torch.bfloat16, norm)
                            if D == 64 else _make(1, (1, 2, 3), 5, D, torch.float32, norm))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_contiguous_and_half_weights(dtype):
    check_against_reference(ops.qk_norm_rope, _ref,
                            _make(2, (2, 1, 3), 4, 32, dtype, "across_heads", fused=False,
                                  w_dtype=dtype))


def test_no_weights_and_strided_grads():
    cos, sin = rope_3d_tables(16, (1, 2, 3))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 3, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 6, 3, 16, generator=g, requires_grad=True)
    with use_backend("triton"):
        qo, ko = ops.qk_norm_rope(q, k, None, None, cos, sin, norm="per_head")
        # stride-0 upstream gradients (what .sum() produces)
        gt = torch.autograd.grad(qo.sum() + 2 * ko.sum(), (q, k))
    qr, kr = ref.qk_norm_rope(q, k, None, None, cos, sin, 1e-6, "per_head")
    gr = torch.autograd.grad(qr.sum() + 2 * kr.sum(), (q, k))
    assert_close((qo, ko), (qr, kr))
    assert_close(gt, gr, scale=4)


def test_rotation_exact_answer():
    # norm None, angle pi/2 on the first pair of token 1: (a, b) -> (-b, a)
    q = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).repeat(1, 2, 1, 1)
    cos = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    sin = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    want = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-2.0, 1.0, 3.0, 4.0]]).view(1, 2, 1, 4)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            qo, ko = ops.qk_norm_rope(q, q, None, None, cos, sin, norm=None)
        assert_close(qo, want)
        assert_close(ko, want)


def test_norm_exact_answer():
    # RMS over H*D of (3, 4, 0, 0 | 0, 0, 0, 0) = sqrt(25 / 8): identity rotation
    q = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 4)
    cos, sin = torch.ones(1, 2), torch.zeros(1, 2)
    want = q * (8 / 25) ** 0.5
    for backend in ("torch", "triton"):
        with use_backend(backend):
            qo, _ = ops.qk_norm_rope(q, q, None, None, cos, sin, eps=0.0)
        assert_close(qo, want)


def test_weight_grad_deterministic():
    make = _make(2, (2, 3, 3), 2, 16, torch.float32, "across_heads")
    grads = []
    for _ in range(2):
        (q, k, wq, wk, cos, sin), kw = make()
        with use_backend("triton"):
            qo, ko = ops.qk_norm_rope(q, k, wq, wk, cos, sin, **kw)
        grads.append(torch.autograd.grad((qo * qo).sum() + ko.sum(), (wq, wk)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_torch_compile_fullgraph():
    make = _make(1, (1, 2, 3), 2, 16, torch.float32, "across_heads")
    (q, k, wq, wk, cos, sin), kw = make()

    def f(q, k, wq, wk):
        qo, ko = ops.qk_norm_rope(q, k, wq, wk, cos, sin, **kw)
        return (qo * ko).sum()

    with use_backend("triton"):
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = cf(q, k, wq, wk)
        gt = torch.autograd.grad(out, (q, k, wq, wk))
    (q, k, wq, wk, cos, sin), kw = make()
    qr, kr = ref.qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6, "across_heads")
    outr = (qr * kr).sum()
    gr = torch.autograd.grad(outr, (q, k, wq, wk))
    assert_close(out, outr, scale=4)
    assert_close(gt, gr, scale=4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(backend):
    cos, sin = rope_3d_tables(16, (1, 2, 3))
    q = torch.randn(1, 6, 2, 16)
    w = torch.ones(32)
    with use_backend(backend):
        with pytest.raises(ValueError, match="k must have the shape"):
            ops.qk_norm_rope(q, q[:, :5], w, w, cos, sin)
        with pytest.raises(ValueError, match="cos"):
            ops.qk_norm_rope(q[:, :5], q[:, :5], w, w, cos, sin)
        with pytest.raises(ValueError, match="q_weight"):
            ops.qk_norm_rope(q, q, torch.ones(16), w, cos, sin)
        with pytest.raises(ValueError, match="k_weight"):
            ops.qk_norm_rope(q, q, torch.ones(16), torch.ones(32), cos, sin, norm="per_head")
        with pytest.raises(ValueError, match="norm"):
            ops.qk_norm_rope(q, q, w, w, cos, sin, norm="layer")
        with pytest.raises(TypeError, match="q"):
            ops.qk_norm_rope(q.long(), q, w, w, cos, sin)
        with pytest.raises(ValueError, match="sin"):
            ops.qk_norm_rope(q, q, w, w, cos, sin[:, :4])
