"""What the runtime needs to know about a model, found from its modules: the decoder block list, the units, every place
a parameter sits (tied weights have several), the v5 experts modules and their routers. Pure functions over
`nn.Module`; nothing here changes the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `ModuleList` holding the decoder blocks: not inside another list, preferably of a `_no_split_modules`
    class, else the one with the most parameters. An encoder-decoder model is refused: the runtime streams one stack
    of decoder blocks."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model: the offload runtime streams a decoder-only causal LM "
            f"(one torch.nn.ModuleList of decoder blocks, such as model.layers)"
        )
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates: list[tuple[str, nn.ModuleList, bool, int]] = []
    empty: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(other + ".") for other, *_ in candidates):
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel == 0:
            empty.append(name)
            continue
        preferred = type(module[0]).__name__ in no_split
        candidates.append((name, module, preferred, numel))
    if not candidates:
        found = f" (its lists {', '.join(empty)} hold no parameters)" if empty else ""
        raise ValueError(
            f"{type(model).__name__} has no torch.nn.ModuleList of decoder blocks (such as model.layers or "
            f"transformer.h){found}: the offload runtime streams a decoder-only causal LM block by block"
        )
    name, module, _, _ = max(candidates, key=lambda c: (c[2], c[3]))
    return name, module


def find_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Units in module order: the blocks, and the other modules holding parameters that are not above the blocks
    (the modules of another `ModuleList` each one unit)."""
    list_name, blocks = find_block_list(model)
    parts = list_name.split(".")
    ancestors = {".".join(parts[:i]) for i in range(len(parts))}
    units: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name in ancestors:
            continue
        if name == list_name:
            units.extend((f"{list_name}.{i}", block) for i, block in enumerate(blocks))
            continue
        if name.startswith(list_name + ".") or any(name.startswith(unit + ".") for unit, _ in units):
            continue
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue  # a container is never called: its modules are (each its own unit)
        if any(True for _ in module.parameters()):
            units.append((name, module))
    return units


def is_under(path: str, prefix: str) -> bool:
    """Whether the module path `path` is `prefix` or inside it."""
    return path == prefix or path.startswith(prefix + ".")


@dataclass
class Parameters:
    """Every parameter of a model under one canonical name (its first name), with every (module, attribute) it sits
    at and the module paths of those places."""

    originals: dict[str, nn.Parameter]
    locations: dict[str, list[tuple[nn.Module, str]]]
    paths: dict[str, list[str]]


def find_parameters(model: nn.Module) -> Parameters:
    locations: dict[str, list[tuple[nn.Module, str]]] = {}
    originals: dict[str, nn.Parameter] = {}
    paths: dict[str, list[str]] = {}
    canonical: dict[int, str] = {}
    for full_name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = full_name.rpartition(".")
        name = canonical.setdefault(id(param), full_name)
        locations.setdefault(name, []).append((model.get_submodule(module_name), attr))
        paths.setdefault(name, []).append(module_name)
        originals[name] = param
    return Parameters(originals, locations, paths)


def find_experts_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, list[str]]]:
    """(name, module, names of its fused expert parameters) of each transformers v5 experts module under `module`
    (a class decorated with `use_experts_implementation`: `num_experts`, `has_gate`, a `down_proj` parameter)."""
    found = []
    for name, sub in module.named_modules(prefix=prefix):
        num_experts = getattr(sub, "num_experts", None)
        config = getattr(sub, "config", None)
        if not isinstance(num_experts, int) or num_experts < 1 or not hasattr(config, "_experts_implementation"):
            continue
        if not hasattr(sub, "has_gate") or not isinstance(sub._parameters.get("down_proj"), nn.Parameter):
            continue
        params = [
            attr for attr, p in sub._parameters.items() if p is not None and p.dim() >= 2 and p.shape[0] == num_experts
        ]
        found.append((name, sub, params))
    return found


def router_class(model: nn.Module) -> type[nn.Module] | None:
    """The model's router module class, from the output recorder transformers models declare for `router_logits`.

    Workaround: `_can_record_outputs` is transformers' own record of which module produces the router logits
    (`OutputRecorder(<Router>, index=0)`); it has no public accessor yet, so it is read here and only here.
    """
    recorders = getattr(type(model), "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    target = getattr(recorder, "target_class", recorder)
    return target if isinstance(target, type) and issubclass(target, nn.Module) else None


def router_weight_name(model: nn.Module, experts_name: str) -> str | None:
    """The name of the router weight of the MoE block that holds `experts_name`: the `weight` of the block's module
    of the model's router class (see `router_class`), or None when the model declares none."""
    cls = router_class(model)
    if cls is None:
        return None
    block_name = experts_name.rpartition(".")[0]
    block = model.get_submodule(block_name)
    for name, sub in block.named_modules(prefix=block_name):
        if isinstance(sub, cls) and isinstance(sub._parameters.get("weight"), nn.Parameter):
            return f"{name}.weight"
    return None


def eager_experts_forward(module: nn.Module) -> Callable:
    """The experts class's own forward (its eager implementation), under transformers' dispatching wrapper.

    `use_experts_implementation` wraps the class's `forward` with `functools.wraps` and falls back to the original for
    "eager"; `inspect.unwrap` is the public way back to that original.
    """
    return inspect.unwrap(type(module).forward)
