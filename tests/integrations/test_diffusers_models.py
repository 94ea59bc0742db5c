"""fmrt.integrations.diffusers.accelerate against diffusers' own transformers (the oracle), one
tiny random model per family (FLUX.1, Qwen-Image, Wan-VACE, SkyReels-V2; awkward head dims and
token counts): the untouched model's output and every parameter gradient with fmrt's processor on
every attention module (torch reference and, under the Triton interpreter, fmrt's kernels), bf16
no further from fp32 than diffusers' own bf16 run, the fmrt path (not the fallback) is what ran,
restore is exact, fallbacks are diffusers' result and counted, bad input patches nothing."""
import copy
import functools
import types

import pytest
import torch

# an image without diffusers skips this module instead of failing the whole collection
pytest.importorskip("diffusers")

from fmrt import use_backend  # noqa: E402
from fmrt.integrations import diffusers_models as M  # noqa: E402
from fmrt.integrations.diffusers import accelerate, accelerate_wan, restore  # noqa: E402
from tests.helpers import tol  # noqa: E402

import diffusers  # noqa: E402
from diffusers.models.transformers import transformer_flux as F
from diffusers.models.transformers import transformer_flux2 as F2
from diffusers.models.transformers import transformer_qwenimage as Q

FP32 = dict(atol=2e-5, rtol=1e-5)


def _weights_off_one(m):
    """Non-trivial norm weights, so a dropped or swapped weight would show."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.RMSNorm, diffusers.models.normalization.RMSNorm)) \
                    and getattr(mod, "weight", None) is not None:
                mod.weight.uniform_(0.5, 1.5)
    return m


# --- the tiny models and their inputs ---------------------------------------------------------

def _flux(D, H):
    axes = {6: (2, 2, 2), 8: (2, 2, 4), 10: (2, 4, 4), 12: (4, 4, 4)}[D]
    return F.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                    attention_head_dim=D, num_attention_heads=H,
                                    joint_attention_dim=16, pooled_projection_dim=16,
                                    axes_dims_rope=axes)


def _flux_inputs(g, B=1):
    h, w, L = 3, 5, 7  # 15 image tokens, 7 text tokens
    img_ids = torch.stack([torch.zeros(h * w), torch.arange(h * w) // w,
                           torch.arange(h * w) % w], 1)
    return dict(hidden_states=torch.randn(B, h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(B, L, 16, generator=g),
                pooled_projections=torch.randn(B, 16, generator=g),
                timestep=torch.full((B,), 0.6), img_ids=img_ids, txt_ids=torch.zeros(L, 3))


def _flux2(D, H):
    axes = {6: (0, 2, 2, 2), 8: (2, 2, 2, 2), 10: (2, 2, 2, 4), 12: (2, 2, 4, 4)}[D]
    return F2.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1,
                                      num_single_layers=2, attention_head_dim=D,
                                      num_attention_heads=H, joint_attention_dim=16,
                                      timestep_guidance_channels=16, axes_dims_rope=axes)


def _flux2_inputs(g, B=1):
    h, w, L = 3, 5, 7  # ids as the pipeline makes them: image (0, h, w, 0), text (0, 0, 0, l)
    z = torch.zeros(h * w)
    img_ids = torch.stack([z, torch.arange(h * w) // w, torch.arange(h * w) % w, z], 1)
    txt_ids = torch.stack([torch.zeros(L)] * 3 + [torch.arange(L).float()], 1)
    return dict(hidden_states=torch.randn(B, h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(B, L, 16, generator=g),
                timestep=torch.full((B,), 0.6), guidance=torch.full((B,), 3.5),
                img_ids=img_ids, txt_ids=txt_ids)


def _qwen(D, H):
    axes = {6: (2, 2, 2), 8: (2, 2, 4), 10: (2, 4, 4), 12: (4, 4, 4)}[D]
    return Q.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4,
                                         num_layers=2, attention_head_dim=D,
                                         num_attention_heads=H, joint_attention_dim=16,
                                         axes_dims_rope=axes)


def _qwen_inputs(g, B=1):
    h, w, L = 3, 5, 6
    return dict(hidden_states=torch.randn(B, h * w, 16, generator=g),
                encoder_hidden_states=torch.randn(B, L, 16, generator=g),
                timestep=torch.full((B,), 0.6), img_shapes=[(1, h, w)] * B)


def _hunyuan(D, H):
    axes = {6: (2, 2, 2), 8: (2, 2, 4), 10: (2, 4, 4), 12: (4, 4, 4)}[D]
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=H, attention_head_dim=D,
        num_layers=1, num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=axes)


def _hunyuan_inputs(g, B=1, pad=2):
    """Latents `[B, 4, 3, 3, 5]` (45 tokens), 6 text tokens of which the last `pad` are padding
    (the pipeline's left-aligned mask)."""
    L = 6
    mask = torch.ones(B, L)
    mask[:, L - pad:] = 0
    return dict(hidden_states=torch.randn(B, 4, 3, 3, 5, generator=g),
                timestep=torch.full((B,), 600.0),
                encoder_hidden_states=torch.randn(B, L, 16, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(B, 8, generator=g),
                guidance=torch.full((B,), 6000.0))


def _ltx(D, H):
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=H, attention_head_dim=D,
        cross_attention_dim=H * D, num_layers=2, caption_channels=16)


def _ltx_inputs(g, B=1):
    """Latents packed `[B, 3*3*5, 4]`, 6 caption tokens, no prompt mask (the cross-attention
    mask goes to diffusers; tested on its own)."""
    f, h, w = 3, 3, 5
    return dict(hidden_states=torch.randn(B, f * h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(B, 6, 16, generator=g),
                timestep=torch.full((B,), 600.0), encoder_attention_mask=None,
                num_frames=f, height=h, width=w, rope_interpolation_scale=(0.32, 32.0, 32.0))


_WAN_KW = dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
               ffn_dim=32, num_layers=2, rope_max_seq_len=16)


def _vace(D, H):
    return diffusers.WanVACETransformer3DModel(num_attention_heads=H, attention_head_dim=D,
                                               vace_layers=[0], vace_in_channels=4, **_WAN_KW)


def _wan_inputs(g, B=1, vace=False):
    kw = dict(hidden_states=torch.randn(B, 4, 3, 6, 10, generator=g),  # 45 tokens
              timestep=torch.full((B,), 500.0),
              encoder_hidden_states=torch.randn(B, 7, 16, generator=g))
    if vace:
        kw["control_hidden_states"] = torch.randn(B, 4, 3, 6, 10, generator=g)
    return kw


def _sky(D, H):
    return diffusers.SkyReelsV2Transformer3DModel(num_attention_heads=H, attention_head_dim=D,
                                                  **_WAN_KW)


CASES = {
    "flux": (_flux, _flux_inputs),
    "flux2": (_flux2, _flux2_inputs),
    "qwen": (_qwen, _qwen_inputs),
    "hunyuan": (_hunyuan, _hunyuan_inputs),
    "ltx": (_ltx, _ltx_inputs),
    "vace": (_vace, functools.partial(_wan_inputs, vace=True)),
    "skyreels": (_sky, _wan_inputs),
}
# attention modules per tiny model: FLUX 1 double + 2 single; Qwen 2 blocks; VACE 2 blocks + 1
# vace block, SkyReels 2 blocks, each with self + cross attention
N_MODULES = {"flux": 3, "flux2": 3, "qwen": 2, "hunyuan": 3, "ltx": 4, "vace": 6, "skyreels": 4}


def _model(case, D, H, dtype=torch.float32):
    torch.manual_seed(0)
    return _weights_off_one(CASES[case][0](D, H)).to(dtype)


def _inputs(case, dtype, B=1):
    kw = CASES[case][1](torch.Generator().manual_seed(1), B)
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                and k not in ("timestep", "guidance", "img_ids", "txt_ids",
                              "encoder_attention_mask") else v) for k, v in kw.items()}


def _run(model, case, grad=True, B=1, **extra):
    dtype = next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    out = model(**_inputs(case, dtype, B), **extra, return_dict=False)[0]
    if not grad:
        return out.detach(), None
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


@functools.lru_cache(maxsize=None)
def _oracle(case, D, H, dtype=torch.float32):
    return _run(_model(case, D, H, dtype), case)


def _fmrt_processors(model):
    return [p for p in model.attn_processors.values() if hasattr(p, "fmrt_calls")]


def _calls(model):
    ps = _fmrt_processors(model)
    return sum(p.fmrt_calls for p in ps), sum(p.fallback_calls for p in ps)


def _assert_grads(got, want, **kw):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **kw, msg=name)


def _rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- exactness against diffusers ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,D,H", [("flux", 8, 2), ("flux", 6, 3), ("flux2", 10, 3),
                                      ("flux2", 8, 2), ("qwen", 10, 2),
                                      ("qwen", 12, 3), ("hunyuan", 8, 2), ("hunyuan", 10, 3),
                                      ("ltx", 8, 2), ("ltx", 7, 2),
                                      ("vace", 12, 2), ("skyreels", 12, 3)])
def test_matches_diffusers(case, D, H, backend):
    want, want_grads = _oracle(case, D, H)
    model = _model(case, D, H)
    n = N_MODULES[case]
    assert accelerate(model) == n
    with use_backend(backend):
        got, got_grads = _run(model, case)
    torch.testing.assert_close(got, want, **FP32)
    _assert_grads(got_grads, want_grads, **FP32)
    assert _calls(model) == (n, 0)
    norms = [k for k in got_grads if ".norm_q." in k or ".norm_k." in k or "norm_added_" in k]
    # every q/k norm weight gets a gradient (Qwen's last norm_added_q only feeds the unused
    # text output of the last block: zero in diffusers too)
    live = [k for k in norms if want_grads[k].abs().sum() > 0]
    assert len(live) >= len(norms) - 1 and all(got_grads[k].abs().sum() > 0 for k in live)


@pytest.mark.parametrize("case", ["flux", "flux2", "qwen", "hunyuan", "ltx"])
def test_batch_of_two_and_fmrt_flash_attention(case):
    """B = 2 and backend="triton": fmrt's own flash attention (interpreter) on the joint
    sequence."""
    model = _model(case, 8, 2)
    want, want_grads = _run(model, case, B=2)
    accelerate(model, backend="triton")
    with use_backend("triton"):
        got, got_grads = _run(model, case, B=2)
    torch.testing.assert_close(got, want, **FP32)
    _assert_grads(got_grads, want_grads, **FP32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["flux", "flux2", "qwen", "hunyuan", "ltx"])
def test_bf16_within_diffusers_bf16_error(case, backend):
    """A bf16 model: output and gradients no further from the fp32 result than diffusers' own
    bf16 run: 1.5x, plus a floor for gradients of two bf16 ulps on the torch path and four
    under the Triton interpreter, whose fp32 -> bf16 cast truncates (tests/helpers.py): the
    kernel's bf16 dq / dk lean towards zero (measured on this op: mean signed relative error
    -0.19% against +0.08% on the torch path), which a cancelling sum such as a key bias's
    gradient (sum over keys of dk, nearly zero since softmax ignores a common key shift)
    amplifies; LTX's attn1.to_k.bias was 2.3% off against diffusers' 0.8%."""
    want, want_grads = _oracle(case, 8, 2)
    ref, ref_grads = _oracle(case, 8, 2, torch.bfloat16)
    model = _model(case, 8, 2, torch.bfloat16)
    accelerate(model)
    with use_backend(backend):
        got, got_grads = _run(model, case)
    assert _calls(model) == (N_MODULES[case], 0)
    # elementwise and overall, no further from fp32 than diffusers' own bf16 run (FLUX.2's tiny
    # model is 4% off in bf16 in diffusers itself, so no fixed bf16 tolerance would do)
    max_err = lambda a: (a.float() - want).abs().max().item()  # noqa: E731
    assert max_err(got) <= 1.5 * max_err(ref) + tol(torch.bfloat16)["atol"]
    assert _rel_err(got, want) <= 1.5 * _rel_err(ref, want) + 1e-3
    floor = (2 if backend == "torch" else 4) * 2.0 ** -8
    for name in want_grads:
        if not want_grads[name].any():  # a parameter feeding only an unused output
            assert not got_grads[name].any(), name
            continue
        assert _rel_err(got_grads[name], want_grads[name]) <= (
            1.5 * _rel_err(ref_grads[name], want_grads[name]) + floor), name


def test_flux_fused_projections_match():
    model = _model("flux", 8, 2)
    want, _ = _run(model, "flux", grad=False)
    model.fuse_qkv_projections()
    assert model.transformer_blocks[0].attn.fused_projections
    accelerate(model)
    got, _ = _run(model, "flux", grad=False)
    torch.testing.assert_close(got, want, **FP32)
    assert _calls(model) == (3, 0)


def test_fused_op_and_fmrt_attention_run_per_stream(monkeypatch):
    """Guards against a silent fallback making the matches vacuous: FLUX's double block runs
    the fused op once per stream (text rows then image rows of the table) and one attention
    over the joint sequence; single blocks once over it all."""
    calls = []
    real_rope, real_attn = M.ops.qk_norm_rope, M.attention
    monkeypatch.setattr(M.ops, "qk_norm_rope", lambda q, *a, **k:
                        calls.append(("rope", q.shape[1], k["norm"])) or real_rope(q, *a, **k))
    monkeypatch.setattr(M, "attention", lambda q, *a, **k: calls.append(("attn", q.shape[1]))
                        or real_attn(q, *a, **k))
    model = _model("flux", 8, 2)
    accelerate(model)
    _run(model, "flux", grad=False)
    assert calls == [("rope", 7, "per_head"), ("rope", 15, "per_head"), ("attn", 22)] + [
        ("rope", 22, "per_head"), ("attn", 22)] * 2
    calls.clear()
    model = _model("flux2", 8, 2)  # the same plan; single blocks read q/k from the fused proj
    accelerate(model)
    _run(model, "flux2", grad=False)
    assert calls == [("rope", 7, "per_head"), ("rope", 15, "per_head"), ("attn", 22)] + [
        ("rope", 22, "per_head"), ("attn", 22)] * 2
    calls.clear()
    model = _model("qwen", 8, 2)
    accelerate(model)
    _run(model, "qwen", grad=False)
    assert calls == [("rope", 15, "per_head"), ("rope", 6, "per_head"), ("attn", 21)] * 2


def test_restore_is_exact_and_pipelines():
    model = _model("flux", 8, 2)
    want, _ = _run(model, "flux", grad=False)
    model.set_attention_backend("native")
    qwen = _model("qwen", 8, 2)
    pipe = types.SimpleNamespace(transformer=model, transformer_2=None)
    assert accelerate(pipe, backend="sdpa") == 3
    assert accelerate(pipe, backend="sdpa") == 3  # twice is fine
    assert all(p.backend == "sdpa" and p._attention_backend == "native"
               for p in _fmrt_processors(model))
    assert restore(pipe) == 3 and restore(pipe) == 0
    assert all(type(p) is F.FluxAttnProcessor and p._attention_backend == "native"
               for p in model.attn_processors.values())
    torch.testing.assert_close(_run(model, "flux", grad=False)[0], want, atol=0, rtol=0)
    assert accelerate(qwen) == 2 and restore(qwen) == 2
    assert all(type(p) is Q.QwenDoubleStreamAttnProcessor2_0
               for p in qwen.attn_processors.values())


def test_wan_through_accelerate_is_accelerate_wan():
    from tests.integrations.test_diffusers import _model as wan_model, _oracle as wan_oracle
    from tests.integrations.test_diffusers import _run as wan_run
    model = wan_model(12, 2)
    assert accelerate(model) == 2
    got, got_grads = wan_run(model)
    want, want_grads = wan_oracle(12, 2)
    torch.testing.assert_close(got, want, **FP32)
    _assert_grads(got_grads, want_grads, **FP32)
    assert restore(model) == 2
    assert accelerate_wan(model) == 2 and restore(model) == 2


# --- fallbacks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_qwen_text_mask_is_a_key_padding_mask(backend):
    """A text mask of any pattern (batch of 2, one sample padded in the middle): fmrt's path
    (torch SDPA with the mask, or fmrt's flash attention with key_padding_mask) equals
    diffusers' to 2e-5, gradients too; a float mask given to the processor goes to diffusers."""
    model = _model("qwen", 8, 2)
    mask = torch.ones(2, 6)
    mask[0, 4:] = 0
    mask[1, 2] = 0
    want, want_grads = _run(model, "qwen", B=2, encoder_hidden_states_mask=mask)
    accelerate(model, backend=backend)
    with use_backend("triton" if backend == "triton" else "torch"):
        got, got_grads = _run(model, "qwen", B=2, encoder_hidden_states_mask=mask)
    torch.testing.assert_close(got, want, **FP32)
    _assert_grads(got_grads, want_grads, **FP32)
    assert _calls(model) == (2, 0)
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(2, 15, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    rope = model.pos_embed([(1, 3, 5)] * 2, max_txt_seq_len=6, device=x.device)
    fm = attn.processor
    got = fm(attn, x, ctx, encoder_hidden_states_mask=mask, image_rotary_emb=rope)
    want = Q.QwenDoubleStreamAttnProcessor2_0()(attn, x, ctx, encoder_hidden_states_mask=mask,
                                                 image_rotary_emb=rope)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert fm.fallback_calls == 1


@pytest.mark.parametrize("case", ["flux", "flux2", "qwen", "hunyuan", "ltx", "skyreels"])
def test_context_parallel_goes_to_diffusers(case):
    model = _model(case, 8 if case != "skyreels" else 12, 2)
    want, _ = _run(model, case, grad=False)
    marker = object()
    for p in model.attn_processors.values():
        p._parallel_config = marker
    n = accelerate(model)
    seen = []
    for p in _fmrt_processors(model):
        assert p._parallel_config is marker
        stock = type(p._fallback)

        def fake(*args, _stock=stock, **kw):  # diffusers' math, without the sharding
            seen.append(1)
            return _stock()(*args, **kw)
        p._fallback = fake
    torch.testing.assert_close(_run(model, case, grad=False)[0], want, **FP32)
    assert _calls(model) == (0, n) and len(seen) == n


def test_flux_processor_direct_fallbacks():
    """A mask, a table of another shape, float64, mixed-dtype norm weights, a module changed
    after patching: diffusers' result, counted."""
    model = _model("flux", 8, 2)
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 15, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    ids = torch.cat([torch.zeros(7, 3), _flux_inputs(g)["img_ids"]])
    cos, sin = model.pos_embed(ids)
    fm, st = M.FmrtFluxAttnProcessor(), F.FluxAttnProcessor()
    mask = torch.ones(1, 1, 22, 22, dtype=torch.bool)
    cases = [dict(attention_mask=mask, image_rotary_emb=(cos, sin)),
             dict(image_rotary_emb=(cos[:-1], sin[:-1]))]
    for i, kw in enumerate(cases):
        try:
            want = st(attn, x, ctx, **kw)
        except Exception as e:  # diffusers' own error for a table of the wrong length
            with pytest.raises(type(e)):
                fm(attn, x, ctx, **kw)
        else:
            got = fm(attn, x, ctx, **kw)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert (fm.fmrt_calls, fm.fallback_calls) == (0, i + 1)
    a64 = copy.deepcopy(attn).double()
    got = fm(a64, x.double(), ctx.double(), image_rotary_emb=(cos, sin))
    want = st(a64, x.double(), ctx.double(), image_rotary_emb=(cos, sin))
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    assert fm.fallback_calls == 3
    mixed = copy.deepcopy(attn).bfloat16()
    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        getattr(mixed, n).float()
    fm(mixed, x.bfloat16(), ctx.bfloat16(), image_rotary_emb=(cos, sin))
    assert fm.fallback_calls == 4
    attn.norm_q = torch.nn.LayerNorm(8)
    fm(attn, x, ctx, image_rotary_emb=(cos, sin))
    assert (fm.fmrt_calls, fm.fallback_calls) == (0, 5)
    # without a rotary table: the module's norms, fmrt attention
    model2 = _model("flux", 8, 2)
    a2 = model2.transformer_blocks[0].attn
    for a, b in zip(fm(a2, x, ctx), st(a2, x, ctx)):
        torch.testing.assert_close(a, b, **FP32)
    assert fm.fmrt_calls == 1


# --- bad input: nothing patched -----------------------------------------------------------------

def _stock_only(model):
    return not _fmrt_processors(model)


def _eps(m):
    m.transformer_blocks[0].attn.norm_k.eps = 1e-5


def _layer_norm(m):
    m.single_transformer_blocks[1].attn.norm_q = torch.nn.LayerNorm(8)


def _across(m):
    m.single_transformer_blocks[1].attn.norm_k = torch.nn.RMSNorm(16, eps=1e-6)


def _hook(m):
    m.transformer_blocks[0].attn.norm_added_q.register_forward_hook(lambda *a: None)


def _ip_adapter(m):
    m.single_transformer_blocks[0].attn.set_processor(F.FluxIPAdapterAttnProcessor(16, 16))


@pytest.mark.parametrize("breaker,where,match", [
    (_eps, "transformer_blocks.0.attn", "eps"),
    (_layer_norm, "single_transformer_blocks.1.attn", "norm_q is LayerNorm"),
    (_across, "single_transformer_blocks.1.attn", r"norm_k normalises over \(16,\)"),
    (_hook, "transformer_blocks.0.attn", "norm_added_q has forward hooks"),
    (_ip_adapter, "single_transformer_blocks.0.attn", "runs FluxIPAdapterAttnProcessor")])
def test_unsupported_flux_module_patches_nothing(breaker, where, match):
    qwen, flux = _model("qwen", 8, 2), _model("flux", 8, 2)
    breaker(flux)
    pipe = types.SimpleNamespace(transformer=qwen, transformer_2=flux)
    with pytest.raises(ValueError, match=match) as e:
        accelerate(pipe)
    assert f"transformer_2.{where}" in str(e.value) and "nothing patched" in str(e.value)
    assert _stock_only(qwen) and _stock_only(flux)


def test_flux2_kv_cache_processors_are_not_replaced():
    model = _model("flux2", 8, 2)
    model.transformer_blocks[0].attn.set_processor(F2.Flux2KVAttnProcessor())
    with pytest.raises(ValueError, match="transformer_blocks.0.attn: runs Flux2KVAttnProcessor"):
        accelerate(model)
    assert _stock_only(model)


def test_unsupported_qwen_module_and_odd_head_dim():
    qwen = _model("qwen", 8, 2)
    qwen.transformer_blocks[1].attn.norm_added_k = torch.nn.RMSNorm(8, eps=1e-6)
    with pytest.raises(ValueError, match="transformer_blocks.1.attn: norm_added_k is RMSNorm"):
        accelerate(qwen)
    assert _stock_only(qwen)
    flux = _model("flux", 8, 2)
    attn = flux.transformer_blocks[0].attn
    attn.head_dim = 7
    assert "head dim 7 is odd" in M.FmrtFluxAttnProcessor.unsupported(attn)
    with pytest.raises(ValueError, match="head dim 7 is odd"):
        accelerate(flux)
    assert _stock_only(flux)


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(2, 2), object,
                                  lambda: types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)),
                                  lambda: types.SimpleNamespace(transformer=None)],
                         ids=["linear", "object", "pipe_linear", "pipe_none"])
def test_not_a_supported_transformer(make):
    with pytest.raises(ValueError, match="FluxTransformer2DModel|None"):
        accelerate(make())
    with pytest.raises(ValueError):
        restore(make())


def test_subclass_and_tensor_parallel_refused_bad_backend():
    class MyFlux(F.FluxTransformer2DModel):
        pass
    with pytest.raises(ValueError, match="MyFlux, which fmrt does not support"):
        accelerate(types.SimpleNamespace(transformer=MyFlux(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
            axes_dims_rope=(2, 2, 4))))
    model = _model("flux", 8, 2)
    model._parallel_config = types.SimpleNamespace(tensor_parallel_config=object())
    with pytest.raises(ValueError, match="^model uses tensor parallelism"):
        accelerate(model)
    model._parallel_config = None
    with pytest.raises(ValueError, match="backend"):
        accelerate(model, backend="flash")
    with pytest.raises(ValueError, match="backend"):
        M.FmrtQwenDoubleStreamAttnProcessor("cudnn")
    assert _stock_only(model)


# --- Qwen-Image's true CFG through fmrt's scheduler --------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_true_cfg_step_is_the_pipelines(backend, dtype):
    """QwenImagePipeline's guided step (pipeline_qwenimage.py: comb = neg + s (cond - neg);
    comb * ||cond|| / ||comb|| per token over the 64 packed channels; scheduler.step) as one
    `step_cfg(..., rescale="norm", norm_dim=-1)` of fmrt's scheduler: fp32 to 2e-6; bf16 (the
    pipeline rounds each op to bf16, fmrt keeps the guided velocity in fp32) within bf16
    tolerance of the pipeline's result."""
    from diffusers import FlowMatchEulerDiscreteScheduler as Stock
    from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler as Fused
    d = Stock(shift=3.0, use_dynamic_shifting=True)
    f = Fused.from_config(d.config)
    for s in (d, f):
        s.set_timesteps(3, mu=0.8)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 15, 64, generator=g)  # latents are prompt_embeds' dtype in the pipeline
    x_d = x_f = x.to(dtype)
    scale = 4.0
    with use_backend(backend):
        for t in d.timesteps:
            cond, neg = (torch.randn(2, 15, 64, generator=g).to(dtype) for _ in range(2))
            comb = neg + scale * (cond - neg)
            v = comb * (torch.norm(cond, dim=-1, keepdim=True)
                        / torch.norm(comb, dim=-1, keepdim=True))
            x_d = d.step(v, t, x_d, return_dict=False)[0]
            x_f = f.step_cfg(cond, neg, scale, t, x_f, rescale="norm", norm_dim=-1,
                             return_dict=False)[0]
            assert x_f.dtype == x_d.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(x_f, x_d, atol=2e-6, rtol=2e-6)
            else:
                torch.testing.assert_close(x_f.float(), x_d.float(), **tol(torch.bfloat16, 2))
            x_f = x_d  # compare one step at a time


def test_ltx_prompt_mask_cross_attention_goes_to_diffusers():
    """The LTX pipeline always passes the prompt mask: cross-attention (additive -10000 bias)
    is diffusers', self-attention (the fused norm + RoPE, the S x S part) stays fmrt's."""
    model = _model("ltx", 8, 2)
    mask = torch.ones(1, 6)
    mask[:, 4:] = 0
    kw = _inputs("ltx", torch.float32)
    kw["encoder_attention_mask"] = mask
    want = model(**kw, return_dict=False)[0]
    accelerate(model)
    got = model(**kw, return_dict=False)[0]
    torch.testing.assert_close(got, want, **FP32)
    assert _calls(model) == (2, 2)


@pytest.mark.parametrize("case,attr", [("flux", "pos_embed"), ("flux2", "pos_embed"),
                                       ("hunyuan", "rope"), ("ltx", "rope")])
def test_rotary_module_must_be_diffusers(case, attr):
    """The processors read one cos / sin per pair from real tables: the model's rotary module
    must be diffusers' own (each angle repeated over its pair), unhooked."""
    model = _model(case, 8, 2)
    getattr(model, attr).register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=f"model.{attr} is not diffusers' unhooked"):
        accelerate(model)
    assert _stock_only(model)
