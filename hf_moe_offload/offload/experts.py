"""Expert-aware fetching for MoE layers: only the experts the router picked move, hot experts stay on the device, and
the next MoE layer's experts are guessed and fetched ahead.

Any experts module in the transformers v5 layout (`@use_experts_implementation`: fused `(num_experts, ...)`
parameters `gate_up_proj` or `up_proj`, `down_proj`, optional biases) works: GPT-MoE, Mixtral, Qwen2-MoE, OLMoE, ...
With `OffloadConfig(expert_fetch="routed")` the model's experts implementation becomes `"offload_routed"`, registered
in transformers' `ALL_EXPERTS_FUNCTIONS`. Its block is fetched without the experts (attention, norms, router, shared
experts stream with the block as before); when the router has run, the union of `top_k_index` over the batch is
brought to the device and the model's own implementation (`"sorted_mm"`, `"grouped_mm"`, `"eager"`, ...) runs on
those experts, renumbered into a compact `(routed experts, ...)` weight, so every expert computes exactly as in
memory.

Each MoE layer keeps `expert_cache_size` experts on the device, evicting the lowest score: a use count that decays by
`_SCORE_DECAY` per use of the layer, so recency dominates (an LRU) and, among experts used about as long ago, the more
frequent stays (the frequency prior). While a MoE layer computes, the next MoE layer's router (a device copy of its
weight) is applied to the current hidden states and its likely experts are fetched into its cache: a wrong guess costs
bandwidth, never correctness.

On the CPU execution device a layer's whole experts region is reserved once as virtual memory (a private mapping of
the NVMe store file when its pages are mapped, else anonymous memory) and only the pages of fetched experts are
resident: fetching maps the expert's pages from the page cache (`MADV_POPULATE_READ`) or reads it into its rows,
evicting unmaps them (`MADV_DONTNEED`). The weights are views of the whole region with the original expert ids:
nothing is gathered or renumbered. On CUDA an expert is one read into a row of the layer's cache buffer (pinned
staging and a copy stream), and the routed rows are gathered into one compact weight for the call (a device copy;
none when one expert is routed or the cache holds the whole layer), the expert ids renumbered to match.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.utils import logging

from . import pages, routing
from .layout import ExpertLayout, ReadRange, UnitPlan
from .quantize import ExpertCodec, PlanCodec
from .readers import SPECULATIVE, URGENT, PriorityReaders
from .stats import OffloadStats
from .transfer import Transfer


IMPLEMENTATION = "offload_routed"
_LAYER_ATTR = "_hf_moe_offload_experts"
logger = logging.get_logger(__name__)
# Per use of its layer an expert's score decays by this factor and a routed expert gains 1. Below 0.5 one recent use
# outweighs any history (a pure LRU); at 0.8 an expert used 5 of the last 10 steps outlasts one used only 2 steps ago.
_SCORE_DECAY = 0.8


@dataclass
class ExpertsContext:
    """What every expert layer of one offloaded model shares, given explicitly.

    Args:
        store: the store the experts are read from.
        readers: the reader threads (`readers.PriorityReaders`: misses are read before anything else queued).
        transfer: copies into the execution device.
        stats: the counters to add to.
        placeholders: the placeholder of each parameter (what the experts module holds between calls).
        requires_grad: each parameter's `requires_grad`.
        cache_size: experts of each layer kept on the device between calls.
        speculative: guess and fetch the next MoE layer's experts ahead.
        map_pages: on the CPU device, map the store's pages instead of reading the experts into memory.
        io_threads: the number of reader threads (one staging buffer each on CUDA).
    """

    store: object
    readers: PriorityReaders
    transfer: Transfer
    stats: OffloadStats
    placeholders: dict[str, nn.Parameter]
    requires_grad: dict[str, bool]
    cache_size: int
    speculative: bool
    map_pages: bool
    io_threads: int


class RoutingPolicy:
    """Routed or whole: per forward, whether MoE layers fetch only the routed experts or stream whole.

    Every forward measures the fraction of each layer's experts it touched, remembered per size (token counts
    bucketed by powers of two); a size not seen yet is judged by uniform routing (`1 - (1 - k/E)^tokens`). Sizes
    above `break_even` stream whole layers. With several processes they decide together over `group`, a host
    (gloo) group: no device synchronisation.
    """

    def __init__(self, layers: list[_ExpertLayer], break_even: float, group=None):
        self.layers = layers
        self.break_even = break_even
        self.group = group
        self.routed = False
        # the mean fraction of a layer's experts that forwards of 2**(bucket-1) to 2**bucket - 1 tokens touched
        self.touched: dict[int, float] = {}
        self.bucket = 0

    def begin_forward(self, num_tokens: int | None) -> bool:
        """Decide for the forward that starts; returns whether it fetches routed experts."""
        for layer in self.layers:
            layer.touched = None  # what an interrupted forward measured is not kept
        self.bucket = num_tokens.bit_length() if num_tokens else 0
        touched = self.touched.get(self.bucket)
        if touched is None:  # a size not seen yet: what uniform routing would touch (every forward measures)
            touched = self.expected_experts_fraction(num_tokens) if num_tokens else 0.0
        routed = touched <= self.break_even
        if self.group is not None:  # every process must fetch the same plans (their reads are all-gathered)
            flag = torch.tensor([int(routed)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.group)
            routed = bool(flag.item())
        self.routed = routed
        return routed

    def expected_experts_fraction(self, num_tokens: int) -> float:
        """The fraction of a MoE layer's experts that `num_tokens` tokens routed uniformly at random touch,
        `1 - (1 - k / E) ** tokens`, averaged over the layers."""
        fractions = [
            1.0 - (1.0 - min(layer.top_k, layer.num_experts) / layer.num_experts) ** num_tokens for layer in self.layers
        ]
        return sum(fractions) / len(fractions)

    def end_forward(self) -> None:
        masks = [layer for layer in self.layers if isinstance(layer.touched, torch.Tensor)]
        if masks:  # whole-layer forwards left their routed masks on the device: one transfer for all of them
            counts = routing.to_host([layer.touched.sum().reshape(1) for layer in masks])
            for layer, (count,) in zip(masks, counts, strict=True):
                layer.touched = count / layer.num_experts
        fractions = [layer.touched for layer in self.layers if layer.touched is not None]
        if fractions:
            touched = sum(fractions) / len(fractions)
            previous = self.touched.get(self.bucket)
            self.touched[self.bucket] = touched if previous is None else (previous + touched) / 2
            for layer in self.layers:
                layer.touched = None


class _ExpertLayer:
    """The experts of one MoE layer while offloaded: what is on the device, the policy, the fetches."""

    def __init__(
        self,
        context: ExpertsContext,
        module: nn.Module,
        plan: UnitPlan,
        layout: ExpertLayout,
        implementation: Callable,
        decoder: ExpertCodec | None = None,
    ):
        self.context = context
        # a low-bit store: `layout` places the packed experts in the store, `view_layout` the full-precision ones
        # the model computes with, and `decoder` dequantizes the first into the second on the device
        self.decoder = decoder
        self.view_layout = decoder.compute if decoder is not None else layout
        self.stats = context.stats
        self.policy: RoutingPolicy | None = None
        self.module = module
        self.plan = plan
        self.layout = layout
        self.num_experts = layout.num_experts
        self.top_k = int(getattr(module.config, "num_experts_per_tok", None) or 1)
        self.forward_impl = implementation  # the model's own experts implementation
        self.names = [spec.name for spec in self.view_layout.group.params]
        self.attrs = [name.rpartition(".")[2] for name in self.names]
        self.requires_grad = [context.requires_grad[name] for name in self.names]
        self.capacity = min(context.cache_size, self.num_experts)
        self.score = [0.0] * self.num_experts  # host bookkeeping: Python floats, never a device tensor
        self.resident: dict[int, int] = {}  # expert -> its row in the layer's memory
        self.pending: dict[int, Future] = {}
        self.guess: list[int] | None = None
        # fraction of the experts the last routed call used (a whole-layer call: its routed mask, on the device)
        self.touched: float | torch.Tensor | None = None
        self.next: _ExpertLayer | None = None
        self.router_weight: torch.Tensor | None = None  # device copy of this layer's router, for speculation

    # -- the policy ---------------------------------------------------------------------------------------------

    def _victim(self, keep: set[int]) -> int | None:
        """The resident expert with the lowest score that is not in `keep` and not being fetched."""
        candidates = [e for e in self.resident if e not in keep and (e not in self.pending or self.pending[e].done())]
        if not candidates:
            return None
        return min(candidates, key=lambda e: (self.score[e], e))

    def forward(
        self, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if not self.policy.routed:  # a whole-layer forward: the unit bound every expert
            self.touched = routing.routed_mask(top_k_index, self.num_experts)  # read at the end of the forward
            return self.forward_impl(module, hidden_states, top_k_index, top_k_weights)
        stats = self.stats
        mask = routing.routed_mask(top_k_index, self.num_experts)
        following = self.next if self.context.speculative else None
        votes = following.votes(hidden_states) if following is not None else None
        # the one host transfer of this call: the routed set, and the next layer's guess with it
        host = routing.to_host([mask] if votes is None else [mask, votes])
        routed = [e for e, used in enumerate(host[0]) if used]  # ascending
        self.touched = len(routed) / self.num_experts
        if self.guess is not None:
            stats.speculated_correct += len(set(self.guess).intersection(routed))
            stats.speculated_needed += len(routed)
            self.guess = None
        score = self.score = [s * _SCORE_DECAY for s in self.score]
        for expert in routed:
            score[expert] += 1.0
        misses = [e for e in routed if e not in self.resident]
        stats.expert_cache_hits += len(routed) - len(misses)
        stats.expert_cache_misses += len(misses)
        # the reads this call waits for are queued first (urgent), the next layer's guesses after them
        uncached = self._fetch_misses(routed, misses)
        direct = self._start_uncached(routed, uncached)
        if votes is not None:
            following.speculate(host[1])
        try:
            return self._run(module, routed, uncached, direct, hidden_states, top_k_index, top_k_weights, mask)
        finally:
            self._after(routed)

    def votes(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """This layer's router applied to the previous MoE layer's hidden states (`routing.speculation_votes`, on
        the device), or None where it cannot guess."""
        if self.capacity == 0 or self.router_weight is None or hidden_states.shape[-1] != self.router_weight.shape[1]:
            return None
        return routing.speculation_votes(hidden_states, self.router_weight, self.top_k, self.capacity)

    def speculate(self, votes: list[int]) -> None:
        """Start fetching the experts `votes` (from `votes`, on the host) guess for this layer."""
        half = len(votes) // 2
        guess = [e for e, count in zip(votes[:half], votes[half:], strict=True) if count > 0]
        stats = self.stats
        stats.speculated += len(guess)
        self.guess = guess
        keep = set(guess)
        for expert in guess:
            if expert in self.resident:
                continue
            if len(self.resident) >= self.capacity:
                victim = self._victim(keep)
                if victim is None:
                    break
                self._evict(victim)
            self._start_fetch(expert, SPECULATIVE)
            stats.speculative_fetches += 1

    def _fetch_misses(self, routed: list[int], misses: list[int]) -> list[int]:
        """Start fetching the missing experts into the cache, evicting others; returns those that found no room
        (more experts routed than the cache holds), fetched for this call only."""
        keep = set(routed)
        uncached = []
        for expert in misses:
            if len(self.resident) >= self.capacity:
                victim = self._victim(keep)
                if victim is None:
                    uncached.append(expert)
                    continue
                self._evict(victim)
            self._start_fetch(expert, URGENT)
        return uncached

    def _count_fetch(self) -> None:
        stats = self.stats
        stats.expert_bytes_fetched += self.layout.nbytes
        stats.bytes_fetched += self.layout.nbytes
        stats.full_precision_bytes += self.view_layout.nbytes
        if self.context.transfer.cuda:  # each rank reads and copies the experts it routed, whole
            stats.host_to_device_bytes += self.layout.nbytes

    def _wait(self, experts: list[int]) -> None:
        futures = {e: self.pending[e] for e in experts if e in self.pending}
        if not futures:
            return
        start = time.perf_counter()
        wait(futures.values())
        waited = time.perf_counter() - start
        self.stats.fetch_wait_seconds += waited
        self.stats.device_wait_seconds += waited  # (on CUDA an expert's read ends after its copy: a real stall)
        failed = [e for e, future in futures.items() if future.exception() is not None]
        for expert in failed:  # never left looking resident: a later call fetches it again
            self._evict(expert)
        for expert in futures:
            self.pending.pop(expert, None)
        if failed:
            raise futures[failed[0]].exception()  # a reader's exception, raised in the caller

    def _bind(self, module: nn.Module, views: list[torch.Tensor]) -> None:
        for attr, view, grad in zip(self.attrs, views, self.requires_grad, strict=True):
            module._parameters[attr] = view if isinstance(view, nn.Parameter) else nn.Parameter(view, grad)

    def _unbind(self, module: nn.Module) -> None:
        for name, attr in zip(self.names, self.attrs, strict=True):
            module._parameters[attr] = self.context.placeholders[name]

    # -- backend hooks ------------------------------------------------------------------------------------------

    def _start_fetch(self, expert: int, priority: int) -> None:
        raise NotImplementedError

    def _evict(self, expert: int) -> None:
        raise NotImplementedError

    def _start_uncached(self, routed: list[int], uncached: list[int]) -> object:
        """Start the reads of the routed experts the cache has no room for, for this call only; returns what
        `_run` needs of them."""
        raise NotImplementedError

    def _run(self, module, routed, uncached, direct, hidden_states, top_k_index, top_k_weights, mask) -> torch.Tensor:
        raise NotImplementedError

    def _after(self, routed: list[int]) -> None:
        pass

    def close(self) -> None:
        wait(list(self.pending.values()))
        self.pending.clear()
        self.resident.clear()


class _VirtualExperts(_ExpertLayer):
    """CPU execution device: the layer's whole experts region is reserved once as virtual memory, and only the pages
    of fetched experts are resident. With a mapped NVMe store it is a private mapping of the store file (fetching maps
    the expert's pages, `MADV_POPULATE_READ`: zero-copy from the page cache); otherwise an anonymous mapping (fetching
    reads or copies the expert into its rows). Evicting unmaps the pages (`MADV_DONTNEED`). The weights are views of
    the whole region, so the model's implementation runs with the original expert ids: no gather, no renumbering."""

    def __init__(self, context, module, plan, layout, implementation, decoder=None):
        super().__init__(context, module, plan, layout, implementation, decoder)
        self.file_backed = context.map_pages  # only ever set for a file store
        nbytes = layout.num_experts * layout.stride
        if self.file_backed:
            self.data = context.store.map_lazily(ReadRange(plan.key, layout.offset, 0, nbytes))
        else:
            self.data = pages.reserve(nbytes)
        # a low-bit store: the full-precision experts in a region of their own, decoded from the packed pages
        self.decoded = None
        if decoder is not None:
            self.decoded = pages.reserve(layout.num_experts * self.view_layout.stride)
        views = self.view_layout.views(self.data if self.decoded is None else self.decoded, layout.num_experts)
        self.views = [nn.Parameter(v, grad) for v, grad in zip(views, self.requires_grad, strict=True)]
        self.transient: list[int] = []

    def _pages(self, expert: int) -> torch.Tensor:
        start = expert * self.layout.stride
        return self.data[start : start + self.layout.nbytes]

    def _load(self, expert: int) -> None:
        """On an I/O thread: make one expert's pages resident (of a low-bit store: its packed pages, dequantized
        into its full-precision pages, then dropped)."""
        stride = self.layout.stride
        if self.file_backed:
            self.context.store.populate(self._pages(expert), self.plan.key)
        else:
            rng = ReadRange(self.plan.key, self.layout.offset + expert * stride, 0, self.layout.nbytes)
            self.context.store.read(rng, self.data[expert * stride : (expert + 1) * stride], 0, rng.nbytes)
        if self.decoder is not None:
            packed = self.data[expert * stride : (expert + 1) * stride]
            full = self.view_layout.stride
            self.decoder.decode(packed, 1, self.decoded[expert * full : (expert + 1) * full])
            pages.drop(packed)

    def _start_fetch(self, expert: int, priority: int) -> None:
        self.resident[expert] = expert
        self.pending[expert] = self.context.readers.submit_at(priority, self._load, expert)
        self._count_fetch()

    def _evict(self, expert: int) -> None:
        future = self.pending.pop(expert, None)
        if future is not None:
            wait([future])  # a read still writing would map the pages again (its error no longer matters)
        if self.resident.pop(expert, None) is None:
            return
        start = expert * self.layout.stride
        pages.drop(self.data[start : start + self.layout.stride])
        if self.decoded is not None:
            start = expert * self.view_layout.stride
            pages.drop(self.decoded[start : start + self.view_layout.stride])

    def _start_uncached(self, routed, uncached):
        for expert in uncached:  # no room in the cache: resident for this call, unmapped after it
            self._start_fetch(expert, URGENT)
        self.transient = uncached

    def _run(self, module, routed, uncached, direct, hidden_states, top_k_index, top_k_weights, mask):
        self._wait(routed)
        self._bind(module, self.views)
        try:
            return self.forward_impl(module, hidden_states, top_k_index, top_k_weights)
        finally:
            self._unbind(module)

    def _after(self, routed: list[int]) -> None:
        for expert in self.transient:
            self._evict(expert)
        self.transient = []

    def close(self) -> None:
        super().close()
        self.views = []
        self.data = None
        self.decoded = None
        # the mapping closes with the last view of it (a parameter the caller may still hold would keep it)


class _CompactExperts(_ExpertLayer):
    """CUDA execution device: experts read (or copied) into rows of a per-layer cache buffer on the device, and the
    routed rows gathered into one compact weight per call (a device-to-device copy; none when one expert is routed or
    the cache holds the whole layer), the expert ids renumbered to match."""

    def __init__(self, context, module, plan, layout, implementation, decoder=None):
        super().__init__(context, module, plan, layout, implementation, decoder)
        self.transfer = context.transfer
        self.stride = self.view_layout.stride  # of a cache row (full precision)
        self.cache = self.transfer.device_buffer(self.capacity * self.stride)
        self.free_rows = list(range(self.capacity))
        # the whole layer cached: row e holds expert e, and the cache is the layer's fused weight as it is
        self.identity = self.capacity == self.num_experts
        self.cuda = self.transfer.cuda
        self.free_event = self.transfer.event()  # the compute stream is done with the cache rows
        self.transfer.computed(self.free_event)

    def _read(
        self, expert: int, dst: torch.Tensor, after: torch.cuda.Event | None = None, urgent: bool = False
    ) -> None:
        """One expert's bytes into the uint8 `dst` (on the execution device), on an I/O thread. On CUDA the copy
        waits for `after` (default: the layer's last use of its cache rows) on the compute stream, and goes on the
        high-priority copy stream when `urgent` (a miss the compute stream waits for). A low-bit store's packed
        bytes land in a buffer of their own on the device and are dequantized from there into `dst`."""
        store = self.context.store
        rng = ReadRange(self.plan.key, self.layout.offset + expert * self.layout.stride, 0, self.layout.nbytes)
        if not self.cuda:
            packed = dst if self.decoder is None else torch.empty(self.layout.stride, dtype=torch.uint8)
            store.read(rng, packed, 0, rng.nbytes)
            if self.decoder is not None:
                self.decoder.decode(packed, 1, dst)
            return
        with self.transfer.reused_event() as event:
            # memory the compute stream may still read
            with self.transfer.copying(after=after or self.free_event, urgent=urgent):
                packed = dst  # (a low-bit store: allocated on the copy stream, used and freed there)
                if self.decoder is not None:
                    packed = torch.empty(self.layout.stride, dtype=torch.uint8, device=self.transfer.device)
                if store.in_memory and store.pinned:
                    store.read(rng, packed, 0, rng.nbytes)  # asynchronous from the pinned arena
                else:
                    with self.transfer.staging() as staging:
                        store.read(rng, staging, 0, rng.nbytes)
                        packed[: rng.nbytes].copy_(staging[: rng.nbytes], non_blocking=True)
                        self.transfer.copied(event)
                        self.transfer.host_waits(event)  # the staging buffer is reused once the copy is done
                if self.decoder is not None:
                    self.decoder.decode(packed, 1, dst)
                self.transfer.copied(event)
            self.transfer.host_waits(event)  # this I/O thread only (the computing thread waits on the future)

    def _row(self, row: int) -> torch.Tensor:
        return self.cache[row * self.stride : (row + 1) * self.stride]

    def _start_fetch(self, expert: int, priority: int) -> None:
        row = expert if self.identity else self.free_rows.pop()
        self.resident[expert] = row
        urgent = priority == URGENT
        self.pending[expert] = self.context.readers.submit_at(
            priority, self._read, expert, self._row(row), None, urgent
        )
        self._count_fetch()

    def _evict(self, expert: int) -> None:
        future = self.pending.pop(expert, None)
        if future is not None:
            wait([future])  # the row is free once no read writes into it (its error no longer matters)
        row = self.resident.pop(expert, None)
        if row is not None and not self.identity:
            self.free_rows.append(row)

    def _start_uncached(self, routed, uncached):
        """Read the uncached experts straight into their rows of the call's compact weight (a scratch buffer)."""
        if not uncached:
            return None
        scratch = self.transfer.device_buffer(len(routed) * self.stride)
        allocated = self.transfer.event()  # the allocator may hand out memory that queued kernels still read
        self.transfer.computed(allocated)
        position = {expert: j for j, expert in enumerate(routed)}
        futures = [
            self.context.readers.submit_at(URGENT, self._read, e, scratch[position[e] * self.stride :], allocated, True)
            for e in uncached
        ]
        for _ in uncached:
            self._count_fetch()
        return scratch, futures

    def _run(self, module, routed, uncached, direct, hidden_states, top_k_index, top_k_weights, mask):
        if self.identity:
            self._wait(routed)
            weights, ids = self.view_layout.views(self.cache, self.num_experts), top_k_index
        elif len(routed) == 1 and not uncached:
            self._wait(routed)
            row = self.resident[routed[0]]
            weights = self.view_layout.views(self.cache[row * self.stride :], 1)
            ids = (top_k_index != routed[0]).to(top_k_index.dtype)  # (tokens, k): 0, or 1 past the last expert
        else:
            count = len(routed)
            scratch, futures = direct if direct is not None else (self.transfer.device_buffer(count * self.stride), [])
            self._wait([e for e in routed if e not in uncached])
            for j, expert in enumerate(routed):
                if expert in self.resident:
                    scratch[j * self.stride : (j + 1) * self.stride].copy_(self._row(self.resident[expert]))
            wait(futures)
            for future in futures:
                future.result()
            weights = self.view_layout.views(scratch, count)
            ids = routing.renumber(top_k_index, mask, count)  # (tokens, k) renumbered, on the device
        self._bind(module, weights)
        num_experts = module.num_experts
        module.num_experts = weights[0].shape[0]
        try:
            return self.forward_impl(module, hidden_states, ids, top_k_weights)
        finally:
            module.num_experts = num_experts
            self._unbind(module)

    def _after(self, routed: list[int]) -> None:
        self.transfer.computed(self.free_event)


def routed_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`experts_implementation="offload_routed"`: the experts of an offloaded MoE layer, fetched as routed."""
    layer: _ExpertLayer | None = getattr(self, _LAYER_ATTR, None)
    if layer is None:
        raise RuntimeError(
            f"experts_implementation={IMPLEMENTATION!r} runs only on a model offloaded by hf_moe_offload "
            f"(enable_offload / load_offloaded with expert_fetch='routed')"
        )
    return layer.forward(self, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, routed_experts_forward)


def _backend(device: torch.device) -> type[_ExpertLayer]:
    """Virtual regions on the CPU device where pages can be dropped (Linux); compact rows elsewhere."""
    return _VirtualExperts if device.type == "cpu" and pages.supported() else _CompactExperts


EXPERT_CACHE_FREE_FRACTION = 0.5  # of the device memory free after the slots, when no expert_cache_bytes is given


def expert_cache_rows(strides: list[int], cache_size: int, num_experts: list[int], budget: int | None) -> int:
    """How many experts every MoE layer caches: `cache_size`, capped so that one row in each layer (`strides`: each
    layer's bytes per expert) times the rows fits `budget` bytes (None: no byte cap). Capping at a layer's own number
    of experts is the layer's business (`num_experts`, used only for the message)."""
    if budget is None or not strides:
        return cache_size
    per_row = sum(strides)
    rows = min(cache_size, budget // per_row)
    if rows < min(cache_size, min(num_experts)):
        logger.warning(
            f"the expert caches get {rows} of the {cache_size} experts per MoE layer asked for: {len(strides)} layers "
            f"x {rows} x {per_row / len(strides) / 2**20:.0f} MiB must fit the budget of {budget / 2**30:.2f} GiB "
            f"(OffloadConfig.expert_cache_bytes)"
        )
    return rows


def cache_budget(device: torch.device, configured: int | None) -> int | None:
    """The bytes all expert caches may take on `device`: `configured` (`OffloadConfig.expert_cache_bytes`), else on
    CUDA `EXPERT_CACHE_FREE_FRACTION` of the memory free now (after the slots), else (the CPU) no cap."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * EXPERT_CACHE_FREE_FRACTION)


class ExpertsRuntime:
    """The expert layers of one offloaded model, their routing policy and their shared staging buffers.

    Args:
        context: what the layers share (store, readers, transfer, stats, placeholders, cache size, ...).
        plans: the units' plans; each `ExpertLayout` of a plan becomes one layer.
        modules: the experts module of each layout (by its module name).
        implementations: the model's own experts implementation of each module (by name), run on the fetched
            experts.
        router_weights: a device copy of each layer's router weight (by experts module name), for speculation;
            None where the router is unknown.
        break_even: the fraction of a layer's experts above which a forward streams whole layers.
        group: the host (gloo) process group all ranks decide with, or None.
        codecs: a low-bit store's codecs (by the `id` of the stored plan): each layer's experts are dequantized
            from their packed bytes as they are fetched, and cached in full precision.
    """

    def __init__(
        self,
        context: ExpertsContext,
        plans: list[UnitPlan],
        modules: dict[str, nn.Module],
        implementations: dict[str, Callable],
        router_weights: dict[str, torch.Tensor | None],
        break_even: float,
        group=None,
        codecs: dict[int, PlanCodec] | None = None,
    ):
        cls = _backend(context.transfer.device)
        codecs = codecs or {}
        self.layers: list[_ExpertLayer] = []
        for plan in plans:
            codec = codecs.get(id(plan))
            for k, layout in enumerate(plan.experts):
                name = layout.group.module
                decoder = codec.experts[k] if codec is not None else None
                layer = cls(context, modules[name], plan, layout, implementations[name], decoder)
                layer.router_weight = router_weights.get(name)
                self.layers.append(layer)
        for layer, following in itertools.pairwise(self.layers):
            layer.next = following
        transfer = context.transfer
        if self.layers and transfer.cuda and not (context.store.in_memory and context.store.pinned):
            stride = max(layer.layout.stride for layer in self.layers)
            transfer.add_staging(context.io_threads, stride)
            context.stats.staging_bytes += context.io_threads * stride
        self.policy = RoutingPolicy(self.layers, break_even, group)
        for layer in self.layers:
            layer.policy = self.policy
            context.stats.expert_cache_bytes += layer.capacity * layer.view_layout.stride
            setattr(layer.module, _LAYER_ATTR, layer)

    def begin_forward(self, num_tokens: int | None) -> bool:
        return self.policy.begin_forward(num_tokens)

    def end_forward(self) -> None:
        self.policy.end_forward()

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
            if getattr(layer.module, _LAYER_ATTR, None) is layer:
                delattr(layer.module, _LAYER_ATTR)
