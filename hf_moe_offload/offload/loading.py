"""`load_offloaded`: a causal LM loaded straight into an offload store, never held whole in memory.

transformers builds the model on the meta device with every weight "on disk" (`device_map={"": "disk"}`); the lazy
reader accelerate leaves behind serves the store's writer tensor by tensor, then its hooks are replaced by ours. With
an NVMe store and a checkpoint already in the wanted dtype, the checkpoint's shards can be read in place (the
checkpoint plans).
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.hooks import remove_hook_from_module
from torch import nn
from transformers.utils import logging

from .api import attach, check_config, new_runtime
from .config import resolve_execution_device
from .layout import SAFETENSORS_DTYPES, TENSOR_ALIGN, TensorSpec, checkpoint_plans
from .ownership import conversion_folder, remove_leftovers
from .quantize import Fp8BlockScheme, Mxfp4Scheme, QuantScheme, QuantTarget, quantization_targets
from .store import check_writable_dir, checkpoint_fingerprint, read_safetensors_header


logger = logging.get_logger(__name__)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def _in_folder(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


class _DropDiskOffloadWarning(std_logging.Filter):
    """accelerate warns that the parameters "were offloaded to the disk": true of the lazy-reading map that
    `load_offloaded` asks for, which only serves to read the checkpoint and is replaced by the store."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "Some parameters are on the meta device" not in record.getMessage()


# What the scales of an FP8 matrix with partial blocks are renamed to while transformers loads the checkpoint (see
# `_partial_block_scales`): a name no model has, which transformers then reports as an unexpected key
_UNLOADED_SCALES = "hf_moe_offload_streamed_block_scales"


class _DropOwnLoadReport(std_logging.Filter):
    """transformers' load report lists the scales `load_offloaded` kept from it as unexpected keys: a report that lists
    nothing else is dropped (one that lists other keys too is kept whole)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines() if "|" in line and not set(line) <= set("-+| ")][1:]
        return not rows or not all(_UNLOADED_SCALES in row for row in rows)


@contextmanager
def _quiet_loading_logs() -> Iterator[None]:
    """accelerate's disk-offload warning and transformers' report of the scales kept from it, dropped while
    `load_offloaded` has transformers load the checkpoint."""
    filters = [
        (std_logging.getLogger("accelerate.big_modeling"), _DropDiskOffloadWarning()),
        (std_logging.getLogger("transformers.modeling_utils"), _DropOwnLoadReport()),
    ]
    for emitter, dropped in filters:
        emitter.addFilter(dropped)
    try:
        yield
    finally:
        for emitter, dropped in filters:
            emitter.removeFilter(dropped)


def _lazy_weights(model: nn.Module):
    """The lazy checkpoint reader accelerate attached for `device_map={"": "disk"}`.

    Workaround: accelerate keeps it only as the `weights_map` of its `AlignDevicesHook`s (no public accessor); it is
    read here and only here.
    """
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None:
            return getattr(weights_map, "dataset", weights_map)
    raise RuntimeError("transformers did not offload the weights to disk (no accelerate weights map found)")


def _checkpoint_locations(model: nn.Module, loader, offload_folder: str) -> dict[str, tuple[str, int]]:
    """(shard path, absolute byte offset) of each parameter the checkpoint holds as the model does (same name, dtype
    and shape: transformers loads it as a view of the shard, not converted)."""
    index = getattr(loader, "index", {})
    headers: dict[str, tuple[int, dict]] = {}
    located: dict[str, tuple[str, int]] = {}
    for name, param in model.named_parameters():
        entry = index.get(name)
        if not entry or "safetensors_file" not in entry:
            continue
        path = os.path.abspath(entry["safetensors_file"])
        if _in_folder(path, offload_folder):
            continue
        if path not in headers:
            headers[path] = read_safetensors_header(path)
        data_start, header = headers[path]
        info = header.get(entry["weight_name"])
        if (
            info is None
            or info["dtype"] != SAFETENSORS_DTYPES.get(param.dtype)
            or tuple(info["shape"]) != tuple(param.shape)
        ):
            continue
        located[name] = (path, data_start + info["data_offsets"][0])
    return located


def load_offloaded(
    name_or_path: str | os.PathLike,
    config=None,
    dtype: torch.dtype | str | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a causal LM straight into an offload store, never holding the whole model in memory.

    The model is built on the meta device by `AutoModelForCausalLM.from_pretrained` (all weights "on disk"), then
    the store is filled tensor by tensor from the checkpoint's safetensors shards. With an NVMe store and a
    checkpoint already in `dtype`, the shards are read in place (no copy) unless `config.reuse_checkpoint=False`;
    tensors transformers must convert (another dtype, fused experts) and every MoE model are written into the store.
    With `config.weight_bits` (a low-bit store) every matrix is quantized as it is written, tensor by tensor, and the
    groups are checked on the model built from its config before any weight is read.

    Args:
        name_or_path (`str` or `os.PathLike`):
            A checkpoint directory written by `save_pretrained`, or a Hub id, holding safetensors weights (pickle
            checkpoints are refused).
        config (`OffloadConfig`, *optional*):
            Where the weights live and how they stream; defaults to `OffloadConfig()`.
        dtype (`torch.dtype` or `str`, *optional*):
            The weights' dtype (`torch.bfloat16`, `"float32"`, `"auto"`); default: `config.dtype` (e.g. from a
            DeepSpeed config's `bf16` section), else the checkpoint's.
        from_pretrained_kwargs:
            Passed to `AutoModelForCausalLM.from_pretrained` (`trust_remote_code`, `revision`, ...); not
            `device_map` or `offload_folder`, which the runtime sets itself.

    Returns:
        `torch.nn.Module`: the model, offloaded (undo with `disable_offload`, which loads it into CPU memory).
    """
    from transformers import AutoModelForCausalLM

    config = check_config(config)
    resolve_execution_device(config)  # a device this machine lacks is refused before any work
    if not isinstance(name_or_path, (str, os.PathLike)) or not isinstance(os.fspath(name_or_path), str):
        raise ValueError(f"name_or_path ({name_or_path!r}) must be a checkpoint directory or a Hub id (a str)")
    name_or_path = os.fspath(name_or_path)
    for placed in ("device_map", "offload_folder"):
        if from_pretrained_kwargs.get(placed) is not None:
            raise ValueError(f"load_offloaded places the weights itself: do not pass {placed}")
        from_pretrained_kwargs.pop(placed, None)
    _check_safetensors(name_or_path)
    model_config = _model_config(name_or_path, from_pretrained_kwargs)
    scheme = _checkpoint_scheme(name_or_path, model_config)  # an FP8 / MXFP4 checkpoint, streamed as stored
    if scheme is not None and config.weight_bits is not None:
        raise ValueError(
            f"weight_bits ({config.weight_bits}) asks to quantize {name_or_path}, which is published quantized "
            f"({scheme.label}): use weight_bits=None, its weights are streamed as stored"
        )
    _check_quantizable(model_config, config, from_pretrained_kwargs)
    if scheme is not None:
        meta = _meta_model(model_config, from_pretrained_kwargs)
        if os.path.isdir(name_or_path):  # its scales checked before transformers reads anything (a Hub one: after)
            _quantized_checkpoint(meta, name_or_path, scheme, from_pretrained_kwargs, warn=False)
        if isinstance(scheme, Fp8BlockScheme):
            # transformers cannot dequantize a matrix with partial blocks (it raises, or, where the grid happens to
            # divide the shape, takes other blocks): it must not see their scales; the store reads them as stored
            renames = _partial_block_scales(meta, scheme)
            if renames:
                kept = from_pretrained_kwargs.get("key_mapping") or {}
                from_pretrained_kwargs["key_mapping"] = {**renames, **kept}
    if dtype is None:
        dtype = config.dtype
    if isinstance(dtype, str) and dtype != "auto":
        named = getattr(torch, dtype, None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"dtype ({dtype!r}) is not a torch dtype name (e.g. 'bfloat16', 'float32', 'auto')")
        dtype = named
    # Tensors transformers must convert (fused experts, another dtype) pass through this folder once, on the NVMe
    # drive when there is one: /tmp may be small.
    scratch = os.path.abspath(config.nvme_path) if config.offload_device == "nvme" else None
    if scratch is not None:
        check_writable_dir(scratch)
        remove_leftovers(scratch, temporary_files=False)  # what loads interrupted before left
    try:
        offload_folder = conversion_folder(scratch)
    except OSError as err:
        raise ValueError(f"nvme_path ({scratch}) is not writable: {err.strerror}") from err
    if scheme is not None:
        if from_pretrained_kwargs.get("quantization_config") is not None:
            raise ValueError(
                f"{name_or_path} is published quantized ({scheme.label}): load_offloaded streams it as stored and "
                f"sets quantization_config itself; do not pass one"
            )
        # transformers builds full-precision modules (dequantize=True, its own choice on a host without the kernels):
        # the store keeps the checkpoint's bytes and the runtime dequantizes them on the device
        from_pretrained_kwargs["quantization_config"] = _dequantizing_config(scheme)
    try:
        with _quiet_loading_logs():
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                device_map={"": "disk"},
                offload_folder=offload_folder,
                dtype=dtype if dtype is not None else "auto",
                use_safetensors=True,
                **from_pretrained_kwargs,
            )
        loader = _lazy_weights(model)
        remove_hook_from_module(model, recurse=True)
        if hasattr(model, "hf_device_map"):
            delattr(model, "hf_device_map")
        _attach_from_checkpoint(model, config, name_or_path, loader, offload_folder, from_pretrained_kwargs, scheme)
    finally:
        shutil.rmtree(offload_folder, ignore_errors=True)
    return model


_HUB_KWARGS = ("trust_remote_code", "revision", "token", "cache_dir", "local_files_only", "subfolder")


def _model_config(name_or_path: str, from_pretrained_kwargs: dict):
    """The checkpoint's config, read once before anything is loaded (for the checks below)."""
    from transformers import AutoConfig

    hub_kwargs = {key: from_pretrained_kwargs[key] for key in _HUB_KWARGS if key in from_pretrained_kwargs}
    return AutoConfig.from_pretrained(name_or_path, **hub_kwargs)


def _check_quantizable(model_config, config, from_pretrained_kwargs: dict) -> None:
    """A low-bit store's matrices must be groupable: checked on the model built on the meta device from its config
    alone, before any weight is read."""
    if config.weight_bits is None:
        return
    quantization_targets(
        _meta_model(model_config, from_pretrained_kwargs), QuantScheme(config.weight_bits, config.weight_group_size)
    )


def _meta_model(model_config, from_pretrained_kwargs: dict) -> nn.Module:
    """The model of `model_config` on the meta device (its parameters' names and shapes, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            model_config, trust_remote_code=from_pretrained_kwargs.get("trust_remote_code", False)
        )


def _partial_block_scales(model: nn.Module, scheme: Fp8BlockScheme) -> dict[str, str]:
    """A `key_mapping` for `from_pretrained` that renames the `weight_scale_inv` of every matrix the blocks do not
    divide (DeepSeek-V3's 576-row `kv_a_proj_with_mqa`) to a name no parameter has.

    Workaround: transformers' `Fp8Dequantize` derives the block size from the shape of the scale grid, so a partial
    last block makes it raise (576 rows, 5 block rows) or, where the grid happens to divide the shape, scale with blocks
    of another size. Without its scales transformers loads such a matrix cast from FP8 (values the store never uses: it
    reads the matrix and its scales from the checkpoint, `_fp8_targets`). A name without a scale in the checkpoint is
    renamed to nothing, harmlessly."""
    b0, b1 = scheme.block
    modules = [
        name.removesuffix(".weight")
        for name, param in model.named_parameters()
        if name.endswith(".weight") and param.dim() == 2 and (param.shape[0] % b0 or param.shape[1] % b1)
    ]
    if not modules:
        return {}
    return {rf"^({'|'.join(re.escape(m) for m in modules)})\.weight_scale_inv$": rf"\1.{_UNLOADED_SCALES}"}


def _checkpoint_scheme(name_or_path: str, model_config) -> Fp8BlockScheme | Mxfp4Scheme | None:
    """The scheme of a checkpoint published quantized in a format the store keeps as it is (FP8 with block scales,
    MXFP4), from its config; None for a full-precision checkpoint (or, with a warning, a format the store keeps as
    transformers dequantizes it). A clear ValueError for a block size it cannot keep."""
    quantization = getattr(model_config, "quantization_config", None)
    if quantization is None:
        return None
    fields = quantization if isinstance(quantization, dict) else quantization.to_dict()
    method = fields.get("quant_method")
    if method == "mxfp4":
        return Mxfp4Scheme()
    if method != "fp8":
        logger.warning(
            f"{name_or_path} is quantized with quant_method {method!r}: the store keeps the weights as transformers "
            f"loads them on this machine (dequantized), not as the checkpoint stores them (quant_method 'fp8' with "
            f"block scales and 'mxfp4' are streamed as stored)"
        )
        return None
    block = fields.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(
            f"quantization_config.weight_block_size ({block!r}) of {name_or_path} must be two positive integers (e.g. "
            f"[128, 128]): per-tensor FP8 scales are not supported"
        )
    return Fp8BlockScheme(tuple(block))


def _dequantizing_config(scheme):
    """The loading attributes that make transformers build full-precision modules for a quantized checkpoint."""
    from transformers import FineGrainedFP8Config, Mxfp4Config

    if isinstance(scheme, Mxfp4Scheme):
        return Mxfp4Config(dequantize=True)
    return FineGrainedFP8Config(weight_block_size=scheme.block, dequantize=True)


def _quantized_checkpoint(model: nn.Module, name_or_path: str, scheme, from_pretrained_kwargs: dict, warn: bool = True):
    """(targets, raw reader) of the quantized checkpoint of `scheme`: the model's matrices the checkpoint holds in FP8
    with block scales, or its experts in MXFP4, each read as stored; ({}, None) without a scheme. A clear ValueError
    naming the tensor for missing or misshapen scales, or experts the blocks do not divide. `warn=False`: only the
    checks, made on the model built on the meta device before transformers loads anything (its warnings come then)."""
    if scheme is None:
        return {}, None
    headers: dict[str, tuple[str, dict]] = {}
    for path in _checkpoint_shards(name_or_path, from_pretrained_kwargs):
        for tensor, info in read_safetensors_header(path)[1].items():
            if tensor != "__metadata__":
                headers[tensor] = (path, info)
    # each stored part: the checkpoint tensor it is, or (fused experts) the per-expert tensors it stacks, each expert's
    # row blocks concatenated (gate, then up: transformers' MergeModulelist + Concatenate)
    sources: dict[str, str | list[list[str]]] = {}
    if isinstance(scheme, Mxfp4Scheme):
        targets = _mxfp4_targets(model, name_or_path, scheme, headers)
        for target in targets.values():
            for part, suffix in zip(target.parts(), ("_blocks", "_scales"), strict=True):
                sources[part.name] = target.name + suffix
    else:
        targets = _fp8_targets(model, name_or_path, scheme, headers, sources, warn)
    if not targets:
        return {}, None

    def tensor(name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(headers[name][0], framework="pt") as f:
            return f.get_tensor(name)

    def raw(part_name: str) -> torch.Tensor:
        source = sources[part_name]
        if isinstance(source, str):
            return tensor(source)
        return torch.stack([torch.cat([tensor(name) for name in expert]) for expert in source])

    return targets, raw


def _mxfp4_targets(model: nn.Module, name_or_path: str, scheme, headers: dict) -> dict[str, QuantTarget]:
    """The v5 experts parameters `(experts, inputs, outputs)` the checkpoint holds as MXFP4 `_blocks` + `_scales`."""
    targets = {}
    for name, param in model.named_parameters():
        blocks, scales = headers.get(name + "_blocks"), headers.get(name + "_scales")
        if blocks is None and scales is None:
            continue
        if blocks is None or scales is None:
            missing = name + ("_blocks" if blocks is None else "_scales")
            raise ValueError(f"{name} of {name_or_path} is MXFP4 but the checkpoint holds no {missing}")
        if param.dim() != 3 or param.shape[1] % scheme.block:
            raise ValueError(
                f"{name} of {name_or_path} has shape {tuple(param.shape)}: MXFP4 is supported for (experts, inputs, "
                f"outputs) parameters whose inputs are a multiple of {scheme.block}"
            )
        target = QuantTarget(TensorSpec(name, param.dtype, tuple(param.shape)), -2, scheme)
        for (_, info), spec in zip((blocks, scales), target.parts(), strict=True):
            if tuple(info["shape"]) != spec.shape or info["dtype"] != "U8":
                raise ValueError(
                    f"{spec.name.replace('__', '_')} of {name_or_path} is {info['dtype']} {info['shape']}: U8 "
                    f"{list(spec.shape)} is expected for {name} {tuple(param.shape)}"
                )
        targets[name] = target
    return targets


def _fp8_matrix(
    name: str, name_or_path: str, headers: dict, rows: int, cols: int, scheme, expert: bool = False
) -> None:
    """Check that the FP8 checkpoint tensor `name` of shape (rows, cols) has its block scales. A matrix the blocks do
    not divide has a partly filled last block row or column (DeepSeek-V3's 576-row `kv_a_proj_with_mqa`); an expert's
    must be whole blocks (its gate and up projections are stacked into one matrix, and so are their scales)."""
    scale = headers.get(name + "_scale_inv")
    if scale is None:
        raise ValueError(f"{name} of {name_or_path} is FP8 but the checkpoint holds no {name}_scale_inv")
    block = list(scheme.block)
    if expert and (rows % block[0] or cols % block[1]):
        raise ValueError(
            f"weight_block_size {block} must divide the shape of every FP8 expert matrix: {name} is {rows}x{cols} "
            f"(partial blocks are supported for the other matrices, not for experts)"
        )
    grid = scheme.grid(rows, cols)
    if tuple(scale[1]["shape"]) != grid or scale[1]["dtype"] != "F32":
        raise ValueError(
            f"{name}_scale_inv of {name_or_path} is {scale[1]['dtype']} {scale[1]['shape']}: a float32 "
            f"{grid} grid of {block} blocks is expected for {rows}x{cols}"
        )


# a v5 fused experts parameter and the per-expert checkpoint tensors it is made of (transformers' qwen2_moe family of
# conversions: Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, ...)
_PER_EXPERT = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",), "up_proj": ("up_proj",)}


def _fp8_targets(
    model: nn.Module, name_or_path: str, scheme, headers: dict, sources: dict, warn: bool = True
) -> dict[str, QuantTarget]:
    """The model's matrices the checkpoint holds in FP8 with their block scales: as they are, or (fused experts) as
    per-expert tensors; fills `sources` with the checkpoint tensors of each stored part."""
    targets: dict[str, QuantTarget] = {}
    for name, param in model.named_parameters():
        entry = headers.get(name)
        if entry is not None and entry[1]["dtype"] == "F8_E4M3" and param.dim() == 2:
            rows, cols = param.shape
            _fp8_matrix(name, name_or_path, headers, rows, cols, scheme)
            target = QuantTarget(TensorSpec(name, param.dtype, (rows, cols)), -1, scheme)
            values, scales = target.parts()
            sources[values.name], sources[scales.name] = name, name + "_scale_inv"
            targets[name] = target
            continue
        module, _, attr = name.rpartition(".")
        pieces = _PER_EXPERT.get(attr)
        if param.dim() != 3 or pieces is None or f"{module}.0.{pieces[0]}.weight" not in headers:
            continue
        experts, rows, cols = param.shape
        names = [[f"{module}.{e}.{piece}.weight" for piece in pieces] for e in range(experts)]
        if not all(n in headers and headers[n][1]["dtype"] == "F8_E4M3" for expert in names for n in expert):
            continue  # not every expert in FP8: stored as transformers loads it
        for expert in names:
            for n in expert:
                _fp8_matrix(n, name_or_path, headers, *headers[n][1]["shape"], scheme, expert=True)
        if sum(headers[n][1]["shape"][0] for n in names[0]) != rows or headers[names[0][0]][1]["shape"][1] != cols:
            continue  # another layout than (experts, outputs, inputs): stored as transformers loads it
        target = QuantTarget(TensorSpec(name, param.dtype, (experts, rows, cols)), -1, scheme)
        values, scales = target.parts()
        sources[values.name] = names
        sources[scales.name] = [[n + "_scale_inv" for n in expert] for expert in names]
        targets[name] = target
    covered = set()
    for source in sources.values():
        covered.update([source] if isinstance(source, str) else (n for expert in source for n in expert))
    # (not those the model declares it ignores: DeepSeek-V3's multi-token-prediction layer 61, which it does not run)
    ignored = re.compile(
        "|".join(f"(?:{p})" for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()) or "(?!)"
    )
    converted = [
        t
        for t, (_, info) in headers.items()
        if info["dtype"] == "F8_E4M3" and t not in covered and ignored.search(t) is None
    ]
    if converted and warn:
        logger.warning(
            f"{len(converted)} FP8 tensors of {name_or_path} (e.g. {converted[0]}) are neither the model's parameters "
            f"nor its experts under their usual per-expert names: the store keeps them as transformers dequantizes "
            f"them, in full precision"
        )
    return targets


def _checkpoint_shards(name_or_path: str, from_pretrained_kwargs: dict) -> list[str]:
    """The safetensors files of a local checkpoint directory, or of a Hub checkpoint in the local cache (where
    `from_pretrained` just put it)."""
    folder = name_or_path
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name_or_path,
            revision=from_pretrained_kwargs.get("revision"),
            allow_patterns=["*.safetensors"],
            local_files_only=True,
        )
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _attach_from_checkpoint(
    model: nn.Module, config, name_or_path: str, loader, offload_folder: str, from_pretrained_kwargs: dict, scheme
) -> None:
    located = _checkpoint_locations(model, loader, offload_folder)
    # each tensor where `from_pretrained` would hold it relative to a 64-byte boundary (a view of the shard's mapping)
    residues = {name: offset % TENSOR_ALIGN for name, (_, offset) in located.items()}
    targets, raw = _quantized_checkpoint(model, name_or_path, scheme, from_pretrained_kwargs)
    runtime = new_runtime(model, config, residues, targets)

    # (quantized tensor by tensor for a low-bit store; an FP8 checkpoint's matrices read as it stores them)
    source = runtime.stored_source(loader.__getitem__, raw)
    plans = None
    fingerprint = None
    if config.offload_device == "nvme":
        in_place = (
            config.reuse_checkpoint
            and not any(plan.experts for plan in runtime.plans)  # experts are stored expert-major
            and not runtime.codecs  # a low-bit store holds other bytes than the checkpoint
            and all(name in located for name in runtime.binding.placeholders)
        )
        if in_place:
            plans = checkpoint_plans(runtime.plans, located, runtime.tensor_align)
        else:
            files = {
                os.path.abspath(e["safetensors_file"])
                for e in getattr(loader, "index", {}).values()
                if "safetensors_file" in e and not _in_folder(e["safetensors_file"], offload_folder)
            }
            if os.path.isdir(name_or_path):
                # every shard of a local checkpoint, also those whose every tensor transformers converted (an FP8
                # checkpoint dequantized on load leaves none of them in the loader's index): a changed shard is never
                # served from a stale store
                files.update(
                    os.path.abspath(os.path.join(name_or_path, f))
                    for f in os.listdir(name_or_path)
                    if f.endswith(".safetensors")
                )
            files = sorted(files)
            model_dtype = next(iter(runtime.binding.originals.values())).dtype
            fingerprint = checkpoint_fingerprint(name_or_path, model_dtype, files)
    attach(model, runtime, source, fingerprint, plans)
