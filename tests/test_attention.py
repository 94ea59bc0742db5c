"""fmrt.attention: Wan's 3D RoPE tables and the q/k path against diffusers' own Wan code (the
oracle), and the attention backend dispatch (fake flash-attn modules stand in for the CUDA
libraries: they must receive the `[B, S, H, D]` tensors exactly as given)."""
import sys
import types

import pytest
import torch

import fmrt.attention as A
from fmrt import ops, reference as ref, use_backend
from fmrt.attention import attention, backend_override, rope_3d_tables
from tests.helpers import assert_close


def _wan():
    """diffusers' Wan module (the oracle), imported when a test needs it: on an image without
    diffusers those tests skip and the rest of this file (and `pytest -m gpu`) still runs."""
    return pytest.importorskip("diffusers.models.transformers.transformer_wan")


# --- oracle: diffusers' WanRotaryPosEmbed and WanAttnProcessor ------------------------------

@pytest.mark.parametrize("head_dim,patch,latent", [(128, (1, 2, 2), (3, 10, 14)),
                                                    (64, (1, 1, 1), (5, 3, 7)),
                                                    (16, (1, 2, 2), (2, 4, 6))])
def test_rope_tables_match_diffusers(head_dim, patch, latent):
    W = _wan()
    emb = W.WanRotaryPosEmbed(head_dim, patch, max_seq_len=64)
    f, h, w = latent
    dcos, dsin = emb(torch.zeros(1, 4, f, h, w))
    grid = (f // patch[0], h // patch[1], w // patch[2])
    cos, sin = rope_3d_tables(head_dim, grid)
    S = grid[0] * grid[1] * grid[2]
    assert dcos.shape == (1, S, 1, head_dim) and cos.shape == (S, head_dim // 2)
    # diffusers repeat-interleaves: columns 2i and 2i+1 both hold angle i
    for part in (0, 1):
        assert_close(cos.double(), dcos[0, :, 0, part::2].double(), torch.float32)
        assert_close(sin.double(), dsin[0, :, 0, part::2].double(), torch.float32)


def _diffusers_qk(attn, x, rotary):
    """Run diffusers' WanAttnProcessor end to end, capturing the q, k it feeds to attention."""
    W = _wan()
    seen = {}

    def capture(query, key, value, **kw):
        seen["q"], seen["k"] = query, key
        return torch.zeros_like(query)

    orig = W.dispatch_attention_fn
    W.dispatch_attention_fn = capture
    try:
        with torch.no_grad():
            attn(x, rotary_emb=rotary)
    finally:
        W.dispatch_attention_fn = orig
    return seen["q"], seen["k"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_path_matches_diffusers_wan_attention(backend, dtype):
    W = _wan()
    H, D, grid, B = 2, 32, (2, 3, 2), 2
    torch.manual_seed(0)
    attn = W.WanAttention(H * D, heads=H, dim_head=D, eps=1e-6, processor=W.WanAttnProcessor())
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    attn = attn.to(dtype)
    emb = W.WanRotaryPosEmbed(D, (1, 1, 1), max_seq_len=16)
    rotary = emb(torch.zeros(1, 1, *grid))
    S = rotary[0].shape[1]
    x = torch.randn(B, S, H * D).to(dtype)
    dq, dk = _diffusers_qk(attn, x, rotary)
    with torch.no_grad():  # fmrt: q, k as strided views of one [B, S, 3, H, D] buffer
        qkv = torch.stack([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=2)
        q, k, _ = qkv.view(B, S, 3, H, D).unbind(2)
        cos, sin = rope_3d_tables(D, grid)
        with use_backend(backend):
            fq, fk = ops.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, cos, sin,
                                      eps=attn.norm_q.eps)
    # bf16: diffusers rounds after the norm, the weight and the rotation; fmrt once
    scale = 1.0 if dtype == torch.float32 else 2.0
    assert_close(fq, dq, scale=scale)
    assert_close(fk, dk, scale=scale)


# --- attention backends ----------------------------------------------------------------------

def _qkv(B=2, S=7, H=3, D=16, dtype=torch.float32, seed=0, Sk=None):
    g = torch.Generator().manual_seed(seed)
    Sk = S if Sk is None else Sk
    return (torch.randn(B, S, H, D, generator=g).to(dtype),
            torch.randn(B, Sk, H, D, generator=g).to(dtype),
            torch.randn(B, Sk, H, D, generator=g).to(dtype))


@pytest.fixture
def fresh_cache():
    A.clear_backend_cache()
    yield
    A.clear_backend_cache()


def _fake_flash(monkeypatch, module: str, *, returns_lse: bool):
    """Install a fake `module` whose flash_attn_func records its inputs and computes the
    reference (in fp32 here, so the test also runs on CPU)."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, **kw):
        calls.append((q, k, v, softmax_scale))
        out = ref.attention(q, k, v, scale=softmax_scale)
        return (out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])) if returns_lse else out

    mod = types.ModuleType(module)
    mod.flash_attn_func = flash_attn_func
    if "." in module:  # flash_attn.cute: the parent package must exist too
        parent = sys.modules.get("flash_attn") or types.ModuleType("flash_attn")
        monkeypatch.setitem(sys.modules, "flash_attn", parent)
        monkeypatch.setattr(parent, "cute", mod, raising=False)
    monkeypatch.setitem(sys.modules, module, mod)
    return calls


@pytest.mark.parametrize("backend,module,returns_lse", [
    ("flash_attn", "flash_attn", False), ("fa3", "flash_attn_interface", False),
    ("fa3", "flash_attn_interface", True), ("fa4", "flash_attn.cute", True)])
def test_flash_backends_dispatch(monkeypatch, fresh_cache, backend, module, returns_lse):
    calls = _fake_flash(monkeypatch, module, returns_lse=returns_lse)
    q, k, v = _qkv(dtype=torch.bfloat16, Sk=5)
    out = attention(q, k, v, backend=backend, scale=0.3)
    assert len(calls) == 1
    cq, ck, cv, cs = calls[0]
    assert cq is q and ck is k and cv is v and cs == 0.3  # [B, S, H, D] as given, no transpose
    assert_close(out, ref.attention(q, k, v, scale=0.3))


def test_flash_backend_rejects_dtype_and_head_dim(monkeypatch, fresh_cache):
    _fake_flash(monkeypatch, "flash_attn", returns_lse=False)
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="float16 / bfloat16"):
        attention(q, k, v, backend="flash_attn")
    q, k, v = _qkv(D=264, dtype=torch.float16, S=2)
    with pytest.raises(ValueError, match="head dims up to 256"):
        attention(q, k, v, backend="flash_attn")


@pytest.mark.parametrize("backend,hint", [("flash_attn", 'fmrt\\[flash\\]'),
                                          ("fa3", "source"), ("fa4", "flash-attn-4")])
def test_missing_backend_names_the_install(monkeypatch, fresh_cache, backend, hint):
    for m in ("flash_attn", "flash_attn_interface", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, m, None)  # None in sys.modules: import fails
    monkeypatch.setattr(A.importlib.util, "find_spec", lambda name, *a: None)
    q, k, v = _qkv(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=hint):
        attention(q, k, v, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_and_math_agree(dtype):
    q, k, v = _qkv(dtype=dtype, Sk=9)
    for scale in (None, 0.2):
        assert_close(attention(q, k, v, backend="sdpa", scale=scale),
                     attention(q, k, v, backend="math", scale=scale), scale=2)


def test_math_matches_explicit_softmax():
    q, k, v = _qkv(B=1, S=3, H=1, D=4)
    p = torch.softmax(q[0, :, 0] @ k[0, :, 0].T / 2.0, dim=-1)  # D^-0.5 = 1/2
    assert_close(attention(q, k, v, backend="math")[0, :, 0], p @ v[0, :, 0])


def test_auto_on_cpu_is_sdpa(monkeypatch, fresh_cache):
    _fake_flash(monkeypatch, "flash_attn", returns_lse=False)
    q, k, v = _qkv(dtype=torch.bfloat16)
    assert A.resolve_backend("auto", q) == "sdpa"
    assert_close(attention(q, k, v), attention(q, k, v, backend="sdpa"))


def test_backend_override(monkeypatch, fresh_cache):
    calls = _fake_flash(monkeypatch, "flash_attn_interface", returns_lse=False)
    q, k, v = _qkv(dtype=torch.bfloat16)
    with backend_override("fa3"):
        assert A.resolve_backend("auto", q) == "fa3"
        attention(q, k, v)
        assert A.resolve_backend("sdpa", q) == "sdpa"  # explicit backends win
        with backend_override("math"):
            assert A.resolve_backend("auto", q) == "math"
        assert A.resolve_backend("auto", q) == "fa3"
    assert len(calls) == 1 and A.resolve_backend("auto", q) == "sdpa"


def test_override_triton_falls_back_to_math(monkeypatch, fresh_cache):
    monkeypatch.delattr(ops, "flash_attention", raising=False)
    q, k, v = _qkv()
    with backend_override("triton"):
        assert A.resolve_backend("auto", q) == "math"
        out = attention(q, k, v)
    assert_close(out, ref.attention(q, k, v))
    with pytest.raises(ValueError, match="flash_attention"):
        attention(q, k, v, backend="triton")


def test_triton_backend_calls_fmrt_flash_attention(monkeypatch, fresh_cache):
    seen = []

    def fake(q, k, v, *, scale=None, mask=None):
        seen.append((q, k, v, scale))
        return ref.attention(q, k, v, scale=scale)

    monkeypatch.setattr(ops, "flash_attention", fake, raising=False)
    q, k, v = _qkv()
    with backend_override("triton"):
        out = attention(q, k, v, scale=0.5)
    assert len(seen) == 1 and seen[0][0] is q and seen[0][3] == 0.5
    assert_close(out, ref.attention(q, k, v, scale=0.5))


def test_attention_compiles_fullgraph():
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: attention(q, k, v), fullgraph=True, backend="aot_eager")
    assert_close(f(q, k, v), attention(q, k, v, backend="math"), scale=2)


def test_attention_bad_input():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="backend_override"):
        with backend_override("auto"):
            pass
    with pytest.raises(ValueError, match="q must be"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="B, H, D"):
        attention(q[..., :8], k, v)
    with pytest.raises(ValueError, match="B, S, H"):
        attention(q, k, v[:, :3])
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        attention(q, k, v.double())
    with pytest.raises(TypeError, match="q must be a floating"):
        attention(q.long(), k, v)


# --- WanSelfAttention against diffusers' WanAttention (same weights) -------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wan_self_attention_matches_diffusers(backend, monkeypatch):
    from fmrt.models.attention import WanSelfAttention

    W = _wan()
    H, D, grid, B = 2, 16, (2, 2, 3), 2
    torch.manual_seed(1)
    d = W.WanAttention(H * D, heads=H, dim_head=D, eps=1e-6, processor=W.WanAttnProcessor())
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m = WanSelfAttention(H * D, H, backend="sdpa")
    with torch.no_grad():
        m.qkv.weight.copy_(torch.cat([d.to_q.weight, d.to_k.weight, d.to_v.weight]))
        m.qkv.bias.copy_(torch.cat([d.to_q.bias, d.to_k.bias, d.to_v.bias]))
        m.o.weight.copy_(d.to_out[0].weight)
        m.o.bias.copy_(d.to_out[0].bias)
        m.norm_q.copy_(d.norm_q.weight)
        m.norm_k.copy_(d.norm_k.weight)
    rotary = W.WanRotaryPosEmbed(D, (1, 1, 1), max_seq_len=16)(torch.zeros(1, 1, *grid))
    x = torch.randn(B, rotary[0].shape[1], H * D)
    with torch.no_grad():
        want = d(x, rotary_emb=rotary)

    seen = []
    real = ops.qk_norm_rope

    def spy(q, k, *a, **kw):
        seen.append((q.stride(), k.stride(), q.data_ptr() - k.data_ptr()))
        return real(q, k, *a, **kw)

    monkeypatch.setattr(ops, "qk_norm_rope", spy)
    cos, sin = rope_3d_tables(D, grid)
    with use_backend(backend), torch.no_grad():
        got = m(x, cos, sin)
    assert_close(got, want, scale=2)
    S = x.shape[1]  # q, k reached the op as views of the fused [B, S, 3, H, D] output
    assert seen == [((S * 3 * H * D, 3 * H * D, D, 1),) * 2 + (-H * D * 4,)]


def test_wan_self_attention_bad_config():
    from fmrt.models.attention import WanSelfAttention

    with pytest.raises(ValueError, match="qk_norm"):
        WanSelfAttention(32, 2, qk_norm="layer")
    with pytest.raises(ValueError, match="backend"):
        WanSelfAttention(32, 2, backend="flash")
    with pytest.raises(ValueError, match="divisible"):
        WanSelfAttention(32, 3)


@pytest.mark.parametrize("qk_norm", ["per_head", None])
def test_wan_self_attention_norms_triton_vs_torch(qk_norm):
    from fmrt.models.attention import WanSelfAttention

    torch.manual_seed(2)
    m = WanSelfAttention(32, 2, qk_norm=qk_norm, backend="math")
    cos, sin = rope_3d_tables(16, (1, 2, 3))
    x = torch.randn(1, 6, 32)
    outs, grads = [], []
    for backend in ("torch", "triton"):
        m.zero_grad()
        with use_backend(backend):
            out = m(x, cos, sin)
            out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in m.parameters()])
    assert_close(outs[1], outs[0])
    assert_close(grads[1], grads[0], scale=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backends_agree_with_math(dtype):
    """Every backend installed on this GPU (auto included) against the fp32 math backend."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 128, generator=g, device=dev).to(dtype) for _ in range(3))
    want = attention(q, k, v, backend="math")
    for name in ("auto", "flash_attn", "fa3", "fa4", "sdpa", "triton"):
        if A.backend_available(name):
            assert_close(attention(q, k, v, backend=name), want, scale=2, msg=name)


def test_wan_self_attention_jvp_under_meanflow_override(monkeypatch, fresh_cache):
    """MeanFlow's pattern through the block: torch.func.jvp inside backend_override("triton")
    (math here when fmrt's Triton flash attention is absent), the Triton qk_norm_rope path,
    then a backward through the primal output; against the same on the reference path."""
    from fmrt.models.attention import WanSelfAttention

    monkeypatch.delattr(ops, "flash_attention", raising=False)
    torch.manual_seed(3)
    m = WanSelfAttention(32, 2)
    with torch.no_grad():
        m.norm_q.add_(0.3 * torch.randn(32))
        m.norm_k.add_(0.3 * torch.randn(32))
    cos, sin = rope_3d_tables(16, (1, 2, 3))
    x, tx = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    results = []
    for backend in ("torch", "triton"):
        m.zero_grad()
        with use_backend(backend), backend_override("triton"):
            out, tangent = torch.func.jvp(lambda x: m(x, cos, sin), (x,), (tx,))
            (out.square().sum() + tangent.detach().sum() * out.sum()).backward()
        results.append((out.detach(), tangent, [p.grad.clone() for p in m.parameters()]))
    (o_r, t_r, g_r), (o_t, t_t, g_t) = results
    assert_close(o_t, o_r)
    assert_close(t_t, t_r, scale=4)
    assert_close(g_t, g_r, scale=4)
