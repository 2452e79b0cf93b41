"""Soak run: 1000 offloaded decoding steps; resident memory must stay flat after warm-up (no growth per step).

A Llama-shaped model (8 layers, hidden 512, 32k vocabulary, random weights, saved as safetensors) is loaded with
`load_offloaded`, then `generate` decodes 1000 tokens at batch 1 with a static KV cache (allocated once, so any growth
would be the runtime's), after the same run in memory as the reference. The resident set size is read from
/proc/self/statm after every step; the slope is a least-squares fit over the steps after warm-up.

    python benchmarks/offload_soak.py [--steps 1000] [--modes nvme nvme-copy cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from hf_moe_offload import OffloadConfig, disable_offload, get_offload_stats, load_offloaded


PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class RssRecorder(LogitsProcessor):
    def __init__(self):
        self.rss: list[float] = []

    def __call__(self, input_ids, scores):
        self.rss.append(rss_mb())
        return scores


def slope_kb_per_step(values: list[float]) -> float:
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    cov = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    var = sum((i - mean_x) ** 2 for i in range(n))
    return cov / var * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--modes", nargs="+", default=["in-memory", "nvme", "nvme-copy", "cpu"])
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="offload_soak_")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(os.path.join(work, "model"))
    print("| mode | steps | RSS after warm-up MB | RSS at end MB | growth after warm-up MB | slope KB/step | s/step |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes:
        offload = OffloadConfig(
            offload_device="cpu" if mode == "cpu" else "nvme",
            nvme_path=os.path.join(work, "store") if mode != "cpu" else None,
            map_files=mode != "nvme-copy",
        )
        if mode == "in-memory":  # the reference: what generate itself does to the resident set
            model = LlamaForCausalLM.from_pretrained(os.path.join(work, "model"))
        else:
            model = load_offloaded(os.path.join(work, "model"), offload)
        recorder = RssRecorder()
        start = time.perf_counter()
        model.generate(
            torch.tensor([[1, 2, 3, 4]]),
            max_new_tokens=args.steps,
            min_new_tokens=args.steps,
            do_sample=False,
            cache_implementation="static",
            logits_processor=LogitsProcessorList([recorder]),
        )
        seconds = (time.perf_counter() - start) / args.steps
        after = recorder.rss[args.warmup :]
        print(
            f"| {mode} | {len(recorder.rss)} | {after[0]:.1f} | {after[-1]:.1f} | {after[-1] - after[0]:+.1f} | "
            f"{slope_kb_per_step(after):+.2f} | {seconds:.3f} |",
            flush=True,
        )
        if mode != "in-memory":
            if get_offload_stats(model).forward_passes != args.steps:
                raise RuntimeError("the offloaded model did not run one forward per step")
            disable_offload(model)
        del model


if __name__ == "__main__":
    main()
