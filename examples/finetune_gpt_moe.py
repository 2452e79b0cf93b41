"""Fine-tune a GPT-MoE checkpoint with `Trainer`, on one process or several, with expert parallelism if asked.

One process:

    python examples/finetune_gpt_moe.py --model runs/stdlib/S+MoE-16/final --output-dir runs/finetuned

Data parallel (DDP), 2 processes on the CPU (gloo) or one per GPU:

    torchrun --nproc-per-node 2 examples/finetune_gpt_moe.py --model ... --output-dir ...
    accelerate launch --multi_gpu --num_processes 2 examples/finetune_gpt_moe.py --model ... --output-dir ...

Expert parallel: each process holds `num_experts / ep_size` experts of every MoE layer (transformers'
`DistributedConfig`, FSDP2 for the rest of the model, tokens dispatched to the experts' ranks):

    torchrun --nproc-per-node 2 examples/finetune_gpt_moe.py --model ... --output-dir ... --ep-size 2

The data are the `.py` files of the standard library (`--modules` picks top-level modules), tokenized with the
checkpoint's tokenizer (or `--tokenizer`). The fine-tuned model and tokenizer are saved to `--output-dir` as a full
checkpoint that loads in one process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_moe_offload  # noqa: F401  (registers GPT-MoE with the Auto classes)
from hf_moe_offload.training import BlockDataset, add_router_metrics, stdlib_modules, token_blocks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a GPT-MoE checkpoint directory (or Hub id)")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--ep-size", type=int, default=1, help="expert-parallel size (divides the process count)")
    parser.add_argument("--modules", nargs="*", help="standard-library top-level modules to train on (default: all)")
    parser.add_argument("--max-files", type=int)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.ep_size < 1:
        parser.error(f"--ep-size ({args.ep_size}) must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    load_kwargs: dict = {"trust_remote_code": True}
    if args.ep_size > 1:
        if world_size % args.ep_size:
            raise ValueError(
                f"--ep-size ({args.ep_size}) must divide the number of processes ({world_size}); "
                "launch with torchrun --nproc-per-node N or accelerate launch --multi_gpu --num_processes N"
            )
        from transformers.distributed import DistributedConfig

        # FSDP2 over all processes for the dense weights, experts sharded over groups of ep_size processes.
        load_kwargs["distributed_config"] = DistributedConfig(fsdp_size=world_size, ep_size=args.ep_size)
    model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    files = [path for module_files in stdlib_modules(args.modules).values() for path in module_files]
    blocks = token_blocks(tokenizer, files[: args.max_files], args.block_size)

    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        logging_steps=args.logging_steps,
        save_strategy="no",  # a model sharded at load is saved once, at the end (below)
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and world_size > 1 else None,
        seed=args.seed,
        disable_tqdm=int(os.environ.get("RANK", "0")) != 0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=BlockDataset(blocks))
    add_router_metrics(trainer)
    trainer.train()
    trainer.save_model(str(args.output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
