"""The public entry points of the offload runtime: `enable_offload`, `disable_offload`, `offloaded`,
`get_offload_stats`. Orchestration only: the work is done by `runtime.OffloadRuntime` and the parts it wires."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .config import OffloadConfig, resolve_execution_device
from .runtime import OffloadRuntime
from .stats import OffloadStats


RUNTIME_ATTR = "_hf_moe_offload_state"


def runtime_of(model: nn.Module) -> OffloadRuntime:
    """The runtime of an offloaded model; a clear error for a model that is not offloaded."""
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        raise RuntimeError("the model is not offloaded (enable_offload or load_offloaded was not called on it)")
    return runtime


def check_config(config: OffloadConfig | None) -> OffloadConfig:
    config = config or OffloadConfig()
    if not isinstance(config, OffloadConfig):
        raise ValueError(f"config must be an OffloadConfig, got {type(config).__name__}")
    return config


def new_runtime(
    model: nn.Module, config: OffloadConfig, residues: dict[str, int] | None = None, targets: dict | None = None
) -> OffloadRuntime:
    """The runtime that will offload `model` (nothing changed yet); the execution device is decided now. `residues`:
    where each weight's reference copy sits relative to 64 bytes (default: where the model's own weights sit);
    `targets`: a checkpoint's own quantized matrices, stored as it holds them."""
    return OffloadRuntime(model, config, resolve_execution_device(config), residues, targets)


def attach(model: nn.Module, runtime: OffloadRuntime, source=None, fingerprint=None, checkpoint_plans=None) -> None:
    """Attach `runtime` to `model` and record it there. `source` gives the weights to store (default: the model's
    own, in memory)."""
    config = runtime.config
    if source is None:
        meta = [name for name in runtime.binding.placeholders if runtime.binding.originals[name].device.type == "meta"]
        if meta:
            raise ValueError(f"{meta[0]} is on the meta device: enable_offload needs the weights; use load_offloaded")
        source = runtime.source
        if config.offload_device == "nvme":
            fingerprint = runtime.weights_fingerprint()
    runtime.attach(model, source, fingerprint, checkpoint_plans)
    setattr(model, RUNTIME_ATTR, runtime)


def enable_offload(model: nn.Module, config: OffloadConfig | None = None) -> nn.Module:
    """Move every weight of `model` into a store (CPU memory or NVMe) and stream it to the execution device unit by
    unit during forward and `generate`, prefetching the next units.

    The model is cut into units: each block of its decoder `torch.nn.ModuleList`, and each other top-level module
    that holds parameters (embeddings, final norm, head). Between uses a parameter is a placeholder of the right
    shape, dtype and device whose elements read NaN; buffers and the parameters of the modules above the block list
    stay on the execution device. For MoE layers in the transformers v5 experts layout only the routed experts are
    fetched (see `OffloadConfig.expert_fetch`). Undo with `disable_offload`, or use `offloaded` for a scoped block.
    With `OffloadConfig.weight_bits` the store holds the matrices quantized: the model then equals
    `hf_moe_offload.offload.dequantized_copy(model, config)`, and `disable_offload` puts back those dequantized values.

    Args:
        model (`torch.nn.Module`):
            A decoder-only causal LM (any transformers `PreTrainedModel` whose blocks sit in one `ModuleList`), with
            its weights in memory and no accelerate hooks (no `device_map`). Changed in place.
        config (`OffloadConfig`, *optional*):
            Where the weights live and how they stream; defaults to `OffloadConfig()` (CPU memory, prefetch depth 1).

    Returns:
        `torch.nn.Module`: the same model, offloaded.
    """
    config = check_config(config)
    if getattr(model, RUNTIME_ATTR, None) is not None:
        raise RuntimeError("the model is already offloaded: call disable_offload(model) before enabling it again")
    hooked = [name for name, module in model.named_modules() if getattr(module, "_hf_hook", None) is not None]
    if hooked:
        raise ValueError(
            f"the model already has accelerate hooks (on {hooked[0]!r}, e.g. from device_map=...): load it without a "
            f"device_map, or use hf_moe_offload.load_offloaded"
        )
    runtime = new_runtime(model, config)
    attach(model, runtime)
    runtime.binding.free_originals()  # the store holds the weights now (disable_offload gives them back)
    return model


def disable_offload(model: nn.Module) -> nn.Module:
    """Put every weight back where it was before `enable_offload`, bit for bit, remove the hooks and release the
    runtime's threads, files and buffers.

    The original `Parameter` objects are restored (optimizers and tied weights keep working). A model made by
    `load_offloaded` never had its weights in memory: they are loaded into CPU memory.

    Args:
        model (`torch.nn.Module`): a model offloaded by `enable_offload` or `load_offloaded`.

    Returns:
        `torch.nn.Module`: the same model, with its weights in memory.
    """
    runtime = runtime_of(model)
    runtime.detach(model)
    delattr(model, RUNTIME_ATTR)
    return model


@contextmanager
def offloaded(model: nn.Module, config: OffloadConfig | None = None) -> Iterator[nn.Module]:
    """`enable_offload(model, config)` for the length of a `with` block, `disable_offload(model)` at its end
    (whether the block returned or raised).

    Args:
        model (`torch.nn.Module`): as for `enable_offload`.
        config (`OffloadConfig`, *optional*): as for `enable_offload`.

    Example:
        ```python
        with offloaded(model, OffloadConfig(offload_device="nvme", nvme_path="/local_nvme")) as model:
            out = model.generate(input_ids, max_new_tokens=20)
        ```
    """
    enable_offload(model, config)
    try:
        yield model
    finally:
        disable_offload(model)


def get_offload_stats(model: nn.Module, reset: bool = False) -> OffloadStats:
    """The counters of an offloaded model: bytes and units fetched, time waiting for weights, store reads, expert
    cache hits and speculation, memory held on the execution device.

    Args:
        model (`torch.nn.Module`): an offloaded model.
        reset (`bool`, *optional*, defaults to `False`):
            Return the counters and start counting again from zero (gauges such as `slot_bytes` keep their value).

    Returns:
        `OffloadStats`: a copy of the counters (adding two gives their sum).
    """
    runtime = runtime_of(model)
    stats = runtime.stats()
    if reset:
        runtime.reset_stats()
    return stats
