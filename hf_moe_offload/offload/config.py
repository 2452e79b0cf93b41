"""Runtime knobs of the offload runtime. They describe how a model runs on this machine, never what the model is,
so they live here and are never written into `config.json`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


_OFFLOAD_DEVICES = ("cpu", "nvme")
_EXPERT_FETCH = ("routed", "all")


@dataclass
class OffloadConfig:
    """How `enable_offload` / `load_offloaded` keep and stream the weights.

    Args:
        offload_device: where every weight lives between uses: `"cpu"` (one arena per unit in host memory, pinned when
            the execution device is CUDA) or `"nvme"` (safetensors files under `nvme_path`).
        nvme_path: directory of the NVMe store (required for `"nvme"`). A valid store already there for the same weights
            is reused; an incomplete or stale one is rebuilt.
        execution_device: where the model computes (`"cpu"`, `"cuda:0"`, `0`, a `torch.device`). Default (`None`):
            the current CUDA device when there is one, else the CPU, decided when offloading starts (`enable_offload`,
            `load_offloaded`), not when the config is built; `"cuda"` without an index also means the current device
            then.
        prefetch_depth: how many units are fetched ahead of the one computing. 0 fetches on demand (no overlap); at most
            `prefetch_depth + 1` units are resident on the execution device at any time.
        pin_memory: page-lock the CPU store and the NVMe staging buffers (CUDA only; ignored on the CPU device).
        io_threads: threads reading from the store; a unit's read is split in chunks across them.
        direct_io: open the NVMe store with `O_DIRECT` (bypass the page cache, as DeepSpeed's AIO does). Falls back to
            buffered reads, with a warning, on a file system that refuses it.
        reuse_checkpoint: in `load_offloaded` with an NVMe store, read tensors straight from the checkpoint's
            safetensors shards when they already hold the wanted dtype (no second copy on disk). `False` writes the
            store's own aligned unit files once instead (measured alike on the CPU device: `benchmarks/README.md`).
        map_files: on the CPU execution device, map the NVMe store's pages (zero-copy from the page cache) instead
            of copying them into slot buffers: several times less CPU time per byte. Not with `direct_io`.
        verify_checksums: check every store file against its manifest checksum when an existing store is reused.
        distributed: split each unit's read over the processes of the default `torch.distributed` group and
            all-gather it (ZeRO-Inference's multi-GPU fetch). `None`: on when a group with several processes exists.
        expert_fetch: how the experts of MoE layers (the transformers v5 fused layout: Mixtral, Qwen2-MoE, OLMoE,
            GPT-MoE, ...) are fetched. `"routed"`: the dense part of a block (attention, norms, router, shared
            experts) streams with the block, the experts only once the router has picked them, and only those; a
            forward whose size touched more than `expert_break_even` of the experts streams whole layers instead.
            `"all"`: every expert of every layer, always (ZeRO-Inference's behaviour). No effect on dense models.
        expert_cache_size: experts of each MoE layer kept on the execution device between steps (an LRU with a
            frequency prior); 0 keeps none. Capped at the layer's number of experts, which keeps every expert once
            fetched.
        speculative_prefetch: while a MoE layer computes, apply the next MoE layer's router to its hidden states and
            start fetching the experts it would pick into that layer's cache (needs `expert_cache_size > 0`). A wrong
            guess costs bandwidth only; precision and recall are in `get_offload_stats`.
        expert_break_even: with `"routed"`, the fraction of a layer's experts above which one read of the whole layer
            (prefetched, overlapping the previous layer's compute) beats reading the routed experts one by one after
            the router. Every forward measures the fraction it touched, remembered per size (token counts bucketed by
            powers of two); a size not seen yet is judged by what uniform routing would touch (`1 - (1 - k/E)^tokens`).
            So prefill and large batches stream whole layers only while the model's routing really touches that
            many experts (a skewed router keeps them routed from the second forward of a size on). `None`: the measured
            break-even of the store's read path: 1.0 (never switch) when NVMe pages are mapped on the CPU device,
            where fetching fewer pages is never slower; 0.75 when experts are read into buffers (O_DIRECT, the CPU
            store, CUDA): see `benchmarks/README.md`.
    """

    offload_device: str = "cpu"
    nvme_path: str | os.PathLike | None = None
    execution_device: str | int | torch.device | None = None
    prefetch_depth: int = 1
    pin_memory: bool = True
    io_threads: int = 2
    direct_io: bool = False
    reuse_checkpoint: bool = True
    map_files: bool = True
    verify_checksums: bool = True
    distributed: bool | None = None
    expert_fetch: str = "routed"
    expert_cache_size: int = 8
    speculative_prefetch: bool = True
    expert_break_even: float | None = None
    chunk_bytes: int = field(default=16 << 20, repr=False)

    def __post_init__(self) -> None:
        if self.offload_device not in _OFFLOAD_DEVICES:
            raise ValueError(f"offload_device ({self.offload_device!r}) must be one of {_OFFLOAD_DEVICES}")
        if self.offload_device == "nvme" and self.nvme_path is None:
            raise ValueError("offload_device='nvme' needs nvme_path, the directory of the store")
        if self.nvme_path is not None:
            self.nvme_path = os.fspath(self.nvme_path)
        if isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth ({self.prefetch_depth!r}) must be an integer >= 0")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or self.io_threads < 1:
            raise ValueError(f"io_threads ({self.io_threads!r}) must be an integer >= 1")
        if self.expert_fetch not in _EXPERT_FETCH:
            raise ValueError(f"expert_fetch ({self.expert_fetch!r}) must be one of {_EXPERT_FETCH}")
        size = self.expert_cache_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"expert_cache_size ({size!r}) must be an integer >= 0 (experts kept per MoE layer)")
        if self.expert_break_even is not None and (
            isinstance(self.expert_break_even, bool)
            or not isinstance(self.expert_break_even, (int, float))
            or not 0.0 < self.expert_break_even <= 1.0
        ):
            raise ValueError(f"expert_break_even ({self.expert_break_even!r}) must be a fraction in (0, 1]")
        if self.chunk_bytes < 4096 or self.chunk_bytes % 4096:
            raise ValueError(f"chunk_bytes ({self.chunk_bytes}) must be a positive multiple of 4096")
        self.execution_device = _parse_device(self.execution_device)

    @classmethod
    def from_deepspeed(cls, ds_config: dict[str, Any], **overrides: Any) -> OffloadConfig:
        """Read a DeepSpeed ZeRO-Inference config: `{"zero_optimization": {"stage": 3, "offload_param": {...}}}`.

        `offload_param.device` ("cpu" | "nvme"), `nvme_path`, `pin_memory` and `buffer_count` (the number of parameter
        buffers: `prefetch_depth = buffer_count - 1`) are read, and `aio.thread_count` gives `io_threads`. Keyword
        arguments override what the dict says (e.g. `execution_device`).
        """
        if not isinstance(ds_config, dict) or "zero_optimization" not in ds_config:
            raise ValueError("ds_config must be a DeepSpeed config dict with a 'zero_optimization' section")
        zero = ds_config["zero_optimization"]
        stage = zero.get("stage", 0)
        if stage != 3:
            raise ValueError(
                f"zero_optimization.stage ({stage}) must be 3: ZeRO-Inference offloads parameters with stage 3"
            )
        offload = zero.get("offload_param")
        if not isinstance(offload, dict):
            raise ValueError("zero_optimization.offload_param is missing: it says where the parameters are offloaded")
        device = offload.get("device")
        if device not in _OFFLOAD_DEVICES:
            raise ValueError(f"zero_optimization.offload_param.device ({device!r}) must be one of {_OFFLOAD_DEVICES}")
        kwargs: dict[str, Any] = {"offload_device": device}
        if offload.get("nvme_path") is not None:
            kwargs["nvme_path"] = offload["nvme_path"]
        if "pin_memory" in offload:
            kwargs["pin_memory"] = bool(offload["pin_memory"])
        if "buffer_count" in offload:
            buffer_count = offload["buffer_count"]
            if not isinstance(buffer_count, int) or buffer_count < 1:
                raise ValueError(
                    f"zero_optimization.offload_param.buffer_count ({buffer_count!r}) must be an integer >= 1"
                )
            kwargs["prefetch_depth"] = buffer_count - 1
        aio = ds_config.get("aio") or {}
        if "thread_count" in aio:
            kwargs["io_threads"] = aio["thread_count"]
        kwargs.update(overrides)
        return cls(**kwargs)


def _parse_device(device: str | int | torch.device | None) -> torch.device | None:
    """`execution_device` as a `torch.device` (None stays None), checked without asking torch which devices exist."""
    if device is None:
        return None
    try:
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"execution_device ({device!r}) is not a torch device (e.g. 'cpu', 'cuda:0', 0)") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"execution_device ({device!r}) must be the CPU or a CUDA device")
    return parsed


def resolve_execution_device(config: OffloadConfig) -> torch.device:
    """The device `config` computes on, decided now: its `execution_device`, or the current CUDA device when there
    is one, else the CPU; a CUDA device without an index is the current one."""
    device = config.execution_device
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device
