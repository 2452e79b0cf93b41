"""The `hf-moe-offload` command (also `python -m hf_moe_offload`)."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM

    torch.manual_seed(args.seed)
    config = GPTMoEConfig.from_preset(args.preset)
    model = GPTMoEForCausalLM(config).eval()
    print(
        f"GPT-MoE preset {args.preset!r} (random weights): {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, MoE layers {config.moe_layer_indices} with {config.num_experts} experts, "
        f"top-{config.num_experts_per_tok}; {config.parameter_summary()}"
    )
    prompt = torch.randint(0, config.vocab_size, (args.batch_size, 4))
    with torch.no_grad():
        start = time.perf_counter()
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.max_new_tokens, do_sample=False
        )
        elapsed = time.perf_counter() - start
        routed = model(output, output_router_logits=True)
    new_tokens = output.shape[1] - prompt.shape[1]
    for row in output.tolist():
        print("tokens:", row)
    print(
        f"generated {new_tokens * args.batch_size} tokens in {elapsed:.3f}s "
        f"({new_tokens * args.batch_size / elapsed:.1f} tokens/s, greedy, KV cache on)"
    )
    for layer, counts_per_expert in zip(config.moe_layer_indices, routed.expert_token_counts):
        print(f"layer {layer}: tokens per expert {counts_per_expert.tolist()}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from hf_moe_offload import PRESETS, GPTMoEConfig

    for name in PRESETS:
        config = GPTMoEConfig.from_preset(name)
        experts = (
            config.num_experts
            if isinstance(config.num_experts, int)
            else "/".join(f"{count}x{config.num_experts.count(count)}" for count in dict.fromkeys(config.num_experts))
        )
        print(
            f"{name:12s} layers={config.num_hidden_layers:<3d} hidden={config.hidden_size:<5d} "
            f"experts={experts!s:<10s} {config.parameter_summary()}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe-offload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate with a tiny random GPT-MoE (no download)")
    demo.add_argument("--preset", default="tiny-moe")
    demo.add_argument("--batch-size", type=int, default=2)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    presets = commands.add_parser("presets", help="list the GPT-MoE presets with total and active parameters")
    presets.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"hf-moe-offload: error: {error}", file=sys.stderr)
        return 2
