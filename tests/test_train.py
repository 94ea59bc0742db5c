import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmrt.data import ShapesVideo
from fmrt.checkpoint import list_checkpoints, load_model
from fmrt.train import (EMA, NonFiniteLossError, TrainConfig, TrainingInterrupted, lora_targets,
                        train)

TINY = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64, freq_dim=32, class_tokens=1)


def tiny_config(out_dir, **kw):
    base = dict(out_dir=str(out_dir), model_overrides=dict(TINY, num_classes=6), frames=2,
                size=8, batch_size=4, steps=4, log_every=1, progress=False, device="cpu",
                timestep_sampler="logit_normal", weighting="none", ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def _tensors(path):
    return load_file(path)


def test_train_writes_model_metrics_and_checkpoints(tmp_path):
    out = train(tiny_config(tmp_path, checkpoint_every=2, keep_checkpoints=0))
    assert out["step"] == 4 and torch.isfinite(torch.tensor(out["loss"]))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 4]
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "it_per_s"} <= set(r) for r in lines)
    meta = json.load(open(tmp_path / "model.json"))
    assert meta["format"] == "fmrt.dit" and meta["step"] == 4
    assert meta["model"]["dim"] == 32 and meta["train"]["batch_size"] == 4
    assert meta["sample"]["sample_shape"] == [3, 2, 8, 8]
    assert not [f for f in os.listdir(tmp_path) + os.listdir(tmp_path / "checkpoints")
                if ".tmp" in f]
    # the export holds the EMA weights
    ck = _tensors(out["checkpoint"])
    exported = _tensors(out["model_path"])
    for k, v in exported.items():
        assert torch.equal(v, ck[f"ema.{k}"]), k
    model, meta2 = load_model(out["model_path"])
    x = torch.randn(2, 3, 2, 8, 8)
    assert model(x, torch.rand(2), torch.tensor([0, 6])).shape == x.shape


def test_resume_is_bit_identical(tmp_path):
    full = train(tiny_config(tmp_path / "full", steps=6))
    train(tiny_config(tmp_path / "half", steps=3))
    resumed = train(tiny_config(tmp_path / "half", steps=6, resume="auto"))
    assert resumed["step"] == 6
    a, b = _tensors(full["checkpoint"]), _tensors(resumed["checkpoint"])
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and it did train: the weights moved from the initial ones
    c = _tensors(train(tiny_config(tmp_path / "short", steps=1))["checkpoint"])
    assert not torch.equal(a["model.head.head.weight"], c["model.head.head.weight"])


class _Poisoned(ShapesVideo):
    """Built-in data that turns to NaN after `after` items have been read."""

    def __init__(self, after, **kw):
        super().__init__(1000, frames=2, size=8, **kw)
        self.after, self.calls = after, 0

    def __getitem__(self, i):
        self.calls += 1
        x, y = super().__getitem__(i)
        return (x * float("nan") if self.calls > self.after else x), y


def test_nan_loss_stops_and_never_writes_a_poisoned_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, steps=5, checkpoint_every=1, keep_checkpoints=0)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(cfg, dataset=_Poisoned(after=3 * 4))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [1, 2, 3]
    assert not (tmp_path / "model.safetensors").exists()
    for _, p in list_checkpoints(str(tmp_path)):
        assert all(torch.isfinite(v.float()).all() for v in _tensors(p).values())


def test_lora_trains_adapters_only_and_merges(tmp_path):
    base = train(tiny_config(tmp_path / "base", steps=1))
    cfg = tiny_config(tmp_path / "lora", steps=3, lora_rank=2, init=base["model_path"],
                      lr=1e-2, ema_decay=0.0)
    out = train(cfg)
    model = out["model"]
    names = lora_targets(load_model(base["model_path"])[0])
    assert any(n.endswith("self_attn.qkv") for n in names)
    for suffix in ("self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
                   "cross_attn.o", "ffn.0", "ffn.2"):
        assert any(n.endswith(suffix) for n in names), suffix
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert sorted(adapted) == sorted(names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = load_file(base["model_path"])
    after = load_file(out["model_path"])
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    # the merged export computes what the adapter model computes
    merged, _ = load_model(out["model_path"])
    from_checkpoint, _ = load_model(out["checkpoint"])     # adapters merged on load
    for k, v in merged.state_dict().items():
        assert torch.equal(from_checkpoint.state_dict()[k], v), k
    x, s, y = torch.randn(2, 3, 2, 8, 8), torch.rand(2), torch.tensor([1, 2])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x, s, y), model(x, s, y), atol=1e-5, rtol=1e-5)


def test_ema_update_matches_formula():
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    ema = EMA([("w", p[0])], decay=0.5)
    with torch.no_grad():
        p[0].copy_(torch.tensor([3.0, 6.0]))
    ema.update(p, step=100)          # d = min(0.5, 101/110) = 0.5
    assert torch.equal(ema.state()["w"], torch.tensor([2.0, 4.0]))
    ema.update(p, step=0)            # d = min(0.5, 1/10) = 0.1
    torch.testing.assert_close(ema.state()["w"], torch.tensor([0.1 * 2 + 0.9 * 3,
                                                               0.1 * 4 + 0.9 * 6]))


def test_train_on_latent_folder(tmp_path):
    d = tmp_path / "lat"
    d.mkdir()
    save_file({"latents": torch.randn(8, 4, 2, 4, 4), "label": torch.arange(8) % 3},
              str(d / "a.safetensors"))
    cfg = tiny_config(tmp_path / "run", data=str(d), steps=2,
                      model_overrides=dict(TINY, num_classes=3))
    out = train(cfg)
    model, meta = load_model(out["model_path"])
    assert model.config.in_channels == 4 and meta["sample"]["sample_shape"] == [4, 2, 4, 4]


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=-1.0), dict(objective="x"),
                                 dict(weighting="x"), dict(ema_decay=1.0),
                                 dict(timestep_sampler="x"), dict(template="x")])
def test_bad_config(tmp_path, bad):
    with pytest.raises(ValueError):
        train(tiny_config(tmp_path, **bad))


@pytest.mark.gpu
def test_bf16_autocast_on_cuda(tmp_path):
    out = train(tiny_config(tmp_path, device="cuda", steps=2))
    assert torch.isfinite(torch.tensor(out["loss"]))


def test_meanflow_objective_trains_and_samples_in_one_step(tmp_path):
    from fmrt.sampling import generate_clips
    out = train(tiny_config(tmp_path, steps=2, objective="meanflow"))
    model, meta = load_model(out["model_path"])
    assert model.config.meanflow and meta["train"]["objective"] == "meanflow"
    labels = torch.tensor([0, 3])
    one = generate_clips(model, meta, labels, steps=1, solver="meanflow", seed=0, clamp=False)
    # one MeanFlow step from sigma 1: z0 = z1 - u(z1, r=0, t=1)
    z1 = torch.randn((2, 3, 2, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = z1 - model(z1, torch.ones(2), labels, r=torch.zeros(2))
    torch.testing.assert_close(one, want, atol=1e-5, rtol=1e-5)


def test_meanflow_init_from_flow_model_starts_as_that_model(tmp_path):
    # a flow-matching checkpoint fine-tuned with the MeanFlow objective: the new h-embedding's
    # last Linear starts at zero, so at step 0 u(z, r, t) == v(z, t) for any r; it then trains
    base = train(tiny_config(tmp_path / "fm", steps=1))
    fm, _ = load_model(base["model_path"])
    from fmrt.train import _meanflow_from_flow_model
    mf = _meanflow_from_flow_model(fm, base["model_path"]).eval()
    assert mf.config.meanflow and not fm.config.meanflow
    x, t, r, y = torch.randn(2, 3, 2, 8, 8), torch.tensor([0.9, 0.6]), torch.tensor([0.1, 0.6]), \
        torch.tensor([1, 6])
    with torch.no_grad():
        assert torch.equal(mf(x, t, y, r=r), fm(x, t, y))
    out = train(tiny_config(tmp_path / "mf", steps=2, objective="meanflow", lr=1e-2,
                            ema_decay=0.0, init=base["model_path"]))
    tuned, meta = load_model(out["model_path"])
    assert tuned.config.meanflow and meta["model"]["meanflow"]
    h = tuned.time_embedding_h[-1].weight
    assert h.abs().sum() > 0             # the new MLP received gradients
    # ... and the other (non-meanflow) config fields are the base model's
    assert {k: v for k, v in meta["model"].items() if k != "meanflow"} == \
        {k: v for k, v in fm.config.to_dict().items() if k != "meanflow"}


@pytest.mark.parametrize("text_dim", [None, 16], ids=["class", "class_text"])
def test_init_with_more_layers_starts_as_that_model(tmp_path, text_dim):
    """--init with a larger num_layers: the extra blocks start as the identity (their output
    Linears at zero), so the deeper model computes exactly what the base computes; they then
    train. Other shape changes, or fewer layers, are refused instead of silently ignored."""
    from fmrt.train import _deepened
    over = dict(TINY, num_classes=6, text_dim=text_dim)
    base = train(tiny_config(tmp_path / "fm", steps=1, model_overrides=over))
    fm, _ = load_model(base["model_path"])
    with torch.no_grad():                       # weights far from the init everywhere
        for p in fm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    deep = _deepened(fm, 3, base["model_path"]).eval()
    assert deep.config.num_layers == 3 and len(deep.blocks) == 3
    x, t, y = torch.randn(2, 3, 2, 8, 8), torch.tensor([0.9, 0.3]), torch.tensor([1, 6])
    with torch.no_grad():
        assert torch.equal(deep(x, t, y), fm.eval()(x, t, y))
    # through train(): the run is deeper, records it, and the new blocks learn
    out = train(tiny_config(tmp_path / "deep", steps=2, lr=1e-2, ema_decay=0.0,
                            init=base["model_path"], model_overrides=dict(over, num_layers=2)))
    tuned, meta = load_model(out["model_path"])
    assert meta["model"]["num_layers"] == 2 and tuned.blocks[1].self_attn.o.weight.abs().sum() > 0
    for bad, match in ((dict(over, num_layers=2, dim=48), "dim is 32, the run asks for 48"),
                       (dict(over, num_layers=1), "deepened, not cut")):
        with pytest.raises(ValueError, match=match):
            train(tiny_config(tmp_path / "bad", steps=1, init=out["model_path"],
                              model_overrides=bad))
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# the run folder: earlier runs, resume, interrupts, failures, non-finite weights
# ---------------------------------------------------------------------------------------------

CLI_TINY = ["--dim", "32", "--num-layers", "1", "--num-heads", "2", "--ffn-dim", "64",
            "--frames", "2", "--size", "8", "--batch-size", "4",
            "--no-progress", "--device", "cpu", "--log-every", "1"]


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def _fmrt_train(*args, **popen):
    """`fmrt train ARGS` in a subprocess (the thread count of this process, for bit-exactness)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "fmrt.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _metric_steps(folder):
    return [json.loads(line)["step"] for line in open(os.path.join(folder, "metrics.jsonl"))]


def _ckpt_steps(folder):
    return [s for s, _ in list_checkpoints(str(folder))]


def test_cli_train_refuses_an_earlier_run_and_overwrite_replaces_it(tmp_path):
    from fmrt.cli import main
    d = tmp_path / "run"
    assert main(["train", "--out-dir", str(d), "--steps", "3", "--checkpoint-every", "1",
                 "--keep-checkpoints", "0", *CLI_TINY]) == 0
    (d / "notes.txt").write_text("the user's own file")
    before = _snapshot(d)
    p = _fmrt_train("--out-dir", str(d), "--steps", "2", *CLI_TINY)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and err.count("\n") == 1, err
    assert str(d) in err and "already holds a run" in err and "--overwrite" in err
    assert _snapshot(d) == before                         # byte for byte, nothing added
    assert main(["train", "--out-dir", str(d), "--steps", "2", "--overwrite", *CLI_TINY]) == 0
    # the old run's checkpoints 1..3 are gone (its step 3 would otherwise win a later --resume)
    assert _ckpt_steps(d) == [2] and _metric_steps(d) == [1, 2]
    assert json.load(open(d / "model.json"))["step"] == 2
    assert (d / "notes.txt").read_bytes() == before["notes.txt"]


def test_overwrite_never_removes_its_own_input(tmp_path):
    d = tmp_path / "run"
    train(tiny_config(d, steps=1))
    before = _snapshot(d)
    with pytest.raises(ValueError, match="belongs to the run"):
        train(tiny_config(d, steps=1, overwrite=True, init=str(d / "model.safetensors")))
    with pytest.raises(ValueError, match="--teacher .* belongs to the run"):
        train(tiny_config(d, steps=1, overwrite=True, objective="meanflow",
                          teacher=str(d / "model.safetensors")))
    with pytest.raises(ValueError, match="contradict"):
        train(tiny_config(d, steps=1, overwrite=True, resume="auto"))
    assert _snapshot(d) == before
    with pytest.raises(ValueError, match="--couplings .*model.safetensors belongs to the run"):
        # every shard is checked, not only the first
        train(tiny_config(d, steps=1, overwrite=True, couplings=[
            str(tmp_path / "elsewhere.safetensors"), str(d / "model.safetensors")]))
    assert _snapshot(d) == before


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_cli_train_signal_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, sig, code):
    from fmrt.cli import main
    d = tmp_path / "run"
    p = _fmrt_train("--out-dir", str(d), "--steps", "1000000", *CLI_TINY)
    t0 = time.time()
    while not (d / "metrics.jsonl").exists() or len(_metric_steps(d)) < 2:
        assert p.poll() is None and time.time() - t0 < 300, p.communicate()
        time.sleep(0.05)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == code, err
    k = _metric_steps(d)[-1]                              # the step in flight completed ...
    assert _ckpt_steps(d) == [k] and k >= 2               # ... and was saved
    ck = list_checkpoints(str(d))[0][1]
    assert all(torch.isfinite(v.float()).all() for v in load_file(ck).values())
    assert not (d / "model.safetensors").exists()         # the run did not finish
    assert f"checkpoint {ck}" in err
    cmd = err.strip().splitlines()[-1]
    assert cmd.startswith("resume with: fmrt train --out-dir ") and cmd.endswith(" --resume")
    if sig == signal.SIGINT:                              # the printed command continues it
        argv = shlex.split(cmd[len("resume with: "):])
        assert argv[:2] == ["fmrt", "train"] and "--overwrite" not in argv
        assert main(argv[1:] + ["--steps", str(k + 1)]) == 0
        assert _metric_steps(d) == list(range(1, k + 2))


class _Signals(ShapesVideo):
    """Built-in data that sends this process SIGINT `times` times when item `at` is read."""

    def __init__(self, at, times=1):
        super().__init__(1000, frames=2, size=8)
        self.at, self.times, self.calls = at, times, 0

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(i)


def test_interrupt_saves_a_consistent_state_that_resumes_bit_for_bit(tmp_path):
    data = lambda: ShapesVideo(1000, frames=2, size=8)      # noqa: E731
    full = train(tiny_config(tmp_path / "full", steps=5), dataset=data())
    with pytest.raises(TrainingInterrupted) as e:       # SIGINT while step 2 reads its batch
        train(tiny_config(tmp_path / "cut", steps=5), dataset=_Signals(at=2 * 4 + 1))
    assert e.value.signum == signal.SIGINT and e.value.step == 3
    assert e.value.checkpoint == str(tmp_path / "cut" / "checkpoints" / "step-0000003.safetensors")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored
    resumed = train(tiny_config(tmp_path / "cut", steps=5, resume="auto"), dataset=data())
    a, b = load_file(full["checkpoint"]), load_file(resumed["checkpoint"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _metric_steps(tmp_path / "cut") == [1, 2, 3, 4, 5]
    # a second Ctrl-C stops at once, saving nothing
    with pytest.raises(KeyboardInterrupt) as e:
        train(tiny_config(tmp_path / "twice", steps=5), dataset=_Signals(at=2 * 4 + 1, times=2))
    assert not isinstance(e.value, TrainingInterrupted) and _ckpt_steps(tmp_path / "twice") == []

    class SignalAtStart(ShapesVideo):          # Ctrl-C while the run is being set up
        def config(self):
            os.kill(os.getpid(), signal.SIGINT)
            return super().config()
    with pytest.raises(TrainingInterrupted) as e:
        train(tiny_config(tmp_path / "new" / "run", steps=5),
              dataset=SignalAtStart(1000, frames=2, size=8))
    assert e.value.step == 0 and e.value.checkpoint is None
    assert not (tmp_path / "new").exists()      # nothing done: no folder left behind


def test_resume_needs_a_checkpoint_and_failed_runs_leave_no_folder(tmp_path, capsys):
    from fmrt.cli import main
    new = tmp_path / "a" / "b" / "run"
    with pytest.raises(ValueError, match="nothing to resume"):
        train(tiny_config(new, resume="auto"))
    assert not (tmp_path / "a").exists()
    assert main(["train", "--out-dir", str(new), "--resume", *CLI_TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint in" in err and str(new) in err
    assert not (tmp_path / "a").exists()
    # a run that fails after creating its folder (here: bad data) removes what it created
    with pytest.raises(FileNotFoundError):
        train(tiny_config(new, data=str(tmp_path / "no_such_latents")))
    assert os.listdir(tmp_path) == []
    # ... but never a folder that was there before
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileNotFoundError):
        train(tiny_config(tmp_path / "mine", data=str(tmp_path / "no_such_latents")))
    assert os.listdir(tmp_path / "mine") == []


def test_resume_cleans_stale_temporaries_and_rewinds_metrics(tmp_path):
    d = tmp_path / "run"
    first = train(tiny_config(d, steps=4, checkpoint_every=2, keep_checkpoints=0))
    dead = 2 ** 22 + 12345                     # above Linux's pid_max: a killed writer's PID
    stale = [d / "checkpoints" / f"step-0000006.safetensors.tmp{dead}",
             d / f"model.safetensors.tmp{dead}"]
    mine = d / f"notes.txt.tmp{dead}"
    for p in stale + [mine]:
        p.write_bytes(b"x")
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')            # a line cut short by a kill
    resumed = train(tiny_config(d, steps=4, resume=str(d / "checkpoints" /
                                                        "step-0000002.safetensors")))
    assert not any(p.exists() for p in stale) and mine.read_bytes() == b"x"
    assert _metric_steps(d) == [1, 2, 3, 4]    # steps 3 and 4 once each
    assert _ckpt_steps(d) == [2, 4]
    a, b = load_file(first["model_path"]), load_file(resumed["model_path"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_training_config(tmp_path):
    d = tmp_path / "run"
    train(tiny_config(d, steps=2))
    before = _snapshot(d)
    for change, field in [(dict(batch_size=8), "batch_size"), (dict(lr=1e-3), "lr"),
                          (dict(objective="meanflow"), "model.meanflow"),
                          (dict(cond_drop=0.2), "cond_drop"), (dict(seed=1), "seed"),
                          (dict(model_overrides=dict(TINY, num_classes=6, dim=64)),
                           "model.dim"),
                          (dict(frames=4), "data.frames"),
                          (dict(lr_schedule="cosine"), "lr_schedule")]:
        with pytest.raises(ValueError, match=rf"cannot resume from .*: {field} was"):
            train(tiny_config(d, steps=3, resume="auto", **change))
        assert _snapshot(d) == before, change
    # harmless changes: more steps, logging and checkpointing flags, sampling defaults
    out = train(tiny_config(d, steps=3, resume="auto", log_every=2, checkpoint_every=5,
                            keep_checkpoints=1, sample_guidance=4.0, progress=True))
    assert out["step"] == 3
    # with a cosine schedule the steps fix the schedule: they may not change
    c = tmp_path / "cos"
    train(tiny_config(c, steps=2, lr_schedule="cosine"))
    with pytest.raises(ValueError, match="steps was 2, now 3 .*cosine"):
        train(tiny_config(c, steps=3, lr_schedule="cosine", resume="auto"))


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    step = torch.optim.AdamW.step
    calls = []

    def poisoned(self, *a, **k):              # the 3rd update leaves an infinite weight
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    d = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"not finite after step 3.*step-0000002"):
        train(tiny_config(d, steps=5, checkpoint_every=1, keep_checkpoints=0))
    assert _ckpt_steps(d) == [1, 2] and not (d / "model.safetensors").exists()
    for _, p in list_checkpoints(str(d)):
        assert all(torch.isfinite(v.float()).all() for v in load_file(p).values())


def test_fsdp_meanflow_refused_on_old_torch(tmp_path, monkeypatch):
    import fmrt.train as T
    with pytest.raises(ValueError, match=r"needs torch >= 2\.13.*without fsdp"):
        T.check_fsdp_meanflow("meanflow", True, "2.11.0+cu130")
    T.check_fsdp_meanflow("meanflow", True, "2.13.0+cpu")
    T.check_fsdp_meanflow("meanflow", False, "2.11.0")
    T.check_fsdp_meanflow("sft", True, "2.11.0")
    # the config check runs it with the installed torch, before any work
    monkeypatch.setattr(T, "FSDP_MEANFLOW_MIN_TORCH", "99.0")
    with pytest.raises(ValueError, match="fsdp"):
        train(tiny_config(tmp_path, objective="meanflow", fsdp=True))


def _meanflow_dit():
    """A tiny MeanFlow DiT with every weight perturbed (its zero-initialised parts too), and its
    u(z, r, t, c) in meanflow_loss's convention."""
    from fmrt.models import DiT, DiTConfig
    model = DiT(DiTConfig.preset("tiny", **dict(TINY, num_classes=6, meanflow=True)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def u(z, r, t, c=None):
        return model(z, t, c, r=r)
    return model, u


def test_meanflow_guidance_folded_into_training(tmp_path):
    """cfg_omega / cfg_kappa reach fmrt.losses.meanflow_loss (the same loss, same draws) and
    need the MeanFlow objective with label dropout."""
    from fmrt.losses import meanflow_loss
    from fmrt.train import compute_loss
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, objective="meanflow", cfg_omega=2.0, cfg_kappa=0.3)
    cfg.validate()
    model, u = _meanflow_dit()
    x0, y = torch.randn(3, 3, 2, 8, 8), torch.tensor([0, 2, 5])
    got = compute_loss(model, x0, y, None, sched=None, config=cfg, null_class=6,
                       gen=torch.Generator().manual_seed(5))
    want = meanflow_loss(u, x0, cond=y, uncond=torch.full_like(y, 6), cond_drop_prob=0.1,
                         cfg_omega=2.0, cfg_kappa=0.3, generator=torch.Generator().manual_seed(5))
    plain = meanflow_loss(u, x0, cond=y, uncond=torch.full_like(y, 6), cond_drop_prob=0.1,
                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want) and not torch.equal(got, plain)
    for bad in (dict(objective="sft", cfg_omega=2.0),
                dict(objective="meanflow", cfg_omega=2.0, cond_drop=0.0)):
        with pytest.raises(ValueError, match="cfg_omega"):
            tiny_config(tmp_path, **bad).validate()


@pytest.mark.parametrize("times, want_kw", [
    (dict(), dict()),                                                  # MeanFlow's own default
    (dict(timestep_sampler="uniform"), dict(time_sampler="uniform")),
    (dict(timestep_sampler="logit_normal", logit_mean=0.5, logit_std=0.8),
     dict(time_mu=0.5, time_sigma=0.8)),
])
def test_meanflow_times_follow_the_timestep_sampler(tmp_path, times, want_kw):
    """--timestep-sampler / --logit-mean / --logit-std reach meanflow_loss's time law (they
    were ignored by the MeanFlow objective once); unset, MeanFlow keeps its paper's
    logit-normal(-0.4, 1), and SFT its uniform_index."""
    from fmrt.losses import meanflow_loss
    from fmrt.train import compute_loss
    torch.manual_seed(0)
    base = dict(out_dir=str(tmp_path), model_overrides=dict(TINY, num_classes=6), frames=2,
                size=8, objective="meanflow", cond_drop=0.0, meanflow_ratio=1.0)
    cfg = TrainConfig(**base, **times)
    cfg.validate()
    model, u = _meanflow_dit()
    x0, y = torch.randn(3, 3, 2, 8, 8), torch.tensor([0, 2, 5])
    got = compute_loss(model, x0, y, None, sched=None, config=cfg, null_class=6,
                       gen=torch.Generator().manual_seed(5))

    def loss(**kw):
        return meanflow_loss(u, x0, cond=y, ratio_r_neq_t=1.0,
                             generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(got, loss(**want_kw))
    if want_kw:
        assert not torch.equal(got, loss())
    assert TrainConfig(**dict(base, objective="sft")).timestep_sampler == "uniform_index"
    assert TrainConfig(**dict(base, objective="sft")).logit_mean == 0.0
    for bad in ("mode", "cosmap", "uniform_index"):
        with pytest.raises(ValueError, match="MeanFlow draws its times"):
            TrainConfig(**base, timestep_sampler=bad).validate()


def test_resume_of_a_meanflow_run_recorded_before_its_times_were_read(tmp_path):
    """A MeanFlow checkpoint whose train record says uniform_index (written when MeanFlow
    ignored the field and drew logit-normal(-0.4, 1) times) resumes under the default; another
    time law is refused."""
    d = tmp_path / "run"
    train(tiny_config(d, steps=2, objective="meanflow", timestep_sampler=None,
                      checkpoint_every=1))
    ck = list_checkpoints(str(d))[-1][1]
    meta_path = ck[: -len(".safetensors")] + ".json"
    meta = json.loads(open(meta_path).read())
    assert meta["train"]["timestep_sampler"] == "logit_normal"
    meta["train"].update(timestep_sampler="uniform_index", logit_mean=0.0)
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(ValueError, match="timestep_sampler was 'logit_normal', now 'uniform'"):
        train(tiny_config(d, steps=3, objective="meanflow", timestep_sampler="uniform",
                          resume="auto"))
    train(tiny_config(d, steps=3, objective="meanflow", timestep_sampler=None, resume="auto"))
    assert _metric_steps(d)[-1] == 3


def test_init_class_model_with_text_dim_starts_as_that_model(tmp_path):
    """--init of a class-conditioned model with text_dim set: training starts from the same
    model re-expressed with Wan's conditioning (fmrt.models.convert.class_to_class_text)."""
    from fmrt.models.convert import class_to_class_text
    base = train(tiny_config(tmp_path / "fm", steps=1))
    fm, _ = load_model(base["model_path"])
    over = dict(TINY, num_classes=6, text_dim=16)
    out = train(tiny_config(tmp_path / "wan", steps=1, lr=1e-9, ema_decay=0.0,
                            init=base["model_path"], model_overrides=over))
    tuned, meta = load_model(out["model_path"])
    assert tuned.config.conditioning == "class_text" and meta["model"]["text_dim"] == 16
    want = class_to_class_text(fm, 16)
    for k, v in want.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[k], v, atol=1e-6, rtol=0)


def test_run_lock_refuses_a_second_writer_and_dies_with_its_owner(tmp_path):
    from fmrt.checkpoint import LOCK, RunLock, RunLockedError
    first = RunLock(str(tmp_path))
    assert (tmp_path / LOCK).read_text() == str(os.getpid())
    with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
        RunLock(str(tmp_path))
    first.release()
    first.release()                             # idempotent
    assert not (tmp_path / LOCK).exists()
    RunLock(str(tmp_path)).release()
    # a killed owner leaves its file but not its lock
    code = (f"import sys, time; from fmrt.checkpoint import RunLock; RunLock({str(tmp_path)!r}); "
            "print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"PID {p.pid}"):
            RunLock(str(tmp_path))
    finally:
        p.kill()
        p.wait()
    assert (tmp_path / LOCK).read_text() == str(p.pid)
    lock = RunLock(str(tmp_path))
    assert (tmp_path / LOCK).read_text() == str(os.getpid())
    lock.release()


def test_train_into_a_folder_another_run_writes_to_is_refused(tmp_path, capsys):
    from fmrt.checkpoint import LOCK, RunLock, RunLockedError
    from fmrt.cli import main
    d = tmp_path / "run"
    d.mkdir()
    held = RunLock(str(d))                      # a live run that has not written a file yet
    try:
        for kw in ({}, dict(overwrite=True), dict(resume="auto")):
            with pytest.raises(RunLockedError, match="another fmrt train"):
                train(tiny_config(d, **kw))
            assert os.listdir(d) == [LOCK]      # nothing touched, the owner's lock kept
        assert main(["train", "--out-dir", str(d), "--overwrite", *CLI_TINY]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"PID {os.getpid()}" in err
    finally:
        held.release()
    out = train(tiny_config(d, steps=2))        # free again; a finished run leaves no lock
    assert out["step"] == 2 and not (d / LOCK).exists()


# ---------------------------------------------------------------------------------------------
# distillation: a frozen teacher's guided velocity as the MeanFlow or SFT target (fmrt.distill)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, want", [
    (dict(), 3.0),
    (dict(objective="meanflow"), 3.0),
    (dict(couplings="c.safetensors"), 1.0),
    (dict(objective="meanflow", teacher="t.safetensors"), 1.0),
    (dict(teacher="t.safetensors"), 1.0),
    (dict(objective="meanflow", cond_drop=0.1, cfg_omega=2.0), 1.0),
    (dict(objective="meanflow", cond_drop=0.1, cfg_kappa=0.5), 1.0),
    (dict(couplings="c.safetensors", sample_guidance=2.0), 2.0),
    (dict(sample_guidance=0.0), 0.0),
], ids=["sft", "meanflow", "reflow", "distill", "guidance-distill", "omega", "kappa", "explicit",
        "explicit0"])
def test_recorded_sample_guidance_is_1_where_guidance_is_folded_in(tmp_path, kw, want):
    # a student whose guidance is in its weights would get CFG 3 on top from `fmrt sample`
    # (FD 1510 against 170 in the README's MeanFlow table); an explicit value always wins
    cfg = tiny_config(tmp_path, **kw)
    assert cfg.sample_guidance == want and cfg.to_dict()["sample_guidance"] == want


def test_teacher_distillation_uses_the_teachers_guided_velocity(tmp_path):
    """compute_loss with a teacher is meanflow_loss with velocity=TeacherVelocity (same draws);
    the guidance scale and interval default to the ones the teacher's file records, and the run
    records what they resolved to."""
    from fmrt.checkpoint import export_for_sampling
    from fmrt.losses import meanflow_loss
    from fmrt.train import compute_loss, load_teacher
    base = train(tiny_config(tmp_path / "fm", steps=1, sample_guidance=2.5))
    teacher_path = str(tmp_path / "teacher.safetensors")
    export_for_sampling(base["model_path"], teacher_path, guidance_interval=(0.0, 0.5))
    cfg = tiny_config(tmp_path / "mf", steps=2, objective="meanflow", init=teacher_path,
                      teacher=teacher_path, cond_drop=0.0, meanflow_ratio=0.5)
    out = train(cfg)
    student, meta = load_model(out["model_path"])
    assert meta["distill"] == dict(teacher=teacher_path, guidance_scale=2.5,
                                   guidance_interval=[0.0, 0.5])
    assert meta["train"]["meanflow_ratio"] == 0.5 and student.config.meanflow
    assert meta["sample"]["guidance_scale"] == 1.0   # folded in: no CFG on top by default

    tv, info = load_teacher(dataclasses.replace(cfg, teacher_guidance=3.0,
                                               teacher_guidance_interval=(0.2, 1.0)),
                            student.config, (3, 2, 8, 8), torch.device("cpu"))
    assert (tv.guidance_scale, tv.interval) == (3.0, (0.2, 1.0)) and \
        info["guidance_interval"] == [0.2, 1.0]
    assert not any(p.requires_grad for p in tv.model.parameters())
    x0, y = torch.randn(3, 3, 2, 8, 8), torch.tensor([0, 2, 5])
    got = compute_loss(student, x0, y, None, sched=None, config=cfg, null_class=6,
                       gen=torch.Generator().manual_seed(5), teacher=tv)

    def u(z, r, t, c=None):
        return student(z, t, c, r=r)
    want = meanflow_loss(u, x0, cond=y, cond_drop_prob=0.0, ratio_r_neq_t=0.5, velocity=tv,
                         generator=torch.Generator().manual_seed(5))
    plain = meanflow_loss(u, x0, cond=y, cond_drop_prob=0.0, ratio_r_neq_t=0.5,
                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want) and not torch.equal(got, plain)

    # a MeanFlow model, or one of other data, is no teacher
    with pytest.raises(ValueError, match="MeanFlow model"):
        train(tiny_config(tmp_path / "x", objective="meanflow", teacher=out["model_path"]))
    with pytest.raises(ValueError, match="does not fit"):
        train(tiny_config(tmp_path / "y", objective="meanflow", teacher=teacher_path,
                          model_overrides=dict(TINY, num_classes=3), num_classes=3))


def test_sft_on_a_teachers_velocity_is_guidance_distillation(tmp_path):
    """SFT with a teacher: the same sigma and noise draws as SFT, the teacher's (auto)guided
    velocity at x_t as the target (by hand), with the scheduler's weight; a tiny run records
    the teacher, its scale and its guide, and the folded-in sampling guidance 1."""
    from fmrt.distill import TeacherVelocity
    from fmrt.schedule import FlowMatchScheduler
    from fmrt.train import compute_loss, load_teacher
    teacher = train(tiny_config(tmp_path / "t", steps=1))["model_path"]
    guide = train(tiny_config(tmp_path / "g", steps=1, seed=3))["model_path"]
    cfg = tiny_config(tmp_path / "s", steps=2, init=teacher, teacher=teacher,
                      teacher_guide=guide, teacher_guidance=2.0, cond_drop=0.0,
                      weighting="table", sigma_points=(1.0, 0.5), sigma_points_prob=0.5)
    out = train(cfg)
    student, meta = load_model(out["model_path"])
    assert meta["distill"] == dict(teacher=teacher, guidance_scale=2.0, guidance_interval=None,
                                   guide=guide)
    assert meta["sample"]["guidance_scale"] == 1.0 and not student.config.meanflow

    tv, _ = load_teacher(cfg, student.config, (3, 2, 8, 8), torch.device("cpu"))
    assert isinstance(tv, TeacherVelocity) and tv.guide is not None
    assert not any(p.requires_grad for p in tv.guide.parameters())
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)
    x0, y = torch.randn(5, 3, 2, 8, 8), torch.tensor([0, 2, 5, 1, 1])
    got = compute_loss(student, x0, y, None, sched=sched, config=cfg,
                       gen=torch.Generator().manual_seed(5), teacher=tv)
    g = torch.Generator().manual_seed(5)
    sigma = sched.sample_sigmas(5, sampler="logit_normal", generator=g, logit_mean=0.0,
                                logit_std=1.0, points=(1.0, 0.5), points_prob=0.5)
    noise = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    with torch.no_grad():
        v, w = tv.model(x_t, sigma, y), tv.guide(x_t, sigma, y)
    target = w + 2.0 * (v - w)
    per = ((student(x_t, sigma, y) - target) ** 2).flatten(1).mean(1)
    want = (per * sched.loss_weight(sigma, "table")).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # not the data's own target
    plain = compute_loss(student, x0, y, None, sched=sched, config=dataclasses.replace(
        cfg, teacher=None, teacher_guide=None, teacher_guidance=None),
        gen=torch.Generator().manual_seed(5))
    assert not torch.allclose(got, plain)
    # a guide that does not fit the teacher is refused before the first step
    other = train(tiny_config(tmp_path / "o", steps=1, num_classes=3,
                              model_overrides=dict(TINY, num_classes=3)))["model_path"]
    with pytest.raises(ValueError, match="teacher_guide .*num_classes"):
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / "s2"), teacher_guide=other))


@pytest.mark.parametrize("bad,match", [
    (dict(teacher="t.safetensors", teacher_guide="g.safetensors", cond_drop=0.0),
     "needs its scale"),
    (dict(teacher="t.safetensors", teacher_guide="g.safetensors", teacher_guidance=2.0),
     "cond_drop = 0"),
    (dict(teacher_guide="g.safetensors"), "need a teacher"),
    (dict(objective="meanflow", teacher="t.safetensors", cfg_omega=2.0), "cfg_omega"),
    (dict(objective="meanflow", teacher="t.safetensors", couplings="c.safetensors"), "pick one"),
    (dict(objective="meanflow", teacher_guidance=2.0), "need a teacher"),
    (dict(objective="meanflow", teacher_guidance_interval=(0.0, 0.5)), "need a teacher"),
    (dict(objective="meanflow", teacher="t.safetensors", teacher_guidance=-1.0),
     "teacher_guidance"),
    (dict(objective="meanflow", teacher="t.safetensors", teacher_guidance_interval=(0.5, 0.2)),
     "guidance_interval"),
    (dict(objective="meanflow", meanflow_ratio=1.5), "meanflow_ratio"),
    (dict(meanflow_ratio=0.5), "meanflow_ratio"),
    (dict(objective="meanflow", huber_c=0.01), "MeanFlow weights its loss adaptively"),
    (dict(huber_c=0.0), "huber_c must be > 0"),
    (dict(sigma_points_prob=0.5), "needs sigma_points"),
    (dict(sigma_points=(1.0, 0.5)), "points_prob must be in"),
    (dict(sigma_points=(1.5,), sigma_points_prob=0.5), r"sigmas in \(0, 1\]"),
    (dict(objective="meanflow", sigma_points=(1.0,), sigma_points_prob=0.5),
     "MeanFlow draws two times"),
])
def test_bad_distillation_config(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, **bad).validate()


def test_cli_teacher_flags(tmp_path, capsys):
    from fmrt.cli import _resume_command, build_parser, main
    t = tmp_path / "t.safetensors"
    t.write_bytes(b"")
    g = tmp_path / "g.safetensors"
    for argv, msg in ((["--objective", "meanflow", "--teacher", str(g)], "no such model file"),
                      (["--teacher", str(t), "--teacher-guide-model", str(g)],
                       "--teacher-guide-model " + str(g) + ": no such model file"),
                      (["--teacher", str(t), "--teacher-guide-model", str(t)],
                       "--teacher-guidance S"),
                      (["--teacher", str(t), "--teacher-guide-model", str(t),
                        "--teacher-guidance", "2"], "--cond-drop 0"),
                      (["--teacher-guidance", "2"], "need --teacher"),
                      (["--teacher-guide-model", str(t)], "need --teacher"),
                      (["--objective", "meanflow", "--teacher", str(t),
                        "--teacher-guidance-interval", "0.6", "0.1"], "LO must be <= HI")):
        assert main(["train", "--out-dir", str(tmp_path / "run"), *argv, *CLI_TINY]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # flags with several values come back as several words in the resume command
    args = build_parser().parse_args(["train", "--out-dir", "r", "--patch-size", "1", "2", "2",
                                      "--teacher-guidance-interval", "0", "0.6"])
    cmd = shlex.split(_resume_command(args))
    i = cmd.index("--patch-size")
    assert cmd[i + 1:i + 4] == ["1", "2", "2"]
    i = cmd.index("--teacher-guidance-interval")
    assert cmd[i + 1:i + 3] == ["0.0", "0.6"]


def test_meanflow_on_couplings_uses_their_noise(tmp_path):
    """With reflow couplings, MeanFlow's z and v come from the coupled noise (not fresh draws):
    compute_loss equals meanflow_loss given that noise, and differs from fresh noise."""
    from fmrt.losses import meanflow_loss
    from fmrt.models import DiT, DiTConfig
    from fmrt.train import compute_loss
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, objective="meanflow", cond_drop=0.0)
    model = DiT(DiTConfig.preset("tiny", **dict(TINY, num_classes=6, meanflow=True)))
    x0, y, noise = torch.randn(3, 3, 2, 8, 8), torch.tensor([0, 2, 5]), torch.randn(3, 3, 2, 8, 8)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):   # the adaptive loss itself is ~1 whatever the noise: compare gradients
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    got = grads(compute_loss(model, x0, y, noise, sched=None, config=cfg, null_class=6,
                             gen=torch.Generator().manual_seed(5)))

    def u(z, r, t, c=None):
        return model(z, t, c, r=r)
    want = grads(meanflow_loss(u, x0, noise=noise, cond=y, cond_drop_prob=0.0,
                               generator=torch.Generator().manual_seed(5)))
    fresh = grads(meanflow_loss(u, x0, cond=y, cond_drop_prob=0.0,
                                generator=torch.Generator().manual_seed(5)))
    assert torch.equal(got, want) and (got - fresh).abs().max() > 1e-4 * got.abs().max()


@pytest.mark.parametrize("couplings", [False, True], ids=["sft", "reflow"])
def test_pseudo_huber_reaches_the_sft_and_reflow_losses(tmp_path, monkeypatch, couplings):
    """huber_c: compute_loss is the pseudo-Huber of the per-sample MSE that the same draws give
    (on the couplings' noise for reflow), times the scheduler's weight."""
    import fmrt.losses as L
    from fmrt.models import DiT, DiTConfig
    from fmrt.schedule import FlowMatchScheduler
    from fmrt.train import compute_loss
    torch.manual_seed(0)
    model = DiT(DiTConfig.preset("tiny", **dict(TINY, num_classes=6)))
    x0, y = torch.randn(3, 3, 2, 8, 8), torch.tensor([0, 2, 5])
    noise = torch.randn(3, 3, 2, 8, 8) if couplings else None
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)

    def loss(huber_c):
        return compute_loss(model, x0, y, noise, sched=sched,
                            config=tiny_config(tmp_path, weighting="table", huber_c=huber_c),
                            gen=torch.Generator().manual_seed(5))
    seen, real = {}, L.flow_loss

    def spy(pred, x0_, noise_=None, **kw):   # record the MSE path's per-sample terms
        seen["mse"] = real(pred, x0_, noise_, seed=kw.get("seed"), mask=kw.get("mask"),
                           reduction="none")
        seen["w"] = kw["weight"]
        return real(pred, x0_, noise_, **kw)
    monkeypatch.setattr(L, "flow_loss", spy)
    plain = loss(None)
    monkeypatch.undo()
    m, w = seen["mse"], seen["w"]
    torch.testing.assert_close(plain, (m * w).mean())
    torch.testing.assert_close(loss(0.05), ((torch.sqrt(m + 0.05 ** 2) - 0.05) * w).mean())


@pytest.mark.parametrize("couplings", [False, True], ids=["sft", "reflow"])
def test_sigma_points_reach_the_sft_and_reflow_losses(tmp_path, couplings):
    """sigma_points with sigma_points_prob 1: the model is trained at those sigmas only; with
    0.5 at them and at the sampler's draws, on both loss paths."""
    from fmrt.models import DiT, DiTConfig
    from fmrt.schedule import FlowMatchScheduler
    from fmrt.train import compute_loss
    torch.manual_seed(0)
    model = DiT(DiTConfig.preset("tiny", **dict(TINY, num_classes=6)))
    seen = []

    def spy(x, sigma, c):
        seen.append(sigma.detach().clone())
        return model(x, sigma, c)
    x0, y = torch.randn(64, 3, 2, 8, 8), torch.randint(0, 6, (64,))
    noise = torch.randn(64, 3, 2, 8, 8) if couplings else None
    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)
    for prob in (1.0, 0.5):
        cfg = tiny_config(tmp_path, sigma_points=(1.0, 0.5), sigma_points_prob=prob)
        loss = compute_loss(spy, x0, y, noise, sched=sched, config=cfg,
                            gen=torch.Generator().manual_seed(3))
        assert torch.isfinite(loss)
        on = (seen[-1] == 1.0) | (seen[-1] == 0.5)
        assert bool(on.all()) if prob == 1.0 else 10 < int(on.sum()) < 54
        assert {0.5, 1.0} <= set(seen[-1].tolist())


def test_a_run_with_sigma_points_resumes_and_refuses_other_points(tmp_path):
    """Tuple fields (sigma_points, teacher_guidance_interval, betas) survive the JSON record:
    a resume compares like with like."""
    d = tmp_path / "run"
    kw = dict(sigma_points=(1.0, 0.5), sigma_points_prob=0.5, betas=(0.9, 0.99))
    train(tiny_config(d, steps=2, **kw))
    out = train(tiny_config(d, steps=3, resume="auto", **kw))
    assert out["step"] == 3
    assert load_model(out["model_path"])[1]["train"]["sigma_points"] == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"sigma_points was \[1.0, 0.5\], now \[1.0\]"):
        train(tiny_config(d, steps=4, resume="auto", **dict(kw, sigma_points=(1.0,))))
    c = tiny_config(d, objective="meanflow", teacher="t.safetensors",
                    teacher_guidance_interval=(0.0, 0.6), betas=(0.9, 0.99))
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))).to_dict() == c.to_dict()


def test_cli_sigma_points_flags(tmp_path, capsys):
    from fmrt.cli import main
    run = tmp_path / "run"
    assert main(["train", "--out-dir", str(run), "--steps", "1", "--sigma-points", "1", "0.5",
                 *CLI_TINY]) == 0
    rec = load_model(str(run / "model.safetensors"))[1]["train"]
    assert (rec["sigma_points"], rec["sigma_points_prob"]) == ([1.0, 0.5], 0.5)   # default share
    capsys.readouterr()
    for argv, msg in ((["--sigma-points-prob", "0.3"], "needs sigma_points"),
                      (["--sigma-points", "1", "--objective", "meanflow"], "MeanFlow draws two")):
        assert main(["train", "--out-dir", str(tmp_path / "bad"), *argv, *CLI_TINY]) == 2
        assert msg in capsys.readouterr().err
    for argv in (["--sigma-points", "0"], ["--sigma-points", "1", "--sigma-points-prob", "0"]):
        with pytest.raises(SystemExit) as e:           # argparse's own range check
            main(["train", "--out-dir", str(tmp_path / "bad"), *argv, *CLI_TINY])
        assert e.value.code == 2 and "must be > 0.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
