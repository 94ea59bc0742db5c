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
weights when EMA is on, LoRA merged). Every file is written to a temporary name then renamed
(`os.replace`), so a crash never leaves a half-written file that looks valid, and a non-finite
loss stops training before the optimizer step, with no checkpoint written from that state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from fmrt.data import (CouplingDataset, LatentFolderDataset, NUM_CLASSES, ShapesVideo,
                       collate)

OBJECTIVES = ("sft", "meanflow")
LR_SCHEDULES = ("constant", "cosine")
MODEL_FORMAT = "fmrt.dit"
CHECKPOINT_FORMAT = "fmrt.train_state"


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite: training stopped."""


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
    couplings: Optional[str] = None
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
    timestep_sampler: str = "uniform_index"   # FlowMatchScheduler.sample_sigmas samplers
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str = "table"                  # FlowMatchScheduler.loss_weight weightings
    cond_drop: float = 0.1                    # label / text dropout (classifier-free guidance)
    cfg_omega: float = 1.0                    # MeanFlow: guidance folded into training
    cfg_kappa: float = 0.0                    # (fmrt.losses.meanflow_loss's cfg_omega / kappa)
    # LoRA (peft)
    lora_rank: int = 0                        # 0 = train all weights
    lora_alpha: Optional[float] = None        # None = lora_rank
    # bookkeeping
    checkpoint_every: int = 0                 # 0 = only at the end
    keep_checkpoints: int = 2                 # newest resumable states kept (0 = all)
    resume: Optional[str] = None              # None, "auto" (latest in out_dir) or a path
    log_every: int = 10
    seed: int = 0
    device: str = "auto"                      # "auto", "cpu", "cuda", "cuda:1", ...
    mixed_precision: str = "auto"             # "auto" (bf16 on CUDA), "bf16", "no"
    fsdp: bool = False                        # FSDP2 (fully_shard) instead of DDP under torchrun
    gradient_checkpointing: bool = False
    progress: bool = True
    # recorded in model.json: what `fmrt sample` uses when not told
    sample_steps: int = 20
    sample_guidance: float = 3.0

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
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def _mix(*xs: int) -> int:
    h = 0x243F6A8885A308D3
    for x in xs:
        h = (h * 0x100000001B3 + int(x) + 0x9E3779B97F4A7C15) % (2 ** 63 - 1)
    return h


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_safetensors(tensors: dict, path: str, metadata: dict) -> None:
    from safetensors.torch import save as st_save
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata=metadata)
    _atomic_write_bytes(path, data)


def _atomic_write_json(path: str, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"not a device: {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


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


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with LoRA adapters (if any) merged into their base weights, under
    the base model's key names."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        A, B = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if not isinstance(A, nn.ModuleDict) or "default" not in A:
            continue
        scale = mod.scaling["default"]
        wkey = f"{name}.base_layer.weight"
        w = state[wkey].float() + scale * (B["default"].weight.float() @ A["default"].weight.float())
        state[f"{name}.weight"] = w.to(state[wkey].dtype)
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.base_layer.bias"]
    return {k: v for k, v in state.items() if "lora_" not in k and ".base_layer." not in k}


def export_model(path: str, state: dict[str, Tensor], meta: dict) -> None:
    """Write `path` (.safetensors, weights) and its sibling `.json` (meta), atomically."""
    if not path.endswith(".safetensors"):
        raise ValueError(f"model path must end with .safetensors, got {path}")
    meta = dict(meta, format=MODEL_FORMAT)
    _atomic_save_safetensors(state, path, {"fmrt": json.dumps(meta)})
    _atomic_write_json(path[: -len(".safetensors")] + ".json", meta)


def read_meta(path: str) -> dict:
    """The JSON metadata of an fmrt model or checkpoint file (its `.json` sibling, else the
    copy inside the safetensors header)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    js = path[: -len(".safetensors")] + ".json" if path.endswith(".safetensors") else None
    if js and os.path.isfile(js):
        try:
            with open(js, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{js}: unreadable checkpoint config ({e})") from None
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if "fmrt" not in md:
        raise ValueError(f"{path}: not an fmrt checkpoint (no config next to it or inside it)")
    return json.loads(md["fmrt"])


def _load_tensors(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({e})") from None


def load_model(path: str, *, device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None):
    """Load an exported model (`model.safetensors` + `model.json`) or a resumable training
    checkpoint (its EMA weights when it has them) for inference. Returns (DiT in eval mode,
    meta dict). Raises FileNotFoundError / ValueError with a one-line message on a missing,
    corrupt or mismatched file."""
    from fmrt.models import DiT, DiTConfig
    meta = read_meta(path)
    if meta.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    try:
        cfg = DiTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model config in checkpoint ({e})") from None
    tensors = _load_tensors(path)
    if meta["format"] == CHECKPOINT_FORMAT:
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        state.update(ema)
        if any("lora_" in k for k in state):
            model = DiT(cfg)
            t = meta.get("train", {})
            model = apply_lora(model, int(t.get("lora_rank", 0)), t.get("lora_alpha"))
            _load_state(model, state, path)
            state = merged_state_dict(model)
    else:
        state = tensors
    model = DiT(cfg)
    _load_state(model, state, path)
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model, meta


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
    _load_state(model, state, path)
    with torch.no_grad():
        last = model.time_embedding_h[-1]
        last.weight.zero_()
        last.bias.zero_()
    return model.to(dtype=next(base.parameters()).dtype)


def _load_state(model: nn.Module, state: dict, path: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: checkpoint of another shape: {k} is {tuple(v.shape)}, "
                             f"the model expects {tuple(own[k].shape)}")
    model.load_state_dict(state)


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
# checkpoints
# ---------------------------------------------------------------------------------------------

_CKPT_RE = re.compile(r"^step-(\d+)\.safetensors$")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in `out_dir/checkpoints`, oldest first (a
    checkpoint is complete when both its .safetensors and .json exist)."""
    d = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    out = []
    for f in os.listdir(d):
        m = _CKPT_RE.match(f)
        if m and os.path.isfile(os.path.join(d, f[: -len(".safetensors")] + ".json")):
            out.append((int(m.group(1)), os.path.join(d, f)))
    return sorted(out)


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, Tensor) else torch.tensor(v)
            tensors[f"optim.{pid}.{k}"] = t
    return tensors, sd["param_groups"]


def _optim_load(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


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
    """All-reduce the gradients (one flat buffer per dtype) and divide by the world size, as
    DDP does; a parameter without a gradient on this rank takes part as zeros."""
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
                 gen: torch.Generator, null_class: Optional[int] = None) -> Tensor:
    """The scalar training loss of one batch: `fmrt.losses.sft_loss` (noise drawn in the
    kernel from a seed taken from `gen`), or with reflow couplings (`noise` given) the same
    weighted flow-matching MSE on the given noise (`ops.add_noise` + `ops.flow_matching_loss`),
    or `fmrt.losses.meanflow_loss` (which drops conditions itself, to `null_class`)."""
    B = x0.shape[0]
    if config.objective == "meanflow":
        from fmrt.losses import meanflow_loss

        def u(z, r, t, c=None):   # MeanFlow's u(z, r, t) convention -> dit(z, t, c, r=r)
            return model(z, t, c, r=r)
        uncond = None
        if cond is not None and config.cond_drop > 0:
            uncond = (torch.full_like(cond, null_class) if cond.dtype == torch.long
                      else torch.zeros_like(cond))
        return meanflow_loss(u, x0, cond=cond, uncond=uncond, cond_drop_prob=config.cond_drop,
                             cfg_omega=config.cfg_omega, cfg_kappa=config.cfg_kappa,
                             generator=gen)
    if noise is None:
        from fmrt.losses import sft_loss
        return sft_loss(model, x0, cond, scheduler=sched, sampler=config.timestep_sampler,
                        weighting=config.weighting, generator=gen,
                        logit_mean=config.logit_mean, logit_std=config.logit_std)
    from fmrt import ops
    sigma = sched.sample_sigmas(B, sampler=config.timestep_sampler, generator=gen,
                                device=gen.device, logit_mean=config.logit_mean,
                                logit_std=config.logit_std).to(x0.device)
    x_t, _ = ops.add_noise(x0, sigma, noise.to(x0.dtype))
    pred = model(x_t, sigma, cond)
    return ops.flow_matching_loss(pred, x0, noise.to(x0.dtype),
                                  weight=sched.loss_weight(sigma, config.weighting))


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
        with torch.enable_grad():
            return _train(config, dataset, dist_info, device)
    finally:
        if dist_info.created:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(config: TrainConfig, dataset, di: _Dist, device: torch.device) -> dict:
    from fmrt.schedule import FlowMatchScheduler
    t_start = time.time()
    out_dir = config.out_dir
    if di.main:
        try:
            os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create output directory {out_dir}: {e.strerror}") from None
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"output directory {out_dir} is not writable")

    ds = dataset if dataset is not None else make_dataset(config)
    cond_kind, cond_dim = _cond_kind(ds)
    sample_shape = tuple(ds.sample_shape)

    # resume: find the state first (its config fixes the model)
    resume_path = None
    if config.resume:
        if config.resume == "auto":
            ck = list_checkpoints(out_dir)
            resume_path = ck[-1][1] if ck else None
        else:
            resume_path = config.resume
            if not os.path.isfile(resume_path):
                raise FileNotFoundError(f"no such checkpoint to resume from: {resume_path}")

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
            mcfg = base_cfg
        model = base.train().requires_grad_(True)
    if config.lora_rank:
        model = apply_lora(model, config.lora_rank, config.lora_alpha)
    model.to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters")
    params = [p for _, p in named]

    # parallelism
    fsdp = config.fsdp and di.world > 1
    wrapped = model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
    elif di.world > 1 and config.objective == "meanflow":
        # torch.func.jvp cannot run through DDP's forward (its reducer touches the storage of
        # functorch's dual tensors): data parallel by hand, rank 0's weights to every rank and
        # gradients averaged after each backward (_average_grads)
        _broadcast_module(model)
    elif di.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    manual_dp = di.world > 1 and not fsdp and config.objective == "meanflow"

    opt = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas),
                            weight_decay=config.weight_decay)
    ema = EMA(named, config.ema_decay) if config.ema_decay > 0 else None
    sched = FlowMatchScheduler(config.template)
    tkw = {} if config.shift is None else {"shift": config.shift}
    sched.set_timesteps(1000, training=True, **tkw)

    meta_base = dict(model=mcfg.to_dict(), train=config.to_dict(),
                     data=ds.config() if hasattr(ds, "config") else {},
                     sample=dict(template=config.template, shift=config.shift,
                                 sample_shape=list(sample_shape), num_classes=mcfg.num_classes,
                                 steps=config.sample_steps,
                                 guidance_scale=config.sample_guidance))

    step = 0
    if resume_path and fsdp:
        raise ValueError("resuming an FSDP run is not supported yet (the optimizer state is "
                         "not gathered): resume without --fsdp, or start again")
    if resume_path:
        meta = read_meta(resume_path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{resume_path}: not a resumable training checkpoint")
        if meta["model"] != mcfg.to_dict():
            raise ValueError(f"{resume_path}: checkpoint of another model configuration than "
                             f"this run's")
        tensors = _load_tensors(resume_path)
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_model_state_dict)
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            _load_state(model, state, resume_path)
        if not fsdp:
            _optim_load(opt, tensors, meta["optim_groups"])
        if ema is not None:
            ema.load({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")})
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        step = int(meta["step"])

    batches = _Batches(ds, config.batch_size, di.world, di.rank, config.seed)
    use_bf16 = device.type == "cuda" and config.mixed_precision in ("auto", "bf16")
    null_class = mcfg.num_classes

    def save_checkpoint(at: int) -> str:
        path = os.path.join(out_dir, "checkpoints", f"step-{at:07d}.safetensors")
        state = _full_state(model, fsdp)                       # collectives: every rank
        ema_full = {k: _local(v) for k, v in ema.state().items()} if ema is not None else {}
        if not di.main:
            return path
        tensors = {f"model.{k}": v for k, v in state.items()}
        tensors.update({f"ema.{k}": v for k, v in ema_full.items()})
        groups = []
        if not fsdp:
            ot, groups = _optim_tensors(opt)
            tensors.update(ot)
        tensors["rng.torch"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        meta = dict(meta_base, format=CHECKPOINT_FORMAT, step=at, optim_groups=groups)
        _atomic_save_safetensors(tensors, path, {"fmrt": json.dumps(meta)})
        _atomic_write_json(path[: -len(".safetensors")] + ".json", meta)
        if config.keep_checkpoints:
            for _, old in list_checkpoints(out_dir)[:-config.keep_checkpoints]:
                for p in (old, old[: -len(".safetensors")] + ".json"):
                    try:
                        os.remove(p)
                    except OSError:
                        pass
        return path

    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=step, disable=not (config.progress and di.main),
               desc=f"fmrt train ({config.objective})", dynamic_ncols=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    last_ckpt, window, last_loss = None, [], float("nan")
    t_log, n_log = time.time(), 0
    wrapped.train()
    while step < config.steps:
        gen = torch.Generator(device=device).manual_seed(_mix(config.seed, di.rank, step))
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
                                null_class=null_class)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {step}: training stopped, nothing saved from "
                f"this state (last good checkpoint: {last_ckpt or resume_path or 'none'}); "
                f"try a lower --lr or --grad-clip")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if manual_dp:
            _average_grads(params, di.world)
        gnorm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
        gnorm = float(_local(gnorm))
        if not math.isfinite(gnorm):
            raise NonFiniteLossError(
                f"gradient norm is {gnorm} at step {step}: training stopped, nothing saved from "
                f"this state (last good checkpoint: {last_ckpt or resume_path or 'none'})")
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
    last_ckpt = save_checkpoint(step)

    # export the model for sampling: EMA weights, LoRA merged
    full = _full_state(model, fsdp)                            # collectives: every rank
    ema_full = {k: _local(v) for k, v in ema.state().items()} if ema is not None else {}
    model_path = os.path.join(out_dir, "model.safetensors")
    if di.main:
        full = dict(full)
        for k, v in ema_full.items():
            full[k] = v.to(full[k].dtype)
        if config.lora_rank:
            # merge on a copy of the (unsharded) module holding these weights
            from fmrt.models import DiT
            tmp = apply_lora(DiT(mcfg), config.lora_rank, config.lora_alpha)
            tmp.load_state_dict({k: v.cpu() for k, v in full.items()})
            full = merged_state_dict(tmp)
        export_model(model_path, {k: v.cpu() for k, v in full.items()},
                     dict(meta_base, step=step, ema=ema is not None))
    return dict(step=step, loss=last_loss, model_path=model_path, checkpoint=last_ckpt,
                seconds=time.time() - t_start, model=model)
