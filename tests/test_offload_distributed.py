"""ZeRO-Inference's multi-process fetch: each process reads 1/N of a unit and an all-gather assembles it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import ended, nvme_path, prompts, tiny_model


def torchrun(script: str, tmp_path, timeout: int, name: str) -> subprocess.CompletedProcess:
    """The source `script`, written to `tmp_path / name` with `helpers.SCRIPT_END` after it, in 2 gloo processes
    (torchrun, standalone), one thread each, offline."""
    path = tmp_path / name
    path.write_text(ended(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_two_processes_split_each_read_and_generate_the_same_tokens(kind, tmp_path):
    model = tiny_model("gpt_moe")
    model.save_pretrained(tmp_path / "ckpt")
    ids = prompts()
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.save({"ids": ids, "tokens": tokens}, tmp_path / "reference.pt")
    script = f"""
        import os
        import torch
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM
        from hf_moe_offload import OffloadConfig, enable_offload, get_offload_stats

        dist.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}).eval()
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        config = OffloadConfig(offload_device={kind!r}, nvme_path={nvme_path(kind, tmp_path)!r}, prefetch_depth=2)
        enable_offload(model, config)
        tokens = model.generate(reference["ids"], max_new_tokens=6, do_sample=False)
        assert torch.equal(tokens, reference["tokens"]), (tokens, reference["tokens"])
        stats = get_offload_stats(model)
        read = stats.store_read_bytes[{kind!r}]
        # each process read about half of what landed in its slots (shares are 4 KiB aligned)
        assert 0.3 * stats.bytes_fetched < read < 0.7 * stats.bytes_fetched, (read, stats.bytes_fetched)
        open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".ok"), "w").close()
        """
    result = torchrun(script, tmp_path, timeout=600, name="offload_generate.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


@pytest.mark.distributed
def test_each_rank_stages_and_copies_only_its_share(tmp_path):
    """The staging path of a CUDA device (read into a host staging buffer, copy to the device slot, all-gather there),
    run on the CPU: each rank's staging buffers hold its share, and it copies its share only."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    ids = prompts()
    torch.save({"ids": ids, "tokens": model.generate(ids, max_new_tokens=6, do_sample=False)}, tmp_path / "ref.pt")
    script = f"""
        import os
        import torch
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM
        from hf_moe_offload import OffloadConfig, enable_offload, get_offload_stats
        from hf_moe_offload.offload.transfer import Transfer

        Transfer.stages = property(lambda self: True)  # the CUDA device's staging path, on the CPU
        dist.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}).eval()
        reference = torch.load({str(tmp_path / "ref.pt")!r})
        enable_offload(model, OffloadConfig(offload_device="cpu", prefetch_depth=1))
        tokens = model.generate(reference["ids"], max_new_tokens=6, do_sample=False)
        assert torch.equal(tokens, reference["tokens"]), (tokens, reference["tokens"])
        stats = get_offload_stats(model)
        # held: a staging buffer per slot of this rank's share of the largest unit, half the slots' bytes
        assert stats.staging_bytes > 0 and 2 * stats.staging_bytes == stats.slot_bytes, stats
        # copied: its share of every unit (shares are 4 KiB aligned), not the whole unit
        assert 0.3 * stats.bytes_fetched < stats.host_to_device_bytes < 0.7 * stats.bytes_fetched, stats
        open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".ok"), "w").close()
        """
    result = torchrun(script, tmp_path, timeout=600, name="shares.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


FAILING_RANK = """
import os, sys, time
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from hf_moe_offload import OffloadConfig, enable_offload
from hf_moe_offload.offload import store as store_module

dist.init_process_group("gloo")
rank = dist.get_rank()
model = AutoModelForCausalLM.from_pretrained({ckpt!r}).eval()
config = OffloadConfig(offload_device="nvme", nvme_path={store!r}, prefetch_depth=1)
where = {where!r}
if where == "open" and rank == 0:
    class Refused(store_module.NvmeStore):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("injected: rank 0 cannot open the store")
    store_module.NvmeStore = Refused
start = time.monotonic()
try:
    enable_offload(model, config)
    if where == "read" and rank == 1:
        def broken(*args, **kwargs):
            raise RuntimeError("injected: rank 1 cannot read")
        model._hf_moe_offload_state.store.read = broken
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    message = "no error"
except RuntimeError as err:
    message = str(err)
with open(os.path.join({out!r}, f"rank{{rank}}.txt"), "w") as f:
    f.write(f"{{time.monotonic() - start:.1f}} {{message}}")
"""


@pytest.mark.distributed
@pytest.mark.parametrize("where", ["open", "read"])
def test_one_rank_failing_raises_on_every_rank_without_a_hang(where, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    fields = {"ckpt": str(tmp_path / "ckpt"), "store": str(tmp_path / "store"), "where": where, "out": str(tmp_path)}
    # a hang would end in the timeout (gloo's own is 30 minutes)
    result = torchrun(FAILING_RANK.format(**fields), tmp_path, timeout=240, name="failing_rank.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    failing = 0 if where == "open" else 1
    messages = {rank: (tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)}
    assert "injected" in messages[failing], messages
    other = messages[1 - failing]
    assert f"failed on rank {failing} (its own error says why); this rank stops too" in other, messages
    assert float(other.split()[0]) < 60, messages  # within seconds, not a backend timeout


def test_the_execution_device_under_torchrun_is_the_local_ranks_gpu(monkeypatch):
    from hf_moe_offload import OffloadConfig
    from hf_moe_offload.offload.config import resolve_execution_device

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_execution_device(OffloadConfig()) == torch.device("cuda", 2)
    assert resolve_execution_device(OffloadConfig(execution_device="cuda")) == torch.device("cuda", 2)
    assert resolve_execution_device(OffloadConfig(execution_device="cuda:1")) == torch.device("cuda", 1)  # explicit
    monkeypatch.setenv("LOCAL_RANK", "7")
    with pytest.raises(ValueError, match=r"LOCAL_RANK \(7\) names no CUDA device: this machine has 4"):
        resolve_execution_device(OffloadConfig())
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_execution_device(OffloadConfig()) == torch.device("cuda", 0)
