"""The standard-library code corpus of the examples: module split, tokenizer, blocks."""

from __future__ import annotations

import zlib

import pytest
import torch

from hf_moe_offload.training import (
    BlockDataset,
    split_by_module,
    stdlib_modules,
    token_blocks,
    train_bpe_tokenizer,
)


def test_split_keeps_every_module_on_one_side():
    modules = stdlib_modules()
    assert "json" in modules and "pydoc_data" not in modules and "site-packages" not in modules
    train, validation = split_by_module(modules, every=10)
    assert set(train).isdisjoint(validation) and len(train) + len(validation) == sum(map(len, modules.values()))
    for name, files in modules.items():
        side = validation if zlib.crc32(name.encode()) % 10 == 0 else train
        assert all(path in side for path in files), name


def test_unknown_module_and_bad_split_are_clear_errors():
    with pytest.raises(ValueError, match=r"no standard-library module named \['no_such_module'\]"):
        stdlib_modules(["json", "no_such_module"])
    with pytest.raises(ValueError, match=r"every \(0\) must be >= 1"):
        split_by_module({}, every=0)


def test_tokenizer_is_lossless_and_blocks_separate_files_with_eos():
    files = stdlib_modules(["json"])["json"]
    tokenizer = train_bpe_tokenizer(files, vocab_size=400)
    assert len(tokenizer) == 400
    text = files[0].read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE: no unknown token, exact round trip
    blocks = token_blocks(tokenizer, files[:2], block_size=32)
    first = tokenizer(files[0].read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    flat = blocks.reshape(-1).tolist()
    assert flat[: len(first)] == first and flat[len(first)] == tokenizer.eos_token_id
    assert blocks.shape[1] == 32 and blocks.dtype == torch.long
    row = BlockDataset(blocks)[1]
    assert torch.equal(row["input_ids"], blocks[1]) and torch.equal(row["labels"], blocks[1])
    with pytest.raises(ValueError, match="fewer than one block of 1000000"):
        token_blocks(tokenizer, files[:1], block_size=1_000_000)
