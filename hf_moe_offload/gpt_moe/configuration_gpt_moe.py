# Copyright 2026 The hf_moe_offload authors. Licensed under the Apache License, Version 2.0.
#
# This file travels with every saved GPT-MoE checkpoint (`trust_remote_code=True`): it imports only torch,
# transformers, the standard library and its sibling `modeling_gpt_moe.py`.
"""GPT-MoE model configuration (DeepSpeed-MoE for NLG)."""

# No `from __future__ import annotations` here: `@strict` type-checks the fields from their runtime annotations.
import math

from transformers.activations import ACT2FN

# `strict` (huggingface_hub's dataclass validation, which every transformers v5 config uses) is taken from the module
# that defines `PreTrainedConfig`, so that this Hub file imports nothing but transformers.
from transformers.configuration_utils import PreTrainedConfig, strict


NOISY_GATE_POLICIES = (None, "jitter", "rsample")
POSITION_EMBEDDING_TYPES = ("learned", "rotary")


# Tensor-parallel plans (`tp_plan="auto"`) of the attention, the dense MLP and the experts;
# `GPTMoEConfig.base_model_tp_plan` names those of the blocks a config has. The two `gpt_moe_*` styles are registered
# by `modeling_gpt_moe.py` (the experts have biases, which transformers' `moe_tp_experts` would add once per rank).
_ATTENTION_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}
_DENSE_MLP_TP_PLAN = {"layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"}
_EXPERTS_TP_PLAN = {
    "layers.*.mlp.experts.up_proj": "colwise",
    "layers.*.mlp.experts.up_proj_bias": "gpt_moe_shard_last_dim",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "gpt_moe_tp_experts",
}


@strict
class GPTMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a GPT decoder with a Mixture-of-Experts feed-forward on every `moe_layer_frequency`-th layer
    (DeepSpeed-MoE for NLG). Block `i` is an MoE block when `(i + 1) % moe_layer_frequency == 0` (layers 2, 4, ...
    counted from 1, as in Megatron-DeepSpeed); the others have a dense MLP. A layer with one expert is a dense MLP, so
    `num_experts=1` gives the dense model of the same shape.

    Args:
        vocab_size (`int`): size of the vocabulary.
        hidden_size (`int`): dimension of the hidden states.
        num_hidden_layers (`int`): number of decoder blocks.
        num_attention_heads (`int`): number of attention heads; must divide `hidden_size`.
        intermediate_size (`int`): hidden dimension of the dense MLP and of each expert.
        max_position_embeddings (`int`): longest sequence the learned position table covers.
        num_experts (`int` or `list[int]`): experts per MoE layer, or one count per MoE layer (pyramid MoE).
        num_experts_per_tok (`int`): top-k (1 as in DeepSpeed-MoE for NLG; 2 supported).
        moe_layer_frequency (`int`): an MoE layer every this many blocks (>= 1).
        capacity_factor (`float`): training capacity, `ceil(k * tokens / experts * factor)` slots per expert.
        eval_capacity_factor (`float`, *optional*): capacity factor in eval mode; `None` (default) is dropless.
        min_capacity (`int`): lower bound on the capacity of an expert.
        drop_tokens (`bool`): drop the tokens over capacity (weight 0, only the residual passes); `False` is dropless.
        noisy_gate_policy (`str`, *optional*): `None`, `"jitter"` (multiplicative input noise) or `"rsample"`
            (Gumbel noise for the expert choice), applied in training only.
        router_jitter_noise (`float`): amplitude of the `"jitter"` noise.
        router_aux_loss_coef (`float`): weight of the Switch load-balancing loss in `loss`.
        router_z_loss_coef (`float`): weight of the router z-loss in `loss`.
        use_residual_moe (`bool`): add the Residual-MoE dense branch, mixed with the experts by a learned coefficient.
        output_router_logits (`bool`): return the router logits of every MoE layer.
        position_embedding_type (`str`): `"learned"` (GPT) or `"rotary"`.
        hidden_act (`str`): activation of the MLPs and experts.

    Example:

    ```python
    >>> from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM

    >>> config = GPTMoEConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_experts=8)
    >>> model = GPTMoEForCausalLM(config)
    ```"""

    model_type = "gpt_moe"
    keys_to_ignore_at_inference = ["cache"]
    default_theta = 10000.0
    base_model_ep_plan = {
        "layers.*.mlp.experts.up_proj": "grouped_gemm",
        "layers.*.mlp.experts.up_proj_bias": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj_bias": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 50304
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 2048
    hidden_act: str = "gelu"
    position_embedding_type: str = "learned"
    rope_parameters: dict | None = None
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    hidden_dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    num_experts: int | list[int] = 1
    num_experts_per_tok: int = 1
    moe_layer_frequency: int = 2
    capacity_factor: float | int = 1.0
    eval_capacity_factor: float | int | None = None
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: str | None = None
    router_jitter_noise: float = 0.01
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    use_residual_moe: bool = False
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.noisy_gate_policy, str):
            # DeepSpeed spells them "Jitter" and "RSample".
            self.noisy_gate_policy = self.noisy_gate_policy.lower()
        if isinstance(self.num_experts, tuple):
            self.num_experts = list(self.num_experts)
        self._check_values()
        super().__post_init__(**kwargs)
        self._check_rope()

    # -- layout helpers used by the model, the offload runtime and model cards -----------------------------------

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """The tensor-parallel plan of the blocks this config has: the dense MLP's entries when a block is dense, the
        experts' when one is MoE (a plan entry that matches no module is an error in transformers' checks)."""
        layers = range(self.num_hidden_layers)
        plan = dict(_ATTENTION_TP_PLAN)
        if not all(self.is_moe_layer(i) for i in layers):
            plan.update(_DENSE_MLP_TP_PLAN)
        if any(self.is_moe_layer(i) for i in layers):
            plan.update(_EXPERTS_TP_PLAN)
        return plan

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the blocks that hold an MoE slot (`(i + 1) % moe_layer_frequency == 0`)."""
        return [i for i in range(self.num_hidden_layers) if (i + 1) % self.moe_layer_frequency == 0]

    def num_experts_at(self, layer_idx: int) -> int:
        """Experts in block `layer_idx`: 1 for a dense block."""
        moe_layers = self.moe_layer_indices
        if layer_idx not in moe_layers:
            return 1
        if isinstance(self.num_experts, int):
            return self.num_experts
        return self.num_experts[moe_layers.index(layer_idx)]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.num_experts_at(layer_idx) > 1

    # -- validation: every rule raises ValueError naming the field, the value and the rule -----------------------

    def validate_gpt_moe(self):
        """`@strict` class validator (runs again on `save_pretrained`), same rules as at construction."""
        self._check_values()
        self._check_rope()

    def _check_rope(self):
        """Rope scaling changes rotary positions only: with learned positions it would do nothing, and a sequence
        longer than `max_position_embeddings` would then fail in the position table."""
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if self.position_embedding_type == "learned" and rope_type != "default":
            raise ValueError(
                f"rope_parameters (rope_type {rope_type!r}) scale rotary positions, but position_embedding_type is "
                f"'learned' (a table of max_position_embeddings={self.max_position_embeddings} positions, which rope "
                f"scaling does not extend): use position_embedding_type='rotary', or drop the rope scaling"
            )

    def _check_values(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"position_embedding_type ({self.position_embedding_type!r}) must be one of {POSITION_EMBEDDING_TYPES}"
            )
        if self.position_embedding_type == "rotary" and (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"rotary positions need an even head dim, got hidden_size // num_attention_heads = "
                f"{self.hidden_size // self.num_attention_heads}"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act ({self.hidden_act!r}) must be one of {sorted(ACT2FN)}")
        if self.moe_layer_frequency < 1:
            raise ValueError(
                f"moe_layer_frequency ({self.moe_layer_frequency}) must be >= 1 (block i is an MoE block when "
                "(i + 1) % moe_layer_frequency == 0); use num_experts=1 for a dense model"
            )
        num_moe_layers = self.num_hidden_layers // self.moe_layer_frequency
        if isinstance(self.num_experts, list):
            if len(self.num_experts) != num_moe_layers:
                raise ValueError(
                    f"num_experts is a list of {len(self.num_experts)} counts ({self.num_experts}) but the model has "
                    f"{num_moe_layers} MoE layers (num_hidden_layers={self.num_hidden_layers}, "
                    f"moe_layer_frequency={self.moe_layer_frequency}); give one count per MoE layer or an int"
                )
            counts = self.num_experts
        else:
            counts = [self.num_experts]
        for count in counts:
            if count < 1:
                raise ValueError(f"num_experts ({self.num_experts}) must be >= 1 (1 means a dense MLP)")
        if self.num_experts_per_tok < 1:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be >= 1")
        moe_counts = [count for count in counts if count > 1]
        if moe_counts and self.num_experts_per_tok > min(moe_counts):
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= the number of experts of every MoE "
                f"layer (smallest: {min(moe_counts)})"
            )
        if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise ValueError(f"capacity_factor ({self.capacity_factor}) must be a finite number > 0")
        if self.eval_capacity_factor is not None and not (
            self.eval_capacity_factor > 0 and math.isfinite(self.eval_capacity_factor)
        ):
            raise ValueError(
                f"eval_capacity_factor ({self.eval_capacity_factor}) must be a finite number > 0, or None for "
                "dropless evaluation"
            )
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity ({self.min_capacity}) must be >= 0")
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ValueError(f"noisy_gate_policy ({self.noisy_gate_policy!r}) must be one of {NOISY_GATE_POLICIES}")
        if not 0 <= self.router_jitter_noise < 1:
            raise ValueError(f"router_jitter_noise ({self.router_jitter_noise}) must be in [0, 1)")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} ({value}) must be a finite number >= 0")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} ({value}) must be in [0, 1)")


__all__ = ["GPTMoEConfig"]
