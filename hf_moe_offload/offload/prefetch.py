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
into a staging buffer of 1/N, copies those bytes only to its device (1/N of the host-to-device traffic, as
ZeRO-Inference) and an all-gather on the device assembles it. Any exception of a reader thread is raised again in
the thread that needs the unit.
On the CPU execution device with an NVMe store the slots hold no buffer: each unit's ranges are mapped once, a fetch
maps their pages (`MADV_POPULATE_READ`, zero-copy from the page cache) and freeing the slot unmaps them again.

A MoE unit has two plans: whole, and without its experts (`routed`), which then come one by one (experts.py).
With a low-bit store a fetch moves the packed bytes, then dequantizes them into the slot's full-precision buffer (on
the coordinator thread on the CPU, on the copy stream on CUDA) before the unit is ready (`quantize.PlanCodec`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait

import torch

from . import pages
from .collective import flag_device, raise_together
from .layout import UnitPlan, align_up
from .quantize import PlanCodec
from .stats import OffloadStats
from .transfer import Transfer


class Slot:
    """One device buffer of the ring (or, with mapped pages, the mapping of the unit it holds)."""

    def __init__(self, index: int, nbytes: int, transfer: Transfer, staging: int, mapped: bool, decoded: int = 0):
        self.index = index
        self.unit: int | None = None
        self.plan: UnitPlan | None = None
        # a low-bit store: the unit's full-precision plan and the device buffer its packed bytes are dequantized into
        self.codec: PlanCodec | None = None
        self.decoded = transfer.device_buffer(decoded) if decoded else None
        self.future: Future | None = None
        self.bound = False
        # memory-mapped mode: (offset in the unit, uint8 tensor) for each range of the unit held, no buffer
        self.mapped: list[tuple[int, torch.Tensor]] | None = None
        self.runs: list = []
        self.buffer = None if mapped else transfer.device_buffer(nbytes)
        # the host buffer reads land in before their copy to the device: this rank's share only (`staging` bytes)
        self.staging = transfer.host_buffer(staging) if staging and transfer.stages and not mapped else None
        self.ready_event = transfer.event()  # the copy into this slot is done
        self.free_event = transfer.event()  # the compute stream is done with this slot

    @property
    def view_key(self) -> tuple[int, int]:
        """What views of the unit's tensors in this slot depend on: with mapped pages the plan's mapping (the same at
        every fetch), else (and for a low-bit unit, whose views are of the slot's decoded buffer) the slot's buffer
        and the plan."""
        return (-1 if self.mapped is not None and self.codec is None else self.index, id(self.plan))

    @property
    def view_plan(self) -> UnitPlan | None:
        """The plan the unit's parameters view: the full-precision one of a quantized unit, else the stored one."""
        return self.codec.compute if self.codec is not None else self.plan

    def view_region(self, offset: int, nbytes: int) -> torch.Tensor:
        """`nbytes` at `offset` of the buffer of `view_plan`."""
        if self.codec is not None:
            return self.decoded[offset : offset + nbytes]
        return self.region(offset, nbytes)

    def region(self, offset: int, nbytes: int) -> torch.Tensor:
        """`nbytes` at `offset` of the unit held (its stored bytes), as a uint8 tensor."""
        if self.mapped is None:
            return self.buffer[offset : offset + nbytes]
        start, data = next((s, d) for s, d in self.mapped if s <= offset < s + d.numel())
        return data[offset - start : offset - start + nbytes]


def check_slots_fit(slot_bytes: int, count: int, free: int, device: torch.device) -> None:
    """A clear error, before anything is allocated, when the slot ring cannot fit the device's free memory."""
    need = slot_bytes * count
    if need > free:
        raise RuntimeError(
            f"the {count} device slots (prefetch_depth + 1) of {slot_bytes / 2**30:.2f} GiB each (the largest unit) "
            f"need {need / 2**30:.2f} GiB but {device} has {free / 2**30:.2f} GiB free: lower prefetch_depth, or free "
            f"device memory"
        )


class FetchPipeline:
    """Fetches units of `plans` from `store` into a ring of device slots (see the module docstring)."""

    def __init__(
        self,
        plans: list[UnitPlan],
        store,
        transfer: Transfer,
        readers: Executor,
        stats: OffloadStats,
        depth: int,
        chunk_bytes: int,
        group=None,
        map_files: bool = False,
        verify: bool = False,
        flags=None,
        codecs: dict[int, PlanCodec] | None = None,
    ):
        """
        Args:
            plans: the units' plans (a MoE unit's `dense` plan is fetched while `routed`).
            store: the store the units are read from.
            transfer: copies into the execution device (streams, events, staging buffers).
            readers: the reader threads that a unit's reads are split over.
            stats: the counters this pipeline adds to.
            depth: units fetched ahead of the one computing (`depth + 1` slots).
            chunk_bytes: the largest read given to one reader.
            group: the process group whose ranks each read 1/N of a unit, or None.
            flags: the host (gloo) group over the same ranks that a failed read is raised on every rank with (see
                `collective.host_group`; used only from this pipeline's coordinator thread).
            map_files: on the CPU device, map the store's pages instead of reading them into slot buffers.
            verify: check the CRC of a unit's store files before each fetch of it (`OffloadConfig.verify_reads`).
            codecs: for a low-bit store, the codec of each plan (by `id`) whose packed bytes are dequantized into
                the slot's full-precision buffer once fetched (on the device: on CUDA on the copy stream).
        """
        self.plans = plans
        self.verify = verify
        # MoE units fetch only their dense part while `routed` (their experts come one by one, see experts.py)
        self.routed = False
        self.store = store
        self.transfer = transfer
        self.device = transfer.device
        self.depth = depth
        self.chunk_bytes = chunk_bytes
        self.group = group
        self.world = group.size() if group is not None else 1
        self.rank = group.rank() if group is not None else 0
        self._flags = flags if flags is not None else group
        self._flag_device = flag_device(self._flags, self.device) if group is not None else None
        # Each process reads an aligned 1/world share; the slot holds every share.
        every = plans + [p.dense for p in plans if p.dense is not None]
        self._share = {id(p): align_up(-(-p.nbytes // self.world)) for p in every}
        self._payload = {id(p): sum(r.nbytes for r in p.ranges) for p in every}
        self.codecs = codecs or {}
        # the full-precision bytes each fetch stands for (of a low-bit plan: its full-precision plan's)
        self._full_payload = {
            id(p): sum(r.nbytes for r in (self.codecs[id(p)].compute if id(p) in self.codecs else p).ranges)
            for p in every
        }
        decoded_bytes = max((codec.compute.nbytes for codec in self.codecs.values()), default=0)
        slot_bytes = max(self._share[id(p)] * self.world for p in plans)
        staging_bytes = max(self._share[id(p)] for p in plans)  # each rank stages only its share
        direct_copy = store.in_memory and self.world == 1  # CPU arenas copy straight to the device
        self.map_files = (
            map_files and self.device.type == "cpu" and self.world == 1 and store.mappable and pages.supported()
        )
        if self.device.type == "cuda" and not self.map_files:
            free = torch.cuda.mem_get_info(self.device)[0]
            check_slots_fit(slot_bytes + decoded_bytes, depth + 1, free, self.device)
        self.slots = [
            Slot(i, slot_bytes, transfer, 0 if direct_copy else staging_bytes, self.map_files, decoded_bytes)
            for i in range(depth + 1)
        ]
        self.free: deque[Slot] = deque(self.slots)
        self.resident: dict[int, Slot] = {}
        self.order: list[int] | None = None
        self.recording: list[int] = []
        self.pos = -1
        self.stats = stats
        stats.slot_bytes = (0 if self.map_files else slot_bytes * len(self.slots)) + decoded_bytes * len(self.slots)
        stats.staging_bytes += sum(slot.staging.numel() for slot in self.slots if slot.staging is not None)
        self._mappings: dict[int, tuple[list, list[tuple[int, torch.Tensor]]]] = {}
        self._readers = readers
        self._coordinator = ThreadPoolExecutor(1, thread_name_prefix="hf_moe_offload-fetch")
        self._closed = False

    # -- the fetch, on the coordinator thread ---------------------------------------------------------------------

    def plan_of(self, unit: int) -> UnitPlan:
        plan = self.plans[unit]
        return plan.dense if self.routed and plan.dense is not None else plan

    def set_routed(self, routed: bool) -> None:
        """Fetch MoE units without (`True`) or with their experts from now on."""
        if routed != self.routed:
            self.drain()  # prefetched units hold the other plan
            self.routed = routed

    def _read_ranges(self, plan: UnitPlan, host: torch.Tensor, base: int = 0) -> None:
        """This rank's share of `plan` into `host`, whose byte 0 is byte `base` of the unit's buffer."""
        share = self._share[id(plan)]
        lo_share, hi_share = self.rank * share, (self.rank + 1) * share
        futures = []
        for rng in plan.ranges:
            lo = max(rng.dst_offset, lo_share)
            hi = min(rng.dst_offset + rng.nbytes, hi_share)
            shifted = dataclasses.replace(rng, dst_offset=rng.dst_offset - base) if base else rng
            # chunk boundaries on absolute multiples of chunk_bytes keep every read but a range's last one aligned
            start = lo
            while start < hi:
                end = min(hi, (start // self.chunk_bytes + 1) * self.chunk_bytes)
                futures.append(self._readers.submit(self.store.read, shifted, host, start - base, end - base))
                start = end
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            wait(futures)  # never leave a reader writing into a slot that is handed back
            for f in futures:
                if f.exception() is not None:
                    raise f.exception()

    def _read_share(self, plan: UnitPlan, host: torch.Tensor, base: int = 0) -> None:
        """This rank's share of `plan` (see `_read_ranges`); with several ranks a read that failed on any of them
        raises on all, before the all-gather the others would wait in."""
        if self.world == 1:
            self._read_ranges(plan, host, base)
            return
        error = None
        try:
            self._read_ranges(plan, host, base)
        except Exception as err:  # raised on every rank just below
            error = err
        raise_together(self._flags, error, self._flag_device, f"reading unit {plan.name}")

    def _all_gather(self, buffer: torch.Tensor, plan: UnitPlan) -> None:
        share = self._share[id(plan)]
        mine = buffer[self.rank * share : (self.rank + 1) * share].clone()
        dist = torch.distributed
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(buffer[: share * self.world], mine, group=self.group)

    def _fetch(self, plan: UnitPlan, slot: Slot) -> None:
        if self.verify:
            self.store.verify(self.plans[slot.unit])
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
            self._decode(slot)
            return
        if slot.staging is None and not self.transfer.cuda:  # the CPU device: read straight into the slot
            self._read_share(plan, slot.buffer)
            if self.world > 1:
                self._all_gather(slot.buffer, plan)
            self._decode(slot)
            return
        with self.transfer.copying(after=slot.free_event):  # the previous unit in this slot has finished computing
            if slot.staging is None:
                for rng in plan.ranges:  # pinned CPU store: one asynchronous copy per range
                    self.store.read(rng, slot.buffer, rng.dst_offset, rng.dst_offset + rng.nbytes)
                self.stats.host_to_device_bytes += self._payload[id(plan)]
            else:
                share = self._share[id(plan)]
                lo = self.rank * share  # this rank's share: the only bytes it reads and copies
                self.transfer.host_waits(slot.ready_event)  # the staging buffer's previous copy is done
                self._read_share(plan, slot.staging, base=lo)
                slot.buffer[lo : lo + share].copy_(slot.staging[:share], non_blocking=True)
                self.stats.host_to_device_bytes += share
                if self.world > 1:
                    self._all_gather(slot.buffer, plan)
            self._decode(slot)  # queued on the copy stream after the copy
            self.transfer.copied(slot.ready_event)

    @staticmethod
    def _decode(slot: Slot) -> None:
        """A low-bit unit: dequantize its packed bytes into the slot's full-precision buffer."""
        if slot.codec is not None:
            slot.codec.decode(slot.region, slot.decoded)

    def _submit(self, unit: int, slot: Slot) -> None:
        plan = self.plan_of(unit)
        slot.unit, slot.plan, slot.codec = unit, plan, self.codecs.get(id(plan))
        slot.future = self._coordinator.submit(self._fetch, plan, slot)
        self.resident[unit] = slot
        self.stats.units_fetched += 1
        self.stats.bytes_fetched += self._payload[id(plan)]
        self.stats.full_precision_bytes += self._full_payload[id(plan)]
        self.stats.peak_resident_units = max(self.stats.peak_resident_units, len(self.resident))

    # -- the computing thread ---------------------------------------------------------------------------------------

    @staticmethod
    def _unmap_pages(runs: list) -> None:
        for run in runs:
            pages.drop(run.data)

    def _free_slot(self, slot: Slot) -> None:
        self.resident.pop(slot.unit, None)
        if slot.runs:
            try:
                # off this thread (a large unit takes milliseconds), in order with the fetches (a later fetch of the
                # same unit maps its pages again after this)
                self._coordinator.submit(self._unmap_pages, slot.runs)
            except RuntimeError:  # the coordinator is shut down (closing, or the interpreter is exiting)
                self._unmap_pages(slot.runs)
        slot.unit, slot.plan, slot.future, slot.bound, slot.mapped, slot.runs = None, None, None, False, None, []
        slot.codec = None
        self.free.append(slot)

    def drain(self) -> None:
        """Wait for every fetch in flight and hand its slot back (errors of abandoned prefetches are dropped)."""
        for slot in list(self.resident.values()):
            if slot.bound:
                continue
            if slot.future is not None:
                wait([slot.future])
            self._free_slot(slot)

    def _take_slot(self) -> Slot:
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

    def acquire(self, unit: int) -> Slot:
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
        else:
            self.stats.late_prefetches += 1
        start = time.perf_counter()
        try:
            slot.future.result()
        except BaseException:
            if slot.future.done():
                self._free_slot(slot)
            raise
        finally:
            waited = time.perf_counter() - start
            self.stats.fetch_wait_seconds += waited
            if not self.transfer.cuda:  # the computing thread is the device: its wait is the stall
                self.stats.device_wait_seconds += waited
        self.transfer.compute_waits(slot.ready_event)
        slot.bound = True
        self._prefetch()
        return slot

    def release(self, unit: int) -> None:
        """Called after `unit` computed: its slot can take the next unit."""
        slot = self.resident.get(unit)
        if slot is None:
            return
        self.transfer.computed(slot.free_event)
        self._free_slot(slot)
        self._prefetch()

    def end_forward(self) -> None:
        if self.order is None and self.recording:
            self.order, self.recording = self.recording, []
            self.pos = len(self.order) - 1
        self._prefetch()
        self.stats.device_wait_seconds += self.transfer.device_wait_seconds()  # the timed waits that have completed
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
        """Wait for every fetch, drop every mapping and stop the coordinator thread (the readers are the caller's)."""
        if self._closed:
            return
        for slot in self.resident.values():
            slot.bound = False
        self.drain()
        self._coordinator.shutdown(wait=True)
        self._closed = True
        self._mappings.clear()
