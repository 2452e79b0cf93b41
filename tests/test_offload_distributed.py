"""ZeRO-Inference's multi-process fetch: each process reads 1/N of a unit and an all-gather assembles it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import nvme_path, prompts, tiny_model


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_two_processes_split_each_read_and_generate_the_same_tokens(kind, tmp_path):
    model = tiny_model("gpt_moe")
    model.save_pretrained(tmp_path / "ckpt")
    ids = prompts()
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.save({"ids": ids, "tokens": tokens}, tmp_path / "reference.pt")
    script = tmp_path / "offload_generate.py"
    script.write_text(
        textwrap.dedent(
            f"""
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
        dist.destroy_process_group()
        """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()
