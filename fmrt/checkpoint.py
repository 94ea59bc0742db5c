"""Model and checkpoint I/O: the one module that reads and writes fmrt's model files and
training states, used by the trainer, the sampler, the evaluator and the CLI alike.

Two kinds of file, both a `.safetensors` with a `.json` sibling (the same JSON also sits in the
safetensors header under "fmrt", so the weights file alone is enough):
- an exported model (format "fmrt.dit", `export_model` / `load_model`): the DiT's weights under
  its own parameter names; the JSON holds the model config, the training and data configs, the
  sampling defaults and the step;
- a training checkpoint (format "fmrt.train_state", `TrainState`, `save_train_state` /
  `load_train_state`): `model.*` weights, `ema.*` (fp32), `optim.<param id>.<name>` (AdamW),
  `rng.torch` / `rng.cuda`; the JSON adds the step and the optimizer's param groups.

`export_for_sampling` re-exports a model with other sampling defaults; `export_average` writes
the weight average of several (`average_models`: SWA across learning-rate cycles, a model
soup), recording its sources under "averaged_from".

Writes are atomic: bytes go to `<name>.tmp<PID>`, are synced, then renamed over `<name>`, so a
crash never leaves a half-written file that looks valid (`remove_stale_temporaries` removes
what a killed writer left). Nothing non-finite is ever written: every floating tensor is checked
first (`check_finite`, `NonFiniteTensorError`).

A run folder (`fmrt train --out-dir`): `checkpoints/step-XXXXXXX.safetensors` + `.json`,
`metrics.jsonl`, `model.safetensors` + `model.json` (`run_files`, `remove_run`), and while a
training process writes to it, its lock `.fmrt-train.lock` (`RunLock`: a second run into the
same folder is refused).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

MODEL_FORMAT = "fmrt.dit"
CHECKPOINT_FORMAT = "fmrt.train_state"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
MODEL = "model.safetensors"

_CKPT_RE = re.compile(r"^step-(\d+)\.safetensors$")
# what fmrt's own writers leave behind when killed mid-write: `<one of fmrt's names>.tmp<PID>`
_TMP_RE = re.compile(r"^(model\.safetensors|model\.json|metrics\.jsonl|"
                     r"step-\d+\.safetensors|step-\d+\.json)\.tmp(\d+)$")


class NonFiniteTensorError(ValueError):
    """A tensor about to be saved holds NaN or infinite values: nothing was written."""


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path.tmp<PID>`, fsync, rename over `path`; on any error (also Ctrl-C)
    the temporary is removed and `path` is untouched."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """Raise NonFiniteTensorError naming the first floating tensor of `tensors` that holds a
    NaN or an infinity."""
    keys = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not keys:
        return
    dev = tensors[keys[0]].device      # one host sync for all, wherever the tensors live
    ok = torch.stack([torch.isfinite(tensors[k]).all().to(dev) for k in keys]).cpu()
    if not bool(ok.all()):
        bad = keys[int((~ok).nonzero()[0])]
        raise NonFiniteTensorError(f"refusing to save {what}: {bad} holds non-finite values")


def _write_pair(path: str, tensors: dict[str, Tensor], meta: dict) -> None:
    """`path` (.safetensors, with meta in its header) and its `.json` sibling, both atomic,
    after checking every tensor is finite."""
    from safetensors.torch import save as st_save
    check_finite(tensors, path)
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata={"fmrt": json.dumps(meta)})
    atomic_write_bytes(path, data)
    atomic_write_json(_json_of(path), meta)


def _json_of(path: str) -> str:
    return path[: -len(".safetensors")] + ".json"


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def read_meta(path: str) -> dict:
    """The JSON metadata of an fmrt model or checkpoint file (its `.json` sibling, else the
    copy inside the safetensors header)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    js = _json_of(path) if path.endswith(".safetensors") else None
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


def load_tensors(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({e})") from None


def load_state(model: nn.Module, state: dict, path: str) -> None:
    """`model.load_state_dict(state)` with one-line errors naming `path` on missing, unexpected
    or differently shaped entries."""
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


def merge_lora(state: dict[str, Tensor], rank: int, alpha: Optional[float] = None
               ) -> dict[str, Tensor]:
    """A state dict with peft LoRA adapters (`X.base_layer.weight`, `X.lora_A.default.weight`,
    `X.lora_B.default.weight`) -> the base model's state dict, each adapted weight merged:
    `W + (alpha / rank) B A` (computed in fp32, stored in W's dtype). A state dict without
    adapters comes back unchanged."""
    adapted = [k for k in state if k.endswith(".lora_A.default.weight")]
    if adapted and not rank:
        raise ValueError(f"LoRA adapters ({adapted[0]}, ...) but no rank to scale them by")
    scale = (alpha if alpha is not None else rank) / rank if rank else 0.0
    out = {k: v for k, v in state.items() if "lora_" not in k and ".base_layer." not in k}
    for k in adapted:
        a = state[k]
        name = k[: -len(".lora_A.default.weight")]
        b = state[f"{name}.lora_B.default.weight"]
        w = state[f"{name}.base_layer.weight"]
        out[f"{name}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        if f"{name}.base_layer.bias" in state:
            out[f"{name}.bias"] = state[f"{name}.base_layer.bias"]
    return out


def load_model(path: str, *, device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None):
    """Load an exported model (`model.safetensors` + `model.json`) or a training checkpoint (its
    EMA weights when it has them, LoRA adapters merged) for inference. Returns (DiT in eval
    mode, meta dict). Raises FileNotFoundError / ValueError with a one-line message on a
    missing, corrupt or mismatched file."""
    from fmrt.models import DiT, DiTConfig
    meta = read_meta(path)
    if meta.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    try:
        cfg = DiTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model config in checkpoint ({e})") from None
    tensors = load_tensors(path)
    if meta["format"] == CHECKPOINT_FORMAT:
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        state.update({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        t = meta.get("train", {})
        try:
            state = merge_lora(state, int(t.get("lora_rank") or 0), t.get("lora_alpha"))
        except KeyError as e:
            raise ValueError(f"{path}: incomplete LoRA adapter ({e} missing)") from None
    else:
        state = tensors
    model = DiT(cfg)
    load_state(model, state, path)
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model, meta


def export_model(path: str, state: dict[str, Tensor], meta: dict) -> None:
    """Write an exported model: `path` (.safetensors, the weights) and its `.json` (meta, with
    format "fmrt.dit"), atomically; NonFiniteTensorError (nothing written) on NaN / inf."""
    if not path.endswith(".safetensors"):
        raise ValueError(f"model path must end with .safetensors, got {path}")
    _write_pair(path, state, dict(meta, format=MODEL_FORMAT))


def with_sampling_defaults(meta: dict, **changes) -> dict:
    """A copy of a model's meta with its recorded sampling defaults (`meta["sample"]`: what
    `fmrt sample` / `fmrt eval` / `fmrt.sampling.generate_clips` use when not told otherwise)
    changed: steps (int >= 1), guidance_scale (float >= 0), shift (float > 0),
    guidance_interval ((lo, hi) with 0 <= lo <= hi <= 1: guidance only where lo <= sigma <=
    hi; None removes it: guidance at every step). ValueError / TypeError on a bad value."""
    from fmrt.guidance import check_interval
    sample = dict(meta.get("sample") or {})
    for key, value in changes.items():
        if key == "guidance_interval":
            iv = check_interval(value)
            if iv is None:
                sample.pop(key, None)
            else:
                sample[key] = list(iv)
            continue
        if key == "steps":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        elif key in ("guidance_scale", "shift"):
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and (value > 0 if key == "shift" else value >= 0))
            value = float(value)
        else:
            raise TypeError(f"unknown sampling default {key!r}: expected steps, guidance_scale, "
                            f"guidance_interval or shift")
        if not ok:
            raise ValueError(f"bad sampling default {key}={value!r}")
        sample[key] = value
    return dict(meta, sample=sample)


def export_for_sampling(src: str, out: str, **changes) -> dict:
    """Export the model in `src` (an exported model, or a training checkpoint: its EMA weights,
    LoRA merged) to `out` (.safetensors + .json) with `with_sampling_defaults(**changes)`; the
    weights are the ones `load_model(src)` samples with, bit for bit. Returns the new meta."""
    model, meta = load_model(src)
    return _export_sampling(out, model.state_dict(), meta, changes)


def average_models(srcs: Sequence[str], weights: Optional[Sequence[float]] = None
                   ) -> tuple[dict[str, Tensor], dict]:
    """The weighted average of the models in `srcs` (each what `load_model` samples with: an
    exported model, or a training checkpoint's EMA weights, LoRA merged), parameter by
    parameter: sum_i w_i theta_i with `weights` (default equal) scaled to sum to 1, accumulated
    in float64 and stored in each tensor's dtype. This is stochastic weight averaging across
    the ends of learning-rate cycles (Izmailov et al., 2018) or a uniform model soup (Wortsman
    et al., 2022); it only makes sense for models fine-tuned from one another. Returns (state,
    the first model's meta with `averaged_from` = [{path, weight}, ...] added).
    ValueError with a one-line message on fewer than two models, one file given twice, weights
    that are not positive and finite or do not match the models, models whose architecture
    differs, or a buffer (a fixed table such as `class_text`, never averaged) that differs."""
    srcs = list(srcs)
    if len(srcs) < 2:
        raise ValueError(f"averaging needs at least two models, got {len(srcs)}")
    w = [1.0] * len(srcs) if weights is None else [float(x) for x in weights]
    if len(w) != len(srcs):
        raise ValueError(f"{len(w)} weights for {len(srcs)} models")
    if not all(math.isfinite(x) and x > 0 for x in w):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    total = sum(w)
    w = [x / total for x in w]
    for i, a in enumerate(srcs):
        for b in srcs[:i]:
            if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
                raise ValueError(f"{a} is given twice (weight a model with weights instead)")
    acc: dict[str, Tensor] = {}
    first_meta: dict = {}
    for i, (src, wi) in enumerate(zip(srcs, w)):
        model, meta = load_model(src)
        params = {k: p.detach() for k, p in model.named_parameters()}
        buffers = {k: b for k, b in model.state_dict().items() if k not in params}
        if i == 0:
            first_meta, dtypes, fixed = meta, {k: v.dtype for k, v in params.items()}, buffers
            acc = {k: v.double() * wi for k, v in params.items()}
            continue
        if meta.get("model") != first_meta.get("model"):
            raise ValueError(f"{src}: its architecture differs from {srcs[0]}'s "
                             f"({meta.get('model')} against {first_meta.get('model')})")
        for k, v in buffers.items():          # fixed tables (class_text): never averaged
            if not torch.equal(v, fixed[k]):
                raise ValueError(f"{src}: buffer {k} differs from {srcs[0]}'s")
        for k, v in params.items():
            acc[k] += v.double() * wi
    out = dict(fixed, **{k: v.to(dtypes[k]) for k, v in acc.items()})
    return out, dict(first_meta, averaged_from=[dict(path=p, weight=x) for p, x in zip(srcs, w)])


def export_average(srcs: Sequence[str], out: str, weights: Optional[Sequence[float]] = None,
                   **changes) -> dict:
    """`average_models(srcs, weights)` exported to `out` as `export_for_sampling` does (the
    first model's sampling defaults, changed by `changes`). Returns the new meta."""
    state, meta = average_models(srcs, weights)
    return _export_sampling(out, state, meta, changes)


def _export_sampling(out: str, state: dict[str, Tensor], meta: dict, changes: dict) -> dict:
    keep = {k: v for k, v in meta.items() if k not in ("format", "optim_groups")}
    new = with_sampling_defaults(keep, **changes)
    export_model(out, {k: v.contiguous() for k, v in state.items()}, new)
    return dict(new, format=MODEL_FORMAT)


# ---------------------------------------------------------------------------------------------
# training checkpoints
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything a training checkpoint holds. `optim`: the optimizer's per-parameter state as
    `{"optim.<param id>.<name>": tensor}` (`optimizer_tensors`); `rng`: {"torch"[, "cuda"]}."""
    step: int
    meta: dict
    model: dict[str, Tensor]
    ema: dict[str, Tensor] = field(default_factory=dict)
    optim: dict[str, Tensor] = field(default_factory=dict)
    optim_groups: list = field(default_factory=list)
    rng: dict[str, Tensor] = field(default_factory=dict)


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CHECKPOINTS, f"step-{step:07d}.safetensors")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in `out_dir/checkpoints`, oldest first (a
    checkpoint is complete when both its .safetensors and .json exist)."""
    d = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(d):
        return []
    out = []
    for f in os.listdir(d):
        m = _CKPT_RE.match(f)
        if m and os.path.isfile(os.path.join(d, _json_of(f))):
            out.append((int(m.group(1)), os.path.join(d, f)))
    return sorted(out)


def prune_checkpoints(out_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (keep=0: remove none)."""
    if not keep:
        return
    for _, old in list_checkpoints(out_dir)[:-keep]:
        for p in (old, _json_of(old)):
            try:
                os.remove(p)
            except OSError:
                pass


def save_train_state(path: str, state: TrainState) -> None:
    """Write a training checkpoint atomically (NonFiniteTensorError, nothing written, when a
    weight, EMA or optimizer tensor is NaN / inf)."""
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    tensors.update({f"ema.{k}": v for k, v in state.ema.items()})
    tensors.update(state.optim)
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    meta = dict(state.meta, format=CHECKPOINT_FORMAT, step=int(state.step),
                optim_groups=state.optim_groups)
    _write_pair(path, tensors, meta)


def load_train_state(path: str) -> TrainState:
    meta = read_meta(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a resumable training checkpoint")
    tensors = load_tensors(path)

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return TrainState(step=int(meta["step"]), meta=meta, model=part("model."), ema=part("ema."),
                      optim={k: v for k, v in tensors.items() if k.startswith("optim.")},
                      optim_groups=meta.get("optim_groups", []), rng=part("rng."))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list]:
    """(`{"optim.<param id>.<name>": tensor}`, param groups) of an optimizer's state dict."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------

def run_files(out_dir: str) -> list[str]:
    """The files of an earlier run in `out_dir` (fmrt's own names only): its checkpoints (and
    their .json), metrics.jsonl, model.safetensors and model.json."""
    files = []
    for _, p in list_checkpoints(out_dir):
        files += [p, _json_of(p)]
    d = os.path.join(out_dir, CHECKPOINTS)
    if os.path.isdir(d):   # halves of checkpoints (a .json without weights, or the reverse)
        for f in sorted(os.listdir(d)):
            p = os.path.join(d, f)
            if re.match(r"^step-\d+\.(safetensors|json)$", f) and p not in files:
                files.append(p)
    for name in (METRICS, MODEL, _json_of(MODEL)):
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            files.append(p)
    return files


def remove_run(out_dir: str) -> list[str]:
    """Remove `run_files(out_dir)`; returns what was removed. Nothing else in the folder is
    touched."""
    files = run_files(out_dir)
    for p in files:
        os.remove(p)
    return files


LOCK = ".fmrt-train.lock"


class RunLockedError(ValueError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder for as long as one training process writes to it:
    `flock` on `out_dir/.fmrt-train.lock`, which holds the owner's PID. The kernel drops the
    lock when its process ends however it ends, so a killed run never leaves a stale lock; the
    file is removed on `release`. Where `fcntl` is missing (Windows) it locks nothing.
    `RunLock(out_dir)` raises RunLockedError naming the owner when the folder is taken."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK)
        self._fd: Optional[int] = None
        try:
            import fcntl
        except ImportError:     # pragma: no cover - not POSIX
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunLockedError(
                    f"another fmrt train (PID {owner}) is writing to {out_dir}: wait for it to "
                    f"finish or stop it, or choose another --out-dir") from None
            try:    # the owner before us may have removed the file between our open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:     # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Remove the temporaries (`<fmrt file name>.tmp<PID>`) that a killed writer left in
    `out_dir` and `out_dir/checkpoints`: only fmrt's own names, only when process PID is gone.
    Returns the removed paths."""
    removed = []
    for d in (out_dir, os.path.join(out_dir, CHECKPOINTS)):
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            m = _TMP_RE.match(f)
            p = os.path.join(d, f)
            if m and os.path.isfile(p) and not _alive(int(m.group(2))):
                os.remove(p)
                removed.append(p)
    return removed
