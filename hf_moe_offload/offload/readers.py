"""The reader threads: one pool for every read of an offloaded model, served in order of priority.

A unit's prefetch, the next MoE layer's speculative expert reads and the current layer's cache misses all queue in
the same pool. With a first-in-first-out pool a miss, the one read the computing thread is waiting for, would wait
behind every chunk queued before it. Here each read has a priority (`URGENT` for misses, `PREFETCH` for upcoming
units, `SPECULATIVE` for guesses) and the threads take the most urgent one queued, first come first served within
a priority. A read already running is never interrupted.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future


URGENT = 0  # what the computing thread waits for now (an expert cache miss)
PREFETCH = 1  # an upcoming unit (the default)
SPECULATIVE = 2  # a guess of the next MoE layer's experts


class PriorityReaders(Executor):
    """`threads` daemon threads that run submitted reads most urgent first.

    Args:
        threads: the number of reader threads (`OffloadConfig.io_threads`).
        name: the threads' name prefix.
    """

    def __init__(self, threads: int, name: str = "hf_moe_offload-io"):
        self._queue: list[tuple[int, int, Future, Callable, tuple, dict]] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._shutdown = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)` at `PREFETCH` priority."""
        return self.submit_at(PREFETCH, fn, *args, **kwargs)

    def submit_at(self, priority: int, fn: Callable, /, *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)` at `priority` (lower runs first)."""
        future: Future = Future()
        with self._condition:
            if self._shutdown:
                raise RuntimeError("cannot schedule new reads after shutdown")
            heapq.heappush(self._queue, (priority, next(self._order), future, fn, args, kwargs))
            self._condition.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._shutdown:
                    self._condition.wait()
                if not self._queue:
                    return  # shut down and nothing left
                _, _, future, fn, args, kwargs = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as error:  # handed to whoever waits on the future
                future.set_exception(error)
            else:
                future.set_result(result)
            del future, fn, args, kwargs  # hold nothing while idle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking reads; the threads finish what is queued (or cancel it) and exit."""
        with self._condition:
            self._shutdown = True
            if cancel_futures:
                for _, _, future, *_ in self._queue:
                    future.cancel()
                self._queue.clear()
            self._condition.notify_all()
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()
