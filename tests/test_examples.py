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


SMALL = [
    "--modules", "json", "csv", "copy", "glob", "--vocab-size", "300", "--block-size", "32", "--hidden-size", "32",
    "--layers", "2", "--experts", "4", "--batch-size", "2", "--max-steps", "4", "--warmup-steps", "1",
    "--eval-every", "2", "--eval-blocks", "4", "--log-every", "2",
]  # fmt: skip


@pytest.fixture
def one_process_group(monkeypatch):
    """A free port for the one-process gloo group DeepSpeed's layer needs, and the group gone after the test (a
    Trainer in a later test would otherwise see a distributed run)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_deepspeed_model_trains_small_beside_gpt_moe(tmp_path, one_process_group):
    pytest.importorskip("deepspeed", reason="the S+DS-MoE model needs the bench extra (DeepSpeed)")
    import torch

    results = tmp_path / "results"
    args = ["--output-dir", str(tmp_path / "runs"), "--results", str(results), *SMALL]
    train_gpt_moe.main([*args, "--models", "S+MoE-4", "S+DS-MoE-4"])
    payload = json.loads(Path(f"{results}.json").read_text())
    gpt_moe, deepspeed = payload["models"]
    assert deepspeed["implementation"] == "deepspeed.moe.layer.MoE" and gpt_moe["implementation"] == "GPT-MoE"
    assert deepspeed["total_params"] == gpt_moe["total_params"]  # the same expert and gate shapes
    assert set(deepspeed["last_router_metrics"]) == {"router/aux_loss", "router/load_cv"}
    assert not (tmp_path / "runs" / "S+DS-MoE-4" / "final").exists()  # not saved: no GPT-MoE checkpoint

    # Its loss is GPT-MoE's rule: LM loss + coefficient x the sum of the layers' DeepSpeed `l_aux`.
    parsed = train_gpt_moe.parse_args([*args, "--router-aux-loss-coef", "0.5", "--models", "S+DS-MoE-4"])
    config = train_gpt_moe.model_configs(parsed, train_gpt_moe.prepare_data(parsed)[0])["S+DS-MoE-4"]
    model = train_gpt_moe.deepspeed_moe_model(config, 0.5).train()
    ids = torch.randint(0, config.vocab_size, (2, 32))
    out = model(input_ids=ids, labels=ids)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
    aux = sum(block.aux_loss for block in model.deepspeed_blocks)
    assert len(model.deepspeed_blocks) == 1 and float(aux) > 0
    torch.testing.assert_close(out.loss, lm + 0.5 * aux)
    model.eval()  # dropless evaluation: the gate's drop_tokens is off
    model(input_ids=ids)
    assert all(not block.moe.deepspeed_moe.gate.drop_tokens for block in model.deepspeed_blocks)


def test_deepspeed_model_without_deepspeed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    with pytest.raises(ImportError, match=r"S\+DS-MoE-4 model needs deepspeed, the bench extra"):
        train_gpt_moe.main(
            ["--output-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "r"), *SMALL, "--models", "S+DS-MoE-4"]
        )


def test_moe_recipe_options_reach_the_moe_model_only(tmp_path):
    args = ["--output-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), *SMALL]
    train_gpt_moe.main([*args, "--models", "S+MoE-4", "--top-k", "2", "--moe-layer-frequency", "1"])
    config = json.loads((tmp_path / "runs" / "S+MoE-4" / "final" / "config.json").read_text())
    assert config["num_experts_per_tok"] == 2 and config["moe_layer_frequency"] == 1
    parsed = train_gpt_moe.parse_args([*args, "--top-k", "2", "--moe-layer-frequency", "1"])
    tokenizer = train_gpt_moe.PreTrainedTokenizerFast.from_pretrained(tmp_path / "runs" / "data" / "tokenizer")
    configs = train_gpt_moe.model_configs(parsed, tokenizer)
    assert all(not configs[name].is_moe_layer(i) for name in ("S", "4xS") for i in range(2))
    with pytest.raises(SystemExit):
        train_gpt_moe.parse_args([*args, "--top-k", "0"])
