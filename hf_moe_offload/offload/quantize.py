"""Low-bit stores: which matrices are stored group-wise quantized, how they are packed, and how a fetched unit's packed
bytes are dequantized on the execution device into the layout the model computes with.

The scheme is DeepSpeed ZeRO-Inference's (2023) group-wise asymmetric round-to-nearest: each group of `group_size`
consecutive weights along a matrix's input dimension keeps its minimum `m` and its step `s = (max - min) / (2**bits -
1)`; a weight `w` is stored as `q = round((w - m) / s)` in `bits` bits (two 4-bit values per byte, the even input
first in the low nibble) and reads back as `q * s + m`, computed in float32 (one multiplication, then one addition:
the same two roundings on every device) and rounded once to the model's dtype. `s` and `m` are kept in the model's
dtype for 16-bit models (as DeepSpeed keeps them) and in float32 for float32 models.

Quantized: the weights of every `nn.Linear` and transformers `Conv1D` of a unit (the output head included; an input
embedding tied to it is the same matrix, its rows dequantized as they are gathered) and the v5 fused experts' weights,
expert by expert. Not quantized: other embeddings, norms, biases, routers (the model's declared router class, or an
`nn.Linear` beside an experts module with one output per expert). A quantized matrix `<name>` is stored as
three tensors `<name>__qweight`, `<name>__scales`, `<name>__mins` in the matrix's own orientation (a `Conv1D`'s and a
transposed experts module's groups run down the columns), the values packed along the last dimension.

`dequantized_copy(model, config)` is the reference a quantized offloaded model equals bit for bit: the same model in
memory with every quantized weight replaced by its dequantized value.

Checkpoints published quantized are kept as they are stored, with the same codecs: FP8 with block scales
(`Fp8BlockScheme`: `float8_e4m3fn` values and a float32 `weight_scale_inv` per block) and MXFP4 experts
(`Mxfp4Scheme`: E2M1 nibbles and E8M0 exponents per 32 values), dequantized exactly as transformers dequantizes them
on a host without the kernels, so the offloaded model equals transformers' own in-memory load (`loading.py` finds
them in the checkpoint). An FP8 matrix the blocks do not divide (DeepSeek-V3's 576-row `kv_a_proj_with_mqa`) has a
scale for each partly filled last block too, applied as DeepSeek's `weight_dequant` applies it (transformers cannot
dequantize such a matrix: `loading.py` keeps it from trying).
"""

from __future__ import annotations

import copy
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .discovery import find_experts_modules, find_parameters, find_units, is_under, router_class
from .layout import ExpertLayout, TensorSpec, UnitPlan


SUFFIXES = ("__qweight", "__scales", "__mins")
FP8_SUFFIXES = ("__fp8", "__scale_inv")
MXFP4_SUFFIXES = ("__blocks", "__scales")
# the E2M1 values of the 16 nibbles (the OCP microscaling format; transformers' FP4_VALUES)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# dequantize in pieces of about this many weights: bounded temporaries, and pieces that stay in the CPU's caches
_PIECE = 1 << 20


@dataclass(frozen=True)
class QuantScheme:
    """Group-wise asymmetric round-to-nearest with `bits` bits per weight and `group_size` weights per group."""

    bits: int
    group_size: int

    @property
    def name(self) -> str:
        """How the store's manifest records the scheme (a store of another scheme is stale)."""
        return f"rtn-asym-int{self.bits}-g{self.group_size}"

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def label(self) -> str:
        return f"{self.bits}-bit"


@dataclass(frozen=True)
class Fp8BlockScheme:
    """A checkpoint published in FP8 with block scales (`quantization_config.quant_method` "fp8", the DeepSeek-V3 /
    Qwen3-FP8 layout): each matrix `float8_e4m3fn`, with a float32 `weight_scale_inv` per `block` of it; read back as
    transformers reads it on a host without FP8 kernels, `(weight.float() * scale).to(dtype)`. Streamed as stored."""

    block: tuple[int, int] = (128, 128)

    @property
    def name(self) -> str:
        return f"fp8-e4m3-block{self.block[0]}x{self.block[1]}"

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The shape of the scales of a (rows, cols) matrix: one per block, a partly filled last block included."""
        return -(-rows // self.block[0]), -(-cols // self.block[1])

    @property
    def label(self) -> str:
        return "FP8 (checkpoint)"


@dataclass(frozen=True)
class Mxfp4Scheme:
    """A checkpoint published with MXFP4 experts (`quant_method` "mxfp4", the gpt-oss layout): each expert's matrix
    as `<name>_blocks` (two E2M1 values per byte, 32 values per block along the input) and `<name>_scales` (one E8M0
    exponent per block), for a v5 experts parameter stored transposed `(experts, inputs, outputs)`; read back as
    transformers reads it on a host without MXFP4 kernels: `lut[value] * 2**(scale - 127)`, transposed, in the
    parameter's dtype. Streamed as stored."""

    block: int = 32

    @property
    def name(self) -> str:
        return f"mxfp4-e2m1-block{self.block}"

    @property
    def label(self) -> str:
        return "MXFP4 (checkpoint)"


@dataclass(frozen=True)
class QuantTarget:
    """One matrix stored quantized: its full-precision spec, where its input dimension is (-1, or -2 for a
    `Conv1D` / transposed experts weight), and the scheme."""

    spec: TensorSpec
    input_dim: int
    scheme: QuantScheme | Fp8BlockScheme | Mxfp4Scheme

    @property
    def name(self) -> str:
        return self.spec.name

    def parts(self) -> tuple[TensorSpec, ...]:
        """The stored tensors: packed values (packed along the last dimension), per-group steps and minimums (a group
        runs along the input dimension, which keeps its place); of an FP8 checkpoint's matrix, its FP8 values and
        block scales as the checkpoint holds them."""
        *lead, rows, cols = self.spec.shape
        if isinstance(self.scheme, Mxfp4Scheme):  # the parameter is (inputs, outputs); the blocks run along inputs
            groups = rows // self.scheme.block
            return (
                TensorSpec(self.name + MXFP4_SUFFIXES[0], torch.uint8, (*lead, cols, groups, self.scheme.block // 2)),
                TensorSpec(self.name + MXFP4_SUFFIXES[1], torch.uint8, (*lead, cols, groups)),
            )
        if isinstance(self.scheme, Fp8BlockScheme):
            return (
                TensorSpec(self.name + FP8_SUFFIXES[0], torch.float8_e4m3fn, self.spec.shape),
                TensorSpec(self.name + FP8_SUFFIXES[1], torch.float32, (*lead, *self.scheme.grid(rows, cols))),
            )
        g = self.scheme.group_size
        groups = (*lead, rows, cols // g) if self.input_dim == -1 else (*lead, rows // g, cols)
        meta = self.spec.dtype if self.spec.dtype.itemsize == 2 else torch.float32
        return (
            TensorSpec(self.name + SUFFIXES[0], torch.uint8, (*lead, rows, cols * self.scheme.bits // 8)),
            TensorSpec(self.name + SUFFIXES[1], meta, groups),
            TensorSpec(self.name + SUFFIXES[2], meta, groups),
        )


def check_scheme_of(model_name: str, name: str, shape: tuple[int, ...], input_dim: int, scheme: QuantScheme) -> None:
    inputs = shape[input_dim]
    if inputs % scheme.group_size:
        raise ValueError(
            f"weight_group_size ({scheme.group_size}) must divide the input dimension of every quantized matrix: "
            f"{name} of {model_name} has shape {tuple(shape)}, {inputs} inputs; choose a power of two that divides "
            f"them (or weight_bits=None)"
        )
    if scheme.bits == 4 and shape[-1] % 2:
        raise ValueError(f"4-bit weights are packed two per byte: {name} has an odd last dimension ({shape[-1]})")


def quantization_targets(model: nn.Module, scheme: QuantScheme) -> dict[str, QuantTarget]:
    """The matrices of `model`'s units stored quantized under `scheme`, by parameter name (the canonical name of a
    tied weight); a ValueError naming the tensor when one cannot be grouped, or when there is none."""
    parameters = find_parameters(model)
    units = [name for name, _ in find_units(model)]
    canonical = {id(p): name for name, p in parameters.originals.items()}
    routers = router_class(model)
    # a router that is a plain nn.Linear: beside an experts module, one output per expert
    gates = set()
    for experts_name, experts, _ in find_experts_modules(model):
        block = model.get_submodule(experts_name.rpartition(".")[0]) if "." in experts_name else model
        for child in block.children():
            if isinstance(child, nn.Linear) and child.out_features == experts.num_experts:
                gates.add(id(child))
    found: dict[str, tuple[torch.Tensor, int]] = {}
    for module in model.modules():
        if (routers is not None and isinstance(module, routers)) or id(module) in gates:
            continue
        if isinstance(module, nn.Linear):
            input_dim = -1
        elif isinstance(module, Conv1D):
            input_dim = -2  # weight (inputs, outputs)
        else:
            continue
        weight = module._parameters.get("weight")
        if isinstance(weight, nn.Parameter) and weight.dim() == 2:
            found.setdefault(canonical[id(weight)], (weight, input_dim))
    for _, module, attrs in find_experts_modules(model):
        input_dim = -2 if getattr(module, "is_transposed", False) else -1
        for attr in attrs:
            weight = module._parameters[attr]
            if weight.dim() == 3:
                found.setdefault(canonical[id(weight)], (weight, input_dim))
    targets = {}
    for name, (weight, input_dim) in found.items():
        if not weight.dtype.is_floating_point or not any(
            is_under(path, unit) for path in parameters.paths[name] for unit in units
        ):
            continue
        check_scheme_of(type(model).__name__, name, tuple(weight.shape), input_dim, scheme)
        targets[name] = QuantTarget(TensorSpec(name, weight.dtype, tuple(weight.shape)), input_dim, scheme)
    if not targets:
        raise ValueError(
            f"weight_bits={scheme.bits} asks for a quantized store, but {type(model).__name__} has no matrix it can "
            f"group (the weights of nn.Linear or transformers Conv1D modules, the v5 fused experts): use weight_bits="
            f"None"
        )
    return targets


# -- packing --------------------------------------------------------------------------------------------------------


def quantize(target: QuantTarget, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored parts (packed values, steps, minimums) of `weight`, a CPU tensor of `target`'s shape, computed in
    pieces of whole groups (bounded temporaries: a checkpoint's largest matrix is never expanded whole)."""
    if tuple(weight.shape) != target.spec.shape:
        raise RuntimeError(f"{target.name}: got shape {tuple(weight.shape)}, the store expects {target.spec.shape}")
    parts = tuple(torch.empty(spec.shape, dtype=spec.dtype) for spec in target.parts())
    lead = weight.shape[:-2]
    for index in itertools.product(*(range(n) for n in lead)):
        _quantize_matrix(weight[index], target, *(part[index] for part in parts))
    return parts


def _quantize_matrix(weight: torch.Tensor, target: QuantTarget, q_out, step_out, low_out) -> None:
    scheme = target.scheme
    g = scheme.group_size
    rows, cols = weight.shape
    # pieces of whole groups: rows of groups along the row (input_dim -1), or blocks of `g` rows (groups down columns)
    across = target.input_dim == -1
    unit = 1 if across else g
    per_piece = max(1, _PIECE // (cols * unit))
    for start in range(0, rows // unit, per_piece):
        end = min(rows // unit, start + per_piece)
        w = weight[start * unit : end * unit].to(torch.float32)
        w = w.view(end - start, cols // g, g) if across else w.view(end - start, g, cols)
        if not torch.isfinite(w).all():
            raise ValueError(f"{target.name} holds non-finite values (inf or NaN): it cannot be quantized")
        axis = -1 if across else 1
        low = w.amin(axis)
        step = (w.amax(axis) - low) / scheme.levels
        # the stored step and minimum, then the values against exactly those (what dequantization will use)
        step = step.to(step_out.dtype)
        low = low.to(low_out.dtype)
        step = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: every value is its minimum
        q = (w - low.to(torch.float32).unsqueeze(axis)) / step.to(torch.float32).unsqueeze(axis)
        q = q.round_().clamp_(0, scheme.levels).to(torch.uint8).view((end - start) * unit, cols)
        if scheme.bits == 4:
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        q_out[start * unit : end * unit] = q
        step_out[start:end] = step
        low_out[start:end] = low


def _unpack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The uint8 values of packed `q` (two 4-bit values per byte, the even one in the low nibble)."""
    if bits == 8:
        return q
    if sys.byteorder == "little":
        # each byte `hi << 4 | lo` widened to the int16 `hi << 8 | lo`, whose two bytes are then `lo, hi`: the values
        # interleaved with a few vectorized integer passes (a stack along the last dimension is several times slower)
        wide = q.to(torch.int16)
        wide = (wide & 0x0F) | ((wide & 0xF0) << 4)
        return wide.view(torch.uint8).view(*q.shape[:-1], q.shape[-1] * 2)
    return torch.stack((q & 15, q >> 4), dim=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)


def dequantize_into(out: torch.Tensor, parts: Sequence[torch.Tensor], target: QuantTarget) -> None:
    """Write the dequantized weights of the stored `parts` (as `target.parts()`) into `out` (a tensor of `target`'s
    shape, or of any number of leading experts more or fewer), on their device. Works on strided views (the
    expert-major layout)."""
    lead = out.shape[:-2]
    matrix = {Fp8BlockScheme: _dequantize_fp8, Mxfp4Scheme: _dequantize_mxfp4}.get(
        type(target.scheme), _dequantize_matrix
    )
    for index in itertools.product(*(range(n) for n in lead)):
        matrix(out[index], *(part[index] for part in parts), target)


def _dequantize_mxfp4(out: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, target: QuantTarget) -> None:
    """One expert's MXFP4 matrix into `out` `(inputs, outputs)`: each nibble's E2M1 value times `2**(scale - 127)`
    (exact in float32), rounded once to `out`'s dtype, transposed; in pieces of output rows."""
    inputs, outputs = out.shape
    groups, half = blocks.shape[-2:]
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    per_piece = max(1, _PIECE // inputs)
    for start in range(0, outputs, per_piece):
        end = min(outputs, start + per_piece)
        packed = blocks[start:end].reshape(end - start, groups * half)
        values = lut[_unpack(packed, 4).long()].view(end - start, groups, 2 * half)
        values = values * torch.exp2(scales[start:end].to(torch.float32) - 127.0).unsqueeze(-1)
        out[:, start:end].copy_(values.view(end - start, inputs).t())


def _dequantize_fp8(out: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, target: QuantTarget) -> None:
    """One FP8 matrix, in pieces of whole block rows: `values.float() * scale` (one rounding), then to `out`'s dtype,
    as transformers' `Fp8Dequantize` computes it; a last block row or column that the matrix only partly fills (a
    DeepSeek-V3 `kv_a_proj_with_mqa` of 576 rows) takes its block's scale, as DeepSeek's own `weight_dequant` does."""
    b0, b1 = target.scheme.block
    rows, cols = out.shape
    block_rows, _ = target.scheme.grid(rows, cols)
    whole = cols // b1  # the column blocks the matrix fills
    per_piece = max(1, _PIECE // (b0 * cols))
    for start in range(0, block_rows, per_piece):
        end = min(block_rows, start + per_piece)
        first, last = start * b0, min(rows, end * b0)
        steps = scale[start:end].to(torch.float32).repeat_interleave(b0, dim=0)[: last - first]  # (rows, col blocks)
        piece = values[first:last].to(torch.float32)  # (rows, cols)
        if whole:
            full = piece[:, : whole * b1].view(last - first, whole, b1)
            full.mul_(steps[:, :whole].unsqueeze(-1))
        if whole * b1 < cols:
            piece[:, whole * b1 :].mul_(steps[:, whole:])
        out[first:last].copy_(piece)


def _dequantize_matrix(out: torch.Tensor, q: torch.Tensor, step: torch.Tensor, low: torch.Tensor, target: QuantTarget):
    """One matrix, in pieces of whole groups: every element `q * step + low` in float32, then to `out`'s dtype."""
    bits, g = target.scheme.bits, target.scheme.group_size
    rows, cols = out.shape
    if target.input_dim == -1:  # groups along each row
        per_piece = max(1, _PIECE // cols)
        for start in range(0, rows, per_piece):
            end = min(rows, start + per_piece)
            values = _unpack(q[start:end], bits).to(torch.float32).view(end - start, cols // g, g)
            values.mul_(step[start:end].to(torch.float32).unsqueeze(-1))
            values.add_(low[start:end].to(torch.float32).unsqueeze(-1))
            out[start:end].copy_(values.view(end - start, cols))
        return
    per_piece = max(1, _PIECE // (g * cols))  # groups down each column: pieces of whole groups of rows
    for start in range(0, rows // g, per_piece):
        end = min(rows // g, start + per_piece)
        values = _unpack(q[start * g : end * g], bits).to(torch.float32).view(end - start, g, cols)
        values.mul_(step[start:end].to(torch.float32).unsqueeze(1))
        values.add_(low[start:end].to(torch.float32).unsqueeze(1))
        out[start * g : end * g].copy_(values.view((end - start) * g, cols))


def dequantize(target: QuantTarget, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A new tensor of `target`'s shape and dtype holding the dequantized `parts`, on their device."""
    out = torch.empty(target.spec.shape, dtype=target.spec.dtype, device=parts[0].device)
    dequantize_into(out, parts, target)
    return out


# -- the store's side -----------------------------------------------------------------------------------------------


def stored_specs(specs: list[TensorSpec], targets: dict[str, QuantTarget]) -> list[TensorSpec]:
    """`specs` with each quantized matrix replaced by its stored parts."""
    return [part for spec in specs for part in (targets[spec.name].parts() if spec.name in targets else (spec,))]


def packed_getter(
    get: Callable[[str], torch.Tensor],
    targets: dict[str, QuantTarget],
    raw: Callable[[str], torch.Tensor] | None = None,
) -> Callable[[str], torch.Tensor]:
    """`get(name)` of a stored tensor from `get` of the full-precision weights: each matrix is quantized once (its
    parts kept until this getter is dropped: one unit's packed bytes at most). The parts of a checkpoint's own
    quantized matrices (FP8) come from `raw(part name)`, as the checkpoint stores them."""
    owner = {part.name: (target, i) for target in targets.values() for i, part in enumerate(target.parts())}
    packed: dict[str, tuple[torch.Tensor, ...]] = {}

    def stored(name: str) -> torch.Tensor:
        hit = owner.get(name)
        if hit is None:
            return get(name)
        target, index = hit
        if isinstance(target.scheme, (Fp8BlockScheme, Mxfp4Scheme)):
            if raw is None:
                raise RuntimeError(f"{name} is stored as its checkpoint holds it, but no checkpoint reader was given")
            return raw(name)
        parts = packed.get(target.name)
        if parts is None:
            parts = packed[target.name] = quantize(target, get(target.name))
        return parts[index]

    return stored


class PlanCodec:
    """Turns the bytes of a stored (packed) plan into the buffer of its full-precision plan, on the device the bytes
    are on.

    Args:
        stored: the plan of the store's bytes (quantized matrices as their parts).
        compute: the same unit's full-precision plan (what the model's parameters view).
        targets: the quantized matrices.
    """

    def __init__(self, stored: UnitPlan, compute: UnitPlan, targets: dict[str, QuantTarget]):
        self.stored = stored
        self.compute = compute
        self.targets = targets
        offsets = {spec.name: (spec, offset) for spec, offset in stored.tensors}
        self._tensors = []
        for spec, offset in compute.tensors:
            target = targets.get(spec.name)
            parts = target.parts() if target is not None else (spec,)
            self._tensors.append((spec, offset, target, [offsets[part.name] for part in parts]))
        self.experts = [ExpertCodec(s, c, targets) for s, c in zip(stored.experts, compute.experts, strict=True)]

    def decode(self, region: Callable[[int, int], torch.Tensor], out: torch.Tensor) -> None:
        """Fill the uint8 `out` (the full-precision plan's buffer) from `region(offset, nbytes)`, the stored bytes."""
        for spec, offset, target, parts in self._tensors:
            if target is None:
                ((_, start),) = parts
                out[offset : offset + spec.nbytes].copy_(region(start, spec.nbytes))
                continue
            views = [region(start, part.nbytes).view(part.dtype).view(part.shape) for part, start in parts]
            dst = out[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape)
            dequantize_into(dst, views, target)
        for codec in self.experts:
            count = codec.stored.num_experts
            src = region(codec.stored.offset, count * codec.stored.stride)
            codec.decode(src, count, out[codec.compute.offset : codec.compute.offset + count * codec.compute.stride])


class ExpertCodec:
    """The same for the experts of one MoE layer: stored expert-major in packed form, decoded expert-major in full
    precision (`stored` and `compute` are the layer's two layouts)."""

    def __init__(self, stored: ExpertLayout, compute: ExpertLayout, targets: dict[str, QuantTarget]):
        self.stored = stored
        self.compute = compute
        index = {spec.name: i for i, spec in enumerate(stored.group.params)}
        self._params = []
        for spec in compute.group.params:
            target = targets.get(spec.name)
            parts = target.parts() if target is not None else (spec,)
            self._params.append((target, [index[part.name] for part in parts]))

    def decode(self, src: torch.Tensor, count: int, out: torch.Tensor) -> None:
        """`count` experts stored back to back in the uint8 `src` (`stored.stride` apart) into `out`
        (`compute.stride` apart)."""
        packed = self.stored.views(src, count)
        full = self.compute.views(out, count)
        for dst, (target, parts) in zip(full, self._params, strict=True):
            if target is None:
                dst.copy_(packed[parts[0]])
            else:
                dequantize_into(dst, [packed[i] for i in parts], target)


def codecs_of(stored: list[UnitPlan], compute: list[UnitPlan], targets: dict[str, QuantTarget]) -> dict[int, PlanCodec]:
    """A codec for every stored plan (and its routed `dense` variant) whose unit brings a quantized matrix, by the
    plan's `id`."""
    codecs = {}
    for s, c in zip(stored, compute, strict=True):
        names = [spec.name for spec, _ in c.tensors] + [p.name for layout in c.experts for p in layout.group.params]
        if not any(name in targets for name in names):
            continue
        codecs[id(s)] = PlanCodec(s, c, targets)
        if s.dense is not None:
            codecs[id(s.dense)] = PlanCodec(s.dense, c.dense, targets)
    return codecs


# -- the reference --------------------------------------------------------------------------------------------------


def dequantized_weights(model: nn.Module, scheme: QuantScheme) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dequantized value) of every matrix `model` would store quantized under `scheme`."""
    for name, target in quantization_targets(model, scheme).items():
        weight = model.get_parameter(name)
        yield name, dequantize(target, quantize(target, weight.detach().cpu()))


def dequantized_copy(model: nn.Module, config) -> nn.Module:
    """The reference a quantized offloaded model equals bit for bit: a copy of `model` in memory whose quantized
    weights (see `OffloadConfig.weight_bits`) hold their dequantized values (same dtype, same device; tied weights
    stay tied). `model` itself is not changed.

    Args:
        model (`torch.nn.Module`): the model in memory (not offloaded), as `enable_offload` would take it.
        config (`OffloadConfig`): its `weight_bits` and `weight_group_size` (`weight_bits=None` gives a plain copy).

    Returns:
        `torch.nn.Module`: the copy.
    """
    if getattr(model, "_hf_moe_offload_state", None) is not None:
        raise RuntimeError("dequantized_copy needs the model in memory: this one is offloaded (disable_offload first)")
    reference = copy.deepcopy(model)
    for param in reference.parameters():  # every weight a fresh allocation, as the offloaded model's buffers are
        param.data = param.data.clone()
    if config.weight_bits is None:
        return reference
    scheme = QuantScheme(config.weight_bits, config.weight_group_size)
    for name, value in dequantized_weights(reference, scheme):
        param = reference.get_parameter(name)
        param.data = value.to(param.device)
    return reference
