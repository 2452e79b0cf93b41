"""`load_offloaded` fills the store straight from safetensors shards and generates like `from_pretrained`."""

from __future__ import annotations

import pytest
import torch
from helpers import nvme_path, prompts, tiny_model
from transformers import AutoModelForCausalLM

from hf_moe_offload import OffloadConfig, disable_offload, get_offload_stats, load_offloaded
from hf_moe_offload.offload.store import CheckpointStore, CpuStore, NvmeStore


def assert_generates_like(offloaded, model):
    ids = prompts()
    assert torch.equal(
        offloaded.generate(ids, max_new_tokens=6, do_sample=False),
        model.generate(ids, max_new_tokens=6, do_sample=False),
    )


def saved(arch, tmp_path, **save_kwargs):
    model = tiny_model(arch)
    path = tmp_path / arch
    model.save_pretrained(path, **save_kwargs)
    return model, path


@pytest.mark.parametrize("arch", ["gpt_moe", "gpt2", "llama", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_load_offloaded_generates_like_from_pretrained(arch, kind, tmp_path):
    _, path = saved(arch, tmp_path)
    # The reference is the checkpoint loaded in memory, its weights where `from_pretrained` puts them (views of the
    # file mapping): MKL's AVX2 GEMMs round by operand alignment, and the store keeps each weight's alignment.
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = prompts()
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = model(ids).logits
    config = OffloadConfig(offload_device=kind, nvme_path=nvme_path(kind, tmp_path), prefetch_depth=2)
    offloaded = load_offloaded(path, config)
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, logits)
    assert torch.equal(offloaded.generate(ids, max_new_tokens=6, do_sample=False), tokens)
    store = offloaded._hf_moe_offload_state.store
    if kind == "cpu":
        assert isinstance(store, CpuStore)
    elif arch in ("gpt_moe", "mixtral", "qwen2_moe"):
        assert isinstance(store, NvmeStore)  # MoE: written once with every expert in one region (expert-major)
    else:
        assert isinstance(store, CheckpointStore)  # read in place from model.safetensors, no copy
        assert not list((tmp_path / "store").glob("unit_*"))
    assert get_offload_stats(offloaded).store_read_bytes["nvme" if kind == "nvme" else "cpu"] > 0


def test_load_offloaded_in_another_dtype_writes_a_store_and_reuses_it(tmp_path):
    _, path = saved("gpt_moe", tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = prompts()
    tokens = reference.generate(ids, max_new_tokens=6, do_sample=False)
    config = OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store")
    offloaded = load_offloaded(path, config, dtype=torch.bfloat16)
    assert isinstance(offloaded._hf_moe_offload_state.store, NvmeStore)
    assert offloaded.dtype == torch.bfloat16
    assert torch.equal(offloaded.generate(ids, max_new_tokens=6, do_sample=False), tokens)
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "store").glob("unit_*")}
    again = load_offloaded(path, config, dtype="bfloat16")
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "store").glob("unit_*")} == stamps
    assert torch.equal(again.generate(ids, max_new_tokens=6, do_sample=False), tokens)


def test_reuse_checkpoint_off_copies_into_the_store(tmp_path):
    model, path = saved("llama", tmp_path)
    config = OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store", reuse_checkpoint=False)
    offloaded = load_offloaded(path, config)
    assert isinstance(offloaded._hf_moe_offload_state.store, NvmeStore)
    assert_generates_like(offloaded, model)


def test_sharded_checkpoint(tmp_path):
    model, path = saved("gpt2", tmp_path, max_shard_size="20KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    config = OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store", reuse_checkpoint=True)
    offloaded = load_offloaded(path, config)
    assert isinstance(offloaded._hf_moe_offload_state.store, CheckpointStore)
    assert_generates_like(offloaded, model)


def test_disable_offload_after_load_offloaded_gives_the_checkpoint_in_memory(tmp_path):
    model, path = saved("gpt2", tmp_path)
    offloaded = load_offloaded(path, OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store"))
    disable_offload(offloaded)
    expected = model.state_dict()
    loaded = offloaded.state_dict()
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert loaded[name].device.type == "cpu" and torch.equal(loaded[name], expected[name]), name
    assert offloaded.lm_head.weight is offloaded.transformer.wte.weight


def test_pickle_checkpoint_is_refused_with_how_to_convert(tmp_path):
    model = tiny_model("gpt2")
    path = tmp_path / "pickled"
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle checkpoint \(pytorch_model.bin\); load_offloaded reads safetensors"):
        load_offloaded(path, OffloadConfig())


def test_device_map_is_refused(tmp_path):
    _, path = saved("gpt2", tmp_path)
    with pytest.raises(ValueError, match="do not pass device_map"):
        load_offloaded(path, OffloadConfig(), device_map="auto")


def test_unwritable_nvme_path_is_refused_before_loading(tmp_path):
    _, path = saved("gpt2", tmp_path)
    with pytest.raises(ValueError, match=r"nvme_path \(/sys\) is not writable"):
        load_offloaded(path, OffloadConfig(offload_device="nvme", nvme_path="/sys"))
