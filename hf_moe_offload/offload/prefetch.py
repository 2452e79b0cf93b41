"""The prefetch pipeline: which unit to fetch next, into which device slot, on which thread or stream, and when it is
ready.

`prefetch_depth + 1` slots, each as large as the largest unit, are allocated once on the execution device and reused
in a ring: the unit computing holds one, up to `prefetch_depth` upcoming units are being fetched into the others. The
order of units is learned on the first forward and wraps around (the head of step t is followed by the embedding of
step t+1). A unit that is not the one expected (another code path, an interrupted forward) resynchronises the
pipeline: in-flight fetches are drained and the unit is fetched on demand.

A fetch runs on a coordinator thread: its byte ranges are split into chunks read by `io_threads` reader threads
into the slot (CPU execution device) or into a page-locked staging buffer then copied on a dedicated CUDA stream
with events (no host synchronisation on the compute stream). With several processes each one reads 1/N of the unit
and an all-gather assembles it. Any exception of a reader thread is raised again in the thread that needs the unit.
On the CPU execution device with an NVMe store the slots hold no buffer: each unit's ranges are mapped once, a fetch
maps their pages (`MADV_POPULATE_READ`, zero-copy from the page cache) and freeing the slot unmaps them again.

A MoE unit has two plans: whole, and without its experts (`routed`), which then come one by one (experts.py).
"""

from __future__ import annotations

import mmap
import time
from collections import deque
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from .store import ALIGN, CpuStore, MappedRun, UnitPlan, align_up, madvise


@dataclass
class OffloadStats:
    """Counters of an offloaded model since `enable_offload` (or the last `get_offload_stats(model, reset=True)`).

    Attributes:
        bytes_fetched: bytes copied into the execution device's slots.
        units_fetched: unit fetches started (prefetched or on demand).
        fetch_wait_seconds: time the computing thread waited for weights (stalls).
        store_read_bytes: bytes read from each store ("cpu", "nvme"), this process only.
        prefetch_hits: units whose fetch had finished when they were needed.
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
    """

    bytes_fetched: int = 0
    units_fetched: int = 0
    fetch_wait_seconds: float = 0.0
    store_read_bytes: dict[str, int] = field(default_factory=dict)
    prefetch_hits: int = 0
    on_demand_fetches: int = 0
    resyncs: int = 0
    forward_passes: int = 0
    peak_resident_units: int = 0
    slot_bytes: int = 0
    resident_bytes: int = 0
    expert_cache_hits: int = 0
    expert_cache_misses: int = 0
    expert_bytes_fetched: int = 0
    speculative_fetches: int = 0
    speculated: int = 0
    speculated_correct: int = 0
    speculated_needed: int = 0
    whole_layer_forwards: int = 0
    expert_cache_bytes: int = 0

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


class _Slot:
    def __init__(self, index: int, nbytes: int, device: torch.device, staging: bool, pin: bool, mapped: bool):
        self.index = index
        self.unit: int | None = None
        self.plan: UnitPlan | None = None
        self.future: Future | None = None
        self.bound = False
        # memory-mapped mode: (offset in the unit, uint8 tensor) for each range of the unit held, no buffer
        self.mapped: list[tuple[int, torch.Tensor]] | None = None
        self.runs: list[MappedRun] = []
        if mapped:
            self.buffer = self.staging = None
        elif device.type == "cpu":
            raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
            start = (-raw.data_ptr()) % ALIGN  # O_DIRECT needs an aligned destination
            self.buffer = raw[start : start + nbytes]
            self.staging = None
        else:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.staging = None
            if staging:
                raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
                start = (-raw.data_ptr()) % ALIGN
                self.staging = raw[start : start + nbytes]
            self.ready_event = torch.cuda.Event()
            self.free_event = torch.cuda.Event()


class FetchPipeline:
    """Fetches units of `plans` from `store` into a ring of device slots (see the module docstring)."""

    def __init__(
        self,
        plans: list[UnitPlan],
        store,
        device: torch.device,
        depth: int,
        io_threads: int,
        chunk_bytes: int,
        pin: bool,
        group=None,
        map_files: bool = False,
    ):
        self.plans = plans
        # MoE units fetch only their dense part while `routed` (their experts come one by one, see experts.py)
        self.routed = False
        self.store = store
        self.device = device
        self.depth = depth
        self.chunk_bytes = chunk_bytes
        self.group = group
        self.world = group.size() if group is not None else 1
        self.rank = group.rank() if group is not None else 0
        # Each process reads an aligned 1/world share; the slot holds every share.
        every = plans + [p.dense for p in plans if p.dense is not None]
        self._share = {id(p): align_up(-(-p.nbytes // self.world)) for p in every}
        self._payload = {id(p): sum(r.nbytes for r in p.ranges) for p in every}
        slot_bytes = max(self._share[id(p)] * self.world for p in plans)
        direct_copy = isinstance(store, CpuStore) and self.world == 1
        self.map_files = map_files and device.type == "cpu" and self.world == 1 and hasattr(store, "map_runs")
        self.slots = [_Slot(i, slot_bytes, device, not direct_copy, pin, self.map_files) for i in range(depth + 1)]
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.free: deque[_Slot] = deque(self.slots)
        self.resident: dict[int, _Slot] = {}
        self.order: list[int] | None = None
        self.recording: list[int] = []
        self.pos = -1
        self.stats = OffloadStats(slot_bytes=0 if self.map_files else slot_bytes * len(self.slots))
        self._mappings: dict[int, tuple[list[MappedRun], list[tuple[int, torch.Tensor]]]] = {}
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="hf_moe_offload-io")
        self._coordinator = ThreadPoolExecutor(1, thread_name_prefix="hf_moe_offload-fetch")

    # -- the fetch, on the coordinator thread ---------------------------------------------------------------------

    def plan_of(self, unit: int) -> UnitPlan:
        plan = self.plans[unit]
        return plan.dense if self.routed and plan.dense is not None else plan

    def set_routed(self, routed: bool) -> None:
        """Fetch MoE units without (`True`) or with their experts from now on."""
        if routed != self.routed:
            self.drain()  # prefetched units hold the other plan
            self.routed = routed

    def _read_ranges(self, plan: UnitPlan, host: torch.Tensor) -> None:
        share = self._share[id(plan)]
        lo_share, hi_share = self.rank * share, (self.rank + 1) * share
        futures = []
        for rng in plan.ranges:
            lo = max(rng.dst_offset, lo_share)
            hi = min(rng.dst_offset + rng.nbytes, hi_share)
            # chunk boundaries on absolute multiples of chunk_bytes keep every read but a range's last one aligned
            start = lo
            while start < hi:
                end = min(hi, (start // self.chunk_bytes + 1) * self.chunk_bytes)
                futures.append(self._io.submit(self.store.read, rng, host, start, end))
                start = end
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            wait(futures)  # never leave a reader writing into a slot that is handed back
            for f in futures:
                if f.exception() is not None:
                    raise f.exception()

    def _all_gather(self, buffer: torch.Tensor, plan: UnitPlan) -> None:
        share = self._share[id(plan)]
        mine = buffer[self.rank * share : (self.rank + 1) * share].clone()
        dist = torch.distributed
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(buffer[: share * self.world], mine, group=self.group)

    def _fetch(self, plan: UnitPlan, slot: _Slot) -> None:
        if self.map_files:
            # each plan's ranges are mapped once; a fetch maps their pages, freeing the slot unmaps them
            entry = self._mappings.get(id(plan))
            if entry is None:
                runs, views = self.store.map_runs(plan.ranges)
                entry = (runs, [(rng.dst_offset, view) for rng, view in zip(plan.ranges, views, strict=True)])
                self._mappings[id(plan)] = entry
            for run in entry[0]:
                self.store.populate_run(run)
            slot.runs, slot.mapped = entry
            return
        if self.device.type == "cpu":
            self._read_ranges(plan, slot.buffer)
            if self.world > 1:
                self._all_gather(slot.buffer, plan)
            return
        nbytes = self._share[id(plan)] * self.world
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(slot.free_event)  # the previous unit in this slot has finished computing
            if slot.staging is None:
                for rng in plan.ranges:  # pinned CPU store: one asynchronous copy per range
                    self.store.read(rng, slot.buffer, rng.dst_offset, rng.dst_offset + rng.nbytes)
            else:
                slot.ready_event.synchronize()  # the staging buffer's previous copy is done (this thread only)
                self._read_ranges(plan, slot.staging)
                slot.buffer[:nbytes].copy_(slot.staging[:nbytes], non_blocking=True)
                if self.world > 1:
                    self._all_gather(slot.buffer, plan)
            slot.ready_event.record(self.copy_stream)

    def _submit(self, unit: int, slot: _Slot) -> None:
        plan = self.plan_of(unit)
        slot.unit, slot.plan = unit, plan
        slot.future = self._coordinator.submit(self._fetch, plan, slot)
        self.resident[unit] = slot
        self.stats.units_fetched += 1
        self.stats.bytes_fetched += self._payload[id(plan)]
        self.stats.peak_resident_units = max(self.stats.peak_resident_units, len(self.resident))

    # -- the computing thread ---------------------------------------------------------------------------------------

    @staticmethod
    def _unmap_pages(runs: list[MappedRun]) -> None:
        for run in runs:
            madvise(run.data, mmap.MADV_DONTNEED)

    def _free_slot(self, slot: _Slot) -> None:
        self.resident.pop(slot.unit, None)
        if slot.runs:
            # off this thread (a large unit takes milliseconds), in order with the fetches (a later fetch of the same
            # unit maps its pages again after this)
            self._coordinator.submit(self._unmap_pages, slot.runs)
        slot.unit, slot.plan, slot.future, slot.bound, slot.mapped, slot.runs = None, None, None, False, None, []
        self.free.append(slot)

    def drain(self) -> None:
        """Wait for every fetch in flight and hand its slot back (errors of abandoned prefetches are dropped)."""
        for slot in list(self.resident.values()):
            if slot.bound:
                continue
            if slot.future is not None:
                wait([slot.future])
            self._free_slot(slot)

    def _take_slot(self) -> _Slot:
        if not self.free:
            self.drain()
        if not self.free:
            raise RuntimeError(
                f"every device slot holds a unit that is computing ({len(self.slots)} slots): units call each other; "
                f"raise prefetch_depth"
            )
        return self.free.popleft()

    def _resync(self, unit: int) -> None:
        self.stats.resyncs += 1
        self.drain()
        if self.order is not None and unit in self.order:
            self.pos = self.order.index(unit)
        else:
            self.order, self.recording, self.pos = None, [unit], -1

    def acquire(self, unit: int) -> _Slot:
        """Called before `unit` computes: returns its slot once the weights are there."""
        if self.order is None:
            self.recording.append(unit)
        elif self.order[(self.pos + 1) % len(self.order)] == unit:
            self.pos = (self.pos + 1) % len(self.order)
        else:
            self._resync(unit)
        slot = self.resident.get(unit)
        if slot is None:
            slot = self._take_slot()
            self._submit(unit, slot)
            self.stats.on_demand_fetches += 1
        elif slot.future.done():
            self.stats.prefetch_hits += 1
        start = time.perf_counter()
        try:
            slot.future.result()
        except BaseException:
            if slot.future.done():
                self._free_slot(slot)
            raise
        finally:
            self.stats.fetch_wait_seconds += time.perf_counter() - start
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready_event)
        slot.bound = True
        self._prefetch()
        return slot

    def release(self, unit: int) -> None:
        """Called after `unit` computed: its slot can take the next unit."""
        slot = self.resident.get(unit)
        if slot is None:
            return
        if self.copy_stream is not None:
            slot.free_event.record(torch.cuda.current_stream(self.device))
        self._free_slot(slot)
        self._prefetch()

    def end_forward(self) -> None:
        if self.order is None and self.recording:
            self.order, self.recording = self.recording, []
            self.pos = len(self.order) - 1
        self._prefetch()
        if self.world > 1:
            # No collective may outlive the forward: the caller may tear the process group down next.
            wait([slot.future for slot in self.resident.values() if slot.future is not None])

    def _prefetch(self) -> None:
        if self.order is None:
            return
        for k in range(1, self.depth + 1):
            if not self.free:
                return
            unit = self.order[(self.pos + k) % len(self.order)]
            if unit not in self.resident:
                self._submit(unit, self.free.popleft())

    def close(self) -> None:
        self.drain()
        self._coordinator.shutdown(wait=True)
        self._io.shutdown(wait=True)
