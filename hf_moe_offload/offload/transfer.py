"""Host-to-device copies: the copy stream, its events and the page-locked staging buffers. The only module of the
runtime that touches CUDA streams and events; on the CPU execution device every operation here is a no-op and the
buffers are plain 4 KiB-aligned host memory (O_DIRECT reads into them).

The ordering contract, on CUDA: a copy into device memory waits (on the copy stream) for the event recorded when the
compute stream last used that memory; the compute stream waits for the event recorded after the copy. The host never
synchronises the compute stream.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .layout import ALIGN


def aligned_host_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 host buffer of `nbytes` whose start is 4 KiB aligned (page-locked when `pin`)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start : start + nbytes]


class Transfer:
    """Copies into the execution `device`: buffers, the copy stream and its events.

    Args:
        device: the execution device.
        pin: page-lock host staging buffers (CUDA only).
    """

    def __init__(self, device: torch.device, pin: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.pin = pin and self.cuda
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()

    # -- memory -----------------------------------------------------------------------------------------------------

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer on the execution device (4 KiB aligned on the CPU)."""
        if not self.cuda:
            return aligned_host_buffer(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        """A 4 KiB-aligned host buffer that copies to the device start from (page-locked when pinning)."""
        return aligned_host_buffer(nbytes, pin=self.pin)

    def add_staging(self, count: int, nbytes: int) -> None:
        """Fill the shared staging pool (expert reads on CUDA take one buffer each while they copy)."""
        for _ in range(count):
            self._staging.put(self.staging_buffer(nbytes))

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
    def copying(self, after: torch.cuda.Event | None = None) -> Iterator[None]:
        """Work inside the block is queued on the copy stream, after `after` (memory the compute stream may still
        read). No-op on the CPU."""
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            yield

    def copied(self, event: torch.cuda.Event | None) -> None:
        """Record `event` on the copy stream: everything queued on it so far."""
        if event is not None:
            event.record(self.copy_stream)

    def computed(self, event: torch.cuda.Event | None) -> None:
        """Record `event` on the compute stream: its use of some memory so far."""
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))

    def compute_waits(self, event: torch.cuda.Event | None) -> None:
        """The compute stream waits for `event` (a copy) before its next kernels."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def host_waits(event: torch.cuda.Event | None) -> None:
        """The calling thread (an I/O thread, never the compute thread) waits for `event`."""
        if event is not None:
            event.synchronize()
