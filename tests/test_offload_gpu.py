"""The CUDA path of the offload runtime (pinned staging, copy stream, events). Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
from helpers import nvme_path, prompts, tiny_model

from hf_moe_offload import OffloadConfig, disable_offload, enable_offload, get_offload_stats


def reference_on_the_gpu(arch):
    """The tiny model, its logits and greedy tokens computed on the GPU, and the model moved back to the CPU."""
    model = tiny_model(arch).to("cuda")
    ids = prompts().to("cuda")
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    return model.to("cpu"), ids, logits, tokens


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gpt_moe", "llama", "mixtral"])
@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_cuda_offloaded_generate_matches_the_model_on_the_gpu(arch, kind, tmp_path):
    model, ids, logits, tokens = reference_on_the_gpu(arch)
    config = OffloadConfig(
        offload_device=kind, nvme_path=nvme_path(kind, tmp_path), execution_device="cuda", prefetch_depth=2
    )
    enable_offload(model, config)
    assert model.device.type == "cuda"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), tokens)
    stats = get_offload_stats(model)
    assert stats.peak_resident_units <= 3 and stats.slot_bytes > 0
    disable_offload(model)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [0, 1, 64])
@pytest.mark.parametrize("arch", ["gpt_moe", "mixtral"])
@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_cuda_routed_experts_match_the_model_on_the_gpu(arch, kind, cache, tmp_path):
    model, ids, logits, tokens = reference_on_the_gpu(arch)
    config = OffloadConfig(
        offload_device=kind,
        nvme_path=nvme_path(kind, tmp_path),
        execution_device="cuda",
        expert_cache_size=cache,
        expert_break_even=1.0,  # routed experts in every forward
    )
    enable_offload(model, config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), tokens)
    stats = get_offload_stats(model)
    assert stats.expert_cache_misses > 0 and stats.whole_layer_forwards == 0
    disable_offload(model)
