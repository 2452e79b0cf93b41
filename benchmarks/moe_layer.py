"""Forward + backward time of the GPT-MoE feed-forward against the dense MLP of the same shape, in one run.

Shape (issue #2): 4096 tokens, hidden 512, FFN 2048, E = 16 and 128 experts, top-1, training mode with the presets'
capacity factor 1.0 and min capacity 4, on the CPU. Each timed step is what a training step does to the layer:
gradients set to None (as `optimizer.zero_grad()` does), forward, backward with a random upstream gradient. Dense and
MoE steps are interleaved so that both see the same machine state (`--sequential` times them as two series instead);
the ratio is min(MoE) / min(dense), the least disturbed run of each, the usual estimator on a shared machine; the
medians are printed too.

    python benchmarks/moe_layer.py                       # fp32, prints a markdown table
    python benchmarks/moe_layer.py --dtype bfloat16 --implementations sorted_mm grouped_mm
    python benchmarks/moe_layer.py --implementations sorted_mm deepspeed [--autocast]   # beside DeepSpeed's layer

`deepspeed` (the `bench` extra: `DS_BUILD_OPS=0 pip install -e ".[bench]"`) times DeepSpeed-MoE's own layer,
`deepspeed.moe.layer.MoE` with `ep_size=1` in a one-process gloo group, on the same shapes, tokens and capacity: its
experts are the same GELU MLP with biases (`nn.Linear(hidden, ffn)`, `nn.Linear(ffn, hidden)`), top-1, capacity
factor 1.0, min capacity 4, Random Token Selection on (DeepSpeed's default), every weight drawn from N(0, 0.02) as
the GPT-MoE block's. `--autocast` keeps the weights in fp32 and runs every step under CPU bf16 autocast (the way
DeepSpeed's layer runs in bf16: its gate computes in fp32 on fp32 weights). DeepSpeed appears only here, never in
the package or its tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch

from hf_moe_offload import GPTMoEConfig
from hf_moe_offload.gpt_moe.modeling_gpt_moe import GPTMoEMLP, GPTMoESparseMoeBlock


def make_step(module: torch.nn.Module, hidden: torch.Tensor, grad: torch.Tensor, autocast: bool = False):
    params = list(module.parameters())

    def step() -> float:
        for p in params:
            p.grad = None
        hidden.grad = None
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            output = module(hidden)
        output = output[0] if isinstance(output, tuple) else output  # DeepSpeed's MoE: (output, l_aux, counts)
        output.backward(grad.to(output.dtype))
        return time.perf_counter() - start

    return step


def deepspeed_moe(hidden: int, ffn: int, num_experts: int) -> torch.nn.Module:
    """DeepSpeed-MoE's layer on the shapes of the GPT-MoE block (see the module docstring)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    if not dist.is_initialized():
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # fmt: skip
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo")

    class Expert(torch.nn.Module):  # GPT-MoE's expert: GELU MLP with biases
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(hidden, ffn)
            self.fc2 = torch.nn.Linear(ffn, hidden)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    layer = MoE(hidden_size=hidden, expert=Expert(), num_experts=num_experts, ep_size=1, k=1, capacity_factor=1.0,
                eval_capacity_factor=1.0, min_capacity=4, use_rts=True, drop_tokens=True)  # fmt: skip
    return layer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--implementations", nargs="+", default=["sorted_mm", "grouped_mm", "eager"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--autocast", action="store_true", help="fp32 weights, every step under bf16 autocast")
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
            if implementation == "deepspeed":
                moe = deepspeed_moe(args.hidden, args.ffn, num_experts).to(dtype)
            else:
                config._experts_implementation = implementation
                moe = GPTMoESparseMoeBlock(config, num_experts).to(dtype).train()
            with torch.no_grad():
                for p in moe.parameters():
                    p.normal_(0, 0.02)
            steps = {
                "dense": make_step(dense, hidden, grad, args.autocast),
                "moe": make_step(moe, hidden, grad, args.autocast),
            }
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
            if implementation == "deepspeed":  # its gate's combine weights: a dropped token has none
                _, combine, _, _ = moe.deepspeed_moe.gate(hidden.detach().float())[:4]
                dropped = float((combine.sum(dim=(1, 2)) == 0).float().mean())
            else:
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
    autocast_flag = " --autocast" if args.autocast else ""
    table = [
        f"environment: {allocator_env or 'default allocator settings'}",
        f"`python benchmarks/moe_layer.py --dtype {args.dtype}{autocast_flag}` — {args.tokens} tokens, "
        f"hidden {args.hidden}, FFN {args.ffn}, top-1, capacity factor 1.0 (training), {args.dtype}, "
        f"torch {torch.__version__}, "
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
