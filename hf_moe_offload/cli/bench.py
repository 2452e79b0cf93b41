"""`hf-moe-offload bench MODEL`: in-memory vs offloaded generation of your model, side by side.

Each system runs in a process of its own (its own peak memory), one after the other, on the same random prompts,
greedy with `min_new_tokens`; every batch size is generated `--repeats` times after a warm-up, and the table gives the
median tokens/s with the spread. The machine's load and the thread settings are printed first: on a small machine a
busy neighbour moves these ratios by several times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

from ._common import (
    UsageError,
    add_model_options,
    check_length,
    check_moe_options,
    check_offload_args,
    cpu_count,
    dtype_of,
    generate,
    load_config,
    offload_config,
    peak_memory,
    resolve_model,
)


SYSTEMS = ("in-memory", "offload-cpu", "offload-nvme")
BUSY = 0.25  # a machine whose CPUs were more than this busy before the run gives timings that are not comparable


def register(commands) -> None:
    parser = commands.add_parser("bench", help="in-memory vs offloaded generation throughput for your model")
    add_model_options(parser)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, help="default: in-memory, offload-cpu, and "
                        "offload-nvme when --nvme-path is given")  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=8, help="random prompt length (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each batch size per system (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.set_defaults(func=run, max_new_tokens=16, do_sample=False, repetition_penalty=None)


# -- one system, in its own process -----------------------------------------------------------------------------------


def _measure(args: argparse.Namespace, system: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..offload import get_offload_stats, load_offloaded

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    offloaded = system != "in-memory"
    loading = {"dtype": dtype_of(args.dtype), "trust_remote_code": args.trust_remote_code, "revision": args.revision}
    started = time.perf_counter()
    if offloaded:
        offload = system.removeprefix("offload-")
        model = load_offloaded(args.model, offload_config(args, offload, args.nvme_path if offload == "nvme" else None),
                               **loading)  # fmt: skip
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, **loading)
        if args.weight_bits is not None:  # the reference of a low-bit store: the same dequantized weights
            from ..offload import dequantized_copy

            model = dequantized_copy(model, offload_config(args, "cpu", None))
        model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    load_seconds = time.perf_counter() - started
    device = model.device
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.get_text_config().vocab_size

    def prompt(batch: int) -> dict:
        ids = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=generator).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    fixed = {"min_new_tokens": args.max_new_tokens, "pad_token_id": 0, "do_sample": False}
    generate(model, prompt(1), args, offloaded, **{**fixed, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    results = []
    for batch in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        inputs = prompt(batch)
        runs = []
        for _ in range(args.repeats):
            sequences, phase = generate(model, inputs, args, offloaded, **fixed)
            runs.append((phase, get_offload_stats(model) if offloaded else None))
        phase, stats = sorted(runs, key=lambda r: r[0].tokens_per_s)[len(runs) // 2]  # the median run
        speeds = [p.tokens_per_s for p, _ in runs]
        result = {"system": system, "batch": batch, "load_seconds": load_seconds, **phase.as_dict()}
        result.update(
            tokens_per_s=statistics.median(speeds), tokens_per_s_min=min(speeds), tokens_per_s_max=max(speeds),
            repeats=len(runs),
        )  # fmt: skip
        result["tokens_sha1"] = hashlib.sha1(sequences.cpu().numpy().tobytes()).hexdigest()
        result["peak_memory"] = peak_memory(device)
        if stats is not None:
            result["mb_fetched_per_step"] = stats.bytes_fetched / max(phase.steps, 1) / 1e6
            result["fetched_fraction"] = stats.fetched_fraction  # of the full-precision bytes (a low-bit store)
            result["stall_fraction"] = stats.device_wait_seconds / max(phase.generation_seconds, 1e-9)
            routed = stats.expert_cache_hits + stats.expert_cache_misses
            result["expert_hit_rate"] = stats.expert_hit_rate if routed else None
        results.append(result)
    return results


def _child(args: argparse.Namespace, system: str, connection) -> None:
    """The entry point of a system's process: its results, or its error, go back through `connection`."""
    try:
        connection.send(("ok", _measure(args, system)))
    except BaseException as error:  # everything goes back to the parent, which raises it
        connection.send(("error", f"{type(error).__name__}: {' '.join(str(error).split())}"))
    finally:
        connection.close()


def _run_system(args: argparse.Namespace, system: str) -> list[dict]:
    """`_child` in a fresh interpreter (spawn: nothing of this process's memory or threads carries over)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    process = context.Process(target=_child, args=(child_args, system, send), name=f"hf-moe-offload-bench-{system}")
    process.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:  # the process died without a word (killed, out of memory)
        status, payload = None, None
    process.join()
    if status is None:
        status, payload = "error", f"the process ended with exit code {process.exitcode}"
    if status != "ok":
        raise RuntimeError(f"the {system} run failed: {payload}")
    return payload


# -- the machine ----------------------------------------------------------------------------------------------------


def _busy_fraction(seconds: float = 0.5) -> float | None:
    """How busy the CPUs this process may use were over `seconds` (Linux /proc/stat), or None elsewhere."""

    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    first = sample()
    time.sleep(seconds)
    second = sample()
    if first is None or second is None or second[0] == first[0]:
        return None
    return 1.0 - (second[1] - first[1]) / (second[0] - first[0])


def machine_report() -> tuple[str, list[str]]:
    """A line saying the CPUs, the load and the thread settings, and the warnings about them."""
    import torch

    cpus = cpu_count()
    threads = torch.get_num_threads()
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    busy = _busy_fraction()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    line = (
        f"machine: {cpus} CPUs, torch {threads} threads"
        + (f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else " (OMP_NUM_THREADS unset)")
        + (f", CPUs {100 * busy:.0f}% busy before the run" if busy is not None else "")
        + (f", load average {load:.2f}" if load is not None else "")
    )
    warnings = []
    if busy is not None and busy > BUSY:
        warnings.append(
            f"the CPUs were {100 * busy:.0f}% busy before the run: other processes compete with these timings (their "
            f"threads fight over the cores), so the ratios below are not comparable; measure on an idle machine"
        )
    if threads > cpus:
        warnings.append(
            f"torch uses {threads} threads on {cpus} CPUs: oversubscribed; set OMP_NUM_THREADS={cpus} or fewer"
        )
    return line, warnings


# -- the command ----------------------------------------------------------------------------------------------------


def table(results: list[dict], args: argparse.Namespace) -> str:
    base = {r["batch"]: r for r in results if r["system"] == "in-memory"}
    lines = [
        f"{args.model}: greedy, {args.prompt_tokens} prompt tokens, {args.max_new_tokens} new tokens, dtype "
        f"{args.dtype}, prefetch depth {args.prefetch_depth}; tokens/s of the generation phase, median of "
        f"{args.repeats} (min-max)"
        + (
            f"; {args.weight_bits}-bit store, group {args.weight_group_size} (in-memory: the same dequantized "
            f"weights; MB fetched/step with its fraction of the full-precision bytes)"
            if args.weight_bits is not None
            else ""
        ),
        "",
        "| system | batch | tokens/s | x in-memory | MB fetched/step | fetch stalls | expert hit rate | peak memory "
        "| same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        ref = base.get(r["batch"])
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        same = "-" if not ref or ref is r else ("yes" if ref["tokens_sha1"] == r["tokens_sha1"] else "NO")
        fetched = f"{r['mb_fetched_per_step']:.1f}" if "mb_fetched_per_step" in r else "-"
        if args.weight_bits is not None and "fetched_fraction" in r:
            fetched += f" ({r['fetched_fraction']:.2f}x)"
        stalls = f"{100 * r['stall_fraction']:.0f}%" if "stall_fraction" in r else "-"
        hits = f"{100 * r['expert_hit_rate']:.0f}%" if r.get("expert_hit_rate") is not None else "-"
        speed = f"{r['tokens_per_s']:.2f} ({r['tokens_per_s_min']:.2f}-{r['tokens_per_s_max']:.2f})"
        lines.append(
            f"| {r['system']} | {r['batch']} | {speed} | {ratio} | {fetched} | {stalls} | {hits} "
            f"| {r['peak_memory']} | {same} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    args.model = resolve_model(args.model)
    systems = args.systems or ["in-memory", "offload-cpu", *(["offload-nvme"] if args.nvme_path else [])]
    check_offload_args(args, [s.removeprefix("offload-") for s in systems])
    if any(b < 1 for b in args.batch_sizes) or args.prompt_tokens < 1 or args.repeats < 1:
        raise UsageError("--batch-sizes, --prompt-tokens and --repeats must be >= 1")
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"--json {args.json!r}: the folder {str(folder)!r} does not exist or is not writable")
    config = load_config(args.model, args)
    check_moe_options(args, config)
    check_length(config, args.prompt_tokens, args.max_new_tokens)
    offload_config(args, "cpu", None)  # the offload options are valid (each child builds its own)
    line, warnings = machine_report()
    print(line, flush=True)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    results = []
    for system in systems:
        print(f"bench: {system} ...", file=sys.stderr, flush=True)
        results += _run_system(args, system)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": line, "warnings": warnings, "results": results}, indent=1))
    return 0
