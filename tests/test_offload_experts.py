"""MoE-aware offload: only the routed experts move, the per-layer cache follows its policy, speculation never changes
a result, and whole layers stream when a forward touches most experts."""

from __future__ import annotations

import errno

import pytest
import torch
from helpers import SMALL, prompts, reference, store_config, tiny_model

from hf_moe_offload import (
    GPTMoEConfig,
    GPTMoEForCausalLM,
    OffloadConfig,
    disable_offload,
    enable_offload,
    get_offload_stats,
)
from hf_moe_offload.offload import experts as experts_module
from hf_moe_offload.offload.discovery import find_experts_modules
from hf_moe_offload.offload.experts import IMPLEMENTATION


MOE_ARCHS = ["gpt_moe", "gpt_moe_top2_capacity", "mixtral", "qwen2_moe"]
# "all": the cache holds every expert of a layer (capped at the layer's count)
CACHE_SIZES = {"0": 0, "1": 1, "all": 64}


def routed_trace(model, ids, max_new_tokens):
    """The experts each MoE layer is given at every call of a greedy generation in memory: a list per layer of the
    sorted union of `top_k_index` over the batch (the naive reference of what must be fetched)."""
    trace: dict[str, list[list[int]]] = {}
    handles = []
    for name, module in model.named_modules():
        if getattr(module, "has_gate", None) is not None and hasattr(module, "num_experts"):
            calls = trace.setdefault(name, [])

            def record(mod, args, calls=calls):
                calls.append(sorted(set(args[1].reshape(-1).tolist())))

            handles.append(module.register_forward_pre_hook(record))
    tokens = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    for handle in handles:
        handle.remove()
    return tokens, list(trace.values())


def use_backend(monkeypatch, backend: str) -> None:
    """The CPU device's backend ("virtual": whole region reserved, no gather) or the CUDA one ("compact": cache rows
    gathered into a compact weight, ids renumbered), run here on the CPU."""
    if backend == "compact":
        monkeypatch.setattr(experts_module, "_backend", lambda device: experts_module._CompactExperts)


@pytest.fixture(params=["virtual", "compact"])
def backend(request, monkeypatch):
    use_backend(monkeypatch, request.param)
    return request.param


def check_routed(arch, kind, cache, speculate, tmp_path):
    model = tiny_model(arch)
    logits, tokens = reference(arch)
    implementation = model.config._experts_implementation
    # expert_break_even=1.0: every forward fetches routed experts, the prefill too
    config = store_config(
        kind, tmp_path, 1, expert_cache_size=CACHE_SIZES[cache], speculative_prefetch=speculate, expert_break_even=1.0
    )
    ids = prompts()
    enable_offload(model, config)
    assert model.config._experts_implementation == IMPLEMENTATION
    with torch.no_grad():
        offloaded_logits = model(ids).logits
    offloaded_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    stats = get_offload_stats(model)
    disable_offload(model)

    assert torch.equal(offloaded_logits, logits)  # the model's own kernel on the same bytes, experts renumbered
    assert torch.equal(offloaded_tokens, tokens)
    assert model.config._experts_implementation == implementation
    assert stats.whole_layer_forwards == 0
    assert stats.expert_cache_misses > 0
    if CACHE_SIZES[cache] == 0:
        assert stats.expert_cache_hits == 0
    if not speculate or CACHE_SIZES[cache] == 0:
        assert stats.speculated == stats.speculative_fetches == 0
    elif len(find_experts_modules(model)) > 1:  # the calls of every MoE layer but the first had a guess
        assert stats.speculated_needed > 0
    assert stats.speculated_correct <= min(stats.speculated, stats.speculated_needed)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routed_fetching_equals_in_memory_on_every_moe_architecture(arch, backend, tmp_path):
    """Every MoE architecture, both backends, on the default store with a partial cache and speculation."""
    check_routed(arch, "nvme", "1", True, tmp_path)


# Around that base (nvme, cache 1, speculation): every cache size on both backends, every store, speculation off.
SWEEP = [
    *[("nvme", cache, True, backend) for backend in ("virtual", "compact") for cache in ("0", "all")],
    *[(kind, "1", True, backend) for backend in ("virtual", "compact") for kind in ("cpu", "nvme-copy")],
    ("nvme", "1", False, "virtual"),
    ("nvme", "all", False, "compact"),
]


@pytest.mark.parametrize(("kind", "cache", "speculate", "backend_name"), SWEEP)
@pytest.mark.parametrize("arch", ["gpt_moe_top2_capacity", "mixtral"])
def test_routed_fetching_equals_in_memory_on_every_store_and_cache(
    arch, kind, cache, speculate, backend_name, tmp_path, monkeypatch
):
    use_backend(monkeypatch, backend_name)
    check_routed(arch, kind, cache, speculate, tmp_path)


def _more_moe_config(arch: str):
    from transformers import DeepseekV3Config, GptOssConfig, OlmoeConfig, Qwen3MoeConfig

    base = {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **SMALL,
    }
    experts = {"num_experts_per_tok": 2, "intermediate_size": 64}
    if arch == "olmoe":
        return OlmoeConfig(num_experts=8, **experts, **base)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=8, moe_intermediate_size=32, head_dim=8, **experts, **base)
    if arch == "gpt_oss":  # transposed, interleaved gate/up, biases
        return GptOssConfig(num_local_experts=8, head_dim=8, **experts, **base)
    # DeepSeek-V3: shared experts, sigmoid router with a correction bias and grouped top-k, first layer dense
    return DeepseekV3Config(
        **{**base, "num_key_value_heads": 4},
        **experts,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_routed_fetching_on_more_transformers_moe_models(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_more_moe_config(arch)).eval()
    ids = prompts()
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    enable_offload(model, store_config("nvme", tmp_path, 1, expert_cache_size=1, expert_break_even=1.0))
    assert model.config._experts_implementation == IMPLEMENTATION
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), tokens)
    state = model._hf_moe_offload_state
    assert all(layer.router_weight is not None for layer in state.expert_layers)  # its router was found
    assert get_offload_stats(model).speculated > 0
    disable_offload(model)


@pytest.mark.parametrize("kind", ["cpu", "nvme", "nvme-copy"])
def test_only_the_routed_experts_are_fetched(kind, backend, tmp_path):
    """Cache off: every routed expert of every call is fetched once, nothing else; bytes add up exactly."""
    model = tiny_model("gpt_moe")
    ids = prompts(batch=1)
    tokens, trace = routed_trace(model, ids, max_new_tokens=5)
    config = store_config(kind, tmp_path, 0, expert_cache_size=0, expert_break_even=1.0)  # depth 0: no step overlap
    enable_offload(model, config)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), tokens)
    state = model._hf_moe_offload_state
    expert_nbytes = {layer.layout.group.module: layer.layout.nbytes for layer in state.expert_layers}
    stats = get_offload_stats(model, reset=True)
    routed = sum(len(call) for calls in trace for call in calls)
    assert stats.expert_cache_misses == routed and stats.expert_cache_hits == 0
    assert stats.expert_bytes_fetched == routed * next(iter(expert_nbytes.values()))

    # one more decoding step at batch 1: the dense parts, one expert per MoE layer, one row per embedding table
    with torch.no_grad():
        model(tokens[:, -1:])
    stats = get_offload_stats(model)
    dense, whole, rows = unit_bytes(model)
    top1 = len(state.expert_layers) * next(iter(expert_nbytes.values()))
    assert stats.bytes_fetched == dense + top1 + rows
    assert stats.bytes_fetched < whole + rows  # the "all" behaviour moves every expert
    disable_offload(model)


def unit_bytes(model) -> tuple[int, int, int]:
    """Bytes of one forward's units without and with their experts, and of one row of each embedding table."""
    state = model._hf_moe_offload_state
    dense = whole = rows = 0
    for plan, (_, module) in zip(state.plans, state.unit_modules, strict=True):
        if isinstance(module, torch.nn.Embedding):
            rows += module.embedding_dim * module.weight.element_size()
            continue
        dense += sum(r.nbytes for r in (plan.dense or plan).ranges)
        whole += sum(r.nbytes for r in plan.ranges)
    return dense, whole, rows


def simulate_cache(calls: list[list[int]], capacity: int, decay: float) -> tuple[int, int]:
    """Naive reference of the cache policy: score decays per call, +1 when routed; a miss evicts the lowest
    (score, id) expert not routed in this call, or is not cached when every cached expert is routed."""
    score: dict[int, float] = {}
    cached: set[int] = set()
    hits = misses = 0
    for routed in calls:
        score = {e: s * decay for e, s in score.items()}
        for e in routed:
            score[e] = score.get(e, 0.0) + 1.0
        for e in routed:
            if e in cached:
                hits += 1
                continue
            misses += 1
            if len(cached) >= capacity:
                others = [c for c in cached if c not in routed]
                if not others:
                    continue
                cached.remove(min(others, key=lambda c: (score[c], c)))
            cached.add(e)
    return hits, misses


@pytest.mark.parametrize("capacity", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", ["nvme", "nvme-copy"])
def test_cache_hits_follow_the_policy(capacity, kind, backend, tmp_path):
    config = GPTMoEConfig.from_preset("tiny-moe", vocab_size=96, num_hidden_layers=4, num_experts=8)
    torch.manual_seed(0)
    model = GPTMoEForCausalLM(config).eval()
    ids = prompts(batch=3, seq=4)
    tokens, trace = routed_trace(model, ids, max_new_tokens=8)
    enable_offload(
        model,
        store_config(kind, tmp_path, 1, expert_cache_size=capacity, speculative_prefetch=False, expert_break_even=1.0),
    )
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
    stats = get_offload_stats(model)
    disable_offload(model)
    expected = [simulate_cache(calls, capacity, experts_module._SCORE_DECAY) for calls in trace]
    assert stats.expert_cache_hits == sum(h for h, _ in expected)
    assert stats.expert_cache_misses == sum(m for _, m in expected)


def test_speculation_counts_and_wrong_guesses_change_nothing(tmp_path):
    config = GPTMoEConfig.from_preset("tiny-moe", vocab_size=96, num_hidden_layers=6, num_experts=8)
    torch.manual_seed(0)
    model = GPTMoEForCausalLM(config).eval()
    ids = prompts(batch=1)
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    enable_offload(model, store_config("nvme-copy", tmp_path, 1, expert_cache_size=2, expert_break_even=1.0))
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
    first = get_offload_stats(model, reset=True)
    assert first.speculated > 0 and first.speculated_correct <= min(first.speculated, first.speculated_needed)
    with torch.no_grad():
        model(tokens[:, -1:])  # one token: each of the 2 MoE layers with a predecessor gets 1 guess, routes 1 expert
    stats = get_offload_stats(model, reset=True)
    assert stats.speculated == stats.speculated_needed == 2
    assert stats.speculation_recall == stats.speculation_precision == stats.speculated_correct / 2
    for layer in model._hf_moe_offload_state.expert_layers:
        if layer.router_weight is not None:
            layer.router_weight = -layer.router_weight  # guesses every expert but the likely one
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
    wrong = get_offload_stats(model)
    assert wrong.speculative_fetches > 0
    disable_offload(model)


@pytest.mark.parametrize("learned", ["routed", "whole"])
def test_each_forward_size_streams_whole_layers_only_when_measured_above_the_break_even(learned, tmp_path):
    model = tiny_model("gpt_moe")  # 8 experts, top-1
    ids = prompts(batch=1, seq=5).repeat(2, 1)  # 10 tokens, 5 distinct: uniform routing would touch 74% of the experts
    with torch.no_grad():
        logits = model(ids).logits
    _, trace = routed_trace(model, ids, max_new_tokens=1)
    touched = sum(len(calls[0]) / 8 for calls in trace) / len(trace)  # what this model's 10-token forward touches
    uniform = 1 - (7 / 8) ** 10
    assert touched <= 5 / 8 < uniform  # two equal rows touch what one does
    break_even = (touched + uniform) / 2 if learned == "routed" else touched - 0.01
    enable_offload(model, store_config("nvme", tmp_path, 1, expert_break_even=break_even))
    state = model._hf_moe_offload_state
    assert state.experts.policy.expected_experts_fraction(10) == pytest.approx(uniform)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # a size not seen yet: uniform routing's 74% -> whole layers
    assert get_offload_stats(model, reset=True).whole_layer_forwards == 1
    assert state.experts.policy.touched == {4: pytest.approx(touched)}  # measured in that whole-layer forward too
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    stats = get_offload_stats(model)
    assert stats.whole_layer_forwards == (1 if learned == "whole" else 0)
    assert (stats.expert_cache_misses + stats.expert_cache_hits > 0) == (learned == "routed")
    disable_offload(model)


@pytest.mark.parametrize(
    ("kind", "given", "expected"),
    [("nvme", None, 1.0), ("nvme-copy", None, 0.75), ("cpu", None, 0.75), ("nvme", 0.3, 0.3)],
)
def test_break_even_defaults_to_the_read_path_measurement(kind, given, expected, tmp_path):
    model = tiny_model("gpt_moe")
    enable_offload(model, store_config(kind, tmp_path, 1, expert_break_even=given))
    assert model._hf_moe_offload_state.experts.policy.break_even == expected
    disable_offload(model)


def test_expert_fetch_all_streams_every_expert(tmp_path):
    model = tiny_model("gpt_moe")
    ids = prompts(batch=1)
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    implementation = model.config._experts_implementation
    enable_offload(model, store_config("nvme", tmp_path, 0, expert_fetch="all"))
    assert model.config._experts_implementation == implementation
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), tokens)
    stats = get_offload_stats(model, reset=True)
    assert stats.expert_cache_hits == stats.expert_cache_misses == stats.expert_bytes_fetched == 0
    with torch.no_grad():
        model(ids[:, -1:])
    _, whole, rows = unit_bytes(model)
    assert get_offload_stats(model).bytes_fetched == whole + rows
    disable_offload(model)


def test_offload_routed_outside_an_offloaded_model_is_refused():
    model = tiny_model("gpt_moe")
    model.set_experts_implementation(IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="runs only on a model offloaded by hf_moe_offload"):
        model(prompts())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expert_fetch": "some"}, r"expert_fetch \('some'\) must be one of \('routed', 'all'\)"),
        ({"expert_cache_size": -1}, r"expert_cache_size \(-1\) must be an integer >= 0"),
        ({"expert_cache_size": 2.5}, r"expert_cache_size \(2.5\) must be an integer >= 0"),
        ({"expert_break_even": 0.0}, r"expert_break_even \(0.0\) must be a fraction in \(0, 1\]"),
        ({"expert_break_even": 1.5}, r"expert_break_even \(1.5\) must be a fraction in \(0, 1\]"),
    ],
)
def test_bad_expert_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OffloadConfig(**kwargs)


def test_disable_offload_restores_fused_experts_bit_for_bit(tmp_path):
    model = tiny_model("mixtral")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    enable_offload(model, store_config("nvme", tmp_path, 1, expert_cache_size=1, expert_break_even=1.0))
    model.generate(prompts(), max_new_tokens=3, do_sample=False)
    disable_offload(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("kind", ["cpu", "nvme", "nvme-copy"])
def test_a_failed_expert_fetch_raises_and_leaves_nothing_half_loaded(kind, backend, tmp_path, monkeypatch):
    model = tiny_model("gpt_moe")
    ids = prompts()
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    enable_offload(model, store_config(kind, tmp_path, 1, expert_cache_size=64, expert_break_even=1.0))
    layer_type = type(model._hf_moe_offload_state.expert_layers[0])
    method = "_load" if backend == "virtual" else "_read"

    def failing(self, *args):
        raise OSError(errno.EIO, "Input/output error (injected)")

    real = getattr(layer_type, method)
    monkeypatch.setattr(layer_type, method, failing)
    with pytest.raises(OSError, match="injected"):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    monkeypatch.setattr(layer_type, method, real)
    # an expert whose read failed is not taken for cached: (anonymous) memory never written would read zeros
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), tokens)
    disable_offload(model)


def test_an_expert_parallel_model_is_refused():
    model = tiny_model("gpt_moe")
    model.model.layers[1].mlp.experts._is_expert_parallel = True  # what DistributedConfig(ep_size=...) sets
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts is sharded by expert parallelism"):
        enable_offload(model, OffloadConfig())
    assert getattr(model, "_hf_moe_offload_state", None) is None


def mixtral_8x7b_plans():
    """The plans of a Mixtral-8x7B-shaped model (bf16), built on the meta device: nothing is allocated."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from hf_moe_offload.offload.runtime import OffloadRuntime

    config = MixtralConfig(dtype="bfloat16")  # the defaults are Mixtral-8x7B's shapes
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return OffloadRuntime(model, OffloadConfig(), torch.device("cpu"), residues={}).plans, config


@pytest.mark.parametrize("card_gib", [80, 141])
def test_the_expert_cache_of_a_mixtral_8x7b_fits_the_card(card_gib):
    experts = experts_module
    plans, config = mixtral_8x7b_plans()
    layouts = [layout for plan in plans for layout in plan.experts]
    assert len(layouts) == config.num_hidden_layers == 32
    expert_bytes = 3 * config.hidden_size * config.intermediate_size * 2  # gate, up, down in bf16
    assert all(layout.stride == expert_bytes for layout in layouts)  # 336 MiB, already 4 KiB aligned
    slots = 2 * max(plan.nbytes for plan in plans)  # prefetch_depth 1: two slots of the largest unit
    free = card_gib * 2**30 - slots
    budget = int(free * experts.EXPERT_CACHE_FREE_FRACTION)
    rows = experts.expert_cache_rows([lay.stride for lay in layouts], 8, [lay.num_experts for lay in layouts], budget)
    assert rows == min(8, budget // (32 * expert_bytes))  # naive: whole rows of every layer within the budget
    assert rows == {80: 3, 141: 6}[card_gib]  # not 8: all 8 would be 84 GiB of experts before the slots
    assert rows * 32 * expert_bytes <= budget
    assert experts.expert_cache_rows([expert_bytes] * 32, 8, [8] * 32, None) == 8  # the CPU: no byte cap


def test_an_expert_cache_byte_budget_caps_the_experts_cached(tmp_path, offloaded):
    model = tiny_model("gpt_moe")
    probe = offloaded(tiny_model("gpt_moe"), store_config("nvme-copy", tmp_path / "a", 1))
    layouts = [layout for plan in probe._hf_moe_offload_state.plans for layout in plan.experts]
    per_row = sum(layout.stride for layout in layouts)
    config = store_config("nvme-copy", tmp_path / "b", 1, expert_cache_bytes=2 * per_row + per_row // 2)
    offloaded(model, config)
    assert [layer.capacity for layer in model._hf_moe_offload_state.expert_layers] == [2] * len(layouts)
    assert get_offload_stats(model).expert_cache_bytes == 2 * per_row


def test_slots_that_cannot_fit_the_device_are_refused_before_allocating():
    from hf_moe_offload.offload.prefetch import check_slots_fit

    check_slots_fit(2**30, 2, 3 * 2**30, torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match=r"the 3 device slots .* need 3.00 GiB but cuda:0 has 2.00 GiB free"):
        check_slots_fit(2**30, 3, 2 * 2**30, torch.device("cuda", 0))
