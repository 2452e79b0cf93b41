"""Several processes (2, gloo, CPU): expert parallelism with transformers' own engine, DDP, both launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ended, running

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM
from hf_moe_offload.training import stdlib_modules, train_bpe_tokenizer


pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, script: str | Path, *args: str, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Runs `script` on 2 CPU processes with `torchrun` or `accelerate launch`; returns the finished process."""
    path = tmp_path / "script.py"
    path.write_text(ended(script) if isinstance(script, str) else running(script))  # see helpers.SCRIPT_END
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    else:
        # `--multi_gpu` is accelerate's torchrun-based multi-process launcher; it runs CPU processes too (`--cpu`
        # means one process, or MPI across machines)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*command, str(path), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def assert_gpt_moe_checkpoint(path: Path) -> None:
    """Weights, config and exactly the two code files, with `auto_map` naming the GPT-MoE classes.

    (transformers saves a model sharded by its FSDP2 engine as the dynamic `FSDPGPTMoEForCausalLM`, copying torch's
    FSDP sources as its code: the model corrects that.)
    """
    assert {p.name for p in path.glob("*.py")} == {"configuration_gpt_moe.py", "modeling_gpt_moe.py"}
    assert (path / "model.safetensors").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gpt_moe.GPTMoEConfig",
        "AutoModelForCausalLM": "modeling_gpt_moe.GPTMoEForCausalLM",
    }
    assert config["architectures"] == ["GPTMoEForCausalLM"]


def test_ep_plan_shards_experts_and_matches_one_process(tmp_path):
    model = GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe", num_experts=4, num_experts_per_tok=2)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        reference = model(ids, labels=ids)
    torch.save({"ids": ids, "logits": reference.logits, "loss": reference.loss}, tmp_path / "reference.pt")
    script = f"""
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
        open("rank" + os.environ["RANK"] + ".ok", "w").close()
    """
    check(launch(tmp_path, script))
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


def test_tp_plan_matches_one_process_forward_and_gradients(tmp_path):
    # A dense block and an MoE block, every bias drawn non-zero: with transformers' `moe_tp_experts` each rank would
    # add the experts' down-projection bias once (logits off by ~0.06 here); GPT-MoE's own style adds it once.
    config = GPTMoEConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        num_experts=4, drop_tokens=False,
    )  # fmt: skip
    model = GPTMoEForCausalLM(config).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 64, (2, 7))
    out = model(ids, labels=ids)
    out.loss.backward()
    names = [n for n, _ in model.named_parameters() if "layers.1.mlp" in n or "layers.0.mlp" in n]
    grads = {n: p.grad for n, p in model.named_parameters() if n in names}
    reference = {"ids": ids, "logits": out.logits.detach(), "loss": out.loss.detach(), "grads": grads}
    torch.save(reference, tmp_path / "ref.pt")
    script = f"""
        import os
        import torch
        import hf_moe_offload  # noqa: F401
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, tp_plan="auto").train()
        reference = torch.load({str(tmp_path / "ref.pt")!r})
        experts = model.model.layers[1].mlp.experts
        assert tuple(experts.up_proj.to_local().shape) == (4, 24, 32), experts.up_proj.to_local().shape
        assert tuple(experts.up_proj_bias.to_local().shape) == (4, 24)
        assert tuple(experts.down_proj.to_local().shape) == (4, 32, 24)
        out = model(reference["ids"], labels=reference["ids"])
        # fp32 matmuls split over two ranks sum in another order
        torch.testing.assert_close(out.logits, reference["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, reference["loss"], rtol=1e-5, atol=1e-5)
        out.loss.backward()
        params = dict(model.named_parameters())
        for name, expected in reference["grads"].items():
            grad = params[name].grad
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)
        open("rank" + os.environ["RANK"] + ".ok", "w").close()
    """
    check(launch(tmp_path, script))
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


def test_ep_trainer_trains_and_its_checkpoint_loads_into_one_process(tmp_path):
    GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe", num_experts=4)).save_pretrained(tmp_path / "ckpt")
    script = f"""
        import torch
        import hf_moe_offload  # noqa: F401
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
        from transformers.distributed import DistributedConfig
        from hf_moe_offload.training import BlockDataset, add_router_metrics

        model = AutoModelForCausalLM.from_pretrained(
            {str(tmp_path / "ckpt")!r}, distributed_config=DistributedConfig(fsdp_size=2, ep_size=2)
        )
        torch.manual_seed(0)
        data = BlockDataset(torch.randint(0, 64, (32, 16)))
        args = TrainingArguments(
            output_dir="out", per_device_train_batch_size=4, max_steps=6, learning_rate=3e-3, logging_steps=3,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        add_router_metrics(trainer)
        trainer.train()
        model.eval()
        ids = torch.arange(24).view(2, 12)
        with torch.no_grad():
            logits = model(ids).logits
        trainer.save_model("saved")
        if trainer.is_world_process_zero():
            torch.save({{"ids": ids, "logits": logits, "log": trainer.state.log_history}}, "after.pt")
    """
    check(launch(tmp_path, script))
    after = torch.load(tmp_path / "after.pt")
    losses = [log["loss"] for log in after["log"] if "loss" in log]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert all("router/layer_1/load_cv" in log for log in after["log"] if "loss" in log)
    assert_gpt_moe_checkpoint(tmp_path / "saved")
    loaded = GPTMoEForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert loaded.model.layers[1].mlp.experts.up_proj.shape[0] == 4  # the whole layer, gathered from both ranks
    with torch.no_grad():
        logits = loaded(after["ids"]).logits
    torch.testing.assert_close(logits, after["logits"], rtol=1e-5, atol=1e-5)  # EP sums in another order


def test_experts_not_divisible_by_ep_size_is_a_clear_error(tmp_path):
    GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe", num_experts=3)).save_pretrained(tmp_path / "ckpt")
    script = f"""
        import os
        import hf_moe_offload  # noqa: F401
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        try:
            AutoModelForCausalLM.from_pretrained(
                {str(tmp_path / "ckpt")!r}, distributed_config=DistributedConfig(fsdp_size=2, ep_size=2)
            )
        except ValueError as error:
            open("error" + os.environ["RANK"] + ".txt", "w").write(str(error))
    """
    check(launch(tmp_path, script))
    message = (tmp_path / "error0.txt").read_text()
    assert "3" in message and "2" in message and "expert" in message, message


# -- data parallel: the router loss enters the step once whatever the process count -------------------------------


def test_ddp_trainer_counts_the_router_loss_once_per_step_over_processes(tmp_path):
    from trainer_helpers import (
        STEP_CONFIG,
        assert_sgd_step_is,
        naive_step_gradient,
        router_once,
        router_per_micro_batch,
    )

    model = GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe", **STEP_CONFIG))
    model.save_pretrained(tmp_path / "ckpt")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    script = f"""
        import os
        import torch
        from transformers import Trainer, TrainingArguments
        from hf_moe_offload import GPTMoEForCausalLM
        from hf_moe_offload.training import BlockDataset, add_router_metrics

        model = GPTMoEForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
        seen = []
        model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
        torch.manual_seed(0)
        args = TrainingArguments(
            output_dir="out", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
            optim="sgd", learning_rate=1.0, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo",
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(torch.randint(0, 512, (16, 16))))
        add_router_metrics(trainer)
        trainer.train()
        torch.save(
            {{"seen": seen, "state": model.state_dict(), "log": trainer.state.log_history}},
            "rank" + os.environ["RANK"] + ".pt",
        )
    """
    check(launch(tmp_path, script))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    micro_batches = ranks[0]["seen"] + ranks[1]["seen"]
    assert len(micro_batches) == 4 and not torch.equal(micro_batches[0], micro_batches[2])  # each rank its own data
    for rank in ranks:  # DDP: both processes hold the same weights after the step
        assert_sgd_step_is(initial, rank["state"], naive_step_gradient(initial, micro_batches, router_once))
    with pytest.raises(AssertionError):
        assert_sgd_step_is(
            initial, ranks[0]["state"], naive_step_gradient(initial, micro_batches, router_per_micro_batch)
        )
    # the routing metrics are reduced over the processes: both log the same numbers
    metrics = [{k: v for k, v in r["log"][0].items() if k.startswith("router/")} for r in ranks]
    assert metrics[0] and metrics[0] == metrics[1]


# -- the launch recipes of the README and examples/ -----------------------------------------------------------------


def tiny_checkpoint_with_tokenizer(path: Path) -> None:
    """A tiny random GPT-MoE plus a 512-token BPE tokenizer trained on the standard library's `json` package."""
    tokenizer = train_bpe_tokenizer(stdlib_modules(["json"])["json"], vocab_size=512)
    tokenizer.save_pretrained(path)
    config = GPTMoEConfig.from_preset(
        "tiny-moe", num_experts=4, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id
    )
    GPTMoEForCausalLM(config).save_pretrained(path)


@pytest.mark.parametrize(
    ("launcher", "ep_size"),
    [("torchrun", "2"), ("accelerate", "2"), ("accelerate", "1")],
    ids=["torchrun-ep", "accelerate-ep", "accelerate-ddp"],
)
def test_finetune_example_runs_under_both_launchers(tmp_path, launcher, ep_size):
    tiny_checkpoint_with_tokenizer(tmp_path / "ckpt")
    args = ["--model", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out"), "--ep-size", ep_size]
    args += ["--modules", "json", "--block-size", "64", "--batch-size", "2", "--max-steps", "4", "--logging-steps", "2"]
    check(launch(tmp_path, REPO / "examples" / "finetune_gpt_moe.py", *args, launcher=launcher))
    saved = tmp_path / "out"
    assert_gpt_moe_checkpoint(saved)
    assert (saved / "tokenizer.json").exists()
    tuned = GPTMoEForCausalLM.from_pretrained(saved)
    original = GPTMoEForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert not torch.equal(tuned.model.layers[1].mlp.experts.up_proj, original.model.layers[1].mlp.experts.up_proj)
    assert json.loads((saved / "config.json").read_text())["num_experts"] == 4
