"""The whole-model check of issue 15, item 2: a two-layer GPT-MoE with MoE on every layer against the same model with
`num_experts=1` (its dense twin: one expert, the same FFN shape), forward + backward, side by side in one run.

Shapes as `benchmarks/moe_layer.py`: hidden 512, FFN 2048, 4096 tokens per step (batch 16 x 256), top-1, capacity
factor 1.0, min capacity 4, GELU experts with biases, vocabulary 1024, fp32 (or `--autocast` bf16). Each repeat times
one step of every model in turn (order rotated); the table gives the median (min-max) seconds and the ratio of
medians against the dense twin.

    python benchmarks/moe_whole_model.py --experts 16 128 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM


def build(experts: int) -> GPTMoEForCausalLM:
    torch.manual_seed(0)
    config = GPTMoEConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
        max_position_embeddings=256, num_experts=experts, moe_layer_frequency=1, capacity_factor=1.0, min_capacity=4,
    )  # fmt: skip
    return GPTMoEForCausalLM(config).train()


def step(model, ids: torch.Tensor, autocast: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--autocast", action="store_true", help="every step under bf16 autocast (fp32 weights)")
    args = parser.parse_args()
    models = {e: build(e) for e in [1, *args.experts]}
    ids = torch.randint(0, 1024, (16, 256), generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm-up
        step(model, ids, args.autocast)
    times: dict[int, list[float]] = {e: [] for e in models}
    order = list(models)
    for repeat in range(args.repeats):
        for e in order[repeat % len(order) :] + order[: repeat % len(order)]:
            times[e].append(step(models[e], ids, args.autocast))
    dense = statistics.median(times[1])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'bf16 autocast' if args.autocast else 'fp32'}"
    )
    print("| model | fwd+bwd seconds, median (min-max) | x num_experts=1 |")
    print("|---|---|---|")
    for e, values in times.items():
        median = statistics.median(values)
        print(f"| E={e} | {median:.3f} ({min(values):.3f}-{max(values):.3f}) | {median / dense:.2f} |")


if __name__ == "__main__":
    main()
