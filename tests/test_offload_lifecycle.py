"""An offloaded model's life: what a failed forward leaves, what garbage collection releases, the scoped form, when the
execution device is decided, and statistics that add up."""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time

import pytest
import torch
from helpers import prompts, reference, store_config, tiny_model

from hf_moe_offload import OffloadConfig, OffloadStats, enable_offload, get_offload_stats, offloaded


def runtime_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("hf_moe_offload-")}


def open_store_files(folder) -> int:
    folder = str(folder)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(folder)
        except OSError:
            pass
    return count


def test_units_bound_by_a_forward_that_raised_are_released_in_that_call(tmp_path, offloaded):
    model = offloaded(tiny_model("llama"), store_config("nvme", tmp_path, 1))
    runtime = model._hf_moe_offload_state

    def fail(module, args):
        assert list(runtime.binding.bound) == [2]  # block 1 (unit 2, after the embedding) is bound while it runs
        raise RuntimeError("injected")

    handle = model.model.layers[1].mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="injected"), torch.no_grad():
        model(prompts())
    handle.remove()
    assert runtime.binding.bound == {}  # released by the failed call itself, not by the next forward
    assert not any(slot.bound for slot in runtime.pipeline.slots)
    assert torch.isnan(model.model.layers[0].mlp.up_proj.weight).all()  # placeholders again
    assert torch.equal(model.generate(prompts(), max_new_tokens=6, do_sample=False), reference("llama")[1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_a_model_garbage_collected_while_offloaded_releases_its_threads_and_files(tmp_path):
    before = runtime_threads()
    model = tiny_model("gpt_moe")
    enable_offload(model, store_config("nvme", tmp_path, 1))
    model.generate(prompts(), max_new_tokens=2, do_sample=False)
    assert runtime_threads() - before and open_store_files(tmp_path / "store") > 0
    del model
    gc.collect()
    deadline = time.monotonic() + 30  # the finalizer hands the closing to a thread of its own
    while (runtime_threads() - before or open_store_files(tmp_path / "store")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime_threads() - before == set()  # the reader and coordinator threads are stopped
    assert open_store_files(tmp_path / "store") == 0  # and the store's files closed


def test_a_model_collected_while_another_allocates_inside_a_thread_pool_lock_does_not_deadlock(tmp_path):
    """The garbage collector may run a finalizer inside `ThreadPoolExecutor.submit`, which holds a lock the closing
    of a pipeline needs: closing there would deadlock, so finalizers only queue the work."""
    model = tiny_model("gpt_moe")
    enable_offload(model, store_config("nvme", tmp_path, 1))
    model.generate(prompts(), max_new_tokens=2, do_sample=False)
    finalizer = model._hf_moe_offload_state._finalizer
    from concurrent.futures import thread as futures_thread

    done = threading.Event()

    def collect_inside_the_lock():
        with futures_thread._global_shutdown_lock:  # where the collector ran in the deadlock this test reproduces
            finalizer()
        done.set()

    worker = threading.Thread(target=collect_inside_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done.is_set(), "the finalizer blocked inside the thread pool's lock"


def test_offloaded_context_puts_the_weights_back_even_when_the_block_raises(tmp_path):
    model = tiny_model("gpt2")
    weight = model.transformer.h[0].mlp.c_fc.weight
    value = weight.detach().clone()
    with offloaded(model, store_config("cpu", tmp_path, 1)) as inside:
        assert inside is model and torch.isnan(model.transformer.h[0].mlp.c_fc.weight).all()
        tokens = model.generate(prompts(), max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, reference("gpt2")[1])
    assert model.transformer.h[0].mlp.c_fc.weight is weight and torch.equal(weight, value)
    with pytest.raises(KeyError), offloaded(model, store_config("cpu", tmp_path, 1)):
        raise KeyError("in the block")
    assert getattr(model, "_hf_moe_offload_state", None) is None and torch.equal(weight, value)


def test_the_execution_device_is_decided_when_offloading_starts(tmp_path, monkeypatch):
    def probed():
        raise AssertionError("the config asked torch which devices exist")

    monkeypatch.setattr(torch.cuda, "is_available", probed)
    monkeypatch.setattr(torch.cuda, "current_device", probed)
    config = OffloadConfig(execution_device=None)  # nothing is probed at construction
    assert config.execution_device is None
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)  # (only how torch was built is checked)
    assert OffloadConfig(execution_device="cuda").execution_device == torch.device("cuda")  # an index comes later
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = enable_offload(tiny_model("gpt2"), config)
    assert model.device == torch.device("cpu")


def test_offload_stats_add_counters_and_keep_the_largest_gauges(tmp_path, offloaded):
    model = offloaded(tiny_model("gpt_moe"), store_config("nvme-copy", tmp_path, 1, expert_break_even=1.0))
    model.generate(prompts(), max_new_tokens=3, do_sample=False)
    first = get_offload_stats(model, reset=True)
    model.generate(prompts(), max_new_tokens=3, do_sample=False)
    second = get_offload_stats(model)
    total = first + second
    assert sum([first, second]) == total
    for field in dataclasses.fields(OffloadStats):
        a, b, summed = getattr(first, field.name), getattr(second, field.name), getattr(total, field.name)
        if field.metadata.get("kind") in ("gauge", "peak"):
            assert summed == max(a, b), field.name
        elif isinstance(a, dict):
            assert summed == {key: a.get(key, 0) + b.get(key, 0) for key in a.keys() | b.keys()}, field.name
        else:
            assert summed == a + b, field.name
    assert total.expert_hit_rate == pytest.approx(
        total.expert_cache_hits / (total.expert_cache_hits + total.expert_cache_misses)
    )
    # a reset zeroes counters and peaks, keeps the memory held (gauges)
    assert second.slot_bytes == first.slot_bytes > 0  # a gauge survives the reset
    assert first.forward_passes == second.forward_passes == 3  # a counter restarts from zero
