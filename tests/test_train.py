import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmrt.data import ShapesVideo
from fmrt.train import (EMA, NonFiniteLossError, TrainConfig, list_checkpoints,
                        load_model, lora_targets, train)

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


def test_load_model_errors(tmp_path):
    train(tiny_config(tmp_path / "a", steps=1))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "none.safetensors"))
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


@pytest.mark.gpu
def test_bf16_autocast_on_cuda(tmp_path):
    out = train(tiny_config(tmp_path, device="cuda", steps=2))
    assert torch.isfinite(torch.tensor(out["loss"]))


def test_meanflow_objective_trains_and_samples_in_one_step(tmp_path):
    from fmrt.eval import generate_clips
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


def test_meanflow_guidance_folded_into_training(tmp_path):
    """cfg_omega / cfg_kappa reach fmrt.losses.meanflow_loss (the same loss, same draws) and
    need the MeanFlow objective with label dropout."""
    from fmrt.losses import meanflow_loss
    from fmrt.models import DiT, DiTConfig
    from fmrt.train import compute_loss
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, objective="meanflow", cfg_omega=2.0, cfg_kappa=0.3)
    cfg.validate()
    model = DiT(DiTConfig.preset("tiny", **dict(TINY, num_classes=6, meanflow=True)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, y = torch.randn(3, 3, 2, 8, 8), torch.tensor([0, 2, 5])
    got = compute_loss(model, x0, y, None, sched=None, config=cfg, null_class=6,
                       gen=torch.Generator().manual_seed(5))

    def u(z, r, t, c=None):
        return model(z, t, c, r=r)
    want = meanflow_loss(u, x0, cond=y, uncond=torch.full_like(y, 6), cond_drop_prob=0.1,
                         cfg_omega=2.0, cfg_kappa=0.3, generator=torch.Generator().manual_seed(5))
    plain = meanflow_loss(u, x0, cond=y, uncond=torch.full_like(y, 6), cond_drop_prob=0.1,
                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want) and not torch.equal(got, plain)
    for bad in (dict(objective="sft", cfg_omega=2.0),
                dict(objective="meanflow", cfg_omega=2.0, cond_drop=0.0)):
        with pytest.raises(ValueError, match="cfg_omega"):
            tiny_config(tmp_path, **bad).validate()


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
