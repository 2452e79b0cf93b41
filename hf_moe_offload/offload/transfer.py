"""Host-to-device copies: the copy stream, its events and the page-locked staging buffers. The only module of the
runtime that touches CUDA streams and events; on the CPU execution device every operation here is a no-op and the
buffers are plain 4 KiB-aligned host memory (O_DIRECT reads into them).

The ordering contract, on CUDA: a copy into device memory waits (on the copy stream) for the event recorded when the
compute stream last used that memory; the compute stream waits for the event recorded after the copy. The host never
synchronises the compute stream.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .layout import ALIGN


# CUDA stream priorities: lower is more urgent; -1 is within every device's range (0 is the default priority)
URGENT_STREAM_PRIORITY = -1


def aligned_host_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 host buffer of `nbytes` whose start is 4 KiB aligned (pageable; `PinnedHost` gives page-locked ones)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start : start + nbytes]


class PinnedHost:
    """Page-locked host buffers of exactly the size asked for.

    torch's caching host allocator (`pin_memory=True`) rounds every allocation up to the next power of two and keeps
    its blocks after they are freed: a 2.7 GiB arena pins 4 GiB, and nothing is given back on `disable_offload`.
    Here a buffer is ordinary (pageable) memory registered with `cudaHostRegister` (through torch's `cudart()`
    binding: the one place the runtime calls the CUDA runtime directly), and `close` unregisters every buffer. The
    buffers stay valid, merely pageable again, should something still view them.

    Args:
        cudart: the CUDA runtime binding (default `torch.cuda.cudart()`; tests pass a fake one).
    """

    def __init__(self, cudart=None):
        self._cudart = cudart
        self._registered: list[int] = []
        self.pinned_bytes = 0  # what this runtime has page-locked, exactly

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer of `nbytes`, 4 KiB aligned, page-locked."""
        buffer = aligned_host_buffer(nbytes)
        if nbytes:
            cudart = self._cudart or torch.cuda.cudart()
            status = int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0))
            if status != 0:
                raise RuntimeError(f"page-locking {nbytes / 2**20:.1f} MiB of host memory failed (cudaError {status})")
            self._registered.append(buffer.data_ptr())
            self.pinned_bytes += nbytes
        return buffer

    def close(self) -> None:
        """Unregister every buffer (after every copy from them has finished: the caller synchronises first)."""
        if self._registered:
            cudart = self._cudart or torch.cuda.cudart()
            for pointer in self._registered:
                cudart.cudaHostUnregister(pointer)
        self._registered.clear()
        self.pinned_bytes = 0


class Transfer:
    """Copies into the execution `device`: buffers, the copy stream and its events.

    Args:
        device: the execution device.
        pin: page-lock host staging buffers and the CPU store's arenas (CUDA only), exactly (`PinnedHost`).
        cudart: the CUDA runtime binding `PinnedHost` registers memory with (tests pass a fake one).
    """

    def __init__(self, device: torch.device, pin: bool = False, cudart=None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.pin = pin and self.cuda
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # cache misses the compute stream waits for now: copied ahead of queued prefetch copies (a higher priority)
        self.urgent_stream = torch.cuda.Stream(device, priority=URGENT_STREAM_PRIORITY) if self.cuda else None
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[torch.cuda.Event] = queue.SimpleQueue()
        self._timing: queue.SimpleQueue[torch.cuda.Event] = queue.SimpleQueue()
        self._stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stalls_lock = threading.Lock()
        self.pinned = PinnedHost(cudart) if self.pin else None

    @property
    def stages(self) -> bool:
        """Whether copies to the device start from host staging buffers (CUDA; tests set it to run that path on the
        CPU)."""
        return self.cuda

    # -- memory -----------------------------------------------------------------------------------------------------

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer on the execution device (4 KiB aligned on the CPU)."""
        if not self.cuda:
            return aligned_host_buffer(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A 4 KiB-aligned host buffer that copies to the device start from (page-locked, exactly, when pinning)."""
        return self.pinned.buffer(nbytes) if self.pinned is not None else aligned_host_buffer(nbytes)

    def close(self) -> None:
        """Wait for every copy queued on the copy stream (a prefetch may still write slots that go back to the
        allocator), then unpin the host buffers. Idempotent."""
        if self.cuda:
            self.copy_stream.synchronize()
            self.urgent_stream.synchronize()
        while not self._staging.empty():
            self._staging.get()
        if self.pinned is not None:
            self.pinned.close()

    def add_staging(self, count: int, nbytes: int) -> None:
        """Fill the shared staging pool (expert reads on CUDA take one buffer each while they copy)."""
        for _ in range(count):
            self._staging.put(self.host_buffer(nbytes))

    @contextmanager
    def staging(self) -> Iterator[torch.Tensor]:
        """A buffer of the staging pool, given back when the block ends."""
        buffer = self._staging.get()
        try:
            yield buffer
        finally:
            self._staging.put(buffer)

    # -- ordering ---------------------------------------------------------------------------------------------------

    def event(self) -> torch.cuda.Event | None:
        return torch.cuda.Event() if self.cuda else None

    @contextmanager
    def reused_event(self) -> Iterator[torch.cuda.Event | None]:
        """An event from a pool, for a copy the calling thread waits on before the block ends (so that it can be
        reused at once): no `cudaEventCreate` per read."""
        if not self.cuda:
            yield None
            return
        event = self._events.get() if not self._events.empty() else torch.cuda.Event()
        try:
            yield event
        finally:
            self._events.put(event)

    @contextmanager
    def copying(self, after: torch.cuda.Event | None = None, urgent: bool = False) -> Iterator[None]:
        """Work inside the block is queued on the copy stream (`urgent`: the high-priority one, for what the compute
        stream waits for now), after `after` (memory the compute stream may still read). No-op on the CPU."""
        if not self.cuda:
            yield
            return
        stream = self.urgent_stream if urgent else self.copy_stream
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            yield

    def copied(self, event: torch.cuda.Event | None) -> None:
        """Record `event` on the copy stream of the enclosing `copying` block: everything queued on it so far."""
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))

    def computed(self, event: torch.cuda.Event | None) -> None:
        """Record `event` on the compute stream: its use of some memory so far."""
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))

    def compute_waits(self, event: torch.cuda.Event | None) -> None:
        """The compute stream waits for `event` (a copy) before its next kernels; the wait is timed by a pair of
        timing events around it (read by `device_wait_seconds`): the host only queues it, its clock would read 0."""
        if event is None:
            return
        stream = torch.cuda.current_stream(self.device)
        start = self._timing.get() if not self._timing.empty() else torch.cuda.Event(enable_timing=True)
        end = self._timing.get() if not self._timing.empty() else torch.cuda.Event(enable_timing=True)
        start.record(stream)
        stream.wait_event(event)
        end.record(stream)
        with self._stalls_lock:
            self._stalls.append((start, end))

    def device_wait_seconds(self, wait: bool = False) -> float:
        """Seconds the compute stream spent waiting for copies, over the timed waits that have completed (all of them,
        synchronising, when `wait`); each is counted once. 0 on the CPU."""
        if not self.cuda:
            return 0.0
        total = 0.0
        with self._stalls_lock:
            pending = []
            for start, end in self._stalls:
                if wait:
                    end.synchronize()
                if end.query():
                    total += start.elapsed_time(end) / 1000
                    self._timing.put(start)
                    self._timing.put(end)
                else:
                    pending.append((start, end))
            self._stalls = pending
        return total

    @staticmethod
    def host_waits(event: torch.cuda.Event | None) -> None:
        """The calling thread (an I/O thread, never the compute thread) waits for `event`."""
        if event is not None:
            event.synchronize()


def small_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (renumbered ids, embedding rows) on `device` without a host synchronisation: a copy from
    pageable memory makes the host wait for the device to catch up, one from page-locked memory is queued (torch's
    pinned allocator keeps the block until the copy has run; these are small, so its power-of-two rounding is
    harmless)."""
    if device.type != "cuda":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
