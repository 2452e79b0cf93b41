"""ZeRO-Inference for any Hugging Face causal LM: every weight in CPU memory or on NVMe, streamed unit by unit into
the execution device with the next units prefetched."""

from __future__ import annotations

from .config import OffloadConfig
from .hooks import disable_offload, enable_offload, get_offload_stats, load_offloaded
from .prefetch import OffloadStats


__all__ = ["OffloadConfig", "OffloadStats", "disable_offload", "enable_offload", "get_offload_stats", "load_offloaded"]
