"""The CUDA path's host-side bookkeeping, tested without CUDA: exact page-locked sizes (the registration call is a
fake) and everything pinned given back, 256-byte alignment in the store, one host transfer per routed MoE call
(syncing ops counted on the CPU through the same functions), misses read before anything else queued."""

from __future__ import annotations

import pytest
import torch
import torch.utils._python_dispatch
from helpers import prompts, tiny_model

from hf_moe_offload import OffloadConfig, disable_offload, enable_offload, get_offload_stats
from hf_moe_offload.offload import experts as experts_module
from hf_moe_offload.offload import routing
from hf_moe_offload.offload.layout import assemble
from hf_moe_offload.offload.runtime import OffloadRuntime
from hf_moe_offload.offload.store import CpuStore
from hf_moe_offload.offload.transfer import PinnedHost


class FakeCudart:
    """Records what would be page-locked (`cudaHostRegister` / `cudaHostUnregister`)."""

    def __init__(self):
        self.registered: dict[int, int] = {}
        self.requested: list[int] = []

    def cudaHostRegister(self, pointer, nbytes, flags):
        assert pointer not in self.registered and pointer % 4096 == 0
        self.registered[pointer] = nbytes
        self.requested.append(nbytes)
        return 0

    def cudaHostUnregister(self, pointer):
        del self.registered[pointer]
        return 0


def test_pinned_buffers_are_exactly_the_size_asked_and_all_given_back():
    cudart = FakeCudart()
    pinned = PinnedHost(cudart)
    sizes = [2_900_000_000 // 1000, 4096 + 1, 12345]  # not powers of two: torch's pinned allocator would round them
    buffers = [pinned.buffer(n) for n in sizes]
    assert cudart.requested == sizes and [b.numel() for b in buffers] == sizes
    assert pinned.pinned_bytes == sum(sizes)
    pinned.close()
    assert cudart.registered == {} and pinned.pinned_bytes == 0


def test_the_cpu_store_pins_exactly_its_units_bytes():
    model = tiny_model("gpt_moe")
    runtime = OffloadRuntime(model, OffloadConfig(), torch.device("cpu"))
    cudart = FakeCudart()
    pinned = PinnedHost(cudart)
    store = CpuStore(runtime.plans, runtime.source, pinned.buffer, pinned=True, progress=False)
    expected = [plan.own_nbytes for plan in runtime.plans if plan.own_nbytes]
    assert cudart.requested == expected  # one exact arena per unit, nothing rounded up
    for plan in runtime.plans:  # and they hold the weights
        for name, tensor in assemble(plan, store.tensors(plan)):
            assert torch.equal(tensor, runtime.binding.originals[name].detach())
    pinned.close()
    assert cudart.registered == {}


def test_tensors_in_the_store_are_256_byte_aligned_for_a_cuda_device():
    from hf_moe_offload.offload.layout import (
        CUDA_TENSOR_ALIGN,
        ExpertGroup,
        TensorSpec,
        checkpoint_plans,
        plan_units,
    )
    from hf_moe_offload.offload.runtime import tensor_alignment

    assert tensor_alignment(torch.device("cuda", 0)) == CUDA_TENSOR_ALIGN
    assert tensor_alignment(torch.device("cpu")) == 64  # the CPU keeps each weight's in-memory residue (MKL)
    # odd sizes (bf16 norms of 33 elements, a 3 x 5 bias) would put the next tensor off any boundary
    dense = [TensorSpec("b.norm", torch.bfloat16, (33,)), TensorSpec("b.bias", torch.float32, (3, 5)),
             TensorSpec("b.w", torch.bfloat16, (7, 9))]  # fmt: skip
    experts = ExpertGroup("b.experts", (TensorSpec("b.experts.up", torch.bfloat16, (4, 6, 11)),
                                        TensorSpec("b.experts.down", torch.bfloat16, (4, 11, 3))))  # fmt: skip
    residues = {"b.norm": 8, "b.bias": 40, "b.w": 2}  # ignored on CUDA: the runtime passes none
    plans = plan_units([("embed", [TensorSpec("e", torch.float32, (5, 3))]), ("b", dense)], {1: [experts]},
                       {}, CUDA_TENSOR_ALIGN)  # fmt: skip
    offsets = [offset for plan in plans for _, offset in plan.tensors]
    offsets += [lay.offset + start for plan in plans for lay in plan.experts for start in lay.param_offsets]
    offsets += [lay.stride for plan in plans for lay in plan.experts]
    assert all(offset % CUDA_TENSOR_ALIGN == 0 for offset in offsets), offsets
    cpu = plan_units([("b", dense)], None, residues)
    assert [offset % 64 for _, offset in cpu[0].tensors] == [40, 8, 2]  # the CPU: residues kept (fp32 packed first)
    # the checkpoint's own shards read in place land aligned too, whatever their offsets in the file
    located = {spec.name: ("shard", 8 + 4 * i) for i, spec in enumerate(dense)}
    in_place = checkpoint_plans(plan_units([("b", dense)], None, {}, CUDA_TENSOR_ALIGN), located, CUDA_TENSOR_ALIGN)
    assert all(offset % CUDA_TENSOR_ALIGN == 0 for _, offset in in_place[0].tensors)


# -- item 3: the per-call bookkeeping of a routed MoE layer stays on the device, one host transfer per call -----------

# Ops that make a CUDA host wait for the device: a value read by the host (`.item()`, `bool(tensor)`) or an output
# whose size depends on the data.
SYNCING_OPS = {
    "_local_scalar_dense", "is_nonzero", "item", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "nonzero", "bincount", "masked_select", "repeat_interleave", "histc",
}  # fmt: skip


class CountSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the syncing ops run while `active` (on the CPU they are harmless; on CUDA each one is a host wait)."""

    def __init__(self):
        super().__init__()
        self.active = True
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func.overloadpacket.__name__ in SYNCING_OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def paused(counter: CountSyncs, fn):
    """`fn` with `counter` not counting: the model's own experts implementation (what runs in memory too) and the
    one transfer itself."""

    def run(*args, **kwargs):
        counter.active = False
        try:
            return fn(*args, **kwargs)
        finally:
            counter.active = True

    return run


@pytest.mark.parametrize("speculate", [True, False])
@pytest.mark.parametrize("cache", [0, 2, 8])  # none, partial (several routed: gather + renumber), the whole layer
def test_a_routed_moe_call_reads_the_device_once(cache, speculate, tmp_path, monkeypatch):
    from hf_moe_offload.offload.api import runtime_of

    monkeypatch.setattr(experts_module, "_backend", lambda device: experts_module._CompactExperts)  # CUDA's backend
    model = tiny_model("mixtral")  # top-2 of 8 experts, 2 MoE layers
    config = OffloadConfig(expert_cache_size=cache, speculative_prefetch=speculate, expert_break_even=1.0)
    enable_offload(model, config)
    counter = CountSyncs()
    transfers = []
    real_to_host = routing.to_host

    def counted_to_host(parts):
        transfers.append(len(parts))
        return real_to_host(parts)

    monkeypatch.setattr(routing, "to_host", paused(counter, counted_to_host))
    calls = 0
    for layer in runtime_of(model).expert_layers:
        real_forward = layer.forward

        def forward(*args, real_forward=real_forward):
            nonlocal calls
            calls += 1
            with counter:
                return real_forward(*args)

        layer.forward = forward
        layer.forward_impl = paused(counter, layer.forward_impl)
    model.generate(prompts(), max_new_tokens=4, do_sample=False)
    disable_offload(model)
    assert calls > 0 and len(transfers) == calls  # one transfer per call of a routed layer
    assert counter.seen == []  # and nothing else the host waits for
    if speculate and cache:  # the next layer's guess travels in the same transfer
        assert 2 in transfers


def test_the_device_bookkeeping_equals_the_naive_one():
    torch.manual_seed(0)
    num_experts = 8
    for _ in range(20):
        top_k_index = torch.randint(0, num_experts, (int(torch.randint(1, 9, ())), 2))
        top_k_index[0, 0] = num_experts  # an expert-parallel sentinel: no expert
        mask = routing.routed_mask(top_k_index, num_experts)
        routed = sorted({e for e in top_k_index.reshape(-1).tolist() if 0 <= e < num_experts})  # naive
        assert [e for e, used in enumerate(mask.tolist()) if used] == routed
        lookup = {e: j for j, e in enumerate(routed)}
        naive = [[lookup.get(min(max(e, 0), num_experts), len(routed)) for e in row] for row in top_k_index.tolist()]
        assert routing.renumber(top_k_index, mask, len(routed)).tolist() == naive
        hidden, weight = torch.randn(5, 16), torch.randn(num_experts, 16)
        votes = torch.bincount(hidden.matmul(weight.t()).topk(2, dim=-1).indices.reshape(-1), minlength=num_experts)
        ranked = sorted(range(num_experts), key=lambda e: (-votes[e].item(), e))[:3]  # most votes, ties by id
        assert routing.speculation_votes(hidden, weight, 2, 3).tolist() == ranked + [votes[e].item() for e in ranked]
    assert routing.to_host([torch.tensor([1, 2]), torch.tensor([3])]) == [[1, 2], [3]]


# -- item 7: misses first ----------------------------------------------------------------------------------------------


def test_readers_run_the_most_urgent_read_first_and_fifo_within_a_priority():
    import threading

    from hf_moe_offload.offload.readers import PREFETCH, SPECULATIVE, URGENT, PriorityReaders

    readers = PriorityReaders(1)
    gate, ran = threading.Event(), []
    readers.submit(gate.wait)  # the one thread is busy: everything below queues
    futures = [readers.submit_at(p, ran.append, name) for p, name in
               [(SPECULATIVE, "guess"), (PREFETCH, "unit-a"), (URGENT, "miss-1"), (PREFETCH, "unit-b"),
                (URGENT, "miss-2")]]  # fmt: skip
    failing = readers.submit_at(URGENT, lambda: 1 / 0)
    gate.set()
    for future in futures:
        future.result(timeout=10)
    assert ran == ["miss-1", "miss-2", "unit-a", "unit-b", "guess"]
    with pytest.raises(ZeroDivisionError):  # a read's error reaches whoever waits on it
        failing.result(timeout=10)
    readers.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        readers.submit(ran.append, "late")


@pytest.mark.parametrize("backend", ["virtual", "compact"])
def test_misses_are_read_urgently_and_before_the_next_layers_guesses(backend, monkeypatch):
    from hf_moe_offload.offload.api import runtime_of
    from hf_moe_offload.offload.readers import PREFETCH, SPECULATIVE, URGENT, PriorityReaders

    if backend == "compact":
        monkeypatch.setattr(experts_module, "_backend", lambda device: experts_module._CompactExperts)
    submitted = []  # (call, priority, the expert layer whose read it is, or None)
    call = [0]
    real_submit_at = PriorityReaders.submit_at

    def recording(self, priority, fn, *args, **kwargs):
        submitted.append((call[0], priority, getattr(fn, "__self__", None)))
        return real_submit_at(self, priority, fn, *args, **kwargs)

    monkeypatch.setattr(PriorityReaders, "submit_at", recording)
    model = tiny_model("mixtral")
    # a cache of 2 with top-2 routing over 2 prompts: misses, uncached experts and guesses in most calls
    enable_offload(model, OffloadConfig(expert_cache_size=2, speculative_prefetch=True, expert_break_even=1.0))
    layers = runtime_of(model).expert_layers
    for layer in layers:
        real_forward = layer.forward

        def forward(*args, real_forward=real_forward):
            call[0] += 1
            try:
                return real_forward(*args)
            finally:
                call[0] += 1

        layer.forward = forward
    submitted.clear()
    model.generate(prompts(), max_new_tokens=4, do_sample=False)
    stats = get_offload_stats(model)
    disable_offload(model)
    assert stats.expert_cache_misses > 0 and stats.speculative_fetches > 0
    experts = [(c, p) for c, p, owner in submitted if owner in layers]
    assert {p for _, p in experts} == {URGENT, SPECULATIVE}  # no expert read at the units' priority
    assert sum(p == URGENT for _, p in experts) >= stats.expert_cache_misses
    assert sum(p == SPECULATIVE for _, p in experts) == stats.speculative_fetches
    assert all(p == PREFETCH for _, p, owner in submitted if owner not in layers)  # the units' chunks
    for c in {c for c, _ in experts}:  # within a call: every miss of the layer queued before any guess
        priorities = [p for k, p in experts if k == c]
        assert priorities == sorted(priorities), priorities
