"""`Trainer` trains GPT-MoE unchanged: the router-loss term once per optimizer step, resume, bf16, routing metrics."""

from __future__ import annotations

import os
import statistics

import pytest
import torch
import torch.nn.functional as F
from trainer_helpers import (
    STEP_CONFIG,
    VOCAB,
    assert_sgd_step_is,
    naive_step_gradient,
    record_micro_batches,
    router_once,
    router_per_micro_batch,
    tiny_moe,
)
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM
from hf_moe_offload.training import BlockDataset, RouterMetricsCallback, add_router_metrics


def train_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**defaults, **overrides})


def logged(trainer: Trainer, key: str) -> list[float]:
    return [log[key] for log in trainer.state.log_history if key in log]


def test_trainer_with_gradient_accumulation_trains_and_checkpoints_the_code(tmp_path):
    model = tiny_moe(router_z_loss_coef=0.001)
    data = BlockDataset(torch.randint(0, 64, (16, 16)))  # a small vocabulary slice: learnable in a few steps
    args = train_args(tmp_path, gradient_accumulation_steps=2, save_strategy="steps", save_steps=6)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    assert trainer.model_accepts_loss_kwargs  # num_items_in_batch reaches forward, so the CE is token-weighted
    trainer.train()
    losses = logged(trainer, "loss")
    assert len(losses) == 6 and losses[-1] < losses[0]
    checkpoint = tmp_path / "checkpoint-6"
    assert {"configuration_gpt_moe.py", "modeling_gpt_moe.py", "model.safetensors"} <= set(os.listdir(checkpoint))


def test_router_loss_over_accumulated_micro_batches_adds_up_to_one_weighted_mean():
    model = tiny_moe(router_aux_loss_coef=1.0).eval()  # no RTS
    micro_batches = [torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (3, 8))]
    total_items = sum(int(ids[:, 1:].numel()) for ids in micro_batches)
    accumulated = 0.0
    expected_router = 0.0
    for ids in micro_batches:  # what Trainer does: sum of the micro-batch losses, each given num_items_in_batch
        out = model(ids, labels=ids, num_items_in_batch=torch.tensor(total_items))
        accumulated = accumulated + out.loss
        expected_router = expected_router + out.aux_loss * ids[:, 1:].numel() / total_items
    ce = (
        sum(
            F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
            for ids in micro_batches
        )
        / total_items
    )
    torch.testing.assert_close(accumulated, ce + expected_router)
    # the router term's weights sum to 1: it enters the step once, not once per micro-batch
    assert sum(ids[:, 1:].numel() / total_items for ids in micro_batches) == 1.0


# -- the router loss enters each optimizer step once: Trainer's real update against a naive objective ----------------

# Plain SGD with lr 1 and no clipping: the update of one optimizer step is exactly minus the step's gradient.
SGD_STEP = {
    "optim": "sgd",
    "learning_rate": 1.0,
    "weight_decay": 0.0,
    "lr_scheduler_type": "constant",
    "max_grad_norm": 0.0,
    "max_steps": 1,
}


def test_router_loss_enters_each_optimizer_step_once_under_gradient_accumulation(tmp_path):
    model = tiny_moe(**STEP_CONFIG)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    seen = record_micro_batches(model)
    args = train_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=3, **SGD_STEP)
    Trainer(model=model, args=args, train_dataset=BlockDataset(torch.randint(0, VOCAB, (12, 16)))).train()
    assert len(seen) == 3
    updated = model.state_dict()
    assert_sgd_step_is(initial, updated, naive_step_gradient(initial, seen, router_once))
    with pytest.raises(AssertionError):  # the test can tell: counted once per micro-batch, the step differs
        assert_sgd_step_is(initial, updated, naive_step_gradient(initial, seen, router_per_micro_batch))


# -- checkpoint and resume -----------------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Stops training after `step` (a crash, as far as the run is concerned)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path):
    data = BlockDataset(torch.randint(0, 64, (32, 16)))

    def run(output_dir, callbacks=(), resume=None):
        torch.manual_seed(1)
        model = tiny_moe(capacity_factor=1.0, noisy_gate_policy="jitter")  # random drops, noisy router: RNG matters
        args = train_args(output_dir, max_steps=8, gradient_accumulation_steps=2, save_strategy="steps", save_steps=4)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    uninterrupted, full_model = run(tmp_path / "full")
    stopped, _ = run(tmp_path / "stopped", callbacks=[StopAt(4)])
    assert stopped.state.global_step == 4
    resumed, resumed_model = run(tmp_path / "stopped", resume=str(tmp_path / "stopped" / "checkpoint-4"))
    assert logged(stopped, "loss") == logged(uninterrupted, "loss")[:4]
    assert logged(resumed, "loss") == logged(uninterrupted, "loss")  # steps 1-4 from the checkpoint's history
    for (name, full), resumed_param in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(full, resumed_param), name


# -- precision and memory options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["bf16", "fp16", "activation_checkpointing"])
def test_trainer_trains_with_mixed_precision_and_activation_checkpointing_on_the_cpu(tmp_path, option):
    model = tiny_moe()
    trainer = Trainer(
        model=model,
        args=train_args(tmp_path, **{option: True}),
        train_dataset=BlockDataset(torch.randint(0, 64, (16, 16))),
    )
    trainer.train()
    losses = logged(trainer, "loss")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert model.dtype == torch.float32  # autocast: the weights stay fp32
    if option == "activation_checkpointing":
        assert model.is_activation_checkpointing


# -- routing metrics -----------------------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_router_metrics_are_logged_per_layer_and_match_the_model_outputs(tmp_path):
    model = tiny_moe(capacity_factor=1.0)
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append(output) if module.training else None)
    reporter = Recorder()  # stands for TensorBoard & co.: a callback registered before the metrics
    args = train_args(tmp_path, logging_steps=2, max_steps=4, eval_strategy="steps", eval_steps=2)
    data = BlockDataset(torch.randint(0, VOCAB, (16, 32)))
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[reporter])
    callback = add_router_metrics(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 2 and len(outputs) == 4  # evaluation forwards are not counted
    layers = model.config.moe_layer_indices
    assert layers == [1, 3]
    for log, window in zip(train_logs, (outputs[:2], outputs[2:])):
        for position, layer in enumerate(layers):
            aux = statistics.fmean(
                float(o.layer_aux_losses[position].detach()) for o in window
            )  # equal-size micro-batches
            z = statistics.fmean(float(o.layer_z_losses[position].detach()) for o in window)
            dropped = statistics.fmean(float(o.dropped_token_fraction[position].detach()) for o in window)
            counts = [sum(int(o.expert_token_counts[position][e]) for o in window) for e in range(8)]
            load_cv = statistics.pstdev(counts) / statistics.fmean(counts)
            assert log[f"router/layer_{layer}/aux_loss"] == pytest.approx(aux, rel=1e-6)
            assert log[f"router/layer_{layer}/z_loss"] == pytest.approx(z, rel=1e-6)
            assert log[f"router/layer_{layer}/dropped_fraction"] == pytest.approx(dropped, rel=1e-6, abs=1e-7)
            assert log[f"router/layer_{layer}/load_cv"] == pytest.approx(load_cv, rel=1e-6)
        for metric in ("aux_loss", "z_loss", "dropped_fraction", "load_cv"):
            per_layer = [log[f"router/layer_{layer}/{metric}"] for layer in layers]
            assert log[f"router/{metric}"] == pytest.approx(statistics.fmean(per_layer), rel=1e-6)
    assert any(log["router/dropped_fraction"] > 0 for log in train_logs)  # capacity 1.0 drops some tokens
    # the reporter saw the same metrics in the same log call
    reported = [log for log in reporter.logs if "loss" in log]
    assert [log["router/load_cv"] for log in reported] == [log["router/load_cv"] for log in train_logs]
    assert not any(k.startswith("router/") for log in trainer.state.log_history if "eval_loss" in log for k in log)


def test_router_metrics_passed_as_a_callback_still_reach_the_log_history(tmp_path):
    model = tiny_moe()
    args = train_args(tmp_path, logging_steps=2, max_steps=2)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=BlockDataset(torch.randint(0, VOCAB, (8, 16))),
        callbacks=[RouterMetricsCallback()],
    )
    trainer.train()
    assert "router/layer_3/load_cv" in trainer.state.log_history[0]


def test_router_metrics_on_a_dense_model_log_nothing(tmp_path):
    model = GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny"))
    trainer = Trainer(
        model=model,
        args=train_args(tmp_path, max_steps=2),
        train_dataset=BlockDataset(torch.randint(0, VOCAB, (8, 16))),
    )
    add_router_metrics(trainer)
    trainer.train()
    assert not any(k.startswith("router/") for log in trainer.state.log_history for k in log)


@pytest.mark.gpu
@pytest.mark.parametrize("option", ["fp16", "bf16"])
def test_trainer_trains_with_mixed_precision_on_cuda(tmp_path, option):
    model = tiny_moe()
    args = train_args(tmp_path, use_cpu=False, **{option: True})
    trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(torch.randint(0, 64, (16, 16))))
    trainer.train()
    losses = logged(trainer, "loss")
    assert model.device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_the_readme_trainer_snippet_reports_the_router_metrics_to_tensorboard(tmp_path):
    """`report_to="tensorboard"` as in the README, in the environment `make` builds (tensorboard is in the extras)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_moe()
    data = BlockDataset(torch.randint(0, 64, (8, 16)))
    trainer = Trainer(model=model, args=train_args(tmp_path, max_steps=2, report_to="tensorboard"), train_dataset=data)
    add_router_metrics(trainer)
    trainer.train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"train/loss", "train/router/aux_loss"} <= set(accumulator.Tags()["scalars"])
