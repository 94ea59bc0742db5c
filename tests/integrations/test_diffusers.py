"""fmrt.integrations.diffusers.accelerate_wan against diffusers' own Wan transformer (the oracle):
tiny random WanTransformer3DModels (head dims 12, 24, 32; T2V and I2V) give the untouched model's
output and parameter gradients with FmrtWanAttnProcessor on every attention module (torch
reference and, under the Triton interpreter, fmrt's kernels), the fmrt path (not the fallback)
is what ran, restore_wan is exact, and bad input raises before anything is patched."""
import copy
import functools
import types

import pytest
import torch

# an image without diffusers skips this module instead of failing the whole collection
W = pytest.importorskip("diffusers.models.transformers.transformer_wan")

from fmrt import use_backend  # noqa: E402
from fmrt.integrations.diffusers import (FmrtWanAttnProcessor, accelerate_wan,  # noqa: E402
                                         restore_wan)
from tests.helpers import tol  # noqa: E402

FP32 = dict(atol=2e-5, rtol=1e-5)
TEXT_LEN, N_IMG = 7, 3


def _model(D: int = 24, H: int = 2, layers: int = 1, i2v: bool = False,
           dtype: torch.dtype = torch.float32) -> W.WanTransformer3DModel:
    """A tiny random Wan transformer (seeded), RMSNorm weights away from 1."""
    torch.manual_seed(0)
    extra = dict(added_kv_proj_dim=H * D, image_dim=12) if i2v else {}
    m = W.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=H, attention_head_dim=D,
                                in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                                ffn_dim=32, num_layers=layers, rope_max_seq_len=16, **extra)
    with torch.no_grad():  # non-trivial norm weights, so a dropped weight would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.RMSNorm) and mod.weight is not None:
                mod.weight.uniform_(0.5, 1.5)
    return m.to(dtype)


def _inputs(i2v: bool, dtype: torch.dtype = torch.float32) -> dict:
    """Latents `[1, 4, 3, 8, 8]` (48 tokens), a text context; I2V: 512 text tokens (diffusers'
    split) and image embeddings."""
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g),
              timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 512 if i2v else TEXT_LEN, 16, generator=g))
    if i2v:
        kw["encoder_hidden_states_image"] = torch.randn(1, N_IMG, 12, generator=g)
    return {k: (v.to(dtype) if k != "timestep" else v) for k, v in kw.items()}


def _run(model, i2v: bool = False, grad: bool = True):
    """Output and {name: grad} of every parameter (a fixed random cotangent)."""
    dtype = next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    out = model(**_inputs(i2v, dtype), return_dict=False)[0]
    if not grad:
        return out.detach(), None
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


@functools.lru_cache(maxsize=None)
def _oracle(D: int, H: int, layers: int = 1, i2v: bool = False, dtype=torch.float32):
    """The untouched diffusers model's output and gradients."""
    return _run(_model(D, H, layers, i2v, dtype), i2v)


def _processors(model):
    return [m.processor for m in model.modules() if isinstance(m, W.WanAttention)]


def _calls(model) -> tuple[int, int]:
    """(fmrt path, fallback) calls summed over the model's FmrtWanAttnProcessors."""
    ps = [p for p in _processors(model) if isinstance(p, FmrtWanAttnProcessor)]
    return sum(p.fmrt_calls for p in ps), sum(p.fallback_calls for p in ps)


def _assert_grads(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("D,H", [(12, 2), (24, 3), (32, 2)])
def test_t2v_matches_diffusers(D, H, backend):
    want, want_grads = _oracle(D, H)
    model = _model(D, H)
    assert accelerate_wan(model) == 2  # attn1 (self, RoPE) and attn2 (cross)
    with use_backend(backend):
        got, got_grads = _run(model)
    torch.testing.assert_close(got, want, **FP32)
    _assert_grads(got_grads, want_grads, **FP32)
    assert _calls(model) == (2, 0)
    for n in ("attn1.norm_q", "attn1.norm_k", "attn2.norm_q", "attn2.norm_k"):
        assert got_grads[f"blocks.0.{n}.weight"].abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_i2v_matches_diffusers(backend):
    want, want_grads = _oracle(12, 2, i2v=True)
    model = _model(12, 2, i2v=True)
    assert accelerate_wan(model) == 2
    with use_backend(backend):
        got, got_grads = _run(model, i2v=True)
    torch.testing.assert_close(got, want, **FP32)
    _assert_grads(got_grads, want_grads, **FP32)
    assert _calls(model) == (2, 0)
    assert got_grads["blocks.0.attn2.norm_added_k.weight"].abs().sum() > 0


def test_fmrt_flash_attention_backend_matches():
    """backend="triton": fmrt's own flash attention (interpreter) for self and cross attention."""
    want, want_grads = _oracle(12, 2)
    model = _model(12, 2)
    accelerate_wan(model, backend="triton")
    with use_backend("triton"):
        got, got_grads = _run(model)
    torch.testing.assert_close(got, want, **FP32)
    _assert_grads(got_grads, want_grads, **FP32)


def _rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_within_ulps(backend):
    """A bf16 model: output within bf16 tolerance of the fp32 result (twice one op's: a whole
    model's roundings add up; diffusers' own bf16 run needs it too), and output and gradients
    no further from it than diffusers' own bf16 run."""
    want, want_grads = _oracle(24, 2)
    ref, ref_grads = _oracle(24, 2, dtype=torch.bfloat16)  # diffusers, bf16
    model = _model(24, 2, dtype=torch.bfloat16)
    accelerate_wan(model)
    with use_backend(backend):
        got, got_grads = _run(model)
    assert _calls(model) == (2, 0)
    torch.testing.assert_close(got.float(), want, **tol(torch.bfloat16, 2))
    assert _rel_err(got, want) <= 1.5 * _rel_err(ref, want) + 1e-3
    for name in want_grads:
        assert _rel_err(got_grads[name], want_grads[name]) <= (
            1.5 * _rel_err(ref_grads[name], want_grads[name]) + 2e-3), name


def test_fused_projections_match():
    """to_qkv (self), to_kv (cross) and to_added_kv (image) after fuse_projections."""
    model = _model(12, 2, i2v=True)
    want, _ = _run(model, i2v=True, grad=False)
    for m in model.modules():
        if isinstance(m, W.WanAttention):
            m.fuse_projections()
    accelerate_wan(model)
    got, _ = _run(model, i2v=True, grad=False)
    torch.testing.assert_close(got, want, **FP32)
    assert _calls(model) == (2, 0)


def test_fmrt_attention_runs_for_every_attention(monkeypatch):
    """Guards against a silent fallback making the matches above vacuous: one fused q/k
    norm + RoPE per block, and fmrt attention for self, cross and image attention."""
    import fmrt.integrations.diffusers as D
    calls = []
    real_rope, real_attn = D.ops.qk_norm_rope, D.attention
    monkeypatch.setattr(D.ops, "qk_norm_rope",
                        lambda *a, **k: calls.append("rope") or real_rope(*a, **k))
    monkeypatch.setattr(D, "attention", lambda *a, **k: calls.append(a[1].shape[1])
                        or real_attn(*a, **k))
    model = _model(12, 2, layers=2, i2v=True)
    accelerate_wan(model)
    _run(model, i2v=True, grad=False)
    # per block: the fused q/k norm + RoPE, then attention over 48 latent tokens (self), 512
    # text tokens and N_IMG image tokens (cross)
    assert calls == ["rope", 48, 512, N_IMG] * 2


def test_pipeline_with_two_transformers():
    """A Wan2.2-style pipeline: `.transformer` and `.transformer_2` both patched and matching."""
    want1, _ = _oracle(12, 2)
    want2, _ = _oracle(24, 3)
    t1, t2 = _model(12, 2), _model(24, 3)
    pipe = types.SimpleNamespace(transformer=t1, transformer_2=t2)
    assert accelerate_wan(pipe) == 4
    assert accelerate_wan(pipe) == 4  # twice is fine
    torch.testing.assert_close(_run(t1, grad=False)[0], want1, **FP32)
    torch.testing.assert_close(_run(t2, grad=False)[0], want2, **FP32)
    assert _calls(t1) == (2, 0) and _calls(t2) == (2, 0)
    assert restore_wan(pipe) == 4
    assert accelerate_wan(types.SimpleNamespace(transformer=t1, transformer_2=None)) == 2


def test_restore_is_exact_and_keeps_diffusers_settings():
    model = _model(12, 2, layers=2)
    want, _ = _run(model, grad=False)
    model.set_attention_backend("native")
    assert accelerate_wan(model, backend="sdpa") == 4
    assert all(isinstance(p, FmrtWanAttnProcessor) and p.backend == "sdpa"
               and p._attention_backend == "native" for p in _processors(model))
    assert restore_wan(model) == 4
    assert restore_wan(model) == 0
    assert all(type(p) is W.WanAttnProcessor and p._attention_backend == "native"
               for p in _processors(model))
    got, _ = _run(model, grad=False)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=(2, 2, 4))


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(4, 4), _tiny_flux, object,
                                  lambda: types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)),
                                  lambda: types.SimpleNamespace(transformer=None)],
                         ids=["linear", "flux", "object", "pipe_linear", "pipe_none"])
def test_not_a_wan_transformer(make):
    model = make()
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        accelerate_wan(model)
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        restore_wan(model)


def _break_eps(attn):
    attn.norm_k.eps = 1e-5


def _no_eps(attn):
    attn.norm_q.eps = None


def _layer_norm(attn):
    attn.norm_k = torch.nn.LayerNorm(attn.inner_dim, eps=1e-6)


def _per_head(attn):
    attn.norm_q = torch.nn.RMSNorm(attn.inner_dim // attn.heads, eps=1e-6)


def _hooked(attn):
    attn.norm_q.register_forward_hook(lambda *a: None)


@pytest.mark.parametrize("breaker,match", [(_break_eps, "eps"), (_no_eps, "eps=None"),
                                           (_layer_norm, "norm_k is LayerNorm"),
                                           (_per_head, "norm_q normalises over"),
                                           (_hooked, "hooks")])
def test_unsupported_module_patches_nothing(breaker, match):
    t1, t2 = _model(12, 2), _model(12, 2, layers=2)
    breaker(t2.blocks[1].attn2)
    pipe = types.SimpleNamespace(transformer=t1, transformer_2=t2)
    before = [_processors(t1), _processors(t2)]
    with pytest.raises(ValueError, match=match) as e:
        accelerate_wan(pipe)
    assert "transformer_2.blocks.1.attn2" in str(e.value)
    assert "nothing patched" in str(e.value)
    after = [_processors(t1), _processors(t2)]
    assert all(a is b for x, y in zip(before, after) for a, b in zip(x, y))
    assert all(type(p) is W.WanAttnProcessor for ps in after for p in ps)
    assert FmrtWanAttnProcessor.unsupported(t2.blocks[1].attn2) is not None
    assert FmrtWanAttnProcessor.unsupported(t2.blocks[0].attn2) is None


def test_bad_backend(monkeypatch):
    import fmrt.integrations.diffusers as D
    model = _model(12, 2)
    with pytest.raises(ValueError, match="backend"):
        accelerate_wan(model, backend="flash")
    with pytest.raises(ValueError, match="backend"):
        FmrtWanAttnProcessor("cudnn")
    monkeypatch.setattr(D, "backend_available", lambda name: name != "fa3")
    with pytest.raises(ValueError, match="'fa3' is not installed"):
        accelerate_wan(model, backend="fa3")
    assert all(type(p) is W.WanAttnProcessor for p in _processors(model))


def test_runtime_fallbacks_give_diffusers_result():
    """What the processor does not compute goes to diffusers' processor, counted."""
    model = _model(12, 2, i2v=True)
    attn1, attn2 = model.blocks[0].attn1, model.blocks[0].attn2
    g = torch.Generator().manual_seed(4)
    S, C = 48, 24
    h = torch.randn(2, S, C, generator=g)
    cos, sin = model.rope(torch.zeros(1, 4, 3, 8, 8))
    assert cos.shape == (1, S, 1, 12)
    mask = torch.rand(1, 1, S, S, generator=g) > 0.3
    mask[..., 0] = True
    ctx = torch.randn(2, 5, C, generator=g)
    diff, fm = W.WanAttnProcessor(), FmrtWanAttnProcessor()
    cases = [(attn1, dict(attention_mask=mask, rotary_emb=(cos, sin))),  # a mask
             (attn1, dict(rotary_emb=(cos.expand(2, -1, -1, -1), sin.expand(2, -1, -1, -1)))),
             (attn2, dict(encoder_hidden_states=ctx))]  # I2V module, context without image
    attn64 = copy.deepcopy(attn1).double()
    cases.append((attn64, dict(rotary_emb=(cos, sin))))  # float64 activations
    for i, (attn, kw) in enumerate(cases):
        x = h.to(next(attn.parameters()).dtype)
        torch.testing.assert_close(fm(attn, x, **kw), diff(attn, x, **kw), atol=0, rtol=0)
        assert (fm.fmrt_calls, fm.fallback_calls) == (0, i + 1)
    # and what it does compute, called directly: self-attention without a rotary table
    torch.testing.assert_close(fm(attn1, h), diff(attn1, h), **FP32)
    assert (fm.fmrt_calls, fm.fallback_calls) == (1, 4)
    # a module changed after patching: diffusers' result, not a wrong one
    attn1.norm_q = torch.nn.LayerNorm(C, eps=1e-6)
    torch.testing.assert_close(fm(attn1, h, rotary_emb=(cos, sin)),
                               diff(attn1, h, rotary_emb=(cos, sin)), atol=0, rtol=0)
    assert fm.fallback_calls == 5


def test_context_parallel_self_attention_goes_to_diffusers():
    """Under context parallelism (diffusers' enable_parallelism sets `_parallel_config` on the
    processors; accelerate_wan carries it over) self-attention is diffusers' (it gathers the
    sharded sequence); cross-attention, which diffusers runs without the config, stays fmrt's."""
    model = _model(12, 2)
    marker = object()
    for p in _processors(model):
        p._parallel_config = marker
    accelerate_wan(model)
    seen = []

    def fake_fallback(attn, *args):
        seen.append(attn)
        return W.WanAttnProcessor()(attn, *args)  # the same math without the sharding

    for p in _processors(model):
        assert p._parallel_config is marker
        p._fallback = fake_fallback
    want, _ = _oracle(12, 2)
    torch.testing.assert_close(_run(model, grad=False)[0], want, **FP32)
    assert seen == [model.blocks[0].attn1]
    assert _calls(model) == (1, 1)
    restore_wan(model)
    assert all(p._parallel_config is marker for p in _processors(model))


def test_tensor_parallel_model_is_refused():
    model = _model(12, 2)
    model._parallel_config = types.SimpleNamespace(tensor_parallel_config=object(),
                                                   context_parallel_config=None)
    with pytest.raises(ValueError, match="^model uses tensor parallelism"):
        accelerate_wan(model)
    with pytest.raises(ValueError, match="^transformer uses tensor parallelism"):
        accelerate_wan(types.SimpleNamespace(transformer=model))
    assert all(type(p) is W.WanAttnProcessor for p in _processors(model))


def test_real_wan_pipeline_and_gradient_checkpointing():
    """diffusers' own WanPipeline (no text encoder / VAE needed to hold a transformer), and
    the patched model under gradient checkpointing (the forward recomputed in backward)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    want, want_grads = _oracle(12, 2)
    model = _model(12, 2)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    assert accelerate_wan(pipe) == 2
    model.enable_gradient_checkpointing()
    got, got_grads = _run(model)
    torch.testing.assert_close(got, want, **FP32)
    _assert_grads(got_grads, want_grads, **FP32)
    assert _calls(model) == (4, 0)  # two modules, each run again in the backward
    assert restore_wan(pipe) == 2
