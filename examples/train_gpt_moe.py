"""DeepSpeed-MoE's headline result, reproduced small: dense S vs S+MoE vs a ~4x dense model, same tokens.

Corpus: the `.py` files of the running interpreter's standard library (real code nobody here wrote), split by top-level
module into train and validation (`pydoc_data`, a dump of the docs as Python strings, is left out). A byte-level BPE
tokenizer is trained on the train split. Each model trains with `transformers.Trainer` on the same token stream
(same batches, same order, same number of steps), and the validation loss (cross-entropy in nats per token, without
the router losses) is measured every `--eval-every` steps on the same validation blocks.

    python examples/train_gpt_moe.py --output-dir runs/stdlib --results benchmarks/results/train_gpt_moe

writes `<results>.json`, `<results>.md` (the table) and `<results>.png` (the validation curves), and keeps each
trained model in `<output-dir>/<model>/final` (Hub layout: weights, code files, tokenizer, Trainer state and model
card). `--models` picks a subset, `--max-steps` shortens the run (e.g. `--max-steps 20 --eval-every 10` for a smoke
test). `hf_moe_offload/demo_model` is the S+MoE-16 of the default run.

`--models S+MoE-16 S+DS-MoE-16` puts DeepSpeed-MoE's own layer beside GPT-MoE's on the same work: S+DS-MoE-<E> is S
whose MoE blocks are `deepspeed.moe.layer.MoE` (`ep_size=1` in a one-process gloo group; the `bench` extra,
`DS_BUILD_OPS=0 pip install -e ".[bench]"`) with the same expert MLP (GPT-MoE's `GPTMoEMLP`), every expert and the
gate drawn from N(0, initializer_range) with zero biases (DeepSpeed itself deep-copies one expert, so its experts
would start identical), top-1, the same capacity factor and min capacity in training, Random Token Selection, dropless
evaluation (its gate's `drop_tokens` off in eval mode), and its `l_aux` (the same Switch loss) summed over the layers,
times `--router-aux-loss-coef`, added to the loss exactly as GPT-MoE adds its own. It is not saved as a checkpoint
(its blocks are DeepSpeed modules); its numbers go to the results like the others'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM
from hf_moe_offload.gpt_moe import parameter_counts, parameter_summary
from hf_moe_offload.gpt_moe.modeling_gpt_moe import GPTMoEMLP
from hf_moe_offload.hub import write_model_card
from hf_moe_offload.training import (
    BlockDataset,
    add_router_metrics,
    split_by_module,
    stdlib_modules,
    token_blocks,
    train_bpe_tokenizer,
)


def prepare_data(args) -> tuple[PreTrainedTokenizerFast, torch.Tensor, torch.Tensor, dict]:
    cache = args.output_dir / "data"
    meta_path = cache / "meta.json"
    train_files, validation_files = split_by_module(stdlib_modules(args.modules), args.validation_every)
    if not train_files or not validation_files:
        raise ValueError(
            f"the split of --modules {args.modules} leaves {len(train_files)} train and {len(validation_files)} "
            "validation files; both need some (a module goes to validation when crc32(name) % --validation-every == 0)"
        )
    meta = {
        "python": sys.version.split()[0],
        "modules": args.modules,
        "stdlib": sysconfig.get_paths()["stdlib"],
        "vocab_size": args.vocab_size,
        "block_size": args.block_size,
        "validation_every": args.validation_every,
        "train_files": len(train_files),
        "validation_files": len(validation_files),
        "train_bytes": sum(p.stat().st_size for p in train_files),
        "validation_bytes": sum(p.stat().st_size for p in validation_files),
    }
    cached = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if {k: v for k, v in cached.items() if k in meta} == meta:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cache / "tokenizer")
        data = torch.load(cache / "blocks.pt")
        return tokenizer, data["train"], data["validation"], cached
    started = time.perf_counter()
    tokenizer = train_bpe_tokenizer(train_files, args.vocab_size)
    train = token_blocks(tokenizer, train_files, args.block_size)
    validation = token_blocks(tokenizer, validation_files, args.block_size)
    meta.update(train_tokens=train.numel(), validation_tokens=validation.numel())
    meta["prepare_seconds"] = round(time.perf_counter() - started, 1)
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(cache / "tokenizer")
    torch.save({"train": train, "validation": validation}, cache / "blocks.tmp")
    (cache / "blocks.tmp").replace(cache / "blocks.pt")
    meta_path.write_text(json.dumps(meta, indent=2))
    return tokenizer, train, validation, meta


def model_configs(args, tokenizer) -> dict[str, GPTMoEConfig]:
    common = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": args.block_size,
        "num_hidden_layers": args.layers,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id,
    }
    h = args.hidden_size
    dense = {"hidden_size": h, "num_attention_heads": h // 32, "intermediate_size": 4 * h}
    big = {"hidden_size": 2 * h, "num_attention_heads": 2 * h // 32, "intermediate_size": 8 * h}  # 4x non-embedding
    moe = {
        "num_experts": args.experts,
        "num_experts_per_tok": args.top_k,
        "moe_layer_frequency": args.moe_layer_frequency,
        "capacity_factor": args.capacity_factor,
        "eval_capacity_factor": None,  # dropless evaluation
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "router_z_loss_coef": args.router_z_loss_coef,
    }
    configs = {
        "S": GPTMoEConfig(**common, **dense),
        f"S+MoE-{args.experts}": GPTMoEConfig(**common, **dense, **moe),
        "4xS": GPTMoEConfig(**common, **big),
    }
    default = list(configs)
    # The same S+MoE, its MoE blocks replaced by DeepSpeed's layer in `build_model`; only when asked for.
    configs[deepspeed_name(args.experts)] = GPTMoEConfig(**common, **dense, **moe)
    if not args.models:
        return {name: configs[name] for name in default}
    unknown = set(args.models) - set(configs)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; valid models are: {', '.join(configs)}")
    return {name: configs[name] for name in args.models}


def deepspeed_name(experts: int) -> str:
    return f"S+DS-MoE-{experts}"


class DeepSpeedMoEBlock(torch.nn.Module):
    """DeepSpeed-MoE's layer in the place of a GPT-MoE MoE block, on the same shapes and routing settings."""

    def __init__(self, config: GPTMoEConfig, moe_class: type):
        super().__init__()
        self.moe = moe_class(
            hidden_size=config.hidden_size,
            expert=GPTMoEMLP(config),
            num_experts=config.num_experts,
            ep_size=1,
            k=config.num_experts_per_tok,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=1.0,  # unused: evaluation is dropless (`forward`)
            min_capacity=config.min_capacity,
            noisy_gate_policy=None,
            drop_tokens=True,
            use_rts=True,
        )
        std = config.initializer_range
        with torch.no_grad():  # GPT-MoE's initialisation (`_init_weights`), drawn per expert
            self.moe.deepspeed_moe.gate.wg.weight.normal_(0.0, std)
            for expert in self.moe.deepspeed_moe.experts.deepspeed_experts:
                for linear in (expert.up_proj, expert.down_proj):
                    linear.weight.normal_(0.0, std)
                    linear.bias.zero_()
        self.aux_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # GPT-MoE evaluates dropless (`eval_capacity_factor=None`); DeepSpeed's gate is dropless with `drop_tokens`
        # off (its capacity is then the busiest expert's count).
        self.moe.deepspeed_moe.gate.drop_tokens = self.training
        output, aux_loss, expert_counts = self.moe(hidden_states)  # (batch, seq, hidden), (), (experts,)
        if self.training:
            self.aux_loss, self.expert_counts = aux_loss, expert_counts
        return output


def deepspeed_moe_model(config: GPTMoEConfig, router_aux_loss_coef: float) -> GPTMoEForCausalLM:
    """S whose MoE blocks (those `config` puts MoE on) are DeepSpeed's layer, its `l_aux` added to the loss."""
    try:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE
    except ImportError as error:
        raise ImportError(
            f"the {deepspeed_name(config.num_experts)} model needs deepspeed, the bench extra: "
            "DS_BUILD_OPS=0 pip install -e '.[bench]'"
        ) from error
    if not dist.is_initialized():  # a one-process group: expert parallel size 1
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29534"), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # fmt: skip
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
    dense = GPTMoEConfig.from_dict({**config.to_dict(), "num_experts": 1})
    model = GPTMoEForCausalLM(dense)
    blocks = []
    for index, layer in enumerate(model.model.layers):
        if config.is_moe_layer(index):
            layer.mlp = DeepSpeedMoEBlock(config, MoE)
            blocks.append(layer.mlp)

    def add_aux_loss(module, args, kwargs, output):
        # GPT-MoE's own rule (`GPTMoEForCausalLM.forward`): coefficient x the sum over the MoE layers, weighted
        # by this micro-batch's share of the step's label tokens under Trainer.
        if not module.training or output.loss is None:
            return output
        router_loss = router_aux_loss_coef * torch.stack([block.aux_loss for block in blocks]).sum()
        num_items_in_batch = kwargs.get("num_items_in_batch")
        if num_items_in_batch is not None:
            shift_labels = kwargs.get("shift_labels")
            counted = shift_labels if shift_labels is not None else kwargs["labels"][..., 1:]
            router_loss = router_loss * counted.ne(-100).sum() / num_items_in_batch
        output.loss = output.loss + router_loss
        return output

    model.register_forward_hook(add_aux_loss, with_kwargs=True)
    model.deepspeed_blocks = blocks
    return model


class DeepSpeedRouterMetrics(TrainerCallback):
    """`router/aux_loss` and `router/load_cv` of the DeepSpeed blocks (means over the micro-batches since the last log;
    DeepSpeed returns the counts before capacity, so the load is that of the first choices)."""

    def __init__(self, blocks: list[DeepSpeedMoEBlock]):
        self.blocks = blocks
        self.aux: list[float] = []
        self.counts: torch.Tensor | None = None

    def on_step_end(self, args, state, control, **kwargs):
        self.aux.append(float(torch.stack([b.aux_loss.detach() for b in self.blocks]).mean()))
        counts = torch.stack([b.expert_counts.float() for b in self.blocks])  # (layers, experts)
        self.counts = counts if self.counts is None else self.counts + counts

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.aux:
            return
        load_cv = (self.counts.std(dim=1, unbiased=False) / self.counts.mean(dim=1)).mean()
        metrics = {"router/aux_loss": sum(self.aux) / len(self.aux), "router/load_cv": float(load_cv)}
        self.aux, self.counts = [], None
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


@torch.no_grad()
def validation_loss(model: GPTMoEForCausalLM, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of `blocks`, router losses excluded."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1]  # (batch, block - 1, vocab)
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


class CurveCallback(TrainerCallback):
    """Validation loss every `every` steps and the time spent in training steps only (evaluation excluded)."""

    def __init__(self, validation: torch.Tensor, every: int, batch_size: int):
        self.validation, self.every, self.batch_size = validation, every, batch_size
        self.curve: list[tuple[int, float]] = []
        self.step_seconds = 0.0
        self._step_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_seconds += time.perf_counter() - self._step_start
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            loss = validation_loss(model, self.validation, self.batch_size)
            self.curve.append((state.global_step, loss))
            state.log_history.append({"step": state.global_step, "eval_loss": loss})  # the key of Trainer.evaluate


def write_card(final: Path, name: str, meta: dict, args) -> Path:
    """The trained model's card (hf_moe_offload.hub): architecture, loading, offloading, and the Trainer's curve."""
    slug = name.lower().replace("+", "-")
    description = (
        f"The {name} model of `examples/train_gpt_moe.py` in `hf_moe_offload`, trained from scratch with "
        f"`transformers.Trainer` on the `.py` files of the Python {meta['python']} standard library (CPython's own "
        f"code, PSF license): {meta['train_tokens'] / 1e6:.2f}M training tokens from {meta['train_files']} files, "
        f"{meta['validation_tokens'] / 1e6:.2f}M validation tokens from {meta['validation_files']} files of held-out "
        f"modules, a byte-level BPE of {meta['vocab_size']} tokens trained on the training split. {args.max_steps} "
        f"steps of {args.batch_size} x {args.block_size} tokens, AdamW (lr {args.learning_rate}, cosine, weight "
        "decay 0.1). A toy: it writes code that looks like Python, not code that works. Reproduce with "
        f"`python examples/train_gpt_moe.py --models {name}`."
    )
    return write_model_card(
        final, repo_id=f"gpt-moe-stdlib-{slug}", license="apache-2.0", language=["code"], description=description
    )


def train_one(name: str, config: GPTMoEConfig, tokenizer, train, validation, meta: dict, args) -> dict:
    torch.manual_seed(args.seed)
    deepspeed = name == deepspeed_name(args.experts)
    model = deepspeed_moe_model(config, args.router_aux_loss_coef) if deepspeed else GPTMoEForCausalLM(config)
    counts = parameter_counts(config)
    tokens_per_step = args.batch_size * args.block_size
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / name / "trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=args.log_every,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_drop_last=True,
        disable_tqdm=not args.progress,
        include_num_input_tokens_seen=True,
    )
    curve = CurveCallback(validation, args.eval_every, args.eval_batch_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=BlockDataset(train), callbacks=[curve])
    if deepspeed:
        trainer.callback_handler.callbacks.insert(0, DeepSpeedRouterMetrics(model.deepspeed_blocks))
    elif config.num_experts != 1:
        add_router_metrics(trainer)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    if not deepspeed:  # a DeepSpeed-block model is no GPT-MoE checkpoint
        final = args.output_dir / name / "final"
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        trainer.state.save_to_json(str(final / "trainer_state.json"))  # the model card's training results
        write_card(final, name, meta, args)
    router = [
        {k: v for k, v in log.items() if k.startswith("router/") and k.count("/") == 1}
        for log in trainer.state.log_history
        if "router/aux_loss" in log
    ]
    return {
        "model": name,
        "implementation": "deepspeed.moe.layer.MoE" if deepspeed else "GPT-MoE",
        "seed": args.seed,
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "experts": config.num_experts,
        "total_params": counts["total"],
        "active_params": counts["active"],
        "non_embedding_total": counts["total"] - counts["embedding"],
        "non_embedding_active": counts["active"] - counts["embedding"],
        "steps": args.max_steps,
        "tokens": args.max_steps * tokens_per_step,
        "train_tokens_per_s": args.max_steps * tokens_per_step / curve.step_seconds,
        "wall_seconds": wall,
        "final_validation_loss": curve.curve[-1][1],
        "validation_curve": curve.curve,
        "train_loss_curve": [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log],
        "last_router_metrics": router[-1] if router else None,
    }


def _with_extension(base: Path, extension: str) -> Path:
    """`base` + extension (`with_suffix` would eat a dotted name such as `run_lr1.5e-3`)."""
    return base.parent / (base.name + extension)


def write_results(results: list[dict], meta: dict, args, command: str) -> None:
    base = args.results
    base.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "data": meta, "torch_threads": torch.get_num_threads(), "models": results}
    _with_extension(base, ".json").write_text(json.dumps(payload, indent=2))
    reference = next((r for r in results if r["model"] == "S"), None)  # throughput ratios need S in the same run
    lines = [
        "| model | total params | active params | non-emb. total | non-emb. active | tokens | val loss (nats) "
        "| train tokens/s | vs S |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M "
            f"| {r['non_embedding_total'] / 1e6:.2f}M | {r['non_embedding_active'] / 1e6:.2f}M "
            f"| {r['tokens'] / 1e6:.2f}M | {r['final_validation_loss']:.4f} | {r['train_tokens_per_s']:.0f} "
            + (f"| {r['train_tokens_per_s'] / reference['train_tokens_per_s']:.2f}x |" if reference else "| n/a |")
        )
    _with_extension(base, ".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hf_moe_offload[examples]'): no plot written")
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    tokens_per_step = args.batch_size * args.block_size
    for r in results:
        steps, losses = zip(*r["validation_curve"])
        axis.plot(
            [s * tokens_per_step / 1e6 for s in steps], losses, label=f"{r['model']} ({r['total_params'] / 1e6:.1f}M)"
        )
    axis.set_xlabel("training tokens (M)")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title(f"Python {meta['python']} stdlib code, validation on held-out modules")
    finals = [r["final_validation_loss"] for r in results]
    axis.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(_with_extension(base, ".png"), dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/stdlib"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/train_gpt_moe"))
    parser.add_argument(
        "--models",
        nargs="*",
        help="subset of: S, S+MoE-<experts>, 4xS, S+DS-MoE-<experts> (DeepSpeed's layer; default: the first three)",
    )
    parser.add_argument("--modules", nargs="*", help="standard-library top-level modules to use (default: all)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--validation-every", type=int, default=10, help="1 module in N goes to validation")
    parser.add_argument("--hidden-size", type=int, default=128, help="S's width; 4xS doubles it")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=1, help="experts per token of S+MoE (1: DeepSpeed-MoE's top-1)")
    parser.add_argument(
        "--moe-layer-frequency", type=int, default=2, help="S+MoE has MoE on every N-th layer (1: every layer)"
    )
    parser.add_argument("--capacity-factor", type=float, default=2.0)
    parser.add_argument("--router-aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--router-z-loss-coef", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=1.5e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-blocks", type=int, default=256, help="validation blocks used (the first N)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show the Trainer's progress bar")
    args = parser.parse_args(argv)
    for name in ("vocab_size", "block_size", "validation_every", "hidden_size", "layers", "experts", "batch_size",
                 "top_k", "moe_layer_frequency"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.hidden_size % 32:
        parser.error(f"--hidden-size ({args.hidden_size}) must be a multiple of 32 (heads of 32 dimensions)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    tokenizer, train, validation, meta = prepare_data(args)
    validation = validation[: args.eval_blocks]
    print(
        f"data: {meta['train_tokens'] / 1e6:.2f}M train tokens ({meta['train_files']} files), "
        f"{meta['validation_tokens'] / 1e6:.2f}M validation tokens ({meta['validation_files']} files), "
        f"{validation.numel() / 1e6:.3f}M used; vocabulary {len(tokenizer)}",
        flush=True,
    )
    results = []
    for name, config in model_configs(args, tokenizer).items():
        print(f"{name}: {parameter_summary(config)}, {args.max_steps} steps", flush=True)
        result = train_one(name, config, tokenizer, train, validation, meta, args)
        print(
            f"{name}: validation loss {result['final_validation_loss']:.4f}, "
            f"{result['train_tokens_per_s']:.0f} train tokens/s, {result['wall_seconds']:.0f} s",
            flush=True,
        )
        results.append(result)
        write_results(results, meta, args, command)
    print(_with_extension(args.results, ".md").read_text())


if __name__ == "__main__":
    main()
