"""Trainer glue: routing metrics of MoE models in the Trainer logs, and the standard-library code corpus of the
examples and tests."""

from __future__ import annotations

from .data import BlockDataset, split_by_module, stdlib_modules, token_blocks, train_bpe_tokenizer
from .metrics import RouterMetricsCallback, add_router_metrics


__all__ = [
    "BlockDataset",
    "RouterMetricsCallback",
    "add_router_metrics",
    "split_by_module",
    "stdlib_modules",
    "token_blocks",
    "train_bpe_tokenizer",
]
