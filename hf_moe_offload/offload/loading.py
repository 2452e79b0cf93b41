"""`load_offloaded`: a causal LM loaded straight into an offload store, never held whole in memory.

transformers builds the model on the meta device with every weight "on disk" (`device_map={"": "disk"}`); the lazy
reader accelerate leaves behind serves the store's writer tensor by tensor, then its hooks are replaced by ours. With
an NVMe store and a checkpoint already in the wanted dtype, the checkpoint's shards can be read in place (the
checkpoint plans).
"""

from __future__ import annotations

import logging as std_logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.hooks import remove_hook_from_module
from torch import nn

from .api import attach, check_config, new_runtime
from .config import resolve_execution_device
from .layout import SAFETENSORS_DTYPES, TENSOR_ALIGN, checkpoint_plans
from .ownership import conversion_folder, remove_leftovers
from .quantize import QuantScheme, quantization_targets
from .store import check_writable_dir, checkpoint_fingerprint, read_safetensors_header


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


@contextmanager
def _quiet_disk_offload_warning() -> Iterator[None]:
    logger = std_logging.getLogger("accelerate.big_modeling")
    dropped = _DropDiskOffloadWarning()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


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
    _check_quantizable(name_or_path, config, from_pretrained_kwargs)
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
    try:
        with _quiet_disk_offload_warning():
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
        _attach_from_checkpoint(model, config, name_or_path, loader, offload_folder)
    finally:
        shutil.rmtree(offload_folder, ignore_errors=True)
    return model


def _check_quantizable(name_or_path: str, config, from_pretrained_kwargs: dict) -> None:
    """A low-bit store's matrices must be groupable: checked on the model built on the meta device from its config
    alone, before any weight is read."""
    if config.weight_bits is None:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    hub = ("trust_remote_code", "revision", "token", "cache_dir", "local_files_only", "subfolder")
    hub_kwargs = {key: from_pretrained_kwargs[key] for key in hub if key in from_pretrained_kwargs}
    model_config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            model_config, trust_remote_code=hub_kwargs.get("trust_remote_code", False)
        )
    quantization_targets(model, QuantScheme(config.weight_bits, config.weight_group_size))


def _attach_from_checkpoint(model: nn.Module, config, name_or_path: str, loader, offload_folder: str) -> None:
    located = _checkpoint_locations(model, loader, offload_folder)
    # each tensor where `from_pretrained` would hold it relative to a 64-byte boundary (a view of the shard's mapping)
    residues = {name: offset % TENSOR_ALIGN for name, (_, offset) in located.items()}
    runtime = new_runtime(model, config, residues)

    source = runtime.stored_source(loader.__getitem__)  # (quantized tensor by tensor for a low-bit store)
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
