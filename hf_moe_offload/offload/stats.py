"""`OffloadStats`: what an offloaded model fetched, read and waited for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


# A gauge describes the current state (memory held): not summed when stats are added, and it survives a reset. A peak
# is the largest value seen: the larger one when stats are added, zero after a reset. Every other field is a counter.
GAUGE = {"kind": "gauge"}
PEAK = {"kind": "peak"}


@dataclass
class OffloadStats:
    """Counters of an offloaded model since `enable_offload` (or the last `get_offload_stats(model, reset=True)`).

    Attributes:
        bytes_fetched: bytes copied into the execution device's slots.
        full_precision_bytes: the bytes `bytes_fetched` stand for in the model's dtype: larger with a low-bit store
            (`OffloadConfig.weight_bits`), whose fetches move packed bytes; equal otherwise.
        host_to_device_bytes: bytes this process itself copied from host memory into its CUDA device's slots:
            with several processes its share of each unit only (the rest arrives by the all-gather); 0 on the CPU.
        units_fetched: unit fetches started (prefetched or on demand).
        fetch_wait_seconds: time the computing thread waited for weights to be read (and, on CUDA, their copies
            queued).
        device_wait_seconds: time the execution device waited for weights: on CUDA the compute stream's waits on
            the copies, timed with CUDA events (the host only queues them); on the CPU the same as
            `fetch_wait_seconds`.
        store_read_bytes: bytes read from each store ("cpu", "nvme"), this process only.
        prefetch_hits: units whose fetch had finished when they were needed.
        late_prefetches: units whose prefetch was still running when they were needed (the wait is a stall).
        on_demand_fetches: units fetched only when needed (the first forward, `prefetch_depth=0`, a resync).
        resyncs: times the execution order differed from the learned one.
        forward_passes: forwards of the model.
        peak_resident_units: most units held in device slots at once (at most `prefetch_depth + 1`).
        slot_bytes: device memory of the slot ring.
        resident_bytes: device memory of what always stays there (buffers, parameters of the top-level modules).
        expert_cache_hits: routed experts of MoE layers that were on the device already (cached, or fetched by a
            speculative prefetch) when their layer needed them.
        expert_cache_misses: routed experts fetched when their layer needed them.
        expert_bytes_fetched: bytes of experts fetched one by one (also counted in `bytes_fetched`).
        speculative_fetches: experts fetched ahead on a guess of the next MoE layer's router.
        speculated: experts guessed for a MoE layer; `speculated_correct` of them were routed there, out of the
            `speculated_needed` experts that layer routed to (precision and recall: the properties below).
        whole_layer_forwards: forwards that streamed MoE layers whole (tokens enough to touch most experts).
        expert_cache_bytes: device memory of the expert caches.
        staging_bytes: host memory of the staging buffers reads land in before their copy to a CUDA device
            (page-locked with `pin_memory`): per slot this process's share of the largest unit, per reader thread
            the largest expert; 0 on the CPU.
    """

    bytes_fetched: int = 0
    full_precision_bytes: int = 0
    host_to_device_bytes: int = 0
    units_fetched: int = 0
    fetch_wait_seconds: float = 0.0
    device_wait_seconds: float = 0.0
    store_read_bytes: dict[str, int] = field(default_factory=dict)
    prefetch_hits: int = 0
    late_prefetches: int = 0
    on_demand_fetches: int = 0
    resyncs: int = 0
    forward_passes: int = 0
    peak_resident_units: int = field(default=0, metadata=PEAK)
    slot_bytes: int = field(default=0, metadata=GAUGE)
    resident_bytes: int = field(default=0, metadata=GAUGE)
    expert_cache_hits: int = 0
    expert_cache_misses: int = 0
    expert_bytes_fetched: int = 0
    speculative_fetches: int = 0
    speculated: int = 0
    speculated_correct: int = 0
    speculated_needed: int = 0
    whole_layer_forwards: int = 0
    expert_cache_bytes: int = field(default=0, metadata=GAUGE)
    staging_bytes: int = field(default=0, metadata=GAUGE)

    @property
    def fetched_fraction(self) -> float:
        """`bytes_fetched / full_precision_bytes`: the fraction of the full-precision bytes a low-bit store moves."""
        return self.bytes_fetched / self.full_precision_bytes if self.full_precision_bytes else 1.0

    @property
    def expert_hit_rate(self) -> float:
        """Fraction of the routed experts found on the device."""
        total = self.expert_cache_hits + self.expert_cache_misses
        return self.expert_cache_hits / total if total else 0.0

    @property
    def speculation_precision(self) -> float:
        """Fraction of the speculatively guessed experts that their layer routed to."""
        return self.speculated_correct / self.speculated if self.speculated else 0.0

    @property
    def speculation_recall(self) -> float:
        """Fraction of the routed experts (of layers with a guess) that had been guessed."""
        return self.speculated_correct / self.speculated_needed if self.speculated_needed else 0.0

    def reset(self) -> None:
        """Zero every counter and peak; gauges (memory held) keep their value."""
        for f in dataclasses.fields(self):
            if f.metadata.get("kind") == "gauge":
                continue
            setattr(self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)

    def __add__(self, other: OffloadStats) -> OffloadStats:
        """Counters summed (`store_read_bytes` per store); gauges take the larger value."""
        if not isinstance(other, OffloadStats):
            return NotImplemented
        values = {}
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                merged = dict(mine)
                for key, value in theirs.items():
                    merged[key] = merged.get(key, 0) + value
                values[f.name] = merged
            elif f.metadata.get("kind") in ("gauge", "peak"):
                values[f.name] = max(mine, theirs)
            else:
                values[f.name] = mine + theirs
        return OffloadStats(**values)

    def __radd__(self, other):  # sum(stats_list) starts from 0
        return self if other == 0 else self.__add__(other)
