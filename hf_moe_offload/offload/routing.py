"""The per-call bookkeeping of a routed MoE layer, on the execution device, with one transfer to the host.

On CUDA every value the host reads from the device (`.tolist()`, `.item()`, a Python `bool` of a tensor, an op whose
output size depends on the data such as `unique` or a CUDA `bincount`) makes the host wait for the GPU to catch up,
and a host that waits cannot queue the next copies ahead of the compute. Which experts a layer routed to must reach
the host (it decides which reads to start): that is the one transfer per layer, `to_host`, which also carries the
next MoE layer's speculation votes. Everything else (the routed mask, the votes, the ranking, the renumbering of
expert ids into the compact weight) stays on the device, in ops whose output sizes are known in advance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def routed_mask(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(num_experts,) int64 on `top_k_index`'s device: 1 where an expert is routed to by any token. Ids outside
    `0..num_experts-1` (an expert-parallel sentinel) are no expert."""
    flat = top_k_index.reshape(-1).long()  # (tokens * k,)
    valid = (flat >= 0) & (flat < num_experts)
    slots = torch.where(valid, flat, num_experts)  # invalid ids land in an extra slot, dropped below
    mask = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)  # (num_experts + 1,)
    return mask.scatter_(0, slots, 1)[:num_experts]


def speculation_votes(
    hidden_states: torch.Tensor, router_weight: torch.Tensor, top_k: int, capacity: int
) -> torch.Tensor:
    """(2 * n,) int64 on the device, `n = min(capacity, num_experts)`: the `n` experts a router would pick most
    often for `hidden_states` (most votes first, ties by id), then their vote counts."""
    num_experts = router_weight.shape[0]
    logits = F.linear(hidden_states.float(), router_weight)  # (tokens, num_experts)
    picks = logits.topk(min(top_k, num_experts), dim=-1).indices.reshape(-1)  # (tokens * k,)
    votes = torch.zeros(num_experts, dtype=torch.int64, device=picks.device)  # (num_experts,)
    votes.scatter_add_(0, picks, torch.ones_like(picks))
    ranked = torch.argsort(votes, descending=True, stable=True)[: min(capacity, num_experts)]  # (n,)
    return torch.cat([ranked, votes[ranked]])


def to_host(parts: list[torch.Tensor]) -> list[list[int]]:
    """The one device-to-host transfer of a routed layer's call: the int64 1-d `parts`, concatenated, read once."""
    values = torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()
    lists, start = [], 0
    for part in parts:
        lists.append(values[start : start + part.numel()])
        start += part.numel()
    return lists


def renumber(top_k_index: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """`top_k_index` (tokens, k) renumbered into the compact weight of the `count` routed experts of `mask` (in
    ascending id order): a routed expert's id becomes its position, any other id `count` (past the last expert, so
    no expert computes it). Ids are clamped to `0..num_experts` first, as the model's own sentinel handling."""
    num_experts = mask.shape[0]
    position = torch.cumsum(mask, 0) - 1  # (num_experts,) position of each routed expert
    lookup = F.pad(torch.where(mask.bool(), position, count), (0, 1), value=count)  # (num_experts + 1,)
    return lookup[top_k_index.clamp(0, num_experts)].to(top_k_index.dtype)
