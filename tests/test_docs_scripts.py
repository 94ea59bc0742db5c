"""The experiment and measuring scripts under docs/ that the README's commands run: they load and
run on a tiny model or on real clips, and give the exact answers they can be checked on."""
import importlib.util
import json
import os

import pytest
import torch

from fmrt.checkpoint import export_model, load_model
from fmrt.data import ShapesVideo
from fmrt.reflow import make_couplings, save_couplings
from fmrt.sampling import generate_clips, sample
from tests.test_sampling_clips import _model as tiny_clip_model

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
SHAPE = (3, 2, 8, 8)              # tiny_clip_model's sample_shape


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", os.path.join(DOCS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny(tmp_path):
    """A tiny exported DiT and 8 couplings drawn from it with one Euler step."""
    model, meta = tiny_clip_model()
    meta = dict(model=model.config.to_dict(),
                sample=dict(meta["sample"], steps=1, guidance_scale=1.0, num_classes=6))
    path = str(tmp_path / "m.safetensors")
    export_model(path, model.state_dict(), meta)
    model, meta = load_model(path)
    cond = torch.arange(8) % 6

    def one_step(m, noise, cond=None):
        return generate_clips(model, meta, cond, steps=1, noise=noise, clamp=False)
    pairs = make_couplings(model, 8, SHAPE, cond=cond, seed=5, sample_fn=one_step)
    cpath = str(tmp_path / "c.safetensors")
    save_couplings(cpath, pairs)
    return path, cpath


def test_reflow_sharpness_is_exact_on_the_model_that_drew_the_couplings(tiny, capsys):
    path, cpath = tiny
    _script("reflow_sharpness").main([cpath, path])
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3
    assert "mse 0.0000" in rows[0] and "alpha +0.0000" in rows[0]
    # the couplings are this model's own 1-step samples: its 1-step row is the teacher's row
    assert rows[1].split("|dx|")[1] == rows[0].split("|dx|")[1]
    assert "mse 0.0000" not in rows[2]


def test_adversarial_reflow_trains_and_exports(tiny, tmp_path, monkeypatch, capsys):
    path, cpath = tiny
    out = str(tmp_path / "adv")
    monkeypatch.setattr("sys.argv", ["adversarial_reflow.py", "--init", path, "--out", out,
                                     "--couplings", cpath, cpath, "--steps", "2",
                                     "--d-warmup", "1", "--w-adv", "0.5"])
    _script("adversarial_reflow").main()
    logs = [json.loads(line) for line in open(out + ".log.jsonl")]
    assert [r["step"] for r in logs] == [0, 1]
    assert logs[0]["lam"] == 0.0 and logs[1]["lam"] > 0.0      # the term starts after d_warmup
    first, _ = load_model(out + "_step0001.safetensors")
    last, meta = load_model(out + ".safetensors")
    assert meta["train"]["adversarial_prototype"]["w_adv"] == 0.5
    base, _ = load_model(path)
    moved = [not torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                   last.state_dict().values())]
    assert any(moved)
    assert "wall" in capsys.readouterr().out
    # it never replaces a file: not its earlier output, not the model it starts from
    monkeypatch.setattr("sys.argv", ["adversarial_reflow.py", "--init", path, "--out",
                                     path[:-len(".safetensors")], "--couplings", cpath])
    before = open(path, "rb").read()
    with pytest.raises(SystemExit, match="exists; pick another --out"):
        _script("adversarial_reflow").main()
    assert open(path, "rb").read() == before


def test_element_huber_loss_is_the_per_element_pseudo_huber():
    loss_fn = _script("element_huber_reflow").element_huber_loss
    g = torch.Generator().manual_seed(0)
    pred, x0, noise = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    pred.requires_grad_(True)
    weight = torch.tensor([1.0, 0.5, 2.0])
    c = 0.1
    d = pred - (noise - x0)
    want = ((torch.sqrt(d * d + c * c) - c).mean(dim=(1, 2)) * weight).mean()
    got = loss_fn(pred, x0, noise, weight=weight, huber_c=c)
    torch.testing.assert_close(got, want)
    (gp,) = torch.autograd.grad(got, pred)
    torch.testing.assert_close(gp, (d / torch.sqrt(d * d + c * c) * weight.view(3, 1, 1) / 24).detach())
    # small C: the mean absolute error
    torch.testing.assert_close(loss_fn(pred, x0, noise, huber_c=1e-6), d.abs().mean(),
                               atol=1e-5, rtol=0)
    with pytest.raises(SystemExit, match="--couplings and --huber-c only"):
        loss_fn(pred, x0, None, seed=1, huber_c=c)


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
    for bad in (str(p), str(tmp_path / "f.json")):    # never written over an input, nor as JSON
        with pytest.raises(SystemExit, match="OUT must be a .png"):
            m.main([bad, f"x={p}"])
    assert json.loads(p.read_text())["seeds"] == [3, 5]
    m.main([str(tmp_path / "f.png"), f"x={p}"])
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_fd_table_ratios_means_and_goal_counts(tmp_path):
    m = _script("fd_table")

    def write(name, rows, seeds):
        p = tmp_path / name
        p.write_text(json.dumps(dict(seeds=seeds, results=rows)))
        return str(p)
    teacher = write("t.json", [dict(steps=50, guidance_scale=2.0, seed=s, fd=f)
                               for s, f in ((0, 4.0), (1, 2.0))], [0, 1])
    one = write("a0.json", [dict(steps=1, guidance_scale=1.0, fd=5.0),        # seed from the file
                            dict(steps=2, guidance_scale=1.0, fd=4.4)], [0])
    two = write("a1.json", [dict(steps=1, guidance_scale=1.0, fd=2.0),
                            dict(steps=2, guidance_scale=1.0, fd=2.3)], [1])
    lines = m.table([f"T={teacher}", f"S={one},{two}"]).splitlines()
    assert lines[0] == ("|  | seed 0 | seed 1 | mean | mean / teacher | seeds in goal "
                        "| goal margin (se) |")
    assert lines[2] == "| T (50 steps, guidance 2) | 4.00 | 2.00 | 3.00 | 1.00x | - | - |"
    # 1 step: 1.25x and 1.00x, both within 1.25; 2 steps: 1.10x within 1.10, 1.15x not.
    # margins: 1 step FD - 1.25 T = 0, -0.5: mean -0.25, sd 0.354, se 0.25; 2 steps 0, +0.1
    assert lines[3] == ("| S (1 step, guidance 1) | 5.00 (1.25x) | 2.00 (1.00x) | 3.50 | 1.17x "
                        "| 2 of 2 | -0.25 (0.25) |")
    assert lines[4] == ("| S (2 steps, guidance 1) | 4.40 (1.10x) | 2.30 (1.15x) | 3.35 | 1.12x "
                        "| 1 of 2 | +0.05 (0.05) |")
    old = tmp_path / "old.json"          # a one-seed file without its seed: named as PATH@SEED
    old.write_text(json.dumps(dict(results=[dict(steps=50, guidance_scale=2.0, fd=2.0)])))
    t2 = write("t0.json", [dict(steps=50, guidance_scale=2.0, seed=0, fd=4.0)], [0])
    assert m.table([f"T={t2},{old}@1", f"S={one},{two}"]).splitlines()[2:] == lines[2:]
    with pytest.raises(SystemExit, match="records seed"):
        m.table([f"T={t2}@1", f"S={one},{two}"])
    assert m.margin([0.5]) == "+0.50 (-)" and m.margin([-1.0, -3.0]) == "-2.00 (1.00)"
    with pytest.raises(SystemExit, match="no FD at seed"):         # a seed the teacher has
        m.table([f"T={teacher}", f"S={one}"])
    summary = m.table([f"T={teacher}", f"S={one},{two}"], per_seed=False).splitlines()
    assert summary[0] == "|  | mean | mean / teacher | seeds in goal | goal margin (se) |"
    assert summary[3] == "| S (1 step, guidance 1) | 3.50 | 1.17x | 2 of 2 | -0.25 (0.25) |"
    assert len(summary) == len(lines) and summary[1].count("|") == 6
    with pytest.raises(SystemExit, match="one .steps, guidance. setting"):
        m.table([f"T={one}", f"S={two}"])


def test_teacher_from_midpoint_joins_the_two_models_grids():
    m = _script("teacher_from_midpoint")
    model, _ = tiny_clip_model()
    labels = torch.tensor([0, 3, 5])
    z = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(4))
    unguided = {"sample": {"guidance_scale": 1.0}}
    with torch.no_grad():
        want = sample(model, z, sigmas=[1.0, 0.5, 0.25, 0.0], solver="euler", cond=labels)
        one = sample(model, z, sigmas=[1.0, 0.0], solver="euler", cond=labels)
    x0, x_mid = m.student_step(model, z, labels, mid=0.5)
    x = m.teacher_finish(model, unguided, x_mid, labels, mid=0.5, steps=2)
    torch.testing.assert_close(x0, one, atol=1e-6, rtol=0)
    torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)     # one model: one Euler grid
    # the teacher's recorded guidance applies on its own steps, only inside its interval
    late = {"sample": {"guidance_scale": 3.0, "guidance_interval": [0.0, 0.3]}}
    x1 = m.teacher_finish(model, late, x_mid, labels, mid=0.5, steps=1)
    u1 = m.teacher_finish(model, unguided, x_mid, labels, mid=0.5, steps=1)
    assert torch.equal(x1, u1)                    # sigma 0.5 lies outside [0, 0.3]
    x2 = m.teacher_finish(model, late, x_mid, labels, mid=0.5, steps=2)
    assert (x2 - x).abs().max() > 1e-3            # the step at sigma 0.25 is guided
    with pytest.raises(SystemExit):
        m.main(["unused.safetensors", "0", "--mid", "1.5"])


def _tiny_dit(meanflow: bool = False):
    """A tiny Wan-conditioned ("class_text": it has a buffer too) DiT with a non-zero output
    (the DiT's head starts at zero; seeded), and the meta of a 1-step, unguided export of it."""
    from fmrt.models import DiT, DiTConfig
    torch.manual_seed(0)
    model = DiT(DiTConfig.preset("tiny", dim=32, num_layers=1, num_heads=2, ffn_dim=64,
                                 num_classes=6, freq_dim=32, text_dim=16, meanflow=meanflow))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    meta = dict(model=model.config.to_dict(), sample=dict(
        template="Wan", shift=1.0, sample_shape=list(SHAPE), steps=1, guidance_scale=1.0,
        num_classes=6))
    return model, meta


def test_second_step_distill_targets_loss_and_export(tmp_path):
    m = _script("second_step_distill")
    model, meta = _tiny_dit()
    path = str(tmp_path / "m.safetensors")
    export_model(path, model.state_dict(), meta)
    model, meta = load_model(path)
    assert model.config.conditioning == "class_text"
    # the model as its own teacher, one Euler step from the midpoint: both targets are the
    # model's own velocities there, so its loss is zero on either point
    t = m.make_targets(model, model, meta, seed=3, num_per_class=1, mid=0.25, teacher_steps=1,
                       batch_size=4)
    assert t["noise"].shape == (6, *SHAPE) and t["labels"].tolist() == list(range(6))
    torch.testing.assert_close(t["x_mid"], 0.25 * t["noise"] + 0.75 * t["x0_hat"])
    with torch.no_grad():
        want = sample(model, t["noise"], sigmas=[1.0, 0.0], solver="euler", cond=t["labels"])
    torch.testing.assert_close(t["x0_hat"], want, atol=1e-6, rtol=0)
    first, second = torch.zeros(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
    with torch.no_grad():
        assert float(m.second_step_loss(model, t, first)) < 1e-10
        assert float(m.second_step_loss(model, t, second)) < 1e-10
        # a teacher finish 0.1 lower everywhere: the second step's target moves by 0.1 / MID
        off = dict(t, x_teacher=t["x_teacher"] - 0.1)
        assert float(m.second_step_loss(model, off, first)) < 1e-10
        assert float(m.second_step_loss(model, off, second)) == pytest.approx(0.16, rel=1e-4)
        half = torch.tensor([True, False] * 3)
        assert float(m.second_step_loss(model, off, half)) == pytest.approx(0.08, rel=1e-4)
    # train and export: a loadable model whose 2-step default grid has its midpoint at MID
    from safetensors.torch import save_file
    tpath, out = str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors")
    save_file(off, tpath)
    m.main(["train", path, tpath, "--out", out, "--steps", "3", "--batch-size", "4",
            "--warmup-steps", "1"])
    got, gmeta = load_model(out)
    assert gmeta["sample"]["steps"] == 2 and gmeta["second_step"]["mid"] == 0.25
    assert any(not torch.equal(a, b) for a, b in zip(got.parameters(), model.parameters()))
    z = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = sample(got, z, sigmas=[1.0, 0.25, 0.0], solver="euler", cond=torch.tensor([0, 1]))
    torch.testing.assert_close(generate_clips(got, gmeta, torch.tensor([0, 1]), steps=2,
                                              noise=z, clamp=False), want)
    with pytest.raises(SystemExit):                  # never over an existing file
        m.main(["train", path, tpath, "--out", out, "--steps", "1"])


def test_two_step_flow_map_targets_loss_and_export(tmp_path):
    from safetensors.torch import save_file

    from fmrt.checkpoint import with_sampling_defaults
    from fmrt.models import DiT, DiTConfig
    m = _script("two_step_flow_map")
    model, meta = _tiny_dit(meanflow=True)
    path, tpath_model = str(tmp_path / "m.safetensors"), str(tmp_path / "teacher.safetensors")
    export_model(path, model.state_dict(), meta)
    export_model(tpath_model, model.state_dict(), with_sampling_defaults(
        meta, steps=4, guidance_scale=2.0, guidance_interval=(0.0, 0.6)))
    student, smeta = load_model(path)
    teacher, tmeta = load_model(tpath_model)     # the same weights, as a velocity model (h = 0)
    # two teacher steps to MID 0.5 and two more: the teacher's own guided 4-step sample
    t = m.make_targets(student, teacher, tmeta, seed=3, num_per_class=1, mid=0.5,
                       teacher_steps=2, batch_size=4)
    z, c = t["noise"], t["labels"]
    assert z.shape == (6, *SHAPE) and c.tolist() == list(range(6))
    torch.testing.assert_close(t["x_teacher"], generate_clips(
        teacher, tmeta, c, steps=4, guidance_scale=2.0, noise=z, clamp=False))
    with torch.no_grad():
        torch.testing.assert_close(t["x0_hat"], z - student(z, 1.0, c, r=0.0))
        x_mid = z - 0.5 * student(z, 1.0, c, r=0.5)     # the student's own two jumps
        exact = dict(t, x_mid=x_mid, x_teacher=x_mid - 0.5 * student(x_mid, 0.5, c, r=0.0))
        for k in range(3):
            assert float(m.flow_map_loss(student, exact, torch.full((6,), k))) < 1e-10
        off = dict(exact, x_teacher=exact["x_teacher"] - 0.1)    # the end 0.1 lower: only
        losses = [float(m.flow_map_loss(student, off, torch.full((6,), k))) for k in range(3)]
        assert losses[0] < 1e-10 and losses[1] < 1e-10            # the last jump moves, by 0.2
        assert losses[2] == pytest.approx(0.04, rel=1e-4)
        assert float(m.flow_map_loss(student, off, torch.tensor([0, 1, 2] * 2))) == \
            pytest.approx(0.04 / 3, rel=1e-4)
        up = dict(exact, x_mid=exact["x_mid"] + 0.1)              # the midpoint 0.1 higher:
        assert float(m.flow_map_loss(student, up, torch.ones(6, dtype=torch.long))) == \
            pytest.approx(0.04, rel=1e-4)                          # the first jump by 0.2
    d = m.jump_distances(student, exact)                  # the student's own jumps: exact
    assert d["mid_vs_x_mid"] < 1e-12 and d["two_vs_teacher"] < 1e-12 and d["one_vs_x0_hat"] < 1e-12
    d = m.jump_distances(student, off, every=2)           # the end 0.1 off: 0.01 from both
    assert d["two_vs_teacher"] == pytest.approx(0.01, rel=1e-4)
    assert d["second_from_x_mid_vs_teacher"] == pytest.approx(0.01, rel=1e-4)
    assert d["mid_vs_x_mid"] < 1e-12
    # train and export: a loadable MeanFlow model whose 2-step default grid has its midpoint at
    # MID, sampled as its two jumps
    tpath, out = str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors")
    save_file(dict(off, mid=torch.tensor(0.25)), tpath)
    m.main(["train", path, tpath, "--out", out, "--steps", "3", "--batch-size", "4",
            "--warmup-steps", "1"])
    got, gmeta = load_model(out)
    assert gmeta["sample"]["steps"] == 2 and gmeta["two_step_flow_map"]["mid"] == 0.25
    assert any(not torch.equal(a, b) for a, b in zip(got.parameters(), student.parameters()))
    with torch.no_grad():
        x = z[:2] - 0.75 * got(z[:2], 1.0, c[:2], r=0.25)
        want = x - 0.25 * got(x, 0.25, c[:2], r=0.0)
    torch.testing.assert_close(generate_clips(got, gmeta, c[:2], steps=2, noise=z[:2],
                                              solver="meanflow", clamp=False), want)
    with pytest.raises(SystemExit):                  # never over an existing file
        m.main(["train", path, tpath, "--out", out, "--steps", "1"])
    plain = str(tmp_path / "plain.safetensors")      # a velocity model has one path only
    export_model(plain, DiT(DiTConfig.preset("tiny", dim=32, num_layers=1, num_heads=2,
                                             ffn_dim=64, num_classes=6, freq_dim=32,
                                             text_dim=16)).state_dict(),
                 dict(meta, model=dict(meta["model"], meanflow=False)))
    with pytest.raises(SystemExit):
        m.main(["train", plain, tpath, "--out", str(tmp_path / "p2.safetensors")])


def test_second_step_dmd_direction_generator_and_export(tmp_path):
    from fmrt.checkpoint import with_sampling_defaults
    m = _script("second_step_dmd")
    model, meta = _tiny_dit()
    path, gpath = str(tmp_path / "m.safetensors"), str(tmp_path / "guided.safetensors")
    export_model(path, model.state_dict(), meta)
    export_model(gpath, model.state_dict(), with_sampling_defaults(
        meta, guidance_scale=2.0, guidance_interval=(0.0, 0.6)))
    net, plain = load_model(path)
    _, guided = load_model(gpath)
    g = torch.Generator().manual_seed(1)
    z, n = torch.randn((4, *SHAPE), generator=g), torch.randn((4, *SHAPE), generator=g)
    c, s = torch.tensor([0, 1, 2, 5]), torch.tensor([0.3, 0.6, 0.61, 0.9])
    with torch.no_grad():
        vc, vu = net(z, s, c), net(z, s, torch.full_like(c, 6))
        # the recorded guidance: CFG 2 on [0, 0.6], both ends included; the cond branch outside
        torch.testing.assert_close(m.guided_velocity(net, plain, z, s, c), vc)
        want = torch.cat([vu[:2] + 2 * (vc[:2] - vu[:2]), vc[2:]])
        torch.testing.assert_close(m.guided_velocity(net, guided, z, s, c), want)
        # the generator with an untrained copy: 2-step Euler at MID, the pin exactly zero
        x0, v1, v0 = m.generator_sample(net, net, z, c, mid=0.25)
        torch.testing.assert_close(x0, sample(net, z, sigmas=[1.0, 0.25, 0.0], solver="euler",
                                              cond=c))
        torch.testing.assert_close(v1, v0)
        # the fake equal to an unguided teacher: no direction; to the guided one: s (g - 1)
        # (v_c - v_u) inside the interval, over the mean |x0 - x0_real| per sample
        assert m.dmd_direction(net, plain, net, x0, c, s, n).abs().max() == 0
        sv = s.view(-1, 1, 1, 1, 1)
        x_s = (1 - sv) * x0 + sv * n
        vc, vu = net(x_s, s, c), net(x_s, s, torch.full_like(c, 6))
        gap = torch.cat([(sv * (vc - vu))[:2], torch.zeros_like(x0[2:])])
        x0_real = x_s - sv * m.guided_velocity(net, guided, x_s, s, c)
        norm = (x0 - x0_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
        got = m.dmd_direction(net, guided, net, x0, c, s, n)
        torch.testing.assert_close(got, gap / norm)
        assert got[2:].abs().max() == 0 and got[:2].abs().max() > 1e-4
        # the fake's flow matching loss: its velocity against n - x0
        want = (net((1 - sv) * x0 + sv * n, s, c) - (n - x0)).pow(2).mean()
        torch.testing.assert_close(m.fake_loss(net, x0, c, s, n), want)
    # a fake already equal to an unguided teacher gives no gradient: nothing moves
    out = str(tmp_path / "still")
    m.main([path, "--teacher", path, "--out-dir", out, "--steps", "2", "--batch-size", "3",
            "--fake-updates", "0", "--fake-warmup", "0", "--pin", "0", "--mid", "0.25"])
    got, gmeta = load_model(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), net.parameters()))
    assert gmeta["sample"]["steps"] == 2 and gmeta["second_step_dmd"]["mid"] == 0.25
    out = str(tmp_path / "still2")               # so is the guided teacher with guidance 1
    m.main([path, "--teacher", gpath, "--out-dir", out, "--steps", "1", "--batch-size", "3",
            "--fake-updates", "0", "--fake-warmup", "0", "--pin", "0", "--real-guidance", "1"])
    got, gmeta = load_model(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), net.parameters()))
    assert gmeta["second_step_dmd"]["real_guidance"] == 1.0
    # against the guided teacher, with fake updates: the second step moves, the checkpoints
    # are exported, the 2-step default grid has its midpoint at MID
    out = str(tmp_path / "moved")
    m.main([path, "--teacher", gpath, "--out-dir", out, "--steps", "3", "--batch-size", "3",
            "--fake-updates", "1", "--fake-warmup", "1", "--checkpoint-every", "2",
            "--mid", "0.25", "--lr", "1e-3", "--fake-init", path])
    assert sorted(os.listdir(out)) == ["log.json", "model.json", "model.safetensors",
                                       "step_00002.json", "step_00002.safetensors"]
    got, gmeta = load_model(os.path.join(out, "model.safetensors"))
    assert any(not torch.equal(a, b) for a, b in zip(got.parameters(), net.parameters()))
    with open(os.path.join(out, "log.json")) as f:
        log = json.load(f)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["g_rms"] > 0 for r in log)
    assert gmeta["second_step_dmd"]["fake_init"] == path
    with torch.no_grad():
        want = sample(got, z[:2], sigmas=[1.0, 0.25, 0.0], solver="euler", cond=c[:2])
    torch.testing.assert_close(generate_clips(got, gmeta, c[:2], steps=2, noise=z[:2],
                                              clamp=False), want)
    with pytest.raises(SystemExit):                  # never into a run directory with files
        m.main([path, "--out-dir", out, "--steps", "1"])
    with pytest.raises(SystemExit):
        m.main([path, "--out-dir", str(tmp_path / "x"), "--mid", "1"])


def test_fd_large_n_slices_merge_and_goal():
    """docs/fd_large_n.py: eval-size sets keep the class-by-class order, two seeds' features merge
    class by class, and the committed JSON's goal table is its rows' figures (the margins as
    few_step_goal.goal_margin gives them)."""
    mod = _script("fd_large_n")
    K = mod.NUM_CLASSES
    feats = torch.arange(K * 4, dtype=torch.float64)[:, None].repeat(1, 2)   # row i holds i
    sets = mod.class_slices(feats, 4, 2)
    assert len(sets) == 2
    assert sets[1][:, 0].tolist() == [c * 4 + j for c in range(K) for j in (2, 3)]
    a = dict(per_class=2, seeds=[1], device="cpu", features={"x_1": torch.zeros(2 * K, 3)},
             rows=[dict(row="x", label="x", steps=1, seconds=[1.0], source="a")])
    b = dict(per_class=3, seeds=[2], device="cpu", features={"x_1": torch.ones(3 * K, 3)},
             rows=[dict(row="x", label="x", steps=1, seconds=[2.0], source="b")])
    m = mod.merge([a, b])
    assert m["per_class"] == 5 and m["seeds"] == [1, 2] and m["device"] == "cpu"
    assert m["features"]["x_1"][:, 0].tolist() == ([0.0] * 2 + [1.0] * 3) * K
    assert m["rows"][0]["seconds"] == [1.0, 2.0] and m["rows"][0]["source"] == "a; b"
    doc = json.load(open(os.path.join(DOCS, "fd_large_n.json")))
    assert doc["goal"] == mod.goal_rows(doc["rows"])
    teacher = next(r for r in doc["rows"] if r["row"] == "teacher")
    for g in doc["goal"]:
        r = next(r for r in doc["rows"] if (r["row"], r["steps"]) == (g["row"], g["steps"]))
        assert g["factor"] == {1: 1.25, 2: 1.10}[g["steps"]]
        assert g["margin_fd_inf"] == pytest.approx(r["fd_inf"] - g["factor"] * teacher["fd_inf"])
        assert g["margin_fd_full_se"] == pytest.approx(
            (r["fd_full_se"] ** 2 + (g["factor"] * teacher["fd_full_se"]) ** 2) ** 0.5)


def test_fd_paired_samples_on_the_couplings_noise_and_pairs_the_margin(tmp_path, monkeypatch):
    """docs/fd_paired.py end to end on 12 clips a class: couplings cut to the rarest class's
    count, class by class; each student clip is the row's sample from that coupling's noise
    and class; the goal's margins are `paired_margin`'s; --from-features gives the same JSON."""
    import dataclasses

    from benchmarks.few_step_goal import ROWS
    from fmrt.eval import paired_margin
    mod = _script("fd_paired")
    soup = dataclasses.replace(ROWS[3], steps=(1,))
    monkeypatch.setattr(mod, "ROWS", (ROWS[0], soup))
    model, meta = load_model(os.path.join(os.path.dirname(DOCS), soup.checkpoint))
    shape = tuple(meta["sample"]["sample_shape"])
    g = torch.Generator().manual_seed(0)
    cond = torch.arange(6).repeat(13)[:-1]             # 13 of each class but the last: 12
    noise = torch.randn(77, *shape, generator=g)
    # the "teacher" is the student itself: paired, the margin is -0.25 x its FD, the error 0.25 x
    pairs = dict(noise=noise, cond=cond,
                 sample=generate_clips(model, meta, cond, steps=1, noise=noise))
    paths = []
    for i, part in enumerate((slice(0, 40), slice(40, 77))):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        save_couplings(paths[-1], {k: v[part] for k, v in pairs.items()})
    coup = mod.balanced_couplings(paths)
    assert coup["per_class"] == 12 and coup["cond"].tolist() == [c for c in range(6)
                                                                  for _ in range(12)]
    assert torch.equal(coup["noise"][12], pairs["noise"][1])      # class 1's first coupling
    with pytest.raises(SystemExit, match="too few"):
        mod.balanced_couplings(paths, per_class=13)
    out, feats = str(tmp_path / "p.json"), str(tmp_path / "f.pt")
    args = ["--couplings", *paths, "--ref-per-class", "12", "--draws", "2", "--device", "cpu"]
    assert mod.main(args + ["--out", out, "--features", feats, "--plot",
                            str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    kept = torch.load(feats)
    clf, _ = mod.load_classifier()
    one = generate_clips(model, meta, coup["cond"][12:13], steps=1, noise=coup["noise"][12:13])
    assert torch.allclose(kept["features"][f"{soup.name}_1"][12],
                          mod._features_logits(clf, one)[0][0], atol=1e-4)
    doc = json.load(open(out))
    assert [r["row"] for r in doc["rows"]] == ["real", "teacher", soup.name]
    assert all(r["num"] == 72 for r in doc["rows"])
    (goal,) = doc["goal"]
    student, teacher = doc["rows"][2], doc["rows"][1]
    for key, se in (("fd", "fd_se"), ("fd_inf", "se")):
        m, paired_se = paired_margin(student, teacher, 1.25, key)
        assert (goal[f"margin_{key}"], goal[f"margin_{key}_se"]) == pytest.approx((m, paired_se))
        assert student[key] == pytest.approx(teacher[key], rel=1e-3)
        assert m == pytest.approx(-0.25 * teacher[key], rel=1e-2)
        assert paired_se == pytest.approx(0.25 * teacher[se], rel=2e-2)
        assert goal[f"margin_{key}_se_independent"] == pytest.approx(
            (1 + 1.25 ** 2) ** 0.5 * teacher[se], rel=2e-2)
    ms = [(goal[f"margin_{k}"], goal[f"margin_{k}_se"]) for k in ("fd", "fd_inf")]
    assert goal["met"] == ("reliably" if all(m <= -2 * se for m, se in ms) else
                           "on the point estimate" if all(m < 0 for m, _ in ms) else "no")
    again = str(tmp_path / "q.json")
    assert mod.main(args + ["--out", again, "--from-features", feats]) == 0
    assert json.load(open(again))["rows"] == doc["rows"]
    with pytest.raises(SystemExit, match="exists"):
        mod.main(args + ["--out", out])
    with pytest.raises(SystemExit, match="f.pt exists"):       # a run's features are kept
        mod.main(args + ["--out", str(tmp_path / "s.json"), "--features", feats])
    with pytest.raises(SystemExit, match="not --per-class 11"):
        mod.main(args + ["--out", str(tmp_path / "r.json"), "--from-features", feats,
                         "--per-class", "11"])
    # pooled: two runs' features (here the same run twice) score as one set of both, in order
    twice = ["--couplings", *paths, *paths] + args[len(paths) + 1:]
    pooled = str(tmp_path / "pooled.json")
    assert mod.main(twice + ["--out", pooled, "--from-features", feats, feats]) == 0
    doc2 = json.load(open(pooled))
    assert doc2["per_class"] == 24 and all(r["num"] == 144 for r in doc2["rows"])
    assert doc2["rows"][2]["fd"] == pytest.approx(doc2["rows"][1]["fd"], rel=1e-3)
    assert len({r["design"] for r in doc2["rows"]}) == 1 and doc2["rows"][0]["design"] != \
        doc["rows"][0]["design"]
    coup2, kept2 = mod.pooled_features([feats, feats], [*paths, *paths], None)
    assert torch.equal(coup2["cond"], torch.cat([coup["cond"]] * 2))
    assert torch.equal(kept2["features"][f"{soup.name}_1"],
                       torch.cat([kept["features"][f"{soup.name}_1"]] * 2))
    for bad, match in (([*paths], "not --couplings"), ([*paths, *paths, *paths], "not --couplings")):
        with pytest.raises(SystemExit, match=match):
            mod.pooled_features([feats, feats], bad, None)
    with pytest.raises(SystemExit, match="one run"):
        mod.pooled_features([feats, feats], [*paths, *paths], 12)


def test_fd_paired_combine_takes_the_plain_mean_of_independent_runs(tmp_path):
    """--combine: per goal the mean of the runs' margins, se sqrt(sum se^2) / k, the verdict at
    --bar se on both FD and FD_inf; runs sharing couplings or differing in design refused."""
    mod = _script("fd_paired")

    def run(name, couplings, margins, per_class=512):
        goal = dict(row="soup", label="the average", steps=1, factor=1.25)
        for key, (m, se) in zip(("fd", "fd_inf"), margins):
            goal.update({f"margin_{key}": m, f"margin_{key}_se": se, f"ratio_{key}": 1.0})
        doc = dict(couplings=couplings, per_class=per_class, blocks=16, draws=32, ref_seed=999,
                   ref_per_class=1280, goal=[goal],
                   rows=[dict(row="real", num=6 * per_class, fd=0.3, fd_inf=0.1),
                         dict(row="teacher", num=6 * per_class, fd=2.0, fd_inf=1.9)])
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        return str(path)

    a = run("a", ["c1", "c2"], [(-1.0, 0.4), (-1.2, 0.5)])
    b = run("b", ["c3", "c4"], [(-0.5, 0.3), (-0.3, 0.6)])
    c = run("c", ["c5", "c6"], [(-0.9, 0.2), (+2.0, 0.2)])
    doc = mod.combine([a, b], bar=2.0)
    (g,) = doc["goal"]
    assert g["margin_fd"] == pytest.approx(-0.75)
    assert g["margin_fd_se"] == pytest.approx((0.4 ** 2 + 0.3 ** 2) ** 0.5 / 2)
    assert g["margin_fd_inf"] == pytest.approx(-0.75)
    assert g["margin_fd_inf_se"] == pytest.approx((0.5 ** 2 + 0.6 ** 2) ** 0.5 / 2)
    assert g["runs_margin_fd"] == [-1.0, -0.5] and doc["teacher_fd"] == [2.0, 2.0]
    assert g["met"] == "on the point estimate"        # FD at 3.0 se, FD_inf at 1.9 se
    assert mod.combine([a, b], bar=1.9)["goal"][0]["met"] == "reliably"
    assert mod.combine([a, b, c], bar=2.0)["goal"][0]["met"] == "no"   # FD_inf: +0.17
    shared = run("d", ["c2", "c7"], [(-1.0, 0.1), (-1.0, 0.1)])
    with pytest.raises(SystemExit, match="share couplings"):
        mod.combine([a, shared], 2.0)
    other = run("e", ["c8"], [(-1.0, 0.1), (-1.0, 0.1)], per_class=256)
    with pytest.raises(SystemExit, match="per_class: not one design"):
        mod.combine([a, other], 2.0)
    with pytest.raises(SystemExit, match="two runs or more"):
        mod.combine([a], 2.0)
    out = tmp_path / "combined.json"
    assert mod.main(["--combine", a, b, "--bar", "2.29", "--out", str(out),
                     "--plot", str(tmp_path / "combined.png")]) == 0
    assert json.loads(out.read_text())["bar"] == 2.29
    assert (tmp_path / "combined.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="exists"):
        mod.main(["--combine", a, b, "--out", str(out)])
    with pytest.raises(SystemExit):                     # a run and a combination at once
        mod.main(["--combine", a, b, "--couplings", "c1", "--out", str(tmp_path / "x.json")])


@pytest.mark.parametrize("name", ["fd_paired", "fd_paired_ref5151", "fd_paired_9103",
                                  "fd_paired_pooled", "fd_paired_9105"])
def test_fd_paired_committed_goal_is_its_rows(name):
    """docs/fd_paired*.json: the goal table is its rows' figures, the margins' errors are the
    paired jackknife's, and every row was scored on the same design (so the blocks pair)."""
    from fmrt.eval import paired_margin
    mod = _script("fd_paired")
    doc = json.load(open(os.path.join(DOCS, f"{name}.json")))
    assert doc["goal"] == mod.goal_rows(doc["rows"])
    assert len({r["design"] for r in doc["rows"]}) == 1
    assert all(len(r["replicates"]) == doc["blocks"] for r in doc["rows"])
    teacher = next(r for r in doc["rows"] if r["row"] == "teacher")
    for g in doc["goal"]:
        r = next(r for r in doc["rows"] if (r["row"], r["steps"]) == (g["row"], g["steps"]))
        assert g["factor"] == {1: 1.25, 2: 1.10}[g["steps"]]
        assert (g["margin_fd_inf"], g["margin_fd_inf_se"]) == pytest.approx(
            paired_margin(r, teacher, g["factor"]))


def test_fd_paired_committed_combination_is_its_runs():
    """docs/fd_paired_combined.json (the third look's verdict): recomputed from the three
    committed runs it names, at its own bar (Pocock's 2.29 for three looks)."""
    mod = _script("fd_paired")
    doc = json.load(open(os.path.join(DOCS, "fd_paired_combined.json")))
    assert doc["bar"] == 2.29 and len(doc["runs"]) == 3
    runs = [os.path.join(os.path.dirname(DOCS), p) for p in doc["runs"]]
    again = mod.combine(runs, doc["bar"])
    assert again["goal"] == doc["goal"] and again["teacher_fd"] == doc["teacher_fd"]
