"""The `hf-moe-offload` command (also `python -m hf_moe_offload`), one module per sub-command.

    hf-moe-offload demo                                   # the shipped GPT-MoE, offloaded to NVMe; offline, seconds
    hf-moe-offload generate MODEL --offload nvme --nvme-path DIR --prompt "def parse(path):"
    hf-moe-offload bench MODEL --batch-sizes 1 16         # in-memory vs offloaded generation, side by side
    hf-moe-offload card MODEL_DIR                         # write or refresh the model card (README.md)
    hf-moe-offload upload MODEL_DIR REPO_ID               # weights, code files, tokenizer and card, one commit
    hf-moe-offload presets                                # the GPT-MoE presets with total and active parameters

Errors are one line on stderr: exit code 2 for bad input (a bad option, a missing file, a refused value), 1 for any
other failure, with `--debug` showing the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from . import bench, card, demo, generate, presets, upload
from ._common import UsageError


COMMANDS = (demo, generate, bench, card, upload, presets)
_PACKAGE = Path(__file__).resolve().parent.parent


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-moe-offload", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.register(commands)
    return parser


def _is_bad_input(error: BaseException) -> bool:
    """A usage error, or a ValueError raised by this package's own checks of what it was given (not one raised
    inside torch or transformers)."""
    if isinstance(error, UsageError):
        return True
    if not isinstance(error, ValueError):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"hf-moe-offload {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if _is_bad_input(error):
            print(f"hf-moe-offload {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(f"hf-moe-offload {args.command}: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1


__all__ = ["UsageError", "build_parser", "main"]
