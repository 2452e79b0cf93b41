"""Router, experts and MoE block against naive reference implementations (loops, no shortcuts)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hf_moe_offload import GPTMoEConfig
from hf_moe_offload.gpt_moe import modeling_gpt_moe
from hf_moe_offload.gpt_moe.modeling_gpt_moe import (
    GPTMoEExperts,
    GPTMoEMLP,
    GPTMoERouter,
    GPTMoESparseMoeBlock,
    router_statistics,
)


@pytest.fixture(params=["sorted", "padded"])
def sorted_mm_layout(request, force_sorted_mm_layout):
    """Runs a `sorted_mm` test with each of its two row layouts forced."""
    force_sorted_mm_layout(request.param)
    return request.param


def make_config(**overrides) -> GPTMoEConfig:
    config = GPTMoEConfig.from_preset("tiny-moe", **overrides)
    config._experts_implementation = "eager"
    return config


def naive_routing(logits, top_k, capacity):
    """DeepSpeed gating, one token at a time: first choices of all tokens in token order, then second choices."""
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)
    choices, weights = [], []
    for t in range(num_tokens):
        ranked = sorted(range(num_experts), key=lambda e: (-logits[t, e].item(), e))[:top_k]
        chosen = [probs[t, e].item() for e in ranked]
        if top_k > 1:
            chosen = [w / sum(chosen) for w in chosen]
        choices.append(ranked)
        weights.append(chosen)
    load = [0] * num_experts
    for slot in range(top_k):
        for t in range(num_tokens):
            expert = choices[t][slot]
            load[expert] += 1
            if capacity is not None and load[expert] > capacity:
                weights[t][slot] = 0.0
    return torch.tensor(choices), torch.tensor(weights, dtype=torch.float64)


def naive_experts(experts, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states, dtype=torch.float64)
    for t in range(hidden_states.shape[0]):
        for slot in range(top_k_index.shape[1]):
            e = top_k_index[t, slot].item()
            if e >= experts.num_experts:
                continue
            h = experts.up_proj[e].double() @ hidden_states[t].double() + experts.up_proj_bias[e].double()
            h = experts.act_fn(h)
            h = experts.down_proj[e].double() @ h + experts.down_proj_bias[e].double()
            out[t] += top_k_weights[t, slot].double() * h
    return out


def init_module(module, std=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("capacity_factor", "num_tokens"), [(1.0, 40), (0.5, 40), (1.0, 3)])
def test_router_matches_naive_capacity_and_dropping(top_k, capacity_factor, num_tokens):
    config = make_config(num_experts_per_tok=top_k, eval_capacity_factor=capacity_factor, min_capacity=2)
    router = init_module(GPTMoERouter(config, 8)).eval()
    hidden = torch.randn(num_tokens, config.hidden_size)
    logits, (weights, index) = router(hidden)
    capacity = max(math.ceil(top_k * num_tokens / 8 * capacity_factor), 2)
    assert router.expert_capacity(num_tokens) == capacity
    ref_index, ref_weights = naive_routing(logits, top_k, capacity)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-6, atol=1e-7)  # fp32 softmax vs fp64 reference
    assert logits.dtype == torch.float32 and weights.dtype == torch.float32
    if capacity_factor == 0.5 and num_tokens == 40:
        assert (weights == 0).any(), "this case overflows: some assignments must be dropped"


def test_router_top1_weight_is_the_unrenormalised_probability():
    config = make_config()
    router = init_module(GPTMoERouter(config, 8)).eval()
    logits, (weights, _) = router(torch.randn(16, config.hidden_size))
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(weights[:, 0], probs.max(dim=-1).values)
    assert (weights < 1).all()


def test_eval_is_dropless_by_default_and_drop_tokens_false_never_drops():
    config = make_config()  # eval_capacity_factor=None
    router = init_module(GPTMoERouter(config, 8)).eval()
    hidden = torch.randn(64, config.hidden_size) + 3.0  # skewed: most tokens pick the same expert
    _, (weights, _) = router(hidden)
    assert router.expert_capacity(64) is None and (weights > 0).all()
    no_drop = init_module(GPTMoERouter(make_config(drop_tokens=False), 8)).train()
    assert no_drop.expert_capacity(64) is None
    _, (weights, _) = no_drop(hidden)
    assert (weights > 0).all()


def test_training_capacity_uses_random_token_selection_within_capacity():
    config = make_config(capacity_factor=1.0, min_capacity=1)
    router = init_module(GPTMoERouter(config, 8)).train()
    hidden = torch.randn(64, config.hidden_size) + 2.0
    _, (weights, index) = router(hidden)
    capacity = router.expert_capacity(64)
    for e in range(8):
        load = int((index[:, 0] == e).sum())
        kept = int(((index[:, 0] == e) & (weights[:, 0] > 0)).sum())
        assert kept == min(load, capacity)
    # With overflow, the survivors are not just the first tokens (random priority in training only).
    overflowing = [e for e in range(8) if int((index[:, 0] == e).sum()) > capacity]
    assert overflowing
    survivors = [torch.nonzero((index[:, 0] == e) & (weights[:, 0] > 0)).flatten().tolist() for e in overflowing]
    first_come = [torch.nonzero(index[:, 0] == e).flatten()[:capacity].tolist() for e in overflowing]
    torch.manual_seed(1)
    _, (weights2, _) = router(hidden)
    assert survivors != first_come or not torch.equal(weights, weights2)


@pytest.mark.parametrize("policy", ["jitter", "rsample"])
def test_noise_only_in_training_and_eval_is_deterministic(policy):
    config = make_config(noisy_gate_policy=policy, router_jitter_noise=0.5)
    router = init_module(GPTMoERouter(config, 8))
    hidden = torch.randn(256, config.hidden_size)
    router.eval()
    first = router(hidden)
    second = router(hidden)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1][1], second[1][1])
    clean_index = hidden.float() @ router.weight.t()
    assert torch.equal(first[1][1][:, 0], clean_index.argmax(-1))
    router.train()
    noisy = router(hidden)
    assert not torch.equal(noisy[1][1], first[1][1])


def test_router_handles_a_single_token():
    router = init_module(GPTMoERouter(make_config(), 8)).train()
    _, (weights, index) = router(torch.randn(1, 64))
    assert index.shape == (1, 1) and weights.item() > 0  # min_capacity keeps it; no assertion on tiny batches


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(
    "implementation", ["eager", "grouped_mm", "batched_mm", "sorted_mm:sorted", "sorted_mm:padded"]
)
def test_experts_match_naive_forward_and_backward(top_k, implementation, force_sorted_mm_layout):
    implementation, _, layout = implementation.partition(":")
    if layout:
        force_sorted_mm_layout(layout)
    config = make_config(num_experts_per_tok=top_k)
    config._experts_implementation = implementation
    experts = init_module(GPTMoEExperts(config, 8), std=0.1)
    hidden = torch.randn(24, config.hidden_size, requires_grad=True)
    index = torch.randint(0, 7, (24, top_k))  # expert 7 gets no token
    weights = torch.rand(24, top_k)
    weights[3, 0] = 0.0  # a dropped assignment
    out = experts(hidden, index, weights)
    ref = naive_experts(experts, hidden, index, weights)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)  # fp32 kernels vs fp64 loop
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [hidden, experts.up_proj, experts.down_proj, experts.up_proj_bias], grad_out)
    ref_grads = torch.autograd.grad(
        ref, [hidden, experts.up_proj, experts.down_proj, experts.up_proj_bias], grad_out.double()
    )
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)  # fp32 accumulation order differs
    assert torch.count_nonzero(grads[1][7]) == 0  # the idle expert gets a zero gradient


@pytest.mark.parametrize("implementation", ["eager", "sorted_mm"])
def test_experts_skip_expert_parallel_sentinels(implementation, sorted_mm_layout):
    config = make_config()
    config._experts_implementation = implementation
    experts = init_module(GPTMoEExperts(config, 4), std=0.1)
    hidden = torch.randn(6, config.hidden_size)
    index = torch.tensor([[0], [4], [1], [4], [3], [0]])  # 4 == num_experts: routed to another rank
    weights = torch.rand(6, 1)
    out = experts(hidden, index, weights)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
    torch.testing.assert_close(out.double(), naive_experts(experts, hidden, index, weights), rtol=1e-5, atol=1e-6)


def test_one_expert_moe_equals_the_dense_mlp():
    config = make_config(eval_capacity_factor=None)
    block = GPTMoESparseMoeBlock(config, 1).eval()
    mlp = init_module(GPTMoEMLP(config), std=0.1)
    with torch.no_grad():
        block.router.weight.normal_()
        block.experts.up_proj.copy_(mlp.up_proj.weight[None])
        block.experts.up_proj_bias.copy_(mlp.up_proj.bias[None])
        block.experts.down_proj.copy_(mlp.down_proj.weight[None])
        block.experts.down_proj_bias.copy_(mlp.down_proj.bias[None])
    hidden = torch.randn(2, 5, config.hidden_size)
    torch.testing.assert_close(block(hidden), mlp(hidden), rtol=0, atol=0)  # softmax over one expert is exactly 1


def test_residual_moe_mixes_experts_and_dense_branch():
    config = make_config(use_residual_moe=True)
    block = init_module(GPTMoESparseMoeBlock(config, 8), std=0.1).eval()
    hidden = torch.randn(10, config.hidden_size)
    _, (weights, index) = block.router(hidden)
    experts = naive_experts(block.experts, hidden, index, weights)
    coefficient = torch.softmax(block.residual_coefficient(hidden).double(), dim=-1)
    ref = experts * coefficient[:, :1] + block.residual_mlp(hidden).double() * coefficient[:, 1:]
    torch.testing.assert_close(block(hidden).double(), ref, rtol=1e-5, atol=1e-6)  # fp32 vs fp64


def test_router_statistics_match_naive_loops():
    torch.manual_seed(3)
    logits = torch.randn(12, 4)
    index = torch.randint(0, 4, (12, 2))
    weights = torch.rand(12, 2)
    weights[0, 1] = 0.0
    weights[5, 0] = 0.0
    mask = torch.ones(2, 6)
    mask[0, :2] = 0  # left padding
    stats = router_statistics((logits,), ((weights, index),), mask)
    real = [t for t in range(12) if mask.flatten()[t] > 0]
    probs = torch.softmax(logits.double(), -1)
    mean_prob = [sum(probs[t, e].item() for t in real) / len(real) for e in range(4)]
    fraction = [sum(1 for t in real if index[t, 0] == e) / len(real) for e in range(4)]
    aux = 4 * sum(p * f for p, f in zip(mean_prob, fraction))
    z = sum(torch.logsumexp(logits[t].double(), -1).item() ** 2 for t in real) / len(real)
    counts = [sum(1 for t in real for k in range(2) if index[t, k] == e and weights[t, k] > 0) for e in range(4)]
    dropped = sum(1 for t in real for k in range(2) if weights[t, k] == 0) / (2 * len(real))
    assert stats["layer_aux_losses"].item() == pytest.approx(aux, rel=1e-6)
    assert stats["layer_z_losses"].item() == pytest.approx(z, rel=1e-6)
    assert stats["expert_token_counts"][0].tolist() == counts
    assert stats["dropped_token_fraction"].item() == pytest.approx(dropped, rel=1e-6)


def test_switch_loss_is_one_for_a_perfectly_uniform_router():
    logits = torch.zeros(8, 4)
    index = torch.arange(8).remainder(4)[:, None]
    stats = router_statistics((logits,), ((torch.full((8, 1), 0.25), index),))
    assert stats["layer_aux_losses"].item() == pytest.approx(1.0)
    assert F.softmax(logits, -1)[0, 0] == 0.25


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "silu"])
def test_sorted_mm_backward_for_any_activation(activation, sorted_mm_layout):
    config = make_config(hidden_act=activation, num_experts_per_tok=2)
    config._experts_implementation = "sorted_mm"
    experts = init_module(GPTMoEExperts(config, 4), std=0.1)
    hidden = torch.randn(10, config.hidden_size, requires_grad=True)
    index, weights = torch.randint(0, 4, (10, 2)), torch.rand(10, 2, requires_grad=True)
    out = experts(hidden, index, weights)
    ref = naive_experts(experts, hidden, index, weights)
    grad_out = torch.randn_like(out)
    params = [hidden, weights, experts.up_proj, experts.up_proj_bias, experts.down_proj, experts.down_proj_bias]
    grads = torch.autograd.grad(out, params, grad_out)
    ref_grads = torch.autograd.grad(ref, params, grad_out.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)  # fp32 vs fp64 loop


@pytest.mark.parametrize(
    ("index", "layout"),
    [
        (torch.arange(32).remainder(8)[:, None], "padded"),  # balanced: 4 rows per expert, no padding
        (torch.zeros(32, 1, dtype=torch.long), "sorted"),  # one hot expert: padding would waste 7/8 of the rows
    ],
)
def test_sorted_mm_picks_the_padded_layout_only_when_it_wastes_little(index, layout, monkeypatch):
    config = make_config()
    config._experts_implementation = "sorted_mm"
    experts = init_module(GPTMoEExperts(config, 8), std=0.1)
    used = []
    monkeypatch.setattr(
        modeling_gpt_moe,
        "_padded_linear",
        lambda *a: used.append("padded") or torch.baddbmm(a[2].unsqueeze(1), a[0], a[1].transpose(1, 2)),
    )
    hidden = torch.randn(32, config.hidden_size)
    out = experts(hidden, index, torch.rand(32, 1))
    assert ("padded" if used else "sorted") == layout
    assert out.shape == hidden.shape


@pytest.mark.parametrize("implementation", ["eager", "sorted_mm:sorted", "sorted_mm:padded"])
def test_experts_under_bf16_autocast_compute_in_bf16_and_give_fp32_gradients(implementation, force_sorted_mm_layout):
    implementation, _, layout = implementation.partition(":")
    if layout:
        force_sorted_mm_layout(layout)
    config = make_config()
    config._experts_implementation = implementation
    experts = init_module(GPTMoEExperts(config, 4), std=0.1)
    hidden = torch.randn(32, config.hidden_size, requires_grad=True)
    index = torch.randint(0, 4, (32, 1))
    weights = torch.rand(32, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(hidden, index, weights)
    out.backward(torch.ones_like(out))
    assert experts.up_proj.grad.dtype == experts.down_proj_bias.grad.dtype == torch.float32
    assert hidden.grad.dtype == torch.float32
    # the same math on bf16 copies of the weights, without autocast
    reference = naive_experts(init_module_copy(experts, torch.bfloat16), hidden.detach(), index, weights)
    torch.testing.assert_close(out.double(), reference, rtol=2e-2, atol=2e-2)  # bf16 rounding of every matmul


def init_module_copy(experts: GPTMoEExperts, dtype: torch.dtype) -> GPTMoEExperts:
    """`experts` with its weights rounded to `dtype` and back (what autocast multiplies with)."""
    copy = GPTMoEExperts(make_config(), experts.num_experts)
    with torch.no_grad():
        for target, source in zip(copy.parameters(), experts.parameters()):
            target.copy_(source.to(dtype).float())
    return copy


def test_router_stays_fp32_under_autocast():
    config = make_config()
    router = init_module(GPTMoERouter(config, 8), std=0.1).eval()
    hidden = torch.randn(16, config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, (weights, _) = router(hidden)
    assert logits.dtype == weights.dtype == torch.float32
    assert torch.equal(logits, F.linear(hidden, router.weight))


def test_recycled_buffers_hand_memory_out_again_only_when_nothing_else_holds_it():
    buffers = modeling_gpt_moe.RecycledBuffers()
    first = buffers.empty("w", (4, 3), torch.float32)
    second = buffers.empty("w", (4, 3), torch.float32)
    addresses = {first.data_ptr(), second.data_ptr()}
    assert len(addresses) == 2  # the first is still held
    del second
    assert buffers.empty("w", (4, 3), torch.float32).data_ptr() in addresses  # free again: handed out again
    holders = (lambda t: t[1:], lambda t: t.detach(), lambda t: t.numpy(), lambda t: t.untyped_storage())
    for holder in holders:
        kept = holder(first)  # a view, a numpy array or the storage object alone keeps the memory in use
        address = first.data_ptr()
        del first
        again = buffers.empty("w", (4, 3), torch.float32)
        other = buffers.empty("w", (4, 3), torch.float32)
        assert address not in (again.data_ptr(), other.data_ptr())
        del again, other, kept
        first = buffers.empty("w", (4, 3), torch.float32)
        assert first.data_ptr() in addresses  # recycled (this checks torch still counts a storage's references)
    assert buffers.empty("w", (4, 3), torch.float64).dtype == torch.float64  # another dtype: other memory
    assert buffers.nbytes > 0
    buffers.clear()
    assert buffers.nbytes == 0 and first.sum().isfinite()  # what was handed out stays valid


@pytest.mark.parametrize("autocast", [False, True])
def test_sorted_mm_recycles_gradient_memory_but_never_writes_a_gradient_still_held(autocast, sorted_mm_layout):
    config = make_config()
    config._experts_implementation = "sorted_mm"
    experts = init_module(GPTMoEExperts(config, 4), std=0.1).train()
    fresh = copy.deepcopy(experts)  # the same module computing on freshly allocated memory
    fresh.recycled_buffers = None
    hidden = torch.randn(32, config.hidden_size)
    index = torch.randint(0, 4, (32, 1))
    weights = torch.rand(32, 1)

    def step(module, scale, backwards=1):
        for _ in range(backwards):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = module(hidden * scale, index, weights)
            out.backward(torch.ones_like(out))
        grads = [module.up_proj.grad, module.down_proj.grad]
        module.zero_grad(set_to_none=True)  # what Trainer and the optimizers do
        assert all(g.dtype == torch.float32 for g in grads)
        return grads

    held = step(experts, 1.0)  # a caller keeps the first step's gradients
    held_values = [g.clone() for g in held]
    second = step(experts, 2.0)
    assert not {g.data_ptr() for g in second} & {g.data_ptr() for g in held}
    for got, want in zip(held, held_values):
        assert torch.equal(got, want)  # untouched by the second step
    for got, want in zip(second, step(fresh, 2.0)):
        assert torch.equal(got, want)
    addresses = {g.data_ptr() for g in held + second}
    del held, second
    third = step(experts, 3.0, backwards=2)  # gradient accumulation: the second backward adds into the first
    assert {g.data_ptr() for g in third} <= addresses  # recycled, no new memory
    for got, want in zip(third, step(fresh, 3.0, backwards=2)):
        assert torch.equal(got, want)
    assert experts.recycled_buffers.nbytes > 0
    assert copy.deepcopy(experts).recycled_buffers.nbytes == 0  # copies start empty
    experts.eval()  # lets the memory go
    assert experts.recycled_buffers.nbytes == 0
