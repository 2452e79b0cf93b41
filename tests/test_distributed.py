"""The declared expert-parallel plan works with transformers' own distributed engine (2 processes, gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM


@pytest.mark.distributed
def test_ep_plan_shards_experts_and_matches_one_process(tmp_path):
    torch.manual_seed(0)
    model = GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe", num_experts=4, num_experts_per_tok=2)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        reference = model(ids, labels=ids)
    torch.save({"ids": ids, "logits": reference.logits, "loss": reference.loss}, tmp_path / "reference.pt")
    script = tmp_path / "ep_forward.py"
    script.write_text(
        textwrap.dedent(
            f"""
        import os
        import torch
        import hf_moe_offload  # noqa: F401
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(
            {str(tmp_path / "ckpt")!r}, distributed_config=DistributedConfig(fsdp_size=2, ep_size=2)
        ).eval()
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        with torch.no_grad():
            out = model(reference["ids"], labels=reference["ids"])
        experts = model.model.layers[1].mlp.experts
        local = experts.up_proj.to_local() if hasattr(experts.up_proj, "to_local") else experts.up_proj
        assert tuple(local.shape) == (2, 128, 64), local.shape
        torch.testing.assert_close(out.logits, reference["logits"], rtol=1e-5, atol=1e-5)  # reduction order
        torch.testing.assert_close(out.loss, reference["loss"], rtol=1e-5, atol=1e-5)
        open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".ok"), "w").close()
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
