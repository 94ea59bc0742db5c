"""The `fmrt` command. Subcommands map their flags onto library keyword arguments.

    fmrt info                      versions, devices, the active backend
    fmrt sample [...]              sample the embedded default model (or --checkpoint) to a PNG
    fmrt train [...]               train a DiT on the built-in data, latents or reflow couplings
    fmrt eval [...]                classifier accuracy and Frechet distance per solver setting
    fmrt reflow [...]              write (noise, sample) couplings for reflow training

Every user error (a bad flag, a missing or corrupt checkpoint, an unwritable output) is one line
on stderr and exit status 2; set FMRT_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import fmrt

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_CHECKPOINT = os.path.join(ASSETS, "default_dit.safetensors")
DTYPES = ("float32", "bfloat16", "float16")


class CLIError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`fmrt <cmd>: error: ...`) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------

def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = "int"
    return parse


def _float(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
           hi_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {s}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {v}")
        return v
    parse.__name__ = "float"
    return parse


def _class_label(s: str):
    from fmrt.data import CLASS_NAMES
    if s in CLASS_NAMES:
        return CLASS_NAMES.index(s)
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class index or one of {', '.join(CLASS_NAMES)}, got {s!r}") from None


def _check_writable_file(path: str) -> None:
    """Fail early, with one line, when `path` cannot be written."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise CLIError(f"output {path} is a directory")
    if not os.path.isdir(d):
        raise CLIError(f"cannot write {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CLIError(f"cannot write {path}: permission denied")


def _device(name: str):
    from fmrt.train import resolve_device
    return resolve_device(name)


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _solvers() -> tuple[str, ...]:
    try:
        from fmrt.sampling import SOLVERS
        return tuple(SOLVERS)
    except ImportError:
        return ("euler",)


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------

def _add_sampling_args(p: argparse.ArgumentParser, *, steps_default) -> None:
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="model .safetensors (with its .json) written by fmrt train "
                        "(default: the embedded model)")
    p.add_argument("--solver", default="euler", choices=_solvers())
    p.add_argument("--shift", type=_float(0.0, lo_open=True), default=None,
                   help="sigma-grid shift (default: the checkpoint's)")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=DTYPES)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fmrt",
                description="fmrt: flow-matching runtime (fused kernels, training, sampling)")
    p.add_argument("--version", action="version", version=f"fmrt {fmrt.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="show versions, devices and the active backend")
    info.set_defaults(func=cmd_info)

    # -- sample -------------------------------------------------------------------------------
    s = sub.add_parser("sample", help="sample clips from the embedded model or a checkpoint",
                       description="Sample clips and write a PNG grid (one row per clip, one "
                                   "column per frame). On a CPU it runs on one thread unless "
                                   "OMP_NUM_THREADS is set: the embedded model's tensors are "
                                   "too small to gain from more, and threads that spin while "
                                   "their core is busy with other jobs make sampling several "
                                   "times slower on a loaded machine (set OMP_NUM_THREADS=N for "
                                   "a big --checkpoint on idle cores).")
    _add_sampling_args(s, steps_default=None)
    s.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="solver steps (default: the checkpoint's recommended, 20 for the "
                        "embedded model)")
    s.add_argument("--guidance-scale", type=_float(0.0), default=None,
                   help="classifier-free guidance scale (1 = none; default: the "
                        "checkpoint's recommended)")
    s.add_argument("--num", type=_int_at_least(1), default=None,
                   help="number of clips (default 12; with --diffusers: videos per prompt, 1)")
    s.add_argument("--class", dest="label", type=_class_label, default=None,
                   help="class index or name (default: cycle through the classes)")
    s.add_argument("--out", default="fmrt_samples.png", help="PNG grid to write")
    s.add_argument("--gif", nargs="?", const="", default=None, metavar="PATH",
                   help="also write an animated GIF of the clips (default: --out with .gif)")
    s.add_argument("--diagnostics", default=None, metavar="PATH",
                   help="write the CFG diagnostics plot of seed 000 (needs guidance != 1)")
    d = s.add_argument_group(
        "diffusers pipeline", "with --diffusers PATH, sample a local diffusers Wan pipeline "
        "folder (WanPipeline.save_pretrained layout) with fmrt's attention processors "
        "(accelerate_wan) and fmrt's fused Euler scheduler; --steps (default 50), "
        "--guidance-scale (default 5), --seed, --shift, --device, --dtype and --num apply; "
        "--out may end in .png (frame grid), .gif, .npy (float frames [N, F, H, W, 3]) or .mp4")
    d.add_argument("--diffusers", default=None, metavar="PATH",
                   help="a local diffusers Wan pipeline folder (has model_index.json)")
    d.add_argument("--prompt", default=None, help="text prompt (required with --diffusers)")
    d.add_argument("--image", default=None, metavar="PATH",
                   help="first frame for an image-to-video pipeline (WanImageToVideoPipeline)")
    d.add_argument("--negative-prompt", default=None)
    d.add_argument("--height", type=_int_at_least(1), default=480)
    d.add_argument("--width", type=_int_at_least(1), default=832)
    d.add_argument("--frames", type=_int_at_least(1), default=81, help="video frames (4k + 1)")
    d.add_argument("--scheduler", default="auto", choices=("auto", "fmrt", "pipeline"),
                   help="auto: fmrt's FlowMatchEulerDiscreteScheduler in place of diffusers' "
                        "one (other schedulers are kept); fmrt: always, built from the "
                        "pipeline's scheduler config; pipeline: keep the pipeline's")
    d.add_argument("--attention-backend", default="auto",
                   help="fmrt.attention backend of the accelerated attention")
    d.add_argument("--no-accelerate", action="store_true",
                   help="run the pipeline untouched (stock diffusers, for comparison)")
    s.set_defaults(func=cmd_sample)

    # -- train --------------------------------------------------------------------------------
    t = sub.add_parser("train", help="train a DiT (SFT flow matching or MeanFlow)",
                       description="Train on the built-in shapes data (default), a folder of "
                                   ".safetensors latents (--data DIR) or reflow couplings "
                                   "(--couplings FILE).")
    t.add_argument("--out-dir", default="runs/fmrt")
    t.add_argument("--data", default="shapes", help="'shapes' (built in) or a latents folder")
    t.add_argument("--couplings", default=None, help="reflow couplings from fmrt reflow")
    t.add_argument("--frames", type=_int_at_least(1), default=4, help="built-in data: frames")
    t.add_argument("--size", type=_int_at_least(8), default=16, help="built-in data: H = W")
    t.add_argument("--num-classes", type=_int_at_least(1), default=6)
    t.add_argument("--model", default="tiny", help="DiT preset (tiny, wan2.1-1.3b, ...)")
    t.add_argument("--dim", type=_int_at_least(1), default=None, help="override the preset")
    t.add_argument("--num-layers", type=_int_at_least(1), default=None)
    t.add_argument("--num-heads", type=_int_at_least(1), default=None)
    t.add_argument("--ffn-dim", type=_int_at_least(1), default=None)
    t.add_argument("--patch-size", type=_int_at_least(1), nargs=3, default=None,
                   metavar=("PT", "PH", "PW"), help="override the preset's (1 2 2)")
    t.add_argument("--text-dim", type=_int_at_least(1), default=None,
                   help="with class labels (built-in data): condition as Wan does, each class a "
                        "fixed text-like embedding [class tokens, N] through text_embedding "
                        "and cross-attention (the weights then load into diffusers' "
                        "WanTransformer3DModel)")
    t.add_argument("--class-tokens", type=_int_at_least(1), default=None,
                   help="tokens per class embedding (preset: 4)")
    t.add_argument("--init", default=None, help="start from this model's weights")
    t.add_argument("--objective", default="sft", choices=("sft", "meanflow"))
    t.add_argument("--steps", type=_int_at_least(1), default=1000)
    t.add_argument("--batch-size", type=_int_at_least(1), default=32, help="per process")
    t.add_argument("--lr", type=_float(0.0, lo_open=True), default=6e-4)
    t.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    t.add_argument("--warmup-steps", type=_int_at_least(0), default=0)
    t.add_argument("--weight-decay", type=_float(0.0), default=0.0)
    t.add_argument("--grad-clip", type=_float(0.0), default=1.0, help="0 = off")
    t.add_argument("--ema-decay", type=_float(0.0, 1.0, hi_open=True), default=0.999,
                   help="0 = off")
    t.add_argument("--template", default="Wan", help="FlowMatchScheduler template")
    t.add_argument("--shift", type=_float(0.0, lo_open=True), default=None)
    t.add_argument("--timestep-sampler", default="uniform_index",
                   choices=("uniform_index", "uniform", "logit_normal", "mode", "cosmap"))
    t.add_argument("--logit-mean", type=_float(), default=0.0)
    t.add_argument("--logit-std", type=_float(0.0, lo_open=True), default=1.0)
    t.add_argument("--weighting", default="table",
                   choices=("table", "sigma_sqrt", "cosmap", "none"))
    t.add_argument("--cond-drop", type=_float(0.0, 1.0, hi_open=True), default=0.1,
                   help="label dropout for classifier-free guidance")
    t.add_argument("--cfg-omega", type=_float(), default=1.0,
                   help="MeanFlow: guidance scale folded into training (1 = none)")
    t.add_argument("--cfg-kappa", type=_float(), default=0.0,
                   help="MeanFlow: improved-CFG mixing of the conditional branch")
    t.add_argument("--lora-rank", type=_int_at_least(0), default=0, help="0 = full training")
    t.add_argument("--lora-alpha", type=_float(0.0, lo_open=True), default=None)
    t.add_argument("--checkpoint-every", type=_int_at_least(0), default=0)
    t.add_argument("--keep-checkpoints", type=_int_at_least(0), default=2)
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="resume from PATH, or (no value) from the latest in --out-dir")
    t.add_argument("--log-every", type=_int_at_least(1), default=10)
    t.add_argument("--seed", type=_int_at_least(0), default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"))
    t.add_argument("--fsdp", action="store_true", help="FSDP2 under torchrun (big models)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--sample-steps", type=_int_at_least(1), default=20,
                   help="recorded in model.json: the steps fmrt sample uses by default")
    t.add_argument("--sample-guidance", type=_float(0.0), default=3.0,
                   help="recorded in model.json: the guidance fmrt sample uses by default")
    t.set_defaults(func=cmd_train)

    # -- eval ---------------------------------------------------------------------------------
    e = sub.add_parser("eval", help="quality of generated clips (classifier accuracy, FD)",
                       description="Generate clips of every class and report the accuracy of "
                                   "fmrt's clip classifier on them and the Frechet distance to "
                                   "real clips in its feature space.")
    _add_sampling_args(e, steps_default=None)
    e.add_argument("--steps", type=_int_at_least(1), nargs="+", default=[1, 2, 4, 8, 50])
    e.add_argument("--guidance-scale", type=_float(0.0), nargs="+", default=None,
                   help="guidance scales to try (default: 1 and the checkpoint's recommended)")
    e.add_argument("--num-per-class", type=_int_at_least(2), default=32)
    e.add_argument("--classifier", default=None, help="classifier weights (default: shipped)")
    e.add_argument("--json", default=None, help="also write the results as JSON")
    e.set_defaults(func=cmd_eval)

    # -- reflow -------------------------------------------------------------------------------
    r = sub.add_parser("reflow", help="generate (noise, sample) couplings for reflow training",
                       description="Sample the model from seeded noise and save the pairs as a "
                                   "safetensors dataset for `fmrt train --couplings`.")
    _add_sampling_args(r, steps_default=None)
    r.add_argument("--steps", type=_int_at_least(1), default=50)
    r.add_argument("--guidance-scale", type=_float(0.0), default=None)
    r.add_argument("--num", type=_int_at_least(1), default=1024)
    r.add_argument("--batch-size", type=_int_at_least(1), default=64)
    r.add_argument("--class", dest="label", type=_class_label, default=None,
                   help="only this class (default: cycle through the classes)")
    r.add_argument("--out", default="couplings.safetensors")
    r.set_defaults(func=cmd_reflow)
    return p


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from fmrt._dispatch import requested_backend, triton_available
    print(f"fmrt {fmrt.__version__}  torch {torch.__version__}  "
          f"triton {'yes' if triton_available() else 'no'}  "
          f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}  "
          f"FMRT_BACKEND={requested_backend()}")
    return 0


def _load(args):
    from fmrt.train import load_model
    device = _device(args.device)
    if not os.path.isfile(args.checkpoint):
        raise CLIError(f"no such checkpoint: {args.checkpoint}")
    model, meta = load_model(args.checkpoint, device=device, dtype=_dtype(args.dtype))
    if model.config.num_classes is None:
        raise CLIError(f"{args.checkpoint}: not a class-conditional model; fmrt sample/eval "
                       f"need one (use fmrt.sampling.sample from Python for others)")
    return model, meta, device


def _labels(args, num_classes: int, n: int):
    import torch
    if args.label is not None:
        if not 0 <= args.label < num_classes:
            raise CLIError(f"--class must be in [0, {num_classes}), got {args.label}")
        return torch.full((n,), args.label, dtype=torch.long)
    return torch.arange(n) % num_classes


def class_names(labels) -> list[str]:
    from fmrt.data import CLASS_NAMES
    return [CLASS_NAMES[int(v)] if 0 <= int(v) < len(CLASS_NAMES) else str(int(v)) for v in labels]


def save_grid_png(clips, names: Sequence[str], path: str, *, scale: int = 4) -> None:
    """Clips `[N, 3, T, H, W]` in [-1, 1] -> a PNG: one row per clip (`names[n]` on the left,
    if any), one column per frame."""
    from PIL import Image, ImageDraw

    x = ((clips.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    N, C, T, H, W = x.shape
    gap, left = 2, (100 if any(names) else 0)
    cw, ch = W * scale, H * scale
    img = Image.new("RGB", (left + T * (cw + gap), N * (ch + gap) + gap), (48, 48, 48))
    draw = ImageDraw.Draw(img)
    for n in range(N):
        y0 = gap + n * (ch + gap)
        if left:
            draw.text((4, y0 + ch // 2 - 5), names[n], fill=(220, 220, 220))
        for f in range(T):
            fr = Image.fromarray(x[n, :, f].permute(1, 2, 0).numpy(), "RGB")
            img.paste(fr.resize((cw, ch), Image.NEAREST), (left + f * (cw + gap), y0))
    _save_atomic(img, path, "PNG")


def save_gif(clips, path: str, *, scale: int = 4, cols: int = 6, ms: int = 250) -> None:
    """Clips `[N, 3, T, H, W]` -> an animated GIF: all clips tiled, one GIF frame per frame."""
    from PIL import Image
    x = ((clips.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    N, C, T, H, W = x.shape
    cols = min(cols, N)
    rows = (N + cols - 1) // cols
    gap, cw, ch = 2, W * scale, H * scale
    frames = []
    for f in range(T):
        img = Image.new("RGB", (cols * (cw + gap) + gap, rows * (ch + gap) + gap), (48, 48, 48))
        for n in range(N):
            r, c = divmod(n, cols)
            fr = Image.fromarray(x[n, :, f].permute(1, 2, 0).numpy(), "RGB")
            img.paste(fr.resize((cw, ch), Image.NEAREST), (gap + c * (cw + gap),
                                                          gap + r * (ch + gap)))
        frames.append(img)
    tmp = f"{path}.tmp{os.getpid()}"
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms,
                   loop=0)
    os.replace(tmp, path)


def _save_atomic(img, path: str, fmt: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    img.save(tmp, format=fmt)
    os.replace(tmp, path)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from fmrt.eval import generate_clips
    if args.diffusers is not None:
        return sample_diffusers(args)
    for flag, given in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                        ("--image", args.image), ("--no-accelerate", args.no_accelerate)):
        if given:
            raise CLIError(f"{flag} applies to --diffusers PATH only")
    args.num = args.num or 12
    _check_writable_file(args.out)
    gif = None
    if args.gif is not None:
        gif = args.gif or os.path.splitext(args.out)[0] + ".gif"
        _check_writable_file(gif)
    if args.diagnostics:
        _check_writable_file(args.diagnostics)
    t0 = time.time()
    if args.device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)   # tiny tensors: extra threads only spin (see --help)
    model, meta, device = _load(args)
    rec = meta.get("sample", {}) or {}
    steps = args.steps or int(rec.get("steps") or 20)
    scale = args.guidance_scale if args.guidance_scale is not None else \
        float(rec.get("guidance_scale") or 1.0)
    if args.solver == "meanflow" and not model.config.meanflow:
        raise CLIError("--solver meanflow needs a MeanFlow model")
    labels = _labels(args, model.config.num_classes, args.num)
    recorder = None
    if args.diagnostics:
        if scale == 1.0:
            raise CLIError("--diagnostics records classifier-free guidance: use a "
                           "--guidance-scale other than 1")
        from fmrt.sampling import DiagnosticsRecorder
        recorder = DiagnosticsRecorder()
    with torch.no_grad():
        clips = generate_clips(model, meta, labels, steps=steps, solver=args.solver,
                               guidance_scale=scale, seed=args.seed, shift=args.shift,
                               device=device, dtype=_dtype(args.dtype), recorder=recorder)
    save_grid_png(clips.cpu(), class_names(labels), args.out)
    msg = [f"wrote {args.out}"]
    if gif:
        save_gif(clips.cpu(), gif)
        msg.append(gif)
    if recorder is not None:
        from fmrt.sampling import plot_diagnostics
        first = [{k: (v[:1] if isinstance(v, torch.Tensor) and v.ndim >= 1 else v)
                  for k, v in r.items()} for r in recorder.records]
        plot_diagnostics(first, args.diagnostics)
        msg.append(args.diagnostics)
    print(f"{', '.join(msg)}  ({args.num} clips {tuple(clips.shape[1:])}, {args.solver} "
          f"{steps} steps, guidance {scale:g}, seed {args.seed}, "
          f"{f'{torch.get_num_threads()} CPU threads, ' if device.type == 'cpu' else ''}"
          f"{time.time() - t0:.1f}s)")
    return 0


VIDEO_SUFFIXES = (".png", ".gif", ".npy", ".mp4")


def sample_diffusers(args: argparse.Namespace) -> int:
    """`fmrt sample --diffusers PATH`: a local diffusers Wan pipeline, accelerated by fmrt."""
    import torch
    suffix = os.path.splitext(args.out)[1].lower()
    if suffix not in VIDEO_SUFFIXES:
        raise CLIError(f"--out must end in one of {', '.join(VIDEO_SUFFIXES)}, got {args.out}")
    for flag, given in (("--checkpoint", args.checkpoint != DEFAULT_CHECKPOINT),
                        ("--solver", args.solver != "euler"), ("--class", args.label is not None),
                        ("--gif", args.gif is not None), ("--diagnostics", args.diagnostics)):
        if given:
            raise CLIError(f"{flag} does not apply to --diffusers (the pipeline's own model and "
                           f"Euler / scheduler loop run)")
    if not args.prompt:
        raise CLIError("--diffusers needs --prompt")
    if not os.path.isfile(os.path.join(args.diffusers, "model_index.json")):
        raise CLIError(f"{args.diffusers}: not a diffusers pipeline folder (no model_index.json)")
    if args.image is not None and not os.path.isfile(args.image):
        raise CLIError(f"no such image: {args.image}")
    _check_writable_file(args.out)
    t0 = time.time()
    device, dtype = _device(args.device), _dtype(args.dtype)
    try:
        from diffusers import DiffusionPipeline
        from diffusers import FlowMatchEulerDiscreteScheduler as DiffusersEuler
    except ImportError as e:
        raise CLIError(f"--diffusers needs diffusers installed ({e})") from None
    import warnings
    with warnings.catch_warnings():  # newer diffusers prefer dtype=, older know only torch_dtype=
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(args.diffusers, torch_dtype=dtype).to(device)
    what = ["stock diffusers"]
    if not args.no_accelerate:
        from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler, accelerate_wan
        n = accelerate_wan(pipe, backend=args.attention_backend)
        what = [f"fmrt attention on {n} modules"]
        sched = pipe.scheduler
        if args.scheduler == "fmrt" or (args.scheduler == "auto" and type(sched) is DiffusersEuler):
            cfg = dict(sched.config)
            if "shift" not in cfg and "flow_shift" in cfg:  # UniPC-style flow config
                cfg["shift"] = cfg["flow_shift"]
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
            what.append("fmrt Euler scheduler")
        else:
            what.append(f"the pipeline's {type(sched).__name__}")
    if args.shift is not None:
        keys = [k for k in ("shift", "flow_shift") if k in pipe.scheduler.config]
        if not keys:
            raise CLIError(f"--shift: the pipeline's {type(pipe.scheduler).__name__} has no shift")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                          **{k: args.shift for k in keys})
    image = _pipeline_image(pipe, args.image)
    steps = args.steps or 50
    scale = 5.0 if args.guidance_scale is None else args.guidance_scale
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    out = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height,
               width=args.width, num_frames=args.frames, num_inference_steps=steps,
               guidance_scale=scale, num_videos_per_prompt=args.num or 1, generator=gen,
               output_type="np", **image)
    frames = out.frames  # [N, F, H, W, 3] in [0, 1]
    save_video(frames, args.out)
    print(f"wrote {args.out}  ({tuple(frames.shape)} frames, {', '.join(what)}, {steps} steps, "
          f"guidance {scale:g}, seed {args.seed}, {time.time() - t0:.1f}s)")
    return 0


def _pipeline_image(pipe, path: Optional[str]) -> dict:
    """{"image": PIL image} for a pipeline whose call takes one, {} otherwise; CLIError when
    --image and the pipeline disagree."""
    import inspect
    param = inspect.signature(pipe.__call__).parameters.get("image")
    name = type(pipe).__name__
    if param is None:
        if path is not None:
            raise CLIError(f"--image: {name} takes no image (a text-to-video pipeline)")
        return {}
    if path is None:
        if param.default is inspect.Parameter.empty:
            raise CLIError(f"{name} is image-to-video: give the first frame with --image PATH")
        return {}
    from PIL import Image
    with Image.open(path) as im:
        return {"image": im.convert("RGB")}


def save_video(frames, path: str, *, fps: int = 16) -> None:
    """Videos `[N, F, H, W, 3]` (numpy, [0, 1]) -> `.npy` as they are, `.png` frame grid (a row
    per video), `.gif` (videos tiled) or `.mp4` (the first video; needs imageio or OpenCV)."""
    import numpy as np
    import torch
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        tmp = f"{path}.tmp{os.getpid()}.npy"
        np.save(tmp, np.asarray(frames, dtype=np.float32))
        os.replace(tmp, path)
        return
    if suffix == ".mp4":
        from diffusers.utils import export_to_video
        try:
            export_to_video(list(frames[0]), path, fps=fps)
        except ImportError as e:
            raise CLIError(f"writing .mp4 needs imageio[ffmpeg] or opencv-python ({e}); "
                           f"use .gif, .png or .npy") from None
        return
    clips = torch.from_numpy(np.asarray(frames, dtype=np.float32)).permute(0, 4, 1, 2, 3) * 2 - 1
    scale = max(1, 128 // max(clips.shape[-2:]))
    if suffix == ".png":
        save_grid_png(clips, [""] * clips.shape[0], path, scale=scale)
    else:
        save_gif(clips, path, scale=scale, ms=1000 // fps)


def cmd_train(args: argparse.Namespace) -> int:
    from fmrt.train import TrainConfig, train
    over = {k: v for k, v in (("dim", args.dim), ("num_layers", args.num_layers),
                              ("num_heads", args.num_heads), ("ffn_dim", args.ffn_dim),
                              ("patch_size", args.patch_size), ("text_dim", args.text_dim),
                              ("class_tokens", args.class_tokens))
            if v is not None}
    if args.data == "shapes" and not args.couplings:
        over["num_classes"] = args.num_classes
    cfg = TrainConfig(
        out_dir=args.out_dir, model=args.model, model_overrides=over, init=args.init,
        data=args.data, couplings=args.couplings, frames=args.frames, size=args.size,
        num_classes=args.num_classes, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay,
        objective=args.objective, template=args.template, shift=args.shift,
        timestep_sampler=args.timestep_sampler, logit_mean=args.logit_mean,
        logit_std=args.logit_std, weighting=args.weighting, cond_drop=args.cond_drop,
        cfg_omega=args.cfg_omega, cfg_kappa=args.cfg_kappa,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume, log_every=args.log_every, seed=args.seed, device=args.device,
        mixed_precision=args.mixed_precision, fsdp=args.fsdp,
        gradient_checkpointing=args.gradient_checkpointing, progress=not args.no_progress,
        sample_steps=args.sample_steps, sample_guidance=args.sample_guidance)
    out = train(cfg)
    if out["model_path"]:
        print(f"trained {out['step']} steps in {out['seconds']:.0f}s, last loss "
              f"{out['loss']:.4f}; model: {out['model_path']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from fmrt.eval import CLASSIFIER_PATH, evaluate_clips, generate_clips, load_classifier
    if args.json:
        _check_writable_file(args.json)
    model, meta, device = _load(args)
    clf, _ = load_classifier(args.classifier or CLASSIFIER_PATH)
    K = model.config.num_classes
    labels = torch.arange(K).repeat_interleave(args.num_per_class)
    scales = args.guidance_scale
    if scales is None:
        rec = float((meta.get("sample") or {}).get("guidance_scale") or 1.0)
        scales = [1.0] if rec == 1.0 else [1.0, rec]
    rows = []
    print(f"{'solver':<8} {'steps':>5} {'cfg':>5} {'accuracy':>9} {'FD':>9} {'seconds':>8}")
    # the floor: real clips (another data seed) scored the same way
    from fmrt.data import ShapesVideo
    shape = (meta.get("sample") or {}).get("sample_shape") or [3, 4, 16, 16]
    ds = ShapesVideo(10 ** 6, frames=shape[1], size=shape[2], seed=4242)
    real = torch.cat([ds.clips_of_class(c, args.num_per_class) for c in range(K)])
    q = evaluate_clips(real, labels, classifier=clf)
    rows.append(dict(solver="real data", steps=0, guidance_scale=0.0, seconds=0.0, **q))
    print(f"{'real':<8} {'-':>5} {'-':>5} {q['accuracy']:>9.3f} {q['fd']:>9.3f} {'-':>8}")
    for scale in scales:
        for steps in args.steps:
            t0 = time.time()
            clips = generate_clips(model, meta, labels, steps=steps, solver=args.solver,
                                   guidance_scale=scale, seed=args.seed, shift=args.shift,
                                   device=device, dtype=_dtype(args.dtype))
            dt = time.time() - t0
            q = evaluate_clips(clips.cpu(), labels, classifier=clf)
            rows.append(dict(solver=args.solver, steps=steps, guidance_scale=scale,
                             seconds=dt, **q))
            print(f"{args.solver:<8} {steps:>5} {scale:>5g} {q['accuracy']:>9.3f} "
                  f"{q['fd']:>9.3f} {dt:>8.1f}", flush=True)
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dict(checkpoint=args.checkpoint, device=str(device), results=rows), f,
                      indent=2)
        os.replace(tmp, args.json)
    return 0


def cmd_reflow(args: argparse.Namespace) -> int:
    """Reflow couplings (SPEC 5) with `fmrt.reflow.make_couplings`: noise from --seed, the
    model's samples from exactly that noise (the checkpoint's grid, --solver, --steps,
    --guidance-scale), the class labels as `cond`; `fmrt train --couplings` reads them."""
    from fmrt.eval import generate_clips
    from fmrt.reflow import make_couplings, save_couplings
    _check_writable_file(args.out)
    model, meta, device = _load(args)
    rec = meta.get("sample", {}) or {}
    scale = args.guidance_scale if args.guidance_scale is not None else \
        float(rec.get("guidance_scale") or 1.0)
    shape = tuple(rec.get("sample_shape") or ())
    labels = _labels(args, model.config.num_classes, args.num)

    def sample_fn(m, noise, cond=None):
        return generate_clips(m, meta, cond, steps=args.steps, solver=args.solver,
                              guidance_scale=scale, shift=args.shift, device=device,
                              dtype=_dtype(args.dtype), noise=noise, clamp=False)

    t0 = time.time()
    couplings = make_couplings(model, args.num, shape, sample_fn=sample_fn, cond=labels,
                               seed=args.seed, batch_size=args.batch_size, device=device)
    save_couplings(args.out, couplings)
    print(f"wrote {args.out}: {args.num} couplings {tuple(shape)} ({args.solver} {args.steps} "
          f"steps, guidance {scale:g}, {time.time() - t0:.1f}s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if os.environ.get("FMRT_DEBUG"):
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fmrt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, never a traceback (FMRT_DEBUG=1 shows it)
        kind = "" if isinstance(e, (CLIError, ValueError, TypeError, FileNotFoundError,
                                    PermissionError)) else f"{type(e).__name__}: "
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"fmrt {args.command}: error: {kind}{msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
