from __future__ import annotations

import os

import pytest
import torch


# Tests never touch the network: every model is a tiny random config built in the test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def offloaded():
    """`offloaded(model, config)` offloads `model` like `enable_offload`; every model it offloaded and that is still
    offloaded at the end of the test is put back with `disable_offload`, whether the test passed or failed."""
    from hf_moe_offload import disable_offload, enable_offload

    models = []

    def offload(model, config):
        enable_offload(model, config)
        models.append(model)
        return model

    yield offload
    for model in models:
        if getattr(model, "_hf_moe_offload_state", None) is not None:
            disable_offload(model)


@pytest.fixture
def force_sorted_mm_layout(monkeypatch):
    """`force_sorted_mm_layout("sorted" | "padded")` makes `sorted_mm` take that row layout whatever the routing."""
    from hf_moe_offload.gpt_moe import modeling_gpt_moe

    def force(layout: str) -> None:
        waste = -1.0 if layout == "sorted" else 1e9
        monkeypatch.setattr(modeling_gpt_moe, "_PADDED_LAYOUT_MAX_WASTE", waste)

    return force
