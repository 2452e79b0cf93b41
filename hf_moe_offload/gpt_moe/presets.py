"""The GPT-MoE presets (the seed's model family and tiny ones for tests) and the parameter counting of a config.

These serve the package (the command line, model cards, examples), not the model: they stay out of the files that
travel with every checkpoint. `GPTMoEConfig.from_preset` is attached to the config class by `hf_moe_offload.gpt_moe`.
"""

from __future__ import annotations

from .configuration_gpt_moe import GPTMoEConfig


# The seed's models (DeepSpeed-MoE for NLG, Megatron-DeepSpeed `examples_deepspeed/MoE/`): FFN = 4h, sequence 2048,
# GPT-2 vocabulary padded to a multiple of 128 (as Megatron does), init std 0.014 for the MoE recipes.
_GPT_350M = {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096}
_GPT_1_3B = {"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16, "intermediate_size": 8192}
_GPT_6_7B = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 16384}
_SEED_COMMON = {"vocab_size": 50304, "max_position_embeddings": 2048}
_MOE_RECIPE = {
    "num_experts_per_tok": 1,
    "moe_layer_frequency": 2,
    "capacity_factor": 1.0,
    "min_capacity": 4,
    "router_aux_loss_coef": 0.01,
    "initializer_range": 0.014,
}
_TINY = {
    "vocab_size": 512,
    "max_position_embeddings": 128,
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}

PRESETS: dict[str, dict] = {
    "350m": {**_SEED_COMMON, **_GPT_350M},
    "1.3b": {**_SEED_COMMON, **_GPT_1_3B},
    "6.7b": {**_SEED_COMMON, **_GPT_6_7B, "initializer_range": 0.01},
    "350m-moe128": {**_SEED_COMMON, **_GPT_350M, **_MOE_RECIPE, "num_experts": 128},
    "1.3b-moe128": {**_SEED_COMMON, **_GPT_1_3B, **_MOE_RECIPE, "num_experts": 128},
    # PR-MoE: more experts in the last MoE layers, plus the Residual-MoE dense branch.
    "350m-pr-moe": {
        **_SEED_COMMON,
        **_GPT_350M,
        **_MOE_RECIPE,
        "num_experts": [32] * 10 + [64] * 2,
        "use_residual_moe": True,
    },
    "1.3b-pr-moe": {
        **_SEED_COMMON,
        **_GPT_1_3B,
        **_MOE_RECIPE,
        "num_experts": [64] * 10 + [128] * 2,
        "use_residual_moe": True,
    },
    # Tiny models for tests and examples (expert dims are multiples of 8 so `grouped_mm` runs on CPU).
    "tiny": {**_TINY},
    "tiny-moe": {**_TINY, **_MOE_RECIPE, "num_experts": 8, "initializer_range": 0.02},
    "tiny-pr-moe": {**_TINY, **_MOE_RECIPE, "num_experts": [4, 8], "use_residual_moe": True, "initializer_range": 0.02},
}


def preset_config(name: str, **kwargs) -> GPTMoEConfig:
    """A config of the seed's model family (`PRESETS`), with any field overridden by `kwargs`."""
    if name not in PRESETS:
        raise ValueError(f"unknown GPT-MoE preset {name!r}; valid presets are: {', '.join(PRESETS)}")
    return GPTMoEConfig(**{**PRESETS[name], **kwargs})


def human_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def parameter_counts(config: GPTMoEConfig) -> dict[str, int]:
    """Total parameters and parameters active per token, computed from the shapes (no model is built)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    mlp = 2 * h * i + i + h
    attention = 4 * h * h + 4 * h
    norms = 4 * h
    embeddings = v * h + (config.max_position_embeddings * h if config.position_embedding_type == "learned" else 0)
    total = active = embeddings + 2 * h + (0 if config.tie_word_embeddings else v * h)
    for layer_idx in range(config.num_hidden_layers):
        experts = config.num_experts_at(layer_idx)
        total += attention + norms
        active += attention + norms
        if experts == 1:
            total += mlp
            active += mlp
            continue
        router = experts * h
        residual = (mlp + 2 * h + 2) if config.use_residual_moe else 0
        total += router + experts * mlp + residual
        active += router + min(config.num_experts_per_tok, experts) * mlp + residual
    return {"total": total, "active": active, "embedding": embeddings}


def parameter_summary(config: GPTMoEConfig) -> str:
    """`"13.2B total, 357M active per token"`: for `repr`, model cards and the command line."""
    counts = parameter_counts(config)
    return f"{human_count(counts['total'])} total, {human_count(counts['active'])} active per token"
