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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_head_and_padded_head_dim(dtype):
    # H = 1 (BLOCK_H 1) and D = 24 (BLOCK_D 32: masked tail pairs)
    for norm in ("across_heads", "per_head"):
        check_against_reference(ops.qk_norm_rope, _ref, _make(1, (2, 2, 1), 1, 24, dtype, norm))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("H", [12, 40, 17])
def test_head_chunks(norm, H):
    # the forward walks 12 heads in 3 chunks of 4 and 40 in 5 of 8 at D = 8 (no padded lanes); 17
    # heads would take 17 chunks of 1: one padded chunk of 32 instead
    check_against_reference(ops.qk_norm_rope, _ref, _make(2, (1, 2, 1), H, 8, torch.float32, norm))


@pytest.mark.parametrize("norm", NORMS)
def test_backward_without_prefetch(norm, monkeypatch):
    # the loop Wan 14B's backward compiles to (no room for the prefetched row)
    from fmrt.kernels import rope as K
    real = K._bwd_blocks
    monkeypatch.setattr(K, "_bwd_blocks", lambda H, D: real(H, D)[:3] + (False,))
    check_against_reference(ops.qk_norm_rope, _ref, _make(3, (1, 3, 2), 3, 16, torch.float32,
                                                          norm))


def test_block_choice():
    from fmrt.kernels import rope as K
    assert K._fwd_blocks(12, 128) == (4, 128, 3, 2)      # 512-element chunks, 2 warps
    assert K._fwd_blocks(40, 128) == (4, 128, 10, 2)     # 10 chunks of 4 heads
    assert K._fwd_blocks(40, 8) == (8, 8, 5, 1)
    assert K._fwd_blocks(17, 128)[:3] == (32, 128, 1)    # padded fallback
    assert K._fwd_blocks(3, 12)[:3] == (1, 16, 3)
    assert K._bwd_blocks(12, 128) == (16, 128, 8, True)     # 8 warps, next row prefetched
    assert K._bwd_blocks(40, 128) == (64, 128, 32, False)    # 64 registers: no room to prefetch
    assert K._bwd_blocks(2, 64) == (2, 64, 1, True)


def test_backward_grid_fills_the_device_once(monkeypatch):
    from fmrt.kernels import rope as K
    monkeypatch.setattr(K, "_sm_count", lambda index: 132)   # an H100 / H200
    cuda = torch.device("cuda", 0)
    # 4 warps x 128 registers: 4 programs per SM, q and k share them -> 264 per tensor
    assert K._backward_programs(32760, cuda, 4) == 264
    assert K._backward_programs(32760, cuda, 8) == 132       # 256 threads: two per SM
    assert K._backward_programs(32760, cuda, 32) == 66       # 1024 x 64 registers: one per SM
    assert K._backward_programs(10, cuda, 4) == 10           # never more than rows
    assert K._backward_programs(32760, torch.device("cpu"), 4) == 8


@pytest.mark.parametrize("norm", NORMS)
def test_head_dim_12(norm):
    # D = 12: 6 rotary pairs (not a power of 2), Wan's 3D split 4/4/4; H = 3 (BLOCK_H 4)
    check_against_reference(ops.qk_norm_rope, _ref, _make(2, (2, 2, 3), 3, 12, torch.float32, norm))


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


@pytest.mark.parametrize("norm", NORMS)
def test_jvp_matches_reference(norm):
    # forward mode (MeanFlow's torch.func.jvp through the DiT) with tangents on q, k and weights,
    # then a backward through the primal outputs after the jvp (MeanFlow's pattern)
    (q, k, wq, wk, cos, sin), kw = _make(2, (1, 2, 3), 2, 16, torch.float32, norm)()
    g = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(t.shape, generator=g) for t in (q, k, wq, wk))

    def run(fn):
        return torch.func.jvp(lambda a, b, c, d: fn(a, b, c, d, cos, sin, **kw),
                              (q, k, wq, wk), tangents)

    with use_backend("triton"):
        out_t, tan_t = run(ops.qk_norm_rope)
        grads_t = torch.autograd.grad(out_t[0].sum() + out_t[1].square().sum(), (q, k, wq, wk),
                                      allow_unused=True)
    out_r, tan_r = run(_ref)
    grads_r = torch.autograd.grad(out_r[0].sum() + out_r[1].square().sum(), (q, k, wq, wk),
                                  allow_unused=True)
    assert_close(out_t, out_r)
    assert_close(tan_t, tan_r, scale=4)
    assert_close(grads_t, grads_r, scale=4)


@pytest.mark.parametrize("norm", NORMS)
def test_forward_ad_dual_level_matches_reference(norm):
    # forward mode through torch.autograd.forward_ad (no functorch transform): the eager fast
    # path must not be taken while a dual level is open (it saves nothing for the jvp rule)
    import torch.autograd.forward_ad as fwAD
    (q, k, wq, wk, cos, sin), kw = _make(2, (1, 2, 3), 2, 16, torch.float32, norm)()
    g = torch.Generator().manual_seed(7)
    tq, tk = (torch.randn(t.shape, generator=g) for t in (q, k))

    def run(fn):
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(q.detach(), tq), fwAD.make_dual(k.detach(), tk),
                     wq.detach(), wk.detach(), cos, sin, **kw)
            return tuple(fwAD.unpack_dual(o).tangent for o in out)

    with use_backend("triton"):
        tan_t = run(ops.qk_norm_rope)
    assert_close(tan_t, run(_ref), scale=4)


def test_rms_norm_jvp_is_the_derivative():
    g = torch.Generator().manual_seed(6)
    x, tx = torch.randn(2, 3, 2, 8, generator=g), torch.randn(2, 3, 2, 8, generator=g)
    for norm, n in (("across_heads", 16), ("per_head", 8)):
        w, tw = torch.randn(n, generator=g), torch.randn(n, generator=g)
        _, want = torch.func.jvp(lambda a, b: ref.rms_norm(a, b, norm, 1e-6), (x, w), (tx, tw))
        assert_close(ref.rms_norm_jvp(x, w, tx, tw, norm, 1e-6), want)


_AOT_SCRIPT = r'''
import json, re
from collections import Counter
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fmrt.kernels import rope as K

def comp(fn, ptr_type, const, warps):
    # signature in the kernel's argument order: pointers, i32 sizes / strides, fp32 eps; what
    # Triton specialises at run time: ints equal to 1 (unit strides), multiples of 16 (D = 128)
    sig = {}
    for n in fn.arg_names:
        sig[n] = ("constexpr" if n in const else "fp32" if n == "eps" else
                  ptr_type.get(n, "*bf16") if n.endswith("_ptr") else "i32")
    names = list(sig)
    div = [n for n in names if n.endswith(("_sb", "_ss", "_sh")) or n in ("D", "part_n")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if sig[n].startswith("*") or n in div}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = k.asm["ptx"]
    return [Counter(re.findall(r"ld\.global[\.\w]*", ptx)),
            Counter(re.findall(r"st\.global[\.\w]*", ptx))]

out = {}
fp32 = {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "part_ptr": "*fp32"}
for case, H in (("wan1.3b", 12), ("wan14b", 40)):
    common = dict(NORM=1, HAS_WQ=True, HAS_WK=True, c_sp=1, s_sp=1, q_sd=1, k_sd=1)
    BH, BD, NC, W = K._fwd_blocks(H, 128)
    out["fwd_" + case] = comp(K._qk_norm_rope_fwd_kernel, fp32,
                              dict(common, BLOCK_H=BH, BLOCK_D=BD, N_CHUNKS=NC), W)
    BH, BD, W, PF = K._bwd_blocks(H, 128)
    out["bwd_" + case] = comp(K._qk_norm_rope_bwd_kernel, fp32,
                              dict(common, BLOCK_H=BH, BLOCK_D=BD, gq_sd=1, gk_sd=1,
                                   NEED_DW=True, PREFETCH=PF), W)
print(json.dumps(out))
'''


def test_kernels_compile_for_h100_with_vector_memory_ops():
    """Compile the rope kernels for sm_90 ahead of time at Wan's shapes (no GPU needed; the
    interpreter never lowers them) and check that the bf16 rows (unit inner stride, as in a
    fused qkv view) are loaded and stored as 128-bit vectors."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out) == 4
    for name, (loads, stores) in out.items():
        assert loads.get("ld.global.v4.b32", 0) > 0, (name, loads)
        assert stores.get("st.global.v4.b32", 0) > 0, (name, stores)
        assert not any(k.endswith(".b16") for k in list(loads) + list(stores)), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H", [12, 40])
def test_on_cuda_at_wan_head_counts(dtype, H):
    """The compiled kernels (not the interpreter) against the reference, forward and
    gradients, at Wan's head counts (forward chunks of 4 / 8 heads, backward tiles of 16 / 64
    heads) and S = 21 x 8 x 8: 1344 rows per tensor, several rows per backward program."""
    dev = torch.device("cuda")
    cos, sin = rope_3d_tables(128, (21, 8, 8), device=dev)
    S = cos.shape[0]

    def make():
        g = torch.Generator(device=dev).manual_seed(0)
        qkv = torch.randn(2, S, 3, H, 128, generator=g, device=dev).to(dtype).requires_grad_()
        q, k, _ = qkv.unbind(2)
        wq = (1 + 0.5 * torch.randn(H * 128, generator=g, device=dev)).requires_grad_()
        wk = (1 + 0.5 * torch.randn(H * 128, generator=g, device=dev)).requires_grad_()
        return (q, k, wq, wk, cos, sin), dict(eps=1e-6, norm="across_heads")

    args, kw = make()
    qo, ko = ops.qk_norm_rope(*args, **kw)  # auto picks Triton on CUDA
    qr, kr = _ref(*make()[0], **kw)
    assert_close((qo, ko), (qr, kr))
    # weight gradients sum over 2 * S rows: compare relative to their size
    check_against_reference(ops.qk_norm_rope, _ref, make, grad_scale=16)
