"""The GPT-MoE model family. `configuration_gpt_moe.py` and `modeling_gpt_moe.py` are the files that travel to the Hub
with each checkpoint; `presets.py` (the seed's model family, parameter counting) serves the package only."""

from .configuration_gpt_moe import GPTMoEConfig
from .modeling_gpt_moe import (
    GPTMoECausalLMOutputWithPast,
    GPTMoEForCausalLM,
    GPTMoEModel,
    GPTMoEModelOutputWithPast,
    GPTMoEPreTrainedModel,
)
from .presets import PRESETS, parameter_counts, parameter_summary, preset_config


# `GPTMoEConfig.from_preset(name, **overrides)`: the presets live outside the file that travels with checkpoints, so
# the package gives the class this constructor when it is imported (a checkpoint loaded elsewhere has no need of it).
GPTMoEConfig.from_preset = classmethod(lambda cls, name, **kwargs: preset_config(name, **kwargs))

__all__ = [
    "PRESETS",
    "GPTMoECausalLMOutputWithPast",
    "GPTMoEConfig",
    "GPTMoEForCausalLM",
    "GPTMoEModel",
    "GPTMoEModelOutputWithPast",
    "GPTMoEPreTrainedModel",
    "parameter_counts",
    "parameter_summary",
    "preset_config",
]
