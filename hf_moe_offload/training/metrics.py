"""Routing metrics of MoE models in the `Trainer` logs.

```python
from transformers import Trainer
from hf_moe_offload.training import add_router_metrics

trainer = Trainer(model=model, args=args, train_dataset=train)
add_router_metrics(trainer)  # logs router/aux_loss, router/layer_3/load_cv, ... with the loss
trainer.train()
```
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The per-layer statistics a GPT-MoE forward returns with labels (or `output_router_logits=True`).
_LAYER_STATS = ("layer_aux_losses", "layer_z_losses", "dropped_token_fraction")
_METRIC_NAMES = {
    "layer_aux_losses": "aux_loss",
    "layer_z_losses": "z_loss",
    "dropped_token_fraction": "dropped_fraction",
}


class RouterMetricsCallback(TrainerCallback):
    """
    Logs the routing of an MoE model with the training loss, per MoE layer and averaged over the layers:

    - `router/aux_loss`, `router/layer_<i>/aux_loss`: the load-balancing loss (before `router_aux_loss_coef`);
    - `router/z_loss`, `router/layer_<i>/z_loss`: the router z-loss (before `router_z_loss_coef`);
    - `router/dropped_fraction`, `router/layer_<i>/dropped_fraction`: the token-to-expert assignments dropped over
      capacity;
    - `router/load_cv`, `router/layer_<i>/load_cv`: the coefficient of variation (std / mean) of the tokens each expert
      processed, 0 for a perfectly balanced layer.

    The losses and the dropped fraction are token-weighted means over the training micro-batches since the last log
    (on every process: in a distributed run they are reduced over the processes); the load counts the tokens of all
    of them. `<i>` is the block index of the MoE layer. It reads the statistics `GPTMoEForCausalLM` returns
    (`layer_aux_losses`, `layer_z_losses`, `expert_token_counts`, `dropped_token_fraction`); evaluation forwards are
    not counted.

    Register it with [`add_router_metrics`] so that the reporters (`report_to`: TensorBoard, W&B, ...) see the
    metrics: a callback passed in `Trainer(callbacks=[...])` runs after the reporters, and then only the Trainer's
    `log_history` and the console get them.
    """

    def __init__(self):
        self._handle = None
        self._layer_ids: list[int] = []
        self._num_experts: list[int] = []
        self._reset()

    def _reset(self):
        self._tokens = 0.0
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: list[torch.Tensor] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        if model is None:
            raise RuntimeError("RouterMetricsCallback needs the model, which the Trainer passes to its callbacks")
        config = getattr(model, "config", None)
        layer_ids = getattr(config, "moe_layer_indices", None)
        if layer_ids is not None and hasattr(config, "is_moe_layer"):
            layer_ids = [i for i in layer_ids if config.is_moe_layer(i)]
        self._layer_ids = list(layer_ids) if layer_ids is not None else []
        self._num_experts = [config.num_experts_at(i) for i in self._layer_ids]
        if self._handle is not None:
            self._handle.remove()
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)
        self._reset()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not module.training or getattr(output, "layer_aux_losses", None) is None:
            return
        counts = [c.detach().float() for c in output.expert_token_counts]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            tokens = mask.sum().float()  # a tensor: no device sync per micro-batch
        else:
            ids = kwargs.get("input_ids", args[0] if args else None)
            tokens = float(ids.numel()) if ids is not None else 1.0
        for name in _LAYER_STATS:
            value = getattr(output, name).detach().float() * tokens
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._tokens += tokens
        if self._counts is None:
            self._counts = counts
        else:
            self._counts = [total + c for total, c in zip(self._counts, counts)]

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # only the training logs (not eval or the final summary)
            return
        metrics = self._metrics()
        self._reset()
        if not metrics:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def _metrics(self) -> dict[str, float]:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self._counts is None and not distributed:
            return {}
        num_layers = len(self._counts) if self._counts is not None else len(self._layer_ids)
        if num_layers == 0:
            return {}
        stats = [self._sums.get(name, torch.zeros(num_layers)) for name in _LAYER_STATS]
        packed = torch.cat([*stats, torch.as_tensor(self._tokens, dtype=torch.float32).reshape(1)])  # (3 * layers + 1,)
        counts = self._counts
        if counts is None:  # this process ran no micro-batch since the last log; the others may have
            counts = [torch.zeros(n) for n in self._num_experts]
        if distributed:  # every process logs (Trainer calls `log` on all of them): sum their micro-batches
            packed = packed.clone()
            torch.distributed.all_reduce(packed)
            counts = [c.clone() for c in counts]
            for c in counts:
                torch.distributed.all_reduce(c)
        tokens = float(packed[-1])
        if tokens == 0:
            return {}
        layer_ids = self._layer_ids if len(self._layer_ids) == num_layers else list(range(num_layers))
        metrics: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {}
        for k, name in enumerate(_LAYER_STATS):
            values = (packed[k * num_layers : (k + 1) * num_layers] / tokens).tolist()
            per_metric[_METRIC_NAMES[name]] = values
        per_metric["load_cv"] = [float(c.std(unbiased=False) / c.mean().clamp(min=1e-12)) for c in counts]
        for metric, values in per_metric.items():
            if not values:
                continue
            metrics[f"router/{metric}"] = sum(values) / len(values)
            for layer, value in zip(layer_ids, values):
                metrics[f"router/layer_{layer}/{metric}"] = value
        return metrics


def add_router_metrics(trainer) -> RouterMetricsCallback:
    """
    Registers a [`RouterMetricsCallback`] on `trainer` ahead of its other callbacks, so that every reporter of
    `report_to` logs the routing metrics with the loss. Returns the callback.
    """
    callback = RouterMetricsCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
