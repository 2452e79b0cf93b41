"""`hf-moe-offload card MODEL_DIR`: write or refresh the model card (README.md) of a GPT-MoE checkpoint."""

from __future__ import annotations

import argparse
from typing import Any


def add_card_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--license", help="e.g. apache-2.0 (default: kept from the card, else none)")
    parser.add_argument("--datasets", nargs="+", metavar="DATASET", help="Hub ids of the training data")
    parser.add_argument("--language", nargs="+", help="e.g. en, code")
    parser.add_argument("--base-model", help="the model this one was fine-tuned from")
    parser.add_argument("--tags", nargs="+", metavar="TAG", help="tags besides custom_code, moe, gpt_moe, ...")
    parser.add_argument("--description", help="a paragraph on what the model is and what it was trained on")
    parser.add_argument("--overwrite", action="store_true", help="replace a README.md not written by this command")


def card_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("license", "datasets", "language", "base_model", "tags", "description")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def register(commands) -> None:
    parser = commands.add_parser("card", help="write or refresh MODEL_DIR/README.md, the model card")
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("--repo-id", help="the name the card's snippets load (default: kept, else the directory's)")
    add_card_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import write_model_card

    path = write_model_card(args.model_dir, repo_id=args.repo_id, overwrite=args.overwrite, **card_kwargs(args))
    print(f"wrote {path}")
    return 0
