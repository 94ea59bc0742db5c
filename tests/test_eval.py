import math

import pytest
import torch

from fmrt.data import NUM_CLASSES, ShapesVideo
from fmrt.eval import (ClassifierTraining, evaluate_clips, frechet_distance,
                       frechet_distance_infinity, load_classifier, paired_margin,
                       reference_features, train_classifier)


def test_frechet_distance_exact():
    # sample covariances (N - 1 normalisation) are diagonal: diag(2/3, 8/3) and diag(6, 2/3)
    a = torch.tensor([[1.0, 0], [-1, 0], [0, 2], [0, -2]])
    b = torch.tensor([[3.0, 0], [-3, 0], [0, 1], [0, -1]]) + 1.0
    want = 2.0 + (2 / 3 + 6 - 2 * 2.0) + (8 / 3 + 2 / 3 - 2 * math.sqrt(16 / 9))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    rot = torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
    # invariant under a common rotation and translation
    assert frechet_distance(x @ rot + 3, (x * 2) @ rot + 3) == pytest.approx(
        frechet_distance(x, x * 2), rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))


def test_frechet_distance_infinity_removes_the_small_sample_bias():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(30000, 8, generator=g)
    # the same distribution: FD of 150 samples is far from 0, the extrapolation is not
    same = frechet_distance_infinity(torch.randn(1200, 8, generator=g), ref)
    assert same["points"][0][0] == 150 and same["points"][-1][0] == 1200
    assert same["points"][0][1] > 0.15 and same["slope"] > 0
    assert abs(same["fd_inf"]) < 0.05 and same["se"] < 0.05
    assert same["fd"] == pytest.approx(same["points"][-1][1], rel=1e-9)
    assert 0 < same["fd_se"] < same["fd"]
    # a known distance: the covariance scaled by s^2 gives D (1 - s)^2 = 8 * 0.25 = 2
    wide = frechet_distance_infinity(1.5 * torch.randn(1200, 8, generator=g), ref)
    assert wide["points"][0][1] > wide["points"][-1][1] > 2.0
    assert wide["fd_inf"] == pytest.approx(2.0, abs=0.25) and wide["se"] < 0.25
    # two classes far apart, sampled in fixed proportions: stratified subsets keep them so
    lab = torch.arange(2).repeat_interleave(600)
    x = torch.randn(1200, 8, generator=g)
    x[:, 0] += 6 * lab - 3
    mix = torch.randn(30000, 8, generator=g)
    mix[:, 0] += 6 * torch.arange(2).repeat_interleave(15000) - 3
    strat = frechet_distance_infinity(x, mix, labels=lab)
    assert abs(strat["fd_inf"]) < 0.05 and strat["points"][0][0] == 150
    # deterministic for a seed; the jackknife can be left out
    x = x[:300]
    assert frechet_distance_infinity(x, ref, seed=3) == frechet_distance_infinity(x, ref, seed=3)
    one = frechet_distance_infinity(x, ref, blocks=1)
    assert one["se"] is None and one["fd_se"] is None
    assert one["fd"] == frechet_distance(x, ref) == pytest.approx(one["points"][-1][1], rel=1e-9)
    for bad in (dict(fractions=(0.5,)), dict(fractions=(0, 1)), dict(draws=0),
                dict(fractions=(0.001, 1)), dict(labels=lab)):
        with pytest.raises(ValueError):
            frechet_distance_infinity(x, ref, **bad)
    with pytest.raises(ValueError):
        frechet_distance_infinity(x, ref[:, :4])


def test_paired_margin_cancels_what_paired_sets_share():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(20000, 6, generator=g)
    lab = torch.arange(3).repeat_interleave(200)
    z = torch.randn(600, 6, generator=g)              # the shared "noise"
    teacher = 1.3 * z
    student = 1.3 * z + 0.1 * torch.randn(600, 6, generator=g)   # close to it, sample by sample
    other = 1.3 * torch.randn(600, 6, generator=g)                # the same law, other noise
    t, s, o = (frechet_distance_infinity(v, ref, labels=lab, draws=2) for v in
               (teacher, student, other))
    # exact: a set against itself, and the replicates' own jackknife formula
    assert paired_margin(t, t, 1.0) == (0.0, 0.0)
    assert paired_margin(t, t, 1.0, key="fd") == (0.0, 0.0)
    m, se = paired_margin(s, t, 1.25)
    assert m == pytest.approx(s["fd_inf"] - 1.25 * t["fd_inf"], rel=1e-12)
    d = torch.tensor(s["replicates"], dtype=torch.float64) - 1.25 * torch.tensor(
        t["replicates"], dtype=torch.float64)
    assert se == pytest.approx(math.sqrt(7 / 8 * float((d - d.mean()).pow(2).sum())), rel=1e-9)
    # paired: far below the independent-sets error; unpaired sets of the same law: not
    independent = math.hypot(s["se"], 1.25 * t["se"])
    assert se < 0.5 * independent
    assert paired_margin(o, t, 1.25)[1] > 0.5 * math.hypot(o["se"], 1.25 * t["se"])
    fd_m, fd_se = paired_margin(s, t, 1.25, key="fd")
    assert fd_m == pytest.approx(s["fd"] - 1.25 * t["fd"]) and fd_se < 0.5 * math.hypot(
        s["fd_se"], 1.25 * t["fd_se"])
    # not the same design, no replicates, or a bad key: refused
    with pytest.raises(ValueError, match="design"):
        paired_margin(s, frechet_distance_infinity(teacher, ref, labels=lab, draws=2, seed=1))
    with pytest.raises(ValueError, match="design"):
        paired_margin(s, frechet_distance_infinity(teacher, ref, draws=2))
    with pytest.raises(ValueError, match="replicates"):
        paired_margin(s, frechet_distance_infinity(teacher, ref, labels=lab, draws=2, blocks=1))
    with pytest.raises(ValueError, match="key"):
        paired_margin(s, t, key="se")


def test_shipped_classifier_separates_real_from_wrong():
    clf, training = load_classifier()
    assert training["frames"] == 4 and training["size"] == 16
    ds = ShapesVideo(10_000, frames=4, size=16, seed=4242)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
    real = torch.cat([ds.clips_of_class(c, 8) for c in range(NUM_CLASSES)])
    q = evaluate_clips(real, labels, classifier=clf)
    assert q["accuracy"] >= 0.95 and q["fd"] < 30.0   # 48 samples, 64-dim features: biased
    wrong = evaluate_clips(real, (labels + 1) % NUM_CLASSES, classifier=clf)
    assert wrong["accuracy"] <= 0.05
    noise = evaluate_clips(torch.rand(real.shape) * 2 - 1, labels, classifier=clf)
    assert noise["fd"] > 1000
    blank = evaluate_clips(-torch.ones(real.shape), labels, classifier=clf)
    assert blank["fd"] > 1000


def test_reference_features_computed_once_give_the_same_scores():
    """`fmrt eval` computes the real clips' features once per run (reference_features) and passes
    them to every evaluate_clips call: the scores are those of the default path, to the bit."""
    clf, _ = load_classifier()
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 5])      # uneven class counts
    g = torch.Generator().manual_seed(1)
    clips = torch.rand(len(labels), 3, 4, 16, 16, generator=g) * 2.2 - 1.1   # some out of [-1, 1]
    ref = reference_features(clf, labels, frames=4, size=16)
    assert ref.shape == (len(labels), 64) and ref.device.type == "cpu"
    want = evaluate_clips(clips, labels, classifier=clf)
    got = evaluate_clips(clips, labels, classifier=clf, real_features=ref)
    assert got == want
    other = reference_features(clf, labels, frames=4, size=16, data_seed=5)
    assert evaluate_clips(clips, labels, classifier=clf, real_features=other)["fd"] != want["fd"]
    with pytest.raises(ValueError, match="not both"):
        evaluate_clips(clips, labels, classifier=clf, real=clips, real_features=ref)


@pytest.mark.gpu
def test_classifier_on_the_gpu_scores_cpu_clips():
    """The classifier may sit on the GPU: clips move to it in batches, features come back."""
    clf, _ = load_classifier()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(4)
    ds = ShapesVideo(10_000, frames=4, size=16, seed=4242)
    real = torch.cat([ds.clips_of_class(c, 4) for c in range(NUM_CLASSES)])
    want = evaluate_clips(real, labels, classifier=clf)
    got = evaluate_clips(real, labels, classifier=clf.cuda())
    assert got["accuracy"] == want["accuracy"]
    assert got["fd"] == pytest.approx(want["fd"], rel=1e-3, abs=1e-3)


def test_classifier_training_is_deterministic():
    cfg = ClassifierTraining(steps=2, batch_size=2)
    a, b = train_classifier(cfg), train_classifier(cfg)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
