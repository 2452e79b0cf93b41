"""`hf-moe-offload demo`: the shipped GPT-MoE completes Python snippets, offloaded to an NVMe store, next to the same
model in memory (offline, seconds)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from ._common import check_length, generate, offload_report


DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"
MODEL_CODE = Path(__file__).resolve().parent.parent / "gpt_moe"
DEMO_PROMPTS = (
    "import os\n\n\ndef read_file(path):",
    "class Stack:\n    def __init__(self):",
    "    try:\n        import zlib\n    except ImportError:",
    'if __name__ == "__main__":',
)


def register(commands) -> None:
    parser = commands.add_parser("demo", help="the shipped GPT-MoE completes Python snippets, offloaded (no download)")
    parser.add_argument(
        "--offload", choices=("nvme", "cpu"), default="nvme", help="where the weights live (default nvme)"
    )
    parser.add_argument("--device", help="execution device (default: cuda if present, else cpu)")
    parser.add_argument("--prompt", action="append", help="a snippet to complete instead of the built-in ones")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--repetition-penalty", type=float, default=1.3)
    parser.set_defaults(func=run, do_sample=False)  # greedy: the comparison with in memory is exact


def hub_layout(folder: Path) -> Path:
    """The demo checkpoint as it would be downloaded from the Hub, assembled in `folder`: the shipped weights,
    config, tokenizer, card and Trainer state, plus the package's own model code files (which `auto_map` names)."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise RuntimeError(f"the shipped demo model is missing from {DEMO_MODEL}; reinstall hf_moe_offload")
    folder.mkdir(parents=True, exist_ok=True)
    for path in DEMO_MODEL.iterdir():
        if path.is_file():
            shutil.copyfile(path, folder / path.name)
    for path in MODEL_CODE.glob("*_gpt_moe.py"):  # configuration_gpt_moe.py, modeling_gpt_moe.py
        shutil.copyfile(path, folder / path.name)
    return folder


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
    from transformers.utils import logging as hf_logging

    from ..gpt_moe import parameter_summary
    from ..offload import OffloadConfig, OffloadStats, get_offload_stats, load_offloaded

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = args.prompt or list(DEMO_PROMPTS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_moe_offload_demo_") as tmp:
        checkpoint = hub_layout(Path(tmp) / "gpt-moe-demo")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
        # The Hub path: the checkpoint's own code files, through the Auto classes.
        in_memory = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32)
        in_memory.to(device).eval()
        config = in_memory.config
        moe = [i for i in config.moe_layer_indices if config.is_moe_layer(i)]
        print(
            f"GPT-MoE trained by examples/train_gpt_moe.py on the Python standard library: {config.num_hidden_layers} "
            f"blocks, hidden {config.hidden_size}, {config.num_experts} experts (top-{config.num_experts_per_tok}) on "
            f"blocks {', '.join(map(str, moe))}; {parameter_summary(config)} ({DEMO_MODEL})"
        )
        store = os.path.join(tmp, "store") if args.offload == "nvme" else None
        offload_config = OffloadConfig(offload_device=args.offload, nvme_path=store, execution_device=device)
        offloaded = load_offloaded(checkpoint, offload_config, dtype=torch.float32, trust_remote_code=True).eval()
        where = f"an NVMe store in {store}" if store else "CPU memory"
        weights = sum(p.numel() * p.element_size() for p in in_memory.parameters())
        print(f"offloaded every weight ({weights / 1e6:.1f} MB) to {where}; streaming into {device}")
        print(f"greedy, repetition penalty {args.repetition_penalty}, {args.max_new_tokens} new tokens per snippet\n")
        rows, total, same = [], OffloadStats(), 0
        for number, prompt in enumerate(prompts, 1):
            inputs = dict(tokenizer(prompt, return_tensors="pt").to(device))
            check_length(config, inputs["input_ids"].shape[1], args.max_new_tokens)
            print(f"### snippet {number} (offloaded, streamed)")
            streamer = TextStreamer(tokenizer, skip_special_tokens=True)
            got, phase = generate(offloaded, inputs, args, True, streamer=streamer)
            rows.append(("offloaded", phase))
            total = total + get_offload_stats(offloaded)
            want, phase = generate(in_memory, inputs, args, False)
            rows.append(("in-memory", phase))
            same += int(torch.equal(got, want))
            print()
        with torch.no_grad():  # the last snippet with its completion, one forward each
            diff = (offloaded(got).logits - in_memory(got).logits).abs().max().item()
        held = total.slot_bytes + total.resident_bytes + total.expert_cache_bytes
    print("---")
    for system in ("in-memory", "offloaded"):
        phases = [p for s, p in rows if s == system]
        tokens, seconds = sum(p.tokens for p in phases), sum(p.generation_seconds for p in phases)
        print(f"{system:>10}: {tokens / seconds:7.1f} tokens/s in the generation phase (batch 1)")
    for line in offload_report(total, [p for s, p in rows if s == "offloaded"]):
        print(f"{'':>12}{line}")
    if store is None and device.type == "cpu":  # the store and the execution device are one memory
        print(
            f"{'':>12}the CPU store holds all {weights / 1e6:.1f} MB; streaming adds {held / 1e6:.1f} MB of slots and "
            f"expert caches in the same memory (use --offload nvme to keep the weights out of it)"
        )
    else:
        print(f"{'':>12}weights on {device} at any time: {held / 1e6:.1f} MB of {weights / 1e6:.1f} MB")
    print(
        f"same tokens as in memory: {same} of {len(prompts)} snippets; largest |logit difference| on the last one: "
        f"{diff:.1e}; {time.perf_counter() - started:.1f} s in all"
    )
    return 0 if same == len(prompts) else 1
