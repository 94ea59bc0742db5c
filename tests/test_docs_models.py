"""The students shipped in docs/models do what the README says of them (CPU, float32)."""
import os

import pytest
import torch

from fmrt.checkpoint import load_model, load_tensors
from fmrt.cli import DEFAULT_CHECKPOINT
from fmrt.sampling import generate_clips

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "models")


def _load(name):
    path = os.path.join(MODELS, name + ".safetensors")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not in this checkout")
    return load_model(path)


@pytest.mark.parametrize("student,parent,steps", [
    # the fifth with its autoguidance distilled in: about halfway at one step (the mean squared
    # gap is 0.47 times the fifth's here, 0.45 times over 192 clips)
    ("reflow_dit_v3_5120_lr3d_agd", "reflow_dit_v3_5120_lr3d", 1),
    # the reflow student on today's teacher, distilled likewise: 0.0035 against 0.0094 at 2 steps
    ("reflow_dit_v3_cfg775_agd", "reflow_dit_v3_cfg775", 2),
])
def test_autoguidance_distilled_student_runs_its_autoguided_parent_in_one_call(student, parent,
                                                                               steps):
    """Each autoguidance-distilled student was trained on its parent's velocity autoguided by the
    5120-coupling student (S = 2): at its recorded step count, its one-call steps land nearer
    the parent's two-call steps than the parent's unguided steps do, and its file records no
    guidance at sampling."""
    agd, meta = _load(student)
    par, par_meta = _load(parent)
    guide, _ = _load("reflow_dit_v3_5120")
    assert meta["sample"]["guidance_scale"] == 1.0 and meta["sample"]["steps"] == steps
    assert meta["distill"]["guidance_scale"] == 2.0
    assert os.path.basename(meta["distill"]["guide"]) == "reflow_dit_v3_5120.safetensors"
    labels = torch.arange(6).repeat(2)
    kw = dict(steps=steps, seed=0, clamp=False)
    with torch.no_grad():
        target = generate_clips(par, par_meta, labels, guidance_scale=2.0, guide_model=guide,
                                **kw)
        got = generate_clips(agd, meta, labels, guidance_scale=1.0, **kw)
        plain = generate_clips(par, par_meta, labels, guidance_scale=1.0, **kw)
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


def test_reflow_on_todays_teacher_lands_nearer_its_samples_than_the_fifth():
    """reflow_dit_v3_cfg775 is the fifth trained on couplings of the teacher at today's defaults
    (50 Euler steps, CFG 2 on sigma <= 0.775): from the teacher's own noise, its 2-step sample is
    nearer the teacher's 50-step sample than the fifth's is (mean squared gap 0.018 against
    0.030 here; 0.0285 against 0.0349 on 128 held-out couplings)."""
    student, meta = _load("reflow_dit_v3_cfg775")
    fifth, fifth_meta = _load("reflow_dit_v3_5120_lr3d")
    teacher, teacher_meta = load_model(DEFAULT_CHECKPOINT)
    assert os.path.basename(meta["train"]["init"]) == "reflow_dit_v3_5120_lr3d.safetensors"
    assert len(meta["train"]["couplings"]) == 2
    labels = torch.arange(6).repeat(2)
    kw = dict(seed=0, clamp=False)
    with torch.no_grad():
        target = generate_clips(teacher, teacher_meta, labels, steps=50, **kw)   # its defaults
        got = generate_clips(student, meta, labels, steps=2, **kw)
        before = generate_clips(fifth, fifth_meta, labels, steps=2, **kw)
    err, base = (got - target).pow(2).mean(), (before - target).pow(2).mean()
    assert err < 0.8 * base, (float(err), float(base))


def test_the_soup_is_the_equal_average_of_the_two_autoguidance_distilled_students():
    """reflow_dit_v3_agd_soup is `fmrt export` of both autoguidance-distilled students: each
    weight the mean of theirs, the sources in its .json."""
    _, meta = _load("reflow_dit_v3_agd_soup")
    names = [os.path.basename(a["path"]) for a in meta["averaged_from"]]
    assert names == ["reflow_dit_v3_5120_lr3d_agd.safetensors",
                     "reflow_dit_v3_cfg775_agd.safetensors"]
    assert [a["weight"] for a in meta["averaged_from"]] == [0.5, 0.5]
    soup, a, b = (load_tensors(os.path.join(MODELS, n)) for n in
                  ("reflow_dit_v3_agd_soup.safetensors", *names))
    assert soup.keys() == a.keys() == b.keys()
    for k in soup:
        torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-6)
