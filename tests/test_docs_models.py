"""The students shipped in docs/models do what the README says of them (CPU, float32)."""
import os

import pytest
import torch

from fmrt.checkpoint import load_model
from fmrt.sampling import generate_clips

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "models")


def _load(name):
    path = os.path.join(MODELS, name + ".safetensors")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not in this checkout")
    return load_model(path)


def test_autoguidance_distilled_student_runs_its_autoguided_teacher_in_one_call():
    """reflow_dit_v3_5120_lr3d_agd was trained on the fifth's velocity autoguided by the
    5120-coupling student (S = 2): its one-call step lands nearer that two-call step than the
    unguided fifth does (about halfway: the mean squared gap is 0.47 times the fifth's here,
    0.45 times over 192 clips), and its file records no guidance at sampling."""
    agd, meta = _load("reflow_dit_v3_5120_lr3d_agd")
    fifth, fifth_meta = _load("reflow_dit_v3_5120_lr3d")
    guide, _ = _load("reflow_dit_v3_5120")
    assert meta["sample"]["guidance_scale"] == 1.0
    assert meta["distill"]["guidance_scale"] == 2.0
    assert os.path.basename(meta["distill"]["guide"]) == "reflow_dit_v3_5120.safetensors"
    labels = torch.arange(6).repeat(2)
    kw = dict(steps=1, seed=0, clamp=False)
    with torch.no_grad():
        target = generate_clips(fifth, fifth_meta, labels, guidance_scale=2.0, guide_model=guide,
                                **kw)
        got = generate_clips(agd, meta, labels, guidance_scale=1.0, **kw)
        plain = generate_clips(fifth, fifth_meta, labels, guidance_scale=1.0, **kw)
    err, base = (got - target).pow(2).mean(), (plain - target).pow(2).mean()
    assert err < 0.6 * base, (float(err), float(base))


def test_meanflow_conversion_keeps_its_parents_one_step_map():
    """meanflow_from_reflow_v3_agd was converted from the autoguidance-distilled student (its
    init and teacher): one MeanFlow step gives that student's one Euler step (mean squared gap
    4e-5 here, against 7e-3 between the student and the fifth it came from)."""
    agd, meta = _load("reflow_dit_v3_5120_lr3d_agd")
    fifth, fifth_meta = _load("reflow_dit_v3_5120_lr3d")
    mf, mf_meta = _load("meanflow_from_reflow_v3_agd")
    assert mf.config.meanflow and mf_meta["sample"]["guidance_scale"] == 1.0
    labels = torch.arange(6).repeat(2)
    kw = dict(steps=1, seed=0, clamp=False)
    with torch.no_grad():
        parent = generate_clips(agd, meta, labels, **kw)
        got = generate_clips(mf, mf_meta, labels, solver="meanflow", **kw)
        before = generate_clips(fifth, fifth_meta, labels, **kw)
    assert (got - parent).pow(2).mean() < 0.05 * (before - parent).pow(2).mean()
