"""The `fmrt` command. Subcommands map their flags onto library keyword arguments."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import fmrt


class CLIError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fmrt", description="fmrt: flow-matching runtime (fused kernels, training, sampling)")
    p.add_argument("--version", action="version", version=f"fmrt {fmrt.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show versions, devices and the active backend")
    info.set_defaults(func=cmd_info)
    return p


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from fmrt._dispatch import requested_backend, triton_available
    print(f"fmrt {fmrt.__version__}  torch {torch.__version__}  "
          f"triton {'yes' if triton_available() else 'no'}  "
          f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}  "
          f"FMRT_BACKEND={requested_backend()}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, PermissionError) as e:
        print(f"fmrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
