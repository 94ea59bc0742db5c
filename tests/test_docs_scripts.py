"""The measuring scripts in docs/ that the README quotes (CPU, small sizes)."""
import importlib.util
import json
import os

import pytest
import torch

from fmrt.data import ShapesVideo

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(DOCS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_disc_fall_motion_measures_real_discs():
    """A real disc falls 0.45 of a 16-pixel frame (7.2 pixels; the anti-aliased centroid within
    a few hundredths), keeps its radius (0.2-0.26 of the frame) and has a thin soft edge; a
    disc held still falls 0."""
    m = _script("disc_fall_motion")
    clips = ShapesVideo(10 ** 6, frames=4, size=16, seed=999).clips_of_class(1, 8)
    s = m.shape_stats(clips)
    assert s["fall"].sub(7.2).abs().max() < 0.1 and s["core_fall"].sub(7.2).abs().max() < 0.6
    assert s["radius"].min() > 0.2 * 16 - 0.1 and s["radius"].max() < 0.26 * 16 + 0.1
    assert s["radius_sd"].max() < 0.05 and s["soft"].max() < 0.12
    still = clips[:, :, :1].expand_as(clips)
    assert m.shape_stats(still)["fall"].abs().max() == 0
    ghost = clips.clone()     # a faint copy of the first frame's disc left in the last frame
    ghost[:, :, -1] = torch.maximum(clips[:, :, -1], clips[:, :, 0] * 0.3 - 0.7)
    g = m.shape_stats(ghost)
    assert (g["fall"] < s["fall"] - 0.5).all() and (g["core_fall"] == s["core_fall"]).all()


def test_fd_noise_quantile_and_floor():
    m = _script("fd_noise")
    assert m.quantile([5, 1, 4, 2, 3], 0.5) == 3 and m.quantile([5, 1, 4, 2, 3], 0.0) == 1
    from fmrt.eval import frechet_distance, load_classifier
    clf, _ = load_classifier()
    a = m.real_features(clf, 999, 8)
    assert a.shape[0] == 6 * 8
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-3)
    assert frechet_distance(a, m.real_features(clf, 10000, 8)) > 0


def test_fd_over_seeds_reads_eval_json(tmp_path):
    m = _script("fd_over_seeds")
    rows = [dict(solver="real data", steps=0, guidance_scale=0.0, fd=7.8)]
    rows += [dict(steps=st, guidance_scale=1.0, seed=s, fd=float(10 * st + s))
             for st in (1, 2) for s in (3, 5)]
    p = tmp_path / "q.json"
    p.write_text(json.dumps(dict(seeds=[3, 5], results=rows)))
    assert m.series([str(p)]) == {(1, 1.0): {3: 13.0, 5: 15.0}, (2, 1.0): {3: 23.0, 5: 25.0}}
    old = tmp_path / "old.json"     # a one-seed file from before rows carried their seed
    old.write_text(json.dumps(dict(results=[dict(steps=1, guidance_scale=1.0, fd=1.0)])))
    with pytest.raises(SystemExit, match="without a seed"):
        m.series([str(old)])
    pytest.importorskip("matplotlib")
    m.main([str(tmp_path / "f.png"), f"x={p}"])
    assert (tmp_path / "f.png").stat().st_size > 1000
