"""What a low-bit store costs in quality: perplexity on held-out text, full precision vs 8 and 4 bits, and greedy-token
agreement on the demo's snippets.

Held-out text: the validation split of `examples/train_gpt_moe.py` (whole standard-library modules with
`crc32(name) % 10 == 0`, never seen in training), tokenized with each checkpoint's own tokenizer and cut into blocks
of --block-size tokens; the first --blocks blocks are scored (cross-entropy of every next token, nats). A low-bit
model is `hf_moe_offload.offload.dequantized_copy(model, config)`: what the offloaded model with `weight_bits` equals
bit for bit (the tests check that; this script checks it again on the first block through `load_offloaded`).

Greedy agreement: each demo snippet continued for --new-tokens greedy tokens; "same prefix" is the mean number of new
tokens identical to the full-precision model's before the first difference, "same tokens" the fraction of positions
equal. "top-1 agreement" is the fraction of held-out positions whose argmax next token equals full precision's.

    python benchmarks/quantization_quality.py                              # the shipped demo model
    python benchmarks/quantization_quality.py --models runs/stdlib/S/final runs/stdlib/S+MoE-16/final
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe_offload import OffloadConfig, disable_offload, load_offloaded
from hf_moe_offload.cli.demo import DEMO_MODEL, DEMO_PROMPTS
from hf_moe_offload.offload import dequantized_copy
from hf_moe_offload.training import split_by_module, stdlib_modules, token_blocks


@torch.no_grad()
def score(model, blocks: torch.Tensor, batch: int = 8) -> tuple[float, torch.Tensor]:
    """(mean next-token NLL in nats, argmax next tokens) over `blocks`."""
    total, count, argmax = 0.0, 0, []
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]
        logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
        argmax.append(logits.argmax(-1))
    return total / count, torch.cat(argmax)


@torch.no_grad()
def continuations(model, tokenizer, new_tokens: int) -> list[list[int]]:
    out = []
    for prompt in DEMO_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        tokens = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        out.append(tokens[0, ids.shape[1] :].tolist())
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    prefixes, same, total = [], 0, 0
    for a, b in zip(reference, other, strict=True):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        prefixes.append(prefix)
        same += sum(x == y for x, y in zip(a, b, strict=True))
        total += len(a)
    return sum(prefixes) / len(prefixes), same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=Path, default=[DEMO_MODEL])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, validation = split_by_module(stdlib_modules(), 10)
    results = []
    for path in args.models:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        blocks = token_blocks(tokenizer, validation, args.block_size)[: args.blocks]
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        nll, argmax = score(model, blocks)
        greedy = continuations(model, tokenizer, args.new_tokens)
        name = path.name if path.name != "final" else path.parent.name
        row = {"model": name, "bits": None, "tokens": blocks[:, 1:].numel(), "nll": nll, "ppl": math.exp(nll)}
        results.append(row)
        print(f"{name}: full precision, {row['tokens']} held-out tokens, perplexity {row['ppl']:.3f}", flush=True)
        for bits in args.bits:
            config = OffloadConfig(weight_bits=bits, weight_group_size=args.group_size)
            low = dequantized_copy(model, config).eval()
            q_nll, q_argmax = score(low, blocks)
            prefix, same = agreement(greedy, continuations(low, tokenizer, args.new_tokens))
            with tempfile.TemporaryDirectory() as store:  # the offloaded model equals the dequantized copy
                offloaded = load_offloaded(
                    path,
                    OffloadConfig(offload_device="nvme", nvme_path=store, weight_bits=bits,
                                  weight_group_size=args.group_size),
                    dtype=torch.float32,
                    trust_remote_code=True,
                ).eval()  # fmt: skip
                with torch.no_grad():
                    exact = torch.equal(offloaded(blocks[:1]).logits, low(blocks[:1]).logits)
                disable_offload(offloaded)
            row = {
                "model": name,
                "bits": bits,
                "group_size": args.group_size,
                "nll": q_nll,
                "ppl": math.exp(q_nll),
                "ppl_change": math.exp(q_nll) / math.exp(nll) - 1,
                "top1_agreement": float((q_argmax == argmax).float().mean()),
                "greedy_same_prefix": prefix,
                "greedy_same_tokens": same,
                "offloaded_equals_dequantized": exact,
            }
            results.append(row)
            print(
                f"{name}: {bits}-bit g{args.group_size}: perplexity {row['ppl']:.3f} "
                f"({100 * row['ppl_change']:+.2f}%), top-1 agreement {100 * row['top1_agreement']:.1f}%, greedy same "
                f"prefix {prefix:.1f}/{args.new_tokens} tokens, same tokens {100 * same:.0f}%, offloaded == "
                f"dequantized copy: {exact}",
                flush=True,
            )
    print("\n| model | weights | perplexity | change | top-1 agreement | greedy: same prefix | greedy: same tokens |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        if row["bits"] is None:
            print(f"| {row['model']} | full precision (fp32) | {row['ppl']:.3f} | - | - | - | - |")
            continue
        print(
            f"| {row['model']} | {row['bits']}-bit, group {row['group_size']} | {row['ppl']:.3f} | "
            f"{100 * row['ppl_change']:+.2f}% | {100 * row['top1_agreement']:.1f}% | "
            f"{row['greedy_same_prefix']:.1f} / {args.new_tokens} | {100 * row['greedy_same_tokens']:.0f}% |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
