"""fmrt.ops.flash_attention (Triton, interpreter on CPU) against the math reference and torch's
math SDPA: output, forward-mode tangent (torch.func.jvp), gradients, masks, strides, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmrt import ops, reference as ref, use_backend
from tests.helpers import assert_close

# (B, S_q, S_k, H, D): S not a multiple of the 16-wide interpreter blocks, D padded (24).
CASES = [
    (1, 17, 17, 2, 16),
    (2, 40, 40, 1, 64),
    (2, 17, 40, 1, 16),
    (1, 17, 17, 1, 24),
]


def _inputs(B, S_q, S_k, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S_q, H, D, generator=g)
    k = torch.randn(B, S_k, H, D, generator=g)
    v = torch.randn(B, S_k, H, D, generator=g)
    tq = torch.randn(B, S_q, H, D, generator=g)
    tk = torch.randn(B, S_k, H, D, generator=g)
    tv = torch.randn(B, S_k, H, D, generator=g)
    return [t.to(dtype) for t in (q, k, v)], [t.to(dtype) for t in (tq, tk, tv)]


def _jvp(fn, primals, tangents):
    return torch.func.jvp(fn, tuple(primals), tuple(tangents))


def _sdpa_math(q, k, v, mask=None, scale=None):
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


@pytest.mark.parametrize("case", CASES)
def test_jvp_matches_reference_fp32(case):
    p, t = _inputs(*case, torch.float32)
    with use_backend("triton"):
        out, tan = _jvp(lambda a, b, c: ops.flash_attention(a, b, c), p, t)
    r_out, r_tan = _jvp(lambda a, b, c: ref.attention(a, b, c), p, t)
    assert_close(out, r_out, msg="out")
    assert_close(tan, r_tan, scale=2.0, msg="tangent")
    # an independent oracle: torch's math SDPA, forward-mode AD
    s_out, s_tan = _jvp(_sdpa_math, p, t)
    assert_close(out, s_out, msg="out vs sdpa")
    assert_close(tan, s_tan, scale=2.0, msg="tangent vs sdpa")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_jvp_half_types(dtype):
    p, t = _inputs(2, 17, 17, 1, 16, dtype)
    with use_backend("triton"):
        out, tan = _jvp(lambda a, b, c: ops.flash_attention(a, b, c), p, t)
    r_out, r_tan = _jvp(lambda a, b, c: ref.attention(a, b, c), p, t)
    assert out.dtype == dtype and tan.dtype == dtype
    assert_close(out, r_out)
    assert_close(tan, r_tan)


def test_tangent_matches_finite_difference():
    # The tangent is the directional derivative: (f(x + e t) - f(x - e t)) / 2e in float64.
    p, t = _inputs(1, 17, 17, 1, 16, torch.float32, seed=3)
    with use_backend("triton"):
        _, tan = _jvp(lambda a, b, c: ops.flash_attention(a, b, c), p, t)
    eps = 1e-4
    pd, td = [x.double() for x in p], [x.double() for x in t]
    plus = ref.attention(*[a + eps * b for a, b in zip(pd, td)])
    minus = ref.attention(*[a - eps * b for a, b in zip(pd, td)])
    torch.testing.assert_close(tan.double(), (plus - minus) / (2 * eps), atol=1e-4, rtol=1e-4)


def test_partial_tangents():
    # Only q carries a tangent (k, v constants): the jvp rule fills zeros.
    p, t = _inputs(1, 17, 17, 2, 16, torch.float32)
    with use_backend("triton"):
        _, tan = torch.func.jvp(lambda a: ops.flash_attention(a, p[1], p[2]), (p[0],), (t[0],))
    _, r_tan = torch.func.jvp(lambda a: ref.attention(a, p[1], p[2]), (p[0],), (t[0],))
    assert_close(tan, r_tan, scale=2.0)


@pytest.mark.parametrize("case,dtype", [(CASES[0], torch.float32), (CASES[2], torch.float32),
                                        (CASES[3], torch.float32), (CASES[0], torch.bfloat16)])
def test_gradients_match_reference(case, dtype):
    p, _ = _inputs(*case, dtype)
    g = torch.Generator().manual_seed(7)
    cot = torch.randn(p[0].shape, generator=g).to(dtype)
    a = [x.clone().requires_grad_() for x in p]
    with use_backend("triton"):
        out = ops.flash_attention(*a, scale=0.3)
    grads = torch.autograd.grad(out, a, cot)
    b = [x.clone().requires_grad_() for x in p]
    r_grads = torch.autograd.grad(ref.attention(*b, scale=0.3), b, cot)
    for i, (x, y) in enumerate(zip(grads, r_grads)):
        assert x.dtype == dtype
        assert_close(x, y, scale=4.0, msg=f"grad {i}")


def test_backward_after_jvp_meanflow_pattern():
    # MeanFlow: jvp gives (u, du/dt); the loss backprops through the primal u only.
    p, t = _inputs(2, 17, 17, 1, 16, torch.float32, seed=5)
    cot = torch.randn(p[0].shape, generator=torch.Generator().manual_seed(1))
    a = [x.clone().requires_grad_() for x in p]
    with use_backend("triton"):
        out, tan = _jvp(lambda x, y, z: ops.flash_attention(x, y, z), a, t)
    grads = torch.autograd.grad((out * cot).sum() + 0 * tan.detach().sum(), a)
    b = [x.clone().requires_grad_() for x in p]
    r_grads = torch.autograd.grad(ref.attention(*b), b, cot)
    for i, (x, y) in enumerate(zip(grads, r_grads)):
        assert_close(x, y, scale=4.0, msg=f"grad {i}")


def _masks(B, H, S_q, S_k):
    g = torch.Generator().manual_seed(11)
    keep = torch.ones(B, S_k, dtype=torch.bool)
    keep[0, 5:9] = False
    keep[-1, -7:] = False
    full_bool = torch.rand(B, H, S_q, S_k, generator=g) > 0.3
    full_bool[..., 0] = True  # no fully masked row
    return {
        "additive_1H": torch.randn(1, H, S_q, S_k, generator=g),
        "additive_B1": torch.randn(B, 1, S_q, S_k, generator=g),
        "bool_4d": full_bool,
        "key_padding": keep,
    }


@pytest.mark.parametrize("kind", ["additive_1H", "additive_B1", "bool_4d", "key_padding"])
def test_masks_jvp_and_grad(kind):
    B, S_q, S_k, H, D = 2, 17, 20, 2, 16
    p, t = _inputs(B, S_q, S_k, H, D, torch.float32, seed=2)
    mask = _masks(B, H, S_q, S_k)[kind]
    ref_mask = mask[:, None, None, :] if kind == "key_padding" else mask
    with use_backend("triton"):
        out, tan = _jvp(lambda a, b, c: ops.flash_attention(a, b, c, mask=mask), p, t)
    s_out, s_tan = _jvp(lambda a, b, c: _sdpa_math(a, b, c, mask=ref_mask), p, t)
    assert_close(out, s_out, msg="out")
    assert_close(tan, s_tan, scale=2.0, msg="tangent")
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    a = [x.clone().requires_grad_() for x in p]
    with use_backend("triton"):
        grads = torch.autograd.grad(ops.flash_attention(*a, mask=mask), a, cot)
    b = [x.clone().requires_grad_() for x in p]
    r_grads = torch.autograd.grad(ref.attention(*b, mask=ref_mask), b, cot)
    for i, (x, y) in enumerate(zip(grads, r_grads)):
        assert_close(x, y, scale=4.0, msg=f"grad {i}")


def test_non_contiguous_inputs():
    # q, k, v as views of a fused qkv projection [B, S, 3, H, D] and a [B, H, S, D] transpose.
    g = torch.Generator().manual_seed(9)
    B, S, H, D = 2, 17, 2, 16
    qkv = torch.randn(B, S, 3, H, D, generator=g)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    v = torch.randn(B, H, S, D, generator=g).transpose(1, 2)
    tq = torch.randn(B, H, S, D, generator=g).transpose(1, 2)
    tk, tv = torch.randn(B, S, H, 2 * D, generator=g)[..., ::2], torch.randn(B, S, H, D, generator=g)
    assert not (q.is_contiguous() or v.is_contiguous() or tk.is_contiguous())
    with use_backend("triton"):
        out, tan = _jvp(lambda a, b, c: ops.flash_attention(a, b, c), (q, k, v), (tq, tk, tv))
    r_out, r_tan = _jvp(lambda a, b, c: ref.attention(a, b, c), (q, k, v), (tq, tk, tv))
    assert_close(out, r_out)
    assert_close(tan, r_tan, scale=2.0)
    a = [x.clone().requires_grad_() for x in (q, k, v)]
    a_views = [a[0], a[1], a[2]]
    with use_backend("triton"):
        grads = torch.autograd.grad(ops.flash_attention(*[x.transpose(1, 2).transpose(1, 2)
                                                          for x in a_views]).sum(), a)
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    r_grads = torch.autograd.grad(ref.attention(*b).sum(), b)
    for x, y in zip(grads, r_grads):
        assert_close(x, y, scale=4.0)


def test_torch_backend_is_the_reference():
    p, t = _inputs(1, 17, 17, 1, 16, torch.float32)
    with use_backend("torch"):
        out, tan = _jvp(lambda a, b, c: ops.flash_attention(a, b, c), p, t)
    r_out, r_tan = _jvp(lambda a, b, c: ref.attention(a, b, c), p, t)
    assert torch.equal(out, r_out) and torch.equal(tan, r_tan)


def test_jvp_under_compile_is_refused_or_correct():
    # PEERS.md: compiled torch.func.jvp over a custom Function gave wrong tangents silently.
    # fmrt keeps the op out of dynamo (graph break -> the transform runs eagerly), and its jvp
    # rule refuses if ever traced; either way no wrong tangent.
    p, t = _inputs(1, 17, 17, 1, 16, torch.float32)

    def run(a, b, c, ta, tb, tc):
        return torch.func.jvp(lambda x, y, z: ops.flash_attention(x, y, z), (a, b, c),
                              (ta, tb, tc))

    torch._dynamo.reset()
    ops._flash_custom_ops()  # ops already registered: the case that went wrong
    with use_backend("triton"):
        try:
            _, tan = torch.compile(run, backend="eager")(*p, *t)
        except Exception as e:  # noqa: BLE001
            assert "torch.compile" in str(e)
            return
    _, r_tan = _jvp(lambda a, b, c: ref.attention(a, b, c), p, t)
    assert_close(tan, r_tan, scale=2.0)


def test_bad_input():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(TypeError, match="q"):
        ops.flash_attention(q.double(), q, q)
    with pytest.raises(TypeError, match="k"):
        ops.flash_attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="q"):
        ops.flash_attention(q[0], q, q)
    with pytest.raises(ValueError, match="v"):
        ops.flash_attention(q, q, torch.randn(1, 5, 2, 16))
    with pytest.raises(ValueError, match="k"):
        ops.flash_attention(q, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16))
    big = torch.randn(1, 4, 1, 320)
    with pytest.raises(ValueError, match="head dim"):
        ops.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="scale"):
        ops.flash_attention(q, q, q, scale=-1.0)
    with pytest.raises(ValueError, match="mask"):
        ops.flash_attention(q, q, q, mask=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="mask"):
        ops.flash_attention(q, q, q, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        ops.flash_attention(q, q, q, mask=torch.zeros(1, 1, 4, 4, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_blocks(D, dtype):
    # The real tile sizes (64 / 128): S not a multiple, a key-padding mask, jvp then backward.
    B, S, H = 2, 300, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: torch.randn(B, S, H, D, generator=g, device="cuda").to(dtype)  # noqa: E731
    p, t = [mk() for _ in range(3)], [mk() for _ in range(3)]
    keep = torch.ones(B, S, dtype=torch.bool, device="cuda")
    keep[1, -50:] = False
    a = [x.clone().requires_grad_() for x in p]
    out, tan = _jvp(lambda x, y, z: ops.flash_attention(x, y, z, mask=keep), a, t)
    cot = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    grads = torch.autograd.grad(out, a, cot)
    b = [x.float().clone().requires_grad_() for x in p]
    m4 = keep[:, None, None, :]
    r_out, r_tan = _jvp(lambda x, y, z: ref.attention(x, y, z, mask=m4), b, [x.float() for x in t])
    r_grads = torch.autograd.grad(r_out, b, cot.float())
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    for x, y in zip((out, tan, *grads), (r_out, r_tan, *r_grads)):
        torch.testing.assert_close(x.float(), y.detach(), **tol)
