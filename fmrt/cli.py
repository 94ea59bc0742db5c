"""The `fmrt` command. Subcommands map their flags onto library keyword arguments.

    fmrt info                      versions, devices, the active backend
    fmrt sample [...]              sample the embedded default model (or --checkpoint) to a file
    fmrt train [...]               train a DiT on the built-in data, latents or reflow couplings
    fmrt eval [...]                classifier accuracy and Frechet distance per solver setting
    fmrt reflow [...]              write (noise, sample) couplings for reflow training

Every user error (a bad flag, a missing or corrupt checkpoint, an unwritable output) is one line
on stderr and exit status 2; set FMRT_DEBUG=1 to see the traceback instead.

Arguments and files are checked before torch is imported and before any work (`PREPARE`): no
command writes over one of its own inputs, an fmrt model or checkpoint, or a file fmrt did not
write (that last one only with --overwrite). Outputs are written in the format their extension
names, to a temporary name that is then renamed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import NamedTuple, Optional, Sequence

from fmrt import __version__

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_CHECKPOINT = os.path.join(ASSETS, "default_dit.safetensors")
DTYPES = ("float32", "bfloat16", "float16")
# The CLI's vocabulary, kept here so that arguments are checked without importing torch;
# tests/test_cli_startup.py checks it against the library's (SOLVERS, CLASS_NAMES, the seed
# range, the checkpoint formats).
SOLVERS = ("euler", "heun", "unipc", "euler_maruyama", "meanflow")
CLASS_NAMES = ("square-right", "disc-fall", "triangle-rotate", "cross-pulse", "ring-bounce",
               "diamond-drift")
# Bounds on what is absurd (clear errors instead of hours of work or one giant allocation).
SEED_MAX = 2 ** 63 - 1              # fmrt.ops seeds are in [0, 2^63)
MAX_SAMPLING_STEPS = 1000           # the schedules have 1000 training timesteps
MAX_TRAIN_STEPS = 10 ** 7
MAX_SAMPLE_NUM = 1024               # one grid row per clip
MAX_EVAL_PER_CLASS = 4096
MAX_REFLOW_NUM = 10 ** 6
MAX_ERROR_CHARS = 300               # one readable line, whatever the exception carried
MARK = f"fmrt {__version__}"       # written into fmrt's images and JSON: see _written_by_fmrt
MODEL_FORMATS = ("fmrt.dit", "fmrt.train_state")     # an exported model, a training checkpoint


class CLIError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`fmrt <cmd>: error: ...`) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# argument types (no torch)
# ---------------------------------------------------------------------------------------------

def _int_at_least(lo: int, hi: Optional[int] = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {s if len(s) < 30 else v}")
        return v
    parse.__name__ = "int"
    return parse


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63 - 1], got {s[:30]}"
                                         f"{'...' if len(s) > 30 else ''}")
    return v


def _device_name(s: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {s!r}")
    return s


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


def _class_label(s: str) -> int:
    if s in CLASS_NAMES:
        return CLASS_NAMES.index(s)
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class index or one of {', '.join(CLASS_NAMES)}, got {s!r}") from None


# ---------------------------------------------------------------------------------------------
# files: what a command reads and writes, checked before any work (no torch)
# ---------------------------------------------------------------------------------------------

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
CLIP_SUFFIXES = (*IMAGE_FORMATS, ".gif", ".npy", ".mp4")


class Output(NamedTuple):
    flag: str
    path: str
    suffixes: tuple[str, ...]
    replace_own: bool = True     # replace without --overwrite when fmrt wrote the file


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _sidecar(path: str) -> Optional[str]:
    """The .json beside a model or checkpoint .safetensors (its metadata)."""
    return path[: -len(".safetensors")] + ".json" if path.endswith(".safetensors") else None


def _safetensors_format(path: str) -> Optional[str]:
    """The fmrt format named in a .safetensors header (read as JSON: no torch), else None."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 * 2 ** 20:
                return None
            md = json.loads(f.read(n)).get("__metadata__") or {}
        if "fmrt" in md:
            return json.loads(md["fmrt"]).get("format")
        return md.get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _model_file(path: str) -> Optional[str]:
    """Why `path` must never be overwritten by sample/eval/reflow (an fmrt model, a training
    checkpoint, or the .json metadata of one), else None."""
    if _safetensors_format(path) in MODEL_FORMATS:
        return "an fmrt model or training checkpoint"
    if path.endswith(".json") and os.path.isfile(path[: -len(".json")] + ".safetensors"):
        return f"the metadata of the model {path[: -len('.json')]}.safetensors"
    return None


def _written_by_fmrt(path: str) -> bool:
    """Whether fmrt wrote this image (PNG text / EXIF Software / GIF comment `fmrt ...`) or
    `fmrt eval` wrote this JSON. NPY and MP4 files carry no such mark."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix in IMAGE_FORMATS or suffix == ".gif":
            from PIL import Image
            with Image.open(path) as im:
                marks = (im.info.get("Software"), im.info.get("comment"),
                         im.getexif().get(0x0131))
            return any(str(m if not isinstance(m, bytes) else m.decode("latin-1"))
                       .startswith("fmrt ") for m in marks if m)
        if suffix == ".json" and os.path.getsize(path) < 64 * 2 ** 20:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            return isinstance(obj, dict) and (str(obj.get("written_by", "")).startswith("fmrt ")
                                              or {"checkpoint", "results"} <= set(obj))
    except Exception:  # unreadable or not what its name says: not fmrt's
        return False
    return False


def _check_writable_file(path: str) -> None:
    """Fail early, with one line, when `path` cannot be written."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise CLIError(f"output {path} is a directory")
    if not os.path.isdir(d):
        raise CLIError(f"cannot write {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CLIError(f"cannot write {path}: permission denied")


def _check_input(flag: str, path: str, what: str) -> None:
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a directory, not a {what} file")
    if not os.path.isfile(path):
        raise CLIError(f"no such {what}: {path}")


def _check_outputs(inputs: Sequence[tuple[str, str]], outputs: Sequence[Output],
                   overwrite: bool) -> None:
    """Refuse, with one line naming the file, an output that: is the same file as an input or
    another output; cannot be written; has an extension outside its `suffixes`; is an fmrt
    model or checkpoint (or its .json); exists and was not written by fmrt (or, when
    `replace_own` is false, exists at all), unless `overwrite`."""
    inputs = [(flag, p) for flag, p in inputs if p]
    for i, out in enumerate(outputs):
        for flag, p in inputs:
            if _same_file(out.path, p):
                raise CLIError(f"{out.flag} {out.path} is the same file as {flag}: refusing to "
                               f"overwrite an input")
        for other in outputs[:i]:
            if _same_file(out.path, other.path):
                raise CLIError(f"{out.flag} {out.path} is the same file as {other.flag}: give "
                               f"each output its own file")
    for out in outputs:
        _check_writable_file(out.path)
        suffix = os.path.splitext(out.path)[1].lower()
        if suffix not in out.suffixes:
            what = f"unknown output format {suffix!r}" if suffix else "no file extension"
            raise CLIError(f"{out.flag} {out.path}: {what}; use {', '.join(out.suffixes)}")
        if not os.path.exists(out.path):
            continue
        why = _model_file(out.path)
        if why:
            raise CLIError(f"{out.flag} {out.path} is {why}: refusing to overwrite it")
        if overwrite or (out.replace_own and _written_by_fmrt(out.path)):
            continue
        hint = "" if not out.replace_own else " and was not written by fmrt"
        raise CLIError(f"{out.flag} {out.path} exists{hint}: pass --overwrite to replace it")


def _checkpoint_inputs(path: str) -> list[tuple[str, str]]:
    _check_input("--checkpoint", path, "checkpoint")
    side = _sidecar(path)
    return [("--checkpoint", path)] + ([("--checkpoint's metadata", side)]
                                       if side and os.path.exists(side) else [])


def _needs_module(module: str, what: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise CLIError(f"{what} needs {module}: pip install \"fmrt[{extra}]\"")


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------

def _add_sampling_args(p: argparse.ArgumentParser, several_seeds: bool = False) -> None:
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="model .safetensors (with its .json) written by fmrt train "
                        "(default: the embedded model)")
    p.add_argument("--solver", default=None, choices=SOLVERS,
                   help="default: meanflow for a MeanFlow model (u(z, r, t), one call per "
                        "step), else euler")
    p.add_argument("--shift", type=_float(0.0, lo_open=True), default=None,
                   help="sigma-grid shift (default: the checkpoint's)")
    if several_seeds:
        p.add_argument("--seed", type=_seed, nargs="+", default=[0],
                       help="noise seed; several: each setting is scored at every seed, then "
                            "the mean and spread of accuracy and FD over them (FD from 32 "
                            "clips per class swings by several units from seed to seed)")
    else:
        p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", type=_device_name, default="cpu",
                   help="cpu (default), cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)


def _add_guide_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guide-model", default=None, metavar="MODEL",
                   help="autoguidance (Karras et al. 2024) instead of classifier-free guidance: "
                        "guide away from this weaker model of the same classes (an earlier or "
                        "smaller one), v = g + scale (v - g); needs --guidance-scale other "
                        "than 1, Euler-type solvers; as many model calls as CFG")


def _load_guide(args, model, device, scales):
    """The --guide-model (None without one), loaded like --checkpoint and checked against it."""
    if args.guide_model is None:
        return None
    if all(s == 1.0 for s in scales):
        raise CLIError("--guide-model guides: give a --guidance-scale other than 1")
    if args.solver == "meanflow":
        raise CLIError("--guide-model runs with the Euler-type solvers, not meanflow")
    from fmrt.checkpoint import load_model
    from fmrt.sampling import check_guide_model
    guide, _ = load_model(args.guide_model, device=device, dtype=_dtype(args.dtype))
    try:
        check_guide_model(model, guide)
    except ValueError as e:
        raise CLIError(f"--guide-model {args.guide_model}: {e}") from None
    return guide


def _add_batch_args(p: argparse.ArgumentParser, *, batch_default: int, what: str) -> None:
    p.add_argument("--batch-size", type=_int_at_least(1), default=batch_default,
                   help=f"{what} per model batch (default {batch_default}); the noise does not "
                        f"depend on it, the results only to float rounding (euler_maruyama: "
                        f"each batch draws its own step noise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over batches")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file that fmrt did not write")


def _guidance_reuse_arg(s: str):
    from fmrt.guidance import parse_guidance_reuse
    try:
        return parse_guidance_reuse(s)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_guidance_reuse_arg.__name__ = "policy"


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    """Fewer model evaluations (fmrt.guidance, fmrt.cache): flags mapping onto
    `fmrt.sampling.sample`'s guidance_reuse / guidance_interval / cache (and accelerate_wan's
    for --diffusers)."""
    g = p.add_argument_group("fewer evaluations", "guidance reuse, guidance interval and step "
                             "caching (solver euler for reuse)")
    g.add_argument("--guidance-reuse", type=_guidance_reuse_arg, default=None, metavar="POLICY",
                   help="off, static:EVERY[:FIRST[:LAST]] (uncond forward every EVERY steps, "
                        "full CFG for the FIRST / LAST steps) or adaptive:TOL[:FIRST[:LAST"
                        "[:MAX_REUSE]]] (refresh when c or d moved by more than TOL)")
    _add_interval_arg(g)
    g.add_argument("--cache", default=None, metavar="POLICY",
                   help="off, first-block:THRESHOLD[:ORDER], mag:THRESHOLD[:MAX_SKIP"
                        "[:RETENTION[:ORDER]]] (with --cache-ratios) or periodic:EVERY[:WARMUP"
                        "[:LAST[:ORDER]]]; ORDER 1 extrapolates the cached residual linearly")
    g.add_argument("--cache-ratios", default=None, metavar="JSON",
                   help="MagCache ratios: a JSON list, or {\"cond\": [...], \"uncond\": [...]}"
                        " (fmrt.cache.calibrate_mag_ratios)")


def _add_interval_arg(p, flag: str = "--guidance-interval",
                      help: str = "guidance only where LO <= sigma <= HI (no uncond forward "
                                  "outside)") -> None:
    p.add_argument(flag, type=_float(0.0, 1.0), nargs=2, default=None, metavar=("LO", "HI"),
                   help=help)


def _interval_flag(values, flag: str = "--guidance-interval") -> tuple[float, float]:
    lo, hi = values
    if lo > hi:
        raise CLIError(f"{flag}: LO must be <= HI, got {lo:g} {hi:g}")
    return lo, hi


def _policies(args: argparse.Namespace) -> dict:
    """The policy flags as sample() keyword arguments; CLIError for bad settings (before any
    model is loaded)."""
    from fmrt.cache import parse_cache
    out = {}
    if args.guidance_reuse is not None:
        out["guidance_reuse"] = args.guidance_reuse
    if args.guidance_interval is not None:
        out["guidance_interval"] = _interval_flag(args.guidance_interval)
    ratios = None
    if args.cache_ratios is not None:
        try:
            with open(args.cache_ratios, encoding="utf-8") as f:
                ratios = json.load(f)
        except (OSError, ValueError) as e:
            raise CLIError(f"--cache-ratios: cannot read {args.cache_ratios}: {e}") from None
    try:
        cache = parse_cache(args.cache, ratios)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--cache: {e}") from None
    if cache is not None:
        out["cache"] = cache
    if getattr(args, "solver", None) is not None:   # else checked once _load resolves it
        _check_solver_policies(args.solver, out)
    return out


def _check_solver_policies(solver: str, policies: dict, hint: str = "") -> None:
    """CLIError where a policy of `_policies` does not fit the solver."""
    if "guidance_reuse" in policies and solver != "euler":
        raise CLIError(f"--guidance-reuse needs --solver euler{hint}")
    if "cache" in policies and solver in ("heun", "meanflow"):
        raise CLIError(f"--cache needs a one-evaluation-per-step solver, not --solver "
                       f"{solver}{hint}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fmrt",
                description="fmrt: flow-matching runtime (fused kernels, training, sampling)")
    p.add_argument("--version", action="version", version=f"fmrt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="show versions, devices and the active backend")
    info.set_defaults(func=cmd_info)

    # -- sample -------------------------------------------------------------------------------
    s = sub.add_parser("sample", help="sample clips from the embedded model or a checkpoint",
                       description="Sample clips and write them in the format --out names: "
                                   ".png/.jpg/.webp (a grid: one row per clip, one column per "
                                   "frame), .gif (animated), .npy (float frames [N, T, H, W, 3] "
                                   "in [0, 1]) or .mp4 (needs fmrt[video]). On a CPU it runs on "
                                   "at most two threads unless OMP_NUM_THREADS is set, and "
                                   "fmrt sets OMP_WAIT_POLICY=PASSIVE unless it is set: idle "
                                   "threads then sleep instead of spinning on a core that other "
                                   "jobs need, which made two threads several times slower than "
                                   "one on a busy machine; the embedded model's tensors gain "
                                   "little from more than two (set OMP_NUM_THREADS=N for a big "
                                   "--checkpoint on idle cores).")
    _add_sampling_args(s)
    _add_policy_args(s)
    _add_guide_arg(s)
    s.add_argument("--steps", type=_int_at_least(1, MAX_SAMPLING_STEPS), default=None,
                   help="solver steps (default: the checkpoint's recommended, 20 for the "
                        "embedded model)")
    s.add_argument("--guidance-scale", type=_float(0.0), default=None,
                   help="classifier-free guidance scale (1 = none; default: the "
                        "checkpoint's recommended)")
    s.add_argument("--num", type=_int_at_least(1, MAX_SAMPLE_NUM), default=None,
                   help="number of clips (default 12; with --diffusers: videos or images per "
                        "prompt, 1)")
    s.add_argument("--class", dest="label", type=_class_label, default=None,
                   help="class index or name (default: cycle through the classes)")
    s.add_argument("--out", default="fmrt_samples.png",
                   help=f"file to write ({', '.join(CLIP_SUFFIXES)}; default fmrt_samples.png)")
    s.add_argument("--gif", nargs="?", const="", default=None, metavar="PATH",
                   help="also write an animated GIF of the clips (default: --out with .gif)")
    s.add_argument("--diagnostics", default=None, metavar="PATH",
                   help="write the CFG diagnostics plot (.png) of seed 000 (needs guidance != 1 "
                        "and matplotlib)")
    s.add_argument("--sp", type=_int_at_least(1), default=1,
                   help="sequence-parallel degree: N processes sample together, each "
                        "holding 1/N of the latent's token rows through the loop (torchrun "
                        "--nproc-per-node N fmrt sample --sp N ...; rank 0 writes)")
    _add_batch_args(s, batch_default=64, what="clips")
    d = s.add_argument_group(
        "diffusers pipeline", "with --diffusers PATH, sample a local diffusers pipeline folder "
        "(save_pretrained layout): video (Wan, Wan2.2, SkyReels-V2, HunyuanVideo, LTX-Video) or "
        "image (FLUX.1, Qwen-Image) with fmrt's attention processors "
        "(fmrt.integrations.diffusers.accelerate) and fmrt's fused Euler scheduler; --steps, "
        "--guidance-scale (FLUX.1: its distilled guidance; Qwen-Image: true_cfg_scale), "
        "--seed, --shift, --device, --dtype and --num apply, defaults the pipeline's; --out "
        "as above (video .npy: float frames [N, F, H, W, 3]; .mp4: the first video; image "
        ".png/.jpg/.webp: the --num images side by side in one file, .npy: [N, H, W, 3])")
    d.add_argument("--diffusers", default=None, metavar="PATH",
                   help="a local diffusers pipeline folder (has model_index.json)")
    d.add_argument("--prompt", default=None, help="text prompt (required with --diffusers)")
    d.add_argument("--image", default=None, metavar="PATH",
                   help="first frame for an image-to-video pipeline (WanImageToVideoPipeline)")
    d.add_argument("--negative-prompt", default=None)
    d.add_argument("--true-cfg-scale", type=_float(0.0), default=None, metavar="S",
                   help="true classifier-free guidance for the guidance-distilled FLUX.1 and "
                        "HunyuanVideo (S > 1: two transformer calls per step, against "
                        "--negative-prompt, default \" \"; their --guidance-scale stays the "
                        "distilled embedding); fused into one step with fmrt's scheduler")
    d.add_argument("--height", type=_int_at_least(1), default=None,
                   help="pixels (default: the pipeline's; Wan 480)")
    d.add_argument("--width", type=_int_at_least(1), default=None,
                   help="pixels (default: the pipeline's; Wan 832)")
    d.add_argument("--frames", type=_int_at_least(1), default=None,
                   help="video frames (Wan: 4k + 1; default: the pipeline's, Wan 81)")
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
                                   "(--couplings FILE [FILE ...]).")
    t.add_argument("--out-dir", default="runs/fmrt")
    t.add_argument("--data", default="shapes", help="'shapes' (built in) or a latents folder")
    t.add_argument("--couplings", nargs="+", default=None, metavar="FILE",
                   help="reflow couplings from fmrt reflow: one file, or several shards (fmrt "
                        "reflow runs with different --seed, e.g. one per core or GPU), trained "
                        "on as one set")
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
    t.add_argument("--steps", type=_int_at_least(1, MAX_TRAIN_STEPS), default=1000)
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
    t.add_argument("--timestep-sampler", default=None,
                   choices=("uniform_index", "uniform", "logit_normal", "mode", "cosmap"),
                   help="training times (default: uniform_index; with --objective meanflow, "
                        "which takes logit_normal or uniform for its two times t, r: "
                        "logit_normal)")
    t.add_argument("--logit-mean", type=_float(), default=None,
                   help="logit_normal's mean (default 0; with --objective meanflow -0.4)")
    t.add_argument("--logit-std", type=_float(0.0, lo_open=True), default=1.0)
    t.add_argument("--weighting", default="table",
                   choices=("table", "sigma_sqrt", "cosmap", "none"))
    t.add_argument("--huber-c", type=_float(0.0, lo_open=True), default=None, metavar="C",
                   help="SFT / reflow: the pseudo-Huber loss sqrt(mse + C^2) - C per sample "
                        "instead of the MSE (iCT, Lee et al. 2024 for reflow; their constant "
                        "is C = 0.00054 on this per-element scale)")
    t.add_argument("--sigma-points", type=_float(0.0, 1.0, lo_open=True), nargs="+",
                   default=None, metavar="S",
                   help="SFT / reflow: also train at exactly these sigmas (with probability "
                        "--sigma-points-prob per sample, each point equally likely; the rest "
                        "from --timestep-sampler), e.g. the sigmas a few-step sampler visits: "
                        "1 0.5 for 1- and 2-step Euler at shift 1")
    t.add_argument("--sigma-points-prob", type=_float(0.0, 1.0, lo_open=True), default=None,
                   metavar="P", help="share of samples drawn from --sigma-points (default 0.5)")
    t.add_argument("--cond-drop", type=_float(0.0, 1.0, hi_open=True), default=0.1,
                   help="label dropout for classifier-free guidance")
    t.add_argument("--cfg-omega", type=_float(), default=1.0,
                   help="MeanFlow: guidance scale folded into training (1 = none)")
    t.add_argument("--cfg-kappa", type=_float(), default=0.0,
                   help="MeanFlow: improved-CFG mixing of the conditional branch")
    t.add_argument("--meanflow-ratio", type=_float(0.0, 1.0), default=0.25,
                   help="MeanFlow: share of samples with r != t (the rest learn u(z, t, t) = v)")
    t.add_argument("--teacher", default=None, metavar="MODEL",
                   help="distil this flow-matching model (fmrt.distill): its guided velocity "
                        "at the data's noisy points replaces noise - x0, as the target's "
                        "tangent with --objective meanflow (the student learns the flow map of "
                        "the teacher's sampling ODE) or as the target itself with sft (guidance "
                        "distillation: the student needs no guidance at sampling). Usually with "
                        "--init MODEL too; the recorded sampling guidance defaults to 1: the "
                        "guidance is folded in")
    t.add_argument("--teacher-guidance", type=_float(0.0), default=None, metavar="S",
                   help="the teacher's CFG scale, or with --teacher-guide-model its "
                        "autoguidance scale (default: the CFG scale its file records)")
    _add_interval_arg(t, "--teacher-guidance-interval",
                      help="guide the teacher only where LO <= sigma <= HI (default: the interval "
                        "its file records, if any; 0 1 guides everywhere)")
    t.add_argument("--teacher-guide-model", default=None, metavar="MODEL",
                   help="autoguide the teacher instead of CFG: g + S (v - g), g this weaker "
                        "model's velocity for the same classes (as fmrt sample --guide-model; "
                        "needs --teacher-guidance S and --cond-drop 0)")
    t.add_argument("--lora-rank", type=_int_at_least(0), default=0, help="0 = full training")
    t.add_argument("--lora-alpha", type=_float(0.0, lo_open=True), default=None)
    t.add_argument("--checkpoint-every", type=_int_at_least(0), default=0)
    t.add_argument("--keep-checkpoints", type=_int_at_least(0), default=2)
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue the run: from PATH, or (no value) from the latest checkpoint "
                        "in --out-dir (refused when there is none, or when a setting that "
                        "changes the training math differs from the checkpoint's)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out-dir (its checkpoints, metrics.jsonl "
                        "and model are removed before the first step); without it or --resume "
                        "such a folder is refused")
    t.add_argument("--log-every", type=_int_at_least(1), default=10)
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--device", type=_device_name, default="auto")
    t.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"))
    t.add_argument("--fsdp", action="store_true", help="FSDP2 under torchrun (big models)")
    t.add_argument("--sp", type=_int_at_least(1), default=1,
                   help="sequence-parallel degree under torchrun (Ulysses; it must divide the "
                        "head count and the number of processes; data parallel across the rest)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--sample-steps", type=_int_at_least(1), default=20,
                   help="recorded in model.json: the steps fmrt sample uses by default")
    t.add_argument("--sample-guidance", type=_float(0.0), default=None,
                   help="recorded in model.json: the guidance fmrt sample uses by default "
                        "(default 3; 1 with --teacher, --couplings or --cfg-omega / "
                        "--cfg-kappa, whose guidance is folded into the weights)")
    t.set_defaults(func=cmd_train)

    # -- eval ---------------------------------------------------------------------------------
    e = sub.add_parser("eval", help="quality of generated clips (classifier accuracy, FD)",
                       description="Generate clips of every class and report the accuracy of "
                                   "fmrt's clip classifier on them and the Frechet distance to "
                                   "real clips in its feature space.")
    _add_sampling_args(e, several_seeds=True)
    _add_policy_args(e)
    _add_guide_arg(e)
    e.add_argument("--steps", type=_int_at_least(1, MAX_SAMPLING_STEPS), nargs="+",
                   default=[1, 2, 4, 8, 50])
    e.add_argument("--guidance-scale", type=_float(0.0), nargs="+", default=None,
                   help="guidance scales to try (default: 1 and the checkpoint's recommended)")
    e.add_argument("--num-per-class", type=_int_at_least(2, MAX_EVAL_PER_CLASS), default=32)
    e.add_argument("--reference-per-class", type=_int_at_least(2, 4 * MAX_EVAL_PER_CLASS),
                   default=None,
                   help="real clips per class the FD compares with (default: as many as "
                        "--num-per-class, the same set at every seed). Near the floor a "
                        "small reference's own draw can move the ratio of two models' FDs by "
                        "tens of percent (docs/fd_large_n.py): compare models against a large "
                        "one, e.g. 1280")
    e.add_argument("--classifier", default=None, help="classifier weights (default: shipped)")
    e.add_argument("--json", default=None, help="also write the results as JSON (.json)")
    _add_batch_args(e, batch_default=256, what="clips")
    e.set_defaults(func=cmd_eval)

    # -- reflow -------------------------------------------------------------------------------
    r = sub.add_parser("reflow", help="generate (noise, sample) couplings for reflow training",
                       description="Sample the model from seeded noise and save the pairs as a "
                                   "safetensors dataset for `fmrt train --couplings`. With "
                                   "--no-progress a plain line per batch goes to stderr instead "
                                   "of the bar (for logs of long runs).")
    _add_sampling_args(r)
    r.add_argument("--steps", type=_int_at_least(1, MAX_SAMPLING_STEPS), default=50)
    r.add_argument("--guidance-scale", type=_float(0.0), default=None)
    _add_interval_arg(r, help="guidance only where LO <= sigma <= HI (default: the interval the "
                              "model file records, if any; 0 1 guides every step)")
    r.add_argument("--num", type=_int_at_least(1, MAX_REFLOW_NUM), default=1024)
    r.add_argument("--class", dest="label", type=_class_label, default=None,
                   help="only this class (default: cycle through the classes)")
    r.add_argument("--out", default="couplings.safetensors",
                   help="couplings file to write (.safetensors; an existing one only with "
                        "--overwrite)")
    _add_batch_args(r, batch_default=64, what="couplings")
    r.set_defaults(func=cmd_reflow)

    # -- export -------------------------------------------------------------------------------
    x = sub.add_parser("export", help="write a model file with other sampling defaults, or "
                                      "the weight average of several models",
                       description="Write the model of --checkpoint (an exported model, or a "
                                   "training checkpoint: its EMA weights, LoRA merged) as a new "
                                   "model file (.safetensors + .json) whose recorded sampling "
                                   "defaults (what fmrt sample and fmrt eval use when their "
                                   "flags are not given) are changed by the flags below; the "
                                   "weights are unchanged. Given several, it writes their "
                                   "weight average (stochastic weight averaging across the "
                                   "ends of learning-rate cycles, a model soup: for models "
                                   "fine-tuned from one another, with one architecture) with "
                                   "the first one's sampling defaults, and records the sources "
                                   "in the .json. It never replaces a model file.")
    x.add_argument("--checkpoint", required=True, nargs="+", metavar="MODEL",
                   help="model or training checkpoint to read; several: average them")
    x.add_argument("--weights", type=_float(0.0, lo_open=True), nargs="+", default=None,
                   metavar="W", help="with several --checkpoint: one positive weight each, "
                                     "scaled to sum to 1 (default: equal)")
    x.add_argument("--out", required=True, help="model file to write (.safetensors)")
    x.add_argument("--steps", type=_int_at_least(1, MAX_SAMPLING_STEPS), default=None)
    x.add_argument("--guidance-scale", type=_float(0.0), default=None)
    x.add_argument("--shift", type=_float(0.0, lo_open=True), default=None)
    gi = x.add_mutually_exclusive_group()
    _add_interval_arg(gi)
    gi.add_argument("--no-guidance-interval", action="store_true",
                    help="remove the recorded interval: guidance at every step")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is not an fmrt model")
    x.set_defaults(func=cmd_export)
    return p


# ---------------------------------------------------------------------------------------------
# checks before any work: flags that go together, inputs, outputs (no torch)
# ---------------------------------------------------------------------------------------------

def prepare_sample(args: argparse.Namespace) -> None:
    if args.diffusers is not None:
        return prepare_sample_diffusers(args)
    for flag, given in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                        ("--true-cfg-scale", args.true_cfg_scale is not None),
                        ("--image", args.image), ("--no-accelerate", args.no_accelerate)):
        if given:
            raise CLIError(f"{flag} applies to --diffusers PATH only")
    args.num = args.num or 12
    if args.gif == "":
        args.gif = os.path.splitext(args.out)[0] + ".gif"
    outputs = [Output("--out", args.out, CLIP_SUFFIXES)]
    if args.gif is not None:
        outputs.append(Output("--gif", args.gif, (".gif",)))
    if args.diagnostics:
        outputs.append(Output("--diagnostics", args.diagnostics, (".png",)))
        _needs_module("matplotlib", "--diagnostics", "plot")
    _check_outputs(_checkpoint_inputs(args.checkpoint), outputs, args.overwrite)
    if args.out.lower().endswith(".mp4"):
        _needs_module("imageio_ffmpeg", "writing .mp4", "video")


def prepare_sample_diffusers(args: argparse.Namespace) -> None:
    for flag, given in (("--checkpoint", args.checkpoint != DEFAULT_CHECKPOINT),
                        ("--solver", args.solver not in (None, "euler")),
                        ("--class", args.label is not None),
                        ("--gif", args.gif is not None), ("--diagnostics", args.diagnostics)):
        if given:
            raise CLIError(f"{flag} does not apply to --diffusers (the pipeline's own model and "
                           f"Euler / scheduler loop run)")
    if not args.prompt:
        raise CLIError("--diffusers needs --prompt")
    if args.no_accelerate and any(v is not None for v in (args.guidance_reuse,
                                                          args.guidance_interval, args.cache)):
        raise CLIError("--guidance-reuse / --guidance-interval / --cache need fmrt's "
                       "acceleration: drop --no-accelerate")
    if not os.path.isfile(os.path.join(args.diffusers, "model_index.json")):
        raise CLIError(f"{args.diffusers}: not a diffusers pipeline folder (no model_index.json)")
    inputs = []
    if args.image is not None:
        _check_input("--image", args.image, "image")
        inputs.append(("--image", args.image))
    _check_outputs(inputs, [Output("--out", args.out, CLIP_SUFFIXES)], args.overwrite)
    if args.out.lower().endswith(".mp4"):
        _needs_module("imageio_ffmpeg", "writing .mp4", "video")


def prepare_eval(args: argparse.Namespace) -> None:
    inputs = _checkpoint_inputs(args.checkpoint)
    if args.classifier is not None:
        _check_input("--classifier", args.classifier, "classifier")
        inputs.append(("--classifier", args.classifier))
    outputs = [Output("--json", args.json, (".json",))] if args.json else []
    _check_outputs(inputs, outputs, args.overwrite)


def prepare_reflow(args: argparse.Namespace) -> None:
    if args.guidance_interval is not None:
        _interval_flag(args.guidance_interval)
    _check_outputs(_checkpoint_inputs(args.checkpoint),
                   [Output("--out", args.out, (".safetensors",), replace_own=False)],
                   args.overwrite)


def prepare_train(args: argparse.Namespace) -> None:
    if args.lora_rank and not args.init and not args.resume:
        raise CLIError("--lora-rank trains adapters on a pretrained model: give its weights "
                       "with --init MODEL")
    iv = args.teacher_guidance_interval
    if iv is not None:
        _interval_flag(iv, "--teacher-guidance-interval")
    if args.teacher is None:
        if args.teacher_guidance is not None or iv is not None or \
                args.teacher_guide_model is not None:
            raise CLIError("--teacher-guidance / --teacher-guidance-interval / "
                           "--teacher-guide-model need --teacher")
        return
    for flag, path in (("--teacher", args.teacher),
                       ("--teacher-guide-model", args.teacher_guide_model)):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{flag} {path}: no such model file")
    if args.teacher_guide_model is not None:
        if args.teacher_guidance is None:
            raise CLIError("--teacher-guide-model autoguides the teacher: give its scale with "
                           "--teacher-guidance S")
        if args.cond_drop != 0.0:
            raise CLIError("--teacher-guide-model: an autoguided teacher has no unconditional "
                           "branch to distil; add --cond-drop 0")


def prepare_export(args: argparse.Namespace) -> None:
    if args.guidance_interval is not None:
        _interval_flag(args.guidance_interval)
    if not args.out.endswith(".safetensors"):
        raise CLIError(f"--out {args.out}: a model file ends with .safetensors")
    if args.weights is not None and len(args.checkpoint) == 1:
        raise CLIError("--weights weights an average: give several --checkpoint models")
    # the weight count and a model given twice: average_models' own checks, before any load
    _check_outputs([i for path in args.checkpoint for i in _checkpoint_inputs(path)],
                   [Output("--out", args.out, (".safetensors",), replace_own=False),
                    Output("--out's metadata", args.out[:-len(".safetensors")] + ".json",
                           (".json",), replace_own=False)],
                   args.overwrite)


PREPARE = {"sample": prepare_sample, "eval": prepare_eval, "reflow": prepare_reflow,
           "train": prepare_train, "export": prepare_export}


# ---------------------------------------------------------------------------------------------
# writers: the format the extension names, to a temporary name, then renamed; marked as fmrt's
# ---------------------------------------------------------------------------------------------

def _frames_uint8(clips):
    """Clips `[N, 3, T, H, W]` in [-1, 1] -> uint8 `[N, T, H, W, 3]` (numpy)."""
    x = ((clips.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def _tile(frames, *, scale: int, cols: int, gap: int = 2, multiple: int = 1):
    """uint8 `[N, T, H, W, 3]` -> T PIL images, the N clips tiled `cols` per row, each frame
    upscaled `scale` times; sizes padded to a multiple of `multiple` (video codecs)."""
    from PIL import Image
    N, T, H, W, _ = frames.shape
    cols = min(cols, N)
    rows = (N + cols - 1) // cols
    cw, ch = W * scale, H * scale
    size = [cols * (cw + gap) + gap, rows * (ch + gap) + gap]
    size = [-(-v // multiple) * multiple for v in size]
    out = []
    for f in range(T):
        img = Image.new("RGB", tuple(size), (48, 48, 48))
        for n in range(N):
            r, c = divmod(n, cols)
            fr = Image.fromarray(frames[n, f], "RGB").resize((cw, ch), Image.NEAREST)
            img.paste(fr, (gap + c * (cw + gap), gap + r * (ch + gap)))
        out.append(img)
    return out


def _grid(frames, names: Sequence[str], *, scale: int):
    """uint8 `[N, T, H, W, 3]` -> one image: a row per clip (`names[n]` on the left, if any), a
    column per frame."""
    from PIL import Image, ImageDraw
    N, T, H, W, _ = frames.shape
    gap, left = 2, (100 if any(names) else 0)
    cw, ch = W * scale, H * scale
    img = Image.new("RGB", (left + T * (cw + gap), N * (ch + gap) + gap), (48, 48, 48))
    draw = ImageDraw.Draw(img)
    for n in range(N):
        y0 = gap + n * (ch + gap)
        if left:
            draw.text((4, y0 + ch // 2 - 5), names[n], fill=(220, 220, 220))
        for f in range(T):
            fr = Image.fromarray(frames[n, f], "RGB").resize((cw, ch), Image.NEAREST)
            img.paste(fr, (left + f * (cw + gap), y0))
    return img


def _replace(path: str, write) -> None:
    """write(tmp) then rename over `path`; the temporary file never outlives a failure."""
    base, suffix = os.path.splitext(path)
    tmp = f"{base}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_image(img, path: str, fmt: str) -> None:
    """One image in `fmt`, marked as fmrt's (PNG text, EXIF Software for JPEG and WebP)."""
    from PIL import Image, PngImagePlugin
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", MARK)
        kw = dict(pnginfo=info)
    else:
        exif = Image.Exif()
        exif[0x0131] = MARK
        kw = dict(exif=exif.tobytes(), quality=95) if fmt == "JPEG" else \
            dict(exif=exif.tobytes(), lossless=True)
    _replace(path, lambda tmp: img.save(tmp, format=fmt, **kw))


def _save_gif(images, path: str, *, ms: int) -> None:
    _replace(path, lambda tmp: images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=ms, loop=0,
        comment=MARK))


def _save_mp4(images, path: str, *, fps: int) -> None:
    try:
        import imageio.v2 as imageio
        import numpy as np
    except ImportError as e:
        raise CLIError(f"writing .mp4 needs imageio: pip install \"fmrt[video]\" ({e})") from None

    def write(tmp):
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                macro_block_size=1) as w:
            for im in images:
                w.append_data(np.asarray(im))
    _replace(path, write)


def save_clips(clips, path: str, names: Sequence[str] = (), *, scale: int = 4,
               fps: int = 4) -> None:
    """Clips `[N, 3, T, H, W]` in [-1, 1] -> `path` in the format its extension names:
    .png/.jpg/.jpeg/.webp a grid (a row per clip, `names` on the left), .gif all clips tiled
    and animated, .mp4 the same as a video, .npy float32 frames `[N, T, H, W, 3]` in [0, 1]."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return _save_npy(((clips.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy(),
                         path)
    frames = _frames_uint8(clips)
    if suffix in IMAGE_FORMATS:
        _save_image(_grid(frames, list(names) or [""] * len(frames), scale=scale), path,
                    IMAGE_FORMATS[suffix])
    elif suffix == ".gif":
        _save_gif(_tile(frames, scale=scale, cols=6), path, ms=1000 // fps)
    elif suffix == ".mp4":
        _save_mp4(_tile(frames, scale=scale, cols=6, multiple=16), path, fps=fps)
    else:
        raise CLIError(f"{path}: unknown output format {suffix!r}; use {', '.join(CLIP_SUFFIXES)}")


def _save_npy(array, path: str) -> None:
    import numpy as np
    _replace(path, lambda tmp: np.save(tmp, np.asarray(array, dtype=np.float32)))


def save_video(frames, path: str, *, fps: int = 16) -> None:
    """Videos `[N, F, H, W, 3]` (numpy, [0, 1]) from a diffusers pipeline -> `.npy` as they
    are, `.mp4` the first video, any other clip format as `save_clips` writes it."""
    import numpy as np
    import torch
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return _save_npy(frames, path)
    clips = torch.from_numpy(np.asarray(frames, dtype=np.float32)).permute(0, 4, 1, 2, 3) * 2 - 1
    if suffix == ".mp4":
        return _save_mp4(_tile(_frames_uint8(clips[:1]), scale=1, cols=1, gap=0, multiple=2),
                         path, fps=fps)
    save_clips(clips, path, scale=max(1, 128 // max(clips.shape[-2:])), fps=fps)


def save_json(obj: dict, path: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"written_by": MARK, **obj}, f, indent=2)
    _replace(path, write)


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from fmrt._dispatch import requested_backend, triton_available
    print(f"fmrt {__version__}  torch {torch.__version__}  "
          f"triton {'yes' if triton_available() else 'no'}  "
          f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}  "
          f"FMRT_BACKEND={requested_backend()}")
    return 0


def _device(name: str):
    from fmrt._dispatch import resolve_device
    return resolve_device(name)


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load(args, policies: Optional[dict] = None):
    """(model, meta, device) of --checkpoint; --solver, when not given, resolved to the
    model's own sampler (meanflow for a MeanFlow model, else euler) and checked against
    `policies`."""
    from fmrt.checkpoint import load_model
    device = _device(args.device)
    model, meta = load_model(args.checkpoint, device=device, dtype=_dtype(args.dtype))
    if model.config.num_classes is None:
        raise CLIError(f"{args.checkpoint}: not a class-conditional model; fmrt sample/eval "
                       f"need one (use fmrt.sampling.sample from Python for others)")
    if args.solver is None:     # the model's own sampler: a MeanFlow model's is u(z, r, t)
        args.solver = "meanflow" if model.config.meanflow else "euler"
        if args.solver == "meanflow":                   # (euler takes every policy)
            _check_solver_policies(args.solver, policies or {},
                                   f" ({args.checkpoint} is a MeanFlow model, sampled with "
                                   f"--solver meanflow by default: pass --solver euler to use "
                                   f"it)")
    return model, meta, device


def _labels(args, num_classes: int, n: int):
    import torch
    if args.label is not None:
        if not 0 <= args.label < num_classes:
            raise CLIError(f"--class must be in [0, {num_classes}), got {args.label}")
        return torch.full((n,), args.label, dtype=torch.long)
    return torch.arange(n) % num_classes


def class_names(labels) -> list[str]:
    return [CLASS_NAMES[int(v)] if 0 <= int(v) < len(CLASS_NAMES) else str(int(v)) for v in labels]


def _sample_shape(meta: dict, path: str) -> tuple[int, ...]:
    shape = tuple((meta.get("sample") or {}).get("sample_shape") or ())
    if len(shape) != 4:
        raise CLIError(f"{path}: the checkpoint has no sample_shape: cannot tell the clip size")
    return shape


def _batch_seed(seed: int, k: int) -> int:
    """The seed of batch k's step noise (euler_maruyama): batch 0 keeps --seed."""
    return (seed + k * 0x9E3779B97F4A7C15) % (SEED_MAX + 1)


def generate_batched(model, meta: dict, labels, *, seed: int, batch_size: int, progress: bool,
                     desc: str, recorder=None, **kw):
    """`generate_clips` over batches of `batch_size` clips, a progress bar over the batches.
    The noise of all clips is drawn first, as one call draws it (clip i: the i-th draw of one
    generator seeded with `seed`), so every batch size gives the same clips with the ODE
    solvers, up to the float rounding of the model's batched kernels; euler_maruyama's step
    noise is seeded per batch (batch 0: `seed`). `recorder` sees the first batch only.
    Returns float32 `[N, C, T, H, W]` (CPU)."""
    import torch
    from tqdm.auto import tqdm

    from fmrt.sampling import generate_clips
    shape = _sample_shape(meta, "checkpoint")
    noise = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(seed))
    starts = range(0, len(labels), batch_size)
    out = []
    for k, i in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False,
                               disable=True if not progress else None)):
        x = generate_clips(model, meta, labels[i:i + batch_size], seed=_batch_seed(seed, k),
                           noise=noise[i:i + batch_size], recorder=recorder if k == 0 else None,
                           **kw)
        out.append(x.cpu())
    return torch.cat(out)


def cmd_sample(args: argparse.Namespace) -> int:
    if args.diffusers is not None:
        if args.guide_model is not None:
            raise CLIError("--guide-model guides fmrt's own DiT; diffusers' AutoGuidance "
                           "guider is its own")
        if args.sp > 1:
            raise CLIError("--sp runs fmrt's own DiT; with --diffusers use diffusers' "
                           "ContextParallelConfig (see the README)")
        return sample_diffusers(args)
    policies = _policies(args)      # bad settings fail before any model loads
    t0 = time.time()
    if args.device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        import torch
        torch.set_num_threads(sample_threads())   # small tensors: see --help
    if args.sp > 1:
        if args.guide_model is not None:
            raise CLIError("--guide-model does not run with --sp")
        if args.diagnostics:
            raise CLIError("--diagnostics records per-sample statistics: it does not run with "
                           "--sp (sample without --sp to plot them)")
        _sp_setup(args)
    model, meta, device = _load(args, policies)
    if args.sp > 1:
        import torch.distributed as dist

        from fmrt import parallel
        mesh = parallel.make_mesh(args.sp, device.type)
        sp = parallel.enable_sequence_parallel(model, mesh["sp"].get_group(), sharded_io=True)
        try:   # every step on this rank's shard of the latent; the clips gathered at the end
            return _sample_clips(args, model, meta, device, t0,
                                 dict(policies, sequence_parallel=sp), main=dist.get_rank() == 0)
        finally:
            dist.destroy_process_group()
    return _sample_clips(args, model, meta, device, t0, policies)


def _sp_setup(args: argparse.Namespace) -> None:
    """`fmrt sample --sp N` under torchrun: exactly N processes, one device each."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.sp:
        raise CLIError(f"--sp {args.sp} runs one model over {args.sp} processes: launch with "
                       f"torchrun --nproc-per-node {args.sp} (this is {world} process(es))")
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")


def _sample_clips(args, model, meta, device, t0, policies: dict, main: bool = True) -> int:
    import torch
    from fmrt.sampling import recorded_guidance
    rec = meta.get("sample", {}) or {}
    steps = args.steps or int(rec.get("steps") or 20)
    scale = args.guidance_scale if args.guidance_scale is not None else recorded_guidance(meta)
    if args.solver == "meanflow" and not model.config.meanflow:
        raise CLIError("--solver meanflow needs a MeanFlow model")
    labels = _labels(args, model.config.num_classes, args.num)
    guide = _load_guide(args, model, device, [scale])
    recorder = None
    if args.diagnostics:
        if scale == 1.0:
            raise CLIError("--diagnostics records classifier-free guidance: use a "
                           "--guidance-scale other than 1")
        from fmrt.sampling import DiagnosticsRecorder
        recorder = DiagnosticsRecorder()
    with torch.no_grad():
        clips = generate_batched(model, meta, labels, seed=args.seed, batch_size=args.batch_size,
                                 progress=not args.no_progress, desc="fmrt sample",
                                 recorder=recorder, steps=steps, solver=args.solver,
                                 guidance_scale=scale, shift=args.shift, device=device,
                                 dtype=_dtype(args.dtype), guide_model=guide, **policies)
    if not main:        # sequence-parallel ranks > 0 gathered the same clips
        return 0
    save_clips(clips, args.out, class_names(labels))
    written = [args.out]
    if args.gif:
        save_clips(clips, args.gif)
        written.append(args.gif)
    if recorder is not None:
        _save_diagnostics(recorder, args.diagnostics)
        written.append(args.diagnostics)
    print(f"wrote {', '.join(written)}  ({args.num} clips {tuple(clips.shape[1:])}, "
          f"{args.solver} {steps} steps, guidance {scale:g}{_interval_note(scale, policies, meta)}"
          f"{f' away from {args.guide_model}' if guide is not None else ''}"
          f", seed {args.seed}, "
          f"{f'{torch.get_num_threads()} CPU threads, ' if device.type == 'cpu' else ''}"
          f"{time.time() - t0:.1f}s)")
    return 0


def _guidance_interval(scale: float, policies: dict, meta: dict):
    """The guidance interval a run uses: --guidance-interval, else the model's recorded one."""
    from fmrt.sampling import recorded_interval
    if scale == 1.0:
        return None
    return policies.get("guidance_interval") or recorded_interval(meta)


def _interval_note(scale: float, policies: dict, meta: dict) -> str:
    iv = _guidance_interval(scale, policies, meta)
    return "" if iv is None or tuple(iv) == (0.0, 1.0) else \
        f" on sigma in [{iv[0]:g}, {iv[1]:g}]"


def _save_diagnostics(recorder, path: str) -> None:
    """Seed 000's CFG diagnostics plot (fmrt.sampling.plot_diagnostics), as a marked PNG."""
    import torch
    from PIL import Image

    from fmrt.sampling import plot_diagnostics
    first = [{k: (v[:1] if isinstance(v, torch.Tensor) and v.ndim >= 1 else v)
              for k, v in r.items()} for r in recorder.records]

    tmp = f"{os.path.splitext(path)[0]}.plot{os.getpid()}.png"
    try:
        plot_diagnostics(first, tmp)
        with Image.open(tmp) as im:
            im.load()
            _save_image(im, path, "PNG")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sample_diffusers(args: argparse.Namespace) -> int:
    """`fmrt sample --diffusers PATH`: a local diffusers pipeline, accelerated by fmrt: video
    (Wan, Wan2.2, SkyReels-V2, HunyuanVideo, LTX-Video: the call takes num_frames) or image
    (FLUX.1, Qwen-Image)."""
    import torch
    policies = _policies(args)
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
    call = _diffusers_call(pipe, args)   # every flag checked before any work
    what = ["stock diffusers"]
    if not args.no_accelerate:
        from fmrt.integrations.diffusers import (FlowMatchEulerDiscreteScheduler, accelerate,
                                                 accelerate_wan)
        # the evaluation policies drive WanPipeline's two calls per step (accelerate_wan);
        # without them every supported family goes through accelerate
        n = (accelerate_wan(pipe, backend=args.attention_backend, **policies) if policies
             else accelerate(pipe, backend=args.attention_backend))
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
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    run = pipe
    if "fmrt Euler scheduler" in what and _qwen_true_cfg(pipe, call.kwargs):
        # Qwen-Image's combine + norm rescale + step as one step_cfg (its own loop cannot)
        import functools
        from fmrt.integrations.diffusers import qwen_image_true_cfg_loop
        run = functools.partial(qwen_image_true_cfg_loop, pipe)
        what.append("fused true-CFG step")
    elif "fmrt Euler scheduler" in what and _ltx_cfg(pipe, call.kwargs):
        # LTX-Video's batched CFG combine + step as one step_cfg (its own loop cannot)
        import functools
        from fmrt.integrations.diffusers import ltx_cfg_loop
        run = functools.partial(ltx_cfg_loop, pipe)
        what.append("fused CFG step")
    elif "fmrt Euler scheduler" in what and _distilled_true_cfg(pipe, call.kwargs):
        # FLUX.1 / HunyuanVideo's optional true CFG combine + step as one step_cfg
        import functools
        from fmrt.integrations import diffusers as integ
        loop = (integ.flux_true_cfg_loop if _distilled_true_cfg(pipe, call.kwargs) == "flux"
                else integ.hunyuan_video_true_cfg_loop)
        run = functools.partial(loop, pipe)
        what.append("fused true-CFG step")
    out = run(prompt=args.prompt, generator=gen, output_type="np", **call.kwargs)
    if call.video:
        result = out.frames  # [N, F, H, W, 3] in [0, 1]
        save_video(result, args.out)
    else:
        result = out.images  # [N, H, W, 3] in [0, 1]
        save_images(result, args.out)
    print(f"wrote {args.out}  ({tuple(result.shape)} {'frames' if call.video else 'images'}, "
          f"{', '.join(what)}, {call.steps} steps, {call.guidance}, seed {args.seed}, "
          f"{time.time() - t0:.1f}s)")
    return 0


def _qwen_true_cfg(pipe, kwargs: dict) -> bool:
    """Does this call of a (stock) QwenImagePipeline run true CFG?"""
    try:
        from diffusers import QwenImagePipeline
    except ImportError:
        return False
    return (type(pipe) is QwenImagePipeline and kwargs.get("true_cfg_scale", 0) > 1
            and kwargs.get("negative_prompt") is not None
            and not pipe.transformer.config.guidance_embeds)


def _ltx_cfg(pipe, kwargs: dict) -> bool:
    """Does this call of a (stock) LTXPipeline run CFG (that `ltx_cfg_loop` fuses)?"""
    try:
        from diffusers import LTXPipeline
    except ImportError:
        return False
    return (type(pipe) is LTXPipeline and kwargs.get("guidance_scale", 0) > 1
            and not kwargs.get("guidance_rescale", 0))


def _distilled_true_cfg(pipe, kwargs: dict) -> Optional[str]:
    """"flux" / "hunyuan" when this call of a (stock) FluxPipeline / HunyuanVideoPipeline runs
    its optional true CFG (that `flux_true_cfg_loop` / `hunyuan_video_true_cfg_loop` fuse)."""
    if not (kwargs.get("true_cfg_scale", 0) > 1 and kwargs.get("negative_prompt") is not None):
        return None
    try:
        from diffusers import FluxPipeline, HunyuanVideoPipeline
    except ImportError:
        return None
    return {FluxPipeline: "flux", HunyuanVideoPipeline: "hunyuan"}.get(type(pipe))


class _DiffusersCall(NamedTuple):
    video: bool
    kwargs: dict
    steps: int
    guidance: str


def _diffusers_call(pipe, args: argparse.Namespace) -> _DiffusersCall:
    """The pipeline call's keyword arguments from the flags, by what its `__call__` takes:
    video pipelines take num_frames; image pipelines whose true_cfg_scale defaults above 1
    (Qwen-Image) take --guidance-scale as true_cfg_scale, the others (FLUX.1) as
    guidance_scale. Unset flags keep the pipeline's defaults. CLIError for a flag the
    pipeline has no use for."""
    import inspect
    params = inspect.signature(pipe.__call__).parameters
    name = type(pipe).__name__
    video = "num_frames" in params
    num = "num_videos_per_prompt" if video else "num_images_per_prompt"
    if num not in params:
        raise CLIError(f"--diffusers samples video pipelines (Wan, Wan2.2, SkyReels-V2, "
                       f"HunyuanVideo, LTX-Video) and image pipelines (FLUX.1, Qwen-Image); "
                       f"{name} takes neither num_frames nor num_images_per_prompt")
    steps = args.steps or params["num_inference_steps"].default
    kw = {"num_inference_steps": steps}
    for flag, key, value in (("--height", "height", args.height),
                             ("--width", "width", args.width),
                             ("--frames", "num_frames", args.frames)):
        if value is not None:
            if key not in params:
                raise CLIError(f"{flag}: {name} takes no {key} (an image pipeline)")
            kw[key] = value
    kw[num] = args.num or 1
    suffix = os.path.splitext(args.out)[1].lower()
    if not video and suffix not in (*IMAGE_FORMATS, ".npy"):
        raise CLIError(f"--out: {name} makes images: write {', '.join(IMAGE_FORMATS)} or .npy, "
                       f"not {suffix}")
    true_cfg = params.get("true_cfg_scale")
    extra_cfg = args.true_cfg_scale
    if extra_cfg is not None and true_cfg is None:
        raise CLIError(f"--true-cfg-scale: {name} takes no true_cfg_scale (FLUX.1 and "
                       f"HunyuanVideo do)")
    if not video and true_cfg is not None and (true_cfg.default or 0) > 1:
        # Qwen-Image: true CFG with a negative prompt ("" -> " ", as its model card does)
        if extra_cfg is not None:
            raise CLIError(f"--true-cfg-scale: {name}'s true CFG scale is --guidance-scale")
        scale = true_cfg.default if args.guidance_scale is None else args.guidance_scale
        kw.update(true_cfg_scale=scale, negative_prompt=args.negative_prompt or " ")
        guidance = f"true CFG {scale:g}"
    elif extra_cfg is not None and extra_cfg > 1:
        # FLUX.1 / HunyuanVideo: true CFG on top of the distilled guidance embedding
        scale = (params["guidance_scale"].default if args.guidance_scale is None
                 else args.guidance_scale)
        kw.update(guidance_scale=scale, true_cfg_scale=extra_cfg,
                  negative_prompt=args.negative_prompt or " ")
        guidance = f"guidance {scale:g}, true CFG {extra_cfg:g}"
    else:
        if "guidance_scale" not in params:
            raise CLIError(f"--guidance-scale: {name} takes no guidance_scale")
        scale = (params["guidance_scale"].default if args.guidance_scale is None
                 else args.guidance_scale)
        kw["guidance_scale"] = scale
        guidance = f"guidance {scale:g}"
        if extra_cfg is not None:   # <= 1: true CFG off, as the pipeline takes it
            kw["true_cfg_scale"] = extra_cfg
        if args.negative_prompt is not None:
            if video:
                kw["negative_prompt"] = args.negative_prompt
            else:  # FLUX.1: guidance_scale is the distilled embedding, no negative prompt
                raise CLIError(f"--negative-prompt: {name}'s --guidance-scale is its distilled "
                               f"guidance embedding, which takes no negative prompt (true CFG "
                               f"against one: --true-cfg-scale S > 1)")
    kw.update(_pipeline_image(pipe, args.image))
    return _DiffusersCall(video, kw, steps, guidance)


def save_images(images, path: str) -> None:
    """Images `[N, H, W, 3]` (numpy, [0, 1]) from a diffusers pipeline -> `.npy` as they are;
    .png/.jpg/.jpeg/.webp: the N images side by side (2 pixel gaps), full size."""
    import numpy as np
    from PIL import Image
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return _save_npy(images, path)
    x = (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    N, H, W, _ = x.shape
    gap = 2 if N > 1 else 0
    img = Image.new("RGB", (N * W + (N - 1) * gap, H), (48, 48, 48))
    for n in range(N):
        img.paste(Image.fromarray(x[n], "RGB"), (n * (W + gap), 0))
    _save_image(img, path, IMAGE_FORMATS[suffix])


def _pipeline_image(pipe, path: Optional[str]) -> dict:
    """{"image": PIL image} for a pipeline whose call takes one, {} otherwise; CLIError when
    --image and the pipeline disagree."""
    import inspect
    param = inspect.signature(pipe.__call__).parameters.get("image")
    name = type(pipe).__name__
    if param is None:
        if path is not None:
            raise CLIError(f"--image: {name} takes no image (a text-to-video or text-to-image "
                           f"pipeline)")
        return {}
    if path is None:
        if param.default is inspect.Parameter.empty:
            raise CLIError(f"{name} is image-to-video: give the first frame with --image PATH")
        return {}
    from PIL import Image
    with Image.open(path) as im:
        return {"image": im.convert("RGB")}


def _resume_command(args: argparse.Namespace) -> str:
    """The `fmrt train` command line that continues this run: its flags that differ from the
    defaults, with --resume (and never --overwrite)."""
    import shlex
    defaults = vars(build_parser().parse_args(["train"]))
    argv = ["fmrt", "train", "--out-dir", args.out_dir]
    for k, v in vars(args).items():
        if k in ("command", "func", "out_dir", "resume", "overwrite") or v == defaults.get(k):
            continue
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, *map(str, v)] if isinstance(v, (list, tuple)) \
            else [flag, str(v)]
    return shlex.join(argv + ["--resume"])


def cmd_train(args: argparse.Namespace) -> int:
    from fmrt.train import TrainConfig, TrainingInterrupted, train
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
        logit_std=args.logit_std, weighting=args.weighting, huber_c=args.huber_c,
        sigma_points=None if args.sigma_points is None else tuple(args.sigma_points),
        sigma_points_prob=(args.sigma_points_prob if args.sigma_points_prob is not None
                           else 0.5 if args.sigma_points else 0.0),
        cond_drop=args.cond_drop,
        cfg_omega=args.cfg_omega, cfg_kappa=args.cfg_kappa, meanflow_ratio=args.meanflow_ratio,
        teacher=args.teacher, teacher_guidance=args.teacher_guidance,
        teacher_guide=args.teacher_guide_model,
        teacher_guidance_interval=None if args.teacher_guidance_interval is None
        else tuple(args.teacher_guidance_interval),
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume, overwrite=args.overwrite, log_every=args.log_every,
        seed=args.seed, device=args.device,
        mixed_precision=args.mixed_precision, fsdp=args.fsdp, sp=args.sp,
        gradient_checkpointing=args.gradient_checkpointing, progress=not args.no_progress,
        sample_steps=args.sample_steps, sample_guidance=args.sample_guidance)
    try:
        out = train(cfg)
    except TrainingInterrupted as e:    # Ctrl-C / SIGTERM: the state of this step is saved
        import signal
        what = f"fmrt train: {signal.Signals(e.signum).name} at step {e.step}"
        if e.checkpoint:
            print(f"{what}: checkpoint {e.checkpoint}\nresume with: {_resume_command(args)}",
                  file=sys.stderr)
        else:
            print(f"{what}: no step done, nothing saved", file=sys.stderr)
        return 128 + e.signum
    if out["model_path"]:
        print(f"trained {out['step']} steps in {out['seconds']:.0f}s, last loss "
              f"{out['loss']:.4f}; model: {out['model_path']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from fmrt.eval import (CLASSIFIER_PATH, evaluate_clips, load_classifier, over_seeds,
                           reference_features)
    if len(set(args.seed)) != len(args.seed):
        raise CLIError(f"--seed: give each seed once, got {' '.join(map(str, args.seed))}")
    policies = _policies(args)
    model, meta, device = _load(args, policies)
    clf, _ = load_classifier(args.classifier or CLASSIFIER_PATH)
    K = model.config.num_classes
    labels = torch.arange(K).repeat_interleave(args.num_per_class)
    scales = args.guidance_scale
    if scales is None:
        from fmrt.sampling import recorded_guidance
        rec = recorded_guidance(meta)
        scales = [1.0] if rec == 1.0 else [1.0, rec]
    guide = _load_guide(args, model, device, scales)
    seeds = args.seed
    several = len(seeds) > 1
    seed_col = f" {'seed':>6}" if several else ""
    rows = []
    print(f"{'solver':<8} {'steps':>5} {'cfg':>5}{seed_col} {'accuracy':>9} {'FD':>9} "
          f"{'seconds':>8}")
    # the floor: real clips (another data seed) scored the same way
    from fmrt.data import ShapesVideo
    shape = (meta.get("sample") or {}).get("sample_shape") or [3, 4, 16, 16]
    ds = ShapesVideo(10 ** 6, frames=shape[1], size=shape[2], seed=4242)
    real = torch.cat([ds.clips_of_class(c, args.num_per_class) for c in range(K)])
    ref_labels = labels if args.reference_per_class is None else \
        torch.arange(K).repeat_interleave(args.reference_per_class)
    ref = reference_features(clf, ref_labels, frames=shape[1], size=shape[2])  # once, every row
    q = evaluate_clips(real, labels, classifier=clf, real_features=ref)
    rows.append(dict(solver="real data", steps=0, guidance_scale=0.0, seconds=0.0, **q))
    dash = f" {'-':>6}" if several else ""
    print(f"{'real':<8} {'-':>5} {'-':>5}{dash} {q['accuracy']:>9.3f} {q['fd']:>9.3f} {'-':>8}")
    for scale in scales:
        for steps in args.steps:
            for seed in seeds:
                t0 = time.time()
                with torch.no_grad():
                    clips = generate_batched(
                        model, meta, labels, seed=seed, batch_size=args.batch_size,
                        progress=not args.no_progress, desc=f"{args.solver} {steps} steps cfg "
                        f"{scale:g}" + (f" seed {seed}" if several else ""), steps=steps,
                        solver=args.solver, guidance_scale=scale, shift=args.shift,
                        device=device, dtype=_dtype(args.dtype), guide_model=guide, **policies)
                dt = time.time() - t0
                q = evaluate_clips(clips, labels, classifier=clf, real_features=ref)
                iv = _guidance_interval(scale, policies, meta)
                rows.append(dict(solver=args.solver, steps=steps, guidance_scale=scale,
                                 guidance_interval=None if iv is None else list(iv),
                                 guide_model=args.guide_model if scale != 1.0 else None,
                                 seed=seed, seconds=dt, **q))
                col = f" {seed:>6}" if several else ""
                print(f"{args.solver:<8} {steps:>5} {scale:>5g}{col} {q['accuracy']:>9.3f} "
                      f"{q['fd']:>9.3f} {dt:>8.1f}{_interval_note(scale, policies, meta)}",
                      flush=True)
    over = over_seeds(rows[1:])
    if several:
        print(f"over {len(seeds)} seeds: mean (sd, min-max)")
        for o in over:
            print(f"{args.solver:<8} {o['steps']:>5} {o['guidance_scale']:>5g} accuracy "
                  f"{o['accuracy_mean']:.3f}  FD {o['fd_mean']:.3f} ({o['fd_sd']:.3f}, "
                  f"{o['fd_min']:.3f}-{o['fd_max']:.3f})")
    if args.json:
        save_json(dict(checkpoint=args.checkpoint, device=str(device), seeds=list(seeds),
                       reference_per_class=args.reference_per_class or args.num_per_class,
                       results=rows, over_seeds=over), args.json)
    return 0


def _check_fits_in_memory(nbytes: int, what: str) -> None:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > ram // 2:
        raise CLIError(f"{what} would take {nbytes / 2 ** 30:.1f} GiB of memory, more than half "
                       f"of this machine's {ram / 2 ** 30:.0f} GiB")


def cmd_export(args: argparse.Namespace) -> int:
    from fmrt.checkpoint import export_average, export_for_sampling
    changes = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance_scale),
                                 ("shift", args.shift)) if v is not None}
    if args.guidance_interval is not None:
        changes["guidance_interval"] = tuple(args.guidance_interval)
    elif args.no_guidance_interval:
        changes["guidance_interval"] = None
    if len(args.checkpoint) == 1:
        meta = export_for_sampling(args.checkpoint[0], args.out, **changes)
        what = ""
    else:
        meta = export_average(args.checkpoint, args.out, args.weights, **changes)
        what = "the average of " + ", ".join(
            f"{a['path']} ({a['weight']:.3g})" for a in meta["averaged_from"]) + "; "
    s = meta["sample"]
    iv = s.get("guidance_interval")
    print(f"wrote {args.out} (+ .json): {what}sampling defaults {s.get('steps')} steps, guidance "
          f"{s.get('guidance_scale')}{'' if iv is None else f' on sigma in [{iv[0]:g}, {iv[1]:g}]'}"
          f", shift {s.get('shift')}")
    return 0


def cmd_reflow(args: argparse.Namespace) -> int:
    """Reflow couplings (SPEC 5) with `fmrt.reflow.make_couplings`: noise from --seed, the
    model's samples from exactly that noise (the checkpoint's grid, --solver, --steps,
    --guidance-scale), the class labels as `cond`; `fmrt train --couplings` reads them."""
    import itertools

    from tqdm.auto import tqdm

    from fmrt.sampling import generate_clips, recorded_guidance
    from fmrt.reflow import make_couplings, save_couplings
    model, meta, device = _load(args)
    scale = args.guidance_scale if args.guidance_scale is not None else recorded_guidance(meta)
    shape = _sample_shape(meta, args.checkpoint)
    _check_fits_in_memory(2 * 4 * args.num * math.prod(shape), f"--num {args.num}: the couplings")
    labels = _labels(args, model.config.num_classes, args.num)
    policies = {} if args.guidance_interval is None else \
        {"guidance_interval": _interval_flag(args.guidance_interval)}
    bar = tqdm(total=-(-args.num // args.batch_size), desc="fmrt reflow", unit="batch",
               leave=False, disable=True if args.no_progress else None)
    batch = itertools.count()
    t0 = time.time()

    def sample_fn(m, noise, cond=None):
        i = next(batch)
        x = generate_clips(m, meta, cond, steps=args.steps, solver=args.solver,
                           guidance_scale=scale, shift=args.shift, device=device,
                           dtype=_dtype(args.dtype), noise=noise, clamp=False,
                           seed=_batch_seed(args.seed, i), **policies)
        bar.update()
        if args.no_progress:
            done = min((i + 1) * args.batch_size, args.num)
            print(f"fmrt reflow: batch {i + 1}/{bar.total} ({done}/{args.num} couplings), "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        return x

    with bar:
        couplings = make_couplings(model, args.num, shape, sample_fn=sample_fn, cond=labels,
                                   seed=args.seed, batch_size=args.batch_size, device=device)
    save_couplings(args.out, couplings)
    print(f"wrote {args.out}: {args.num} couplings {tuple(shape)} ({args.solver} {args.steps} "
          f"steps, guidance {scale:g}{_interval_note(scale, policies, meta)}, "
          f"{time.time() - t0:.1f}s)")
    return 0


def _one_line(e: BaseException) -> str:
    kind = "" if isinstance(e, (CLIError, ValueError, TypeError, FileNotFoundError,
                                PermissionError)) else f"{type(e).__name__}: "
    lines = str(e).strip().splitlines()
    msg = f"{kind}{lines[0] if lines else type(e).__name__}"
    return msg if len(msg) <= MAX_ERROR_CHARS else msg[:MAX_ERROR_CHARS - 3] + "..."


def _run(args: argparse.Namespace) -> int:
    prepare = PREPARE.get(args.command)
    if prepare is not None:
        prepare(args)          # flags and files, before torch is imported and any work starts
    return int(args.func(args) or 0)


def sample_threads() -> int:
    """CPU threads for sampling when OMP_NUM_THREADS is unset: two, or fewer on fewer cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def main(argv: Optional[Sequence[str]] = None) -> int:
    # OpenMP reads its wait policy once, when torch loads it: threads that wait for work sleep
    # instead of spinning on cores other jobs need. Only before torch is loaded (the `fmrt`
    # command): a caller that already runs torch keeps its environment untouched.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if os.environ.get("FMRT_DEBUG"):
        return _run(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"fmrt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, never a traceback (FMRT_DEBUG=1 shows it)
        print(f"fmrt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
