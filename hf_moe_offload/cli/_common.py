"""What several sub-commands share: the usage error, resolving and loading models and tokenizers, the offload
options, running `generate` with the step clock, and the report lines."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ..timing import Phase, StepClock


DTYPES = ("auto", "float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class UsageError(ValueError):
    """Bad input on the command line: one line on stderr and exit code 2."""


# -- resolving and loading models -----------------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """A local checkpoint directory, or a Hub id that can be fetched; a clear UsageError otherwise."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"model path {name!r} holds no config.json (a directory written by save_pretrained)")
        return str(path)
    if not _HUB_ID.fullmatch(name) or name.startswith((".", "~")):
        raise UsageError(f"model path {name!r} does not exist")
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"{name!r} is not a local directory, and as a Hub id it cannot be fetched: the Hub is offline "
            "(HF_HUB_OFFLINE=1) and it is not in the local cache"
        )
    endpoint = urlsplit(constants.ENDPOINT)
    try:  # one quick connection, rather than the download's retries against an unreachable Hub
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as err:
        raise UsageError(
            f"{name!r} is not a local directory, and as a Hub id it cannot be fetched: {constants.ENDPOINT} cannot "
            f"be reached ({err.strerror or err}) and it is not in the local cache"
        ) from err
    return name


def check_nvme_path(path: str) -> None:
    """Refuse a store directory that cannot be created or written before anything is loaded."""
    from ..offload.store import check_writable_dir

    try:
        check_writable_dir(path, what="--nvme-path")
    except ValueError as err:
        raise UsageError(str(err)) from err


def load_config(model: str, args: argparse.Namespace):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code, revision=args.revision)


def moe_layers(config, trust_remote_code: bool) -> int:
    """MoE layers the offload runtime recognises in the model of `config` (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..offload.discovery import find_experts_modules

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return len(find_experts_modules(skeleton, ""))


def dtype_of(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def offload_config(args: argparse.Namespace, offload: str, nvme_path: str | None):
    from ..offload import OffloadConfig

    moe = {}
    if args.expert_fetch is not None:
        moe["expert_fetch"] = args.expert_fetch
    if args.expert_cache_size is not None:
        moe["expert_cache_size"] = args.expert_cache_size
    if args.no_speculative_prefetch:
        moe["speculative_prefetch"] = False
    try:
        return OffloadConfig(
            offload_device=offload,
            nvme_path=nvme_path,
            execution_device=args.device,
            prefetch_depth=args.prefetch_depth,
            weight_bits=args.weight_bits,
            weight_group_size=args.weight_group_size,
            **moe,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err


def check_moe_options(args: argparse.Namespace, config) -> None:
    asked = [
        option
        for option, value in (
            ("--expert-fetch", args.expert_fetch),
            ("--expert-cache-size", args.expert_cache_size),
            ("--no-speculative-prefetch", args.no_speculative_prefetch or None),
        )
        if value is not None
    ]
    if asked and moe_layers(config, args.trust_remote_code) == 0:
        raise UsageError(
            f"{asked[0]} applies to MoE models only; {args.model} (model_type {config.model_type!r}) has no MoE layer"
        )


def check_offload_args(args: argparse.Namespace, offloads: list[str]) -> None:
    if "nvme" in offloads:
        if not args.nvme_path:
            raise UsageError("--offload nvme needs --nvme-path DIR (the store's directory, on the fastest drive)")
        check_nvme_path(args.nvme_path)
    if args.prefetch_depth < 0:
        raise UsageError(f"--prefetch-depth ({args.prefetch_depth}) must be >= 0")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 1")


def load_tokenizer(args: argparse.Namespace, model: str):
    from transformers import AutoTokenizer

    source = args.tokenizer or model
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=args.trust_remote_code, revision=None if args.tokenizer else args.revision
        )
    except (OSError, ValueError) as err:
        raise UsageError(f"no tokenizer could be loaded from {source!r}; pass --tokenizer NAME_OR_PATH") from err
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer of the model's type when there are no files
        raise UsageError(
            f"no tokenizer could be loaded from {source!r} (no tokenizer files); pass --tokenizer NAME_OR_PATH"
        )
    tokenizer.padding_side = "left"  # decoder-only batches: every prompt ends where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        empty = [i for i, prompt in enumerate(args.prompt, 1) if not prompt.strip()]
        if empty:
            raise UsageError(f"--prompt number {empty[0]} is empty: a prompt needs at least one token")
        return list(args.prompt)
    path = Path(args.prompts_file)
    if path.is_dir():
        raise UsageError(f"--prompts-file {str(path)!r} is a directory, not a file of prompts")
    if not path.is_file():
        raise UsageError(f"--prompts-file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(
            f"--prompts-file {str(path)!r} is not UTF-8 text (byte {err.start} cannot be decoded): give one prompt "
            f"per line, or a .jsonl file of JSON strings"
        ) from err
    except OSError as err:
        raise UsageError(f"--prompts-file {str(path)!r} cannot be read: {err.strerror}") from err
    if path.suffix == ".jsonl":  # one JSON string (or {"prompt": ...}) per line: prompts with newlines
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{number} is not JSON ({err.msg})") from err
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str):
                raise UsageError(f"{path}:{number} must be a JSON string or an object with a string 'prompt'")
            prompts.append(prompt)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {str(path)!r} holds no prompt")
    return prompts


def check_length(config, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and prompt_tokens + max_new_tokens > limit:
        raise UsageError(
            f"the longest prompt ({prompt_tokens} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions"
        )


# -- running and reporting ------------------------------------------------------------------------------------------


def generate(model, inputs: dict, args: argparse.Namespace, offloaded: bool, streamer=None, **overrides):
    """`model.generate` with the step clock; offload counters are reset at the first step (generation phase only).
    Returns the sequences and the run's `Phase` (prefill and generation-phase timings)."""
    import torch
    from transformers import LogitsProcessorList

    from ..offload import get_offload_stats

    clock = StepClock((lambda: get_offload_stats(model, reset=True)) if offloaded else None)
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
        torch.manual_seed(args.seed)
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    kwargs.update(overrides)
    batch = inputs["input_ids"].shape[0]
    clock.start()
    with torch.no_grad():
        sequences = model.generate(**inputs, logits_processor=LogitsProcessorList([clock]), streamer=streamer, **kwargs)
    return sequences, clock.phase(batch)


def peak_memory(device) -> str:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {device}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"


def offload_report(stats, phases: list[Phase]) -> list[str]:
    """The lines that say what the offloaded generation phase moved and waited for."""
    seconds = sum(p.generation_seconds for p in phases)
    steps = sum(p.steps for p in phases)
    lines = [
        f"fetched {stats.bytes_fetched / 1e6:.1f} MB ({stats.bytes_fetched / max(steps, 1) / 1e6:.2f} MB per step), "
        f"store reads {sum(stats.store_read_bytes.values()) / 1e6:.1f} MB"
        + (
            f"; at full precision {stats.full_precision_bytes / 1e6:.1f} MB ({stats.fetched_fraction:.2f}x moved)"
            if stats.full_precision_bytes != stats.bytes_fetched
            else ""
        ),
        f"fetch stalls {stats.device_wait_seconds:.3f} s"
        + (f" ({100 * stats.device_wait_seconds / seconds:.0f}% of the generation phase)" if seconds > 0 else ""),
    ]
    routed = stats.expert_cache_hits + stats.expert_cache_misses
    if routed:
        lines.append(
            f"experts: {stats.expert_cache_hits} cache hits, {stats.expert_cache_misses} fetched "
            f"(hit rate {100 * stats.expert_hit_rate:.0f}%), speculation precision "
            f"{100 * stats.speculation_precision:.0f}% / recall {100 * stats.speculation_recall:.0f}%"
        )
    return lines


# -- options shared by sub-commands ---------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a checkpoint directory or a Hub id")
    parser.add_argument("--nvme-path", metavar="DIR", help="directory of the NVMe store (created if missing)")
    parser.add_argument("--prefetch-depth", type=int, default=1, help="blocks fetched ahead (default: 1)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", help="execution device (default: cuda if present, else cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--trust-remote-code", action="store_true", help="run a checkpoint's own code files")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    low_bit = parser.add_argument_group("low-bit store")
    low_bit.add_argument(
        "--weight-bits", type=int, metavar="{8,4}", help="store the matrices in 8 or 4 bits (default: as they are)"
    )
    low_bit.add_argument(
        "--weight-group-size", type=int, default=64, metavar="N", help="weights per quantization group (default 64)"
    )
    moe = parser.add_argument_group("MoE models only")
    moe.add_argument("--expert-fetch", choices=("routed", "all"), help="fetch the routed experts (default) or all")
    moe.add_argument("--expert-cache-size", type=int, metavar="N", help="experts kept on the device per layer")
    moe.add_argument("--no-speculative-prefetch", action="store_true", help="do not guess the next layer's experts")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, help="default: the model's generation config")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
