"""The training example end to end, shrunk: data, three models, table, curves (the full run is in benchmarks/)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


_spec = importlib.util.spec_from_file_location(
    "train_gpt_moe", Path(__file__).resolve().parents[1] / "examples" / "train_gpt_moe.py"
)
train_gpt_moe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_gpt_moe)


def test_train_gpt_moe_runs_small_and_writes_its_results(tmp_path):
    results = tmp_path / "results" / "run_lr1.5e-3"  # a dotted name: the extensions are appended, not swapped
    train_gpt_moe.main(
        [
            "--output-dir", str(tmp_path / "runs"),
            "--results", str(results),
            "--modules", "json", "csv", "copy", "glob",  # copy and glob are the validation modules
            "--vocab-size", "300",
            "--block-size", "32",
            "--hidden-size", "32",
            "--layers", "2",
            "--experts", "4",
            "--batch-size", "2",
            "--max-steps", "4",
            "--warmup-steps", "1",
            "--eval-every", "2",
            "--eval-blocks", "4",
            "--log-every", "2",
        ]
    )  # fmt: skip
    payload = json.loads(Path(f"{results}.json").read_text())
    assert [m["model"] for m in payload["models"]] == ["S", "S+MoE-4", "4xS"]
    assert payload["data"]["modules"] == ["json", "csv", "copy", "glob"]
    for model in payload["models"]:
        assert [step for step, _ in model["validation_curve"]] == [2, 4]
        assert model["tokens"] == 4 * 2 * 32 and model["train_tokens_per_s"] > 0
        final = tmp_path / "runs" / model["model"] / "final"
        assert (final / "tokenizer.json").exists() and (final / "trainer_state.json").exists()
        card = (final / "README.md").read_text()  # the card's curve is the run's validation curve
        assert all(f"| {step} | " in card and f"| {loss:.4f} |" in card for step, loss in model["validation_curve"])
    moe = payload["models"][1]
    assert moe["total_params"] > moe["active_params"] and set(moe["last_router_metrics"]) >= {"router/load_cv"}
    table = Path(f"{results}.md").read_text().splitlines()
    assert len(table) == 5 and table[2].startswith("| S |") and table[2].endswith("| 1.00x |")
    assert Path(f"{results}.png").stat().st_size > 0


def test_train_gpt_moe_refuses_a_split_without_validation(tmp_path):
    with pytest.raises(ValueError, match=r"leaves \d+ train and 0 validation files"):
        train_gpt_moe.main(["--output-dir", str(tmp_path), "--modules", "json"])
