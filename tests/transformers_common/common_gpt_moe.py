"""transformers' own common model tests (`ModelTesterMixin`), run against GPT-MoE.

Not part of the suite (`make test` does not collect it: its name does not start with `test_`, and it needs the test
files of the transformers source distribution). Run it with `python tests/transformers_common/run.py`, which fetches
the sdist of the installed transformers version and runs this file against it; see that file for what is left out.

Two testers: MoE on every other block (the DeepSpeed-MoE layout, GPT-MoE's default) and MoE on every block, learned
positions and rotary positions, each with `ModelTesterMixin`'s whole sweep.
"""

from __future__ import annotations

import unittest

import torch
from parameterized import parameterized
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM, GPTMoEModel


# A model inside transformers is listed in the auto classes' name tables, which the mixin reads to know a base model
# (no loss: `test_training` leaves it out) from a causal-LM head (given labels). GPT-MoE registers with the auto
# classes at import (`AutoModelForCausalLM.register`), which does not fill those tables: the tester lists it there.
MODEL_MAPPING_NAMES.setdefault(GPTMoEConfig.model_type, GPTMoEModel.__name__)
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(GPTMoEConfig.model_type, GPTMoEForCausalLM.__name__)


class GPTMoEModelTester:
    def __init__(self, parent, moe_layer_frequency: int = 2, position_embedding_type: str = "learned"):
        self.parent = parent
        self.batch_size = 2
        self.seq_length = 7
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        # A multiple of 4: `experts_implementation="grouped_mm"` (torch's `_grouped_mm`) needs strides that are
        # multiples of 16 bytes, so 37 fails there in fp32 (a kernel constraint, not GPT-MoE's).
        self.intermediate_size = 48
        self.num_experts = 4
        self.moe_layer_frequency = moe_layer_frequency
        self.position_embedding_type = position_embedding_type

    def get_config(self) -> GPTMoEConfig:
        return GPTMoEConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=64,
            num_experts=self.num_experts,
            moe_layer_frequency=self.moe_layer_frequency,
            position_embedding_type=self.position_embedding_type,
            drop_tokens=False,  # dropless: a token's output does not depend on the other tokens of its batch
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class _GPTMoECommonTests(ModelTesterMixin):
    all_model_classes = (GPTMoEModel, GPTMoEForCausalLM)
    moe_layer_frequency = 2
    position_embedding_type = "learned"
    # Its routers' gradients flow only through the routed experts' weights: an expert no token of the tiny batch
    # picked gets no gradient (as in every MoE model transformers tests).
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = GPTMoEModelTester(self, self.moe_layer_frequency, self.position_embedding_type)

    def test_router_logits_are_returned(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = GPTMoEForCausalLM(config).eval()
        with torch.no_grad():
            outputs = model(**inputs, output_router_logits=True)
        moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        self.assertEqual(len(outputs.router_logits), len(moe_layers))


class _LearnedPositions:
    @parameterized.expand([("linear",), ("dynamic",), ("yarn",)])
    def test_model_rope_scaling_from_config(self, scaling_type):
        # The mixin's test scales rotary positions; with learned positions GPT-MoE refuses rope scaling (it would do
        # nothing, and a long input would then fail in the position table). The rotary tester runs the mixin's test.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        with self.assertRaisesRegex(ValueError, "rope_parameters"):
            GPTMoEConfig(**{**config.to_dict(), "rope_parameters": {"rope_type": scaling_type, "factor": 2.0}})


class GPTMoEEveryOtherLayerTest(_LearnedPositions, _GPTMoECommonTests, unittest.TestCase):
    moe_layer_frequency = 2


class GPTMoEEveryLayerTest(_LearnedPositions, _GPTMoECommonTests, unittest.TestCase):
    moe_layer_frequency = 1


class GPTMoERotaryEveryLayerTest(_GPTMoECommonTests, unittest.TestCase):
    moe_layer_frequency = 1
    position_embedding_type = "rotary"
