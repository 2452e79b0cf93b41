"""What an offloaded model saves: its real weights, read from the store, never the placeholders.

An offloaded model's parameters are placeholders between uses (or views of a device slot while their unit runs), so
`state_dict()` would hand out NaNs, and `save_pretrained`, `push_to_hub`, `torch.save(model.state_dict())` would write
them. A state-dict hook on every module that holds a stored parameter replaces each such entry with the weight as the
store holds it: a view of the CPU arena, or of a private read-only mapping of the NVMe files / checkpoint shards (no
copy; pages come from the page cache as the writer reads them), after the store verified the unit (`store.verify`).
The entries are the same whether a unit is bound to a slot at that moment or not, so a `state_dict()` taken while
another thread runs a forward is still the store's weights.

`save_pretrained` is transformers' own (shards, tied weights, index, config, custom code), fed by that state dict. It
is wrapped to refuse a directory holding checkpoint shards the store reads in place (saving there would truncate the
files the model reads its weights from), and to write shards of at most `SAVE_SHARD_SIZE` unless `max_shard_size` is
given: transformers writes a shard from the tensors' memory at once, so the pages of one shard (mapped from the store
files, or the contiguous copies of a MoE layer's fused experts) are what a save holds; the whole model in one 50 GB
default shard would be all of it.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


SAVE_SHARD_SIZE = "1GB"


class Runtime(Protocol):
    """What the hooks call (implemented by `runtime.OffloadRuntime`)."""

    def stored_unit_of(self, name: str) -> int: ...
    def stored_tensors(self, unit: int) -> dict[str, torch.Tensor]: ...
    def store_files(self) -> list[str]: ...
    def check_savable(self) -> None: ...


class StateDictHooks:
    """The hooks that put stored weights in the state dicts of `model` (see the module docstring).

    Args:
        model: the offloaded model: each of its `state_dict()` calls reads (and verifies) every unit again.
        runtime: where the stored weights come from.
        locations: every place (module, attribute) of each stored parameter, by its canonical name.
    """

    def __init__(self, model: nn.Module, runtime: Runtime, locations: dict[str, list[tuple[nn.Module, str]]]):
        # weakly: the modules hold these hooks, and what closes a garbage-collected model's resources holds modules
        self._runtime = weakref.ref(runtime)
        # the tensors handed out, kept only as long as some state dict holds them, and the last unit's (its modules
        # come one after another): one verified read of each unit per state_dict call
        self._given: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
        self._last: dict[str, torch.Tensor] = {}
        by_module: dict[nn.Module, dict[str, str]] = {}
        for name, places in locations.items():
            for module, attr in places:
                by_module.setdefault(module, {})[attr] = name
        self.handles = [model.register_state_dict_pre_hook(self._forget)]
        self.handles += [
            module.register_state_dict_post_hook(functools.partial(self._replace, attrs))
            for module, attrs in by_module.items()
        ]

    def _forget(self, module, prefix, keep_vars) -> None:
        """A new `state_dict()` of the model: nothing handed out before is reused unverified."""
        self._given = weakref.WeakValueDictionary()
        self._last = {}

    def _tensor(self, name: str) -> torch.Tensor:
        tensor = self._last.get(name)
        if tensor is None:
            tensor = self._given.get(name)
        if tensor is None:
            runtime = self._runtime()
            if runtime is None:
                raise RuntimeError("the offloaded model's runtime is gone: its weights cannot be read")
            tensors = runtime.stored_tensors(runtime.stored_unit_of(name))
            for other, value in tensors.items():
                self._given[other] = value
            self._last = tensors
            tensor = tensors[name]
        return tensor

    def _replace(self, attrs: dict[str, str], module, state_dict, prefix, local_metadata) -> None:
        for attr, name in attrs.items():
            key = prefix + attr
            if key in state_dict:
                state_dict[key] = self._tensor(name)

    def remove(self) -> None:
        self._last = {}
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def guard_save(model: nn.Module, runtime: Runtime) -> None:
    """Wrap `model.save_pretrained` to refuse a directory that holds files the store reads (see the module
    docstring); everything else is transformers' own `save_pretrained`."""
    original: Callable[..., Any] | None = getattr(type(model), "save_pretrained", None)
    if original is None:
        return

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, **kwargs):
        runtime.check_savable()  # before transformers writes anything
        check_save_target(os.fspath(save_directory), runtime.store_files())
        if not args:  # (max_shard_size is keyword-only in practice; a positional call keeps transformers' default)
            kwargs.setdefault("max_shard_size", SAVE_SHARD_SIZE)
        return original(model, save_directory, *args, **kwargs)

    model.save_pretrained = save_pretrained


def unguard_save(model: nn.Module) -> None:
    model.__dict__.pop("save_pretrained", None)


def check_save_target(save_directory: str, store_files: list[str]) -> None:
    """Refuse to save into a directory that holds a file the store reads (by its path or the file a link names)."""
    target = os.path.realpath(save_directory)
    for path in store_files:
        folders = {os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.dirname(os.path.realpath(path))}
        if target in folders:
            raise RuntimeError(
                f"save_pretrained({save_directory!r}) would overwrite {path}, which this offloaded model reads its "
                f"weights from in place: the checkpoint would be destroyed. Save to another directory (or "
                f"disable_offload(model) first, which loads the weights into memory)"
            )
