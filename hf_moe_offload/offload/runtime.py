"""One offloaded model: its units and plans, its store, its pipeline, its experts, its hooks, wired together and
taken apart again.

`OffloadRuntime` is what the hooks call into (`acquire`/`release` a unit, gather embedding rows, begin and end a
forward); it owns every resource of the offloaded model (reader threads, file descriptors, slots, pinned memory),
released by `close()` or, should the model be garbage-collected while offloaded, by a finalizer.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.utils import logging

from . import experts as experts_module
from .binding import Binding
from .collective import host_group, raise_together, release_host_groups
from .config import OffloadConfig
from .discovery import (
    eager_experts_forward,
    find_experts_modules,
    find_parameters,
    find_units,
    is_under,
    router_weight_name,
)
from .experts import ExpertsContext, ExpertsRuntime
from .hooks import EmbeddingHook, RootHook, UnitHook, add_release_on_error, guard_methods, unguard_methods
from .layout import (
    CUDA_TENSOR_ALIGN,
    TENSOR_ALIGN,
    ExpertGroup,
    ReadRange,
    TensorSource,
    TensorSpec,
    UnitPlan,
    assemble,
    own_tensors,
    plan_units,
    tensor_bytes,
)
from .prefetch import FetchPipeline
from .quantize import (
    PlanCodec,
    QuantScheme,
    QuantTarget,
    codecs_of,
    dequantize_into,
    packed_getter,
    quantization_targets,
    stored_specs,
)
from .readers import PriorityReaders
from .saving import StateDictHooks, guard_save, unguard_save
from .stats import OffloadStats
from .store import CheckpointStore, CpuStore, open_nvme_store, read_tensor, weights_fingerprint
from .transfer import Transfer, small_to_device


logger = logging.get_logger(__name__)


def process_group(config: OffloadConfig):
    """The process group whose ranks share each unit's read, or None (one process)."""
    import torch.distributed as dist

    available = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if config.distributed is None:
        use = available
    else:
        use = config.distributed
        if use and not available:
            raise ValueError("distributed=True needs an initialised torch.distributed group with several processes")
    return dist.group.WORLD if use else None


def _close_resources(
    experts: ExpertsRuntime | None,
    pipeline: FetchPipeline | None,
    readers,
    store,
    transfer: Transfer | None = None,
    groups: tuple = (),
) -> None:
    """Stop threads, drop mappings and pinned buffers, close files. Idempotent. It references none of the model's
    modules but the experts modules it detaches from, so that a finalizer can hold it."""
    if experts is not None:
        experts.close()
    if pipeline is not None:
        pipeline.close()
    if readers is not None:
        readers.shutdown(wait=True)
    if transfer is not None:
        transfer.close()  # every copy done, then the host buffers unpinned
    if store is not None:
        store.close()
    release_host_groups(groups)


class _Reaper:
    """Closes the resources of offloaded models that were garbage-collected without `disable_offload`.

    A weakref finalizer runs wherever the garbage collector happens to run, possibly inside a lock the closing would
    need (an executor's `submit` holds one while it allocates), so the finalizer only hands the resources to this
    daemon thread through a `queue.SimpleQueue` (whose `put` is safe in finalizers) and the thread closes them.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, *resources) -> None:
        self._queue.put(resources)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="hf-moe-offload-finalizer", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            resources = self._queue.get()
            try:
                _close_resources(*resources)
            except Exception as error:  # a dead model's resources: nothing to raise to
                logger.warning(f"closing the resources of a garbage-collected offloaded model failed: {error}")
            # hold nothing while waiting: the experts reference their modules, and so the whole dead runtime
            del resources


_reap = _Reaper()


def tensor_alignment(device: torch.device) -> int:
    """Where tensors start in a unit's buffer: at their in-memory residue modulo 64 for the CPU's GEMMs (MKL), on
    256-byte boundaries for CUDA's (cuBLASLt takes the pointer's alignment as a hint)."""
    return CUDA_TENSOR_ALIGN if device.type == "cuda" else TENSOR_ALIGN


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (a view of a unit's region, strided for fused experts) over the same memory but with a storage of its
    own, no copy: transformers' `save_pretrained` clones tensors that share a storage without being the same
    (safetensors allows no aliasing), which for views of one region would copy the whole model at once, and it cannot
    handle strided views that share one."""
    as_int = _SAME_SIZE_INT.get(tensor.element_size())
    if as_int is None or tensor.device.type != "cpu":
        return tensor
    shared = tensor.view(as_int).numpy()  # a (strided) view of the same memory, keeping the region alive
    return torch.from_numpy(shared).view(tensor.dtype)


class OffloadRuntime:
    """Everything `enable_offload` changed on a model, the resources serving it, and how to undo it.

    Args:
        model: the model (changed in place by `attach`, put back by `detach`).
        config: the offload knobs.
        device: the execution device, resolved.
        residues: each weight's address modulo 64 in the in-memory model the offloaded one must equal bit for bit
            (see `layout.plan_units`); default: the model's own weights' (none for weights on the meta device).
    """

    def __init__(
        self,
        model: nn.Module,
        config: OffloadConfig,
        device: torch.device,
        residues: dict[str, int] | None = None,
        targets: dict[str, QuantTarget] | None = None,
    ):
        self.config = config
        self.device = device
        self.unit_modules = find_units(model)
        if config.prefetch_depth >= len(self.unit_modules):
            raise ValueError(
                f"prefetch_depth ({config.prefetch_depth}) must be < the number of units ({len(self.unit_modules)}) "
                f"of this {type(model).__name__}: at most every other unit can be fetched ahead"
            )
        parameters = find_parameters(model)
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
                located = parameters.locations
                if not names or any(name not in located or len(located[name]) > 1 for name in names):
                    continue  # tied or shared expert weights: streamed with the block
                originals = parameters.originals
                params = tuple(TensorSpec(n, originals[n].dtype, tuple(originals[n].shape)) for n in names)
                groups.setdefault(index, []).append(ExpertGroup(experts_name, params))
                self.experts_modules[experts_name] = module
                fused.update(names)
        unit_specs: list[tuple[str, list[TensorSpec]]] = []
        owned: set[str] = set()
        for unit_name, _ in self.unit_modules:
            specs = []
            for name, param in parameters.originals.items():
                if any(is_under(path, unit_name) for path in parameters.paths[name]):
                    owned.add(name)
                    if name not in fused:
                        specs.append(TensorSpec(name, param.dtype, tuple(param.shape)))
            unit_specs.append((unit_name, specs))
        if residues is None:
            residues = {
                name: p.data_ptr() % TENSOR_ALIGN
                for name, p in parameters.originals.items()
                if p.device.type == "cpu" and p.numel()
            }
        self.tensor_align = tensor_alignment(device)
        # a low-bit store: the matrices stored as their packed parts, dequantized into full-precision buffers
        if targets:  # a checkpoint's own quantized matrices (FP8, MXFP4), stored as it holds them (`loading.py`)
            self.scheme = next(iter(targets.values())).scheme
            self.targets = dict(targets)
        else:
            self.scheme = QuantScheme(config.weight_bits, config.weight_group_size) if config.weight_bits else None
            self.targets = quantization_targets(model, self.scheme) if self.scheme is not None else {}
        if device.type == "cuda" or (self.targets and isinstance(self.scheme, QuantScheme)):
            residues = {}  # (the reference of a low-bit store, `dequantized_copy`, holds fresh allocations)
        elif self.targets:  # a quantized checkpoint: transformers' load dequantizes its matrices into fresh tensors
            residues = {name: r for name, r in residues.items() if name not in self.targets}
        # the full-precision plans: what the model's parameters view while their unit runs
        self.compute_plans = plan_units(unit_specs, groups, residues, self.tensor_align)
        self.plans = self.compute_plans  # the plans of the store's bytes
        self.codecs: dict[int, PlanCodec] = {}
        if self.targets:
            stored_units = [(name, stored_specs(specs, self.targets)) for name, specs in unit_specs]
            stored_groups = {
                index: [ExpertGroup(g.module, tuple(stored_specs(list(g.params), self.targets))) for g in unit_groups]
                for index, unit_groups in groups.items()
            }
            self.plans = plan_units(stored_units, stored_groups, residues, self.tensor_align)
            self.codecs = codecs_of(self.plans, self.compute_plans, self.targets)
        self.binding = Binding(parameters, owned, device)
        self.router_names = {name: router_weight_name(model, name) for name in self.experts_modules}
        self.counters = OffloadStats()
        self.store = None
        self.pipeline: FetchPipeline | None = None
        self.experts: ExpertsRuntime | None = None
        self.readers: PriorityReaders | None = None
        self.transfer: Transfer | None = None
        self.resident_bytes = 0
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        self.guarded: list[str] = []
        self.previous_experts_implementation: str | None = None
        self.group = None
        self.decisions = None  # host groups over the group's ranks: the computing thread's, the coordinator's
        self.fetch_flags = None
        self._release_hook = None
        self._state_dict_hooks: StateDictHooks | None = None
        self._finalizer = None
        # forwards of one model run one at a time (two threads calling generate get their own right tokens)
        self._forward_lock = threading.Lock()
        self._forward_owner: int | None = None
        self.stored_units = {
            name: plan.index
            for plan in reversed(self.compute_plans)
            for name in [spec.name for spec, _ in plan.tensors]
            + [spec.name for layout in plan.experts for spec in layout.group.params]
        }

    @property
    def expert_layers(self) -> list:
        return self.experts.layers if self.experts is not None else []

    def source(self, plan: UnitPlan) -> Iterator[torch.Tensor]:
        """The CPU tensors of `plan`'s own region from the model's weights in memory (`enable_offload`)."""
        return self.stored_source(self._original)(plan)

    def _original(self, name: str) -> torch.Tensor:
        return self.binding.originals[name].detach().cpu()

    def weights_fingerprint(self) -> dict:
        """The fingerprint of the model's weights in memory (of the full-precision weights: a quantized store is
        told apart by its scheme, `fingerprint`)."""
        return weights_fingerprint(self.compute_plans, lambda plan: own_tensors(plan, self._original))

    def stored_source(
        self, get: Callable[[str], torch.Tensor], raw: Callable[[str], torch.Tensor] | None = None
    ) -> TensorSource:
        """The source of the store's plans from `get(name)` of the full-precision weights: a quantized matrix is
        quantized as its unit is written (one unit's packed bytes held at a time); the parts of a checkpoint's own
        quantized matrices come from `raw(part name)`."""
        if not self.targets:
            return lambda plan: own_tensors(plan, get)
        return lambda plan: own_tensors(plan, packed_getter(get, self.targets, raw))

    def fingerprint(self, fingerprint: dict | None) -> dict | None:
        """`fingerprint` with the store's quantization scheme: a store of another scheme is stale."""
        if fingerprint is None or self.scheme is None:
            return fingerprint
        return {**fingerprint, "quantization": self.scheme.name}

    # -- attach / detach ----------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, source: TensorSource, fingerprint, checkpoint_plans=None) -> None:
        """Build the store, point every parameter at its placeholder, move buffers, add the hooks."""
        config = self.config
        group = self.group = process_group(config)
        fingerprint = self.fingerprint(fingerprint)
        transfer = self.transfer = Transfer(self.device, pin=config.pin_memory)
        try:
            if checkpoint_plans is not None:
                self.plans = checkpoint_plans
                files = sorted({r.source for plan in checkpoint_plans for r in plan.ranges})
                self.store = CheckpointStore(files, checkpoint_plans, checksums=config.verify_reads)
            elif config.offload_device == "cpu":
                self.store = CpuStore(self.plans, source, transfer.host_buffer, pinned=transfer.pin)
            else:
                self.store = open_nvme_store(
                    os.path.abspath(config.nvme_path),
                    self.plans,
                    source,
                    fingerprint,
                    group,
                    direct_io=config.direct_io,
                    verify=config.verify_checksums,
                    device=self.device,
                )
            if group is not None:  # the host groups of the small decisions, one per thread that makes them
                self.decisions, self.fetch_flags = host_group(group), host_group(group)
            self.readers = PriorityReaders(config.io_threads)
            self.pipeline = FetchPipeline(
                self.plans,
                self.store,
                transfer,
                self.readers,
                self.counters,
                config.prefetch_depth,
                config.chunk_bytes,
                group,
                map_files=config.map_files and not config.direct_io,
                verify=config.verify_reads,
                flags=self.fetch_flags,
                codecs=self.codecs,
            )
            self.binding.install_placeholders()
            self.resident_bytes += self.binding.move_resident(self.device)
            for module in model.modules():
                for name, buffer in list(module._buffers.items()):
                    if buffer is None:
                        continue
                    self.buffers.append((module, name, buffer))
                    module._buffers[name] = buffer.to(self.device)
                    self.resident_bytes += buffer.numel() * buffer.element_size()
            if config.expert_fetch == "routed" and self.experts_modules:
                self._attach_experts(model, transfer, group)
        except BaseException:
            self._put_back_parameters()
            _close_resources(self.experts, self.pipeline, self.readers, self.store, transfer, self._host_groups())
            raise
        for index, (_, module) in enumerate(self.unit_modules):
            plan = self.compute_plans[index]
            gather = type(module) is nn.Embedding and module.max_norm is None and len(plan.tensors) == 1
            add_hook_to_module(module, (EmbeddingHook if gather else UnitHook)(self, index))
        add_hook_to_module(model, RootHook(self, getattr(model, "_skip_keys_device_placement", None)))
        self._release_hook = add_release_on_error(model, self)
        self.guarded = guard_methods(model, f"the {config.offload_device} store and stream to {self.device}")
        self._state_dict_hooks = StateDictHooks(
            model, self, {name: self.binding.locations[name] for name in self.binding.placeholders}
        )
        guard_save(model, self)
        # At interpreter exit the OS and concurrent.futures' own exit handler release all of it: atexit=False.
        self._finalizer = weakref.finalize(
            model, _reap, self.experts, self.pipeline, self.readers, self.store, self.transfer, self._host_groups()
        )
        self._finalizer.atexit = False

    def _host_groups(self) -> tuple:
        return tuple(g for g in (self.decisions, self.fetch_flags) if g is not None)

    def _attach_experts(self, model: nn.Module, transfer: Transfer, group) -> None:
        config = self.config
        if not hasattr(model, "set_experts_implementation"):
            raise ValueError(
                f"{type(model).__name__} is not a transformers PreTrainedModel: its experts implementation cannot be "
                f"switched to routed fetching; use OffloadConfig(expert_fetch='all')"
            )
        implementation = model.config._experts_implementation
        implementations = {
            name: ALL_EXPERTS_FUNCTIONS.get_interface(implementation, eager_experts_forward(module))
            for name, module in self.experts_modules.items()
        }
        router_weights = {}
        for experts_name, router in self.router_names.items():
            if router is not None and config.speculative_prefetch:
                router_weights[experts_name] = read_tensor(self.store, self.plans, router).float().to(self.device)
        context = ExpertsContext(
            store=self.store,
            readers=self.readers,
            transfer=transfer,
            stats=self.counters,
            placeholders=self.binding.placeholders,
            requires_grad=self.binding.requires_grad,
            cache_size=experts_module.expert_cache_rows(
                [layout.stride for plan in self.compute_plans for layout in plan.experts],
                config.expert_cache_size,
                [layout.num_experts for plan in self.compute_plans for layout in plan.experts],
                experts_module.cache_budget(self.device, config.expert_cache_bytes),
            ),
            speculative=config.speculative_prefetch,
            map_pages=self.pipeline.map_files,
            io_threads=config.io_threads,
        )
        break_even = config.expert_break_even
        if break_even is None:  # measured: benchmarks/README.md
            break_even = 1.0 if self.pipeline.map_files else 0.75
        self.experts = ExpertsRuntime(
            context,
            self.plans,
            self.experts_modules,
            implementations,
            router_weights,
            break_even,
            self.decisions,
            codecs=self.codecs,
        )
        self.previous_experts_implementation = implementation
        model.set_experts_implementation(experts_module.IMPLEMENTATION)
        if model.config._experts_implementation != experts_module.IMPLEMENTATION:
            raise RuntimeError(
                f"{type(model).__name__} did not accept experts_implementation={experts_module.IMPLEMENTATION!r} "
                f"(transformers allows switching only for classes decorated with @use_experts_implementation); use "
                f"OffloadConfig(expert_fetch='all')"
            )

    def _put_back_parameters(self) -> None:
        """After a failed attach: every parameter and buffer back as it was (the weights are still in memory)."""
        for name, original in self.binding.originals.items():
            for module, attr in self.binding.locations[name]:
                module._parameters[attr] = original
        for module, name, buffer in self.buffers:
            module._buffers[name] = buffer

    def detach(self, model: nn.Module) -> None:
        """Put every weight back where it was, bit for bit, remove the hooks and release every resource. The store's
        bytes are verified first: on a mismatch nothing changes (the model stays offloaded) and it raises."""
        if self._forward_owner != threading.get_ident():  # (equal: an interrupted forward of this thread holds it)
            self._forward_lock.acquire()  # a forward running in another thread ends first
        try:
            self._detach(model)
        finally:
            self._forward_owner = None
            self._forward_lock.release()

    def _detach(self, model: nn.Module) -> None:
        try:
            self.store.verify_all(self.plans)
        except RuntimeError as err:
            raise RuntimeError(
                f"disable_offload did not put the weights back, the model stays offloaded (its weights are "
                f"placeholders): {err}"
            ) from err
        self.release_all()
        if self.experts is not None:
            self.experts.close()
            model.set_experts_implementation(self.previous_experts_implementation)
        self.pipeline.close()
        for _, module in self.unit_modules:
            remove_hook_from_module(module)
        remove_hook_from_module(model)
        if self._release_hook is not None:
            self._release_hook.remove()
        unguard_methods(model, self.guarded)
        unguard_save(model)
        if self._state_dict_hooks is not None:
            self._state_dict_hooks.remove()
        if self.scheme is not None:
            logger.warning(
                f"disable_offload puts back the dequantized values of the {self.scheme.label} store: the "
                f"full-precision weights are not in it (enable_offload freed them; a quantized checkpoint never had "
                f"them)"
            )
        self.binding.restore(self._stored_weights())
        for module, name, buffer in self.buffers:
            module._buffers[name] = buffer
        self._finalizer.detach()
        _close_resources(self.experts, self.pipeline, self.readers, self.store, self.transfer, self._host_groups())

    def _stored_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, CPU tensor) of every stored weight, as the store holds it (a low-bit unit: dequantized)."""
        for plan in self.plans:
            codec = self.codecs.get(id(plan))
            if codec is None:
                yield from assemble(plan, self.store.tensors(plan))
                continue
            buffer = torch.empty(codec.compute.nbytes, dtype=torch.uint8)
            codec.decode(self.store.region(plan), buffer)
            for name, param in self.binding.views_of(codec.compute, lambda offset, n, b=buffer: b[offset : offset + n]):
                yield name, param.detach()

    # -- what the hooks call --------------------------------------------------------------------------------------

    def acquire(self, unit: int) -> None:
        if unit in self.binding.bound:
            raise RuntimeError(f"unit {self.plans[unit].name} was entered again while it runs (recursive forward)")
        slot = self.pipeline.acquire(unit)
        self.binding.bind(unit, self.plans[unit].name, self.binding.slot_views(unit, slot), slot.index)

    def release(self, unit: int) -> None:
        slot = self.binding.unbind(unit)
        if slot is not None and slot != -1:
            self.pipeline.release(unit)

    def release_all(self) -> None:
        """Release every unit still bound (a forward that raised)."""
        for unit in list(self.binding.bound):
            self.release(unit)

    def gather_rows(self, unit: int, ids: torch.Tensor) -> torch.Tensor:
        """Bind the rows of the embedding table of `unit` that `ids` use; returns `ids` renumbered into them. A
        quantized table (a head's tied matrix) brings the rows of its parts, dequantized on the device."""
        ((spec, _),) = self.compute_plans[unit].tensors
        target = self.targets.get(spec.name)
        parts = target.parts() if target is not None else (spec,)
        # the ids reach the host once (the rows to read depend on them); the rest is host work, then queued copies
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        rows = unique.tolist()
        gathered = []
        error = None
        try:
            for row in rows:
                if not 0 <= row < spec.shape[0]:
                    raise IndexError(
                        f"index {row} is out of range for the embedding {spec.name} of {spec.shape[0]} rows"
                    )
            gathered = [self._read_rows(unit, part, rows) for part in parts]
        except Exception as err:
            if self.group is None:
                raise
            error = err
        if self.group is not None:  # every rank reads its own rows: one failing must not leave the others waiting
            # (a host group: its flags live on the CPU)
            raise_together(self.decisions, error, torch.device("cpu"), f"reading rows of {spec.name}")
        self.counters.bytes_fetched += sum(rows.numel() * rows.element_size() for rows in gathered)
        self.counters.full_precision_bytes += len(unique) * (spec.nbytes // spec.shape[0])
        on_device = [small_to_device(rows, self.device) for rows in gathered]
        if target is None:
            (table,) = on_device
        else:
            table = torch.empty((len(unique), *spec.shape[1:]), dtype=spec.dtype, device=self.device)
            dequantize_into(table, on_device, target)
        param = nn.Parameter(table, self.binding.requires_grad[spec.name])
        self.binding.bind(unit, self.plans[unit].name, [(spec.name, param)])
        return small_to_device(inverse, ids.device)

    def _read_rows(self, unit: int, spec: TensorSpec, rows: list[int]) -> torch.Tensor:
        """Rows `rows` of the stored tensor `spec` of `unit`, read from the store into a CPU tensor (page-locked on
        CUDA: its copy to the device is then queued, not a host wait)."""
        plan = self.plans[unit]
        offset = next(o for s, o in plan.tensors if s.name == spec.name)
        rng = next(r for r in plan.ranges if r.dst_offset <= offset < r.dst_offset + r.nbytes)
        table_start = rng.src_offset + (offset - rng.dst_offset)
        row_bytes = spec.nbytes // spec.shape[0]
        out = torch.empty((len(rows), *spec.shape[1:]), dtype=spec.dtype, pin_memory=self.device.type == "cuda")
        buffer = tensor_bytes(out)
        for k, row in enumerate(rows):
            start = k * row_bytes
            read = ReadRange(rng.source, table_start + row * row_bytes, start, row_bytes)
            self.store.read(read, buffer, start, start + row_bytes, check=False)
        self.store.check_identity(rng.source)  # once for all the rows
        return out

    def begin_forward(self, num_tokens: int | None = None) -> None:
        """Start a forward: wait for another thread's forward of this model to end (`finish_forward`), put back
        what a forward interrupted by KeyboardInterrupt left bound, decide the routing."""
        me = threading.get_ident()
        if self._forward_owner != me:  # (equal: this thread's previous forward was interrupted and kept the lock)
            self._forward_lock.acquire()
            self._forward_owner = me
        self.release_all()
        self.counters.forward_passes += 1
        if self.experts is not None:
            routed = self.experts.begin_forward(num_tokens)
            self.pipeline.set_routed(routed)
            if not routed:
                self.counters.whole_layer_forwards += 1

    def end_forward(self) -> None:
        """End a forward that returned: the pipeline and experts wrap up, the next forward is let in."""
        try:
            self.pipeline.end_forward()
            if self.experts is not None:
                self.experts.end_forward()
        finally:
            self.finish_forward()

    def finish_forward(self) -> None:
        """After the model's forward, returned or raised: release what it left bound and let the next forward in
        (only the thread whose forward it was; a no-op once `end_forward` did it)."""
        if self._forward_owner == threading.get_ident():
            try:
                self.release_all()
            finally:
                self._forward_owner = None
                self._forward_lock.release()

    # -- what saving calls ----------------------------------------------------------------------------------------

    def stored_unit_of(self, name: str) -> int:
        return self.stored_units[name]

    def stored_tensors(self, unit: int) -> dict[str, torch.Tensor]:
        """Every tensor `unit` brings, as the store holds it (views, no copy), after the store verified it."""
        self.check_savable()
        plan = self.plans[unit]
        self.store.verify(plan)
        return {name: _own_storage(p.detach()) for name, p in self.binding.views_of(plan, self.store.region(plan))}

    def check_savable(self) -> None:
        """Refuse to save a low-bit store's weights as if they were the model's."""
        if self.scheme is not None:
            raise RuntimeError(
                f"this model's store holds {self.scheme.label} weights (quantized): a state dict "
                f"would hold their dequantized values in place of the model's own weights, so state_dict and "
                f"save_pretrained refuse while it is offloaded. To save the dequantized model on purpose, build it in "
                f"memory with hf_moe_offload.offload.dequantized_copy(model, config) and save that"
            )

    def store_files(self) -> list[str]:
        return self.store.source_files()

    # -- statistics ---------------------------------------------------------------------------------------------

    def stats(self) -> OffloadStats:
        if self.transfer is not None:  # every timed wait queued so far (a host sync on CUDA)
            self.counters.device_wait_seconds += self.transfer.device_wait_seconds(wait=True)
        stats = dataclasses.replace(self.counters)
        stats.store_read_bytes = {self.store.name: self.store.read_bytes}
        stats.resident_bytes = self.resident_bytes
        return stats

    def reset_stats(self) -> None:
        self.counters.reset()
        self.store.read_bytes = 0
