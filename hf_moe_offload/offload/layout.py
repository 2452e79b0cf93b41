"""Where every byte of an offloaded model lives: the layout of each unit's region in a store, and the reads that fill
a unit's device buffer. Pure planning, no I/O.

A model is cut into *units* (the embedding, each decoder block, the final norm, the head). Each unit's own tensors are
packed into one contiguous region, largest element size first so every tensor stays aligned to its dtype; a tensor
shared with an earlier unit (tied embeddings) is not stored twice, the later unit reads it from its owner's region.
A unit is fetched with a list of `ReadRange`s into one buffer whose layout is the unit's `UnitPlan`.

The experts of a MoE layer (the transformers v5 fused parameters `gate_up_proj`/`up_proj`, `down_proj` and their
biases, each `(num_experts, ...)`) are laid out expert-major after the unit's dense tensors: expert `e`'s slices of
every fused parameter form one 4 KiB-aligned region, so fetching one expert is one read, and the whole layer is still
one region (read at once when every expert is wanted). In the store's files the slices are entries named
`<experts module>.<e>.<parameter>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch


ALIGN = 4096
# Every tensor starts on a 64-byte boundary like torch's CPU allocations: kernels see the alignment they see in memory.
TENSOR_ALIGN = 64
# On CUDA every tensor starts on a 256-byte boundary: cuBLASLt takes a pointer's alignment (up to 256 bytes) as a hint
# and may choose another kernel for a less aligned operand than for the caching allocator's (512-byte aligned) weights.
CUDA_TENSOR_ALIGN = 256

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def align_up(n: int, alignment: int = ALIGN) -> int:
    return -(-n // alignment) * alignment


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a CPU tensor as a flat uint8 tensor (a view when the tensor is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class ReadRange:
    """`nbytes` at `src_offset` of `source` (a unit key or a checkpoint file) go to `dst_offset` of the unit buffer."""

    source: str
    src_offset: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertGroup:
    """The experts of one MoE layer: the fused `(num_experts, ...)` parameters of its experts module."""

    module: str
    params: tuple[TensorSpec, ...]

    @property
    def num_experts(self) -> int:
        return self.params[0].shape[0]


@dataclass(frozen=True)
class ExpertLayout:
    """Where the experts of one group sit in their unit's region: expert `e` at `offset + e * stride`, its slice of
    parameter `i` at `param_offsets[i]` inside that."""

    group: ExpertGroup
    offset: int
    stride: int
    nbytes: int  # bytes of one expert's slices (<= stride)
    param_offsets: tuple[int, ...]

    @property
    def num_experts(self) -> int:
        return self.group.num_experts

    def piece(self, expert: int, param: int) -> TensorSpec:
        spec = self.group.params[param]
        attr = spec.name.rpartition(".")[2]
        return TensorSpec(f"{self.group.module}.{expert}.{attr}", spec.dtype, spec.shape[1:])

    def views(self, buffer: torch.Tensor, count: int) -> list[torch.Tensor]:
        """The fused parameters of `count` experts stored back to back (`stride` apart) in the uint8 `buffer`, as
        `(count, ...)` views (strided over the experts, each expert's slice contiguous)."""
        rows = buffer[: count * self.stride].view(count, self.stride)
        views = []
        for spec, start in zip(self.group.params, self.param_offsets, strict=True):
            piece = rows[:, start : start + spec.nbytes // spec.shape[0]]
            views.append(piece.view(spec.dtype).view(count, *spec.shape[1:]))
        return views


@dataclass
class UnitPlan:
    """Where each tensor of one unit sits in its fetch buffer, and the reads that fill that buffer."""

    index: int
    name: str
    tensors: list[tuple[TensorSpec, int]] = field(default_factory=list)  # (spec, offset in the unit buffer)
    own: list[tuple[TensorSpec, int]] = field(default_factory=list)  # the tensors stored in this unit's region
    own_nbytes: int = 0
    nbytes: int = 0  # buffer bytes, 4 KiB aligned
    ranges: list[ReadRange] = field(default_factory=list)
    experts: list[ExpertLayout] = field(default_factory=list)  # MoE layers of the unit, in the buffer like the region
    pieces: dict[str, tuple[str, int]] = field(default_factory=dict)  # own expert slice -> (fused parameter, expert)
    dense: UnitPlan | None = None  # the same unit without its experts (fetched when experts come one by one)

    @property
    def key(self) -> str:
        return f"unit_{self.index:05d}"


def placed(offset: int, residue: int, align: int = TENSOR_ALIGN) -> int:
    """The first offset from `offset` on that is `residue` past an `align` boundary."""
    return align_up(offset, align) + residue


def plan_units(
    units: list[tuple[str, list[TensorSpec]]],
    experts: dict[int, list[ExpertGroup]] | None = None,
    residues: dict[str, int] | None = None,
    align: int = TENSOR_ALIGN,
) -> list[UnitPlan]:
    """Lay out every unit: own tensors packed by decreasing element size, then the unit's experts (expert-major, see
    the module docstring), borrowed (tied) tensors after them. `experts` maps a unit index to its MoE layers.

    `residues` gives, per tensor, where its reference copy starts relative to a 64-byte boundary (its address modulo
    `TENSOR_ALIGN`): each tensor is placed at the same residue in its unit's buffer. CPU GEMM kernels (MKL's AVX2
    path) round differently for operands at other alignments, so a weight at another residue than the in-memory
    model's would not give its results bit for bit. Slot buffers and mapped pages start on 4 KiB boundaries, so an
    offset's residue is its address's. `align`: the boundary tensors start from (`CUDA_TENSOR_ALIGN` for a CUDA
    execution device, with no residues)."""
    experts = experts or {}
    residues = residues or {}

    def residue(spec: TensorSpec) -> int:
        value = residues.get(spec.name, 0) % TENSOR_ALIGN
        return value if value % spec.dtype.itemsize == 0 else 0

    owner: dict[str, tuple[UnitPlan, int]] = {}
    plans = []
    for index, (name, specs) in enumerate(units):
        plan = UnitPlan(index=index, name=name)
        own = [spec for spec in specs if spec.name not in owner]
        offset = 0
        for spec in sorted(own, key=lambda s: -s.dtype.itemsize):
            offset = placed(offset, residue(spec), align)
            plan.own.append((spec, offset))
            plan.tensors.append((spec, offset))
            owner[spec.name] = (plan, offset)
            offset += spec.nbytes
        dense_nbytes = offset
        for group in experts.get(index, []):
            offset = align_up(offset)
            param_offsets, blob = [], 0
            for spec in group.params:
                # every expert's slice at its fused parameter's residue (exact when a slice is a multiple of 64 bytes)
                blob = placed(blob, residue(spec), align)
                param_offsets.append(blob)
                blob += spec.nbytes // spec.shape[0]
            layout = ExpertLayout(group, offset, align_up(blob), blob, tuple(param_offsets))
            plan.experts.append(layout)
            for expert in range(group.num_experts):
                for param, start in enumerate(param_offsets):
                    piece = layout.piece(expert, param)
                    plan.own.append((piece, offset + expert * layout.stride + start))
                    plan.pieces[piece.name] = (group.params[param].name, expert)
            offset += group.num_experts * layout.stride
        plan.own_nbytes = offset
        borrowed = [spec for spec in specs if spec.name not in {s.name for s in own}]
        _finish(plan, borrowed, owner, residue)
        if plan.experts:
            plan.dense = UnitPlan(index=index, name=name, tensors=list(plan.tensors[: len(own)]))
            _finish(plan.dense, borrowed, owner, residue, region_nbytes=dense_nbytes)
        plans.append(plan)
    return plans


def _finish(
    plan: UnitPlan,
    borrowed: list[TensorSpec],
    owner: dict[str, tuple[UnitPlan, int]],
    residue: Callable[[TensorSpec], int],
    region_nbytes: int = -1,
) -> None:
    """Add the reads of `plan`: its own region (the first `region_nbytes` of it), then each borrowed tensor."""
    nbytes = plan.own_nbytes if region_nbytes < 0 else region_nbytes
    if nbytes:
        plan.ranges.append(ReadRange(plan.key, 0, 0, nbytes))
    offset = align_up(nbytes)
    for spec in borrowed:
        src_plan, src_offset = owner[spec.name]
        offset += residue(spec)
        plan.tensors.append((spec, offset))
        plan.ranges.append(ReadRange(src_plan.key, src_offset, offset, spec.nbytes))
        offset = align_up(offset + spec.nbytes)
    plan.nbytes = align_up(max(offset, 1))


def own_tensors(plan: UnitPlan, get: Callable[[str], torch.Tensor]) -> Iterator[torch.Tensor]:
    """The CPU tensors of `plan.own` in order, from `get(parameter name)`; an expert slice is cut from its fused
    parameter, which is fetched once per unit."""
    fused: dict[str, torch.Tensor] = {}
    for spec, _ in plan.own:
        piece = plan.pieces.get(spec.name)
        if piece is None:
            yield get(spec.name)
            continue
        name, expert = piece
        if name not in fused:
            fused[name] = get(name)
        yield fused[name][expert]


def assemble(plan: UnitPlan, pairs: Iterable[tuple[TensorSpec, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, CPU tensor) of a unit from the (spec, tensor) pairs of its own region: expert slices are put
    back together into their fused parameters."""
    fused: dict[str, torch.Tensor] = {}
    for spec, tensor in pairs:
        piece = plan.pieces.get(spec.name)
        if piece is None:
            yield spec.name, tensor
            continue
        name, expert = piece
        if name not in fused:
            group_spec = next(s for layout in plan.experts for s in layout.group.params if s.name == name)
            fused[name] = torch.empty(group_spec.shape, dtype=group_spec.dtype)
        fused[name][expert].copy_(tensor)
    yield from fused.items()


# A function giving the CPU tensors of a unit's own region, in the order of `plan.own`.
TensorSource = Callable[[UnitPlan], Iterable[torch.Tensor]]


def checkpoint_plans(
    plans: list[UnitPlan], located: dict[str, tuple[str, int]], align: int = TENSOR_ALIGN
) -> list[UnitPlan]:
    """The plans of a store that reads every tensor straight from checkpoint shards: `located` gives each tensor's
    (shard path, absolute byte offset). Each unit's buffer packs its tensors in plan order, each at its offset's
    residue modulo 64 in the shard (where a model loaded by `from_pretrained` holds it, see `plan_units`); a MoE unit
    cannot be read this way (its experts are laid out expert-major, not as the checkpoint stores them)."""
    if any(plan.experts for plan in plans):
        raise ValueError("a MoE model's experts are laid out expert-major: they cannot be read from the checkpoint")
    result = []
    for plan in plans:
        new = UnitPlan(index=plan.index, name=plan.name, tensors=list(plan.tensors), own=[], own_nbytes=0)
        offset = 0
        for position, (spec, _) in enumerate(plan.tensors):
            path, start = located[spec.name]
            keep = align == TENSOR_ALIGN and start % spec.dtype.itemsize == 0  # (CUDA: aligned, no residue)
            offset = placed(offset, start % TENSOR_ALIGN if keep else 0, align)
            new.tensors[position] = (spec, offset)
            new.ranges.append(ReadRange(path, start, offset, spec.nbytes))
            offset += spec.nbytes
        new.own = list(new.tensors)
        new.own_nbytes = offset
        new.nbytes = align_up(max(offset, 1))
        result.append(new)
    return result
