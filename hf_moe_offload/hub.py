"""Model cards and Hub upload for GPT-MoE checkpoints.

`model_card` renders `model_cards/gpt_moe.md` with `huggingface_hub.ModelCard`/`ModelCardData` from a checkpoint
directory (its `config.json`, and `trainer_state.json` when the training left one); `write_model_card` writes it as
the directory's `README.md`; `push_to_hub` uploads a checkpoint (or a model in memory) with its code files, weights,
tokenizer and card in one commit.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.utils import filter_repo_objects
from transformers import PreTrainedModel
from transformers.utils import logging

from .gpt_moe import GPTMoEConfig
from .gpt_moe.modeling_gpt_moe import MODEL_TAGS
from .gpt_moe.presets import human_count, parameter_counts


logger = logging.get_logger(__name__)


def template_path(name: str = "gpt_moe.md") -> Path:
    """A card template of model_cards/ (at the top of the repository): installed as the package data folder
    `hf_moe_offload/model_cards/` by a wheel, read in place from a source checkout or an editable install."""
    for folder in (Path(__file__).parent / "model_cards", Path(__file__).parent.parent / "model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise RuntimeError(f"the model card template {name} is missing (model_cards/): reinstall hf_moe_offload")


TEMPLATE_PATH = template_path()
# The model files use transformers 5.24 APIs (the `cache` argument, `use_experts_implementation`); setup.cfg pins
# the same floor and a test keeps the two equal.
MIN_TRANSFORMERS = "5.24"
TAGS = MODEL_TAGS
# A README.md that holds this line was written by `write_model_card` and may be rewritten; any other is the user's.
MARKER = "Written by hf_moe_offload (`hf-moe-offload card`): run it again to refresh this card."
CODE_FILES = ("configuration_gpt_moe.py", "modeling_gpt_moe.py")
# What a checkpoint directory uploads: weights, configs, code, tokenizer files, the card. Trainer checkpoints, logs
# and pickles (optimizer state, training_args.bin) stay local.
UPLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.py", "*.txt", "*.model", "README.md"]
IGNORE_PATTERNS = ["checkpoint-*/**", "runs/**", ".*", "**/.*"]
_ROWS = 10


def _load_config(model_dir: Path) -> tuple[GPTMoEConfig, dict]:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} holds no config.json: pass a directory written by save_pretrained")
    raw = json.loads(config_path.read_text())
    model_type = raw.get("model_type")
    if model_type != GPTMoEConfig.model_type:
        raise ValueError(
            f"{config_path} has model_type {model_type!r}; model cards are written for GPT-MoE checkpoints "
            f"(model_type {GPTMoEConfig.model_type!r})"
        )
    return GPTMoEConfig.from_pretrained(model_dir), raw


def _architecture(config: GPTMoEConfig) -> dict[str, Any]:
    moe = [i for i in config.moe_layer_indices if config.is_moe_layer(i)]
    experts = [config.num_experts_at(i) for i in moe]
    if not moe:
        moe_where, moe_blocks, experts_text = "no block", "none (dense)", "1"
    else:
        every = config.moe_layer_frequency
        moe_where = "every block" if every == 1 else ("every other block" if every == 2 else f"every {every}th block")
        moe_blocks = f"{', '.join(map(str, moe))} (of 0-{config.num_hidden_layers - 1})"
        experts_text = str(experts[0]) if len(set(experts)) == 1 else " / ".join(map(str, experts)) + " (pyramid MoE)"
    counts = parameter_counts(config)
    eval_factor = config.eval_capacity_factor
    return {
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "positions": config.position_embedding_type,
        "max_positions": config.max_position_embeddings,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "dense": not moe,
        "moe_where": moe_where,
        "moe_blocks": moe_blocks,
        "experts_per_layer": experts_text,
        "residual": bool(moe) and config.use_residual_moe,
        "top_k": config.num_experts_per_tok,
        "capacity_factor": config.capacity_factor,
        "min_capacity": config.min_capacity,
        "eval_capacity": "dropless" if eval_factor is None else f"capacity factor {eval_factor}",
        "aux_coef": config.router_aux_loss_coef,
        "z_coef": config.router_z_loss_coef,
        "vocab_size": config.vocab_size,
        "tied": config.tie_word_embeddings,
        "total_params": human_count(counts["total"]),
        "active_params": human_count(counts["active"]),
    }


def _training(model_dir: Path) -> dict[str, Any] | None:
    """The card's training section from `trainer_state.json` (`Trainer.state.save_to_json`), or None."""
    path = model_dir / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); remove it or write it again") from err
    history = state.get("log_history", [])
    losses = {log["step"]: log["loss"] for log in history if "loss" in log}
    evals = {log["step"]: log["eval_loss"] for log in history if "eval_loss" in log}
    # The evaluation steps, each with the training loss logged at or just before it (else the training logs).
    steps = sorted(evals or losses)
    if len(steps) > _ROWS:
        stride = len(steps) / _ROWS
        steps = sorted({steps[int(i * stride)] for i in range(1, _ROWS)} | {steps[0], steps[-1]})

    def loss_at(step: int) -> str:
        logged = [s for s in losses if s <= step]
        return f"{losses[max(logged)]:.4f}" if logged else "-"

    rows = [{"step": s, "loss": loss_at(s), "eval_loss": f"{evals[s]:.4f}" if s in evals else "-"} for s in steps]
    router_logs = [log for log in history if "router/aux_loss" in log]
    router = None
    if router_logs:  # `router/<metric>` is the mean over the MoE blocks
        last = router_logs[-1]
        router = {
            "aux_loss": f"{last['router/aux_loss']:.3f}",
            "dropped": f"{100 * last.get('router/dropped_fraction', 0.0):.2f}%",
            "load_cv": f"{last.get('router/load_cv', float('nan')):.3f}",
        }
    epoch = state.get("epoch")
    tokens = state.get("num_input_tokens_seen")
    return {
        "steps": state.get("global_step", 0),
        "epochs": f"{epoch:.2f}" if epoch else None,
        "tokens": human_count(tokens) if tokens else None,
        "batch_size": state.get("train_batch_size"),
        "rows": rows,
        "router": router,
    }


def _existing_card(path: Path, overwrite: bool) -> ModelCard | None:
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    if MARKER not in card.text and not overwrite:
        raise ValueError(
            f"{path} was not written by hf_moe_offload; pass overwrite=True (--overwrite) to replace it with a "
            "generated card"
        )
    return card if MARKER in card.text else None


def _weights_text(model_dir: Path, dtype: str | None) -> str:
    files = list(model_dir.glob("*.safetensors"))
    if not files:
        return "not saved yet"
    size = sum(f.stat().st_size for f in files)
    return f"safetensors, {size / 2**20:.1f} MiB" + (f", {dtype}" if dtype else "")


def model_card(
    model_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    language: list[str] | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    description: str | None = None,
    example_prompt: str | None = None,
    overwrite: bool = False,
) -> ModelCard:
    """The model card of the GPT-MoE checkpoint in `model_dir`, rendered from `model_cards/gpt_moe.md`.

    Metadata not given here (license, datasets, language, base model, extra tags, the description) is kept from a
    card this function wrote before; a `README.md` written by someone else raises unless `overwrite=True`.
    `repo_id` is the name the loading snippets use (default: the directory's name).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    config, raw_config = _load_config(model_dir)
    previous = _existing_card(model_dir / "README.md", overwrite)
    old = previous.data.to_dict() if previous is not None else {}
    if description is None and previous is not None:
        found = re.search(r"<!-- description -->\n(.*?)\n<!-- /description -->", previous.text, re.S)
        description = found.group(1) if found else None
    extra_tags = [t for t in (tags if tags is not None else old.get("tags") or []) if t not in TAGS]
    repo_id = repo_id or old.get("model_name") or model_dir.resolve().name
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license if license is not None else old.get("license"),
        datasets=datasets if datasets is not None else old.get("datasets"),
        language=language if language is not None else old.get("language"),
        base_model=base_model if base_model is not None else old.get("base_model"),
        tags=[*TAGS, *extra_tags],
        model_name=repo_id,
    )
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        marker=MARKER,
        repo_id=repo_id,
        description=description,
        store_name=repo_id.rsplit("/", 1)[-1],
        min_transformers=MIN_TRANSFORMERS,
        has_tokenizer=has_tokenizer,
        example_prompt=json.dumps(example_prompt or "def fibonacci(n):"),
        weights=_weights_text(model_dir, raw_config.get("dtype")),
        training=_training(model_dir),
        datasets_text=", ".join(card_data.datasets or []),
        **_architecture(config),
    )


def write_model_card(model_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Render `model_card(model_dir, **kwargs)` into `model_dir/README.md` (written atomically); returns its path."""
    card = model_card(model_dir, **kwargs)
    path = Path(model_dir) / "README.md"
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(str(card).rstrip("\n") + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the card private to its writer
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_checkpoint(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    if not any(model_dir.glob("*.safetensors")):
        raise ValueError(
            f"{model_dir} holds no .safetensors weights (pickle checkpoints are not uploaded): save the model with "
            "save_pretrained first"
        )
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    missing = [f for f in CODE_FILES if not (model_dir / f).is_file()]
    if config.get("model_type") == GPTMoEConfig.model_type and (missing or "auto_map" not in config):
        what = ", ".join(missing) if missing else "config.json's auto_map"
        raise ValueError(
            f"{model_dir} lacks {what}, without which the checkpoint does not load with trust_remote_code=True: "
            "save it again with save_pretrained after `import hf_moe_offload`"
        )


def push_to_hub(
    model: str | os.PathLike | PreTrainedModel,
    repo_id: str,
    *,
    tokenizer: Any = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    **card_kwargs: Any,
) -> CommitInfo:
    """Upload a GPT-MoE checkpoint to the Hub in one commit: weights (safetensors), config, the two code files with
    `auto_map`, the tokenizer and the model card (rendered for `repo_id` into the commit; the directory's own
    `README.md` is left as it is: refresh it with `write_model_card` / `hf-moe-offload card`).

    Args:
        model (`str`, `os.PathLike` or `PreTrainedModel`):
            A checkpoint directory, or a model in memory (saved to a temporary directory with `tokenizer`).
            Trainer checkpoints, logs and pickles in the directory are not uploaded.
        repo_id (`str`): the Hub repository (created if missing).
        tokenizer: the tokenizer to save beside a model in memory.
        private, token, revision, commit_message, create_pr: as for `huggingface_hub.HfApi.create_commit`.
        card_kwargs: passed to `model_card` (license, datasets, language, base_model, tags, description, overwrite).

    Returns:
        `huggingface_hub.CommitInfo`: the commit.
    """
    if isinstance(model, PreTrainedModel):
        with tempfile.TemporaryDirectory(prefix="hf_moe_offload_push_") as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            return push_to_hub(
                tmp,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
                **card_kwargs,
            )
    if tokenizer is not None:
        raise ValueError(
            "tokenizer is for a model in memory; a checkpoint directory uploads the tokenizer files it holds"
        )
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"cannot upload to {repo_id}: the Hub is offline (HF_HUB_OFFLINE=1)")
    model_dir = Path(model)
    _check_checkpoint(model_dir)
    card = str(model_card(model_dir, repo_id=repo_id, **card_kwargs)).rstrip("\n") + "\n"
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info(f"uploading {model_dir} to {repo_id}")
    files = sorted(
        filter_repo_objects(
            (p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()),
            allow_patterns=UPLOAD_PATTERNS,
            ignore_patterns=[*IGNORE_PATTERNS, "README.md"],
        )
    )
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(model_dir / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or "Upload GPT-MoE with hf_moe_offload",
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )
