import pytest
import torch

from fmrt.sampling import generate_clips


def _model():
    from fmrt.models import DiT, DiTConfig
    torch.manual_seed(0)
    model = DiT(DiTConfig.preset("tiny", dim=32, num_layers=1, num_heads=2, ffn_dim=64,
                                 num_classes=6, freq_dim=32)).eval()
    for p in model.parameters():   # a non-zero output (the DiT's head starts at zero)
        p.data.add_(0.05 * torch.randn_like(p))
    meta = {"sample": {"template": "Wan", "shift": 1.0, "sample_shape": [3, 2, 8, 8]}}
    return model, meta


def test_generate_clips_shape_and_seed():
    model, meta = _model()
    labels = torch.tensor([0, 5, 2])
    a = generate_clips(model, meta, labels, steps=3, guidance_scale=2.0, seed=1)
    b = generate_clips(model, meta, labels, steps=3, guidance_scale=2.0, seed=1)
    c = generate_clips(model, meta, labels, steps=3, guidance_scale=2.0, seed=2)
    assert a.shape == (3, 3, 2, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one Euler step from sigma 1: x = noise - v(noise, 1)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn((3, 3, 2, 8, 8), generator=g)
    with torch.no_grad():
        want = (noise - model(noise, torch.ones(3), labels)).clamp(-1, 1)
    one = generate_clips(model, meta, labels, steps=1, seed=1)
    torch.testing.assert_close(one, want, atol=1e-5, rtol=1e-5)


def test_generate_clips_noise_and_sample_arguments():
    from fmrt.sampling import DiagnosticsRecorder
    model, meta = _model()
    labels = torch.tensor([1, 4])
    noise = torch.randn((2, 3, 2, 8, 8), generator=torch.Generator().manual_seed(3))
    rec = DiagnosticsRecorder()
    a = generate_clips(model, meta, labels, steps=2, guidance_scale=2.0, noise=noise,
                       clamp=False, recorder=rec)          # recorder: passed on to `sample`
    assert len(rec) == 2
    assert torch.equal(a, generate_clips(model, meta, labels, steps=2, guidance_scale=2.0,
                                         seed=3, clamp=False))
    with pytest.raises(ValueError, match="noise must be"):
        generate_clips(model, meta, labels, steps=2, noise=noise[:1])
    with pytest.raises(ValueError, match="sample_shape"):
        generate_clips(model, {}, labels, steps=2)


def test_generate_clips_uses_the_recorded_guidance_interval():
    """A model file may record a guidance interval (fmrt export --guidance-interval): guidance
    only where lo <= sigma <= hi, elsewhere the conditional velocity alone (exact on a 4-step
    grid sigma = 1, .75, .5, .25: guided at .5 and .25 only)."""
    model, meta = _model()
    labels = torch.tensor([0, 3])
    recorded = {"sample": dict(meta["sample"], guidance_interval=[0.0, 0.6])}
    plain = generate_clips(model, meta, labels, steps=4, guidance_scale=3.0, clamp=False)
    a = generate_clips(model, recorded, labels, steps=4, guidance_scale=3.0, clamp=False)
    b = generate_clips(model, meta, labels, steps=4, guidance_scale=3.0, clamp=False,
                       guidance_interval=(0.0, 0.6))
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    # (0, 1) overrides the record: guidance at every step, as without one
    c = generate_clips(model, recorded, labels, steps=4, guidance_scale=3.0, clamp=False,
                       guidance_interval=(0.0, 1.0))
    assert torch.equal(c, plain)
    # by hand: two unguided Euler steps, then two guided ones
    x = torch.randn((2, 3, 2, 8, 8), generator=torch.Generator().manual_seed(0))
    null = torch.full_like(labels, 6)
    with torch.no_grad():
        for s, s_next in ((1.0, .75), (.75, .5), (.5, .25), (.25, 0.0)):
            sig = torch.full((2,), s)
            v = model(x, sig, labels)
            if s <= 0.6:
                u = model(x, sig, null)
                v = u + 3.0 * (v - u)
            x = x + (s_next - s) * v
    torch.testing.assert_close(a, x, atol=1e-5, rtol=1e-5)
    # guidance 1: no unconditional branch, the interval is moot
    assert torch.equal(generate_clips(model, recorded, labels, steps=2),
                       generate_clips(model, meta, labels, steps=2))


def test_recorded_sampling_defaults():
    from fmrt.sampling import recorded_guidance, recorded_interval
    assert recorded_guidance({}) == 1.0 and recorded_interval({}) is None
    assert recorded_guidance({"sample": None}) == 1.0
    meta = {"sample": {"guidance_scale": 2, "guidance_interval": [0, 0.6]}}
    assert recorded_guidance(meta) == 2.0 and isinstance(recorded_guidance(meta), float)
    assert recorded_interval(meta) == (0.0, 0.6)


def _weaker(model):
    """A 'bad version' of `model` for autoguidance: its weights perturbed."""
    import copy
    bad = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return bad


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_autoguidance_is_cfg_against_the_guide_model(scale):
    """guide_model: v = g + s (c - g), g the guide's velocity for the same class. Exact on a
    one-step grid (x = z - v) and against Euler by hand on three steps."""
    model, meta = _model()
    bad = _weaker(model)
    labels = torch.tensor([0, 5, 2])
    noise = torch.randn((3, 3, 2, 8, 8), generator=torch.Generator().manual_seed(4))
    good1 = generate_clips(model, meta, labels, steps=1, noise=noise, clamp=False)
    bad1 = generate_clips(bad, meta, labels, steps=1, noise=noise, clamp=False)
    ag1 = generate_clips(model, meta, labels, steps=1, noise=noise, clamp=False,
                         guidance_scale=scale, guide_model=bad)
    torch.testing.assert_close(ag1, good1 + (scale - 1) * (good1 - bad1), atol=1e-5, rtol=1e-5)
    # three steps, by hand; batch_cfg=True asked for is overridden (the branches run apart)
    from fmrt.sampling import checkpoint_sigma_grid
    sig = checkpoint_sigma_grid(meta, 3, None, "cpu")
    x = noise.clone()
    with torch.no_grad():
        for i in range(3):
            s = sig[i].expand(3)
            c, g = model(x, s, labels), bad(x, s, labels)
            x = x + (sig[i + 1] - sig[i]) * (g + scale * (c - g))
    ag3 = generate_clips(model, meta, labels, steps=3, noise=noise, clamp=False,
                         guidance_scale=scale, guide_model=bad, batch_cfg=True)
    torch.testing.assert_close(ag3, x, atol=1e-5, rtol=1e-5)


def test_autoguidance_calls_and_refusals():
    model, meta = _model()
    bad = _weaker(model)
    calls = []
    bad.register_forward_hook(lambda m, a, out: calls.append(a[2].clone()))
    labels = torch.tensor([3, 1])
    plain = generate_clips(model, meta, labels, steps=2, seed=0)
    # guidance 1: v = c exactly, and the guide is never run
    assert torch.equal(generate_clips(model, meta, labels, steps=2, seed=0, guide_model=bad), plain)
    assert calls == []
    generate_clips(model, meta, labels, steps=2, seed=0, guidance_scale=2.0, guide_model=bad)
    assert len(calls) == 2 and all(torch.equal(c, labels) for c in calls)   # same classes
    # a recorded guidance interval applies as for CFG: on a 4-step grid only sigma .5, .25
    calls.clear()
    recorded = {"sample": dict(meta["sample"], guidance_interval=[0.0, 0.6])}
    generate_clips(model, recorded, labels, steps=4, seed=0, guidance_scale=2.0, guide_model=bad)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="not meanflow"):
        generate_clips(model, meta, labels, steps=1, solver="meanflow", guidance_scale=2.0,
                       guide_model=bad)
    from fmrt.models import DiT
    other = DiT(type(model.config).from_dict(dict(model.config.to_dict(), num_classes=4)))
    with pytest.raises(ValueError, match="num_classes"):
        generate_clips(model, meta, labels, steps=1, guidance_scale=2.0, guide_model=other)
