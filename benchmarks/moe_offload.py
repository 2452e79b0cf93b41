"""Offloaded decoding of a large GPT-MoE: fetching only the routed experts ("routed") against whole-layer streaming
("all", the ZeRO-Inference behaviour), all systems in one run.

Model: GPT-MoE shaped like the seed's 350m-moe128 (24 layers, hidden 1024, FFN 4096, MoE on every other layer, top-1)
with --experts experts per MoE layer (64 by default: 13.6 GB in bf16). Its checkpoint is written layer by layer with
random weights (one safetensors shard per layer: the model is never whole in memory), then `load_offloaded` writes the
NVMe store once (expert-major) under --work-dir; later runs reuse both.

Systems (each in its own process; `load_offloaded` with an NVMe store, prefetch_depth 1):
  all              expert_fetch="all": every expert of every MoE layer streams with its block at every step
  routed           expert_fetch="routed" (default): 8 experts cached per layer, speculative prefetch on, whole layers
                   above the break-even
  routed-nospec    the same without speculative prefetch
  routed-nocache   expert_cache_size=0 (nothing kept between steps, so no speculation either)
  routed-noswitch  expert_break_even=1.0: routed fetching at every batch size (measures the break-even)
each with its pages mapped from the page cache (the CPU device's default) or, with the "-direct" suffix, read with
O_DIRECT into buffers (as with a model larger than the page cache; the disk's own direct-read bandwidth is printed),
and with the "-w8" / "-w4" suffix from a low-bit store (`weight_bits`, group 64; e.g. "routed-direct-w4").

Prompts: lines of the Python standard library's own source, as UTF-8 bytes (one token per byte: there is no trained
tokenizer offline; the weights are random, so routing has no learned structure). tokens/s counts the generation phase
only: batch x (new_tokens - 1) / time from the first to the last new token. "Active bytes" are what one token at
batch 1 needs: every dense unit (attention, norms, routers, dense FFNs, the LM head), k experts per MoE layer and one
row per embedding table. Hit rate and speculation recall are measured over --trace-prompts prompts of --trace-tokens
new tokens each at batch 1 (systems "routed" and "routed-nospec"). The prefill is timed on --prefill-batch prompts of
--prefill-tokens tokens (the whole generate call with one new token).

    python benchmarks/moe_offload.py                                    # everything (about 30 minutes on 2 cores)
    python benchmarks/moe_offload.py --systems routed all --batch-sizes 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import sysconfig
import time

from offload_generate import dd_direct  # this directory is on sys.path when run as a script


SYSTEMS = ["all", "routed", "routed-nospec", "routed-nocache", "routed-noswitch"]
SYSTEMS = SYSTEMS + [f"{s}-direct" for s in SYSTEMS]
LOW_BIT = [f"{s}-w{bits}" for s in SYSTEMS for bits in (8, 4)]


def checkpoint(work_dir: str, experts: int) -> str:
    """Write the checkpoint one decoder layer (one shard) at a time, never holding the model."""
    import torch
    from safetensors.torch import save_file

    from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM

    path = os.path.join(work_dir, f"gpt_moe-350m-moe{experts}-bfloat16")
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    os.makedirs(path, exist_ok=True)
    config = GPTMoEConfig.from_preset("350m-moe128", num_experts=experts, dtype="bfloat16")
    with torch.device("meta"):
        model = GPTMoEForCausalLM(config)
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"layer{int(match.group(1)):03d}" if match else "other", []).append((name, param))
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, (group, params) in enumerate(sorted(groups.items())):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, param in params:
            if param.dim() == 1:
                fill = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                tensors[name] = torch.full(param.shape, fill, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(param.shape, generator=generator) * config.initializer_range).to(
                    torch.bfloat16
                )
            weight_map[name] = shard
            total += tensors[name].numel() * 2
        save_file(tensors, os.path.join(path, shard + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, shard + ".tmp"), os.path.join(path, shard))
        print(f"wrote {shard} ({group})", flush=True)
    config.save_pretrained(path)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return path


def stdlib_prompts(count: int, length: int, seed: int) -> list[bytes]:
    """`count` runs of `length` bytes of the standard library's .py sources, picked deterministically."""
    import random

    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        with open(rng.choice(files), "rb") as f:
            data = f.read()
        if len(data) > length + 1:
            start = rng.randrange(len(data) - length)
            prompts.append(data[start : start + length])
    return prompts


def low_bits(system: str) -> int | None:
    """The weight bits of a low-bit system ("...-w8", "...-w4"), else None."""
    match = re.search(r"-w(8|4)$", system)
    return int(match.group(1)) if match else None


def offload_config(system: str, store: str):
    from hf_moe_offload import OffloadConfig

    bits = low_bits(system)
    system = re.sub(r"-w(8|4)$", "", system)
    base = system.removesuffix("-direct")
    options = {
        "all": {"expert_fetch": "all"},
        "routed": {},
        "routed-nospec": {"speculative_prefetch": False},
        "routed-nocache": {"expert_cache_size": 0},
        "routed-noswitch": {"expert_break_even": 1.0},
    }[base]
    return OffloadConfig(
        offload_device="nvme",
        nvme_path=store,
        prefetch_depth=1,
        direct_io=system.endswith("-direct"),
        verify_checksums=False,  # checked when written; a full CRC pass per process would dominate the load time
        weight_bits=bits,
        **options,
    )


def active_bytes(model) -> int:
    """What one token at batch 1 needs (see the module docstring)."""
    import torch

    from hf_moe_offload.offload.api import runtime_of

    state = runtime_of(model)
    total = 0
    for plan, (_, module) in zip(state.plans, state.unit_modules, strict=True):
        if isinstance(module, torch.nn.Embedding):
            total += module.embedding_dim * module.weight.element_size()
            continue
        total += sum(r.nbytes for r in (plan.dense or plan).ranges)
        for layout in plan.experts:
            total += model.config.num_experts_per_tok * layout.nbytes
    return total


def child(args) -> None:
    import torch
    from transformers import LogitsProcessorList

    from hf_moe_offload import get_offload_stats, load_offloaded
    from hf_moe_offload.offload.api import runtime_of
    from hf_moe_offload.timing import StepClock

    system = args.child
    if args.routing == "uniform":
        from hf_moe_offload.gpt_moe import modeling_gpt_moe

        generator = torch.Generator().manual_seed(0)
        original = modeling_gpt_moe.GPTMoERouter.forward

        def uniform(self, hidden_states):
            # a perfectly balanced router (the worst case for routed fetching): each token picks uniformly
            logits, (weights, index) = original(self, hidden_states)
            index = torch.randint(self.num_experts, index.shape, generator=generator)
            return logits, (weights, index)

        modeling_gpt_moe.GPTMoERouter.forward = uniform
    path = checkpoint(args.work_dir, args.experts)
    bits = low_bits(system)
    store = os.path.join(args.work_dir, f"store-350m-moe{args.experts}-bfloat16" + (f"-w{bits}" if bits else ""))
    load_start = time.perf_counter()
    model = load_offloaded(path, offload_config(system, store), dtype=torch.bfloat16).eval()
    load_seconds = time.perf_counter() - load_start
    active = active_bytes(model)
    state = runtime_of(model)
    whole = sum(sum(r.nbytes for r in p.ranges) for p in state.plans)

    def generate(prompts: list[bytes], new_tokens: int, clock=None):
        ids = torch.tensor([list(p) for p in prompts])
        processors = LogitsProcessorList([clock] if clock else [])
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                logits_processor=processors,
            )

    generate(stdlib_prompts(1, 8, seed=99), 2)  # warm-up
    for batch in args.batch_sizes:
        clock = StepClock(lambda: get_offload_stats(model, reset=True))  # counters of the generation phase only
        clock.start()
        tokens = generate(stdlib_prompts(batch, args.prompt_length, seed=batch), args.new_tokens, clock)
        phase = clock.phase(batch)
        steps, seconds = phase.steps, phase.generation_seconds
        stats = get_offload_stats(model)
        result = {
            "system": system,
            "experts": args.experts,
            "batch": batch,
            "tokens_per_s": batch * steps / seconds,
            "generation_seconds": seconds,
            "load_seconds": load_seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "gb_fetched_per_step": stats.bytes_fetched / steps / 1e9,
            "fetched_fraction": stats.fetched_fraction,
            "active_gb": active / 1e9,
            "whole_model_gb": whole / 1e9,
            "fetched_over_active": stats.bytes_fetched / steps / active,
            "read_gb_per_s": sum(stats.store_read_bytes.values()) / seconds / 1e9,
            "fetch_wait_fraction": stats.fetch_wait_seconds / seconds,
            "whole_layer_steps": stats.whole_layer_forwards,
            "hit_rate": stats.expert_hit_rate,
            "tokens_digest": hash(tuple(tokens[:, -args.new_tokens :].reshape(-1).tolist())),
        }
        print("RESULT " + json.dumps(result), flush=True)
    if args.prefill_tokens:
        prompts = stdlib_prompts(args.prefill_batch, args.prefill_tokens, seed=7)
        get_offload_stats(model, reset=True)
        start = time.perf_counter()
        generate(prompts, 1)
        seconds = time.perf_counter() - start
        stats = get_offload_stats(model)
        result = {
            "system": system,
            "experts": args.experts,
            "prefill": args.prefill_batch * args.prefill_tokens,
            "seconds": seconds,
            "gb_fetched": stats.bytes_fetched / 1e9,
            "whole_layer_steps": stats.whole_layer_forwards,
        }
        print("RESULT " + json.dumps(result), flush=True)
    if args.trace_prompts and system in ("routed", "routed-nospec"):  # routing alone decides these counts
        get_offload_stats(model, reset=True)
        start = time.perf_counter()
        for prompt in stdlib_prompts(args.trace_prompts, args.prompt_length, seed=1234):
            generate([prompt], args.trace_tokens)
        stats = get_offload_stats(model)
        result = {
            "system": system,
            "experts": args.experts,
            "trace": True,
            "seconds": time.perf_counter() - start,
            "hit_rate": stats.expert_hit_rate,
            "hits": stats.expert_cache_hits,
            "misses": stats.expert_cache_misses,
            "speculation_precision": stats.speculation_precision,
            "speculation_recall": stats.speculation_recall,
            "speculative_fetches": stats.speculative_fetches,
        }
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill timing (0: none)")
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument(
        "--routing",
        choices=["model", "uniform"],
        default="model",
        help="'uniform': every token picks a uniformly random expert (balanced routing)",
    )
    parser.add_argument("--trace-prompts", type=int, default=8)
    parser.add_argument("--trace-tokens", type=int, default=32)
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS + LOW_BIT)
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/hf_moe_offload_bench"))
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    os.makedirs(args.work_dir, exist_ok=True)
    path = checkpoint(args.work_dir, args.experts)
    bandwidth = dd_direct(path)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; dd iflag=direct {bandwidth:.2f} GB/s", flush=True)
    results = []
    for system in args.systems:
        command = [sys.executable, __file__, "--child", system, "--experts", str(args.experts),
                   "--work-dir", args.work_dir, "--new-tokens", str(args.new_tokens),
                   "--prompt-length", str(args.prompt_length), "--trace-prompts", str(args.trace_prompts),
                   "--trace-tokens", str(args.trace_tokens), "--prefill-tokens", str(args.prefill_tokens),
                   "--prefill-batch", str(args.prefill_batch), "--routing", args.routing,
                   "--batch-sizes", *map(str, args.batch_sizes)]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{system}: failed\n{run.stderr[-3000:]}", flush=True)
        for line in run.stdout.splitlines():
            if not line.startswith("RESULT "):
                continue
            row = json.loads(line[7:])
            results.append(row)
            if "prefill" in row:
                print(
                    f"{system:22s} prefill of {row['prefill']} tokens: {row['seconds']:.2f} s, "
                    f"{row['gb_fetched']:.2f} GB fetched, whole-layer forwards {row['whole_layer_steps']}",
                    flush=True,
                )
                continue
            if row.get("trace"):
                print(
                    f"{system:22s} trace: hit rate {row['hit_rate']:.2f}, speculation precision "
                    f"{row['speculation_precision']:.2f} recall {row['speculation_recall']:.2f}",
                    flush=True,
                )
                continue
            print(
                f"{system:22s} batch {row['batch']:3d}: {row['tokens_per_s']:8.2f} tokens/s, "
                f"{row['gb_fetched_per_step']:.3f} GB/step ({row['fetched_over_active']:.2f}x active), "
                f"hit rate {row['hit_rate']:.2f}, stalled {100 * row['fetch_wait_fraction']:.0f}%, "
                f"peak RSS {row['peak_rss_gb']:.2f} GB",
                flush=True,
            )
    rows = [r for r in results if not r.get("trace") and "prefill" not in r]
    print(
        "\n| system | batch | tokens/s | x all | GB fetched/step | x active bytes | hit rate | stalled | peak RSS GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        bits = low_bits(row["system"])
        io = "-direct" if re.sub(r"-w(8|4)$", "", row["system"]).endswith("-direct") else ""
        same_store = "all" + io + (f"-w{bits}" if bits else "")  # tokens equal within one store's weights
        base = next((r for r in rows if r["system"] == same_store and r["batch"] == row["batch"]), None)
        ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        same = "" if base is None or base["tokens_digest"] == row["tokens_digest"] else " (tokens differ!)"
        print(
            f"| {row['system']} | {row['batch']} | {row['tokens_per_s']:.2f} | {ratio}{same} | "
            f"{row['gb_fetched_per_step']:.3f} | {row['fetched_over_active']:.2f} | {row['hit_rate']:.2f} | "
            f"{100 * row['fetch_wait_fraction']:.0f}% | {row['peak_rss_gb']:.2f} |"
        )
    if rows:
        print(f"\nactive bytes per token {rows[0]['active_gb']:.3f} GB, whole model {rows[0]['whole_model_gb']:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
