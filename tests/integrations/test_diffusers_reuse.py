"""accelerate_wan's evaluation policies (guidance reuse, guidance interval, step caching) on a
tiny random WanPipeline saved to disk and loaded back: with reuse off the frames are stock
diffusers' bit for bit; with it on, the transformer runs exactly as often as the plan says and
restore_wan gives the stock pipeline back."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from fmrt.cache import FirstBlockCache, MagCache  # noqa: E402
from fmrt.guidance import AdaptiveGuidanceReuse, GuidanceReuse  # noqa: E402
from fmrt.integrations.diffusers import accelerate_wan, restore_wan  # noqa: E402
from fmrt.sampling import make_plan  # noqa: E402
from tests.tiny_wan import tiny_wan_pipeline  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_pipe")
    tiny_wan_pipeline().save_pretrained(d)
    return diffusers.WanPipeline.from_pretrained(str(d))


def _run(pipe, seed=3):
    return pipe(prompt="a red cat runs", negative_prompt="blue", height=16, width=16,
                num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").frames


class _Count:
    """Counts the transformer forwards that really ran (patch embedding calls), by context."""

    def __init__(self, pipe):
        self.calls = []
        self.h = pipe.transformer.patch_embedding.register_forward_hook(
            lambda *a: self.calls.append(1))

    def close(self):
        self.h.remove()
        return len(self.calls)


def test_reuse_off_is_stock_and_on_follows_the_plan(pipe):
    c = _Count(pipe)
    stock = _run(pipe)
    assert c.close() == 2 * STEPS
    # every=1: a refresh at every step, i.e. plain CFG: the stock frames bit for bit
    accelerate_wan(pipe, guidance_reuse=GuidanceReuse(every=1), attention=False)
    try:
        same = _run(pipe)
    finally:
        restore_wan(pipe)
    np.testing.assert_array_equal(same, stock)
    for policy in (GuidanceReuse(every=2), GuidanceReuse(every=3, first=2, last=1)):
        plan = make_plan(STEPS, guidance_reuse=policy)
        accelerate_wan(pipe, guidance_reuse=policy)
        c = _Count(pipe)
        try:
            out = _run(pipe)
        finally:
            n = c.close()
            restore_wan(pipe)
        calls = plan.model_calls()
        assert n == calls["cond"] + calls["uncond"] < 2 * STEPS
        assert out.shape == stock.shape and np.abs(out - stock).max() < 0.2
    c = _Count(pipe)
    back = _run(pipe)   # restored: stock again
    assert c.close() == 2 * STEPS
    np.testing.assert_array_equal(back, stock)


def test_interval_and_adaptive(pipe):
    stock = _run(pipe)
    sig = [float(s) for s in pipe.scheduler.sigmas[:STEPS]]
    lo, hi = 0.5, 0.95
    accelerate_wan(pipe, guidance_interval=(lo, hi), attention=False)
    c = _Count(pipe)
    try:
        _run(pipe)
    finally:
        n = c.close()
        restore_wan(pipe)
    assert n == STEPS + sum(lo <= s <= hi for s in sig)
    accelerate_wan(pipe, guidance_reuse=AdaptiveGuidanceReuse(tol=1e9, max_reuse=2),
                   attention=False)
    c = _Count(pipe)
    try:
        out = _run(pipe)
    finally:
        n = c.close()
        restore_wan(pipe)
    # tol huge: refresh at step 0, at step 1 (no d_prev yet), then every 3rd step (max_reuse 2)
    assert n == STEPS + 3
    assert np.abs(out - stock).max() < 0.2


def test_step_cache_per_context_state(pipe):
    stock = _run(pipe)
    accelerate_wan(pipe, cache=FirstBlockCache(0.0), attention=False)
    try:
        same = _run(pipe)   # threshold 0: nothing skipped, identical frames
        runner = pipe.transformer._fmrt_runner
        assert set(runner.states) == {"cond", "uncond"}
        assert all(all(st.decisions) for st in runner.states.values())
    finally:
        restore_wan(pipe)
    np.testing.assert_allclose(same, stock, atol=1e-5, rtol=0)
    policy = MagCache([1.0] * STEPS, threshold=0.5, max_skip=2, retention=0.0)
    plan = make_plan(STEPS, cache=policy)
    accelerate_wan(pipe, cache=policy, attention=False)
    try:
        _run(pipe)
        runner = pipe.transformer._fmrt_runner
        for st in runner.states.values():
            assert st.decisions == [b[0] == "all" for b in plan.blocks]
            assert st.blocks_run == 2 * sum(b[0] == "all" for b in plan.blocks)
    finally:
        restore_wan(pipe)
    assert "forward" not in pipe.transformer.blocks[0].__dict__


def test_bad_settings(pipe):
    with pytest.raises(TypeError, match="guidance_reuse"):
        accelerate_wan(pipe, guidance_reuse="static")
    with pytest.raises(ValueError, match="guidance_interval"):
        accelerate_wan(pipe, guidance_interval=(0.9, 0.1))
    with pytest.raises(ValueError, match="guidance_interval needs the pipeline"):
        accelerate_wan(pipe.transformer, guidance_interval=(0.1, 0.9))
    accelerate_wan(pipe, guidance_reuse=GuidanceReuse(2), attention=False)
    try:
        with pytest.raises(ValueError, match="already installed"):
            accelerate_wan(pipe, guidance_reuse=GuidanceReuse(2))
    finally:
        restore_wan(pipe)
