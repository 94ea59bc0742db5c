import math

import pytest
import torch

from fmrt.data import NUM_CLASSES, ShapesVideo
from fmrt.eval import (ClassifierTraining, evaluate_clips, frechet_distance, load_classifier,
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
