from __future__ import annotations

import pytest

from hf_moe_offload import PRESETS, GPTMoEConfig, GPTMoEForCausalLM
from hf_moe_offload.gpt_moe import parameter_counts


def test_seed_presets_have_the_published_shapes():
    expected = {
        "350m": (24, 1024, 16),
        "1.3b": (24, 2048, 16),
        "6.7b": (32, 4096, 32),
        "350m-moe128": (24, 1024, 16),
        "1.3b-moe128": (24, 2048, 16),
    }
    for name, (layers, hidden, heads) in expected.items():
        config = GPTMoEConfig.from_preset(name)
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, hidden, heads)
        assert config.intermediate_size == 4 * hidden


@pytest.mark.parametrize("name", ["350m-moe128", "1.3b-moe128"])
def test_moe_presets_follow_the_deepspeed_recipe(name):
    config = GPTMoEConfig.from_preset(name)
    assert config.num_experts == 128
    assert config.moe_layer_indices == list(range(1, 24, 2))  # every other FFN: 12 MoE layers
    assert (config.num_experts_per_tok, config.capacity_factor, config.min_capacity) == (1, 1.0, 4)
    assert config.router_aux_loss_coef == 0.01


def test_total_vs_active_parameters_match_the_seed():
    small, large = GPTMoEConfig.from_preset("350m-moe128"), GPTMoEConfig.from_preset("1.3b-moe128")
    assert 12.5e9 < parameter_counts(small)["total"] < 13.5e9  # "350M+MoE-128 (13B)"
    assert 0.30e9 < parameter_counts(small)["active"] < 0.40e9
    assert 51e9 < parameter_counts(large)["total"] < 54e9  # "1.3B+MoE-128 (52B)"
    dense = parameter_counts(GPTMoEConfig.from_preset("350m"))
    assert dense["total"] == dense["active"]


def test_pr_moe_preset_is_a_pyramid_with_residual():
    config = GPTMoEConfig.from_preset("350m-pr-moe")
    assert [config.num_experts_at(i) for i in config.moe_layer_indices] == [32] * 10 + [64] * 2
    assert config.use_residual_moe


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-pr-moe"])
def test_parameter_counts_equal_the_built_model(name):
    config = GPTMoEConfig.from_preset(name)
    model = GPTMoEForCausalLM(config)
    assert parameter_counts(config)["total"] == model.num_parameters()
    assert repr(model).splitlines()[1].strip() == f"parameters: {model.num_parameters():,}"


def test_from_preset_overrides_and_round_trips(tmp_path):
    config = GPTMoEConfig.from_preset("tiny-pr-moe", noisy_gate_policy="RSample", eval_capacity_factor=2.0)
    assert config.noisy_gate_policy == "rsample"  # DeepSpeed's spelling is accepted
    config.save_pretrained(tmp_path)
    loaded = GPTMoEConfig.from_pretrained(tmp_path)
    assert loaded.num_experts == [4, 8] and loaded.eval_capacity_factor == 2.0
    assert loaded.to_dict() == config.to_dict()


def test_dense_shapes():
    dense = GPTMoEConfig.from_preset("tiny-moe", num_experts=1)
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))
    pyramid = GPTMoEConfig.from_preset("tiny-moe", num_experts=[1, 4])
    assert [pyramid.is_moe_layer(i) for i in range(4)] == [False, False, False, True]


BAD_CONFIGS = [
    ({"num_experts": 0}, r"num_experts \(0\) must be >= 1"),
    ({"num_experts": [4, 0]}, r"num_experts \(\[4, 0\]\) must be >= 1"),
    ({"num_experts": [4, 4, 4]}, r"list of 3 counts .* 2 MoE layers"),
    ({"num_experts": 4, "num_experts_per_tok": 5}, r"num_experts_per_tok \(5\) must be <= .* \(smallest: 4\)"),
    ({"num_experts_per_tok": 0}, r"num_experts_per_tok \(0\) must be >= 1"),
    ({"capacity_factor": 0.0}, r"capacity_factor \(0.0\) must be a finite number > 0"),
    ({"capacity_factor": -1.0}, r"capacity_factor \(-1.0\) must be"),
    ({"eval_capacity_factor": 0.0}, r"eval_capacity_factor \(0.0\) must be a finite number > 0, or None"),
    ({"min_capacity": -1}, r"min_capacity \(-1\) must be >= 0"),
    ({"hidden_size": 60, "num_attention_heads": 8}, r"hidden_size \(60\) must be divisible by num_attention_heads"),
    ({"moe_layer_frequency": 0}, r"moe_layer_frequency \(0\) must be >= 1"),
    ({"moe_layer_frequency": -2}, r"moe_layer_frequency \(-2\) must be >= 1"),
    ({"noisy_gate_policy": "gaussian"}, r"noisy_gate_policy \('gaussian'\) must be one of"),
    ({"router_aux_loss_coef": -0.1}, r"router_aux_loss_coef \(-0.1\) must be a finite number >= 0"),
    ({"router_z_loss_coef": float("nan")}, r"router_z_loss_coef \(nan\) must be"),
    ({"position_embedding_type": "alibi"}, r"position_embedding_type \('alibi'\) must be one of"),
    (  # rope scaling with learned positions would do nothing (a long input then fails in the position table)
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        r"rope_parameters \(rope_type 'linear'\) scale rotary positions, but position_embedding_type is 'learned'",
    ),
    ({"hidden_act": "swishy"}, r"hidden_act \('swishy'\) must be one of"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers \(0\) must be >= 1"),
    ({"vocab_size": 0}, r"vocab_size \(0\) must be >= 1"),
    ({"hidden_dropout": 1.0}, r"hidden_dropout \(1.0\) must be in \[0, 1\)"),
    ({"router_jitter_noise": 1.5}, r"router_jitter_noise \(1.5\) must be in \[0, 1\)"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_bad_config_raises_value_error_naming_field_value_and_rule(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTMoEConfig.from_preset(
            "tiny-pr-moe" if "num_experts" in overrides and isinstance(overrides["num_experts"], list) else "tiny-moe",
            **overrides,
        )


def test_bad_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown GPT-MoE preset 'gpt5'; valid presets are: ") as error:
        GPTMoEConfig.from_preset("gpt5")
    for name in PRESETS:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": "abc"}, "hidden_size"),
        ({"num_experts": 2.5}, "num_experts"),
        ({"capacity_factor": "1"}, "capacity_factor"),
    ],
)
def test_wrong_types_are_refused_by_strict_config_checking(overrides, field):
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}'"):
        GPTMoEConfig.from_preset("tiny-moe", **overrides)


def test_invalid_value_assigned_after_construction_is_refused_at_save(tmp_path):
    config = GPTMoEConfig.from_preset("tiny-moe")
    config.num_experts = 0
    with pytest.raises(Exception, match=r"num_experts \(0\) must be >= 1") as error:
        config.save_pretrained(tmp_path)
    assert isinstance(error.value.__cause__, ValueError)
    assert not (tmp_path / "config.json").exists()
