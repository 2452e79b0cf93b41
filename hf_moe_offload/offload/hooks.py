"""The accelerate `ModelHook`s of an offloaded model, and the guard on the methods that would move its weights.

A hook only calls into the runtime (`runtime.py`): the unit hooks bring a unit's weights before it runs and put them
back after; the root hook starts and ends a forward (inputs sent to the execution device, routing decided, units
bound by a forward that raised released). Nothing here knows how weights are stored or fetched.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from accelerate.hooks import ModelHook
from accelerate.utils import send_to_device
from torch import nn


GUARDED_METHODS = ("to", "cuda", "cpu", "half", "float", "double", "bfloat16", "xpu", "type", "to_empty")


class Runtime(Protocol):
    """What the hooks call (implemented by `runtime.OffloadRuntime`)."""

    device: torch.device

    def acquire(self, unit: int) -> None: ...
    def release(self, unit: int) -> None: ...
    def gather_rows(self, unit: int, ids: torch.Tensor) -> torch.Tensor: ...
    def begin_forward(self, num_tokens: int | None) -> None: ...
    def end_forward(self) -> None: ...
    def finish_forward(self) -> None: ...


class UnitHook(ModelHook):
    """A unit's weights are bound to its slot for the length of its forward."""

    def __init__(self, runtime: Runtime, unit: int):
        self.runtime = runtime
        self.unit = unit

    def pre_forward(self, module, *args, **kwargs):
        self.runtime.acquire(self.unit)
        return args, kwargs

    def post_forward(self, module, output):
        self.runtime.release(self.unit)
        return output


class EmbeddingHook(ModelHook):
    """An `nn.Embedding` unit reads only the rows of the ids it is given, not its whole table: the lookup of a
    50k-token vocabulary at batch 1 moves a few KB instead of hundreds of MB. The module runs on the gathered rows
    with the ids renumbered, which is the same lookup bit for bit."""

    def __init__(self, runtime: Runtime, unit: int):
        self.runtime = runtime
        self.unit = unit
        self.padding_idx = None

    def init_hook(self, module):
        # padding_idx only shapes gradients, and the renumbered ids would not match it: off while offloaded
        self.padding_idx, module.padding_idx = module.padding_idx, None
        return module

    def detach_hook(self, module):
        module.padding_idx = self.padding_idx
        return module

    def pre_forward(self, module, input, *args, **kwargs):
        inverse = self.runtime.gather_rows(self.unit, input)
        return (inverse, *args), kwargs

    def post_forward(self, module, output):
        self.runtime.release(self.unit)
        return output


class RootHook(ModelHook):
    """The model's own forward: inputs to the execution device, one forward begun and ended."""

    # Inference only: slot memory is reused by the next unit, so nothing may keep a weight for a backward pass.
    no_grad = True

    def __init__(self, runtime: Runtime, skip_keys: Any):
        self.runtime = runtime
        self.skip_keys = skip_keys

    def pre_forward(self, module, *args, **kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(tokens, torch.Tensor):
            embeds = kwargs.get("inputs_embeds")
            tokens = embeds[..., 0] if isinstance(embeds, torch.Tensor) else None
        self.runtime.begin_forward(tokens.numel() if tokens is not None else None)
        device = self.runtime.device
        return send_to_device(args, device), send_to_device(kwargs, device, skip_keys=self.skip_keys)

    def post_forward(self, module, output):
        self.runtime.end_forward()
        return output


def add_release_on_error(model: nn.Module, runtime: Runtime):
    """The forward is finished in every case (units it left bound released, the next forward let in): a forward
    hook with `always_call=True` runs after the model's forward whether it returned or raised (`KeyboardInterrupt`,
    which torch does not route through it, is released at the start of the next forward of the same thread).
    Returns the hook's handle."""

    def release(module, args, output):
        runtime.finish_forward()

    return model.register_forward_hook(release, always_call=True)


def guard_methods(model: nn.Module, describe: str) -> list[str]:
    """Make `.to()`, `.cuda()`, `.half()`, ... of `model` raise: its weights live in a store (`describe` says which)
    and must come back with `disable_offload` first. Returns the methods guarded (for `unguard_methods`)."""
    name = type(model).__name__

    def refuse(method: str):
        def guarded(*args, **kwargs):
            raise RuntimeError(
                f"{name}.{method}() on a model with offloaded weights: its weights live in {describe}; call "
                f"hf_moe_offload.disable_offload(model) first"
            )

        return guarded

    guarded = []
    for method in GUARDED_METHODS:
        if hasattr(model, method):
            setattr(model, method, refuse(method))
            guarded.append(method)
    return guarded


def unguard_methods(model: nn.Module, methods: list[str]) -> None:
    for method in methods:
        model.__dict__.pop(method, None)
