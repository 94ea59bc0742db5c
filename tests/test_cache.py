"""Step caching of fmrt's DiT (fmrt.cache): exact decisions, per-branch state, composition
with guidance reuse, calibration."""
import pytest
import torch

from fmrt.cache import (BranchCache, FirstBlockCache, MagCache, PeriodicCache,
                        calibrate_mag_ratios, nearest_interp, parse_cache)
from fmrt.guidance import GuidanceReuse, parse_guidance_reuse
from fmrt.models.dit import DiT, DiTConfig
from fmrt.sampling import make_plan, sample


def _dit():
    torch.manual_seed(0)
    m = DiT(DiTConfig.preset("tiny", dim=32, num_heads=2, ffn_dim=64, num_layers=3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


KW = dict(steps=6, guidance_scale=4.0, cond=torch.tensor([1, 2]), uncond=torch.tensor([10, 10]))
NOISE = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def test_cache_all_mode_is_the_plain_forward():
    m = _dit()
    st = BranchCache(FirstBlockCache(0.0))
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        a = m(NOISE, t, KW["cond"])
        b = m(NOISE, t, KW["cond"], cache=st)
    assert torch.equal(a, b) and st.blocks_run == 3 and st.decisions == [True]


def test_first_block_cache_decisions_and_reuse():
    m = _dit()
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        # threshold 0: never skips; a huge threshold: skips every probe after the first call,
        # returning block 0's output + the cached tail residual
        st = BranchCache(FirstBlockCache(1e9))
        st.mode = "probe"
        first = m(NOISE, t, KW["cond"], cache=st)
        assert st.decisions == [True] and st.blocks_run == 3
        second = m(NOISE, t, KW["cond"], cache=st)
        assert st.decisions == [True, False] and st.blocks_run == 4
        torch.testing.assert_close(second, first)   # same input: the residual reproduces it
        st0 = BranchCache(FirstBlockCache(0.0))
        st0.mode = "probe"
        for _ in range(3):
            m(NOISE * 1.01, t, KW["cond"], cache=st0)
            m(NOISE, t, KW["cond"], cache=st0)
        assert all(st0.decisions) and st0.blocks_run == 18


def test_sampling_with_caches_separate_state_and_counts():
    m = _dit()
    with torch.no_grad():
        full = sample(m, NOISE, **KW)
        states = {}
        out = sample(m, NOISE, cache=FirstBlockCache(1e9), _cache_states=states, **KW)
        assert set(states) == {"cond", "uncond"}
        for st in states.values():   # first call computes, later calls probe block 0 only
            assert st.decisions == [True] + [False] * 5 and st.blocks_run == 3 + 5
        states = {}
        out0 = sample(m, NOISE, cache=FirstBlockCache(0.0), _cache_states=states, **KW)
        torch.testing.assert_close(out0, full, atol=1e-5, rtol=1e-5)
        assert out.shape == full.shape


def test_mag_cache_follows_the_static_plan_and_composes_with_reuse():
    m = _dit()
    with torch.no_grad():
        ratios = calibrate_mag_ratios(m, NOISE, **KW)
        assert set(ratios) == {"cond", "uncond"} and len(ratios["cond"]) == 6
        assert ratios["cond"][0] == 1.0 and all(r > 0 for r in ratios["cond"])
        policy = MagCache(ratios, threshold=1.0, max_skip=2, retention=0.0)
        reuse = GuidanceReuse(every=2)
        plan = make_plan(6, cache=policy, guidance_reuse=reuse)
        states = {}
        sample(m, NOISE, cache=policy, guidance_reuse=reuse, _cache_states=states, **KW)
        cond_modes = [b[0] for b in plan.blocks]
        assert states["cond"].decisions == [mo == "all" for mo in cond_modes]
        unc_modes = [b[1] for b in plan.blocks if b[1] != "-"]
        assert states["uncond"].decisions == [mo == "all" for mo in unc_modes]
        assert states["cond"].blocks_run == 3 * cond_modes.count("all")
        assert "skip" in cond_modes


def test_nearest_interp_and_parsers():
    # round half to even, as torch.round in diffusers: indices 0, 0.5->0, 1, 1.5->2, 2
    assert nearest_interp([1.0, 2.0, 3.0], 5) == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert nearest_interp([1.0, 2.0], 1) == [2.0]
    assert parse_cache("first-block:0.1") == FirstBlockCache(0.1)
    assert parse_cache("first-block:0.1:1") == FirstBlockCache(0.1, order=1)
    assert parse_cache("mag:0.1:2:0.3:1", ratios=[1.0]) == MagCache([1.0], 0.1, 2, 0.3, 1)
    assert parse_cache("mag:0.1:2", ratios=[1.0, 1.0]) == MagCache([1.0, 1.0], 0.1, 2)
    assert parse_cache("off") is None
    with pytest.raises(ValueError, match="ratios"):
        parse_cache("mag:0.1")
    with pytest.raises(ValueError, match="unknown cache"):
        parse_cache("tea:0.1")
    assert parse_guidance_reuse("static:3:2:1") == GuidanceReuse(3, 2, 1)
    with pytest.raises(ValueError, match="every"):
        parse_guidance_reuse("static:0")
    with pytest.raises(ValueError, match="unknown guidance reuse"):
        parse_guidance_reuse("sometimes")


@pytest.mark.parametrize("policy", [MagCache([1.0], 0.1), FirstBlockCache(1e9)])
def test_order_one_extrapolates_the_residual_linearly(policy):
    """Blocks whose total residual is t * v at step t: order 0 reuses the last computed
    residual, order 1 extrapolates it exactly from the last two computed steps."""
    import dataclasses
    v = torch.arange(6.0).view(1, 2, 3)
    h = torch.ones(1, 2, 3)
    now = {"t": 0}
    blocks = [lambda x: x + 0.5 * now["t"] * v, lambda x: x + 0.5 * now["t"] * v]
    outs = {}
    for order in (0, 1):
        st = BranchCache(dataclasses.replace(policy, order=order))
        for t, mode in ((0, "all"), (1, "all"), (3, "skip" if isinstance(policy, MagCache)
                                                  else "probe")):
            now["t"], st.mode, st.step = t, mode, t
            out = st.run(blocks, h, lambda b, x: b(x))
        outs[order] = out
        assert st.decisions == [True, True, False]
    if isinstance(policy, MagCache):
        torch.testing.assert_close(outs[0], h + 1 * v)
        torch.testing.assert_close(outs[1], h + 3 * v)
    else:   # first-block: block 0 runs (0.5 * 3 v), the tail residual (0.5 t v) extrapolated
        torch.testing.assert_close(outs[0], h + 1.5 * v + 0.5 * v)
        torch.testing.assert_close(outs[1], h + 1.5 * v + 1.5 * v)
    with pytest.raises(ValueError, match="order"):
        dataclasses.replace(policy, order=2)


def test_periodic_cache_plan_and_run():
    # TaylorSeer's defaults on 20 steps: computed at 0, 1, 2, then every 3rd from 3 (here 3, 6,
    # ... 18) and the last step
    modes = PeriodicCache(every=3, warmup=3, last=1).modes(20, "cond")
    assert [t for t, m in enumerate(modes) if m == "all"] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 19]
    assert parse_cache("periodic:3:3:1:0") == PeriodicCache(3, 3, 1, 0)
    with pytest.raises(ValueError, match="every"):
        PeriodicCache(every=0)
    m = _dit()
    states = {}
    with torch.no_grad():
        sample(m, NOISE, cache=PeriodicCache(2, 2), _cache_states=states, **KW)
    assert states["cond"].decisions == [True, True, True, False, True, False]
    assert states["uncond"].blocks_run == 3 * 4
