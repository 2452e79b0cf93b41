"""The naive references of the Trainer tests (also used by the distributed ones): a tiny GPT-MoE and the gradient of
one optimizer step computed by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM


VOCAB = 512


def tiny_moe(**overrides) -> GPTMoEForCausalLM:
    return GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe", **overrides))


# A strong router term (so counting it twice would show), and capacity that never drops a token (so the random
# priority of training routing changes nothing).
STEP_CONFIG = {"router_aux_loss_coef": 1.0, "router_z_loss_coef": 0.1, "capacity_factor": 16.0}


def record_micro_batches(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    return seen


def naive_step_gradient(initial_state: dict, micro_batches: list[torch.Tensor], router_weight) -> dict:
    """Gradient of `sum(CE) / all label tokens + sum_mb router_weight(mb) * (coef_aux * aux + coef_z * z)`."""
    model = tiny_moe(**STEP_CONFIG)
    model.load_state_dict(initial_state)
    model.train()
    total = sum(ids[:, 1:].numel() for ids in micro_batches)
    objective = 0.0
    for ids in micro_batches:
        out = model(ids, output_router_logits=True)
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
        router = STEP_CONFIG["router_aux_loss_coef"] * out.aux_loss + STEP_CONFIG["router_z_loss_coef"] * out.z_loss
        objective = objective + ce / total + router_weight(ids, total) * router
    objective.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_sgd_step_is(initial: dict, updated: dict, gradient: dict) -> None:
    for name, grad in gradient.items():
        torch.testing.assert_close(updated[name], initial[name] - grad, msg=name)


def router_once(ids, total):  # each micro-batch's router term weighted by its share of the step's tokens
    return ids[:, 1:].numel() / total


def router_per_micro_batch(ids, total):  # the over-counting the weights prevent
    return 1.0
