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


def check_on_the_gpu(arch, config, model=None, dtype=None):
    """Offloaded onto the GPU with `config`, the logits and greedy tokens equal the model in GPU memory; then
    `disable_offload` right after `generate` gives every weight back bit for bit."""
    model = model if model is not None else tiny_model(arch)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to("cuda")
    ids = prompts().to("cuda")
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    model = model.to("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enable_offload(model, config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), tokens)
    stats = get_offload_stats(model)
    disable_offload(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    return stats


# Around a base (NVMe store, depth 1, fp32, cache 2): each axis on its own, as the CPU suite sweeps them.
GPU_SWEEP = [
    ("mixtral", {"expert_cache_size": 2}),  # partial caches 2 .. E-1 (4 experts)
    ("mixtral", {"expert_cache_size": 3}),
    ("qwen2_moe", {"expert_cache_size": 2}),  # shared experts, a dense first layer
    ("gpt_moe_top2_capacity", {"expert_cache_size": 2}),
    ("mixtral", {"expert_cache_size": 2, "prefetch_depth": 0}),
    ("llama", {"prefetch_depth": 0}),
    ("llama", {"prefetch_depth": 1, "direct_io": True}),
    ("mixtral", {"expert_cache_size": 2, "direct_io": True}),
    ("mixtral", {"expert_cache_size": 2, "speculative_prefetch": False}),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("arch", "options"), GPU_SWEEP)
def test_cuda_sweep_matches_the_model_on_the_gpu(arch, options, tmp_path):
    options = {"prefetch_depth": 1, "expert_break_even": 1.0, **options}
    config = OffloadConfig(offload_device="nvme", nvme_path=str(tmp_path / "store"), execution_device="cuda", **options)
    stats = check_on_the_gpu(arch, config)
    if "expert_cache_size" in options:
        assert stats.expert_cache_misses > 0


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_cuda_bf16_matches_the_model_on_the_gpu(arch, kind, tmp_path):
    config = OffloadConfig(
        offload_device=kind, nvme_path=nvme_path(kind, tmp_path), execution_device="cuda", expert_cache_size=2
    )
    check_on_the_gpu(arch, config, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_cuda_load_offloaded_store_matches_the_model_on_the_gpu(arch, tmp_path):
    from hf_moe_offload import load_offloaded

    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "ckpt")
    ids = prompts()
    reference = model.to("cuda")
    with torch.no_grad():
        logits = reference(ids.to("cuda")).logits
    tokens = reference.generate(ids.to("cuda"), max_new_tokens=6, do_sample=False)
    config = OffloadConfig(execution_device="cuda", expert_cache_size=2, expert_break_even=1.0)
    offloaded = load_offloaded(str(tmp_path / "ckpt"), config)  # the checkpoint's shards read in place
    with torch.no_grad():
        assert torch.equal(offloaded(ids.to("cuda")).logits, logits)
    assert torch.equal(offloaded.generate(ids.to("cuda"), max_new_tokens=6, do_sample=False), tokens)
