import os

import pytest
import torch

from fmrt.checkpoint import (NonFiniteTensorError, TrainState, atomic_write_bytes,
                             check_finite, checkpoint_path, export_model, list_checkpoints,
                             load_model, load_train_state, merge_lora, prune_checkpoints,
                             read_meta, remove_run, remove_stale_temporaries, run_files,
                             save_train_state)
from fmrt.models import DiT, DiTConfig
from fmrt.train import train
from tests.test_train import TINY, tiny_config


def _dit(**kw):
    torch.manual_seed(0)
    return DiT(DiTConfig.preset("tiny", **dict(TINY, num_classes=6, **kw)))


def _meta(model):
    return dict(model=model.config.to_dict(), sample=dict(sample_shape=[3, 2, 8, 8]))


def test_export_then_load_model_round_trip(tmp_path):
    m = _dit()
    path = str(tmp_path / "m.safetensors")
    export_model(path, m.state_dict(), _meta(m))
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.safetensors"]
    back, meta = load_model(path)
    assert meta["format"] == "fmrt.dit" and not back.training
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the header's copy of the meta is enough without the .json
    os.remove(tmp_path / "m.json")
    assert read_meta(path) == meta
    with pytest.raises(ValueError, match="must end with .safetensors"):
        export_model(str(tmp_path / "m.pt"), m.state_dict(), _meta(m))


def test_load_model_errors(tmp_path):
    train(tiny_config(tmp_path / "a", steps=1))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="is a directory"):
        load_model(str(tmp_path / "a"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError):
        load_model(str(bad))
    # weights of another shape under a config that claims this shape
    other = train(tiny_config(tmp_path / "b", steps=1,
                              model_overrides=dict(TINY, num_classes=6, dim=64)))
    mixed = tmp_path / "mixed.safetensors"
    mixed.write_bytes(open(other["model_path"], "rb").read())
    (tmp_path / "mixed.json").write_text(open(tmp_path / "a" / "model.json").read())
    with pytest.raises(ValueError, match="another shape"):
        load_model(str(mixed))


def test_nothing_non_finite_is_written(tmp_path):
    m = _dit()
    state = dict(m.state_dict())
    check_finite(state, "x")                        # finite: passes
    check_finite({"steps": torch.tensor([1, 2])}, "x")   # integer tensors are not checked
    key = "blocks.0.ffn.0.weight"
    state[key] = state[key].clone()
    state[key][3, 1] = float("inf")
    path = str(tmp_path / "m.safetensors")
    with pytest.raises(NonFiniteTensorError, match=key):
        export_model(path, state, _meta(m))
    ck = checkpoint_path(str(tmp_path), 5)
    os.makedirs(os.path.dirname(ck))
    with pytest.raises(NonFiniteTensorError, match="ema.head.head.weight"):
        save_train_state(ck, TrainState(step=5, meta=_meta(m), model=m.state_dict(),
                                        ema={"head.head.weight": torch.full((2,), float("nan"))}))
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]
    assert os.listdir(tmp_path / "checkpoints") == []


def test_train_state_round_trip_and_listing(tmp_path):
    m = _dit()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(1, 3, 2, 8, 8), torch.rand(1), torch.tensor([1])).sum().backward()
    opt.step()
    from fmrt.checkpoint import load_optimizer, optimizer_tensors
    optim, groups = optimizer_tensors(opt)
    (tmp_path / "checkpoints").mkdir()
    for step in (3, 1, 2):
        save_train_state(checkpoint_path(str(tmp_path), step),
                         TrainState(step=step, meta=_meta(m), model=m.state_dict(),
                                    optim=optim, optim_groups=groups,
                                    rng={"torch": torch.get_rng_state()}))
    (tmp_path / "checkpoints" / "step-0000009.safetensors").write_bytes(b"half")  # no .json
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [1, 2, 3]
    ts = load_train_state(checkpoint_path(str(tmp_path), 2))
    assert ts.step == 2 and ts.meta["format"] == "fmrt.train_state"
    assert torch.equal(ts.rng["torch"], torch.get_rng_state())
    opt2 = torch.optim.AdamW(_dit().parameters(), lr=1e-3)
    load_optimizer(opt2, ts.optim, ts.optim_groups)
    again = optimizer_tensors(opt2)[0]
    assert set(again) == set(optim)
    for k, v in optim.items():
        assert torch.equal(again[k], v), k
    prune_checkpoints(str(tmp_path), 2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    export_model(str(tmp_path / "m.safetensors"), m.state_dict(), _meta(m))
    with pytest.raises(ValueError, match="not a resumable"):
        load_train_state(str(tmp_path / "m.safetensors"))


def test_atomic_write_leaves_no_temporary_on_error(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(str(path), object())       # fails inside the write
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    atomic_write_bytes(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def test_stale_temporaries_and_run_files(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    dead = 2 ** 22 + 12345          # above Linux's default pid_max: no such process
    stale = [ck / f"step-0000004.safetensors.tmp{dead}", tmp_path / f"model.json.tmp{dead}",
             tmp_path / f"metrics.jsonl.tmp{dead}"]
    live = ck / f"step-0000004.json.tmp{os.getpid()}"       # a writer still at work
    mine = [tmp_path / f"notes.txt.tmp{dead}", tmp_path / "model.safetensors.tmpx",
            tmp_path / "data.safetensors", tmp_path / "readme.md"]   # the user's files
    for p in stale + [live] + mine:
        p.write_bytes(b"x")
    assert run_files(str(tmp_path)) == []
    assert sorted(remove_stale_temporaries(str(tmp_path))) == sorted(map(str, stale))
    assert live.exists() and all(p.exists() for p in mine)
    (ck / "step-0000002.safetensors").write_bytes(b"w")
    (ck / "step-0000002.json").write_bytes(b"{}")
    (ck / "step-0000003.json").write_bytes(b"{}")          # half of a checkpoint
    (tmp_path / "metrics.jsonl").write_bytes(b"{}\n")
    (tmp_path / "model.json").write_bytes(b"{}")
    want = sorted(map(str, [ck / "step-0000002.safetensors", ck / "step-0000002.json",
                            ck / "step-0000003.json", tmp_path / "metrics.jsonl",
                            tmp_path / "model.json"]))
    assert sorted(run_files(str(tmp_path))) == want
    assert sorted(remove_run(str(tmp_path))) == want
    assert run_files(str(tmp_path)) == [] and live.exists() and all(p.exists() for p in mine)


def test_merge_lora_formula():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    a_, b_ = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    state = {"l.base_layer.weight": w, "l.base_layer.bias": b, "l.lora_A.default.weight": a_,
             "l.lora_B.default.weight": b_, "other.weight": torch.ones(1)}
    out = merge_lora(state, rank=2, alpha=4.0)
    assert set(out) == {"l.weight", "l.bias", "other.weight"}
    torch.testing.assert_close(out["l.weight"], w + 2.0 * b_ @ a_)
    assert out["l.bias"] is b
    plain = {"x": torch.ones(2)}
    assert merge_lora(plain, rank=0) == plain
    with pytest.raises(ValueError, match="no rank"):
        merge_lora(state, rank=0)


def test_sampling_defaults_and_export_for_sampling(tmp_path):
    from fmrt.checkpoint import export_for_sampling, with_sampling_defaults
    meta = dict(_meta(_dit()), step=3)
    new = with_sampling_defaults(meta, steps=8, guidance_scale=2, shift=0.5,
                                 guidance_interval=(0, 0.7))
    assert new["sample"] == dict(sample_shape=[3, 2, 8, 8], steps=8, guidance_scale=2.0,
                                 shift=0.5, guidance_interval=[0.0, 0.7])
    assert "guidance_interval" not in meta["sample"]            # a copy: the input unchanged
    assert "guidance_interval" not in with_sampling_defaults(new, guidance_interval=None)["sample"]
    for bad, err in ((dict(steps=0), ValueError), (dict(steps=2.0), ValueError),
                     (dict(shift=0.0), ValueError), (dict(guidance_scale=-1), ValueError),
                     (dict(guidance_scale=True), ValueError),
                     (dict(guidance_interval=(0.8, 0.2)), ValueError),
                     (dict(guidance_interval=0.5), TypeError), (dict(eta=1.0), TypeError)):
        with pytest.raises(err):
            with_sampling_defaults(meta, **bad)
    # from a training checkpoint: its EMA weights, bit for bit, as a model file
    out = train(tiny_config(tmp_path / "run", steps=2, checkpoint_every=2))
    src = out["checkpoint"]
    dst = str(tmp_path / "m.safetensors")
    written = export_for_sampling(src, dst, guidance_interval=(0.0, 0.7))
    model, got = load_model(dst)
    want, src_meta = load_model(src)
    assert got == written and got["format"] == "fmrt.dit" and src_meta["format"] != "fmrt.dit"
    assert got["sample"]["guidance_interval"] == [0.0, 0.7] and got["step"] == 2
    assert {k: v for k, v in got["sample"].items() if k != "guidance_interval"} == \
        src_meta["sample"]
    for k, v in want.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_average_models_exact_and_refusals(tmp_path):
    """The weighted average of two exported models, parameter by parameter, to the float32
    rounding of the exact float64 sum; a checkpoint averaged with its own export is that export
    bit for bit; the fixed class_text table is copied, never averaged; bad input refused."""
    from fmrt.checkpoint import average_models, export_average, export_for_sampling
    a, b = _dit(text_dim=16), _dit(text_dim=16)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    export_model(pa, a.state_dict(), _meta(a))
    export_model(pb, b.state_dict(), dict(_meta(b), sample=dict(steps=7)))
    state, meta = average_models([pa, pb], [1, 3])
    assert meta["averaged_from"] == [dict(path=pa, weight=0.25), dict(path=pb, weight=0.75)]
    assert meta["sample"] == _meta(a)["sample"]                 # the first model's defaults
    for k, p in a.named_parameters():
        want = (0.25 * p.double() + 0.75 * dict(b.named_parameters())[k].double()).float()
        assert torch.equal(state[k], want), k
    assert torch.equal(state["class_text"], a.class_text)
    # equal weights by default; the export samples with exactly these weights
    out = str(tmp_path / "avg.safetensors")
    written = export_average([pa, pb], out, steps=4)
    model, got = load_model(out)
    assert got == written and got["sample"]["steps"] == 4 and len(got["averaged_from"]) == 2
    for k, p in a.named_parameters():
        want = (0.5 * p.double() + 0.5 * dict(b.named_parameters())[k].double()).float()
        assert torch.equal(model.state_dict()[k], want), k
    # a training checkpoint (its EMA weights) averaged with its own export: unchanged
    run = train(tiny_config(tmp_path / "run", steps=2, checkpoint_every=2))
    exp = str(tmp_path / "exp.safetensors")
    export_for_sampling(run["checkpoint"], exp)
    same, _ = average_models([run["checkpoint"], exp])
    for k, v in load_model(exp)[0].state_dict().items():
        assert torch.equal(same[k], v), k
    # refusals, one line each
    c = _dit(text_dim=16, class_text_seed=1)
    pc = str(tmp_path / "c.safetensors")
    export_model(pc, c.state_dict(), _meta(c))
    sd = dict(a.state_dict(), class_text=a.class_text + 1)     # a hand-edited table
    pd = str(tmp_path / "d.safetensors")
    export_model(pd, sd, _meta(a))
    pe = str(tmp_path / "e.safetensors")
    export_model(pe, _dit().state_dict(), _meta(_dit()))
    for args, match in (([pa], "at least two"), ([pa, pa], "given twice"),
                        ([pa, pb, [1.0]], "1 weights for 2 models"),
                        ([pa, pb, [1.0, 0.0]], "positive and finite"),
                        ([pa, pb, [1.0, float("nan")]], "positive and finite"),
                        ([pa, pc], "architecture differs"), ([pa, pe], "architecture differs"),
                        ([pa, pd], "buffer class_text differs")):
        srcs, weights = (args[:2], args[2]) if len(args) == 3 else (args, None)
        with pytest.raises(ValueError, match=match):
            average_models(srcs, weights)
    with pytest.raises(FileNotFoundError):
        average_models([pa, str(tmp_path / "missing.safetensors")])
