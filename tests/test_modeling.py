"""GPT-MoE behaves like an in-tree transformers model wherever the common model tests look."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import hf_moe_offload
from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM, GPTMoEModel
from hf_moe_offload.gpt_moe import modeling_gpt_moe


VARIANTS = {
    "moe-top1": {},
    "moe-top2": {"num_experts_per_tok": 2},  # capacity 1.0 in training, dropless in eval
    "pyramid-residual-rotary": {"num_experts": [4, 8], "use_residual_moe": True, "position_embedding_type": "rotary"},
    "dense": {"num_experts": 1},
}


def tiny_model(**overrides) -> GPTMoEForCausalLM:
    torch.manual_seed(0)
    config = GPTMoEConfig.from_preset("tiny-moe", **overrides)
    return GPTMoEForCausalLM(config).eval()


def inputs(batch=2, seq=12, vocab=512, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_loss_includes_router_losses(variant):
    model = tiny_model(**VARIANTS[variant], router_z_loss_coef=0.001)
    ids = inputs()
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 512)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    if variant == "dense":
        assert out.aux_loss is None and torch.allclose(out.loss, ce)
        return
    expected = ce + 0.01 * out.aux_loss + 0.001 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    num_moe = len(model.config.moe_layer_indices)
    assert out.layer_aux_losses.shape == (num_moe,) and out.dropped_token_fraction.shape == (num_moe,)
    assert out.router_logits is None  # not requested
    k = model.config.num_experts_per_tok
    assert [int(c.sum()) for c in out.expert_token_counts] == [
        round(24 * k * (1 - float(d))) for d in out.dropped_token_fraction
    ]


def test_router_logits_on_request():
    model = tiny_model(num_experts=[4, 8])
    out = model(inputs(), output_router_logits=True)
    assert [tuple(r.shape) for r in out.router_logits] == [(24, 4), (24, 8)]
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    assert out.aux_loss is not None and out.loss is None


def test_hidden_states_and_attentions_outputs():
    model = tiny_model()
    model.set_attn_implementation("eager")
    out = model(inputs(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    assert out.attentions[0].shape == (2, 4, 12, 12)
    torch.testing.assert_close(out.hidden_states[-1], model.model(inputs()).last_hidden_state)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_and_no_cache_logits_agree(variant):
    model = tiny_model(**VARIANTS[variant])
    ids = inputs(seq=10)
    full = model(ids, use_cache=False).logits
    prefix = model(ids[:, :6], use_cache=True)
    cache = prefix.cache
    steps = [prefix.logits]
    for t in range(6, 10):
        step = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = step.cache
        steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)  # SDPA with and without cache


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_with_and_without_cache(variant):
    model = tiny_model(**VARIANTS[variant])
    ids = inputs(batch=1, seq=4)
    with_cache = model.generate(ids, max_new_tokens=8, do_sample=False)
    without = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    static = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert with_cache.shape == (1, 12)
    assert torch.equal(with_cache, without) and torch.equal(with_cache, static)


def test_left_padded_batch_generates_like_single_prompts():
    model = tiny_model(pad_token_id=0)
    a, b = inputs(batch=1, seq=6, seed=2), inputs(batch=1, seq=4, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[0, 6:], model.generate(a, max_new_tokens=6, do_sample=False)[0, 6:])
    assert torch.equal(out[1, 6:], model.generate(b, max_new_tokens=6, do_sample=False)[0, 4:])


def test_past_key_values_name_still_accepted():
    model = tiny_model()
    ids = inputs()
    first = model(ids[:, :8], use_cache=True)
    with pytest.warns(FutureWarning):
        second = model(ids[:, 8:], past_key_values=first.cache, use_cache=True)
    torch.testing.assert_close(second.logits, model(ids).logits[:, 8:], rtol=1e-5, atol=1e-5)  # cache vs full


@pytest.mark.parametrize("variant", ["moe-top1", "moe-top2", "pyramid-residual-rotary"])
def test_experts_implementations_agree_forward_and_backward(variant, force_sorted_mm_layout):
    grads, logits = {}, {}
    runs = ("eager", "grouped_mm", "batched_mm", "sorted_mm:sorted", "sorted_mm:padded")
    for run in runs:
        implementation, _, layout = run.partition(":")
        if layout:  # force each of sorted_mm's two row layouts
            force_sorted_mm_layout(layout)
        model = tiny_model(**VARIANTS[variant])
        model.set_experts_implementation(implementation)
        model.train()
        torch.manual_seed(5)  # same random token selection in every run
        ids = inputs()
        out = model(ids, labels=ids)
        out.loss.backward()
        logits[run] = out.logits.detach()
        grads[run] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for run in runs[1:]:
        torch.testing.assert_close(logits[run], logits["eager"], rtol=1e-5, atol=1e-5)  # kernel summation order
        assert grads[run].keys() == grads["eager"].keys()
        for name, grad in grads["eager"].items():
            torch.testing.assert_close(grads[run][name], grad, rtol=1e-4, atol=1e-6, msg=f"{run} {name}")


def test_save_load_round_trip(tmp_path):
    model = tiny_model(num_experts=[4, 8], use_residual_moe=True)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "configuration_gpt_moe.py", "modeling_gpt_moe.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gpt_moe.GPTMoEConfig",
        "AutoModelForCausalLM": "modeling_gpt_moe.GPTMoEForCausalLM",
    }
    assert config["model_type"] == "gpt_moe" and config["num_experts"] == [4, 8]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is GPTMoEForCausalLM
    for param in loaded.parameters():  # views of the file mapping, 8-byte aligned: give them the allocator's 64 bytes,
        param.data = param.data.clone()  # as `model`'s, since MKL's AVX2 GEMMs round by operand alignment
    ids = inputs()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_auto_classes_are_registered():
    from hf_moe_offload.gpt_moe.presets import PRESETS

    config = AutoConfig.for_model("gpt_moe", **PRESETS["tiny-moe"])
    assert isinstance(config, GPTMoEConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), GPTMoEForCausalLM)
    assert isinstance(AutoModel.from_config(config), GPTMoEModel)


def test_saved_folder_loads_with_remote_code_where_the_package_is_not_importable(tmp_path):
    model = tiny_model(num_experts=[4, 8], use_residual_moe=True, num_experts_per_tok=2)
    folder = tmp_path / "gpt-moe-tiny"
    model.save_pretrained(folder)
    ids = inputs(batch=1, seq=5)
    expected = model.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_moe_offload"] = None  # `import hf_moe_offload` now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        out = model.generate(torch.tensor({ids.tolist()}), max_new_tokens=8, do_sample=False)
        print(out.tolist())
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(expected)


def test_model_files_import_only_torch_transformers_and_each_other():
    allowed = {"torch", "transformers", "__future__"} | {"math", "os", "sys", "threading", "collections", "dataclasses"}
    folder = Path(modeling_gpt_moe.__file__).parent
    for name in ("configuration_gpt_moe.py", "modeling_gpt_moe.py"):
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    assert node.module in ("configuration_gpt_moe", "modeling_gpt_moe"), node.module
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name} imports {roots - allowed}"


def test_resize_token_embeddings_keeps_the_head_tied():
    model = tiny_model()
    model.resize_token_embeddings(600)
    assert model.config.vocab_size == 600
    assert model.lm_head.weight.shape == (600, 64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(inputs(vocab=600)).logits.shape == (2, 12, 600)


@pytest.mark.parametrize("variant", ["moe-top1", "pyramid-residual-rotary"])
def test_every_parameter_is_initialised(variant):
    config = GPTMoEConfig.from_preset("tiny-moe", **VARIANTS[variant])
    with torch.device("meta"):
        model = GPTMoEForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} was not initialised"
        if name.endswith(("up_proj", "down_proj", "router.weight")):
            assert abs(p.std().item() - config.initializer_range) < 0.2 * config.initializer_range, name
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(tmp_path, dtype):
    tiny_model(num_experts_per_tok=2).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = model(inputs(), output_router_logits=True)
    assert out.logits.dtype == dtype and out.router_logits[0].dtype == torch.float32  # the router stays fp32
    assert model.generate(inputs(batch=1, seq=4), max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        model = tiny_model(num_experts_per_tok=2)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(7)
        ids = inputs()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)  # recompute order


def test_router_loss_is_weighted_by_the_micro_batch_share_under_trainer_scaling():
    model = tiny_model()
    ids = inputs()
    labels = ids.clone()
    labels[0, :5] = -100
    plain = model(ids, labels=labels)
    scaled = model(ids, labels=labels, num_items_in_batch=torch.tensor(60))
    counted = int(labels[:, 1:].ne(-100).sum())
    ce_sum = F.cross_entropy(plain.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), reduction="sum")
    expected = ce_sum / 60 + 0.01 * plain.aux_loss * counted / 60
    torch.testing.assert_close(scaled.loss, expected)


def test_batch_one_decoding_in_training_mode_has_no_small_batch_assertion():
    model = tiny_model()
    model.train()
    ids = inputs(batch=1, seq=2)  # two tokens: one prediction target, one token per MoE layer step
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    step = model(ids[:, :1])  # a single token
    assert step.logits.shape == (1, 1, 512)


def test_registration_marks_classes_for_auto_map():
    assert GPTMoEConfig._auto_class == "AutoConfig"
    assert GPTMoEForCausalLM._auto_class == "AutoModelForCausalLM"
    assert hf_moe_offload.__version__ == importlib.metadata.version("hf_moe_offload")  # one version, setup.cfg's


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rope_scaling_works_with_rotary_positions_past_the_trained_length(rope_type):
    rope = {"rope_type": rope_type, "factor": 4.0, "rope_theta": 10000.0}
    if rope_type == "yarn":
        rope["original_max_position_embeddings"] = 8
    plain = tiny_model(position_embedding_type="rotary", max_position_embeddings=8)
    scaled = tiny_model(position_embedding_type="rotary", max_position_embeddings=8, rope_parameters=rope)
    long = inputs(seq=20)  # past max_position_embeddings: no position table to run out of
    assert scaled(long).logits.shape == (2, 20, scaled.config.vocab_size)
    assert not torch.equal(scaled(long).logits, plain(long).logits)  # the scaling is applied
    if rope_type == "dynamic":  # dynamic NTK changes nothing within the trained length
        short = inputs(seq=6)
        torch.testing.assert_close(scaled(short).logits, plain(short).logits, rtol=0, atol=0)


def test_sdpa_and_eager_attention_agree():
    model = tiny_model(position_embedding_type="rotary")
    ids = inputs()
    sdpa = model(ids).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(model(ids).logits, sdpa, rtol=1e-5, atol=1e-5)  # fused vs explicit softmax


def test_inputs_embeds_and_tuple_outputs():
    model = tiny_model()
    ids = inputs()
    logits = model(ids).logits
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, logits, rtol=0, atol=0)
    as_tuple = model(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)  # MoeCausalLMOutputWithPast order: loss, aux_loss, logits, ...
    assert torch.equal(as_tuple[2], logits) and as_tuple[0].ndim == 0
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=embeds)


def test_beam_search_and_seeded_sampling():
    model = tiny_model(num_experts_per_tok=2)
    ids = inputs(batch=2, seq=4)
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape == (2, 10)
    torch.manual_seed(11)
    first = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
    torch.manual_seed(11)
    second = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20)
    assert torch.equal(first, second)


@pytest.mark.parametrize("layout", ["sorted", "padded"])
def test_sorted_mm_trains_in_bf16_like_eager(layout, force_sorted_mm_layout):
    force_sorted_mm_layout(layout)
    results = {}
    for implementation in ("eager", "sorted_mm"):
        model = tiny_model(num_experts_per_tok=2).to(torch.bfloat16)
        model.set_experts_implementation(implementation)
        model.train()
        torch.manual_seed(5)
        ids = inputs()
        loss = model(ids, labels=ids).loss
        loss.backward()
        experts = model.model.layers[1].mlp.experts
        assert experts.up_proj.grad.dtype == torch.bfloat16
        results[implementation] = (loss.detach(), experts.up_proj.grad, experts.down_proj_bias.grad)
    assert torch.isfinite(results["sorted_mm"][0])
    for got, want in zip(results["sorted_mm"], results["eager"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)  # bf16 rounding of each GEMM


def test_a_model_whose_class_fsdp2_swapped_saves_the_gpt_moe_code_and_auto_map(tmp_path):
    # What FSDP2's `fully_shard` does to a module (torch.distributed.fsdp._fully_shard._fsdp_init): a dynamic subclass
    # named FSDP<Class>, defined in torch. The real sharded save runs in tests/test_distributed.py.
    class FSDPModuleStandIn:
        pass

    model = GPTMoEForCausalLM(GPTMoEConfig.from_preset("tiny-moe"))
    model.__class__ = type(
        "FSDPGPTMoEForCausalLM",
        (FSDPModuleStandIn, GPTMoEForCausalLM),
        {"__module__": "torch.distributed.fsdp._fully_shard._fsdp_init"},
    )
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.glob("*.py")} == {"configuration_gpt_moe.py", "modeling_gpt_moe.py"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt_moe.GPTMoEForCausalLM"
    assert config["architectures"] == ["GPTMoEForCausalLM"]


def test_forward_declares_its_output_class_at_runtime():
    # transformers reads `forward`'s return annotation (its output fields) to know that `output_router_logits`
    # returns `router_logits`; a string annotation (`from __future__ import annotations`) hides them.
    for model_class, output_class in (
        (GPTMoEForCausalLM, modeling_gpt_moe.GPTMoECausalLMOutputWithPast),
        (GPTMoEModel, modeling_gpt_moe.GPTMoEModelOutputWithPast),
    ):
        assert model_class.forward.__annotations__["return"] is output_class
    assert "router_logits" in modeling_gpt_moe.GPTMoECausalLMOutputWithPast.__dataclass_fields__


@pytest.mark.parametrize("moe_layer_frequency, num_experts", [(1, 4), (2, 4), (2, 1)])
def test_tp_plan_names_only_and_all_the_sharded_modules(moe_layer_frequency, num_experts):
    config = GPTMoEConfig.from_preset(
        "tiny-moe", num_hidden_layers=2, moe_layer_frequency=moe_layer_frequency, num_experts=num_experts
    )
    model = GPTMoEForCausalLM(config)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules()}

    def matches(pattern: str) -> set[str]:
        regex = re.compile("model." + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        return {n for n in names if regex.match(n)}

    plan = config.base_model_tp_plan
    assert all(matches(pattern) for pattern in plan), [p for p in plan if not matches(p)]
    sharded = set().union(*(matches(p) for p in plan))
    experts = [n for n in names if n.endswith("mlp.experts.up_proj")]
    dense = [n for n in names if n.endswith("mlp.up_proj") and ".experts." not in n]
    assert set(experts + dense) <= sharded and (experts or dense)
    assert bool(experts) == (num_experts > 1) and bool(dense) == (moe_layer_frequency > 1 or num_experts == 1)
