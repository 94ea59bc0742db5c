"""Training: `TrainConfig` and `train(config)`.

One loop for flow-matching SFT (`objective="sft"`) and MeanFlow (`objective="meanflow"`) on the
built-in data (`fmrt.data.ShapesVideo`), a folder of latents (`LatentFolderDataset`) or reflow
couplings (`CouplingDataset`): AdamW, bf16 autocast on CUDA, gradient clipping, EMA, optional
LoRA adapters (peft: `pip install "fmrt[lora]"`), DDP / FSDP2 under `torchrun`.

Determinism and resume. Every random draw of step s (the batch's indices, sigmas, noise, label
dropout) comes from generators seeded by (seed, rank, s), and the data order from (seed, epoch):
nothing depends on how many steps ran before in this process. A checkpoint
(`<out_dir>/checkpoints/step-XXXXXXX.safetensors` + `.json`) stores the weights, the optimizer
state, the EMA, the torch RNG states and the step (which fixes the data position), so training N
steps and training N/2 then resuming for N/2 give bit-identical weights (same device, same
thread count).

Files in `out_dir`: `checkpoints/` (resumable states), `metrics.jsonl` (one JSON object per
logged step), `model.safetensors` + `model.json` (the exported model for sampling: the EMA
weights when EMA is on, LoRA merged), all written through `fmrt.checkpoint` (temporary name,
then `os.replace`; never a non-finite tensor). A folder that holds a run is refused unless the
config says `resume` (continue it: the checkpoint's training config must match, see
RESUME_MAY_CHANGE; metrics lines and checkpoints after the resumed step are dropped) or
`overwrite` (its run files are removed before the first step). Temporaries a killed writer left
are removed at start; a run that fails before writing anything removes the folders it created.
While a run writes to `out_dir`, it holds the folder's lock (`fmrt.checkpoint.RunLock`): a
second run into the same folder is refused before it touches anything, whatever its flags.

Stopping. SIGINT / SIGTERM stop the loop between two optimizer steps, save a checkpoint of
that step and raise `TrainingInterrupted` (a KeyboardInterrupt); a non-finite loss or gradient
norm stops before the optimizer step and non-finite weights stop before any save
(`NonFiniteLossError`), so the last checkpoint written is always a finite, good state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fmrt._dispatch import resolve_device
from fmrt.checkpoint import (CHECKPOINTS, METRICS, MODEL, RunLock, TrainState, atomic_write_bytes,
                             checkpoint_path, export_model, list_checkpoints, load_model,
                             load_optimizer, load_state, load_train_state, merge_lora,
                             optimizer_tensors, prune_checkpoints, remove_run,
                             remove_stale_temporaries, run_files, save_train_state)
from fmrt.data import (CouplingDataset, LatentFolderDataset, NUM_CLASSES, ShapesVideo,
                       collate)

OBJECTIVES = ("sft", "meanflow")
# FSDP2 + MeanFlow (torch.func.jvp through fully_shard'ed modules): torch 2.11's FSDP2 touches the
# storage of functorch's wrapper tensors and crashes; 2.13 runs it (tests/test_ddp.py); 2.12 was
# not checked, so the oldest release seen working is the boundary.
FSDP_MEANFLOW_MIN_TORCH = "2.13"


def check_fsdp_meanflow(objective: str, fsdp: bool, torch_version: str = torch.__version__) -> None:
    """Refuse `objective="meanflow"` with `fsdp=True` on a torch older than FSDP_MEANFLOW_MIN_TORCH
    (a ValueError with the way out, instead of a crash inside FSDP2 at the first step)."""
    if objective != "meanflow" or not fsdp:
        return
    from torch.torch_version import TorchVersion
    if TorchVersion(torch_version.split("+")[0]) < FSDP_MEANFLOW_MIN_TORCH:
        raise ValueError(f"objective 'meanflow' with fsdp needs torch >= {FSDP_MEANFLOW_MIN_TORCH} "
                         f"(torch {torch_version}'s FSDP2 crashes under torch.func.jvp): train "
                         "without fsdp (DDP) or upgrade torch")
LR_SCHEDULES = ("constant", "cosine")


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite: training stopped and
    nothing was saved from that state."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training between two optimizer steps. `checkpoint`: the
    resumable state of `step` (None when nothing was saved: no step had run)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: " + (f"checkpoint {checkpoint}" if checkpoint
                                                       else "nothing saved"))


@dataclass
class TrainConfig:
    """Everything `train` needs; `fmrt train` flags map one to one onto these fields."""
    out_dir: str = "runs/fmrt"
    # model
    model: str = "tiny"                       # a DiTConfig preset (fmrt.models.PRESETS)
    model_overrides: dict = field(default_factory=dict)   # DiTConfig fields
    init: Optional[str] = None                # start from this exported model's weights
    # data: "shapes" (built in), a folder of .safetensors latents, or reflow couplings
    data: str = "shapes"
    couplings: Optional[tuple[str, ...]] = None   # one file or shards (a str is one file)
    frames: int = 4                           # built-in data: clip size [3, frames, size, size]
    size: int = 16
    num_classes: int = NUM_CLASSES
    data_seed: int = 0
    # optimisation
    steps: int = 1000
    batch_size: int = 32                      # per process
    lr: float = 6e-4
    lr_schedule: str = "constant"             # "constant" or "cosine" (to 0 at `steps`)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0                    # 0 = no clipping
    ema_decay: float = 0.999                  # 0 = no EMA
    # objective
    objective: str = "sft"
    template: str = "Wan"                     # FlowMatchScheduler template
    shift: Optional[float] = None             # None = the template's default
    # training times: FlowMatchScheduler.sample_sigmas samplers (SFT, reflow) or MeanFlow's
    # two draws per sample ("logit_normal" or "uniform"); None = the objective's default
    # (SFT "uniform_index"; MeanFlow "logit_normal" with logit_mean -0.4, as in the paper)
    timestep_sampler: Optional[str] = None
    logit_mean: Optional[float] = None
    logit_std: float = 1.0
    weighting: str = "table"                  # FlowMatchScheduler.loss_weight weightings
    huber_c: Optional[float] = None           # SFT / reflow: pseudo-Huber instead of the MSE
    # SFT / reflow: with probability sigma_points_prob a sample trains at one of these sigmas
    # (sample_sigmas' points: e.g. the grid a few-step sampler visits); None = off
    sigma_points: Optional[tuple] = None
    sigma_points_prob: float = 0.0
    cond_drop: float = 0.1                    # label / text dropout (classifier-free guidance)
    cfg_omega: float = 1.0                    # MeanFlow: guidance folded into training
    cfg_kappa: float = 0.0                    # (fmrt.losses.meanflow_loss's cfg_omega / kappa)
    meanflow_ratio: float = 0.25              # MeanFlow: share of samples with r != t
    # distil this flow model's guided velocity: MeanFlow learns its flow map, SFT the velocity
    # itself (guidance distillation); on the data's noisy points, not couplings
    teacher: Optional[str] = None
    teacher_guidance: Optional[float] = None  # its CFG scale (None: the teacher's recorded one)
    teacher_guidance_interval: Optional[tuple] = None   # (lo, hi); None: the recorded one
    teacher_guide: Optional[str] = None       # autoguidance: guide away from this weaker model
    # LoRA (peft)
    lora_rank: int = 0                        # 0 = train all weights
    lora_alpha: Optional[float] = None        # None = lora_rank
    # bookkeeping
    checkpoint_every: int = 0                 # 0 = only at the end
    keep_checkpoints: int = 2                 # newest resumable states kept (0 = all)
    resume: Optional[str] = None              # None, "auto" (latest in out_dir) or a path
    overwrite: bool = False                   # replace an earlier run in out_dir
    log_every: int = 10
    seed: int = 0
    device: str = "auto"                      # "auto", "cpu", "cuda", "cuda:1", ...
    mixed_precision: str = "auto"             # "auto" (bf16 on CUDA), "bf16", "no"
    fsdp: bool = False                        # FSDP2 (fully_shard) instead of DDP under torchrun
    sp: int = 1                               # sequence-parallel degree (Ulysses, fmrt.parallel)
    gradient_checkpointing: bool = False
    progress: bool = True
    # recorded in model.json: what `fmrt sample` uses when not told; sample_guidance None:
    # 1 where guidance is folded into training (a teacher, reflow couplings, cfg_omega / kappa),
    # else 3
    sample_steps: int = 20
    sample_guidance: Optional[float] = None

    def __post_init__(self):
        from fmrt.losses import MEANFLOW_TIME_MU
        meanflow = self.objective == "meanflow"
        if self.timestep_sampler is None:
            self.timestep_sampler = "logit_normal" if meanflow else "uniform_index"
        if self.logit_mean is None:
            self.logit_mean = MEANFLOW_TIME_MU if meanflow else 0.0
        if isinstance(self.couplings, (str, os.PathLike)):
            self.couplings = (os.fspath(self.couplings),)
        elif self.couplings is not None:
            self.couplings = tuple(os.fspath(p) for p in self.couplings) or None
        if self.sample_guidance is None:
            folded = bool(self.teacher or self.couplings or self.cfg_omega != 1.0
                          or self.cfg_kappa != 0.0)
            self.sample_guidance = 1.0 if folded else 3.0
        if self.sigma_points is not None and not isinstance(self.sigma_points, (str, bytes)):
            self.sigma_points = tuple(self.sigma_points) or None

    def validate(self) -> None:
        def pos(name, v, zero_ok=False):
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero_ok else 1):
                raise ValueError(f"{name} must be an integer >= {0 if zero_ok else 1}, got {v!r}")
        pos("steps", self.steps)
        pos("batch_size", self.batch_size)
        pos("frames", self.frames)
        pos("size", self.size)
        pos("checkpoint_every", self.checkpoint_every, zero_ok=True)
        pos("keep_checkpoints", self.keep_checkpoints, zero_ok=True)
        pos("log_every", self.log_every)
        pos("warmup_steps", self.warmup_steps, zero_ok=True)
        pos("lora_rank", self.lora_rank, zero_ok=True)
        pos("sp", self.sp)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if (self.cfg_omega != 1.0 or self.cfg_kappa != 0.0) and (
                self.objective != "meanflow" or self.cond_drop <= 0):
            raise ValueError("cfg_omega / cfg_kappa fold guidance into MeanFlow training: they "
                             "need objective='meanflow' and cond_drop > 0 (the unconditional "
                             "branch)")
        if self.huber_c is not None:
            from fmrt.losses import check_huber_c
            check_huber_c(self.huber_c)
            if self.objective == "meanflow":
                raise ValueError("huber_c is the SFT / reflow loss's: MeanFlow weights its "
                                 "loss adaptively itself")
        if self.sigma_points is not None or self.sigma_points_prob != 0.0:
            from fmrt.schedule import check_sigma_points
            if not self.sigma_points:
                raise ValueError("sigma_points_prob needs sigma_points (the sigmas to draw)")
            check_sigma_points(self.sigma_points, self.sigma_points_prob)
            if self.objective == "meanflow":
                raise ValueError("sigma_points is the SFT / reflow sampler's: MeanFlow draws "
                                 "two times (t, r) with its own law")
        if not 0.0 <= self.meanflow_ratio <= 1.0:
            raise ValueError(f"meanflow_ratio must be in [0, 1], got {self.meanflow_ratio}")
        if self.meanflow_ratio != 0.25 and self.objective != "meanflow":
            raise ValueError("meanflow_ratio is a MeanFlow setting: it needs "
                             "objective='meanflow'")
        if self.teacher is not None:
            if self.cfg_omega != 1.0 or self.cfg_kappa != 0.0:
                raise ValueError("with a teacher, guidance comes from the teacher "
                                 "(teacher_guidance): leave cfg_omega = 1 and cfg_kappa = 0")
            if self.couplings:
                raise ValueError("teacher and couplings are two ways to distil: pick one")
            if self.sp > 1:
                raise ValueError("teacher distillation with sequence parallelism (sp > 1) is "
                                 "not supported")
            if self.teacher_guide is not None:
                if self.teacher_guidance is None:
                    raise ValueError("teacher_guide (autoguidance) needs its scale: give "
                                     "teacher_guidance")
                if self.cond_drop != 0.0:
                    raise ValueError("an autoguided teacher (teacher_guide) has no "
                                     "unconditional branch to distil: set cond_drop = 0")
        elif (self.teacher_guidance is not None or self.teacher_guidance_interval is not None
              or self.teacher_guide is not None):
            raise ValueError("teacher_guidance / teacher_guidance_interval / teacher_guide "
                             "need a teacher")
        if self.teacher_guidance is not None and not (
                0.0 <= self.teacher_guidance < float("inf")):
            raise ValueError(f"teacher_guidance must be a finite number >= 0, got "
                             f"{self.teacher_guidance}")
        if self.teacher_guidance_interval is not None:
            from fmrt.guidance import check_interval
            check_interval(self.teacher_guidance_interval)
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_schedule!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16 or no, "
                             f"got {self.mixed_precision!r}")
        if not 1 <= self.num_classes <= NUM_CLASSES:
            raise ValueError(f"num_classes must be in [1, {NUM_CLASSES}], got {self.num_classes}")
        from fmrt.schedule import SAMPLERS, TEMPLATES, WEIGHTINGS
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {self.template!r}")
        if self.timestep_sampler not in SAMPLERS:
            raise ValueError(f"timestep_sampler must be one of {SAMPLERS}, "
                             f"got {self.timestep_sampler!r}")
        from fmrt.losses import MEANFLOW_TIME_MU, MEANFLOW_TIME_SAMPLERS
        if self.objective == "meanflow" and self.timestep_sampler not in MEANFLOW_TIME_SAMPLERS:
            raise ValueError(f"MeanFlow draws its times (t, r) with one of "
                             f"{MEANFLOW_TIME_SAMPLERS} (default logit_normal, logit_mean "
                             f"{MEANFLOW_TIME_MU}), got {self.timestep_sampler!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.overwrite and self.resume == "auto":
            raise ValueError("resume and overwrite contradict each other: resume continues the "
                             "run in out_dir, overwrite removes it")
        check_fsdp_meanflow(self.objective, self.fsdp)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # as JSON gives it back (lists), so a resume compares the record with this like for like
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if d.get("teacher_guidance_interval") is not None:
            d["teacher_guidance_interval"] = tuple(d["teacher_guidance_interval"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def _mix(*xs: int) -> int:
    h = 0x243F6A8885A308D3
    for x in xs:
        h = (h * 0x100000001B3 + int(x) + 0x9E3779B97F4A7C15) % (2 ** 63 - 1)
    return h


# ---------------------------------------------------------------------------------------------
# model construction, export and loading
# ---------------------------------------------------------------------------------------------

def build_model(config: TrainConfig, sample_shape: tuple, cond_kind: Optional[str],
                cond_dim: Optional[int] = None):
    """The DiT for this run: the preset with the overrides, channels from the data, class or
    text conditioning from the data. Returns (model, DiTConfig)."""
    from fmrt.models import DiT, DiTConfig
    over = dict(config.model_overrides)
    over.setdefault("in_channels", int(sample_shape[0]))
    if cond_kind == "label":
        over.setdefault("num_classes", config.num_classes if config.data == "shapes"
                        else over.get("num_classes"))
        over.setdefault("text_dim", None)
    elif cond_kind == "cond":
        over.setdefault("text_dim", cond_dim)
        over.setdefault("num_classes", None)
    else:
        over.setdefault("text_dim", None)
        over.setdefault("num_classes", None)
    if config.objective == "meanflow":
        over["meanflow"] = True
    if config.gradient_checkpointing:
        over["gradient_checkpointing"] = True
    cfg = DiTConfig.preset(config.model, **over)
    if cond_kind == "label" and cfg.num_classes is None:
        raise ValueError("class-labelled data needs a class-conditioned model: pass "
                         "model_overrides={'num_classes': K}")
    return DiT(cfg), cfg


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the Linear layers that get LoRA adapters: the fused self-attention `qkv` and
    `o`, cross-attention `q`, `k`, `v`, `o`, and the FFN Linears."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if re.search(r"(self_attn\.(qkv|o)|cross_attn\.(q|k|v|o)|ffn\.\d+)$", name):
            out.append(name)
    return out


def apply_lora(model: nn.Module, rank: int, alpha: Optional[float] = None) -> nn.Module:
    """Freeze the model and inject LoRA adapters (peft) on `lora_targets(model)`."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ValueError('LoRA needs peft: pip install "fmrt[lora]"') from None
    targets = lora_targets(model)
    if not targets:
        raise ValueError("the model has no Linear layers LoRA can target")
    model.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0,
                     target_modules=targets, init_lora_weights=True)
    model = inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def _meanflow_from_flow_model(base: nn.Module, path: str) -> nn.Module:
    """A MeanFlow DiT that starts as the flow-matching DiT `base`: every weight copied, the new
    h-embedding MLP (`time_embedding_h`) with its first Linear at the usual init and its last
    Linear at zero, so it adds nothing at first (u(z, r, t) = v(z, t)) yet gets gradients."""
    from fmrt.models import DiT
    cfg = dataclasses.replace(base.config, meanflow=True)
    torch.manual_seed(_mix(0x3EA9F10, 1))
    model = DiT(cfg)
    state = dict(base.state_dict())
    for k, v in model.state_dict().items():
        if k.startswith("time_embedding_h."):
            state[k] = v
    load_state(model, state, path)
    with torch.no_grad():
        last = model.time_embedding_h[-1]
        last.weight.zero_()
        last.bias.zero_()
    return model.to(dtype=next(base.parameters()).dtype)


# the --init model's shape fields a run may not change (num_layers may grow: _deepened)
_INIT_FIXED = ("dim", "num_heads", "ffn_dim", "patch_size", "text_dim", "class_tokens")


def _grown_to_fit(base: nn.Module, overrides: dict, path: str) -> nn.Module:
    """The `--init` model for a run that asks for `overrides` (DiTConfig fields given
    explicitly): `base` itself, or deepened to a larger `num_layers`; any other shape change is
    refused (the weights would not fit) instead of being silently ignored."""
    cfg = base.config

    def norm(v):                              # patch_size: a list from the CLI, a tuple here
        return tuple(v) if isinstance(v, (list, tuple)) else v
    for k in _INIT_FIXED:
        if overrides.get(k) is not None:
            want, have = overrides[k], getattr(cfg, k)
            if norm(want) != norm(have):
                raise ValueError(f"--init {path}: the model's {k} is {have}, the run asks for "
                                 f"{want}; only num_layers may change (upwards: the new blocks "
                                 f"start as the identity)")
    n = overrides.get("num_layers")
    if n is None or n == cfg.num_layers:
        return base
    if n < cfg.num_layers:
        raise ValueError(f"--init {path}: the model has {cfg.num_layers} blocks, the run asks "
                         f"for {n}; a model can be deepened, not cut")
    return _deepened(base, n, path)


def _deepened(base: nn.Module, num_layers: int, path: str) -> nn.Module:
    """A DiT of `num_layers` blocks that computes what `base` computes: every weight of `base`
    copied (its blocks first), each extra block appended at the usual init (seeded) but with
    the Linears that write into the residual stream (self-attention out, cross-attention out,
    FFN out) at zero, so that it adds nothing at first yet gets gradients."""
    from fmrt.models import DiT
    n0 = base.config.num_layers
    torch.manual_seed(_mix(0xDEE9E4, n0, num_layers))
    model = DiT(dataclasses.replace(base.config, num_layers=num_layers))
    state = dict(base.state_dict())
    for k, v in model.state_dict().items():
        if k.startswith("blocks.") and int(k.split(".")[1]) >= n0:
            state[k] = v
    load_state(model, state, path)
    with torch.no_grad():
        for block in model.blocks[n0:]:
            outs = [block.self_attn.o, block.ffn[2]]
            if block.cross_attn is not None:
                outs.append(block.cross_attn.o)
            for lin in outs:
                lin.weight.zero_()
                lin.bias.zero_()
    return model.to(dtype=next(base.parameters()).dtype)


def load_teacher(config: TrainConfig, student_cfg, sample_shape: tuple, device: torch.device):
    """The frozen teacher of a distillation run (`config.teacher`) as a
    `fmrt.distill.TeacherVelocity`, and what it resolved to (recorded in the run's metadata):
    its guidance scale and interval are `config.teacher_guidance[_interval]`, else the ones
    the teacher's file records as its sampling defaults."""
    from fmrt.distill import TeacherVelocity
    from fmrt.sampling import recorded_guidance, recorded_interval
    model, meta = load_model(config.teacher)
    tcfg = model.config
    if tcfg.meanflow:
        raise ValueError(f"teacher {config.teacher} is a MeanFlow model; distil a flow-matching "
                         "one (v(z, t))")

    def inputs(c):   # what the data feed a DiT: channels, and class labels or text embeddings
        return c.in_channels, c.num_classes, c.text_dim if c.num_classes is None else None
    if inputs(tcfg) != inputs(student_cfg):
        raise ValueError(f"teacher {config.teacher} does not fit this run's data: channels / "
                         f"classes / text width {tcfg.in_channels} / {tcfg.num_classes} / "
                         f"{tcfg.text_dim}, the student's {student_cfg.in_channels} / "
                         f"{student_cfg.num_classes} / {student_cfg.text_dim}")
    shape = (meta.get("sample") or {}).get("sample_shape")
    if shape is not None and tuple(shape) != tuple(sample_shape):
        raise ValueError(f"teacher {config.teacher} was trained on samples {tuple(shape)}, this "
                         f"run's data are {tuple(sample_shape)}")
    scale = config.teacher_guidance if config.teacher_guidance is not None else \
        recorded_guidance(meta)
    interval = config.teacher_guidance_interval if config.teacher_guidance_interval is not None \
        else recorded_interval(meta)
    model = model.to(device).eval().requires_grad_(False)
    guide = None
    if config.teacher_guide is not None:
        from fmrt.sampling import check_guide_model
        guide, _ = load_model(config.teacher_guide)
        try:
            check_guide_model(model, guide)
        except ValueError as e:
            raise ValueError(f"teacher_guide {config.teacher_guide}: {e}") from None
        guide = guide.to(device).eval().requires_grad_(False)
    velocity = TeacherVelocity(model, guidance_scale=scale, interval=interval,
                               null_class=tcfg.num_classes, guide=guide)
    info = dict(teacher=config.teacher, guidance_scale=scale,
                guidance_interval=None if velocity.interval is None
                else list(velocity.interval))
    if guide is not None:
        info["guide"] = config.teacher_guide
    return velocity, info


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of the trainable parameters (fp32 copies):
    `ema = d * ema + (1 - d) * p` with `d = min(decay, (1 + step) / (10 + step))`."""

    def __init__(self, named_params: list[tuple[str, Tensor]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.shadow = [p.detach().float().clone() for _, p in named_params]

    @torch.no_grad()
    def update(self, params: list[Tensor], step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], 1.0 - d)

    def state(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow))

    def load(self, state: dict[str, Tensor]) -> None:
        for i, n in enumerate(self.names):
            if n not in state:
                raise ValueError(f"checkpoint has no EMA for parameter {n}")
            self.shadow[i].copy_(state[n])


# ---------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device_name: str) -> tuple[_Dist, torch.device]:
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        d = _Dist(dist.get_rank(), dist.get_world_size(),
                  int(os.environ.get("LOCAL_RANK", dist.get_rank())), False)
    elif world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_name != "cpu" and torch.cuda.is_available()
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want_cuda else "gloo")
        d = _Dist(dist.get_rank(), dist.get_world_size(), local, True)
    else:
        return _Dist(), resolve_device(device_name)
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        dev = torch.device("cuda", d.local_rank)
    else:
        dev = resolve_device(device_name)
    return d, dev


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def make_dataset(config: TrainConfig):
    if config.couplings:
        return CouplingDataset(config.couplings)
    if config.data == "shapes":
        return ShapesVideo(100_000, frames=config.frames, size=config.size,
                           seed=config.data_seed, num_classes=config.num_classes)
    return LatentFolderDataset(config.data)


def _cond_kind(dataset) -> tuple[Optional[str], Optional[int]]:
    if isinstance(dataset, ShapesVideo):
        return "label", None
    key = getattr(dataset, "cond_key", None)
    if key in ("label", "labels"):
        return "label", None
    if key == "cond":
        c = dataset[0][1]
        return "cond", int(c.shape[-1])
    return None, None


class _Batches:
    """The batch of step s on this rank: a slice of the global batch s of an epoch-wise random
    permutation seeded by (seed, epoch). Depends only on s (resume needs nothing else)."""

    def __init__(self, dataset, batch_size: int, world: int, rank: int, seed: int):
        self.ds, self.bs, self.world, self.rank, self.seed = dataset, batch_size, world, rank, seed
        self.per_epoch = len(dataset) // (batch_size * world)
        if self.per_epoch < 1:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global "
                             f"batch ({batch_size} x {world} processes)")
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0xDA7A))
            self._perm, self._epoch = torch.randperm(len(self.ds), generator=g), epoch
        start = (k * self.world + self.rank) * self.bs
        return self._perm[start:start + self.bs].tolist()

    def __call__(self, step: int):
        return collate([self.ds[i] for i in self.indices(step)])


# ---------------------------------------------------------------------------------------------
# the loss of one batch
# ---------------------------------------------------------------------------------------------

def _drop_cond(cond, p: float, null_class: Optional[int], gen: torch.Generator):
    if cond is None or p <= 0:
        return cond
    drop = torch.rand(cond.shape[0], generator=gen, device=gen.device) < p
    drop = drop.to(cond.device)
    if cond.dtype == torch.long:
        return torch.where(drop, torch.full_like(cond, null_class), cond)
    return cond * (~drop).view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)


def _broadcast_module(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (what DDP does when it wraps a model)."""
    import torch.distributed as dist
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


def _average_grads(params: list, world: int) -> None:
    """All-reduce the gradients over all processes (one flat buffer per dtype) and divide by
    `world`: the world size, as DDP does, or the data-parallel size under sequence
    parallelism (a group's ranks hold parts of one sample's gradient: summed); a parameter
    without a gradient on this rank takes part as zeros."""
    import torch.distributed as dist
    by_dtype: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def compute_loss(model, x0: Tensor, cond, noise: Optional[Tensor], *, sched, config: TrainConfig,
                 gen: torch.Generator, null_class: Optional[int] = None,
                 teacher: Optional[Callable] = None) -> Tensor:
    """The scalar training loss of one batch: `fmrt.losses.sft_loss` (noise drawn in the
    kernel from a seed taken from `gen`), or with reflow couplings (`noise` given) the same
    weighted flow-matching MSE on the given noise (`ops.add_noise` + `ops.flow_matching_loss`),
    or `fmrt.losses.meanflow_loss` (which drops conditions itself, to `null_class`; with
    couplings on their noise, so that the straight path from noise to the coupled sample is the
    target; `teacher`: a `fmrt.distill.TeacherVelocity` whose velocity replaces noise - x0).
    SFT with a teacher (guidance distillation): the same noisy point x_t = (1 - sigma) x0 +
    sigma noise (noise drawn from `gen`, sigma as in SFT), the target the teacher's velocity
    there instead of noise - x0 (conditions as for SFT: the training loop drops them)."""
    B = x0.shape[0]
    if config.objective == "meanflow":
        from fmrt.losses import meanflow_loss

        def u(z, r, t, c=None):   # MeanFlow's u(z, r, t) convention -> dit(z, t, c, r=r)
            return model(z, t, c, r=r)
        uncond = None
        if cond is not None and config.cond_drop > 0:
            uncond = (torch.full_like(cond, null_class) if cond.dtype == torch.long
                      else torch.zeros_like(cond))
        return meanflow_loss(u, x0, noise=None if noise is None else noise.to(x0.dtype),
                             cond=cond, uncond=uncond, cond_drop_prob=config.cond_drop,
                             cfg_omega=config.cfg_omega, cfg_kappa=config.cfg_kappa,
                             ratio_r_neq_t=config.meanflow_ratio, generator=gen,
                             velocity=teacher, time_sampler=config.timestep_sampler,
                             time_mu=config.logit_mean, time_sigma=config.logit_std)
    if noise is None and teacher is None:
        from fmrt.losses import sft_loss
        return sft_loss(model, x0, cond, scheduler=sched, sampler=config.timestep_sampler,
                        weighting=config.weighting, generator=gen,
                        logit_mean=config.logit_mean, logit_std=config.logit_std,
                        huber_c=config.huber_c, sigma_points=config.sigma_points or (),
                        sigma_points_prob=config.sigma_points_prob)
    from fmrt import ops
    from fmrt.losses import flow_loss
    sigma = sched.sample_sigmas(B, sampler=config.timestep_sampler, generator=gen,
                                device=gen.device, logit_mean=config.logit_mean,
                                logit_std=config.logit_std, points=config.sigma_points or (),
                                points_prob=config.sigma_points_prob).to(x0.device)
    if noise is None:       # a teacher (never with couplings): fresh noise after the sigmas
        noise = torch.randn(x0.shape, generator=gen, device=gen.device, dtype=torch.float32)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    x_t, _ = ops.add_noise(x0, sigma, noise)
    pred = model(x_t, sigma, cond)
    weight = sched.loss_weight(sigma, config.weighting)
    if teacher is None:
        return flow_loss(pred, x0, noise, weight=weight, huber_c=config.huber_c)
    # the fused flow-matching loss regresses pred on noise - x0: with x0 = 0 and noise = v that
    # is the teacher's velocity v itself, exactly, with the same weighting and Huber options
    v = teacher(x_t, sigma, cond).to(x0.dtype)
    return flow_loss(pred, torch.zeros_like(v), v, weight=weight, huber_c=config.huber_c)


# ---------------------------------------------------------------------------------------------
# the run folder, resuming, stopping on a signal
# ---------------------------------------------------------------------------------------------

# TrainConfig fields a resume may change: they do not alter the weights' trajectory (`steps`
# extends or shortens a constant or warm-up schedule; a cosine one spans `steps`, so there it
# must stay; `device` changes rounding, not the math), or what they decide is compared through
# the model config and the data config themselves (model, model_overrides, data, ...). Every
# other field must match the checkpoint's, and so must the number of processes.
RESUME_MAY_CHANGE = frozenset({
    "out_dir", "resume", "overwrite", "steps", "checkpoint_every", "keep_checkpoints",
    "log_every", "progress", "sample_steps", "sample_guidance", "device", "init",
    "gradient_checkpointing", "sp",
    "model", "model_overrides", "data", "couplings", "frames", "size", "num_classes",
    "data_seed"})


def _makedirs(path: str) -> list[str]:
    """os.makedirs(path); returns the folders it created, outermost first."""
    missing, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return missing[::-1]


def _describe(files: list[str]) -> str:
    n = sum(f.endswith(".safetensors") and os.path.basename(os.path.dirname(f)) == CHECKPOINTS
            for f in files)
    names = sorted({os.path.basename(f) for f in files
                    if os.path.basename(os.path.dirname(f)) != CHECKPOINTS})
    return ", ".join(names + ([f"{n} checkpoint{'s' * (n != 1)}"] if n else []))


def _open_run(config: TrainConfig, main: bool
              ) -> tuple[Optional[str], list[str], Optional[RunLock]]:
    """Check `out_dir` against the config before any work: a live run there (its lock) is
    refused; an earlier run needs `resume` (continue it) or `overwrite` (replace it; removed
    once the new run is ready to start); `resume="auto"` needs a checkpoint. The main rank locks
    the folder, removes stale temporaries and creates the folders. Returns (the checkpoint to
    resume from or None, the folders created, the lock (main rank) or None)."""
    lock = RunLock(config.out_dir) if main and os.path.isdir(config.out_dir) else None
    try:
        resume_path, created = _check_run(config, main)
        if main and lock is None:
            lock = RunLock(config.out_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return resume_path, created, lock


def _check_run(config: TrainConfig, main: bool) -> tuple[Optional[str], list[str]]:
    out_dir = config.out_dir
    if main and os.path.isdir(out_dir):
        remove_stale_temporaries(out_dir)
    earlier = run_files(out_dir)
    resume_path = None
    if config.resume == "auto":
        ck = list_checkpoints(out_dir)
        if not ck:
            raise ValueError(f"nothing to resume: no checkpoint in "
                             f"{os.path.join(out_dir, CHECKPOINTS)}")
        resume_path = ck[-1][1]
    elif config.resume:
        resume_path = config.resume
        if not os.path.isfile(resume_path):
            raise FileNotFoundError(f"no such checkpoint to resume from: {resume_path}")
    ours = resume_path is not None and any(os.path.samefile(resume_path, f) for f in earlier)
    if earlier and not config.overwrite and not ours:
        raise ValueError(f"{out_dir} already holds a{'nother' if resume_path else ''} run "
                         f"({_describe(earlier)}): --resume continues it, --overwrite replaces "
                         f"it, or choose another --out-dir")
    if config.overwrite:
        for what, p in (("init", config.init), *(("couplings", c) for c in config.couplings or ()),
                        ("teacher", config.teacher), ("teacher-guide-model", config.teacher_guide),
                        ("resume", resume_path)):
            if p and os.path.isfile(p) and any(os.path.samefile(p, f) for f in earlier):
                raise ValueError(f"--{what} {p} belongs to the run in {out_dir} that "
                                 f"--overwrite would remove")
    created = []
    if main:
        try:
            created = _makedirs(os.path.join(out_dir, CHECKPOINTS))
        except OSError as e:
            raise ValueError(f"cannot create output directory {out_dir}: {e.strerror}") from None
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"output directory {out_dir} is not writable")
    return resume_path, created


def _check_resume(path: str, saved: dict, run: dict, config: TrainConfig, dp: int) -> None:
    """Refuse (ValueError naming the field) to resume from `path` (meta `saved`) a run whose
    configuration (`run`: this run's meta, `config`) differs in what fixes the weights'
    trajectory: see RESUME_MAY_CHANGE."""
    def refuse(name, old, new, why=""):
        raise ValueError(f"cannot resume from {path}: {name} was {old!r}, now {new!r}{why}; "
                         f"resume with the same setting, or start a new run with --init {path}")
    for part in ("model", "data"):
        old, new = saved.get(part) or {}, run.get(part) or {}
        for k in sorted((set(old) | set(new)) - {"gradient_checkpointing"}):
            if old.get(k) != new.get(k):
                refuse(f"{part}.{k}", old.get(k), new.get(k))
    old_train, new_train = dict(saved.get("train") or {}), config.to_dict()
    if old_train.get("objective") == "meanflow" and old_train.get("timestep_sampler") in (
            None, "uniform_index"):
        # written before MeanFlow read these fields: it drew its times from its own default
        from fmrt.losses import MEANFLOW_TIME_MU
        old_train.update(timestep_sampler="logit_normal", logit_mean=MEANFLOW_TIME_MU,
                         logit_std=1.0)
    for k, v in new_train.items():
        if k not in RESUME_MAY_CHANGE and k in old_train and old_train[k] != v:
            refuse(k, old_train[k], v)
    if config.lr_schedule == "cosine" and old_train.get("steps", config.steps) != config.steps:
        refuse("steps", old_train["steps"], config.steps,
               " (the cosine schedule spans steps: changing them bends it mid-run)")
    # the data-parallel size fixes the global batch; the sequence-parallel degree does not
    old_dp = saved.get("dp_size", saved.get("world_size", dp))
    if old_dp != dp:
        refuse("the number of data-parallel processes (world / sp)", old_dp, dp,
               " (batch_size is per data-parallel rank: the global batch would change)")


def _rewind_run(out_dir: str, step: int) -> None:
    """Resuming at `step`: drop the folder's record of later steps (metrics.jsonl lines,
    checkpoints), so that it holds one history and no step twice."""
    for s, p in list_checkpoints(out_dir):
        if s > step:
            for f in (p, p[: -len(".safetensors")] + ".json"):
                os.remove(f)
    path = os.path.join(out_dir, METRICS)
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:      # a line cut short by a kill
            continue
        if line.endswith(b"\n") and isinstance(rec, dict) and rec.get("step", step + 1) <= step:
            keep.append(line)
    if keep != lines:
        atomic_write_bytes(path, b"".join(keep))


class _StopOnSignal:
    """While active (main thread only), SIGINT and SIGTERM set `signum` instead of ending the
    process: the loop then stops between two optimizer steps and saves. A second SIGINT raises
    KeyboardInterrupt at once (nothing saved)."""

    def __init__(self, announce: bool, newline: bool = False):
        self.signum, self.announce, self.newline, self._prev = 0, announce, newline, {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._prev[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.announce:
            end_bar = "\n" if self.newline else ""     # below a progress bar
            print(f"{end_bar}fmrt train: {signal.Signals(signum).name}: saving a checkpoint "
                  f"after this step (Ctrl-C again stops without saving)", file=sys.stderr,
                  flush=True)

    def requested(self, world: int, device: torch.device) -> int:
        """The signal to stop on (0: none), agreed by every process."""
        if world == 1:
            return self.signum
        import torch.distributed as dist
        t = torch.tensor([self.signum], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)


def _all_finite(tensors: list[Tensor], world: int, device: torch.device) -> bool:
    """Every floating tensor (this process's shards) finite, on every process."""
    flags = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all().to(device)
             for t in tensors if t.is_floating_point() and t.numel()]
    ok = torch.stack(flags).all() if flags else torch.tensor(True, device=device)
    if world > 1:
        import torch.distributed as dist
        t = ok.to(torch.int32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        ok = t
    return bool(ok)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def _lr_at(config: TrainConfig, step: int) -> float:
    lr = config.lr
    if config.warmup_steps and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        span = max(1, config.steps - config.warmup_steps)
        p = min(1.0, (step - config.warmup_steps) / span)
        return lr * 0.5 * (1 + math.cos(math.pi * p))
    return lr


def _full_state(model: nn.Module, fsdp: bool) -> dict[str, Tensor]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    return {k: v.detach() for k, v in model.state_dict().items()}


def _local(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(config: TrainConfig, *, dataset=None) -> dict:
    """Train (or resume) as `config` says. Returns {"step", "loss" (the last step's),
    "model_path", "checkpoint", "seconds", "model" (the trained module, adapters unmerged)};
    raises ValueError / FileNotFoundError for bad configs or files and NonFiniteLossError when
    the loss diverges. `dataset` overrides the one `config` names (tests)."""
    config.validate()
    dist_info, device = _dist_setup(config.device)
    try:
        resume_path, created, lock = _open_run(config, dist_info.main)
        try:
            # SIGINT / SIGTERM stop the loop between two optimizer steps (a saved checkpoint,
            # TrainingInterrupted); the final save and export finish before a signal is acted on
            with torch.enable_grad(), _StopOnSignal(dist_info.main, config.progress) as stop:
                return _train(config, dataset, dist_info, device, resume_path, stop)
        except BaseException:
            if lock is not None:
                lock.release()
            for d in reversed(created):     # a run that failed before writing leaves no folder
                try:
                    os.rmdir(d)
                except OSError:
                    break
            raise
        finally:
            if lock is not None:
                lock.release()
    finally:
        if dist_info.created:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(config: TrainConfig, dataset, di: _Dist, device: torch.device,
           resume_path: Optional[str], stop: "_StopOnSignal") -> dict:
    from fmrt.schedule import FlowMatchScheduler
    t_start = time.time()
    out_dir = config.out_dir
    ds = dataset if dataset is not None else make_dataset(config)
    cond_kind, cond_dim = _cond_kind(ds)
    sample_shape = tuple(ds.sample_shape)

    torch.manual_seed(_mix(config.seed, 0x1417))     # the initial weights depend on the seed only
    model, mcfg = build_model(config, sample_shape, cond_kind, cond_dim)
    if config.init:
        base, meta = load_model(config.init)
        if meta["model"] != mcfg.to_dict():
            from fmrt.models import DiTConfig
            base_cfg = DiTConfig.from_dict(meta["model"])
            if mcfg.conditioning == "class_text" and base_cfg.conditioning == "class":
                # a class-conditioned model asked for Wan's conditioning: same outputs
                from fmrt.models.convert import class_to_class_text
                base = class_to_class_text(base, mcfg.text_dim,
                                           class_text_seed=mcfg.class_text_seed)
                base_cfg = base.config
            if config.objective == "meanflow" and not base_cfg.meanflow:
                base = _meanflow_from_flow_model(base, config.init)
                base_cfg = base.config
            base = _grown_to_fit(base, config.model_overrides, config.init)
            mcfg = base.config
        model = base.train().requires_grad_(True)
    if config.lora_rank:
        model = apply_lora(model, config.lora_rank, config.lora_alpha)
    model.to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters")
    params = [p for _, p in named]

    # parallelism: a (dp, sp) mesh under --sp (fmrt.parallel); data parallel over dp
    dp, dp_rank, sp = di.world, di.rank, None
    if config.sp > 1:
        from fmrt import parallel
        mesh = parallel.make_mesh(config.sp, device.type)
        dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
        _broadcast_module(model)
        sp = parallel.enable_sequence_parallel(model, mesh["sp"].get_group())
    fsdp = config.fsdp and di.world > 1
    wrapped = model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        dp_mesh = {} if sp is None else dict(mesh=mesh["dp"])
        for block in getattr(model, "blocks", []):
            fully_shard(block, **dp_mesh)
        fully_shard(model, **dp_mesh)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
    elif sp is not None:
        pass    # rank 0's weights everywhere (above); gradients by _average_grads over dp
    elif di.world > 1 and config.objective == "meanflow":
        # torch.func.jvp cannot run through DDP's forward (its reducer touches the storage of
        # functorch's dual tensors): data parallel by hand, rank 0's weights to every rank and
        # gradients averaged after each backward (_average_grads)
        _broadcast_module(model)
    elif di.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    manual_dp = di.world > 1 and not fsdp and (config.objective == "meanflow" or sp is not None)

    opt = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas),
                            weight_decay=config.weight_decay)
    ema = EMA(named, config.ema_decay) if config.ema_decay > 0 else None
    sched = FlowMatchScheduler(config.template)
    tkw = {} if config.shift is None else {"shift": config.shift}
    sched.set_timesteps(1000, training=True, **tkw)

    teacher, distill = None, None
    if config.teacher:
        teacher, distill = load_teacher(config, mcfg, sample_shape, device)

    meta_base = dict(model=mcfg.to_dict(), train=config.to_dict(),
                     data=ds.config() if hasattr(ds, "config") else {},
                     sample=dict(template=config.template, shift=config.shift,
                                 sample_shape=list(sample_shape), num_classes=mcfg.num_classes,
                                 steps=config.sample_steps,
                                 guidance_scale=config.sample_guidance))
    if distill is not None:
        meta_base["distill"] = distill

    step = 0
    if resume_path and fsdp:
        raise ValueError("resuming an FSDP run is not supported yet (the optimizer state is "
                         "not gathered): resume without --fsdp, or start again")
    if resume_path:
        ts = load_train_state(resume_path)
        _check_resume(resume_path, ts.meta, meta_base, config, dp)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_model_state_dict)
            set_model_state_dict(model, ts.model, options=StateDictOptions(full_state_dict=True))
        else:
            load_state(model, ts.model, resume_path)
        if not fsdp:
            load_optimizer(opt, ts.optim, ts.optim_groups)
        if ema is not None:
            ema.load({k: v.to(device) for k, v in ts.ema.items()})
        if "torch" in ts.rng:
            torch.set_rng_state(ts.rng["torch"])
        if "cuda" in ts.rng and device.type == "cuda":
            torch.cuda.set_rng_state(ts.rng["cuda"], device)
        step = ts.step

    batches = _Batches(ds, config.batch_size, dp, dp_rank, config.seed)
    use_bf16 = device.type == "cuda" and config.mixed_precision in ("auto", "bf16")
    null_class = mcfg.num_classes

    if di.main:   # from here on the folder holds this run only
        if config.overwrite:
            remove_run(out_dir)
        if resume_path:
            _rewind_run(out_dir, step)
    last_ckpt = resume_path

    def save_checkpoint(at: int) -> str:
        live = list(params) + (ema.shadow if ema is not None else []) + \
            [t for st in opt.state.values() for t in st.values() if isinstance(t, Tensor)]
        if not _all_finite(live, di.world, device):             # collectives: every rank
            raise NonFiniteLossError(
                f"weights are not finite after step {at}: training stopped, nothing saved from "
                f"this state (last good checkpoint: {last_ckpt or 'none'}); try a lower --lr")
        path = checkpoint_path(out_dir, at)
        state = _full_state(model, fsdp)                       # collectives: every rank
        ema_full = {k: _local(v) for k, v in ema.state().items()} if ema is not None else {}
        if not di.main:
            return path
        optim, groups = optimizer_tensors(opt) if not fsdp else ({}, [])
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_train_state(path, TrainState(step=at, meta=dict(meta_base, world_size=di.world,
                                                                   dp_size=dp),
                                          model=state, ema=ema_full,
                                          optim=optim, optim_groups=groups, rng=rng))
        prune_checkpoints(out_dir, config.keep_checkpoints)
        return path

    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=step, disable=not (config.progress and di.main),
               desc=f"fmrt train ({config.objective})", dynamic_ncols=True)
    metrics_path = os.path.join(out_dir, METRICS)
    window, last_loss = [], float("nan")
    t_log, n_log = time.time(), 0
    wrapped.train()
    start_step, interrupted = step, 0
    while step < config.steps:
        interrupted = stop.requested(di.world, device)
        if interrupted:
            break
        gen = torch.Generator(device=device).manual_seed(_mix(config.seed, dp_rank, step))
        batch = batches(step)
        x0, cond = batch[0].to(device, non_blocking=True), batch[1]
        noise = batch[2].to(device) if len(batch) > 2 else None
        if cond is not None:
            cond = cond.to(device)
        if config.objective != "meanflow":
            cond = _drop_cond(cond, config.cond_drop, null_class, gen)
        lr = _lr_at(config, step)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = compute_loss(wrapped, x0, cond, noise, sched=sched, config=config, gen=gen,
                                null_class=null_class, teacher=teacher)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {step}: training stopped, nothing saved from "
                f"this state (last good checkpoint: {last_ckpt or 'none'}); "
                f"try a lower --lr or --grad-clip")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if manual_dp:
            _average_grads(params, dp)
        elif fsdp and sp is not None:
            parallel.reduce_gradients(params, sp)
        gnorm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
        gnorm = float(_local(gnorm))
        if not math.isfinite(gnorm):
            raise NonFiniteLossError(
                f"gradient norm is {gnorm} at step {step}: training stopped, nothing saved from "
                f"this state (last good checkpoint: {last_ckpt or 'none'})")
        opt.step()
        if ema is not None:
            ema.update(params, step)
        step += 1
        last_loss = loss_value
        window.append(loss_value)
        n_log += 1
        bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            now = time.time()
            rec = dict(step=step, loss=sum(window) / len(window), lr=lr, grad_norm=gnorm,
                       it_per_s=n_log / max(now - t_log, 1e-9), time=now - t_start)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if di.main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            window, t_log, n_log = [], now, 0
        if config.checkpoint_every and step % config.checkpoint_every == 0 and \
                step != config.steps:
            last_ckpt = save_checkpoint(step)
    bar.close()
    if interrupted:
        if step > start_step and last_ckpt != checkpoint_path(out_dir, step):
            last_ckpt = save_checkpoint(step)
        raise TrainingInterrupted(interrupted, step, last_ckpt)
    last_ckpt = save_checkpoint(step)

    # export the model for sampling: EMA weights, LoRA merged
    full = _full_state(model, fsdp)                            # collectives: every rank
    ema_full = {k: _local(v) for k, v in ema.state().items()} if ema is not None else {}
    model_path = os.path.join(out_dir, MODEL)
    if di.main:
        full = dict(full)
        for k, v in ema_full.items():
            full[k] = v.to(full[k].dtype)
        full = merge_lora(full, config.lora_rank, config.lora_alpha)
        export_model(model_path, {k: v.cpu() for k, v in full.items()},
                     dict(meta_base, step=step, ema=ema is not None))
    return dict(step=step, loss=last_loss, model_path=model_path, checkpoint=last_ckpt,
                seconds=time.time() - t_start, model=model)
