"""Generation-phase throughput of offloaded greedy decoding, as in the ZeRO-Inference blog, all systems in one run.

Systems (each in its own process, so peak RSS is its own):
  in-memory            the model in CPU memory (`from_pretrained`)
  accelerate-disk      `accelerate.disk_offload` (weights in .dat files, hooks per leaf module)
  accelerate-cpu       `accelerate.cpu_offload` (weights in a CPU state dict, hooks per leaf module)
  ours-cpu-dN          `load_offloaded` with the CPU store, prefetch_depth N
  ours-nvme-dN         `load_offloaded` with the NVMe store, prefetch_depth N: the checkpoint's shards read in place,
                       their pages mapped from the page cache (zero-copy; the defaults on the CPU device)
  ours-nvme-store-dN   the store written once as its own aligned unit files (`reuse_checkpoint=False`), pages mapped
  ours-nvme-copy-dN    the checkpoint's shards read in place and copied into slot buffers by the reader threads
                       (`map_files=False`: the CUDA path's reads)
  ours-nvme-direct-dN  the NVMe store written as unit files and read with O_DIRECT into slot buffers
  ...-w8, ...-w4       any of ours with a low-bit store (`weight_bits=8 | 4`, group 64): packed bytes read,
                       dequantized on the device (e.g. ours-nvme-direct-d2-w4)

Models: GPT-2 shaped with random weights: "355m" (GPT-2 medium: 24 layers, hidden 1024) and "1.3b" (24 layers, hidden
2048), saved once as safetensors under --work-dir. Prompt of 4 tokens, --new-tokens new tokens, KV cache on.
tokens/s counts the generation phase only: batch x (new_tokens - 1) / time from the first to the last token.
Read bandwidth is the store bytes read during that phase over its time; `dd iflag=direct` on the checkpoint gives
the disk's own direct-read bandwidth. Peak RSS is the process's maximum resident set (ru_maxrss).

    python benchmarks/offload_generate.py                       # everything (about an hour on 2 cores)
    python benchmarks/offload_generate.py --models 355m --dtypes float32 --batch-sizes 1 --systems ours-nvme-d1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time


SYSTEMS = [
    "in-memory",
    "accelerate-disk",
    "accelerate-cpu",
    "ours-cpu-d0",
    "ours-cpu-d1",
    "ours-cpu-d2",
    "ours-nvme-d0",
    "ours-nvme-d1",
    "ours-nvme-d2",
    "ours-nvme-store-d1",
    "ours-nvme-copy-d2",
    "ours-nvme-direct-d2",
]
LOW_BIT = [f"{system}-w{bits}" for system in SYSTEMS if system.startswith("ours") for bits in (8, 4)]
BASELINES = ("in-memory", "accelerate-disk")
SHAPES = {"355m": {"n_embd": 1024, "n_layer": 24, "n_head": 16}, "1.3b": {"n_embd": 2048, "n_layer": 24, "n_head": 32}}


def checkpoint(work_dir: str, model: str, dtype: str) -> str:
    path = os.path.join(work_dir, f"gpt2-{model}-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        code = (
            "import torch, sys\n"
            "from transformers import GPT2Config, GPT2LMHeadModel\n"
            "torch.manual_seed(0)\n"
            f"config = GPT2Config(n_positions=1024, **{SHAPES[model]!r})\n"
            f"model = GPT2LMHeadModel(config).to(torch.{dtype})\n"
            f"model.save_pretrained({path!r})\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return path


def dd_direct(path: str) -> float:
    """GB/s of `dd iflag=direct` reading the largest safetensors file of `path`."""
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
    target = max(files, key=os.path.getsize)
    out = subprocess.run(
        ["dd", f"if={target}", "of=/dev/null", "bs=16M", "iflag=direct"], capture_output=True, text=True, check=True
    ).stderr
    copied = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    return int(copied.group(1)) / float(copied.group(2)) / 1e9


def child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from hf_moe_offload import OffloadConfig, get_offload_stats, load_offloaded
    from hf_moe_offload.timing import StepClock

    dtype = getattr(torch, args.dtype)
    system = args.child
    model_path = checkpoint(args.work_dir, args.model, args.dtype)
    load_start = time.perf_counter()
    offloaded = system.startswith("ours")
    if system == "in-memory":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    elif system.startswith("accelerate"):
        from accelerate import cpu_offload, disk_offload

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if system == "accelerate-disk":
            disk_offload(model, os.path.join(args.work_dir, f"accelerate-{args.model}-{args.dtype}"), "cpu")
        else:
            cpu_offload(model, "cpu")
    else:
        match = re.fullmatch(r"ours-(cpu|nvme)(-copy|-direct|-store)?-d(\d)(?:-w(8|4))?", system)
        kind, variant, depth = match.group(1), match.group(2), int(match.group(3))
        bits = int(match.group(4)) if match.group(4) else None
        store = f"store-{args.model}-{args.dtype}" + (f"-w{bits}" if bits else "")
        config = OffloadConfig(
            offload_device=kind,
            nvme_path=os.path.join(args.work_dir, store) if kind == "nvme" else None,
            weight_bits=bits,
            prefetch_depth=depth,
            direct_io=variant == "-direct",
            map_files=variant in (None, "-store"),
            reuse_checkpoint=variant not in ("-store", "-direct"),
        )
        model = load_offloaded(model_path, config, dtype=dtype)
    model.eval()
    load_seconds = time.perf_counter() - load_start

    def new_clock() -> StepClock:  # the offload counters cover the generation phase only
        return StepClock((lambda: get_offload_stats(model, reset=True)) if offloaded else None)

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    model.generate(torch.randint(0, vocab, (1, 4), generator=generator), max_new_tokens=2, do_sample=False)  # warm-up
    for batch in args.batch_sizes:
        ids = torch.randint(0, vocab, (batch, 4), generator=generator)
        clock = new_clock()
        clock.start()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([clock]),
            )
        phase = clock.phase(batch)
        seconds = phase.generation_seconds
        result = {
            "system": system,
            "model": args.model,
            "dtype": args.dtype,
            "batch": batch,
            "tokens_per_s": phase.tokens_per_s,
            "generation_seconds": seconds,
            "load_seconds": load_seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if offloaded:
            stats = get_offload_stats(model)
            read = sum(stats.store_read_bytes.values())
            result.update(
                read_gb_per_s=read / seconds / 1e9,
                fetch_wait_fraction=stats.fetch_wait_seconds / seconds,
                gb_fetched_per_step=stats.bytes_fetched / phase.steps / 1e9,
                fetched_fraction=stats.fetched_fraction,
            )
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS + LOW_BIT)
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/hf_moe_offload_bench"))
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    os.makedirs(args.work_dir, exist_ok=True)
    results = []
    import torch

    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "MALLOC_"))}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, env {omp}")
    for model in args.models:
        for dtype in args.dtypes:
            path = checkpoint(args.work_dir, model, dtype)
            bandwidth = dd_direct(path)
            print(f"\n## {model} {dtype}: dd iflag=direct {bandwidth:.2f} GB/s", flush=True)
            for system in args.systems:
                command = [sys.executable, __file__, "--child", system, "--model", model, "--dtype", dtype,
                           "--work-dir", args.work_dir, "--new-tokens", str(args.new_tokens),
                           "--batch-sizes", *map(str, args.batch_sizes)]  # fmt: skip
                subprocess.run(["sync"], check=False)
                run = subprocess.run(command, capture_output=True, text=True)
                rows = [json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
                if run.returncode != 0:
                    print(f"{system}: failed\n{run.stderr[-2000:]}", flush=True)
                for row in rows:
                    row["dd_direct_gb_per_s"] = bandwidth
                    results.append(row)
                    extra = ""
                    if "read_gb_per_s" in row:
                        extra = (f" read {row['read_gb_per_s']:.2f} GB/s, {row['gb_fetched_per_step']:.2f} GB/step, "
                                 f"stalled {100 * row['fetch_wait_fraction']:.0f}%")  # fmt: skip
                    print(
                        f"{system:22s} batch {row['batch']:3d}: {row['tokens_per_s']:8.2f} tokens/s, "
                        f"peak RSS {row['peak_rss_gb']:.2f} GB{extra}",
                        flush=True,
                    )
    print(
        "\n| model | dtype | batch | system | tokens/s | x in-memory | x accelerate-disk | read GB/s | GB/step "
        "(x full precision) | peak RSS GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        key = (row["model"], row["dtype"], row["batch"])
        base = {r["system"]: r["tokens_per_s"] for r in results if (r["model"], r["dtype"], r["batch"]) == key}
        ratios = [f"{row['tokens_per_s'] / base[name]:.2f}" if name in base else "-" for name in BASELINES]
        read = f"{row['read_gb_per_s']:.2f}" if "read_gb_per_s" in row else "-"
        step = "-"
        if "fetched_fraction" in row:
            step = f"{row['gb_fetched_per_step']:.3f} ({row['fetched_fraction']:.2f}x)"
        print(
            f"| {row['model']} | {row['dtype']} | {row['batch']} | {row['system']} | {row['tokens_per_s']:.2f} | "
            f"{' | '.join(ratios)} | {read} | {step} | {row['peak_rss_gb']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
