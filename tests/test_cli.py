from __future__ import annotations

import subprocess
import sys

from hf_moe_offload.cli import main


def test_presets_lists_total_and_active_parameters(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "350m-moe128" in out and "13.1B total, 357M active per token" in out
    assert "experts=32x10/64x2" in out


def test_demo_generates_with_a_tiny_gpt_moe(capsys):
    assert main(["demo", "--max-new-tokens", "4", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "generated 4 tokens" in out and "tokens per expert" in out


def test_bad_preset_is_one_clear_line_and_exit_code_2():
    result = subprocess.run(
        [sys.executable, "-m", "hf_moe_offload", "demo", "--preset", "huge"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unknown GPT-MoE preset 'huge'" in result.stderr
