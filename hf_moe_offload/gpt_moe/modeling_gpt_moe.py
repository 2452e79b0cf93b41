# Copyright 2026 The hf_moe_offload authors. Licensed under the Apache License, Version 2.0.
#
# This file travels with every saved GPT-MoE checkpoint (`trust_remote_code=True`): it imports only torch,
# transformers, the standard library and its sibling `configuration_gpt_moe.py`.
"""GPT-MoE: a GPT decoder with a top-k Mixture-of-Experts feed-forward on every other block (DeepSpeed-MoE for NLG)."""

# No `from __future__ import annotations` here, as in transformers' own model files: transformers reads the runtime
# return annotation of `forward` (the output class whose fields `output_router_logits` and the output recorder fill).
import math
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN, GELUActivation
from transformers.cache_utils import Cache, DynamicCache
from transformers.dynamic_module_utils import custom_object_save
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_torch_distributed_available, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_gpt_moe import GPTMoEConfig


logger = logging.get_logger(__name__)


@dataclass
class GPTMoEModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    router_top_k (`tuple(tuple(torch.FloatTensor, torch.LongTensor))`, *optional*):
        Per MoE layer, the routing weights `(tokens, k)` (0 for an assignment dropped over capacity) and the chosen
        expert ids `(tokens, k)` (before capacity), returned with `output_router_top_k=True`.
    """

    router_top_k: tuple[tuple[torch.FloatTensor, torch.LongTensor], ...] | None = None


@dataclass
class GPTMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor`):
        Switch load-balancing loss summed over the MoE layers (Megatron-DeepSpeed convention); `loss` includes
        `router_aux_loss_coef * aux_loss`.
    z_loss (`torch.FloatTensor`):
        Router z-loss summed over the MoE layers; `loss` includes `router_z_loss_coef * z_loss`.
    layer_aux_losses, layer_z_losses (`torch.FloatTensor` of shape `(num_moe_layers,)`):
        The same losses per MoE layer, for logging.
    expert_token_counts (`tuple(torch.LongTensor)`):
        Per MoE layer, the tokens each expert processed (after capacity), shape `(num_experts,)`.
    dropped_token_fraction (`torch.FloatTensor` of shape `(num_moe_layers,)`):
        Per MoE layer, the fraction of token-to-expert assignments dropped over capacity.
    """

    z_loss: torch.FloatTensor | None = None
    layer_aux_losses: torch.FloatTensor | None = None
    layer_z_losses: torch.FloatTensor | None = None
    expert_token_counts: tuple[torch.LongTensor, ...] | None = None
    dropped_token_fraction: torch.FloatTensor | None = None


class GPTMoEMLP(nn.Module):
    """The dense feed-forward: `down_proj(act(up_proj(x)))`, with biases (GPT / Megatron)."""

    def __init__(self, config: GPTMoEConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


def _storage_references(tensor: torch.Tensor) -> tuple[int, int]:
    # torch has no public reference count of a storage: this is the one look into its internals, made only by
    # `RecycledBuffers`. The c10 count sees every other tensor (views, `.data`, numpy arrays and DLPack capsules hold
    # one); the Python count of the storage object sees a caller who kept `tensor.untyped_storage()` itself (torch
    # hands out one Python object per storage). tests/test_moe_layer.py checks both on the installed torch.
    storage = tensor.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


_UNSHARED_REFERENCES = _storage_references(torch.empty(1))  # the counts of a tensor nothing else refers to


class RecycledBuffers:
    """
    CPU memory for large per-step tensors of one experts module (its weight gradients, their autocast copies), handed
    out again on later steps. Why: an `(experts, out, in)` weight gradient is far above glibc's mmap threshold (32 MB),
    so freeing it (`zero_grad(set_to_none=True)`, what `Trainer` and the optimizers do) gives it back to the OS and the
    next backward page-faults all of it in again: 0.15-0.3 s per 512 MB on 2 cores, the largest cost of a 128-expert
    layer (DeepSpeed's per-expert `nn.Linear`s have 4 MB gradients, which stay in the malloc heap). A buffer is handed
    out only when nothing but this object refers to its memory: not the `.grad` it became, a view, a saved tensor, an
    optimizer's reference, a numpy array or the storage object, so no tensor anyone still holds is ever written. The
    memory is kept until `clear()` (the module's `eval()`): between steps it holds what the next backward would
    allocate anyway.
    """

    # Per name: the `.grad` a caller holds between steps, and the one a second backward makes before adding into it.
    max_buffers_per_name = 2

    def __init__(self):
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor of `shape` and `dtype`, on recycled memory when a buffer of `name` is free."""
        shape = tuple(shape)
        with self._lock:  # a free buffer is claimed (referenced) before another thread can see it free
            kept, found = [], None
            for buffer in self._buffers.get(name, []):
                free = _storage_references(buffer) == _UNSHARED_REFERENCES
                fits = buffer.shape == shape and buffer.dtype == dtype
                if free and fits and found is None:
                    found = buffer
                if fits or not free:  # a free buffer of another shape or dtype is let go
                    kept.append(buffer)
            if found is None:
                found = torch.empty(shape, dtype=dtype)
                if len(kept) < self.max_buffers_per_name:
                    kept.append(found)
            self._buffers[name] = kept
            # a tensor of its own on the buffer's memory: autograd takes it as `.grad` without a copy
            return torch.empty(0, dtype=dtype).set_(found.untyped_storage(), 0, shape)

    @property
    def nbytes(self) -> int:
        """The bytes of memory kept (free or handed out)."""
        with self._lock:
            return sum(buffer.nbytes for buffers in self._buffers.values() for buffer in buffers)

    def clear(self) -> None:
        """Lets go of every buffer (tensors handed out stay valid: they hold their own memory)."""
        with self._lock:
            self._buffers.clear()

    def __reduce__(self):  # copies and pickles of a module start empty (no memory, no lock)
        return (type(self), ())


@use_experts_implementation(has_gate=False, has_bias=True)
class GPTMoEExperts(nn.Module):
    """The experts of one MoE layer, stacked as 3-D weights in the transformers v5 experts layout."""

    def __init__(self, config: GPTMoEConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_experts, self.intermediate_dim, self.hidden_dim))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, self.intermediate_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, self.hidden_dim, self.intermediate_dim))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, self.hidden_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        # The CPU memory of the experts' weight gradients (and autocast copies), reused across training steps by
        # `sorted_mm` (see `RecycledBuffers`); emptied by `eval()`.
        self.recycled_buffers = RecycledBuffers()

    def train(self, mode: bool = True):
        if not mode:
            self.recycled_buffers.clear()
        return super().train(mode)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        # hidden_states: (tokens, hidden); top_k_index, top_k_weights: (tokens, k). Ids >= num_experts are the
        # expert-parallel sentinels of tokens routed to another rank: they contribute nothing here.
        final_hidden_states = torch.zeros_like(hidden_states, dtype=torch.float32)  # (tokens, hidden)
        for expert_idx in top_k_index.unique().tolist():
            if expert_idx >= self.num_experts:
                continue
            token_idx, top_k_pos = torch.where(top_k_index == expert_idx)
            current_state = hidden_states[token_idx]  # (expert tokens, hidden)
            current_hidden_states = F.linear(current_state, self.up_proj[expert_idx], self.up_proj_bias[expert_idx])
            current_hidden_states = self.act_fn(current_hidden_states)
            current_hidden_states = F.linear(
                current_hidden_states, self.down_proj[expert_idx], self.down_proj_bias[expert_idx]
            )
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.float())
        return final_hidden_states.to(hidden_states.dtype)


# The experts run in one of two layouts of the routed token rows. "Sorted": rows grouped by expert, one matmul per
# expert with tokens. "Padded": a (experts, capacity, features) buffer and batched matmuls, which keep the GEMMs as
# efficient as the dense layer's; it is used when padding every expert to the busiest one's load wastes at most this
# fraction of the rows (so in training with a capacity limit, not for skewed dropless batches).
_PADDED_LAYOUT_MAX_WASTE = 0.15


def _sorted_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`inputs[rows of e] @ weight[e].T + bias[e]` for every expert `e`, the rows sorted by expert."""
    output = inputs.new_empty(inputs.shape[0], weight.shape[1])  # (assignments, out_features)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            torch.addmm(bias[expert], inputs[rows], weight[expert].t(), out=output[rows])
        start += count
    return output


def _sorted_linear_backward(
    grad_output: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, counts: list[int], grad_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Gradients of `_sorted_linear` for its weight (written into `grad_weight`, shaped as `weight`), bias and inputs;
    each expert writes its own slices once.
    """
    grad_bias = weight.new_empty(weight.shape[:2])  # (experts, out_features)
    grad_inputs = torch.empty_like(inputs)  # (assignments, in_features)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            torch.mm(grad_output[rows].t(), inputs[rows], out=grad_weight[expert])
            torch.sum(grad_output[rows], dim=0, out=grad_bias[expert])
            torch.mm(grad_output[rows], weight[expert], out=grad_inputs[rows])
        else:
            grad_weight[expert].zero_()
            grad_bias[expert].zero_()
        start += count
    return grad_weight, grad_bias, grad_inputs


def _activation_backward(act_fn: Callable, grad: torch.Tensor, pre_activation: torch.Tensor) -> torch.Tensor:
    """The gradient through `act_fn` at `pre_activation`."""
    if isinstance(act_fn, GELUActivation) and act_fn.act is F.gelu:
        return torch.ops.aten.gelu_backward(grad, pre_activation)
    with torch.enable_grad():  # any other activation: differentiate it again on the saved pre-activation
        leaf = pre_activation.detach().requires_grad_()
        (grad_pre,) = torch.autograd.grad(act_fn(leaf), leaf, grad)
    return grad_pre


def _padded_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`inputs[e] @ weight[e].T + bias[e]` for every expert, on a (experts, capacity, in_features) buffer."""
    return torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))  # (experts, capacity, out_features)


def _padded_linear_backward(
    grad_output: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, grad_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `_padded_linear` (the weight's written into `grad_weight`); padding rows hold zero gradients."""
    torch.bmm(grad_output.transpose(1, 2), inputs, out=grad_weight)
    return grad_weight, grad_output.sum(dim=1), torch.bmm(grad_output, weight)


def _empty(buffers: "RecycledBuffers | None", name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype) if buffers is None else buffers.empty(name, shape, dtype)


def _in_dtype(buffers: "RecycledBuffers | None", name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` itself when it has `dtype`, else a copy in `dtype` (on the buffers' memory of `name`)."""
    return tensor if tensor.dtype == dtype else _empty(buffers, name, tensor.shape, dtype).copy_(tensor)


class _SortedExpertsFunction(torch.autograd.Function):
    """
    The experts of one layer on the routed token rows grouped by expert (sorted or padded layout, see above), with a
    hand-written backward. Against the generic kernels this saves the scatter-add backward of the token permutation
    (a permutation's backward is a gather) and the per-expert weight-gradient buffers (each expert writes its slice
    of one `(E, ...)` gradient once).
    """

    @staticmethod
    def forward(
        ctx,
        hidden_states,
        top_k_index,
        top_k_weights,
        up_proj,
        up_proj_bias,
        down_proj,
        down_proj_bias,
        act_fn,
        buffers,
    ):
        # Under autocast the experts compute in the autocast dtype, as `F.linear` would: on casted copies of the
        # weights, whose gradients are cast back to the parameters' dtype in `backward`.
        device_type = hidden_states.device.type
        ctx.parameter_dtypes = (up_proj.dtype, up_proj_bias.dtype, down_proj.dtype, down_proj_bias.dtype)
        ctx.buffers = buffers
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            up_proj_bias, down_proj_bias = up_proj_bias.to(dtype), down_proj_bias.to(dtype)
            up_proj = _in_dtype(buffers, "up_proj_autocast", up_proj, dtype)
            down_proj = _in_dtype(buffers, "down_proj_autocast", down_proj, dtype)
        with torch.autocast(device_type, enabled=False):
            return _SortedExpertsFunction._forward(
                ctx, hidden_states, top_k_index, top_k_weights, up_proj, up_proj_bias, down_proj, down_proj_bias, act_fn
            )

    @staticmethod
    def _forward(
        ctx, hidden_states, top_k_index, top_k_weights, up_proj, up_proj_bias, down_proj, down_proj_bias, act_fn
    ):
        num_tokens, num_top_k = top_k_index.shape
        num_experts = up_proj.shape[0]
        # Assignments with weight 0 (dropped over capacity) are not computed, as in DeepSpeed: they are sorted
        # last with the expert-parallel sentinels (ids >= num_experts). Their weight gets gradient 0, which is
        # what the router's capacity mask gives it anyway.
        expert_ids = top_k_index.reshape(-1).masked_fill(top_k_weights.reshape(-1) == 0, num_experts)  # (tokens*k,)
        sorted_ids, order = torch.sort(expert_ids, stable=True)  # (tokens * k,) assignments grouped by expert
        counts = torch.bincount(expert_ids, minlength=num_experts)[:num_experts].tolist()
        num_assignments = sum(counts)
        order, sorted_ids = order[:num_assignments], sorted_ids[:num_assignments]
        token_of = order // num_top_k  # (assignments,)
        states = hidden_states.index_select(0, token_of).to(up_proj.dtype)  # (assignments, hidden)
        sorted_weights = top_k_weights.reshape(-1).index_select(0, order)  # (assignments,)

        capacity = max(counts)
        slots = None
        if num_assignments and num_experts * capacity <= (1 + _PADDED_LAYOUT_MAX_WASTE) * num_assignments:
            first_row = torch.tensor([0, *counts[:-1]], device=order.device).cumsum(0)  # (experts,)
            position = torch.arange(num_assignments, device=order.device) - first_row[sorted_ids]  # (assignments,)
            slots = sorted_ids * capacity + position  # (assignments,) row in the padded buffer
            padded = states.new_zeros(num_experts * capacity, states.shape[1])  # (experts * capacity, hidden)
            states = padded.index_copy_(0, slots, states).view(num_experts, capacity, -1)
            up = _padded_linear(states, up_proj, up_proj_bias)  # (experts, capacity, intermediate)
            activated = act_fn(up)
            down = _padded_linear(activated, down_proj, down_proj_bias)  # (experts, capacity, hidden)
            down = down.view(num_experts * capacity, -1).index_select(0, slots)  # (assignments, hidden)
        else:
            up = _sorted_linear(states, up_proj, up_proj_bias, counts)  # (assignments, intermediate)
            activated = act_fn(up)
            down = _sorted_linear(activated, down_proj, down_proj_bias, counts)  # (assignments, hidden)

        weighted = down * sorted_weights[:, None]  # (assignments, hidden), routing weights are fp32
        if num_top_k == 1 and num_assignments == num_tokens:
            output = weighted.new_empty(num_tokens, weighted.shape[1]).index_copy_(0, order, weighted)
        else:
            output = weighted.new_zeros(num_tokens, weighted.shape[1]).index_add_(0, token_of, weighted)
        ctx.save_for_backward(states, up, activated, down, sorted_weights, order, slots, up_proj, down_proj)
        ctx.counts, ctx.num_top_k, ctx.act_fn = counts, num_top_k, act_fn
        ctx.input_shape, ctx.input_dtype = hidden_states.shape, hidden_states.dtype
        ctx.weights_dtype = top_k_weights.dtype
        return output.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        with torch.autocast(grad_output.device.type, enabled=False):
            grad_hidden, grad_index, grad_weights, grad_up, grad_up_bias, grad_down, grad_down_bias = (
                _SortedExpertsFunction._backward(ctx, grad_output)
            )
        # autocast: the parameters' gradients in the parameters' dtypes
        up_dtype, up_bias_dtype, down_dtype, down_bias_dtype = ctx.parameter_dtypes
        return (
            grad_hidden,
            grad_index,
            grad_weights,
            _in_dtype(ctx.buffers, "up_proj", grad_up, up_dtype),
            grad_up_bias.to(up_bias_dtype),
            _in_dtype(ctx.buffers, "down_proj", grad_down, down_dtype),
            grad_down_bias.to(down_bias_dtype),
            None,
            None,
        )

    @staticmethod
    def _backward(ctx, grad_output):
        states, up, activated, down, sorted_weights, order, slots, up_proj, down_proj = ctx.saved_tensors
        token_of = order // ctx.num_top_k
        sorted_grad = grad_output.index_select(0, token_of).float()  # (assignments, hidden)
        grad_weights = torch.zeros(
            ctx.input_shape[0] * ctx.num_top_k, dtype=ctx.weights_dtype, device=grad_output.device
        )  # (tokens * k,)
        grad_weights.index_copy_(0, order, (down.float() * sorted_grad).sum(-1).to(ctx.weights_dtype))
        grad_down = (sorted_grad * sorted_weights[:, None]).to(down.dtype)  # (assignments, hidden)
        # The weight gradients in the compute dtype: handed to autograd as they are, or cast into the parameters'
        # dtype by `backward` (then these are scratch, named apart from the gradients).
        names = (
            ("up_proj", "down_proj") if down_proj.dtype == ctx.parameter_dtypes[2] else ("up_scratch", "down_scratch")
        )
        grad_up_proj = _empty(ctx.buffers, names[0], up_proj.shape, up_proj.dtype)
        grad_down_proj = _empty(ctx.buffers, names[1], down_proj.shape, down_proj.dtype)
        if slots is None:

            def linear_backward(grad, inputs, weight, grad_weight):
                return _sorted_linear_backward(grad, inputs, weight, ctx.counts, grad_weight)
        else:
            linear_backward = _padded_linear_backward
            grad_down = (
                grad_down.new_zeros(up.shape[0] * up.shape[1], grad_down.shape[1])
                .index_copy_(0, slots, grad_down)
                .view(up.shape[0], up.shape[1], -1)
            )  # (experts, capacity, hidden)
        grad_down_proj, grad_down_bias, grad_activated = linear_backward(
            grad_down, activated, down_proj, grad_down_proj
        )
        grad_up = _activation_backward(ctx.act_fn, grad_activated, up)
        grad_up_proj, grad_up_bias, grad_states = linear_backward(grad_up, states, up_proj, grad_up_proj)

        if slots is not None:
            grad_states = grad_states.view(-1, grad_states.shape[-1]).index_select(0, slots)  # (assignments, hidden)
        grad_hidden = grad_states.new_zeros(ctx.input_shape).index_add_(0, token_of, grad_states)
        return (
            grad_hidden.to(ctx.input_dtype),
            None,
            grad_weights.view(-1, ctx.num_top_k),
            grad_up_proj,
            grad_up_bias,
            grad_down_proj,
            grad_down_bias,
        )


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """
    `experts_implementation="sorted_mm"`, the GPT-MoE default: the routed tokens grouped by expert, in the sorted or
    padded layout, with a hand-written backward (`_SortedExpertsFunction`) on the CPU; transformers' `grouped_mm`
    kernel on accelerators.
    """
    if hidden_states.device.type != "cpu" or self.has_gate or not self.has_bias or self.is_transposed:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return _SortedExpertsFunction.apply(
        hidden_states,
        top_k_index,
        top_k_weights,
        self.up_proj,
        self.up_proj_bias,
        self.down_proj,
        self.down_proj_bias,
        self.act_fn,
        getattr(self, "recycled_buffers", None),
    )


ALL_EXPERTS_FUNCTIONS.register("sorted_mm", sorted_mm_experts_forward)


# Tensor parallelism of the experts (`tp_plan="auto"`), the one place GPT-MoE extends transformers' TP styles, and
# why: transformers' `moe_tp_experts` runs every expert on each rank's shard of the intermediate dimension and sums
# the ranks' outputs, which is right for experts without biases (every transformers MoE model with a TP plan); GPT-MoE's
# experts have a down-projection bias, which that sum would add once per rank. "gpt_moe_tp_experts" adds it on the
# first rank only and sums its gradient over the ranks; "gpt_moe_shard_last_dim" shards the up-projection bias
# `(experts, intermediate)` along the intermediate dimension (`colwise` shards a parameter's second-to-last
# dimension: the experts of a 2-D bias).
def _register_tensor_parallel_styles() -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor
    from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES, MoeExpertsParallel, TensorParallelLayer

    # `**kwargs`: transformers 5.25 passes `config` and `mesh_manager` to these methods, 5.24 does not.
    class ShardLastDim(TensorParallelLayer):
        def shard_param(self, module, param, mesh, **kwargs):
            meta = module._parameters.get(param)
            if meta is not None:
                sharded = distribute_tensor(meta, mesh, [Shard(meta.ndim - 1)], src_data_rank=None)
                module._parameters[param] = nn.Parameter(sharded, requires_grad=meta.requires_grad)

    class ExpertsWithBiasParallel(MoeExpertsParallel):
        def install_forward(self, module, mesh, **kwargs):
            module = super().install_forward(module, mesh, **kwargs)
            group = mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")
            hooked: list[nn.Parameter] = []

            def sum_gradient(param):
                dist.all_reduce(param.grad, group=group)

            tp_forward = module.forward

            def forward(*args, **kwargs):
                # Loading replaces the parameters after `install_forward`: hook the current bias, once.
                bias = module._parameters["down_proj_bias"]
                if torch.is_grad_enabled() and bias.requires_grad and not any(b is bias for b in hooked):
                    bias.register_post_accumulate_grad_hook(sum_gradient)
                    hooked[:] = [bias]
                return tp_forward(*args, **kwargs)

            module.forward = forward
            return module

        def context_around_forward(self, module, mesh):
            return _BiasOnFirstRank(super().context_around_forward(module, mesh), module, mesh)

    class _BiasOnFirstRank:
        """Inside the local-parameters context: the down-projection bias is zero on every rank but the first (the
        ranks' outputs are summed, so it enters once)."""

        def __init__(self, local_parameters, module, mesh):
            self.local_parameters, self.module, self.mesh = local_parameters, module, mesh

        def __enter__(self):
            self.local_parameters.__enter__()
            self.bias = self.module._parameters["down_proj_bias"]
            if self.mesh.get_local_rank() != 0:
                self.module._parameters["down_proj_bias"] = self.bias * 0

        def __exit__(self, *exc_info):
            self.module._parameters["down_proj_bias"] = self.bias
            return self.local_parameters.__exit__(*exc_info)

    ALL_PARALLEL_STYLES.register("gpt_moe_shard_last_dim", ShardLastDim())
    ALL_PARALLEL_STYLES.register("gpt_moe_tp_experts", ExpertsWithBiasParallel())


if is_torch_distributed_available():
    _register_tensor_parallel_styles()


class GPTMoERouter(nn.Module):
    """
    Top-k gate with DeepSpeed `top1gating` semantics, made deterministic: fp32 logits and softmax, the top-1 weight is
    the softmax probability (top-k weights with k > 1 are renormalised to sum to 1), capacity per expert
    `max(ceil(k * tokens / experts * factor), min_capacity)` with first-come priority (random priority in training,
    DeepSpeed's Random Token Selection), and noise only in training. Dropped assignments keep their expert id and get
    weight 0 (only the residual passes), a form every experts implementation handles.
    """

    def __init__(self, config: GPTMoEConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.min_capacity = config.min_capacity
        self.drop_tokens = config.drop_tokens
        self.noisy_gate_policy = config.noisy_gate_policy
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        hidden_states = hidden_states.float()  # (tokens, hidden)
        if self.training and self.noisy_gate_policy == "jitter":
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        with torch.autocast(hidden_states.device.type, enabled=False):  # an fp32 router under autocast too
            router_logits = F.linear(hidden_states, self.weight.float())  # (tokens, num_experts)
        router_probs = F.softmax(router_logits, dim=-1)  # (tokens, num_experts)
        selection_scores = router_logits
        if self.training and self.noisy_gate_policy == "rsample":
            gumbel = -torch.empty_like(router_logits).exponential_().log()  # (tokens, num_experts)
            selection_scores = router_logits + gumbel
        top_k_index = torch.topk(selection_scores, self.top_k, dim=-1).indices  # (tokens, k)
        top_k_weights = router_probs.gather(-1, top_k_index)  # (tokens, k)
        if self.top_k > 1:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        capacity = self.expert_capacity(hidden_states.shape[0])
        if capacity is not None:
            top_k_weights = top_k_weights * self._within_capacity(top_k_index, capacity)
        return router_logits, (top_k_weights, top_k_index)

    def expert_capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for a batch of `num_tokens`, or `None` when no token is dropped."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if not self.drop_tokens or factor is None:
            return None
        return max(math.ceil(self.top_k * num_tokens / self.num_experts * factor), self.min_capacity)

    def _within_capacity(self, top_k_index: torch.Tensor, capacity: int) -> torch.Tensor:
        # Assignments are served slot by slot (all first choices before any second choice, as DeepSpeed's top-2),
        # in token order at eval and in a random order in training.
        num_tokens = top_k_index.shape[0]
        assignments = top_k_index.t().reshape(-1)  # (k * tokens,) slot-major
        if self.training:
            order = torch.cat(
                [torch.randperm(num_tokens, device=assignments.device) + s * num_tokens for s in range(self.top_k)]
            )  # (k * tokens,)
        else:
            order = torch.arange(assignments.shape[0], device=assignments.device)  # (k * tokens,)
        served = assignments[order]  # (k * tokens,) in serving order
        expert_mask = F.one_hot(served, self.num_experts)  # (k * tokens, num_experts)
        position_in_expert = torch.cumsum(expert_mask, dim=0).gather(1, served[:, None]).squeeze(1) - 1
        kept = torch.empty_like(position_in_expert, dtype=torch.bool)
        kept[order] = position_in_expert < capacity
        return kept.view(self.top_k, num_tokens).t()  # (tokens, k)


class GPTMoESparseMoeBlock(nn.Module):
    """Router + experts, plus the Residual-MoE dense branch when `use_residual_moe` (DeepSpeed's `use_residual`)."""

    def __init__(self, config: GPTMoEConfig, num_experts: int):
        super().__init__()
        self.router = GPTMoERouter(config, num_experts)
        self.experts = GPTMoEExperts(config, num_experts)
        if config.use_residual_moe:
            self.residual_mlp = GPTMoEMLP(config)
            self.residual_coefficient = nn.Linear(config.hidden_size, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, input_shape[-1])  # (tokens, hidden)
        _, (top_k_weights, top_k_index) = self.router(hidden_states)
        expert_output = self.experts(hidden_states, top_k_index, top_k_weights)  # (tokens, hidden)
        if hasattr(self, "residual_mlp"):
            coefficient = F.softmax(self.residual_coefficient(hidden_states), dim=-1)  # (tokens, 2)
            expert_output = expert_output * coefficient[:, 0:1] + self.residual_mlp(hidden_states) * coefficient[:, 1:]
        return expert_output.reshape(input_shape)


class GPTMoERotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: GPTMoEConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = self.config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: GPTMoEConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # (head_dim / 2,)
        return inv_freq, 1.0

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (b, s, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, head_dim)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(1)  # (batch, 1, seq, head_dim)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (batch, heads, q_len, kv_len)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (batch, q_len, heads, head_dim)
    return attn_output, attn_weights


class GPTMoEAttention(nn.Module):
    """Multi-head self-attention with biases (GPT-2 / Megatron), rotary positions optional."""

    def __init__(self, config: GPTMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (batch, heads, seq, head_dim)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if position_embeddings is not None:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (batch, seq, hidden)
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class GPTMoEDecoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm GPT block; its feed-forward is an MoE block when the config puts more than one expert here."""

    def __init__(self, config: GPTMoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = GPTMoEAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        num_experts = config.num_experts_at(layer_idx)
        self.mlp = GPTMoESparseMoeBlock(config, num_experts) if num_experts > 1 else GPTMoEMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + self.dropout(hidden_states)
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + self.dropout(hidden_states)
        return hidden_states


def _unwrapped_class(cls: type) -> type:
    """The model class that `cls` is or wraps: FSDP2's `fully_shard` (and `replicate`) swap a module's class for a
    dynamic `FSDP<Class>(FSDPModule, Class)` defined in `torch.distributed`."""
    while (
        cls.__module__.startswith("torch.distributed.")
        and len(cls.__bases__) == 2
        and cls.__name__.endswith(cls.__bases__[1].__name__)
    ):
        cls = cls.__bases__[1]
    return cls


class GPTMoEPreTrainedModel(PreTrainedModel):
    config: GPTMoEConfig
    config_class = GPTMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPTMoEDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # capacity and the eager experts are data dependent
    _can_record_outputs = {
        "router_logits": OutputRecorder(GPTMoERouter, index=0),
        "router_top_k": OutputRecorder(GPTMoERouter, index=1),
        "hidden_states": GPTMoEDecoderLayer,
        "attentions": GPTMoEAttention,
    }

    # transformers' FSDP2 engine (`from_pretrained(..., distributed_config=...)`) swaps a sharded model's class for a
    # dynamic `FSDP<Class>` subclass defined in torch. `save_pretrained` would then copy torch's FSDP sources as the
    # model's code and name that class in `auto_map`, and the checkpoint would not load with `trust_remote_code`:
    # these two methods save the code and `auto_map` of the GPT-MoE class instead.
    @classmethod
    def is_remote_code(cls) -> bool:
        return super().is_remote_code() and _unwrapped_class(cls) is cls

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs):
        model_class = _unwrapped_class(type(self))
        if model_class is not type(self) and model_class.is_remote_code() and is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            custom_object_save(model_class.__new__(model_class), save_directory, config=self.config)
        return super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # GPT-MoE defaults to its own "sorted_mm" (faster than "grouped_mm" on the CPU, the same kernel on GPUs).
        return super().get_correct_experts_implementation(requested_experts or "sorted_mm")

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, GPTMoEExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, GPTMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)


class GPTMoEModel(GPTMoEPreTrainedModel):
    def __init__(self, config: GPTMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.rotary_emb = GPTMoERotaryEmbedding(config=config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            [GPTMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> GPTMoEModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (batch, seq, hidden)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)  # (1, seq)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = None
        if self.config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        else:
            position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        hidden_states = self.dropout(hidden_states)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return GPTMoEModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


def router_statistics(
    router_logits: tuple[torch.Tensor, ...],
    router_top_k: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
    """
    Per MoE layer: the Switch load-balancing loss `E * sum_e(mean router prob_e * fraction of tokens whose first
    choice is e)` (DeepSpeed `top1gating`), the router z-loss `mean(logsumexp(logits) ** 2)`, the tokens each expert
    processed after capacity and the fraction of dropped assignments. Padding tokens (`attention_mask == 0`) are
    left out of the losses and counts.
    """
    aux_losses, z_losses, token_counts, dropped = [], [], [], []
    for layer_logits, (top_k_weights, top_k_index) in zip(router_logits, router_top_k):
        num_tokens, num_experts = layer_logits.shape
        token_mask = torch.ones(num_tokens, device=layer_logits.device)  # (tokens,)
        if attention_mask is not None and attention_mask.numel() == num_tokens:
            token_mask = attention_mask.reshape(-1).to(device=layer_logits.device, dtype=torch.float32)
        num_real = token_mask.sum().clamp(min=1.0)
        router_probs = F.softmax(layer_logits.float(), dim=-1)  # (tokens, num_experts)
        mean_probs = (router_probs * token_mask[:, None]).sum(0) / num_real  # (num_experts,)
        first_choice = torch.zeros_like(mean_probs).index_add_(0, top_k_index[:, 0], token_mask) / num_real
        aux_losses.append(num_experts * torch.sum(mean_probs * first_choice))
        z_losses.append((torch.logsumexp(layer_logits.float(), dim=-1) ** 2 * token_mask).sum() / num_real)
        kept = (top_k_weights > 0).float() * token_mask[:, None]  # (tokens, k)
        counts = torch.zeros(num_experts, device=layer_logits.device).index_add_(
            0, top_k_index.reshape(-1), kept.reshape(-1)
        )
        token_counts.append(counts.round().long())
        dropped.append(1.0 - kept.sum() / (num_real * top_k_index.shape[1]))
    return {
        "layer_aux_losses": torch.stack(aux_losses),
        "layer_z_losses": torch.stack(z_losses),
        "expert_token_counts": tuple(token_counts),
        "dropped_token_fraction": torch.stack(dropped),
    }


# The tags of every GPT-MoE model card: those of the cards transformers writes (`push_to_hub`, `Trainer`) and of
# hf_moe_offload's own (`hub.py` reads them from here).
MODEL_TAGS = ("custom_code", "moe", "mixture-of-experts", "gpt_moe")


class GPTMoEForCausalLM(GPTMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: GPTMoEConfig):
        super().__init__(config)
        self.model = GPTMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._has_moe_layers = any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        # The tags `push_to_hub` (and `Trainer`'s model card) put on a card it creates; per instance, as
        # `add_model_tags` appends to the list.
        self.model_tags = list(MODEL_TAGS)
        self.post_init()

    def extra_repr(self) -> str:
        return f"parameters: {sum(p.numel() for p in self.parameters()):,}"

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> GPTMoECausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the language-modeling loss (shifted inside); `-100` is ignored. With labels, `loss` also holds
            `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`. Under `Trainer` (which passes
            `num_items_in_batch`), that term is weighted by this micro-batch's share of the step's label tokens, so it
            enters each optimizer step exactly once whatever the gradient accumulation and process count.
        output_router_logits (`bool`, *optional*):
            Return the router logits and the routing statistics of every MoE layer.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        need_routing = self._has_moe_layers and (output_router_logits or labels is not None)
        output_router_top_k = kwargs.pop("output_router_top_k", None) or need_routing
        outputs: GPTMoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=need_routing,
            output_router_top_k=output_router_top_k,
            **kwargs,
        )

        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # (batch, seq, vocab)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        stats = {}
        aux_loss = z_loss = None
        if need_routing:
            stats = router_statistics(outputs.router_logits, outputs.router_top_k, attention_mask)
            aux_loss = stats["layer_aux_losses"].sum()
            z_loss = stats["layer_z_losses"].sum()
            if loss is not None:
                router_loss = self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
                num_items_in_batch = kwargs.get("num_items_in_batch")
                if num_items_in_batch is not None:
                    shift_labels = kwargs.get("shift_labels")
                    counted = shift_labels if shift_labels is not None else labels[..., 1:]
                    router_loss = router_loss * counted.ne(-100).sum() / num_items_in_batch
                loss = loss + router_loss.to(loss.device)

        return GPTMoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            **stats,
        )


__all__ = [
    "GPTMoECausalLMOutputWithPast",
    "GPTMoEForCausalLM",
    "GPTMoEModel",
    "GPTMoEModelOutputWithPast",
    "GPTMoEPreTrainedModel",
]
