"""ZeRO-Inference for any Hugging Face causal LM: every weight in CPU memory or on NVMe, streamed unit by unit into
the execution device with the next units prefetched.

The modules, each with one job (arrows point one way, from the top down):

    api.py        enable_offload / disable_offload / offloaded / get_offload_stats: orchestration only
    loading.py    load_offloaded: the meta model, the lazy checkpoint reader, the checkpoint plans
    runtime.py    one offloaded model: its parts wired together, what the hooks call, its resources
    hooks.py      the accelerate ModelHooks and the method guard
    experts.py    routed experts: caches, eviction, speculation, the routed-vs-whole policy, "offload_routed"
    binding.py    placeholders, views, bind/unbind, the bit-exact restore
    prefetch.py   FetchPipeline: slot ring, learned order, resync
    store.py      CPU / NVMe / checkpoint stores: reads, manifest, checksums, fingerprints, writability
    transfer.py   host-to-device copies: copy stream, events, staging buffers (the only CUDA stream user)
    pages.py      page mapping, populate, drop (Linux; libc loaded on first use)
    quantize.py   low-bit stores: which matrices, packing, dequantization on the device, dequantized_copy
    layout.py     where every byte of a unit lives (no I/O)
    discovery.py  blocks, units, tied parameters, experts modules and routers (pure functions)
    stats.py      OffloadStats
    config.py     OffloadConfig
"""

from __future__ import annotations

from .api import disable_offload, enable_offload, get_offload_stats, offloaded
from .config import OffloadConfig
from .loading import load_offloaded
from .quantize import dequantized_copy
from .stats import OffloadStats


__all__ = [
    "OffloadConfig",
    "OffloadStats",
    "dequantized_copy",
    "disable_offload",
    "enable_offload",
    "get_offload_stats",
    "load_offloaded",
    "offloaded",
]
