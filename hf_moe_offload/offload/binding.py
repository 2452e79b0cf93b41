"""What a parameter is while its model is offloaded: a placeholder between uses, a view of a device slot while its
unit runs, and the original `Parameter` again (bit for bit) after `disable_offload`.

A placeholder has the right shape, dtype and device (so `model.device`, `model.dtype` and `generate` work unchanged)
and every element reads NaN, so a weight used outside its unit cannot go unnoticed. Bound weights keep their
parameter's `requires_grad`: kernels choose their path on it (a frozen weight sends a strided 3-D linear through a
materialised batched matmul), so the offloaded model takes the in-memory model's paths; forwards run under `no_grad`
(the root hook), so nothing is recorded for backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .discovery import Parameters
from .layout import TensorSpec, UnitPlan


def placeholder(spec: TensorSpec, device: torch.device, requires_grad: bool) -> nn.Parameter:
    """A parameter of `spec`'s shape and dtype on `device` whose elements read NaN (0 for integer dtypes), backed by
    one element."""
    fill = float("nan") if spec.dtype.is_floating_point else 0
    data = torch.full((), fill, dtype=spec.dtype, device=device).expand(spec.shape)
    return nn.Parameter(data, requires_grad=requires_grad and spec.dtype.is_floating_point)


class Binding:
    """Points every place of each parameter at its placeholder, at a view of a slot, or back at the original.

    Args:
        parameters: the model's parameters and the places they sit (`discovery.find_parameters`).
        owned: the names of the parameters that live in the store (the others stay resident).
        device: the execution device (where placeholders live).
    """

    def __init__(self, parameters: Parameters, owned: Iterable[str], device: torch.device):
        self.locations = parameters.locations
        self.originals = parameters.originals
        self.requires_grad = {name: p.requires_grad for name, p in self.originals.items()}
        # where disable_offload puts each weight back (a meta weight, from load_offloaded, goes to the CPU)
        self.restore_to = {name: p.device for name, p in self.originals.items() if p.device.type != "meta"}
        owned = set(owned)
        self.placeholders = {
            name: placeholder(TensorSpec(name, p.dtype, tuple(p.shape)), device, p.requires_grad)
            for name, p in self.originals.items()
            if name in owned
        }
        self.resident_names = [name for name in self.originals if name not in owned]
        self.bound: dict[int, tuple[int, list[str]]] = {}  # unit -> (slot index, names bound)
        self._views: dict[tuple, list[tuple[str, nn.Parameter]]] = {}

    # -- views --------------------------------------------------------------------------------------------------

    def views_of(self, plan: UnitPlan, region: Callable[[int, int], torch.Tensor]) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every tensor `plan` brings, `region(offset, nbytes)` giving its bytes."""
        views = [
            (spec.name, nn.Parameter(region(offset, spec.nbytes).view(spec.dtype).view(spec.shape)))
            for spec, offset in plan.tensors
        ]
        for layout in plan.experts:  # a whole MoE layer: its fused weights strided over the experts
            data = region(layout.offset, layout.num_experts * layout.stride)
            for spec, view in zip(layout.group.params, layout.views(data, layout.num_experts), strict=True):
                views.append((spec.name, nn.Parameter(view)))
        for name, param in views:
            param.requires_grad_(self.requires_grad[name] and param.is_floating_point())
        return views

    def slot_views(self, unit: int, slot) -> list[tuple[str, nn.Parameter]]:
        """The views of `unit`'s tensors in a pipeline slot, made once per (unit, `slot.view_key`)."""
        key = (unit, *slot.view_key)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self.views_of(slot.view_plan, slot.view_region)
        return views

    # -- binding ------------------------------------------------------------------------------------------------

    def bind(self, unit: int, name: str, values: list[tuple[str, nn.Parameter]], slot: int = -1) -> None:
        if unit in self.bound:
            raise RuntimeError(f"unit {name} was entered again while it runs (recursive forward)")
        for param_name, value in values:
            for module, attr in self.locations[param_name]:
                module._parameters[attr] = value
        self.bound[unit] = (slot, [param_name for param_name, _ in values])

    def unbind(self, unit: int) -> int | None:
        """Put `unit`'s parameters back to their placeholders; returns the slot it held (-1: none), None if it was
        not bound."""
        entry = self.bound.pop(unit, None)
        if entry is None:
            return None
        for name in entry[1]:
            value = self.placeholders[name]
            for module, attr in self.locations[name]:
                module._parameters[attr] = value
        return entry[0]

    def install_placeholders(self) -> None:
        for name, value in self.placeholders.items():
            for module, attr in self.locations[name]:
                module._parameters[attr] = value

    def move_resident(self, device: torch.device) -> int:
        """Put the parameters that belong to no unit on `device`; returns their bytes."""
        moved_bytes = 0
        for name in self.resident_names:
            param = self.originals[name]
            if param.device.type == "meta":
                raise RuntimeError(f"{name} is on the meta device and belongs to no unit: it cannot be offloaded")
            moved = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
            for module, attr in self.locations[name]:
                module._parameters[attr] = moved
            moved_bytes += moved.numel() * moved.element_size()
        return moved_bytes

    def free_originals(self) -> None:
        """The store holds the owned weights now: free their memory (`restore` gives it back)."""
        for name in self.placeholders:
            param = self.originals[name]
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def restore(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Give every owned parameter its value back (copied to where it was), the original `Parameter` objects
        again (optimizers and tied weights keep working), and put the resident ones back."""
        for name, tensor in named_tensors:
            original = self.originals[name]
            value = tensor.to(self.restore_to.get(name, torch.device("cpu")), copy=True)
            if original.device.type == "meta":
                original = nn.Parameter(value, requires_grad=original.requires_grad)
            else:
                original.data = value
            for module, attr in self.locations[name]:
                module._parameters[attr] = original
        for name in self.resident_names:
            for module, attr in self.locations[name]:
                module._parameters[attr] = self.originals[name]
