"""The CUDA path's host-side bookkeeping, tested without CUDA: exact page-locked sizes (the registration call is a
fake), and that everything pinned is given back."""

from __future__ import annotations

import torch
from helpers import tiny_model

from hf_moe_offload import OffloadConfig
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
