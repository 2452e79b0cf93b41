"""The code corpus of the examples and tests: the `.py` files of the running interpreter's standard library.

Real code that nobody in this project wrote, present on every machine that runs Python, so training examples and
tests need no download. Files are grouped by top-level module (`json`, `asyncio`, `os`, ...) so that train and
validation never share a module.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast


EOS = "<|endoftext|>"
# `site-packages` is not the standard library; `pydoc_data` is the documentation dumped into Python strings.
SKIPPED_MODULES = frozenset({"site-packages", "pydoc_data"})


def stdlib_modules(modules: Iterable[str] | None = None) -> dict[str, list[Path]]:
    """The standard library's `.py` files by top-level module, sorted; `modules` keeps only those named."""
    root = Path(sysconfig.get_paths()["stdlib"])
    wanted = set(modules) if modules is not None else None
    grouped: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        module = path.relative_to(root).parts[0].removesuffix(".py")
        if module in SKIPPED_MODULES or (wanted is not None and module not in wanted):
            continue
        grouped.setdefault(module, []).append(path)
    if wanted is not None and (missing := wanted - grouped.keys()):
        raise ValueError(f"no standard-library module named {sorted(missing)} under {root}")
    return grouped


def split_by_module(modules: dict[str, list[Path]], every: int) -> tuple[list[Path], list[Path]]:
    """(train, validation) files: a whole module goes to validation when `crc32(name) % every == 0`."""
    if every < 1:
        raise ValueError(f"every ({every}) must be >= 1")
    train, validation = [], []
    for name, files in modules.items():
        (validation if zlib.crc32(name.encode()) % every == 0 else train).extend(files)
    return train, validation


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_bpe_tokenizer(files: Iterable[Path], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, no unknown token) trained on `files`; `<|endoftext|>` is EOS/BOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((_read(p) for p in files), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def token_blocks(tokenizer: PreTrainedTokenizerFast, files: list[Path], block_size: int) -> torch.Tensor:
    """Every file's tokens followed by EOS, concatenated and cut into `(blocks, block_size)` (the tail dropped)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which separates the files")
    ids: list[int] = []
    texts = [_read(p) for p in files]
    for start in range(0, len(texts), 256):
        for encoded in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(tokenizer.eos_token_id)
    num_blocks = len(ids) // block_size
    if num_blocks == 0:
        raise ValueError(f"the files hold {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Language-modeling rows for `Trainer`: `input_ids` and `labels` are the same block (the model shifts)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}
