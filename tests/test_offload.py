"""The offload runtime gives exactly the in-memory model's tokens and logits on every architecture it claims."""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHS, assert_unchanged, prompts, reference, snapshot, store_config, tiny_model

from hf_moe_offload import disable_offload, enable_offload, get_offload_stats
from hf_moe_offload.offload import prefetch


def run_offloaded(arch, kind, depth, tmp_path):
    """Offload a fresh `tiny_model(arch)`: its logits, tokens, statistics and read path, weights put back after."""
    model = tiny_model(arch)
    before = snapshot(model)
    ids = prompts()
    enable_offload(model, store_config(kind, tmp_path, depth))
    acquisitions = []  # every unit forward that takes a slot (the embedding reads its rows instead)
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: acquisitions.append(name))
        for name, module in model.named_modules()
        if type(getattr(module, "_hf_hook", None)).__name__ == "UnitHook"
    ]
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    for handle in handles:
        handle.remove()
    stats = get_offload_stats(model)
    runtime = model._hf_moe_offload_state
    read_path = (runtime.store.direct_io, runtime.pipeline.map_files)
    disable_offload(model)
    assert_unchanged(model, before)
    return logits, tokens, stats, read_path, len(acquisitions)


def check_run(arch, kind, depth, tmp_path):
    logits, tokens, stats, (direct, mapped), acquisitions = run_offloaded(arch, kind, depth, tmp_path)
    want_logits, want_tokens = reference(arch)
    assert direct == (kind == "nvme-direct")  # O_DIRECT was used, not silently replaced by buffered reads
    assert mapped == (kind == "nvme")  # pages mapped exactly where asked (the CPU device's default)
    assert torch.equal(logits, want_logits)  # same kernels on the same bytes: bit for bit
    assert torch.equal(tokens, want_tokens)
    assert stats.peak_resident_units <= depth + 1
    # every unit forward found its weights prefetched and ready, prefetched but still coming, or fetched on demand
    assert stats.prefetch_hits + stats.late_prefetches + stats.on_demand_fetches == acquisitions
    if depth == 0:
        assert stats.on_demand_fetches == acquisitions
    else:
        assert stats.resyncs == 0 and stats.on_demand_fetches < acquisitions


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_offloaded_equals_in_memory(arch, tmp_path):
    """Every architecture on the default store of the CPU device (NVMe pages mapped), prefetch depth 1."""
    check_run(arch, "nvme", 1, tmp_path)


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("kind", ["cpu", "nvme", "nvme-copy", "nvme-direct"])
@pytest.mark.parametrize("arch", ["gpt_moe_top2_capacity", "llama"])
def test_every_store_and_depth_offloaded_equals_in_memory(arch, kind, depth, tmp_path):
    """Each store's read path at each depth, on a MoE model and a dense one (Llama, tied embeddings)."""
    check_run(arch, kind, depth, tmp_path)


@pytest.mark.parametrize("arch", ["gpt_moe", "llama", "mixtral"])
def test_sampling_and_beam_search_match_in_memory(arch, tmp_path):
    model = tiny_model(arch)
    ids = prompts()
    torch.manual_seed(123)
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    enable_offload(model, store_config("nvme", tmp_path, 2))
    torch.manual_seed(123)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20), sampled)
    assert torch.equal(model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False), beams)
    disable_offload(model)


def test_tied_weights_stay_tied_and_are_stored_once(tmp_path):
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    enable_offload(model, store_config("nvme", tmp_path, 1))
    state = model._hf_moe_offload_state
    stored = [spec.name for plan in state.plans for spec, _ in plan.own]
    assert len(stored) == len(set(stored))
    assert model.lm_head.weight is model.transformer.wte.weight  # both point at one placeholder between uses
    disable_offload(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_at_most_depth_plus_one_units_resident(tmp_path, monkeypatch):
    """Counted from the pipeline's own events, independently of its statistics."""
    live: set[int] = set()
    peak = [0]
    submit, free = prefetch.FetchPipeline._submit, prefetch.FetchPipeline._free_slot

    def counting_submit(self, unit, slot):
        live.add(unit)
        peak[0] = max(peak[0], len(live))
        return submit(self, unit, slot)

    def counting_free(self, slot):
        live.discard(slot.unit)
        return free(self, slot)

    monkeypatch.setattr(prefetch.FetchPipeline, "_submit", counting_submit)
    monkeypatch.setattr(prefetch.FetchPipeline, "_free_slot", counting_free)
    for depth in (0, 1, 2):
        model = tiny_model("llama")
        live.clear()
        peak[0] = 0
        enable_offload(model, store_config("cpu", tmp_path, depth))
        model.generate(prompts(), max_new_tokens=5, do_sample=False)
        disable_offload(model)
        assert 1 <= peak[0] <= depth + 1, (depth, peak[0])
        if depth:
            assert peak[0] == depth + 1  # the pipeline does fill its ring


def test_prefetch_wraps_around_between_steps(tmp_path):
    model = tiny_model("llama")
    enable_offload(model, store_config("cpu", tmp_path, 2))
    ids = prompts()
    with torch.no_grad():
        model(ids)  # learns the order (every unit on demand)
        get_offload_stats(model, reset=True)
        model(ids)
    stats = get_offload_stats(model)
    disable_offload(model)
    streamed = len(model.model.layers) + 2  # blocks, norm, head; the embedding only reads its rows
    assert stats.on_demand_fetches == 0  # the first block of the second pass was prefetched after the first's head
    assert stats.units_fetched == streamed


def test_stats_count_bytes_of_each_pass(tmp_path):
    model = tiny_model("gpt2")
    hidden = model.config.n_embd
    unique = {id(p): p for p in model.parameters()}
    model_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    wpe_bytes = model.transformer.wpe.weight.numel() * 4
    ids = prompts()
    enable_offload(model, store_config("cpu", tmp_path, 0))
    with torch.no_grad():
        model(ids)
    stats = get_offload_stats(model, reset=True)
    # every block and the head (which holds the tied embedding) in full; of the two embeddings only the rows used
    rows = len(torch.unique(ids)) + ids.shape[1]
    assert stats.bytes_fetched == model_bytes - wpe_bytes + rows * hidden * 4
    assert stats.store_read_bytes["cpu"] == stats.bytes_fetched
    assert stats.forward_passes == 1 and stats.fetch_wait_seconds > 0
    assert stats.device_wait_seconds == stats.fetch_wait_seconds  # on the CPU the computing thread is the device
    assert get_offload_stats(model).bytes_fetched == 0
    disable_offload(model)
    assert model.transformer.wte.padding_idx is None and model.lm_head.weight is model.transformer.wte.weight


def test_embedding_reads_only_the_rows_of_its_ids(tmp_path):
    model = tiny_model("llama")
    model.model.embed_tokens.padding_idx = 2
    ids = prompts()
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    enable_offload(model, store_config("nvme", tmp_path, 1))
    with torch.no_grad():
        model(ids)
        get_offload_stats(model, reset=True)
        model(ids)
    table = model.model.embed_tokens.weight
    fetched = get_offload_stats(model).bytes_fetched
    head = model.lm_head.weight  # tied: the head fetches the whole table, the embedding only its rows
    assert head is table
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), tokens)
    disable_offload(model)
    blocks = sum(p.numel() * 4 for p in model.model.layers.parameters()) + model.model.norm.weight.numel() * 4
    assert fetched == blocks + table.numel() * 4 + len(torch.unique(ids)) * table.shape[1] * 4
    assert model.model.embed_tokens.padding_idx == 2  # put back


def test_model_device_and_dtype_report_the_execution_device(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    enable_offload(model, store_config("cpu", tmp_path, 1))
    assert model.device == torch.device("cpu") and model.dtype == torch.bfloat16
    # between uses a weight reads NaN: used outside its unit it cannot pass unnoticed
    assert torch.isnan(model.model.layers[0].mlp.up_proj.weight).all()
    disable_offload(model)
    assert not torch.isnan(model.model.layers[0].mlp.up_proj.weight).any()


def test_bf16_model_offloaded_matches(tmp_path):
    model = tiny_model("gpt_moe").to(torch.bfloat16)
    ids = prompts()
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    enable_offload(model, store_config("nvme", tmp_path, 1))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), tokens)
    disable_offload(model)


def test_bound_weights_keep_requires_grad_and_forwards_record_no_graph(tmp_path):
    model = tiny_model("gpt2")
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    expected = {name: p.requires_grad for name, p in model.named_parameters()}
    seen = {}

    def record(module, args):
        for name, param in module.named_parameters(recurse=False):
            seen[id(module), name] = param.requires_grad

    module_names = {id(m): n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda mod, a, o: record(mod, a)) for m in model.modules()]
    enable_offload(model, store_config("nvme", tmp_path, 1))
    logits = model(prompts()).logits
    for handle in handles:
        handle.remove()
    disable_offload(model)
    assert not logits.requires_grad  # inference only: slot memory is reused, nothing may be kept for backward
    for (module_id, name), requires_grad in seen.items():
        full = f"{module_names[module_id]}.{name}".lstrip(".")
        if full in expected:
            assert requires_grad == expected[full], full
