"""The GPT-MoE model family. The two modules here are the files that travel to the Hub with each checkpoint."""

from .configuration_gpt_moe import PRESETS, GPTMoEConfig
from .modeling_gpt_moe import (
    GPTMoECausalLMOutputWithPast,
    GPTMoEForCausalLM,
    GPTMoEModel,
    GPTMoEModelOutputWithPast,
    GPTMoEPreTrainedModel,
)


__all__ = [
    "PRESETS",
    "GPTMoECausalLMOutputWithPast",
    "GPTMoEConfig",
    "GPTMoEForCausalLM",
    "GPTMoEModel",
    "GPTMoEModelOutputWithPast",
    "GPTMoEPreTrainedModel",
]
