"""The `hf-moe-offload` command: the demo on the shipped model, generate, bench, card, upload, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM
from hf_moe_offload.cli import main
from hf_moe_offload.cli.demo import DEMO_MODEL, DEMO_PROMPTS, hub_layout
from hf_moe_offload.hub import TAGS


PACKAGE = Path(__file__).resolve().parents[1] / "hf_moe_offload"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_moe_offload", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def in_memory_completions(prompts: list[str], max_new_tokens: int, batch_size: int = 1, **generate) -> list[str]:
    """The reference: the demo model in memory, loaded the Hub way, the same batches and padding as the command."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL, trust_remote_code=True)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, trust_remote_code=True, dtype=torch.float32).eval()
    texts = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate)
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return texts


# -- the shipped demo model -----------------------------------------------------------------------------------------


def test_the_demo_model_ships_weights_config_tokenizer_and_card_and_its_hub_layout_takes_the_package_code(tmp_path):
    names = {p.name for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "trainer_state.json"} <= names
    assert not any(name.endswith(".py") for name in names)  # no copies of the model files to go stale
    layout = hub_layout(tmp_path / "demo")
    for code in ("configuration_gpt_moe.py", "modeling_gpt_moe.py"):
        assert (layout / code).read_bytes() == (PACKAGE / "gpt_moe" / code).read_bytes()
    assert {p.name for p in layout.iterdir()} == names | {"configuration_gpt_moe.py", "modeling_gpt_moe.py"}
    size = sum(p.stat().st_size for p in DEMO_MODEL.iterdir())
    assert size < 40e6  # "a few tens of MB at most"
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert config["model_type"] == "gpt_moe" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_")
    card = ModelCard.load(DEMO_MODEL / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == list(TAGS)
    assert "## Training results" in card.text and "No Trainer state" not in card.text


def test_demo_runs_offline_and_offloaded_generation_equals_in_memory(tmp_path):
    result = run_cli("demo", "--max-new-tokens", "12", env={"HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"same tokens as in memory: {len(DEMO_PROMPTS)} of {len(DEMO_PROMPTS)} snippets" in out
    assert "largest |logit difference| on the last one: 0.0e+00" in out  # CPU fp32: bit for bit
    assert "an NVMe store in" in out and "tokens/s in the generation phase" in out and "hit rate" in out
    for completion in in_memory_completions(list(DEMO_PROMPTS), 12, repetition_penalty=1.3):
        assert completion in out  # streamed text = the in-memory model's completion
    assert list(tmp_path.iterdir()) == []  # the store lived in a temporary directory, removed


# -- generate -------------------------------------------------------------------------------------------------------


def test_generate_streams_the_completion_and_reports_the_generation_phase(tmp_path, capsys):
    prompt = "def parse(path):"
    code = main(["generate", str(DEMO_MODEL), "--offload", "nvme", "--nvme-path", str(tmp_path / "store"),
                 "--prompt", prompt, "--max-new-tokens", "10", "--dtype", "float32"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(in_memory_completions([prompt], 10)[0])
    report = out.split("---\n", 1)[1]
    assert "1 prompt(s), batch 1: generation phase 9 tokens in" in report  # 10 new tokens, the first one from prefill
    for line in ("tokens/s", "MB per step", "fetch stalls", "experts:", "hit rate", "peak memory"):
        assert line in report
    assert (tmp_path / "store" / "manifest.json").is_file()


def test_generate_batches_a_prompts_file(tmp_path, capsys):
    prompts = ["import sys", "class Node:\n    def __init__(self, value):", "for line in lines:"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in prompts[:2]) + "\n" + json.dumps({"prompt": prompts[2]}) + "\n")
    code = main(["generate", str(DEMO_MODEL), "--offload", "cpu", "--prompts-file", str(path), "--batch-size", "2",
                 "--max-new-tokens", "6", "--dtype", "float32", "--expert-cache-size", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    completions = out.split("---\n", 1)[0]
    expected = in_memory_completions(prompts, 6, batch_size=2)
    assert completions == "".join(f"### prompt {n}\n{t}\n\n" for n, t in enumerate(expected, 1))
    assert "3 prompt(s), batch 2: generation phase 15 tokens" in out  # 2 x 5 + 1 x 5 after the prefills


@pytest.fixture
def gpt2_dir(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def cli_error(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()  # what fixtures printed
    code = main(list(argv))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return code, err


def test_errors_are_one_line_with_a_non_zero_exit_code(tmp_path, capsys, gpt2_dir):
    code, err = cli_error(capsys, "generate", str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and f"model path '{tmp_path / 'missing'}' does not exist" in err
    code, err = cli_error(capsys, "generate", "someone/not-cached-model", "--prompt", "x")  # tests run offline
    assert code == 2 and "as a Hub id it cannot be fetched: the Hub is offline (HF_HUB_OFFLINE=1)" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--offload", "nvme", "--nvme-path",
                          str(blocker / "store"), "--prompt", "x")  # fmt: skip
    assert code == 2 and f"--nvme-path ({blocker / 'store'}) cannot be created: Not a directory" in err
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--offload", "nvme", "--prompt", "x")
    assert code == 2 and "--offload nvme needs --nvme-path DIR" in err
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--nvme-path", str(tmp_path), "--prompt", "x")
    assert code == 2 and "--nvme-path is the store of --offload nvme" in err
    code, err = cli_error(capsys, "generate", str(gpt2_dir), "--prompt", "x", "--expert-cache-size", "4")
    assert code == 2 and "--expert-cache-size applies to MoE models only" in err
    assert "(model_type 'gpt2') has no MoE layer" in err
    dense = tmp_path / "dense"
    GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny", vocab_size=64)).save_pretrained(dense)
    code, err = cli_error(capsys, "bench", str(dense), "--expert-fetch", "all")
    assert code == 2 and "--expert-fetch applies to MoE models only" in err
    code, err = cli_error(capsys, "generate", str(gpt2_dir), "--prompt", "x")
    assert code == 2 and "no tokenizer could be loaded from" in err and "pass --tokenizer" in err
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--prompt", "x", "--max-new-tokens", "300")
    assert code == 2 and "+ --max-new-tokens (300) exceeds the model's 256 positions" in err
    code, err = cli_error(capsys, "card", str(gpt2_dir))
    assert code == 2 and "model cards are written for GPT-MoE checkpoints" in err


def test_bad_prompts_devices_and_paths_are_one_line_errors_before_any_work(tmp_path, capsys, monkeypatch):
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--prompt", "")
    assert code == 2 and "--prompt number 1 is empty" in err
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--prompts-file", str(binary))
    assert code == 2 and f"--prompts-file '{binary}' is not UTF-8 text" in err
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--prompts-file", str(tmp_path))
    assert code == 2 and f"--prompts-file '{tmp_path}' is a directory" in err
    code, err = cli_error(capsys, "bench", str(DEMO_MODEL), "--json", str(tmp_path / "no" / "such" / "r.json"))
    assert code == 2 and "does not exist or is not writable" in err
    if not torch.cuda.is_available():
        code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--prompt", "x", "--offload", "cpu", "--device",
                              "cuda")  # fmt: skip
        assert code == 2 and "execution_device='cpu'" in err
    # a Hub id while the Hub cannot be reached: one quick line, not the download's retries
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    code, err = cli_error(capsys, "generate", "someone/not-cached-model", "--prompt", "x")
    assert code == 2 and "http://127.0.0.1:9 cannot be reached" in err


def test_the_entry_point_prints_no_traceback_and_usage_errors_are_one_line(tmp_path):
    result = run_cli("generate", str(tmp_path / "missing"), "--prompt", "x")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"hf-moe-offload generate: error: model path '{tmp_path / 'missing'}' does not exist\n"
    result = run_cli("generate", str(tmp_path))  # neither --prompt nor --prompts-file
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "one of the arguments --prompt --prompts-file is required" in result.stderr


# -- bench, card, upload, presets -----------------------------------------------------------------------------------


def test_bench_compares_in_memory_and_offloaded_runs_side_by_side(tmp_path, capsys):
    results = tmp_path / "bench.json"
    systems = ["--systems", "in-memory", "offload-cpu", "offload-nvme", "--nvme-path", str(tmp_path / "store")]
    code = main(["bench", str(DEMO_MODEL), *systems, "--batch-sizes", "1", "3", "--max-new-tokens", "4",
                 "--json", str(results)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    recorded = json.loads(results.read_text())
    rows = recorded["results"]
    assert recorded["machine"].startswith("machine: ") and "threads" in recorded["machine"]
    assert [(r["system"], r["batch"]) for r in rows] == [
        (system, batch) for system in ("in-memory", "offload-cpu", "offload-nvme") for batch in (1, 3)
    ]
    for row in rows:
        assert row["steps"] == 3 and row["tokens"] == 3 * row["batch"] and row["repeats"] == 3
        assert 0 < row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        if row["system"] != "in-memory":
            assert row["mb_fetched_per_step"] > 0 and row["expert_hit_rate"] is not None
            assert f"| {row['system']} | {row['batch']} | {row['tokens_per_s']:.2f} (" in out
    assert out.count("| yes |") == 4 and "| NO |" not in out  # offloaded tokens = in-memory tokens


def test_bench_and_generate_with_a_low_bit_store(tmp_path, capsys):
    results = tmp_path / "bench.json"
    systems = ["--systems", "in-memory", "offload-nvme", "--nvme-path", str(tmp_path / "store")]
    code = main(["bench", str(DEMO_MODEL), *systems, "--batch-sizes", "1", "--max-new-tokens", "4", "--repeats", "1",
                 "--weight-bits", "4", "--json", str(results)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "4-bit store, group 64 (in-memory: the same dequantized weights" in out
    (row,) = [r for r in json.loads(results.read_text())["results"] if r["system"] == "offload-nvme"]
    assert 0 < row["fetched_fraction"] < 0.3  # 4 bits plus two float32 per 64 weights, of float32 weights
    assert f"{row['mb_fetched_per_step']:.1f} ({row['fetched_fraction']:.2f}x)" in out
    assert out.count("| yes |") == 1 and "| NO |" not in out  # the dequantized model's tokens
    code = main(["generate", str(DEMO_MODEL), "--prompt", "import os", "--max-new-tokens", "4", "--weight-bits", "8",
                 "--weight-group-size", "32"])  # fmt: skip
    report = capsys.readouterr().out.split("---\n", 1)[1]
    assert code == 0 and "MB at full precision" not in report and "at full precision" in report
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--prompt", "x", "--weight-bits", "3")
    assert code == 2 and "weight_bits (3) must be None (full precision), 8 or 4" in err
    code, err = cli_error(capsys, "generate", str(DEMO_MODEL), "--prompt", "x", "--weight-bits", "4",
                          "--weight-group-size", "256")  # fmt: skip
    assert code == 2 and "weight_group_size (256) must divide the input dimension" in err


def test_card_command_writes_and_refreshes_the_card(tmp_path, capsys):
    GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe")).save_pretrained(tmp_path)
    assert main(["card", str(tmp_path), "--license", "apache-2.0", "--datasets", "some/data", "--repo-id", "me/m"]) == 0
    assert main(["card", str(tmp_path)]) == 0
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == ["some/data"] and card.data.model_name == "me/m"
    assert capsys.readouterr().out == f"wrote {tmp_path / 'README.md'}\n" * 2


def test_upload_command_pushes_one_commit(tmp_path, capsys, monkeypatch):
    GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe")).save_pretrained(tmp_path)
    committed = {}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only the two network calls below are replaced
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: None)

    def create_commit(api, repo_id, operations, **kw):
        committed.update({op.path_in_repo: kw for op in operations})
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert main(["upload", str(tmp_path), "me/tiny", "--commit-message", "first", "--license", "mit"]) == 0
    assert set(committed) == {"README.md", "config.json", "generation_config.json", "model.safetensors",
                              "configuration_gpt_moe.py", "modeling_gpt_moe.py"}  # fmt: skip
    assert committed["config.json"]["commit_message"] == "first"
    assert capsys.readouterr().out.endswith("https://huggingface.co/me/tiny/commit/1\n")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = cli_error(capsys, "upload", str(tmp_path), "me/tiny")
    assert code == 2 and "the Hub is offline" in err


def test_presets_lists_total_and_active_parameters(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "350m-moe128" in out and "13.1B total, 357M active per token" in out
    assert "experts=32x10/64x2" in out


def test_a_value_error_inside_a_library_is_a_failure_with_a_debug_hint_not_bad_input(capsys, monkeypatch):
    from transformers import AutoConfig

    from hf_moe_offload.cli import presets

    monkeypatch.setattr(presets, "run", lambda args: AutoConfig.for_model("no-such-model-type"))
    code, err = cli_error(capsys, "presets")
    assert code == 1 and "Unrecognized model identifier: no-such-model-type" in err
    assert err.rstrip().endswith("(run with --debug for the traceback)")
    with pytest.raises(ValueError, match="no-such-model-type"):
        main(["--debug", "presets"])


def test_bench_says_how_busy_the_machine_was_and_warns(monkeypatch):
    from hf_moe_offload.cli import bench

    monkeypatch.setattr(bench, "_busy_fraction", lambda seconds=0.5: 0.9)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    line, warnings = bench.machine_report()
    assert "torch 64 threads" in line and "90% busy before the run" in line
    assert any("90% busy" in w and "not comparable" in w for w in warnings)
    assert any("oversubscribed" in w for w in warnings)
    monkeypatch.setattr(bench, "_busy_fraction", lambda seconds=0.5: 0.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert bench.machine_report()[1] == []
    assert 0.0 <= bench._busy_fraction(0.05) <= 1.0  # measured from /proc/stat here
