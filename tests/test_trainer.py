"""`Trainer` trains GPT-MoE unchanged; the router-loss term is counted once per optimizer step."""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainingArguments

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_gradient_accumulation_trains_and_checkpoints_the_code(tmp_path):
    torch.manual_seed(0)
    model = GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe", router_z_loss_coef=0.001))
    data = _Rows(torch.randint(0, 64, (16, 16)))  # a small vocabulary slice: learnable in a few steps
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    assert trainer.model_accepts_loss_kwargs  # num_items_in_batch reaches forward, so the CE is token-weighted
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and losses[-1] < losses[0]
    checkpoint = tmp_path / "checkpoint-6"
    assert {"configuration_gpt_moe.py", "modeling_gpt_moe.py", "model.safetensors"} <= set(os.listdir(checkpoint))


def test_router_loss_over_accumulated_micro_batches_adds_up_to_one_weighted_mean():
    torch.manual_seed(0)
    model = GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe", router_aux_loss_coef=1.0)).eval()  # no RTS
    micro_batches = [torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (3, 8))]
    total_items = sum(int(ids[:, 1:].numel()) for ids in micro_batches)
    accumulated = 0.0
    expected_router = 0.0
    for ids in micro_batches:  # what Trainer does: sum of the micro-batch losses, each given num_items_in_batch
        out = model(ids, labels=ids, num_items_in_batch=torch.tensor(total_items))
        accumulated = accumulated + out.loss
        expected_router = expected_router + out.aux_loss * ids[:, 1:].numel() / total_items
    ce = (
        sum(
            torch.nn.functional.cross_entropy(
                model(ids).logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1), reduction="sum"
            )
            for ids in micro_batches
        )
        / total_items
    )
    torch.testing.assert_close(accumulated, ce + expected_router)
    # the router term's weights sum to 1: it enters the step once, not once per micro-batch
    assert sum(ids[:, 1:].numel() / total_items for ids in micro_batches) == 1.0
