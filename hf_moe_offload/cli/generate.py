"""`hf-moe-offload generate MODEL --offload cpu|nvme --prompt ...`: generate with every weight offloaded, then report
what the generation phase moved and how fast it ran."""

from __future__ import annotations

import argparse

from ._common import (
    UsageError,
    add_model_options,
    add_sampling_options,
    check_length,
    check_moe_options,
    check_offload_args,
    dtype_of,
    generate,
    load_config,
    load_tokenizer,
    offload_config,
    offload_report,
    peak_memory,
    read_prompts,
    resolve_model,
)


def register(commands) -> None:
    parser = commands.add_parser("generate", help="generate with every weight offloaded to CPU memory or NVMe")
    add_model_options(parser)
    parser.add_argument("--offload", choices=("cpu", "nvme"), default="cpu", help="where the weights live")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--prompts-file", help="one prompt per line (.jsonl: one JSON string per line)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (1 streams)")
    parser.add_argument("--tokenizer", help="tokenizer name or path (default: MODEL's)")
    add_sampling_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model_name = resolve_model(args.model)
    if args.offload == "cpu" and args.nvme_path:
        raise UsageError("--nvme-path is the store of --offload nvme; with --offload cpu the weights stay in memory")
    check_offload_args(args, [args.offload])
    if args.batch_size < 1:
        raise UsageError(f"--batch-size ({args.batch_size}) must be >= 1")
    prompts = read_prompts(args)
    config = load_config(model_name, args)
    check_moe_options(args, config)
    tokenizer = load_tokenizer(args, model_name)
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    check_length(config, longest, args.max_new_tokens)  # before anything is loaded
    from transformers import TextStreamer

    from ..offload import OffloadStats, get_offload_stats, load_offloaded

    model = load_offloaded(
        model_name,
        offload_config(args, args.offload, args.nvme_path),
        dtype=dtype_of(args.dtype),
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    ).eval()
    device = model.device
    phases, total = [], OffloadStats()
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        inputs = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        streamer = TextStreamer(tokenizer, skip_special_tokens=True) if len(batch) == 1 else None
        if streamer is not None and len(prompts) > 1:
            print(f"### prompt {start + 1}", flush=True)
        sequences, phase = generate(model, dict(inputs), args, offloaded=True, streamer=streamer)
        if streamer is None:
            for number, text in enumerate(tokenizer.batch_decode(sequences, skip_special_tokens=True), start + 1):
                print(f"### prompt {number}\n{text}\n", flush=True)
        else:
            print(flush=True)  # the streamer ended the line; a blank line separates the completions
        phases.append(phase)
        total = total + get_offload_stats(model)
    seconds = sum(p.generation_seconds for p in phases)
    tokens = sum(p.tokens for p in phases)
    print("---")
    print(
        f"{len(prompts)} prompt(s), batch {args.batch_size}: generation phase {tokens} tokens in {seconds:.2f} s = "
        f"{tokens / seconds if seconds else float('nan'):.2f} tokens/s (prefill "
        f"{sum(p.prefill_seconds for p in phases):.2f} s); offload {args.offload}, prefetch depth "
        f"{args.prefetch_depth}, {device}"
    )
    for line in offload_report(total, phases):
        print(line)
    print(f"peak memory {peak_memory(device)}")
    return 0
