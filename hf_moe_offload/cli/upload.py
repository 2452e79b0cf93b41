"""`hf-moe-offload upload MODEL_DIR REPO_ID`: weights, code files, tokenizer and card to the Hub in one commit."""

from __future__ import annotations

import argparse

from .card import add_card_options, card_kwargs


def register(commands) -> None:
    parser = commands.add_parser("upload", help="push weights, code files, tokenizer and card to the Hub")
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("repo_id", metavar="REPO_ID")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to")
    parser.add_argument("--commit-message")
    parser.add_argument("--create-pr", action="store_true")
    add_card_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import push_to_hub

    commit = push_to_hub(
        args.model_dir,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        overwrite=args.overwrite,
        **card_kwargs(args),
    )
    print(f"uploaded {args.model_dir} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0
