"""fmrt.models DiT and its state-dict layouts.

Oracles: diffusers' WanTransformer3DModel (tiny config, random weights) for the forward pass and
its layout; Wan2.1's official layout as a key list derived from reading `wan/modules/model.py`
(`WAN_T2V_KEYS` below: Wan's package cannot be imported here)."""
from __future__ import annotations

import math

import pytest
import torch

from fmrt.models import DiT, DiTConfig
from fmrt.models.convert import (detect_layout, from_diffusers, from_wan, infer_config, load_dit,
                                 save_dit, strip_prefix, to_diffusers, to_diffusers_model,
                                 to_fmrt, to_wan)

# the oracle; an image without diffusers skips this module instead of failing the collection
WanTransformer3DModel = pytest.importorskip(
    "diffusers.models.transformers.transformer_wan").WanTransformer3DModel

TINY_TEXT = dict(in_channels=16, dim=64, num_layers=2, num_heads=2, ffn_dim=96, freq_dim=256,
                 text_dim=32)


def diffusers_tiny(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    d = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                              in_channels=16, out_channels=16, text_dim=32, freq_dim=256,
                              ffn_dim=96, num_layers=2, rope_max_seq_len=64).eval()
    randomize(d)
    return d


@torch.no_grad()
def randomize(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (norm weights, zero-initialised gates and head too)."""
    for p in model.parameters():
        p.add_(scale * torch.randn_like(p))
    return model


def run_diffusers(d, x, sigma, txt):
    with torch.no_grad():
        return d(x, 1000.0 * sigma, txt, return_dict=False)[0]


def close(a, b, rel=1e-4):
    """fp32 agreement relative to the output's magnitude (diffusers builds the timestep sinusoid
    in fp32, Wan and fmrt in fp64: ~1e-5 relative differences)."""
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=rel * b.abs().max().item())


# --- Wan2.1 official layout, read off wan/modules/model.py (WanModel, model_type='t2v') ------
# WanModel.__init__ registers: patch_embedding = Conv3d(in_dim, dim, patch, patch);
# text_embedding = Sequential(Linear(text_dim, dim), GELU, Linear(dim, dim));
# time_embedding = Sequential(Linear(freq_dim, dim), SiLU, Linear(dim, dim));
# time_projection = Sequential(SiLU, Linear(dim, 6 * dim)); blocks = WanAttentionBlock x L;
# head = Head(dim, out_dim, patch). WanAttentionBlock: norm1 (no affine), self_attn
# (q, k, v, o Linear(dim, dim), norm_q / norm_k = WanRMSNorm(dim).weight), norm3 (affine
# LayerNorm when cross_attn_norm), cross_attn (same as self_attn), norm2 (no affine),
# ffn = Sequential(Linear(dim, ffn_dim), GELU(tanh), Linear(ffn_dim, dim)), modulation
# [1, 6, dim]. Head: norm (no affine), head = Linear(dim, prod(patch) * out_dim), modulation
# [1, 2, dim]. `freqs` is a plain attribute, not in the state dict.
def WAN_T2V_KEYS(cfg: DiTConfig) -> dict[str, tuple]:
    dim, ffn, pt = cfg.dim, cfg.ffn_dim, cfg.patch_size
    keys = {
        "patch_embedding.weight": (dim, cfg.in_channels, *pt), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, cfg.text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, cfg.freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (math.prod(pt) * cfg.out_channels, dim),
        "head.head.bias": (math.prod(pt) * cfg.out_channels,),
        "head.modulation": (1, 2, dim),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        keys[b + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for n in "qkvo":
                keys[f"{b}{attn}.{n}.weight"] = (dim, dim)
                keys[f"{b}{attn}.{n}.bias"] = (dim,)
            keys[f"{b}{attn}.norm_q.weight"] = (dim,)
            keys[f"{b}{attn}.norm_k.weight"] = (dim,)
        keys[b + "norm3.weight"] = keys[b + "norm3.bias"] = (dim,)
        keys[b + "ffn.0.weight"], keys[b + "ffn.0.bias"] = (ffn, dim), (ffn,)
        keys[b + "ffn.2.weight"], keys[b + "ffn.2.bias"] = (dim, ffn), (dim,)
    return keys


# --- config ----------------------------------------------------------------------------------

def test_presets():
    tiny = DiTConfig.preset("tiny")
    assert tiny.conditioning == "class" and tiny.in_channels == 3 and tiny.head_dim >= 16
    w = DiTConfig.preset("wan2.1-1.3b")
    assert (w.dim, w.num_layers, w.num_heads, w.ffn_dim, w.text_dim, w.in_channels,
            w.out_channels, w.freq_dim, w.eps, w.head_dim) == \
        (1536, 30, 12, 8960, 4096, 16, 16, 256, 1e-6, 128)
    w = DiTConfig.preset("wan2.1-14b", meanflow=True)
    assert (w.dim, w.num_layers, w.num_heads, w.ffn_dim, w.meanflow) == (5120, 40, 40, 13824, True)
    with pytest.raises(ValueError, match="preset"):
        DiTConfig.preset("nope")
    with pytest.raises(ValueError, match="field"):
        DiTConfig.preset("tiny", nope=1)
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig.preset("tiny", num_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        DiTConfig.preset("tiny", dim=16, num_heads=4)
    assert DiTConfig.preset("tiny", text_dim=8).conditioning == "class_text"
    assert DiTConfig.from_dict(tiny.to_dict()) == tiny


@pytest.mark.parametrize("name", ["wan2.1-1.3b", "wan2.1-14b"])
def test_wan_presets_match_diffusers_shapes(name):
    """The full-size presets give exactly the tensors of diffusers' model of the same size
    (both built on the meta device: no memory)."""
    cfg = DiTConfig.preset(name)
    with torch.device("meta"):
        ours = DiT(cfg)
        theirs = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=128,
                                       ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers)
    mine = {k: tuple(v.shape) for k, v in to_diffusers(ours.state_dict()).items()}
    ref = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert mine == ref
    n = sum(math.prod(s) for s in mine.values())
    assert (n / 1e9) == pytest.approx({"wan2.1-1.3b": 1.42, "wan2.1-14b": 14.29}[name], abs=0.01)


# --- forward ---------------------------------------------------------------------------------

def test_tiny_forward_shape_and_zero_init():
    torch.manual_seed(0)
    m = DiT(DiTConfig.preset("tiny"))
    x = torch.randn(2, 3, 3, 8, 6)
    y = m(x, torch.rand(2), torch.tensor([1, 10]))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, torch.zeros_like(y))      # adaLN-Zero: the head starts at zero
    y.sum().backward()                                # ... yet the head gets a gradient
    assert m.head.head.weight.grad.abs().sum() > 0
    randomize(m)
    y = m(x, 0.5)                                     # float sigma, cond=None -> null class
    assert y.shape == x.shape and y.abs().max() > 0
    assert torch.equal(y, m(x, torch.full((2,), 0.5), torch.tensor([10, 10])))
    assert not torch.allclose(y, m(x, torch.full((2,), 0.5), torch.tensor([3, 3])))


def test_matches_diffusers_and_back():
    d = diffusers_tiny()
    sd = from_diffusers(d.state_dict())
    assert detect_layout(d.state_dict()) == "diffusers" and detect_layout(sd) == "fmrt"
    m = DiT(infer_config(sd, num_heads=2)).eval()
    m.load_state_dict(sd, strict=True)
    x, s, txt = torch.randn(2, 16, 3, 4, 6), torch.tensor([0.3, 0.9]), torch.randn(2, 5, 32)
    expected = run_diffusers(d, x, s, txt)
    with torch.no_grad():
        close(m(x, s, txt), expected)
        # per-frame sigma == diffusers' per-token timesteps with each frame's value repeated
        sf = torch.tensor([[0.0, 0.5, 0.7], [0.2, 0.2, 1.0]])
        close(m(x, sf, txt), run_diffusers(d, x, sf.repeat_interleave(2 * 3, dim=1), txt))
    # back: fmrt -> diffusers layout -> a fresh diffusers model gives the same output
    randomize(m)
    d2 = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                               in_channels=16, out_channels=16, text_dim=32, freq_dim=256,
                               ffn_dim=96, num_layers=2, rope_max_seq_len=64).eval()
    d2.load_state_dict(to_diffusers(m.state_dict()), strict=True)
    with torch.no_grad():
        close(m(x, s, txt), run_diffusers(d2, x, s, txt))
    assert all(torch.equal(v, from_diffusers(to_diffusers(m.state_dict()))[k])
               for k, v in m.state_dict().items())


def test_class_text_is_a_wan_text_model(tmp_path):
    """Class labels through fixed text-like embeddings: the same output as the text path given
    those embeddings, as diffusers' WanTransformer3DModel given them as encoder_hidden_states
    (patch (1, 4, 4) too), null class = the table's last row; the table survives save /
    load_dit."""
    torch.manual_seed(3)
    cfg = DiTConfig.preset("tiny", num_classes=6, text_dim=24, class_tokens=3, num_layers=2,
                           patch_size=(1, 4, 4))
    m = randomize(DiT(cfg)).eval()
    assert cfg.conditioning == "class_text" and not hasattr(m, "class_embedding")
    table = m.class_text
    assert table.shape == (7, 3, 24) and 0.8 < table.std() < 1.2
    assert torch.equal(table, DiT(cfg).class_text)            # fixed by class_text_seed
    assert not torch.equal(table, DiT(DiTConfig.preset(
        "tiny", num_classes=6, text_dim=24, class_tokens=3, class_text_seed=1)).class_text)
    assert all(n != "class_text" for n, _ in m.named_parameters())   # a buffer: never trained
    x, s, y = torch.randn(3, 3, 4, 8, 8), torch.tensor([0.2, 0.6, 1.0]), torch.tensor([0, 5, 6])
    with torch.no_grad():
        out = m(x, s, y)
        close(out, m(x, s, table[y]))
        assert torch.equal(m(x, s), m(x, s, torch.full((3,), 6)))    # None = the null class
        wan, emb = to_diffusers_model(m)
        assert torch.equal(emb, table)
        close(out, run_diffusers(wan, x, s, emb[y]))
    save_dit(m, str(tmp_path / "m.safetensors"))
    m2 = load_dit(str(tmp_path / "m.safetensors"))
    assert torch.equal(m2.class_text, table) and m2.config == cfg
    assert infer_config(m.state_dict(), num_heads=4, patch_size=(1, 4, 4)) == cfg
    with pytest.raises(ValueError, match="cond"):
        m(x, s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text_dim"):
        to_diffusers_model(DiT(DiTConfig.preset("tiny", num_layers=1)))


def test_class_to_class_text_keeps_the_outputs():
    """A class-conditioned DiT re-expressed with Wan's conditioning computes the same."""
    from fmrt.models.convert import class_to_class_text
    torch.manual_seed(4)
    m = randomize(DiT(DiTConfig.preset("tiny", num_classes=6, num_layers=2))).eval()
    w = class_to_class_text(m, 64).eval()
    assert w.config.conditioning == "class_text" and w.config.text_dim == 64
    x, s, y = torch.randn(7, 3, 2, 4, 4), torch.rand(7), torch.arange(7)
    with torch.no_grad():
        close(w(x, s, y), m(x, s, y), rel=1e-5)
    with pytest.raises(ValueError, match="class-conditioned"):
        class_to_class_text(w, 64)


def test_per_frame_sigma():
    torch.manual_seed(1)
    m = randomize(DiT(DiTConfig.preset("tiny", num_layers=2))).eval()
    x, c = torch.randn(2, 3, 3, 4, 4), torch.tensor([0, 4])
    s = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        close(m(x, s[:, None].expand(2, 3), c), m(x, s, c), rel=1e-5)
        ti2v = torch.tensor([[0.0, 0.75, 0.75], [0.0, 0.25, 0.25]])
        assert not torch.allclose(m(x, ti2v, c), m(x, ti2v[:, 1], c), atol=1e-4)


def test_wan_layout_roundtrip():
    torch.manual_seed(2)
    cfg = DiTConfig(**TINY_TEXT)
    m = randomize(DiT(cfg))
    sd = m.state_dict()
    wan = to_wan(sd)
    assert {k: tuple(v.shape) for k, v in wan.items()} == WAN_T2V_KEYS(cfg)
    assert detect_layout(wan) == "wan"
    back = from_wan(wan)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    # Wan -> diffusers names agree with diffusers' own model
    dif = to_diffusers(sd)
    assert {k: tuple(v.shape) for k, v in dif.items()} == \
        {k: tuple(v.shape) for k, v in diffusers_tiny().state_dict().items()}
    assert to_fmrt({"model.diffusion_model." + k: v for k, v in wan.items()}).keys() == sd.keys()
    with pytest.raises(ValueError, match="unsupported"):
        from_wan({**wan, "img_emb.proj.0.weight": torch.zeros(1)})


def test_save_load_layouts(tmp_path):
    torch.manual_seed(3)
    x, s, txt = torch.randn(1, 16, 2, 4, 4), torch.tensor([0.6]), torch.randn(1, 3, 32)
    m = randomize(DiT(DiTConfig(**TINY_TEXT))).eval()
    with torch.no_grad():
        want = m(x, s, txt)
        for layout in ("fmrt", "wan", "diffusers"):
            p = str(tmp_path / f"{layout}.safetensors")
            save_dit(m, p, layout=layout)
            m2 = load_dit(p)
            assert m2.config == m.config
            assert torch.equal(m2(x, s, txt), want), layout
        # a class-conditional MeanFlow model (fmrt-only parameters) survives every layout
        mf = randomize(DiT(DiTConfig.preset("tiny", num_layers=1, meanflow=True))).eval()
        xc = torch.randn(1, 3, 1, 4, 4)
        p = str(tmp_path / "mf.safetensors")
        save_dit(mf, p, layout="wan")
        assert torch.equal(load_dit(p)(xc, 0.5, torch.tensor([2]), r=0.1),
                           mf(xc, 0.5, torch.tensor([2]), r=0.1))
        # a diffusers save_pretrained directory: num_heads from its config.json
        d = diffusers_tiny()
        d.save_pretrained(str(tmp_path / "dif"))
        m3 = load_dit(str(tmp_path / "dif"))
        assert m3.config.num_heads == 2
        close(m3(x, s, txt), run_diffusers(d, x, s, txt))
    with pytest.raises(ValueError, match="layout"):
        save_dit(m, str(tmp_path / "x.safetensors"), layout="comfy")
    with pytest.raises(ValueError, match="does not match"):
        load_dit(str(tmp_path / "fmrt.safetensors"), DiTConfig(**{**TINY_TEXT, "ffn_dim": 32}))


def test_meanflow_time_inputs():
    torch.manual_seed(4)
    cfg = DiTConfig.preset("tiny", num_layers=1, meanflow=True, attn_backend="math")
    m = randomize(DiT(cfg)).eval()
    x, c = torch.randn(2, 3, 2, 4, 4), torch.tensor([1, 2])
    t, r = torch.tensor([0.8, 0.5]), torch.tensor([0.2, 0.5])
    with torch.no_grad():
        assert torch.equal(m(x, t, c), m(x, t, c, r=t))           # r=None means r=t (h=0)
        assert not torch.allclose(m(x, t, c, r=r), m(x, t, c))
    # d/dt and d/dr by torch.func.jvp: h = t - r is formed inside forward, so the t-tangent
    # reaches both time embeddings. Central differences in fp32 (the 1000x time scale makes the
    # derivatives large: a small step is needed).
    eps = 3e-5
    for fn, arg in ((lambda tt: m(x, tt, c, r=r), t), (lambda rr: m(x, t, c, r=rr), r)):
        _, jvp = torch.func.jvp(fn, (arg,), (torch.ones_like(arg),))
        with torch.no_grad():
            fd = (fn(arg + eps) - fn(arg - eps)) / (2 * eps)
        close(jvp.detach(), fd, rel=1e-2)
    with pytest.raises(ValueError, match="r is only accepted"):
        DiT(DiTConfig.preset("tiny", num_layers=1))(x, 0.5, c, r=0.1)


def test_meanflow_jvp_with_checkpointing():
    """MeanFlow's step: u, du/dt = jvp(model, (z, r, t), (v, 0, 1)), then backward through u.
    Checkpointing is skipped under forward AD, so this works and gives the plain gradients."""
    torch.manual_seed(6)
    cfg = DiTConfig.preset("tiny", num_layers=2, meanflow=True, attn_backend="math")
    m = randomize(DiT(cfg))
    x, c = torch.randn(2, 3, 2, 4, 4), torch.tensor([1, 2])
    t, r, v = torch.tensor([0.8, 0.5]), torch.tensor([0.2, 0.5]), torch.randn(2, 3, 2, 4, 4)

    def step():
        m.zero_grad()
        u, dudt = torch.func.jvp(lambda z, rr, tt: m(z, tt, c, r=rr), (x, r, t),
                                 (v, torch.zeros_like(r), torch.ones_like(t)))
        (u - (v - (t - r).view(-1, 1, 1, 1, 1) * dudt).detach()).square().mean().backward()
        return dudt.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}

    d0, g0 = step()
    m.enable_gradient_checkpointing()
    d1, g1 = step()
    torch.testing.assert_close(d1, d0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=k)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(5)
    m = randomize(DiT(DiTConfig.preset("tiny", num_layers=2)))
    x, s, c = torch.randn(2, 3, 2, 4, 4), torch.tensor([0.3, 0.7]), torch.tensor([0, 1])

    def grads():
        m.zero_grad()
        m(x, s, c).square().mean().backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    plain = grads()
    m.enable_gradient_checkpointing()
    ckpt = grads()
    m2 = DiT(DiTConfig.preset("tiny", num_layers=2, gradient_checkpointing=True))
    assert m2.gradient_checkpointing
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


def test_unconditional():
    m = randomize(DiT(DiTConfig.preset("tiny", num_classes=None, num_layers=1)))
    assert not any("cross_attn" in k for k in m.state_dict())
    x = torch.randn(1, 3, 1, 4, 4)
    assert m(x, 0.3).shape == x.shape
    with pytest.raises(ValueError, match="cond"):
        m(x, 0.3, torch.tensor([1]))


def test_bad_inputs():
    m = DiT(DiTConfig.preset("tiny", num_layers=1))
    x, c = torch.randn(2, 3, 2, 4, 4), torch.tensor([0, 1])
    s = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="x has 4 channels"):
        m(torch.randn(2, 4, 2, 4, 4), s, c)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        m(torch.randn(2, 3, 2, 5, 4), s, c)
    with pytest.raises(ValueError, match=r"x must be \[B, C, T, H, W\]"):
        m(torch.randn(2, 3, 4, 4), s, c)
    with pytest.raises(TypeError, match="x must be a floating"):
        m(x.long(), s, c)
    for bad in (torch.rand(3), torch.rand(2, 3), torch.rand(2, 2, 1)):
        with pytest.raises(ValueError, match="sigma must be"):
            m(x, bad, c)
    with pytest.raises(TypeError, match="sigma"):
        m(x, torch.tensor([1, 0]), c)
    with pytest.raises(TypeError, match="cond"):
        m(x, s, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="cond"):
        m(x, s, torch.tensor([0, 1, 2]))
    t = DiT(DiTConfig(**{**TINY_TEXT, "num_layers": 1}))
    xt = torch.randn(2, 16, 1, 4, 4)
    with pytest.raises(ValueError, match="cond is required"):
        t(xt, s)
    with pytest.raises(ValueError, match="text_dim=32"):
        t(xt, s, torch.randn(2, 3, 31))
    with pytest.raises(ValueError, match="per-frame sigma"):
        DiT(DiTConfig.preset("tiny", num_layers=1, patch_size=(2, 2, 2)))(x, torch.rand(2, 2), c)
    with pytest.raises(TypeError, match="config"):
        DiT("tiny")
    with pytest.raises(ValueError, match="sd"):
        detect_layout({"foo": torch.zeros(1)})
    assert strip_prefix({"model.a": 1, "model.b": 2}) == {"a": 1, "b": 2}


def test_embedded_model_is_a_wan_model():
    """The model `fmrt sample` ships is conditioned as Wan is, and diffusers'
    WanTransformer3DModel computes the same velocities from its weights and class embeddings."""
    import json
    import os

    from safetensors.torch import load_file

    import fmrt
    path = os.path.join(os.path.dirname(fmrt.__file__), "assets", "default_dit.safetensors")
    cfg = DiTConfig.from_dict(json.load(open(path[:-len(".safetensors")] + ".json"))["model"])
    assert cfg.conditioning == "class_text"
    m = DiT(cfg)
    m.load_state_dict(load_file(path), strict=True)
    m.eval()
    wan, emb = to_diffusers_model(m)
    x = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    s, y = torch.tensor([0.9, 0.4]), torch.tensor([1, cfg.num_classes])
    with torch.no_grad():
        close(run_diffusers(wan, x, s, emb[y]), m(x, s, y))
