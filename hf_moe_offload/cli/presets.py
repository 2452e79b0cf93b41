"""`hf-moe-offload presets`: the GPT-MoE presets with their total and active parameters."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    parser = commands.add_parser("presets", help="list the GPT-MoE presets with total and active parameters")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..gpt_moe.presets import PRESETS, parameter_summary, preset_config

    for name in PRESETS:
        config = preset_config(name)
        experts = (
            config.num_experts
            if isinstance(config.num_experts, int)
            else "/".join(f"{count}x{config.num_experts.count(count)}" for count in dict.fromkeys(config.num_experts))
        )
        print(
            f"{name:12s} layers={config.num_hidden_layers:<3d} hidden={config.hidden_size:<5d} "
            f"experts={experts!s:<10s} {parameter_summary(config)}"
        )
    return 0
