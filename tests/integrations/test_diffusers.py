"""fmrt.integrations.diffusers against diffusers' own Wan transformer (the oracle): a tiny random
WanTransformer3DModel gives the same output and parameter gradients with FmrtWanAttnProcessor
(torch reference and, under the Triton interpreter, the qk_norm_rope kernel), and every
unsupported case falls back to diffusers' result."""
import pytest
import torch

from fmrt import use_backend
from fmrt.integrations.diffusers import FmrtWanAttnProcessor, disable_fmrt, enable_fmrt

from diffusers.models.transformers import transformer_wan as W

TOL = dict(atol=2e-5, rtol=1e-5)


def _model(**kw) -> W.WanTransformer3DModel:
    torch.manual_seed(0)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
               out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
               rope_max_seq_len=32)
    cfg.update(kw)
    m = W.WanTransformer3DModel(**cfg).float()
    with torch.no_grad():  # non-trivial norm weights, so a dropped weight would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.RMSNorm) and mod.weight is not None:
                mod.weight.uniform_(0.5, 1.5)
    return m


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 7, 32, generator=g)
    return x, t, ctx


def _run(model, grad=False):
    x, t, ctx = _inputs()
    model.zero_grad(set_to_none=True)
    out = model(x, t, ctx, return_dict=False)[0]
    if not grad:
        return out.detach(), None
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def _count_fmrt(model):
    return sum(isinstance(getattr(m, "processor", None), FmrtWanAttnProcessor)
               for m in model.modules())


@pytest.fixture(scope="module")
def oracle():
    model = _model()
    return _run(model, grad=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_and_grads_match_diffusers(oracle, backend):
    want, want_grads = oracle
    model = _model()
    assert enable_fmrt(model) == 2  # one self-attention (attn1) per block; attn2 untouched
    assert _count_fmrt(model) == 2
    assert all(not isinstance(b.attn2.processor, FmrtWanAttnProcessor) for b in model.blocks)
    with use_backend(backend):
        got, got_grads = _run(model, grad=True)
    torch.testing.assert_close(got, want, **TOL)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL, msg=name)
    # the norm weights do get gradients through the fused op
    assert got_grads["blocks.0.attn1.norm_q.weight"].abs().sum() > 0


def test_processor_is_actually_used(monkeypatch):
    """Guards against a silent fallback making the match above vacuous."""
    import fmrt.integrations.diffusers as D
    calls = []
    real = D.ops.qk_norm_rope
    monkeypatch.setattr(D.ops, "qk_norm_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model()
    enable_fmrt(model)
    _run(model)
    assert len(calls) == 2


def test_disable_restores_default():
    model = _model()
    want, _ = _run(model)
    enable_fmrt(model)
    assert disable_fmrt(model) == 2
    assert _count_fmrt(model) == 0
    assert all(type(b.attn1.processor) is W.WanAttnProcessor for b in model.blocks)
    got, _ = _run(model)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _attn_call(attn, *args, **kw):
    torch.manual_seed(3)
    return attn.processor(attn, *args, **kw)


def test_fallbacks_give_diffusers_result(monkeypatch):
    import fmrt.integrations.diffusers as D
    monkeypatch.setattr(D.ops, "qk_norm_rope",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("not a fallback")))
    model = _model()
    attn = model.blocks[0].attn1
    g = torch.Generator().manual_seed(4)
    S, C = 24, 64
    h = torch.randn(1, S, C, generator=g)
    cos, sin = W.WanRotaryPosEmbed(32, (1, 2, 2), 32)(torch.zeros(1, 4, 3, 4, 8))
    assert cos.shape == (1, S, 1, 32)
    mask = torch.rand(1, 1, S, S, generator=g) > 0.3
    mask[..., 0] = True
    ctx = torch.randn(1, 5, C, generator=g)
    diff, fm = W.WanAttnProcessor(), FmrtWanAttnProcessor()
    cases = [dict(attention_mask=mask, rotary_emb=(cos, sin)),  # a mask
             dict(rotary_emb=None),                             # no rotary
             dict(encoder_hidden_states=ctx)]                   # cross-attention on attn1
    for kw in cases:
        want = diff(attn, h, **kw)
        got = fm(attn, h, **kw)
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    # cross-attention module (attn2) and an unsupported norm: not enabled, and fallback if forced
    cross = model.blocks[0].attn2
    assert not FmrtWanAttnProcessor.supports(cross)
    torch.testing.assert_close(fm(cross, h, encoder_hidden_states=ctx),
                               diff(cross, h, encoder_hidden_states=ctx), atol=0, rtol=0)
    attn.norm_q = torch.nn.LayerNorm(C, eps=1e-6)
    assert not FmrtWanAttnProcessor.supports(attn)
    torch.testing.assert_close(fm(attn, h, rotary_emb=(cos, sin)),
                               diff(attn, h, rotary_emb=(cos, sin)), atol=0, rtol=0)
    assert enable_fmrt(model) == 1  # only block 1's attn1 left supported


def test_i2v_image_branch_falls_back():
    model = _model(added_kv_proj_dim=64, image_dim=16)
    assert enable_fmrt(model) == 2  # attn1 supported; attn2 (image branch) keeps diffusers'
    attn2 = model.blocks[0].attn2
    assert attn2.add_k_proj is not None and not FmrtWanAttnProcessor.supports(attn2)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, 6, 64, generator=g)
    ctx = torch.randn(1, 3 + 512, 64, generator=g)
    torch.testing.assert_close(FmrtWanAttnProcessor()(attn2, h, encoder_hidden_states=ctx),
                               W.WanAttnProcessor()(attn2, h, encoder_hidden_states=ctx),
                               atol=0, rtol=0)


def test_fused_projections_match():
    model = _model()
    want, _ = _run(model)
    for b in model.blocks:
        b.attn1.fuse_projections()
    enable_fmrt(model)
    got, _ = _run(model)
    torch.testing.assert_close(got, want, **TOL)
