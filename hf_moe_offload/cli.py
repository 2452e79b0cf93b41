"""The `hf-moe-offload` command (also `python -m hf_moe_offload`).

    hf-moe-offload demo                                   # the shipped GPT-MoE, offloaded to NVMe; offline, < 1 min
    hf-moe-offload generate MODEL --offload nvme --nvme-path DIR --prompt "def parse(path):"
    hf-moe-offload bench MODEL --batch-sizes 1 16         # in-memory vs offloaded generation, side by side
    hf-moe-offload card MODEL_DIR                         # write or refresh the model card (README.md)
    hf-moe-offload upload MODEL_DIR REPO_ID               # weights, code files, tokenizer and card, one commit
    hf-moe-offload presets                                # the GPT-MoE presets with total and active parameters

Errors are one line on stderr and a non-zero exit code (2: bad input, 1: failure); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


DEMO_MODEL = Path(__file__).parent / "demo_model"
DEMO_PROMPTS = (
    "import os\n\n\ndef read_file(path):",
    "class Stack:\n    def __init__(self):",
    "    try:\n        import zlib\n    except ImportError:",
    'if __name__ == "__main__":',
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# -- resolving and loading models -----------------------------------------------------------------------------------


def _resolve_model(name: str) -> str:
    """A local checkpoint directory, or a Hub id that can be fetched; a clear ValueError otherwise."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model path {name!r} holds no config.json (a directory written by save_pretrained)")
        return str(path)
    if not _HUB_ID.fullmatch(name) or name.startswith((".", "~")):
        raise ValueError(f"model path {name!r} does not exist")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ValueError(
            f"{name!r} is not a local directory, and as a Hub id it cannot be fetched: the Hub is offline "
            "(HF_HUB_OFFLINE=1) and it is not in the local cache"
        )
    return name


def _check_nvme_path(path: str) -> None:
    """Refuse a store directory that cannot be created or written before anything is loaded."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".hf_moe_offload_probe_", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--nvme-path {path!r} is not writable: {err.strerror or err}") from err


def _load_config(model: str, args: argparse.Namespace):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code, revision=args.revision)


def _moe_layers(config, trust_remote_code: bool) -> int:
    """MoE layers the offload runtime recognises in the model of `config` (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .offload.discovery import find_experts_modules

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return len(find_experts_modules(skeleton, ""))


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _offload_config(args: argparse.Namespace, offload: str, nvme_path: str | None):
    from .offload import OffloadConfig

    moe = {}
    if args.expert_fetch is not None:
        moe["expert_fetch"] = args.expert_fetch
    if args.expert_cache_size is not None:
        moe["expert_cache_size"] = args.expert_cache_size
    if args.no_speculative_prefetch:
        moe["speculative_prefetch"] = False
    return OffloadConfig(
        offload_device=offload,
        nvme_path=nvme_path,
        execution_device=args.device,
        prefetch_depth=args.prefetch_depth,
        **moe,
    )


def _check_moe_options(args: argparse.Namespace, config) -> None:
    asked = [
        option
        for option, value in (
            ("--expert-fetch", args.expert_fetch),
            ("--expert-cache-size", args.expert_cache_size),
            ("--no-speculative-prefetch", args.no_speculative_prefetch or None),
        )
        if value is not None
    ]
    if asked and _moe_layers(config, args.trust_remote_code) == 0:
        raise ValueError(
            f"{asked[0]} applies to MoE models only; {args.model} (model_type {config.model_type!r}) has no MoE layer"
        )


def _check_offload_args(args: argparse.Namespace, offloads: list[str]) -> None:
    if "nvme" in offloads:
        if not args.nvme_path:
            raise ValueError("--offload nvme needs --nvme-path DIR (the store's directory, on the fastest drive)")
        _check_nvme_path(args.nvme_path)
    if args.prefetch_depth < 0:
        raise ValueError(f"--prefetch-depth ({args.prefetch_depth}) must be >= 0")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 1")


def _load_tokenizer(args: argparse.Namespace, model: str):
    from transformers import AutoTokenizer

    source = args.tokenizer or model
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=args.trust_remote_code, revision=None if args.tokenizer else args.revision
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer could be loaded from {source!r}; pass --tokenizer NAME_OR_PATH") from err
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer of the model's type when there are no files
        raise ValueError(
            f"no tokenizer could be loaded from {source!r} (no tokenizer files); pass --tokenizer NAME_OR_PATH"
        )
    tokenizer.padding_side = "left"  # decoder-only batches: every prompt ends where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ValueError(f"--prompts-file {str(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":  # one JSON string (or {"prompt": ...}) per line: prompts with newlines
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not JSON ({err.msg})") from err
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{number} must be a JSON string or an object with a string 'prompt'")
            prompts.append(prompt)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {str(path)!r} holds no prompt")
    return prompts


def _check_length(config, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({prompt_tokens} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions"
        )


# -- timing and reporting -------------------------------------------------------------------------------------------


def _clock(on_first=None):
    """A logits processor that timestamps every decoding step (the first one ends the prefill)."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            if len(self.times) == 1 and on_first is not None:
                on_first()
            return scores

    return StepClock()


def _generate(model, inputs: dict, args: argparse.Namespace, offloaded: bool, streamer=None, **overrides):
    """`model.generate` with a step clock; offload counters are reset at the first step (generation phase only)."""
    import torch
    from transformers import LogitsProcessorList

    from .offload import get_offload_stats

    clock = _clock((lambda: get_offload_stats(model, reset=True)) if offloaded else None)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
        torch.manual_seed(args.seed)
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    kwargs.update(overrides)
    started = time.perf_counter()
    with torch.no_grad():
        sequences = model.generate(**inputs, logits_processor=LogitsProcessorList([clock]), streamer=streamer, **kwargs)
    return sequences, clock, started


def _phase(clock, started: float, batch: int) -> dict[str, float]:
    """Prefill = up to the first logits; the generation phase = the forwards after it (as the benchmarks count)."""
    steps = len(clock.times) - 1
    seconds = clock.times[-1] - clock.times[0]
    return {
        "prefill_seconds": clock.times[0] - started,
        "generation_seconds": seconds,
        "steps": steps,
        "tokens": batch * steps,
        "tokens_per_s": batch * steps / seconds if seconds > 0 else float("nan"),
    }


def _peak_memory(device) -> str:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {device}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"


def _offload_report(stats, seconds: float, steps: int) -> list[str]:
    lines = [
        f"fetched {stats.bytes_fetched / 1e6:.1f} MB ({stats.bytes_fetched / max(steps, 1) / 1e6:.2f} MB per step), "
        f"store reads {sum(stats.store_read_bytes.values()) / 1e6:.1f} MB",
        f"fetch stalls {stats.fetch_wait_seconds:.3f} s"
        + (f" ({100 * stats.fetch_wait_seconds / seconds:.0f}% of the generation phase)" if seconds > 0 else ""),
    ]
    routed = stats.expert_cache_hits + stats.expert_cache_misses
    if routed:
        lines.append(
            f"experts: {stats.expert_cache_hits} cache hits, {stats.expert_cache_misses} fetched "
            f"(hit rate {100 * stats.expert_hit_rate:.0f}%), speculation precision "
            f"{100 * stats.speculation_precision:.0f}% / recall {100 * stats.speculation_recall:.0f}%"
        )
    return lines


# -- generate -------------------------------------------------------------------------------------------------------


def _generate_command(args: argparse.Namespace) -> int:
    model_name = _resolve_model(args.model)
    if args.offload == "cpu" and args.nvme_path:
        raise ValueError("--nvme-path is the store of --offload nvme; with --offload cpu the weights stay in memory")
    _check_offload_args(args, [args.offload])
    if args.batch_size < 1:
        raise ValueError(f"--batch-size ({args.batch_size}) must be >= 1")
    prompts = _read_prompts(args)
    config = _load_config(model_name, args)
    _check_moe_options(args, config)
    tokenizer = _load_tokenizer(args, model_name)
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    _check_length(config, longest, args.max_new_tokens)  # before anything is loaded
    from transformers import TextStreamer

    from .offload import get_offload_stats, load_offloaded

    model = load_offloaded(
        model_name,
        _offload_config(args, args.offload, args.nvme_path),
        dtype=_dtype(args.dtype),
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    ).eval()
    device = model.device
    phases, stats_total = [], []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        inputs = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        streamer = TextStreamer(tokenizer, skip_special_tokens=True) if len(batch) == 1 else None
        sequences, clock, started = _generate(model, dict(inputs), args, offloaded=True, streamer=streamer)
        if streamer is None:
            for text in tokenizer.batch_decode(sequences, skip_special_tokens=True):
                print(text + "\n", flush=True)
        else:
            print(flush=True)  # the streamer ended the line; a blank line separates the completions
        phases.append(_phase(clock, started, len(batch)))
        stats_total.append(get_offload_stats(model))
    seconds = sum(p["generation_seconds"] for p in phases)
    tokens = sum(p["tokens"] for p in phases)
    print("---")
    print(
        f"{len(prompts)} prompt(s), batch {args.batch_size}: generation phase {tokens} tokens in {seconds:.2f} s = "
        f"{tokens / seconds if seconds else float('nan'):.2f} tokens/s (prefill "
        f"{sum(p['prefill_seconds'] for p in phases):.2f} s); offload {args.offload}, prefetch depth "
        f"{args.prefetch_depth}, {device}"
    )
    for line in _offload_report(_merge_stats(stats_total), seconds, sum(p["steps"] for p in phases)):
        print(line)
    print(f"peak memory {_peak_memory(device)}")
    return 0


def _merge_stats(stats: list):
    """The generation-phase counters of several `generate` calls, summed."""
    from .offload import OffloadStats

    total = OffloadStats()
    for s in stats:
        for name in ("bytes_fetched", "fetch_wait_seconds", "expert_cache_hits", "expert_cache_misses"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        for name in ("speculated", "speculated_correct", "speculated_needed"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        for kind, value in s.store_read_bytes.items():
            total.store_read_bytes[kind] = total.store_read_bytes.get(kind, 0) + value
    return total


# -- bench ----------------------------------------------------------------------------------------------------------

BENCH_SYSTEMS = ("in-memory", "offload-cpu", "offload-nvme")


def _bench_child(args: argparse.Namespace) -> int:
    """One system of `bench`, in its own process so that its peak memory is its own: prints RESULT lines."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM

    from .offload import get_offload_stats, load_offloaded

    system = args.child
    offloaded = system != "in-memory"
    loading = {"dtype": _dtype(args.dtype), "trust_remote_code": args.trust_remote_code, "revision": args.revision}
    started = time.perf_counter()
    if offloaded:
        offload = system.removeprefix("offload-")
        config = _offload_config(args, offload, args.nvme_path if offload == "nvme" else None)
        model = load_offloaded(args.model, config, **loading)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, **loading)
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
    _generate(model, prompt(1), args, offloaded, **{**fixed, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    for batch in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sequences, clock, begun = _generate(model, prompt(batch), args, offloaded, **fixed)
        result = {"system": system, "batch": batch, "load_seconds": load_seconds, **_phase(clock, begun, batch)}
        result["tokens_sha1"] = hashlib.sha1(sequences.cpu().numpy().tobytes()).hexdigest()
        result["peak_memory"] = _peak_memory(device)
        if offloaded:
            stats = get_offload_stats(model)
            result["mb_fetched_per_step"] = stats.bytes_fetched / max(result["steps"], 1) / 1e6
            result["stall_fraction"] = stats.fetch_wait_seconds / max(result["generation_seconds"], 1e-9)
            routed = stats.expert_cache_hits + stats.expert_cache_misses
            result["expert_hit_rate"] = stats.expert_hit_rate if routed else None
        print("RESULT " + json.dumps(result), flush=True)
    return 0


def _bench_command(args: argparse.Namespace) -> int:
    if args.child:
        return _bench_child(args)
    args.model = _resolve_model(args.model)
    systems = args.systems or ["in-memory", "offload-cpu", *(["offload-nvme"] if args.nvme_path else [])]
    _check_offload_args(args, [s.removeprefix("offload-") for s in systems])
    if any(b < 1 for b in args.batch_sizes) or args.prompt_tokens < 1:
        raise ValueError("--batch-sizes and --prompt-tokens must be >= 1")
    config = _load_config(args.model, args)
    _check_moe_options(args, config)
    _check_length(config, args.prompt_tokens, args.max_new_tokens)
    forwarded = _child_options(args)
    results = []
    for system in systems:
        print(f"bench: {system} ...", file=sys.stderr, flush=True)
        child = subprocess.run(
            [sys.executable, "-m", "hf_moe_offload", "bench", args.model, "--child", system, *forwarded],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the {system} run failed: {last}")
        results += [json.loads(line[7:]) for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    print(_bench_table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _child_options(args: argparse.Namespace) -> list[str]:
    options = [
        "--batch-sizes", *map(str, args.batch_sizes),
        "--max-new-tokens", str(args.max_new_tokens),
        "--prompt-tokens", str(args.prompt_tokens),
        "--prefetch-depth", str(args.prefetch_depth),
        "--dtype", args.dtype,
        "--seed", str(args.seed),
    ]  # fmt: skip
    if args.nvme_path:
        options += ["--nvme-path", args.nvme_path]
    if args.device:
        options += ["--device", args.device]
    if args.revision:
        options += ["--revision", args.revision]
    if args.trust_remote_code:
        options.append("--trust-remote-code")
    if args.expert_fetch:
        options += ["--expert-fetch", args.expert_fetch]
    if args.expert_cache_size is not None:
        options += ["--expert-cache-size", str(args.expert_cache_size)]
    if args.no_speculative_prefetch:
        options.append("--no-speculative-prefetch")
    return options


def _bench_table(results: list[dict], args: argparse.Namespace) -> str:
    base = {r["batch"]: r for r in results if r["system"] == "in-memory"}
    lines = [
        f"{args.model}: greedy, {args.prompt_tokens} prompt tokens, {args.max_new_tokens} new tokens, dtype "
        f"{args.dtype}, prefetch depth {args.prefetch_depth}; tokens/s of the generation phase",
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
        stalls = f"{100 * r['stall_fraction']:.0f}%" if "stall_fraction" in r else "-"
        hits = f"{100 * r['expert_hit_rate']:.0f}%" if r.get("expert_hit_rate") is not None else "-"
        lines.append(
            f"| {r['system']} | {r['batch']} | {r['tokens_per_s']:.2f} | {ratio} | {fetched} | {stalls} | {hits} "
            f"| {r['peak_memory']} | {same} |"
        )
    return "\n".join(lines)


# -- demo -----------------------------------------------------------------------------------------------------------


def _demo_command(args: argparse.Namespace) -> int:
    if not (DEMO_MODEL / "config.json").is_file():
        raise RuntimeError(f"the shipped demo model is missing from {DEMO_MODEL}; reinstall hf_moe_offload")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
    from transformers.utils import logging as hf_logging

    from .offload import OffloadConfig, get_offload_stats, load_offloaded

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = args.prompt or list(DEMO_PROMPTS)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL, trust_remote_code=True)
    # The Hub path: the checkpoint's own code files, through the Auto classes.
    in_memory = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, trust_remote_code=True, dtype=torch.float32)
    in_memory.to(device).eval()
    config = in_memory.config
    moe = [i for i in config.moe_layer_indices if config.is_moe_layer(i)]
    print(
        f"GPT-MoE trained by examples/train_gpt_moe.py on the Python standard library: {config.num_hidden_layers} "
        f"blocks, hidden {config.hidden_size}, {config.num_experts} experts (top-{config.num_experts_per_tok}) on "
        f"blocks {', '.join(map(str, moe))}; {config.parameter_summary()} ({DEMO_MODEL})"
    )
    with tempfile.TemporaryDirectory(prefix="hf_moe_offload_demo_") as tmp:
        store = os.path.join(tmp, "store") if args.offload == "nvme" else None
        offload_config = OffloadConfig(offload_device=args.offload, nvme_path=store, execution_device=device)
        offloaded = load_offloaded(DEMO_MODEL, offload_config, dtype=torch.float32, trust_remote_code=True).eval()
        where = f"an NVMe store in {store}" if store else "CPU memory"
        weights = sum(p.numel() * p.element_size() for p in in_memory.parameters())
        print(f"offloaded every weight ({weights / 1e6:.1f} MB) to {where}; streaming into {device}")
        print(f"greedy, repetition penalty {args.repetition_penalty}, {args.max_new_tokens} new tokens per snippet\n")
        rows, stats, same = [], [], 0
        for number, prompt in enumerate(prompts, 1):
            inputs = dict(tokenizer(prompt, return_tensors="pt").to(device))
            _check_length(config, inputs["input_ids"].shape[1], args.max_new_tokens)
            print(f"### snippet {number} (offloaded, streamed)")
            got, clock, begun = _generate(
                offloaded, inputs, args, True, streamer=TextStreamer(tokenizer, skip_special_tokens=True)
            )
            rows.append(("offloaded", _phase(clock, begun, 1)))
            stats.append(get_offload_stats(offloaded))
            want, clock, begun = _generate(in_memory, inputs, args, False)
            rows.append(("in-memory", _phase(clock, begun, 1)))
            same += int(torch.equal(got, want))
            print()
        with torch.no_grad():  # the last snippet with its completion, one forward each
            diff = (offloaded(got).logits - in_memory(got).logits).abs().max().item()
        resident = stats[-1].slot_bytes + stats[-1].resident_bytes + stats[-1].expert_cache_bytes
    print("---")
    for system in ("in-memory", "offloaded"):
        phases = [p for s, p in rows if s == system]
        tokens, seconds = sum(p["tokens"] for p in phases), sum(p["generation_seconds"] for p in phases)
        print(f"{system:>10}: {tokens / seconds:7.1f} tokens/s in the generation phase (batch 1)")
    merged = _merge_stats(stats)
    steps = sum(p["steps"] for s, p in rows if s == "offloaded")
    seconds = sum(p["generation_seconds"] for s, p in rows if s == "offloaded")
    for line in _offload_report(merged, seconds, steps):
        print(f"{'':>12}{line}")
    print(f"{'':>12}weights on {device} at any time: {resident / 1e6:.1f} MB of {weights / 1e6:.1f} MB")
    print(
        f"same tokens as in memory: {same} of {len(prompts)} snippets; largest |logit difference| on the last one: "
        f"{diff:.1e}; {time.perf_counter() - started:.1f} s in all"
    )
    return 0 if same == len(prompts) else 1


# -- card, upload, presets ------------------------------------------------------------------------------------------


def _card_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("license", "datasets", "language", "base_model", "tags", "description")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _card_command(args: argparse.Namespace) -> int:
    from .hub import write_model_card

    path = write_model_card(args.model_dir, repo_id=args.repo_id, overwrite=args.overwrite, **_card_kwargs(args))
    print(f"wrote {path}")
    return 0


def _upload_command(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    commit = push_to_hub(
        args.model_dir,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        overwrite=args.overwrite,
        **_card_kwargs(args),
    )
    print(f"uploaded {args.model_dir} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


def _presets_command(args: argparse.Namespace) -> int:
    from .gpt_moe import PRESETS, GPTMoEConfig

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


# -- the parser -----------------------------------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a checkpoint directory or a Hub id")
    parser.add_argument("--nvme-path", metavar="DIR", help="directory of the NVMe store (created if missing)")
    parser.add_argument("--prefetch-depth", type=int, default=1, help="blocks fetched ahead (default: 1)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", help="execution device (default: cuda if present, else cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--trust-remote-code", action="store_true", help="run a checkpoint's own code files")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    moe = parser.add_argument_group("MoE models only")
    moe.add_argument("--expert-fetch", choices=("routed", "all"), help="fetch the routed experts (default) or all")
    moe.add_argument("--expert-cache-size", type=int, metavar="N", help="experts kept on the device per layer")
    moe.add_argument("--no-speculative-prefetch", action="store_true", help="do not guess the next layer's experts")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, help="default: the model's generation config")


def _add_card_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--license", help="e.g. apache-2.0 (default: kept from the card, else none)")
    parser.add_argument("--datasets", nargs="+", metavar="DATASET", help="Hub ids of the training data")
    parser.add_argument("--language", nargs="+", help="e.g. en, code")
    parser.add_argument("--base-model", help="the model this one was fine-tuned from")
    parser.add_argument("--tags", nargs="+", metavar="TAG", help="tags besides custom_code, moe, gpt_moe, ...")
    parser.add_argument("--description", help="a paragraph on what the model is and what it was trained on")
    parser.add_argument("--overwrite", action="store_true", help="replace a README.md not written by this command")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-moe-offload", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="the shipped GPT-MoE completes Python snippets, offloaded (no download)")
    demo.add_argument(
        "--offload", choices=("nvme", "cpu"), default="nvme", help="where the weights live (default nvme)"
    )
    demo.add_argument("--device", help="execution device (default: cuda if present, else cpu)")
    demo.add_argument("--prompt", action="append", help="a snippet to complete instead of the built-in ones")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--repetition-penalty", type=float, default=1.3)
    demo.set_defaults(func=_demo_command, do_sample=False)  # greedy: the comparison with in memory is exact

    generate = commands.add_parser("generate", help="generate with every weight offloaded to CPU memory or NVMe")
    _add_model_options(generate)
    generate.add_argument("--offload", choices=("cpu", "nvme"), default="cpu", help="where the weights live")
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--prompts-file", help="one prompt per line (.jsonl: one JSON string per line)")
    generate.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (1 streams)")
    generate.add_argument("--tokenizer", help="tokenizer name or path (default: MODEL's)")
    _add_sampling_options(generate)
    generate.set_defaults(func=_generate_command)

    bench = commands.add_parser("bench", help="in-memory vs offloaded generation throughput for your model")
    _add_model_options(bench)
    bench.add_argument("--systems", nargs="+", choices=BENCH_SYSTEMS, help="default: in-memory, offload-cpu, and "
                       "offload-nvme when --nvme-path is given")  # fmt: skip
    bench.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    bench.add_argument("--prompt-tokens", type=int, default=8, help="random prompt length (default 8)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", help="also write the results to this file")
    bench.add_argument("--child", choices=BENCH_SYSTEMS, help=argparse.SUPPRESS)
    bench.set_defaults(func=_bench_command, max_new_tokens=16, do_sample=False, repetition_penalty=None)

    card = commands.add_parser("card", help="write or refresh MODEL_DIR/README.md, the model card")
    card.add_argument("model_dir", metavar="MODEL_DIR")
    card.add_argument("--repo-id", help="the name the card's snippets load (default: kept, else the directory's)")
    _add_card_options(card)
    card.set_defaults(func=_card_command)

    upload = commands.add_parser("upload", help="push weights, code files, tokenizer and card to the Hub")
    upload.add_argument("model_dir", metavar="MODEL_DIR")
    upload.add_argument("repo_id", metavar="REPO_ID")
    upload.add_argument("--private", action="store_true")
    upload.add_argument("--revision", help="branch to push to")
    upload.add_argument("--commit-message")
    upload.add_argument("--create-pr", action="store_true")
    _add_card_options(upload)
    upload.set_defaults(func=_upload_command)

    presets = commands.add_parser("presets", help="list the GPT-MoE presets with total and active parameters")
    presets.set_defaults(func=_presets_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"hf-moe-offload {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, ImportError) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"hf-moe-offload {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
