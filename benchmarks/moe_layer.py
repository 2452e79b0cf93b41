"""Forward + backward time of the GPT-MoE feed-forward against the dense MLP of the same shape, in one run.

Shape (issue #2): 4096 tokens, hidden 512, FFN 2048, E = 16 and 128 experts, top-1, training mode with the presets'
capacity factor 1.0 and min capacity 4, on the CPU. Each timed step is what a training step does to the layer:
gradients set to None (as `optimizer.zero_grad()` does), forward, backward with a random upstream gradient. Dense and
MoE steps are interleaved so that both see the same machine state (`--sequential` times them as two series instead);
the ratio is min(MoE) / min(dense), the least disturbed run of each, the usual estimator on a shared machine; the
medians are printed too.

    python benchmarks/moe_layer.py                       # fp32, prints a markdown table
    python benchmarks/moe_layer.py --dtype bfloat16 --implementations sorted_mm grouped_mm
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from hf_moe_offload import GPTMoEConfig
from hf_moe_offload.gpt_moe.modeling_gpt_moe import GPTMoEMLP, GPTMoESparseMoeBlock


def make_step(module: torch.nn.Module, hidden: torch.Tensor, grad: torch.Tensor):
    params = list(module.parameters())

    def step() -> float:
        for p in params:
            p.grad = None
        hidden.grad = None
        start = time.perf_counter()
        module(hidden).backward(grad)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--implementations", nargs="+", default=["sorted_mm", "grouped_mm", "eager"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="time all dense steps, then all MoE steps, instead of interleaving them",
    )
    parser.add_argument(
        "--eager-max-experts",
        type=int,
        default=16,
        help="skip 'eager' above this many experts (its per-expert weight slices make it O(E^2))",
    )
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, dtype=dtype, requires_grad=True)  # (tokens, hidden)
    grad = torch.randn(args.tokens, args.hidden, dtype=dtype)  # (tokens, hidden)
    rows = []
    for num_experts in args.experts:
        config = GPTMoEConfig.from_preset(
            "tiny-moe",
            hidden_size=args.hidden,
            intermediate_size=args.ffn,
            num_attention_heads=8,
            num_experts=num_experts,
        )
        dense = GPTMoEMLP(config).to(dtype).train()
        for implementation in args.implementations:
            if implementation == "eager" and num_experts > args.eager_max_experts:
                continue
            config._experts_implementation = implementation
            moe = GPTMoESparseMoeBlock(config, num_experts).to(dtype).train()
            with torch.no_grad():
                for p in moe.parameters():
                    p.normal_(0, 0.02)
            steps = {"dense": make_step(dense, hidden, grad), "moe": make_step(moe, hidden, grad)}
            times = {"dense": [], "moe": []}
            for step in steps.values():
                step()  # warm-up
            if args.sequential:
                for name, step in steps.items():
                    times[name] = [step() for _ in range(args.repeats)]
            else:
                for _ in range(args.repeats):
                    for name, step in steps.items():
                        times[name].append(step())
            dense_s, moe_s = min(times["dense"]), min(times["moe"])
            medians = statistics.median(times["dense"]), statistics.median(times["moe"])
            _, (weights, _) = moe.router(hidden.detach())
            dropped = float((weights == 0).float().mean())
            rows.append((num_experts, implementation, dense_s, moe_s, moe_s / dense_s, dropped))
            print(
                f"E={num_experts:4d} {implementation:10s} dense {dense_s * 1e3:7.1f} ms  moe {moe_s * 1e3:7.1f} ms  "
                f"ratio {moe_s / dense_s:5.2f}x  (medians {medians[0] * 1e3:.1f} / {medians[1] * 1e3:.1f} ms)",
                flush=True,
            )

    allocator_env = " ".join(
        f"{k}={v}"
        for k, v in sorted(os.environ.items())
        if k.startswith("MALLOC_") or k in ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")
    )
    table = [
        f"environment: {allocator_env or 'default allocator settings'}",
        f"`python benchmarks/moe_layer.py --dtype {args.dtype}` — {args.tokens} tokens, hidden {args.hidden}, FFN "
        f"{args.ffn}, top-1, capacity factor 1.0 (training), {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; best of {args.repeats}.",
        "",
        "| experts | experts implementation | dense fwd+bwd (ms) | MoE fwd+bwd (ms) | MoE / dense | dropped |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for num_experts, implementation, dense_s, moe_s, ratio, dropped in rows:
        table.append(
            f"| {num_experts} | {implementation} | {dense_s * 1e3:.1f} | {moe_s * 1e3:.1f} | "
            f"{ratio:.2f}x | {dropped:.1%} |"
        )
    text = "\n".join(table)
    print()
    print(text)


if __name__ == "__main__":
    main()
