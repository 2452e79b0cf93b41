"""accelerate `ModelHook`s that stream every weight of a causal LM from a store: `enable_offload`, `disable_offload`,
`load_offloaded`, `get_offload_stats`.

The model is cut into units: each block of its decoder `ModuleList`, and each other top-level module that holds
parameters (embeddings, final norm, head). A unit hook binds the unit's parameters to views of a device slot before
the unit runs and puts them back to placeholders after. Between uses a parameter is a placeholder of the right shape,
dtype and device (so `model.device`, `model.dtype` and `generate` work unchanged) whose every element reads NaN, so a
weight used outside its unit cannot go unnoticed. Buffers (rotary tables, masks) and the parameters owned directly by
the modules above the block list stay on the execution device.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import queue
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import send_to_device
from torch import nn
from transformers.utils import logging

from .config import OffloadConfig
from .experts import attach_experts, detach_experts, find_experts_modules
from .prefetch import FetchPipeline, OffloadStats
from .store import (
    SAFETENSORS_DTYPES,
    CheckpointStore,
    CpuStore,
    ExpertGroup,
    NvmeStore,
    ReadRange,
    TensorSpec,
    UnitPlan,
    align_up,
    assemble,
    crc32_tensor,
    own_tensors,
    plan_units,
    read_safetensors_header,
    tensor_bytes,
)


logger = logging.get_logger(__name__)

_STATE_ATTR = "_hf_moe_offload_state"
_GUARDED_METHODS = ("to", "cuda", "cpu", "half", "float", "double", "bfloat16", "xpu", "type", "to_empty")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `ModuleList` holding the decoder blocks: not inside another list, preferably of a `_no_split_modules`
    class, else the one with the most parameters."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(other + ".") for other, _ in candidates):
            continue
        numel = sum(p.numel() for p in module.parameters())
        preferred = type(module[0]).__name__ in no_split
        candidates.append((name, module, preferred, numel))
    candidates = [c for c in candidates if c[3] > 0]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no torch.nn.ModuleList of decoder blocks (such as model.layers or "
            f"transformer.h): the offload runtime streams a decoder-only causal LM block by block"
        )
    name, module, _, _ = max(candidates, key=lambda c: (c[2], c[3]))
    return name, module


def _find_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Units in module order: the blocks, and the other modules holding parameters that are not above the blocks."""
    list_name, blocks = _find_block_list(model)
    parts = list_name.split(".")
    ancestors = {".".join(parts[:i]) for i in range(len(parts))}
    units: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name in ancestors:
            continue
        if name == list_name:
            units.extend((f"{list_name}.{i}", block) for i, block in enumerate(blocks))
            continue
        if name.startswith(list_name + ".") or any(name.startswith(unit + ".") for unit, _ in units):
            continue
        if any(True for _ in module.parameters()):
            units.append((name, module))
    return units


def _placeholder(spec: TensorSpec, device: torch.device, requires_grad: bool) -> nn.Parameter:
    fill = float("nan") if spec.dtype.is_floating_point else 0
    data = torch.full((), fill, dtype=spec.dtype, device=device).expand(spec.shape)
    return nn.Parameter(data, requires_grad=requires_grad and spec.dtype.is_floating_point)


class _UnitHook(ModelHook):
    def __init__(self, state: _OffloadState, unit: int):
        self.state = state
        self.unit = unit

    def pre_forward(self, module, *args, **kwargs):
        self.state.acquire(self.unit)
        return args, kwargs

    def post_forward(self, module, output):
        self.state.release(self.unit)
        return output


class _EmbeddingHook(ModelHook):
    """An `nn.Embedding` unit reads only the rows of the ids it is given, not its whole table: the lookup of a
    50k-token vocabulary at batch 1 moves a few KB instead of hundreds of MB. The module runs on the gathered rows
    with the ids renumbered, which is the same lookup bit for bit."""

    def __init__(self, state: _OffloadState, unit: int):
        self.state = state
        self.unit = unit
        self.padding_idx = None

    def init_hook(self, module):
        # padding_idx only shapes gradients, and the renumbered ids would not match it: off while offloaded
        self.padding_idx, module.padding_idx = module.padding_idx, None
        return module

    def detach_hook(self, module):
        module.padding_idx = self.padding_idx
        return module

    def pre_forward(self, module, input, *args, **kwargs):
        rows, inverse = self.state.gather_rows(self.unit, input)
        self.state.bind(self.unit, [(self.state.plans[self.unit].tensors[0][0].name, rows)])
        return (inverse, *args), kwargs

    def post_forward(self, module, output):
        self.state.unbind(self.unit)
        return output


class _RootHook(ModelHook):
    # Inference only: slot memory is reused by the next unit, so nothing may keep a weight for a backward pass.
    no_grad = True

    def __init__(self, state: _OffloadState, skip_keys: Any):
        self.state = state
        self.skip_keys = skip_keys

    def pre_forward(self, module, *args, **kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(tokens, torch.Tensor):
            embeds = kwargs.get("inputs_embeds")
            tokens = embeds[..., 0] if isinstance(embeds, torch.Tensor) else None
        self.state.begin_forward(tokens.numel() if tokens is not None else None)
        device = self.state.device
        return send_to_device(args, device), send_to_device(kwargs, device, skip_keys=self.skip_keys)

    def post_forward(self, module, output):
        self.state.end_forward()
        return output


class _OffloadState:
    """Everything `enable_offload` changed on a model, and how to undo it."""

    def __init__(self, model: nn.Module, config: OffloadConfig):
        self.config = config
        self.device = config.execution_device
        self.unit_modules = _find_units(model)
        # every place a parameter sits, grouped by tensor (tied weights have several)
        self.locations: dict[str, list[tuple[nn.Module, str]]] = {}
        self.originals: dict[str, nn.Parameter] = {}
        paths: dict[str, list[str]] = {}
        canonical: dict[int, str] = {}
        for full_name, param in model.named_parameters(remove_duplicate=False):
            module_name, _, attr = full_name.rpartition(".")
            name = canonical.setdefault(id(param), full_name)
            self.locations.setdefault(name, []).append((model.get_submodule(module_name), attr))
            paths.setdefault(name, []).append(module_name)
            self.originals[name] = param
        # MoE layers (v5 fused experts) inside the blocks: their experts are stored expert-major
        self.experts_modules: dict[str, nn.Module] = {}
        groups: dict[int, list[ExpertGroup]] = {}
        fused: set[str] = set()
        for index, (unit_name, unit_module) in enumerate(self.unit_modules):
            for experts_name, module, attrs in find_experts_modules(unit_module, unit_name):
                if getattr(module, "_is_expert_parallel", False):
                    raise ValueError(
                        f"{experts_name} is sharded by expert parallelism (ep_size > 1): an expert-parallel model "
                        f"cannot be offloaded; load it without distributed_config to offload it"
                    )
                names = [f"{experts_name}.{attr}" for attr in attrs]
                if not names or any(name not in self.locations or len(self.locations[name]) > 1 for name in names):
                    continue  # tied or shared expert weights: streamed with the block
                params = tuple(TensorSpec(n, self.originals[n].dtype, tuple(self.originals[n].shape)) for n in names)
                groups.setdefault(index, []).append(ExpertGroup(experts_name, params))
                self.experts_modules[experts_name] = module
                fused.update(names)
        unit_specs: list[tuple[str, list[TensorSpec]]] = []
        owned: set[str] = set()
        for unit_name, _ in self.unit_modules:
            specs = []
            for name in self.locations:
                if any(_is_under(path, unit_name) for path in paths[name]):
                    owned.add(name)
                    if name not in fused:
                        param = self.originals[name]
                        specs.append(TensorSpec(name, param.dtype, tuple(param.shape)))
            unit_specs.append((unit_name, specs))
        self.resident_names = [name for name in self.locations if name not in owned]
        self.plans = plan_units(unit_specs, groups)
        self.expert_layers: list = []
        # the mean fraction of a layer's experts that forwards of 2**(bucket-1) to 2**bucket - 1 tokens touched
        self.touched: dict[int, float] = {}
        self.bucket = 0
        self.break_even = 1.0
        self.expert_staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # pinned buffers (CUDA)
        self.bound: dict[int, tuple[int, list[str]]] = {}  # unit -> (slot index, names bound)
        self._views: dict[tuple[int, int, int], list[tuple[str, nn.Parameter]]] = {}  # (unit, slot, plan id)
        # Bound weights keep their parameter's requires_grad: kernels choose their path on it (a frozen weight sends
        # a strided 3-D linear through a materialised batched matmul), so the offloaded model takes the in-memory
        # model's paths. Forwards run under no_grad (the root hook), so nothing is recorded for backward.
        self.requires_grad = {name: p.requires_grad for name, p in self.originals.items()}
        # where disable_offload puts each weight back (a meta weight, from load_offloaded, goes to the CPU)
        self.restore_to = {name: p.device for name, p in self.originals.items() if p.device.type != "meta"}
        self.placeholders = {
            name: _placeholder(TensorSpec(name, p.dtype, tuple(p.shape)), self.device, p.requires_grad)
            for name, p in self.originals.items()
            if name in owned
        }
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        self.guarded: list[str] = []
        self.store = None
        self.pipeline: FetchPipeline | None = None
        self.resident_bytes = 0

    # -- binding ------------------------------------------------------------------------------------------------

    def _unit_views(self, unit: int, slot) -> list[tuple[str, nn.Parameter]]:
        plan = slot.plan
        mapped = slot.mapped is not None  # the plan's mapping, the same at every fetch: views made once per plan
        key = (unit, -1 if mapped else slot.index, id(plan))
        views = self._views.get(key)
        if views is None:
            if mapped:

                def region(offset: int, nbytes: int) -> torch.Tensor:
                    start, data = next((s, d) for s, d in slot.mapped if s <= offset < s + d.numel())
                    return data[offset - start : offset - start + nbytes]

            else:

                def region(offset: int, nbytes: int) -> torch.Tensor:
                    return slot.buffer[offset : offset + nbytes]

            views = self._views_of(plan, region)
            self._views[key] = views
        return views

    def _views_of(self, plan: UnitPlan, region) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every tensor `plan` brings, `region(offset, nbytes)` giving its bytes."""
        views = [
            (spec.name, nn.Parameter(region(offset, spec.nbytes).view(spec.dtype).view(spec.shape)))
            for spec, offset in plan.tensors
        ]
        for layout in plan.experts:  # a whole MoE layer: its fused weights strided over the experts
            data = region(layout.offset, layout.num_experts * layout.stride)
            for spec, view in zip(layout.group.params, layout.views(data, layout.num_experts), strict=True):
                views.append((spec.name, nn.Parameter(view)))
        for name, param in views:
            param.requires_grad_(self.requires_grad[name] and param.is_floating_point())
        return views

    def bind(self, unit: int, values: list[tuple[str, nn.Parameter]], slot: int = -1) -> None:
        if unit in self.bound:
            raise RuntimeError(f"unit {self.plans[unit].name} was entered again while it runs (recursive forward)")
        for name, value in values:
            for module, attr in self.locations[name]:
                module._parameters[attr] = value
        self.bound[unit] = (slot, [name for name, _ in values])

    def unbind(self, unit: int) -> bool:
        entry = self.bound.pop(unit, None)
        if entry is None:
            return False
        for name in entry[1]:
            placeholder = self.placeholders[name]
            for module, attr in self.locations[name]:
                module._parameters[attr] = placeholder
        return True

    def acquire(self, unit: int) -> None:
        if unit in self.bound:
            raise RuntimeError(f"unit {self.plans[unit].name} was entered again while it runs (recursive forward)")
        slot = self.pipeline.acquire(unit)
        self.bind(unit, self._unit_views(unit, slot), slot.index)

    def release(self, unit: int) -> None:
        slot = self.bound.get(unit, (-1, None))[0]
        if self.unbind(unit) and slot != -1:
            self.pipeline.release(unit)

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor of a unit's own region, read from the store into a CPU tensor."""
        spec, offset, plan = next((s, o, p) for p in self.plans for s, o in p.own if s.name == name)
        data = torch.empty(spec.nbytes, dtype=torch.uint8)
        self.store.read(ReadRange(plan.key, offset, 0, spec.nbytes), data, 0, spec.nbytes)
        self.store.read_bytes -= spec.nbytes  # set-up, not traffic
        return data.view(spec.dtype).view(spec.shape)

    def gather_rows(self, unit: int, ids: torch.Tensor) -> tuple[nn.Parameter, torch.Tensor]:
        """The rows of the embedding table of `unit` that `ids` use, and `ids` renumbered into them."""
        plan = self.plans[unit]
        ((spec, offset),) = plan.tensors
        rng = next(r for r in plan.ranges if r.dst_offset <= offset < r.dst_offset + r.nbytes)
        table_start = rng.src_offset + (offset - rng.dst_offset)
        unique, inverse = torch.unique(ids, return_inverse=True)
        row_bytes = spec.nbytes // spec.shape[0]
        rows = torch.empty((len(unique), *spec.shape[1:]), dtype=spec.dtype)
        buffer = tensor_bytes(rows)
        for k, row in enumerate(unique.tolist()):
            if not 0 <= row < spec.shape[0]:
                raise IndexError(f"index {row} is out of range for the embedding {spec.name} of {spec.shape[0]} rows")
            start = k * row_bytes
            self.store.read(
                ReadRange(rng.source, table_start + row * row_bytes, start, row_bytes), buffer, start, start + row_bytes
            )
        self.pipeline.stats.bytes_fetched += buffer.numel()
        return nn.Parameter(rows.to(self.device), self.requires_grad[spec.name]), inverse.to(ids.device)

    def begin_forward(self, num_tokens: int | None = None) -> None:
        # A forward that ended in an exception (KeyboardInterrupt included) left units bound: put them back.
        for unit in list(self.bound):
            self.release(unit)
        self.pipeline.stats.forward_passes += 1
        if self.expert_layers:
            for layer in self.expert_layers:
                layer.touched = None  # what an interrupted forward measured is not kept
            self.bucket = num_tokens.bit_length() if num_tokens else 0
            touched = self.touched.get(self.bucket)
            if touched is None:  # a size not seen yet: what uniform routing would touch (every forward measures)
                touched = self.expected_experts_fraction(num_tokens) if num_tokens else 0.0
            routed = touched <= self.break_even
            group = self.pipeline.group
            if group is not None:  # every process must fetch the same plans (their reads are all-gathered)
                flag = torch.tensor([int(routed)], device=self.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
                routed = bool(flag.item())
            self.pipeline.set_routed(routed)
            if not routed:
                self.pipeline.stats.whole_layer_forwards += 1

    def expected_experts_fraction(self, num_tokens: int) -> float:
        """The fraction of a MoE layer's experts that `num_tokens` tokens routed uniformly at random touch,
        `1 - (1 - k / E) ** tokens`, averaged over the layers."""
        fractions = [
            1.0 - (1.0 - min(layer.top_k, layer.num_experts) / layer.num_experts) ** num_tokens
            for layer in self.expert_layers
        ]
        return sum(fractions) / len(fractions)

    def end_forward(self) -> None:
        self.pipeline.end_forward()
        fractions = [layer.touched for layer in self.expert_layers if layer.touched is not None]
        if fractions:
            touched = sum(fractions) / len(fractions)
            previous = self.touched.get(self.bucket)
            self.touched[self.bucket] = touched if previous is None else (previous + touched) / 2
            for layer in self.expert_layers:
                layer.touched = None

    def stats(self) -> OffloadStats:
        stats = dataclasses.replace(self.pipeline.stats)
        stats.store_read_bytes = {self.store.name: self.store.read_bytes}
        stats.resident_bytes = self.resident_bytes
        return stats


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _in_folder(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def _distributed_group(config: OffloadConfig):
    import torch.distributed as dist

    available = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if config.distributed is None:
        use = available
    else:
        use = config.distributed
        if use and not available:
            raise ValueError("distributed=True needs an initialised torch.distributed group with several processes")
    return dist.group.WORLD if use else None


def _content_fingerprint(state: _OffloadState) -> dict:
    crcs = []
    for plan in state.plans:
        crc = 0
        for tensor in own_tensors(plan, lambda name: state.originals[name].detach().cpu()):
            crc = crc32_tensor(tensor_bytes(tensor), crc)
        crcs.append(crc)
    return {"source": "weights", "crc32": crcs}


def _guard(model: nn.Module, state: _OffloadState) -> None:
    def refuse(method: str):
        def guarded(*args, **kwargs):
            raise RuntimeError(
                f"{type(model).__name__}.{method}() on a model with offloaded weights: its weights live in the "
                f"{state.config.offload_device} store and stream to {state.device}; call "
                f"hf_moe_offload.disable_offload(model) first"
            )

        return guarded

    for method in _GUARDED_METHODS:
        if hasattr(model, method):
            setattr(model, method, refuse(method))
            state.guarded.append(method)


def _attach(model: nn.Module, state: _OffloadState, source, fingerprint, checkpoint_plans=None) -> None:
    """Build the store, point every parameter at its placeholder, move buffers, add the hooks."""
    config = state.config
    group = _distributed_group(config)
    pin = config.pin_memory and state.device.type == "cuda"
    if checkpoint_plans is not None:
        state.plans = checkpoint_plans
        files = sorted({r.source for plan in checkpoint_plans for r in plan.ranges})
        state.store = CheckpointStore(files, direct_io=False)
    elif config.offload_device == "cpu":
        state.store = CpuStore(state.plans, source, pin=pin)
    else:
        writer = group is None or group.rank() == 0
        store = None
        if writer:
            store = NvmeStore(
                config.nvme_path,
                state.plans,
                source,
                fingerprint,
                direct_io=config.direct_io,
                verify=config.verify_checksums,
            )
        if group is not None:
            torch.distributed.barrier(group=group)
        if store is None:
            store = NvmeStore(
                config.nvme_path,
                state.plans,
                None,
                fingerprint,
                direct_io=config.direct_io,
                verify=False,
                writer=False,
                progress=False,
            )
        state.store = store
    state.pipeline = FetchPipeline(
        state.plans,
        state.store,
        state.device,
        config.prefetch_depth,
        config.io_threads,
        config.chunk_bytes,
        pin,
        group,
        map_files=config.map_files and not config.direct_io,
    )
    for name in state.placeholders:
        for module, attr in state.locations[name]:
            module._parameters[attr] = state.placeholders[name]
    for name in state.resident_names:
        param = state.originals[name]
        if param.device.type == "meta":
            raise RuntimeError(f"{name} is on the meta device and belongs to no unit: it cannot be offloaded")
        moved = nn.Parameter(param.detach().to(state.device), requires_grad=param.requires_grad)
        for module, attr in state.locations[name]:
            module._parameters[attr] = moved
        state.resident_bytes += moved.numel() * moved.element_size()
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            state.buffers.append((module, name, buffer))
            module._buffers[name] = buffer.to(state.device)
            state.resident_bytes += buffer.numel() * buffer.element_size()
    if config.expert_fetch == "routed":
        state.expert_layers = attach_experts(state)
        state.break_even = config.expert_break_even
        if state.break_even is None:  # measured: benchmarks/README.md
            state.break_even = 1.0 if state.pipeline.map_files else 0.75
    for index, (_, module) in enumerate(state.unit_modules):
        gather = type(module) is nn.Embedding and module.max_norm is None and len(state.plans[index].tensors) == 1
        add_hook_to_module(module, (_EmbeddingHook if gather else _UnitHook)(state, index))
    add_hook_to_module(model, _RootHook(state, getattr(model, "_skip_keys_device_placement", None)))
    _guard(model, state)
    setattr(model, _STATE_ATTR, state)


def enable_offload(model: nn.Module, config: OffloadConfig | None = None) -> nn.Module:
    """Move every weight of `model` into a store (CPU memory or NVMe) and stream it to `config.execution_device`
    unit by unit during forward and `generate`, prefetching the next units. Returns the model (changed in place).

    Works on a decoder-only model whose blocks sit in one `torch.nn.ModuleList`. Undo with `disable_offload`.
    """
    config = config or OffloadConfig()
    if not isinstance(config, OffloadConfig):
        raise ValueError(f"config must be an OffloadConfig, got {type(config).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError("the model is already offloaded: call disable_offload(model) before enabling it again")
    hooked = [name for name, module in model.named_modules() if getattr(module, "_hf_hook", None) is not None]
    if hooked:
        raise ValueError(
            f"the model already has accelerate hooks (on {hooked[0]!r}, e.g. from device_map=...): load it without a "
            f"device_map, or use hf_moe_offload.load_offloaded"
        )
    state = _OffloadState(model, config)
    meta = [name for name in state.placeholders if state.originals[name].device.type == "meta"]
    if meta:
        raise ValueError(f"{meta[0]} is on the meta device: enable_offload needs the weights; use load_offloaded")

    def source(plan: UnitPlan) -> Iterator[torch.Tensor]:
        return own_tensors(plan, lambda name: state.originals[name].detach().cpu())

    fingerprint = _content_fingerprint(state) if config.offload_device == "nvme" else None
    _attach(model, state, source, fingerprint)
    # The store holds the weights now: free their memory (disable_offload gives it back).
    for name in state.placeholders:
        param = state.originals[name]
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    return model


def disable_offload(model: nn.Module) -> nn.Module:
    """Put every weight back where it was before `enable_offload`, bit for bit, and remove the hooks.

    The original `Parameter` objects are restored (optimizers and tied weights keep working). A model made by
    `load_offloaded` never had its weights in memory: they are loaded into CPU memory.
    """
    state: _OffloadState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("the model is not offloaded (enable_offload or load_offloaded was not called on it)")
    for unit in list(state.bound):
        state.release(unit)
    detach_experts(state, state.expert_layers)
    state.pipeline.close()
    for _, module in state.unit_modules:
        remove_hook_from_module(module)
    remove_hook_from_module(model)
    for method in state.guarded:
        model.__dict__.pop(method, None)
    for plan in state.plans:
        for name, tensor in assemble(plan, state.store.tensors(plan)):
            original = state.originals[name]
            device = state.restore_to.get(name, torch.device("cpu"))
            value = tensor.to(device, copy=True)
            if original.device.type == "meta":
                original = nn.Parameter(value, requires_grad=original.requires_grad)
            else:
                original.data = value
            for module, attr in state.locations[name]:
                module._parameters[attr] = original
    for name in state.resident_names:
        for module, attr in state.locations[name]:
            module._parameters[attr] = state.originals[name]
    for module, name, buffer in state.buffers:
        module._buffers[name] = buffer
    state.store.close()
    delattr(model, _STATE_ATTR)
    return model


def get_offload_stats(model: nn.Module, reset: bool = False) -> OffloadStats:
    """Counters of the offloaded `model` (bytes and units fetched, time waiting for weights, store reads, ...).
    `reset=True` returns them and starts counting again from zero."""
    state: _OffloadState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("the model is not offloaded (enable_offload or load_offloaded was not called on it)")
    stats = state.stats()
    if reset:
        keep = {
            "slot_bytes": state.pipeline.stats.slot_bytes,
            "expert_cache_bytes": state.pipeline.stats.expert_cache_bytes,
        }
        state.pipeline.stats = OffloadStats(**keep)
        state.store.read_bytes = 0
    return stats


# -- load_offloaded -------------------------------------------------------------------------------------------------


def _check_safetensors(name_or_path: str) -> None:
    if not os.path.isdir(name_or_path):
        return
    files = os.listdir(name_or_path)
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"{name_or_path} holds a pickle checkpoint ({pickles[0]}); load_offloaded reads safetensors only (a pickle "
            f"can run code and cannot be read in ranges). Convert it once: "
            f"AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)"
        )
    raise ValueError(f"{name_or_path} holds no .safetensors weights")


def _offloaded_weights(model: nn.Module):
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None:
            return getattr(weights_map, "dataset", weights_map)
    raise RuntimeError("transformers did not offload the weights to disk (no accelerate weights map found)")


def _checkpoint_plans(state: _OffloadState, loader, offload_folder: str) -> list[UnitPlan] | None:
    """Plans whose ranges read each tensor straight from the checkpoint shards, or None when some tensor must be
    converted (another dtype, fused or renamed by transformers' loading) or the model has MoE layers (their experts
    are stored expert-major, one region per expert)."""
    if any(plan.experts for plan in state.plans):
        return None
    index = getattr(loader, "index", {})
    headers: dict[str, tuple[int, dict]] = {}
    located: dict[str, tuple[str, int]] = {}
    for name in state.placeholders:
        entry = index.get(name)
        if not entry or "safetensors_file" not in entry:
            return None
        path = os.path.abspath(entry["safetensors_file"])
        if _in_folder(path, offload_folder):
            return None
        if path not in headers:
            headers[path] = read_safetensors_header(path)
        data_start, header = headers[path]
        info = header.get(entry["weight_name"])
        spec_param = state.originals[name]
        if (
            info is None
            or info["dtype"] != SAFETENSORS_DTYPES.get(spec_param.dtype)
            or tuple(info["shape"]) != tuple(spec_param.shape)
        ):
            return None
        located[name] = (path, data_start + info["data_offsets"][0])
    plans = []
    for plan in state.plans:
        new = UnitPlan(index=plan.index, name=plan.name, tensors=list(plan.tensors), own=[], own_nbytes=0)
        offset = 0
        for spec, _ in plan.tensors:
            path, start = located[spec.name]
            new.tensors[len(new.ranges)] = (spec, offset)
            new.ranges.append(ReadRange(path, start, offset, spec.nbytes))
            offset = align_up(offset + spec.nbytes, 64)
        new.own = list(new.tensors)
        new.own_nbytes = offset
        new.nbytes = align_up(max(offset, 1))
        plans.append(new)
    return plans


def load_offloaded(
    name_or_path: str | os.PathLike,
    config: OffloadConfig | None = None,
    dtype: torch.dtype | str | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a causal LM straight into an offload store, never holding the whole model in memory.

    The model is built on the meta device by `AutoModelForCausalLM.from_pretrained` (all weights "on disk"), then
    the store is filled tensor by tensor from the checkpoint's safetensors shards. With an NVMe store and a
    checkpoint already in `dtype`, the shards are read in place (no copy) unless `config.reuse_checkpoint=False`.
    `from_pretrained_kwargs` go to `from_pretrained` (`trust_remote_code`, `revision`, ...).
    """
    from transformers import AutoModelForCausalLM

    config = config or OffloadConfig()
    if not isinstance(config, OffloadConfig):
        raise ValueError(f"config must be an OffloadConfig, got {type(config).__name__}")
    name_or_path = os.fspath(name_or_path)
    if from_pretrained_kwargs.get("device_map") is not None:
        raise ValueError("load_offloaded places the weights itself: do not pass device_map")
    _check_safetensors(name_or_path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype ({dtype!r}) is not a torch dtype name (e.g. 'bfloat16', 'float32', 'auto')")
    # Tensors transformers must convert (fused experts, another dtype) pass through this folder once, on the NVMe
    # drive when there is one: /tmp may be small.
    scratch = config.nvme_path if config.offload_device == "nvme" else None
    if scratch is not None:
        try:
            os.makedirs(scratch, exist_ok=True)
        except OSError as err:
            raise ValueError(f"nvme_path ({scratch}) cannot be created: {err.strerror}") from err
    try:
        offload_folder = tempfile.mkdtemp(prefix=".hf_moe_offload_convert_", dir=scratch)
    except OSError as err:
        raise ValueError(f"nvme_path ({scratch}) is not writable: {err.strerror}") from err
    # accelerate warns that the parameters "were offloaded to the disk": true of the map below, which only serves to
    # read the checkpoint lazily and is replaced by the store.
    big_modeling = std_logging.getLogger("accelerate.big_modeling")
    level = big_modeling.level
    try:
        big_modeling.setLevel(std_logging.ERROR)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                device_map={"": "disk"},
                offload_folder=offload_folder,
                dtype=dtype if dtype is not None else "auto",
                use_safetensors=True,
                **from_pretrained_kwargs,
            )
        finally:
            big_modeling.setLevel(level)
        loader = _offloaded_weights(model)
        remove_hook_from_module(model, recurse=True)
        if hasattr(model, "hf_device_map"):
            delattr(model, "hf_device_map")
        state = _OffloadState(model, config)

        def source(plan: UnitPlan) -> Iterator[torch.Tensor]:
            return own_tensors(plan, loader.__getitem__)

        checkpoint_plans = None
        fingerprint = None
        if config.offload_device == "nvme":
            model_dtype = next(iter(state.originals.values())).dtype
            if config.reuse_checkpoint:
                checkpoint_plans = _checkpoint_plans(state, loader, offload_folder)
            if checkpoint_plans is None:
                files = sorted(
                    {
                        e["safetensors_file"]
                        for e in getattr(loader, "index", {}).values()
                        if "safetensors_file" in e and not _in_folder(e["safetensors_file"], offload_folder)
                    }
                )
                fingerprint = {
                    "source": "checkpoint",
                    "name": name_or_path,
                    "dtype": str(model_dtype),
                    "files": [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
                }
        _attach(model, state, source, fingerprint, checkpoint_plans)
    finally:
        shutil.rmtree(offload_folder, ignore_errors=True)
    return model
