"""Runtime knobs of the offload runtime. They describe how a model runs on this machine, never what the model is,
so they live here and are never written into `config.json`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


_OFFLOAD_DEVICES = ("cpu", "nvme")
_EXPERT_FETCH = ("routed", "all")
_WEIGHT_BITS = (8, 4)


@dataclass
class OffloadConfig:
    """How `enable_offload` / `load_offloaded` keep and stream the weights.

    Args:
        offload_device: where every weight lives between uses: `"cpu"` (one arena per unit in host memory, pinned when
            the execution device is CUDA) or `"nvme"` (safetensors files under `nvme_path`).
        nvme_path: directory of the NVMe store (required for `"nvme"`). A valid store already there for the same weights
            is reused; an incomplete or stale one is rebuilt.
        execution_device: where the model computes (`"cpu"`, `"cuda:0"`, `0`, a `torch.device`). Default (`None`):
            this process's CUDA device when there is one (under `torchrun`, the `LOCAL_RANK`'s GPU; else the current
            device), else the CPU, decided when offloading starts (`enable_offload`, `load_offloaded`), not when the
            config is built; `"cuda"` without an index also means this process's device then.
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
        verify_reads: before each fetch of a unit, check its store file's CRC32 against the manifest (a whole-file
            read: catches a bad page or bytes changed in place; costs one more read of the unit, measured in
            `benchmarks/README.md`). Without it, every fetch still checks each file's identity (inode, size, times),
            and `disable_offload` and saving always check the CRCs before bytes leave the store.
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
        expert_cache_bytes: the device memory all MoE layers' expert caches may take together; the experts kept per
            layer are `expert_cache_size` capped to fit it (with a warning). `None`: on CUDA half the memory free
            once the slots are allocated (so a Mixtral-8x7B on an 80 GB card caches 3 experts per layer, not all 8);
            on the CPU no cap (its caches are mapped pages the kernel can reclaim).
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
        dtype: the dtype `load_offloaded` loads the weights in when its `dtype=` argument is not given (set by
            `from_deepspeed` from an enabled `bf16` / `fp16` section); not used by `enable_offload`.
        weight_bits: `None` (the default) stores every weight as it is, exactly. `8` or `4`: the matrices (the weights
            of the linear layers, the output head, the fused experts) are stored group-wise quantized (asymmetric
            round-to-nearest, as ZeRO-Inference's 4-bit release), so a fetch moves about `bits / 16` of the bf16
            bytes; they are dequantized on the execution device, and the model then equals, bit for bit,
            `hf_moe_offload.offload.dequantized_copy(model, config)` (see `quantize.py`). Embeddings that are not the
            head's, norms, biases and routers stay in the model's dtype.
        weight_group_size: the weights along a matrix's input dimension that share one step and minimum (a power of
            two dividing every quantized matrix's input dimension).
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
    verify_reads: bool = False
    distributed: bool | None = None
    expert_fetch: str = "routed"
    expert_cache_size: int = 8
    expert_cache_bytes: int | None = None
    speculative_prefetch: bool = True
    expert_break_even: float | None = None
    dtype: torch.dtype | None = None
    weight_bits: int | None = None
    weight_group_size: int = 64
    chunk_bytes: int = field(default=16 << 20, repr=False)

    def __post_init__(self) -> None:
        if self.offload_device not in _OFFLOAD_DEVICES:
            raise ValueError(f"offload_device ({self.offload_device!r}) must be one of {_OFFLOAD_DEVICES}")
        if self.nvme_path is not None:
            self.nvme_path = _check_path(self.nvme_path, "nvme_path")
        if self.offload_device == "nvme" and self.nvme_path is None:
            raise ValueError("offload_device='nvme' needs nvme_path, the directory of the store")
        if self.offload_device == "cpu" and self.nvme_path is not None:
            raise ValueError(
                f"nvme_path ({self.nvme_path!r}) is set but offload_device is 'cpu': the CPU store keeps the weights "
                f"in host memory; set offload_device='nvme' to use the directory, or drop nvme_path"
            )
        for name in _BOOLEANS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} ({value!r}) must be True or False (a bool, not {type(value).__name__})")
        if self.distributed is not None and not isinstance(self.distributed, bool):
            raise ValueError(f"distributed ({self.distributed!r}) must be True, False or None (decided by the group)")
        _check_int("prefetch_depth", self.prefetch_depth, 0, MAX_PREFETCH_DEPTH, "units fetched ahead")
        _check_int("io_threads", self.io_threads, 1, MAX_IO_THREADS, "reader threads")
        if self.expert_fetch not in _EXPERT_FETCH:
            raise ValueError(f"expert_fetch ({self.expert_fetch!r}) must be one of {_EXPERT_FETCH}")
        _check_int("expert_cache_size", self.expert_cache_size, 0, None, "experts kept per MoE layer")
        if self.expert_cache_bytes is not None:
            _check_int("expert_cache_bytes", self.expert_cache_bytes, 0, None, "device bytes of all expert caches")
        if self.expert_break_even is not None and (
            isinstance(self.expert_break_even, bool)
            or not isinstance(self.expert_break_even, (int, float))
            or not 0.0 < self.expert_break_even <= 1.0
        ):
            raise ValueError(f"expert_break_even ({self.expert_break_even!r}) must be a fraction in (0, 1]")
        _check_int("chunk_bytes", self.chunk_bytes, 4096, MAX_CHUNK_BYTES, "bytes per read")
        if self.chunk_bytes % 4096:
            raise ValueError(f"chunk_bytes ({self.chunk_bytes}) must be a multiple of 4096")
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype ({self.dtype!r}) must be a torch.dtype (e.g. torch.bfloat16) or None")
        if self.weight_bits is not None and (
            isinstance(self.weight_bits, bool) or self.weight_bits not in _WEIGHT_BITS
        ):
            raise ValueError(f"weight_bits ({self.weight_bits!r}) must be None (full precision), 8 or 4")
        group = self.weight_group_size
        if isinstance(group, bool) or not isinstance(group, int) or group < 1 or group & (group - 1):
            raise ValueError(f"weight_group_size ({group!r}) must be a positive power of two (e.g. 64)")
        self.execution_device = _parse_device(self.execution_device)

    @classmethod
    def from_deepspeed(cls, ds_config: dict[str, Any] | str | os.PathLike, **overrides: Any) -> OffloadConfig:
        """Read a DeepSpeed ZeRO-Inference config: `{"zero_optimization": {"stage": 3, "offload_param": {...}}}`.

        `offload_param.device` ("cpu" | "nvme"), `nvme_path`, `pin_memory` and `buffer_count` (the number of parameter
        buffers: `prefetch_depth = buffer_count - 1`) are read, `aio.thread_count` gives `io_threads`, and an enabled
        `bf16` / `fp16` section gives the `dtype` `load_offloaded` loads (its own `dtype=` argument wins).
        ZeRO-Inference's weight quantization (`weight_quantization.quantized_initialization`, or
        `weight_quantization.post_init_quant` whose every layer pattern asks the same) gives `weight_bits`
        (`num_bits`) and `weight_group_size` (`group_size`); it must be asymmetric (`symmetric: false`, as DeepSpeed
        itself requires) and grouped along the input dimension (`group_dim: 1` of a linear weight). `"auto"` (as in
        the transformers DeepSpeed docs) means this runtime's default. Every other key is ignored, and named in
        one warning.

        Args:
            ds_config (`dict`, `str` or `os.PathLike`): the DeepSpeed config, or the path of its JSON file (as
                transformers' `deepspeed=` argument takes).
            overrides: `OffloadConfig` fields that win over what the config says (e.g. `execution_device`).
        """
        if isinstance(ds_config, (str, os.PathLike)):
            path = os.fspath(ds_config)
            try:
                with open(path) as f:
                    ds_config = json.load(f)
            except OSError as err:
                raise ValueError(f"ds_config ({path}) cannot be read: {err.strerror or err}") from err
            except ValueError as err:
                raise ValueError(f"ds_config ({path}) is not valid JSON: {err}") from err
        if not isinstance(ds_config, dict) or not isinstance(ds_config.get("zero_optimization"), dict):
            raise ValueError(
                "ds_config must be a DeepSpeed config (a dict or the path of its JSON file) with a 'zero_optimization' "
                "section (a dict)"
            )
        ignored = [
            key for key in ds_config if key not in ("zero_optimization", "aio", "bf16", "fp16", "weight_quantization")
        ]
        zero = ds_config["zero_optimization"]
        ignored += [f"zero_optimization.{key}" for key in zero if key not in ("stage", "offload_param")]
        stage = zero.get("stage", 0)
        if isinstance(stage, bool) or stage != 3:
            raise ValueError(
                f"zero_optimization.stage ({stage!r}) must be the integer 3: ZeRO-Inference offloads parameters with "
                f"stage 3"
            )
        offload = zero.get("offload_param")
        if not isinstance(offload, dict):
            raise ValueError("zero_optimization.offload_param is missing: it says where the parameters are offloaded")
        known = ("device", "nvme_path", "pin_memory", "buffer_count")
        ignored += [f"zero_optimization.offload_param.{key}" for key in offload if key not in known]
        device = offload.get("device")
        if device not in _OFFLOAD_DEVICES:
            raise ValueError(f"zero_optimization.offload_param.device ({device!r}) must be one of {_OFFLOAD_DEVICES}")
        kwargs: dict[str, Any] = {"offload_device": device}
        nvme_path = offload.get("nvme_path")
        if nvme_path is not None and nvme_path != AUTO:
            if device == "nvme":
                kwargs["nvme_path"] = nvme_path
            else:
                ignored.append("zero_optimization.offload_param.nvme_path (device is 'cpu')")
        pin_memory = offload.get("pin_memory", AUTO)
        if pin_memory != AUTO:
            if not isinstance(pin_memory, bool):
                raise ValueError(
                    f'zero_optimization.offload_param.pin_memory ({pin_memory!r}) must be true, false or "auto"'
                )
            kwargs["pin_memory"] = pin_memory
        buffer_count = offload.get("buffer_count", AUTO)
        if buffer_count != AUTO:
            if isinstance(buffer_count, bool) or not isinstance(buffer_count, int) or buffer_count < 1:
                raise ValueError(
                    f'zero_optimization.offload_param.buffer_count ({buffer_count!r}) must be an integer >= 1 or "auto"'
                )
            kwargs["prefetch_depth"] = buffer_count - 1
        aio = ds_config.get("aio")
        if aio is not None and not isinstance(aio, dict):
            raise ValueError(f"aio ({aio!r}) must be a dict")
        aio = aio or {}
        ignored += [f"aio.{key}" for key in aio if key != "thread_count"]
        if aio.get("thread_count", AUTO) != AUTO:
            kwargs["io_threads"] = aio["thread_count"]
        dtypes = [
            dtype for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)) if _enabled(ds_config, key)
        ]
        if len(dtypes) > 1:
            raise ValueError("ds_config enables both bf16 and fp16: enable at most one")
        if dtypes:
            kwargs["dtype"] = dtypes[0]
        kwargs.update(_weight_quantization(ds_config.get("weight_quantization"), ignored))
        if ignored:
            logger.warning(f"OffloadConfig.from_deepspeed ignores these DeepSpeed config keys: {', '.join(ignored)}")
        kwargs.update(overrides)
        return cls(**kwargs)


AUTO = "auto"
_BOOLEANS = (
    "pin_memory",
    "direct_io",
    "reuse_checkpoint",
    "map_files",
    "verify_checksums",
    "verify_reads",
    "speculative_prefetch",
)
MAX_PREFETCH_DEPTH = 64
MAX_IO_THREADS = 256
MAX_CHUNK_BYTES = 1 << 30


def _weight_quantization(section: Any, ignored: list[str]) -> dict[str, Any]:
    """`weight_bits` and `weight_group_size` from DeepSpeed's `weight_quantization` section (see `from_deepspeed`)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"weight_quantization ({section!r}) must be a dict")
    known = ("quantized_initialization", "post_init_quant")
    ignored += [f"weight_quantization.{key}" for key in section if key not in known]
    schemes: list[tuple[str, dict]] = []
    init = section.get("quantized_initialization")
    if init is not None:
        schemes.append(("weight_quantization.quantized_initialization", init))
    post = section.get("post_init_quant")
    if post is not None:
        if not isinstance(post, dict):
            raise ValueError(f"weight_quantization.post_init_quant ({post!r}) must map layer names to their scheme")
        schemes += [(f"weight_quantization.post_init_quant.{key}", value) for key, value in post.items()]
    found = []
    for where, scheme in schemes:
        if not isinstance(scheme, dict):
            raise ValueError(f"{where} ({scheme!r}) must be a dict with num_bits, group_size, group_dim, symmetric")
        bits, group = scheme.get("num_bits"), scheme.get("group_size")
        if bits not in _WEIGHT_BITS or isinstance(bits, bool):
            raise ValueError(f"{where}.num_bits ({bits!r}) must be 8 or 4")
        if isinstance(group, bool) or not isinstance(group, int):
            raise ValueError(f"{where}.group_size ({group!r}) must be an integer")
        if scheme.get("symmetric", False) is not False:
            raise ValueError(
                f"{where}.symmetric ({scheme['symmetric']!r}) must be false: the store quantizes asymmetrically "
                f"(DeepSpeed's quantizer supports only that too)"
            )
        if scheme.get("group_dim", 1) != 1:
            raise ValueError(
                f"{where}.group_dim ({scheme['group_dim']!r}) must be 1: groups run along a linear weight's input "
                f"dimension"
            )
        ignored += [
            f"{where}.{key}" for key in scheme if key not in ("num_bits", "group_size", "group_dim", "symmetric")
        ]
        found.append((bits, group))
    if not found:
        return {}
    if len(set(found)) > 1:
        raise ValueError(
            f"weight_quantization asks for several schemes ({sorted(set(found))} as (num_bits, group_size)): the store "
            f"quantizes every matrix with one scheme"
        )
    return {"weight_bits": found[0][0], "weight_group_size": found[0][1]}


def _enabled(ds_config: dict, key: str) -> bool:
    section = ds_config.get(key)
    if section is None:
        return False
    if not isinstance(section, dict):
        raise ValueError(f'{key} ({section!r}) must be a dict such as {{"enabled": true}}')
    enabled = section.get("enabled", False)
    if enabled == AUTO:
        return False  # "auto": the dtype the model already has
    if not isinstance(enabled, bool):
        raise ValueError(f'{key}.enabled ({enabled!r}) must be true, false or "auto"')
    return enabled


def _check_int(name: str, value: Any, low: int, high: int | None, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} ({value!r}) must be an integer {bound} ({what})")


def _check_path(path: Any, name: str) -> str:
    """`path` as a `str` (a `str` or an `os.PathLike` giving one), with a clear error otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name} ({path!r}) must be a str or an os.PathLike, not {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise ValueError(f"{name} ({path!r}) must be a text path (str), not {type(path).__name__}")
    if not path or "\0" in path:
        raise ValueError(f"{name} ({path!r}) must be a non-empty path")
    return path


def _parse_device(device: str | int | torch.device | None) -> torch.device | None:
    """`execution_device` as a `torch.device` (None stays None), checked against how torch was built (whether it
    has CUDA at all), without asking which devices exist: that is decided when offloading starts."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"execution_device ({device!r}) must be a str, an int or a torch.device (e.g. 'cpu', 0)")
    try:
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"execution_device ({device!r}) is not a torch device (e.g. 'cpu', 'cuda:0', 0)") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"execution_device ({device!r}) must be the CPU or a CUDA device")
    if parsed.type == "cuda" and not torch.backends.cuda.is_built():
        raise ValueError(
            f"execution_device ({device!r}) is a CUDA device but this torch ({torch.__version__}) was built without "
            f"CUDA; use execution_device='cpu', or install a CUDA build of torch"
        )
    return parsed


def _default_cuda_device() -> torch.device:
    """The GPU of this process: under `torchrun` (`LOCAL_RANK` set) the local rank's, else the current device (so
    that several ranks on one machine never all compute on GPU 0)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.isdigit():
        index = int(local_rank)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK ({index}) names no CUDA device: this machine has {torch.cuda.device_count()}; set "
                f"execution_device explicitly"
            )
        return torch.device("cuda", index)
    return torch.device("cuda", torch.cuda.current_device())


def resolve_execution_device(config: OffloadConfig) -> torch.device:
    """The device `config` computes on, decided now: its `execution_device`, or this process's CUDA device when
    there is one (the local rank's under `torchrun`, else the current one), else the CPU; a CUDA device without an
    index is this process's too."""
    device = config.execution_device
    if device is None:
        return _default_cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"execution_device ({device}) is a CUDA device but torch ({torch.__version__}) sees no CUDA device on "
                f"this machine; use execution_device='cpu'"
            )
        if device.index is None:
            return _default_cuda_device()
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"execution_device ({device}) does not exist: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s)"
            )
    return device
