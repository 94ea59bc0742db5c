"""fmrt.ops.flash_attention (Triton, under the interpreter on CPU) against the math reference
`fmrt.reference.flash_attention` / torch SDPA's math backend: output, forward-mode tangent
(torch.func.jvp), gradients (also MeanFlow's jvp-then-backward), masks, strides, bad input."""
import pytest
import torch
import torch.nn.functional as F

from fmrt import ops, reference as ref, use_backend
from tests.helpers import assert_close, check_against_reference

# a reduction over S_k and D: allow a few more fp32 ulps than an elementwise op
F32_SCALE = 10.0


def _qkv(B, S_q, S_k, H, D, dtype, seed=0, tangents=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S_q, H, D, generator=g).to(dtype)
    k = torch.randn(B, S_k, H, D, generator=g).to(dtype)
    v = torch.randn(B, S_k, H, D, generator=g).to(dtype)
    if not tangents:
        return q, k, v
    tq, tk, tv = (torch.randn(t.shape, generator=g).to(dtype) for t in (q, k, v))
    return (q, k, v), (tq, tk, tv)


def _scale(dtype):
    return F32_SCALE if dtype == torch.float32 else 2.0


def _jvp_and_grads(fn, primals, tangents, cot):
    """MeanFlow's pattern: (out, tangent) = jvp(fn), then out's backward with cotangent cot
    gives the gradients of the (leaf) primals."""
    leaves = [p.detach().clone().requires_grad_() for p in primals]
    out, tan = torch.func.jvp(fn, tuple(leaves), tuple(tangents))
    assert out.requires_grad
    out.backward(cot)
    return out.detach(), tan.detach(), [p.grad for p in leaves]


def _check_jvp(primals, tangents, *, scale=None, kpm=None, mask=None, seed=1):
    dtype = primals[0].dtype
    g = torch.Generator().manual_seed(seed)
    B, S_q, H, D = primals[0].shape
    cot = torch.randn(B, S_q, H, D, generator=g).to(dtype)

    def fast(q, k, v):
        return ops.flash_attention(q, k, v, scale=scale, key_padding_mask=kpm, mask=mask)

    def slow(q, k, v):
        return ref.flash_attention(q, k, v, scale, kpm, mask)

    with use_backend("triton"):
        o, t, grads = _jvp_and_grads(fast, primals, tangents, cot)
    o_r, t_r, grads_r = _jvp_and_grads(slow, primals, tangents, cot)
    s = _scale(dtype)
    assert_close(o, o_r, scale=s, msg="output")
    assert_close(t, t_r, scale=2 * s, msg="tangent")
    for name, a, e in zip("qkv", grads, grads_r):
        assert_close(a, e, scale=2 * s, msg=f"grad {name}")
    return o, t


CASES = [  # B, S_q, S_k, H, D, dtype
    (1, 17, 17, 2, 16, torch.float32),
    (2, 40, 40, 1, 64, torch.float32),
    (1, 17, 40, 2, 16, torch.float32),   # cross-attention, S_q != S_k
    (2, 40, 17, 1, 24, torch.float32),   # head dim padded to 32
    (1, 17, 32, 2, 16, torch.float32),   # S_k a multiple of the block: the unmasked hot path
    (1, 5, 7, 2, 8, torch.float32),      # tiny: D < 16 padded, one block
    (1, 17, 17, 2, 64, torch.float16),
    (2, 17, 40, 1, 16, torch.bfloat16),
]


@pytest.mark.parametrize("B,S_q,S_k,H,D,dtype", CASES)
def test_jvp_and_grads_match_reference(B, S_q, S_k, H, D, dtype):
    primals, tangents = _qkv(B, S_q, S_k, H, D, dtype)
    o, t = _check_jvp(primals, tangents)
    assert o.is_contiguous() and o.shape == (B, S_q, H, D) and o.dtype == dtype
    assert t.shape == o.shape and t.dtype == dtype


def test_matches_sdpa_math_backend():
    (q, k, v), (tq, tk, tv) = _qkv(2, 17, 40, 2, 16, torch.float32, seed=3)

    def sdpa(a, b, c):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(a.transpose(1, 2), b.transpose(1, 2),
                                                 c.transpose(1, 2), scale=0.3)
        return out.transpose(1, 2)

    with use_backend("triton"):
        o, t = torch.func.jvp(lambda a, b, c: ops.flash_attention(a, b, c, scale=0.3),
                              (q, k, v), (tq, tk, tv))
    o_r, t_r = torch.func.jvp(sdpa, (q, k, v), (tq, tk, tv))
    assert_close(o, o_r.contiguous(), scale=F32_SCALE)
    assert_close(t, t_r.contiguous(), scale=2 * F32_SCALE)


def test_tangent_matches_finite_difference():
    # an oracle independent of autograd: (f(x + h t) - f(x - h t)) / 2h in float64 math
    (q, k, v), (tq, tk, tv) = _qkv(1, 17, 17, 1, 16, torch.float32, seed=5)
    with use_backend("triton"):
        _, t = torch.func.jvp(lambda a, b, c: ops.flash_attention(a, b, c), (q, k, v),
                              (tq, tk, tv))
    h = 1e-4
    d = [x.double() for x in (q, k, v)]
    dt = [x.double() for x in (tq, tk, tv)]
    plus = ref.attention(*(x + h * y for x, y in zip(d, dt)))
    minus = ref.attention(*(x - h * y for x, y in zip(d, dt)))
    fd = ((plus - minus) / (2 * h)).float()
    torch.testing.assert_close(t, fd, atol=1e-4, rtol=1e-4)


def test_key_padding_mask():
    primals, tangents = _qkv(2, 17, 40, 2, 16, torch.float32, seed=7)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[0, 25:] = False           # padded tail (a whole key block and a half)
    kpm[1, ::3] = False           # scattered
    _check_jvp(primals, tangents, kpm=kpm)


@pytest.mark.parametrize("kind", ["additive", "bool", "additive+padding"])
def test_masks(kind):
    primals, tangents = _qkv(2, 17, 40, 2, 16, torch.float32, seed=11)
    g = torch.Generator().manual_seed(12)
    kpm = None
    if kind == "bool":
        mask = torch.rand(2, 1, 17, 40, generator=g) > 0.3     # broadcast over heads
        mask[..., 0] = True                                    # no empty row
    else:
        mask = torch.randn(2, 17, 40, generator=g)[:, None].expand(2, 2, 17, 40) * 2.0
        mask = mask[0]                                         # [H, S_q, S_k], broadcast over B
        mask[:, :, 30:35] = float("-inf")
        if kind == "additive+padding":
            kpm = torch.ones(2, 40, dtype=torch.bool)
            kpm[1, 20:] = False
    _check_jvp(primals, tangents, kpm=kpm, mask=mask, scale=0.2)


def test_fused_qkv_views_and_strided_tangents():
    # q, k, v as views of one fused [B, S, 3, H, D] projection; tangents transposed copies
    g = torch.Generator().manual_seed(13)
    qkv = torch.randn(2, 17, 3, 2, 16, generator=g)
    tqkv = torch.randn(2, 3, 2, 17, 16, generator=g).permute(0, 3, 1, 2, 4)
    primals = qkv.unbind(2)
    tangents = tqkv.unbind(2)
    assert not any(t.is_contiguous() for t in primals + tangents)
    _check_jvp(primals, tangents)


def test_plain_forward_backward_check_against_reference():
    def make():
        (q, k, v), _ = _qkv(1, 40, 17, 2, 32, torch.float32, seed=17)
        return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()), {}

    check_against_reference(lambda q, k, v: ops.flash_attention(q, k, v),
                            lambda q, k, v: ref.flash_attention(q, k, v), make,
                            scale=F32_SCALE, grad_scale=2 * F32_SCALE)


def test_meanflow_pattern_with_upstream_parameters():
    # u = attention(W x): jvp over x, then loss(u) backward to the weights (MeanFlow's step)
    g = torch.Generator().manual_seed(19)
    B, S, H, D = 1, 17, 2, 16
    x = torch.randn(B, S, H * D, generator=g)
    tx = torch.randn(B, S, H * D, generator=g)
    w0 = torch.randn(3 * H * D, H * D, generator=g) * 0.2
    target = torch.randn(B, S, H, D, generator=g)

    def run(backend):
        lin = torch.nn.Linear(H * D, 3 * H * D, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w0)

        def f(z):
            q, k, v = lin(z).view(B, S, 3, H, D).unbind(2)
            return ops.flash_attention(q, k, v)

        with use_backend(backend):
            u, du = torch.func.jvp(f, (x,), (tx,))
            loss = ((u - (target - du).detach()) ** 2).mean()
            loss.backward()
        return u.detach(), du, lin.weight.grad

    u_t, du_t, gw_t = run("triton")
    u_r, du_r, gw_r = run("torch")
    assert_close(u_t, u_r, scale=F32_SCALE)
    assert_close(du_t, du_r, scale=2 * F32_SCALE)
    assert_close(gw_t, gw_r, scale=4 * F32_SCALE)


def test_backward_through_the_tangent_is_refused_not_wrong():
    (q, k, v), (tq, tk, tv) = _qkv(1, 17, 17, 1, 16, torch.float32, seed=47)
    with use_backend("triton"):
        _, t = torch.func.jvp(lambda a, b, c: ops.flash_attention(a, b, c),
                              (q.requires_grad_(), k, v), (tq, tk, tv))
    with pytest.raises(RuntimeError, match="flash_attention_tangent"):
        t.sum().backward()


def test_forward_ad_with_missing_tangents():
    import torch.autograd.forward_ad as fwAD
    (q, k, v), (tq, _, _) = _qkv(1, 17, 17, 1, 16, torch.float32, seed=23)
    with fwAD.dual_level():
        with use_backend("triton"):
            t = fwAD.unpack_dual(ops.flash_attention(fwAD.make_dual(q, tq), k, v)).tangent
    _, t_r = torch.func.jvp(lambda a: ref.attention(a, k, v), (q,), (tq,))
    assert_close(t, t_r, scale=2 * F32_SCALE)


def test_flash_attention_jvp_one_pass_api():
    (q, k, v), (tq, tk, tv) = _qkv(2, 17, 17, 1, 16, torch.float16, seed=29)
    with use_backend("triton"):
        o, t = ops.flash_attention_jvp(q, k, v, tq, tk, tv, scale=0.25)
    o_r, t_r = ops.flash_attention_jvp(q, k, v, tq, tk, tv, scale=0.25)   # auto: CPU -> torch
    assert_close(o, o_r, scale=2.0)
    assert_close(t, t_r, scale=4.0)


def test_fully_masked_row_gives_zero_not_nan():
    (q, k, v), (tq, tk, tv) = _qkv(1, 17, 17, 1, 16, torch.float32, seed=31)
    mask = torch.ones(17, 17, dtype=torch.bool)
    mask[3] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend("triton"):
        o, t = torch.func.jvp(lambda a, b, c: ops.flash_attention(a, b, c, mask=mask),
                              tuple(leaves), (tq, tk, tv))
        o.sum().backward()
    assert torch.all(o[0, 3] == 0) and torch.all(t[0, 3] == 0)
    assert all(torch.isfinite(p.grad).all() for p in leaves)
    o_r = ref.flash_attention(q, k, v, None, None, mask)
    keep = torch.arange(17) != 3
    assert_close(o.detach()[:, keep], o_r[:, keep], scale=F32_SCALE)


def test_compiled_jvp_is_correct_and_fullgraph_refuses():
    torch._dynamo.reset()
    (q, k, v), (tq, tk, tv) = _qkv(1, 17, 17, 1, 16, torch.float32, seed=37)

    def f(a, b, c, ta, tb, tc):
        return torch.func.jvp(lambda x, y, z: ops.flash_attention(x, y, z), (a, b, c),
                              (ta, tb, tc))

    o_r, t_r = torch.func.jvp(lambda x, y, z: ref.attention(x, y, z), (q, k, v), (tq, tk, tv))
    with use_backend("triton"):
        o, t = torch.compile(f, backend="aot_eager")(q, k, v, tq, tk, tv)
        assert_close(o, o_r, scale=F32_SCALE)
        assert_close(t, t_r, scale=2 * F32_SCALE)   # silently wrong without the graph break
        torch._dynamo.reset()
        with pytest.raises(Exception):
            torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, tq, tk, tv)
        # compiled forward / backward (no jvp) still work
        torch._dynamo.reset()
        qq = q.clone().requires_grad_()
        o2 = torch.compile(lambda a: ops.flash_attention(a, k, v) * 2, backend="aot_eager")(qq)
        o2.sum().backward()
    qr = q.clone().requires_grad_()
    (ref.attention(qr, k, v) * 2).sum().backward()
    assert_close(o2.detach(), 2 * o_r, scale=F32_SCALE)
    assert_close(qq.grad, qr.grad, scale=2 * F32_SCALE)
    torch._dynamo.reset()


def test_jvp_rule_refuses_while_compiling(monkeypatch):
    (q, k, v), (tq, tk, tv) = _qkv(1, 16, 16, 1, 16, torch.float32, seed=41)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with use_backend("triton"), pytest.raises(RuntimeError, match="torch.compile"):
        torch.func.jvp(lambda a, b, c: ops._FlashAttention.apply(a, b, c, None, None, 0.25)[0],
                       (q, k, v), (tq, tk, tv))


def test_torch_backend_path():
    (q, k, v), (tq, tk, tv) = _qkv(1, 5, 7, 2, 8, torch.float32, seed=43)
    kpm = torch.tensor([[True] * 5 + [False] * 2])
    with use_backend("torch"):
        o, t = torch.func.jvp(lambda a, b, c: ops.flash_attention(a, b, c, key_padding_mask=kpm),
                              (q, k, v), (tq, tk, tv))
    o_r = ref.attention(q, k[:, :5], v[:, :5])
    assert_close(o, o_r)


def _bad(**over):
    q, k, v = _qkv(1, 5, 7, 2, 8, torch.float32, tangents=False)
    args = dict(q=q, k=k, v=v)
    args.update(over)
    return args


BAD = [
    (dict(q=torch.ones(1, 5, 2, 8, dtype=torch.int32)), TypeError, "q must have dtype"),
    (dict(k=torch.randn(1, 7, 2, 8).half()), TypeError, "k must have the dtype of q"),
    (dict(q=torch.randn(5, 2, 8)), ValueError, r"q must be \[B, S, H, D\]"),
    (dict(v=torch.randn(1, 6, 2, 8)), ValueError, "and v .* must agree in B, S, H"),
    (dict(k=torch.randn(1, 7, 3, 8), v=torch.randn(1, 7, 3, 8)), ValueError, "k must be"),
    (dict(q=torch.randn(1, 5, 2, 300), k=torch.randn(1, 7, 2, 300), v=torch.randn(1, 7, 2, 300)),
     ValueError, "head dim"),
    (dict(q="x"), TypeError, "q must be a torch.Tensor"),
    (dict(scale="0.5"), TypeError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(key_padding_mask=torch.ones(1, 7)), TypeError, "key_padding_mask must be a bool"),
    (dict(key_padding_mask=torch.ones(1, 5, dtype=torch.bool)), ValueError,
     "key_padding_mask must be"),
    (dict(mask=torch.ones(5, 7, dtype=torch.int64)), TypeError, "mask must be a float"),
    (dict(mask=torch.ones(3, 5, 7)), ValueError, "mask of shape"),
    (dict(mask=torch.ones(1, 1, 1, 1, 7)), ValueError, "mask of shape"),
    (dict(mask=[1.0]), TypeError, "mask must be a tensor"),
]


@pytest.mark.parametrize("over,exc,match", BAD)
def test_bad_inputs(over, exc, match):
    args = _bad(**over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    for backend in ("torch", "triton"):
        with use_backend(backend), pytest.raises(exc, match=match):
            ops.flash_attention(q, k, v, **args)


def test_mask_requiring_grad_is_refused_on_triton():
    q, k, v = _qkv(1, 5, 7, 2, 8, torch.float32, tangents=False)
    mask = torch.zeros(5, 7, requires_grad=True)
    with use_backend("triton"), pytest.raises(ValueError, match="mask requires grad"):
        ops.flash_attention(q, k, v, mask=mask)


def test_bad_tangent_for_one_pass_api():
    (q, k, v), (tq, tk, tv) = _qkv(1, 5, 7, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="tk must have the shape of k"):
        ops.flash_attention_jvp(q, k, v, tq, tk[:, :3], tv)


def _rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    return ((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S_q,S_k,padded", [(300, 300, False), (257, 131, True), (512, 512, False)])
def test_gpu_jvp_and_grads(dtype, D, S_q, S_k, padded):
    """Compiled CUDA kernels (real tiles, tensor cores) against the fp32 reference: relative
    L2 errors at the level of the dtype's rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    B, H = 2, 3
    q, tq, cot = rnd(B, S_q, H, D), rnd(B, S_q, H, D), rnd(B, S_q, H, D)
    k, v, tk, tv = (rnd(B, S_k, H, D) for _ in range(4))
    kpm = None
    if padded:
        kpm = torch.ones(B, S_k, dtype=torch.bool, device="cuda")
        kpm[1, S_k // 2:] = False
    with use_backend("triton"):
        o, t, grads = _jvp_and_grads(
            lambda a, b, c: ops.flash_attention(a, b, c, key_padding_mask=kpm), (q, k, v),
            (tq, tk, tv), cot)
        o1, t1 = ops.flash_attention_jvp(q, k, v, tq, tk, tv, key_padding_mask=kpm)
    f32 = [x.float() for x in (q, k, v, tq, tk, tv, cot)]
    o_r, t_r, grads_r = _jvp_and_grads(
        lambda a, b, c: ref.flash_attention(a, b, c, None, kpm), f32[:3], f32[3:6], f32[6])
    bound = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert _rel_err(o, o_r) < bound and _rel_err(o1, o_r) < bound
    assert _rel_err(t, t_r) < 2 * bound and _rel_err(t1, t_r) < 2 * bound
    for a, e in zip(grads, grads_r):
        assert _rel_err(a, e) < 2 * bound


@pytest.mark.parametrize("kind", ["jvp", "tangent"])
def test_fp32_d128_tangent_tiles_are_the_ones_that_ran_on_the_h200(monkeypatch, kind):
    # with 8 warps both kernels hit an illegal memory access on an H200 (triton 3.6); 4 warps
    # ran correctly there (benchmarks/results/NVIDIA_H200_diag_attention_fp32_d128.json)
    import fmrt.kernels.attention as KA
    monkeypatch.setattr(KA, "_interpreted", lambda t: False)
    bm, bn, bd, warps, stages, f32, prec = KA._config(torch.empty(1, 1, 1, 128), kind)
    assert (bm, bn, bd, warps, stages, f32, prec) == (64, 16, 128, 4, 2, True, "tf32x3")
    assert KA._config(torch.empty(1, 1, 1, 64), kind)[3] == 8   # D 64 ran with 8
