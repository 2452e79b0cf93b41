"""hf_moe_offload: DeepSpeed-MoE for NLG and ZeRO-Inference, native to Hugging Face transformers.

Importing the package registers the `gpt_moe` model type with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`,
and marks the GPT-MoE classes for `save_pretrained` to write their code files and `auto_map` next to the weights.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .gpt_moe import (
    PRESETS,
    GPTMoECausalLMOutputWithPast,
    GPTMoEConfig,
    GPTMoEForCausalLM,
    GPTMoEModel,
    GPTMoEModelOutputWithPast,
    GPTMoEPreTrainedModel,
)
from .offload import (
    OffloadConfig,
    OffloadStats,
    disable_offload,
    enable_offload,
    get_offload_stats,
    load_offloaded,
    offloaded,
)


__version__ = "0.1.0"

AutoConfig.register(GPTMoEConfig.model_type, GPTMoEConfig, exist_ok=True)
AutoModel.register(GPTMoEConfig, GPTMoEModel, exist_ok=True)
AutoModelForCausalLM.register(GPTMoEConfig, GPTMoEForCausalLM, exist_ok=True)
GPTMoEConfig.register_for_auto_class()
GPTMoEModel.register_for_auto_class("AutoModel")
GPTMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PRESETS",
    "GPTMoECausalLMOutputWithPast",
    "GPTMoEConfig",
    "GPTMoEForCausalLM",
    "GPTMoEModel",
    "GPTMoEModelOutputWithPast",
    "GPTMoEPreTrainedModel",
    "OffloadConfig",
    "OffloadStats",
    "__version__",
    "disable_offload",
    "enable_offload",
    "get_offload_stats",
    "load_offloaded",
    "offloaded",
]
