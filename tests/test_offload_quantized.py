"""Low-bit stores (`OffloadConfig(weight_bits=8 | 4)`): the packing against a naive reference, and every offloaded path
against the in-memory model with the same dequantized weights (`dequantized_copy`), bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import nvme_path, prompts, store_config, tiny_model
from test_offload_distributed import torchrun
from torch import nn

from hf_moe_offload import OffloadConfig, disable_offload, enable_offload, get_offload_stats, load_offloaded
from hf_moe_offload.offload import dequantized_copy
from hf_moe_offload.offload.layout import TensorSpec
from hf_moe_offload.offload.quantize import QuantScheme, QuantTarget, dequantize, quantization_targets, quantize


GROUP = 16  # divides every input dimension of the tiny models (32, 48, 64, 128)


# -- the scheme, against a naive reference -----------------------------------------------------------------------


def naive_quantize(matrix: torch.Tensor, bits: int, group: int, meta: torch.dtype):
    """Group by group, element by element: DeepSpeed's asymmetric scheme as its description says."""
    levels = 2**bits - 1
    rows, inputs = matrix.shape
    q = torch.zeros(rows, inputs, dtype=torch.int64)
    steps = torch.zeros(rows, inputs // group, dtype=meta)
    mins = torch.zeros(rows, inputs // group, dtype=meta)
    for r in range(rows):
        for g in range(inputs // group):
            values = [float(v) for v in matrix[r, g * group : (g + 1) * group].float()]
            # float32 arithmetic, as the description says: the range, then the step, each rounded to float32
            high, low = torch.tensor(max(values)), torch.tensor(min(values))
            step = ((high - low) / levels).to(meta)
            low = low.to(meta)
            if float(step) == 0:
                step = torch.tensor(1.0, dtype=meta)
            steps[r, g], mins[r, g] = step, low
            for k, v in enumerate(values):
                x = (torch.tensor(v, dtype=torch.float32) - low.float()) / step.float()
                q[r, g * group + k] = int(x.round().clamp(0, levels))
    return q, steps, mins


def naive_dequantize(q, steps, mins, group, dtype):
    out = torch.empty(q.shape, dtype=dtype)
    for r in range(q.shape[0]):
        for i in range(q.shape[1]):
            value = torch.tensor(float(q[r, i]), dtype=torch.float32) * steps[r, i // group].float()
            out[r, i] = (value + mins[r, i // group].float()).to(dtype)
    return out


@pytest.mark.parametrize(
    "bits, dtype, input_dim", [(8, torch.float32, -1), (4, torch.float32, -2), (4, torch.bfloat16, -1)]
)
def test_quantize_and_dequantize_match_the_naive_scheme(bits, dtype, input_dim):
    weight = (torch.randn(6, 32) * 0.05).to(dtype)
    weight[1, :GROUP] = 0.25  # a constant group reads back exactly
    stored = weight if input_dim == -1 else weight.t().contiguous()
    target = QuantTarget(TensorSpec("w", dtype, tuple(stored.shape)), input_dim, QuantScheme(bits, GROUP))
    q, steps, mins = quantize(target, stored)
    if bits == 4:  # two values per byte along the last dimension, the even one in the low nibble
        assert q.shape == (*stored.shape[:-1], stored.shape[-1] // 2)
        q = torch.stack((q & 15, q >> 4), dim=-1).view(stored.shape)
    if input_dim == -2:  # groups run down the columns: the naive reference's orientation is the transpose
        q, steps, mins = q.t(), steps.t(), mins.t()
    meta = dtype if dtype.itemsize == 2 else torch.float32
    want_q, want_steps, want_mins = naive_quantize(weight, bits, GROUP, meta)
    assert torch.equal(steps, want_steps) and torch.equal(mins, want_mins)
    assert torch.equal(q.long(), want_q)
    full = dequantize(target, quantize(target, stored))
    want = naive_dequantize(want_q, want_steps, want_mins, GROUP, dtype)
    assert torch.equal(full if input_dim == -1 else full.t(), want)
    assert torch.equal(want[1, :GROUP], weight[1, :GROUP])
    # round to nearest: no value further than half a step from the weight (slack: float32 arithmetic; for bf16 the
    # minimum and the result each rounded to bf16, 2**-8 of the largest weight at most each)
    slack = 1e-6 if dtype == torch.float32 else 2**-7 * float(weight.float().abs().max())
    error = (want.float() - weight.float()).abs().view(6, 2, GROUP)
    assert (error <= want_steps.float().unsqueeze(-1) / 2 + slack).all()


def test_the_quantized_matrices_are_the_linear_weights_the_head_and_the_experts():
    model = tiny_model("qwen2_moe")
    targets = quantization_targets(model, QuantScheme(4, GROUP))
    names = set(targets)
    assert "lm_head.weight" in names or "model.embed_tokens.weight" in names  # the head (tied or not)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.mlp.experts.down_proj" in names
    assert "model.layers.1.mlp.shared_expert.up_proj.weight" in names
    assert not any("norm" in name or name.endswith("bias") for name in names)
    assert "model.layers.1.mlp.gate.weight" not in names  # the router stays in full precision
    mixtral = quantization_targets(tiny_model("mixtral"), QuantScheme(8, GROUP))
    assert not any(name.endswith("mlp.gate.weight") for name in mixtral)
    gpt2 = quantization_targets(tiny_model("gpt2"), QuantScheme(8, GROUP))
    assert gpt2["transformer.h.0.attn.c_attn.weight"].input_dim == -2  # Conv1D: (inputs, outputs)


# -- offloaded == dequantized_copy, bit for bit -------------------------------------------------------------------

# orthogonal sweep: each architecture once per bits, the store kinds and depths spread over them
CASES = [
    ("gpt_moe", 4, "nvme", 1),
    ("gpt_moe", 8, "cpu", 2),
    ("gpt2", 4, "nvme-copy", 0),
    ("gpt2", 8, "nvme-direct", 1),
    ("llama", 4, "cpu", 0),  # tied head: the embedding's rows are gathered from the quantized table
    ("llama", 8, "nvme", 2),
    ("mixtral", 4, "nvme-copy", 2),
    ("mixtral", 8, "nvme", 0),
    ("qwen2_moe", 4, "cpu", 1),
    ("opt", 4, "nvme", 1),
    ("bloom", 8, "cpu", 1),
]


def check_equal_to_reference(model, reference, ids):
    with torch.no_grad():
        want = reference(ids).logits
        got = model(ids).logits
    assert torch.equal(got, want), (got - want).abs().max()
    want_tokens = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want_tokens)


@pytest.mark.parametrize("arch, bits, kind, depth", CASES)
def test_offloaded_low_bit_model_equals_its_dequantized_copy(arch, bits, kind, depth, tmp_path, offloaded):
    model = tiny_model(arch)
    config = store_config(kind, tmp_path, depth, weight_bits=bits, weight_group_size=GROUP)
    reference = dequantized_copy(model, config)
    offloaded(model, config)
    check_equal_to_reference(model, reference, prompts())
    stats = get_offload_stats(model)
    # fp32 weights: 8 bits plus a float32 step and minimum per 16 weights is under half of their bytes
    assert 0 < stats.bytes_fetched < 0.5 * stats.full_precision_bytes
    assert stats.fetched_fraction == stats.bytes_fetched / stats.full_precision_bytes


@pytest.mark.parametrize(
    "kind, options",
    [
        ("nvme", {"expert_cache_size": 0}),
        ("nvme-copy", {"expert_cache_size": 2, "speculative_prefetch": True}),
        ("cpu", {"expert_cache_size": 8}),
        ("nvme", {"expert_fetch": "all"}),
        ("nvme", {"expert_break_even": 0.01}),  # every forward streams whole layers
        ("nvme-copy", {"expert_cache_size": 2, "backend": "compact"}),  # CUDA's backend: rows gathered, renumbered
        ("cpu", {"expert_cache_size": 0, "backend": "compact"}),
    ],
)
def test_routed_experts_and_their_caches_dequantize_exactly(kind, options, tmp_path, offloaded, monkeypatch):
    from hf_moe_offload.offload import experts as experts_module

    options = dict(options)
    if options.pop("backend", None) == "compact":
        monkeypatch.setattr(experts_module, "_backend", lambda device: experts_module._CompactExperts)
    model = tiny_model("gpt_moe")
    config = store_config(kind, tmp_path, 1, weight_bits=4, weight_group_size=GROUP, **options)
    reference = dequantized_copy(model, config)
    offloaded(model, config)
    check_equal_to_reference(model, reference, prompts())
    stats = get_offload_stats(model)
    if options.get("expert_fetch") != "all" and "expert_break_even" not in options:
        assert stats.expert_bytes_fetched > 0


def test_full_precision_bytes_are_what_the_full_precision_store_moves(tmp_path, offloaded):
    ids = prompts()
    moved = []
    for bits in (None, 4):
        model = tiny_model("llama")
        offloaded(model, store_config("nvme", tmp_path / str(bits), 1, weight_bits=bits, weight_group_size=GROUP))
        model.generate(ids, max_new_tokens=4, do_sample=False)
        moved.append(get_offload_stats(model))
        disable_offload(model)
    assert moved[1].full_precision_bytes == moved[0].bytes_fetched == moved[0].full_precision_bytes
    assert moved[1].bytes_fetched < 0.3 * moved[0].bytes_fetched


@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_load_offloaded_quantizes_the_checkpoint_tensor_by_tensor(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("mixtral").save_pretrained(tmp_path / "ckpt")
    config = OffloadConfig(
        offload_device=kind, nvme_path=nvme_path(kind, tmp_path), weight_bits=4, weight_group_size=GROUP
    )
    reference = dequantized_copy(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval(), config)
    model = load_offloaded(tmp_path / "ckpt", config).eval()
    try:
        check_equal_to_reference(model, reference, prompts())
    finally:
        disable_offload(model)
    for name, param in reference.named_parameters():
        assert torch.equal(model.get_parameter(name), param), name


# -- the store ----------------------------------------------------------------------------------------------------


def store_files(path):
    """Each unit file's identity and the checksum its manifest records."""
    crcs = {key: entry["crc32"] for key, entry in json.loads((path / "manifest.json").read_text())["files"].items()}
    return {
        entry.name: (os.stat(entry.path).st_ino, os.stat(entry.path).st_mtime_ns, crcs[entry.name.split(".")[0]])
        for entry in os.scandir(path)
        if entry.name.startswith("unit_")
    }


def test_the_manifest_records_the_scheme_and_another_scheme_rebuilds_the_store(tmp_path, caplog):
    path = tmp_path / "store"
    model = tiny_model("llama")
    files = []
    caplog.set_level("WARNING")
    for bits, group in [(4, GROUP), (4, GROUP), (8, GROUP), (4, 32), (None, GROUP)]:
        config = OffloadConfig(offload_device="nvme", nvme_path=path, weight_bits=bits, weight_group_size=group)
        reference = dequantized_copy(model, config)
        copy = dequantized_copy(model, OffloadConfig())
        enable_offload(copy, config)
        manifest = json.loads((path / "manifest.json").read_text())
        expected = QuantScheme(bits, group).name if bits else None
        assert manifest["fingerprint"].get("quantization") == expected
        check_equal_to_reference(copy, reference, prompts())
        files.append(store_files(path))
        disable_offload(copy)
    assert files[1] == files[0]  # the same scheme: reused
    # another scheme, another group size, full precision: stale, rebuilt (the blocks' bytes differ)
    assert caplog.text.count("holds other weights (stale): rebuilding it") == 3
    for other in files[2:]:
        assert other["unit_00001.safetensors"][2] != files[0]["unit_00001.safetensors"][2]


def test_disable_offload_puts_back_the_dequantized_weights_and_says_so(tmp_path, caplog):
    model = tiny_model("gpt_moe")
    config = store_config("nvme", tmp_path, 1, weight_bits=8, weight_group_size=GROUP)
    reference = dequantized_copy(model, config)
    params = dict(model.named_parameters())
    enable_offload(model, config)
    model.generate(prompts(), max_new_tokens=3, do_sample=False)
    with caplog.at_level("WARNING"):
        disable_offload(model)
    assert "dequantized values of the 8-bit store" in caplog.text
    for name, param in model.named_parameters():
        assert param is params[name]
        assert torch.equal(param, reference.get_parameter(name)), name


def test_saving_a_low_bit_model_is_refused_before_anything_is_written(tmp_path, offloaded):
    model = offloaded(tiny_model("llama"), store_config("cpu", tmp_path, 1, weight_bits=4, weight_group_size=GROUP))
    with pytest.raises(RuntimeError, match="4-bit weights"):
        model.state_dict()
    with pytest.raises(RuntimeError, match="dequantized_copy"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("weight_bits", 3, "None \\(full precision\\), 8 or 4"),
        ("weight_bits", True, "None \\(full precision\\), 8 or 4"),
        ("weight_bits", "4", "None \\(full precision\\), 8 or 4"),
        ("weight_group_size", 0, "a positive power of two"),
        ("weight_group_size", 48, "a positive power of two"),
        ("weight_group_size", -64, "a positive power of two"),
        ("weight_group_size", 64.0, "a positive power of two"),
    ],
)
def test_bad_low_bit_fields_are_refused(field, value, rule):
    with pytest.raises(ValueError, match=rf"{field} \({value!r}\) must be {rule}"):
        OffloadConfig(**{field: value})


def test_a_group_size_that_does_not_divide_a_matrix_names_it_before_any_write(tmp_path):
    model = tiny_model("llama")  # hidden size 32
    config = OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store", weight_bits=4, weight_group_size=64)
    with pytest.raises(ValueError, match=r"weight_group_size \(64\) must divide .*q_proj.weight .* 32 inputs"):
        enable_offload(model, config)
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")
    assert getattr(model, "_hf_moe_offload_state", None) is None
    with pytest.raises(ValueError, match="must divide"):
        dequantized_copy(model, config)


def test_load_offloaded_checks_the_groups_before_reading_the_checkpoint(tmp_path, monkeypatch):
    tiny_model("gpt2").save_pretrained(tmp_path / "ckpt")
    refuse_loading(monkeypatch)
    config = OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store", weight_bits=8, weight_group_size=64)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight of GPT2LMHeadModel .* 32 inputs"):
        load_offloaded(tmp_path / "ckpt", config)
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")


def test_a_model_without_matrices_to_group_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(x)

    class NoMatrices(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match="weight_bits=4 asks for a quantized store, but NoMatrices has no matrix"):
        enable_offload(NoMatrices(), OffloadConfig(weight_bits=4))


def test_dequantized_copy_refuses_an_offloaded_model(tmp_path, offloaded):
    model = offloaded(tiny_model("gpt2"), OffloadConfig(weight_bits=8, weight_group_size=GROUP))
    with pytest.raises(RuntimeError, match="needs the model in memory"):
        dequantized_copy(model, OffloadConfig(weight_bits=8, weight_group_size=GROUP))


# -- DeepSpeed's section ------------------------------------------------------------------------------------------

ZERO = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}


def test_from_deepspeed_reads_zero_inference_weight_quantization():
    scheme = {"num_bits": 4, "group_size": 64, "group_dim": 1, "symmetric": False}
    config = OffloadConfig.from_deepspeed({**ZERO, "weight_quantization": {"quantized_initialization": scheme}})
    assert (config.weight_bits, config.weight_group_size) == (4, 64)
    post = {"post_init_quant": {"fc": {**scheme, "num_bits": 8}, "attn": {**scheme, "num_bits": 8}}}
    config = OffloadConfig.from_deepspeed({**ZERO, "weight_quantization": post})
    assert (config.weight_bits, config.weight_group_size) == (8, 64)
    assert OffloadConfig.from_deepspeed(ZERO).weight_bits is None


@pytest.mark.parametrize(
    "section, message",
    [
        ({"quantized_initialization": {"num_bits": 3, "group_size": 64}}, r"num_bits \(3\) must be 8 or 4"),
        (
            {"quantized_initialization": {"num_bits": 4, "group_size": 64, "symmetric": True}},
            r"symmetric \(True\) must be false",
        ),
        (
            {"quantized_initialization": {"num_bits": 4, "group_size": 64, "group_dim": 0}},
            r"group_dim \(0\) must be 1",
        ),
        (
            {"post_init_quant": {"fc": {"num_bits": 4, "group_size": 64}, "attn": {"num_bits": 8, "group_size": 64}}},
            "several schemes",
        ),
        ({"quantized_initialization": {"num_bits": 4, "group_size": 48}}, r"weight_group_size \(48\)"),
    ],
)
def test_from_deepspeed_refuses_what_the_store_cannot_do(section, message):
    with pytest.raises(ValueError, match=message):
        OffloadConfig.from_deepspeed({**ZERO, "weight_quantization": section})


# -- several processes --------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_processes_share_a_low_bit_store(tmp_path):
    model = tiny_model("gpt_moe")
    model.save_pretrained(tmp_path / "ckpt")
    reference = dequantized_copy(model, OffloadConfig(weight_bits=4, weight_group_size=GROUP))
    ids = prompts()
    torch.save({"ids": ids, "tokens": reference.generate(ids, max_new_tokens=6, do_sample=False)}, tmp_path / "ref.pt")
    script = f"""
        import os
        import torch
        import torch.distributed as dist
        from hf_moe_offload import OffloadConfig, load_offloaded

        dist.init_process_group("gloo")
        reference = torch.load({str(tmp_path / "ref.pt")!r})
        config = OffloadConfig(
            offload_device="nvme", nvme_path={str(tmp_path / "store")!r}, weight_bits=4, weight_group_size={GROUP}
        )
        model = load_offloaded({str(tmp_path / "ckpt")!r}, config).eval()
        tokens = model.generate(reference["ids"], max_new_tokens=6, do_sample=False)
        assert torch.equal(tokens, reference["tokens"]), (tokens, reference["tokens"])
        open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".ok"), "w").close()
        """
    result = torchrun(script, tmp_path, timeout=600, name="quantized_generate.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


# -- on the GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("arch, bits, kind", [("gpt_moe", 4, "nvme"), ("llama", 8, "cpu"), ("mixtral", 4, "cpu")])
def test_cuda_dequantization_equals_the_cpu_reference(arch, bits, kind, tmp_path):
    model = tiny_model(arch).to(torch.bfloat16)
    config = OffloadConfig(
        offload_device=kind,
        nvme_path=nvme_path(kind, tmp_path),
        execution_device="cuda",
        prefetch_depth=2,
        expert_cache_size=2,
        weight_bits=bits,
        weight_group_size=GROUP,
    )
    reference = dequantized_copy(model, config).to("cuda")  # dequantized on the CPU
    enable_offload(model, config)
    try:
        check_equal_to_reference(model, reference, prompts().to("cuda"))
    finally:
        disable_offload(model)


# -- a checkpoint transformers dequantizes on load (FP8 block-wise) -----------------------------------------------


FP8_QUANTIZATION = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}


def save_checkpoint(path, model, tensors: dict, quantization: dict) -> None:
    """`tensors` as a one-shard safetensors checkpoint of `model` (bf16) at `path`, with its `quantization_config`."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    fields = model.config.to_dict()
    fields.update(architectures=[type(model).__name__], dtype="bfloat16", quantization_config=quantization)
    (path / "config.json").write_text(json.dumps(fields))


def write_fp8_checkpoint(path, seed: int) -> None:
    """A tiny Qwen3 whose linear weights are stored as the DeepSeek-V3 / Qwen3-FP8 releases store them: float8_e4m3fn
    with a float32 `weight_scale_inv` per 128x128 block (`quantization_config`: quant_method "fp8")."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "head_dim": 128}
    config = Qwen3Config(
        **shape, num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB_FP8, tie_word_embeddings=False
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    tensors = {}
    for name, param in model.state_dict().items():
        if ".layers." in name and param.dim() == 2:
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(param)
        else:
            tensors[name] = param.contiguous()
    save_checkpoint(path, model, tensors, FP8_QUANTIZATION)


VOCAB_FP8 = 256


def fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` (rows, cols) as float8_e4m3fn values and a float32 scale per 128x128 block (DeepSeek-V3's recipe); a
    last block row or column the matrix only partly fills gets its own scale from the part it holds."""
    rows, cols = weight.shape
    grid = (-(-rows // 128), -(-cols // 128))
    padded = torch.zeros(grid[0] * 128, grid[1] * 128)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid[0], 128, grid[1], 128)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / 448.0
    values = (blocks / scale).to(torch.float8_e4m3fn).view(grid[0] * 128, grid[1] * 128)
    return values[:rows, :cols].contiguous(), scale.view(grid)


def naive_fp8_dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The format's definition: element (i, j) times the scale of its 128x128 block (i // 128, j // 128), in float32,
    rounded once to `dtype` (DeepSeek-V3's `weight_dequant`)."""
    rows, cols = values.shape
    per_element = scale.repeat_interleave(128, dim=0)[:rows].repeat_interleave(128, dim=1)[:, :cols]
    return (values.to(torch.float32) * per_element).to(dtype)


def write_fp8_moe_checkpoint(path, family: str = "qwen3_moe", partial: bool = False) -> dict[str, torch.Tensor]:
    """A tiny MoE in the layout of the FP8 releases: every matrix of the layers in FP8 with block scales but the router
    (attention, dense and shared MLPs, and each expert's gate / up / down projection stored one by one,
    `mlp.experts.<e>.gate_proj.weight`, ...), as Qwen3-MoE-FP8 (`family="qwen3_moe"`) and DeepSeek-V3 (`"deepseek_v3"`,
    with MLA attention, a dense first layer and a shared expert) publish them. `partial`: MLA matrices that the blocks
    do not divide, as DeepSeek-V3's own 576-row `kv_a_proj_with_mqa` (here 320x256, 192x256 and 256x64), or (Qwen3-MoE)
    experts the blocks do not divide. Returns the checkpoint's tensors."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    common = {"hidden_size": 256, "moe_intermediate_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
    common.update(num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB_FP8, tie_word_embeddings=False)
    if family == "qwen3_moe":  # partial: experts of 64x256 and 256x64
        config = Qwen3MoeConfig(
            **{**common, "moe_intermediate_size": 64 if partial else 128},
            head_dim=128,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    else:  # every MLA matrix a whole number of 128x128 blocks, or (partial) none of them
        mla = {"kv_lora_rank": 128, "qk_nope_head_dim": 128, "qk_rope_head_dim": 128, "v_head_dim": 128}
        if partial:  # kv_a_proj_with_mqa 320x256, q_proj and kv_b_proj 192x256, o_proj 256x64
            mla.update(kv_lora_rank=256, qk_rope_head_dim=64, v_head_dim=64)
        config = DeepseekV3Config(
            **{**common, "num_attention_heads": 1}, **mla, q_lora_rank=None, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        )  # fmt: skip
        model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
        with torch.no_grad():  # a router bias that changes the choice of experts (transformers initialises it to 0)
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    tensors = {}
    for name, param in model.state_dict().items():
        module, _, attr = name.rpartition(".")
        if attr in ("gate_up_proj", "down_proj") and param.dim() == 3:
            for e in range(param.shape[0]):
                pieces = param[e].chunk(2) if attr == "gate_up_proj" else (param[e],)
                names = ("gate_proj", "up_proj") if attr == "gate_up_proj" else ("down_proj",)
                for piece, piece_name in zip(pieces, names, strict=True):
                    values, scale = fp8_blocks(piece)
                    tensors[f"{module}.{e}.{piece_name}.weight"] = values
                    tensors[f"{module}.{e}.{piece_name}.weight_scale_inv"] = scale
        elif ".layers." in name and param.dim() == 2 and not name.endswith("mlp.gate.weight"):
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(param)
        else:
            tensors[name] = param.contiguous()
    save_checkpoint(path, model, tensors, FP8_QUANTIZATION)
    return tensors


@pytest.mark.parametrize(
    "family, kind, cache", [("qwen3_moe", "nvme", 2), ("qwen3_moe", "cpu", 0), ("deepseek_v3", "nvme", 2)]
)
def test_an_fp8_moe_checkpoint_streams_its_per_expert_tensors_as_stored(family, kind, cache, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    write_fp8_moe_checkpoint(tmp_path / "ckpt", family)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()  # dequantized, experts fused
    ids = torch.randint(0, VOCAB_FP8, (2, 6), generator=torch.Generator().manual_seed(0))
    config = OffloadConfig(offload_device=kind, nvme_path=nvme_path(kind, tmp_path), expert_cache_size=cache)
    with caplog.at_level("WARNING"):
        model = load_offloaded(tmp_path / "ckpt", config).eval()
    assert "FP8 tensors" not in caplog.text  # every FP8 tensor streamed as stored, the per-expert ones included
    try:
        stats = generate_stats(model, reference, ids)
    finally:
        disable_offload(model)
    experts = next(layer.mlp.experts for layer in reference.model.layers if hasattr(layer.mlp, "experts"))
    full = sum(p[0].numel() * p.element_size() for p in (experts.gate_up_proj, experts.down_proj))
    fetches = stats.expert_cache_misses + stats.speculative_fetches
    # an expert moves as FP8 (1 byte per weight, a float32 per 128x128 block), half its bf16 bytes and a little more
    assert fetches > 0 and stats.expert_bytes_fetched <= fetches * (full / 2 + 4096)


def naive_fp8_model(path, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The model of the FP8 checkpoint at `path` in memory, every FP8 matrix dequantized by `naive_fp8_dequantize`
    (the per-expert ones stacked into the v5 experts parameters: gate rows, then up rows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

    def value(name: str) -> torch.Tensor:
        stored = tensors[name]
        if stored.dtype != torch.float8_e4m3fn:
            return stored
        return naive_fp8_dequantize(stored, tensors[name + "_scale_inv"], torch.bfloat16)

    with torch.no_grad():
        for name, buffer in model.named_buffers():  # the router's correction bias
            if name in tensors:
                buffer.copy_(tensors[name])
        for name, param in model.named_parameters():
            if name in tensors:
                param.copy_(value(name))
                continue
            module, _, attr = name.rpartition(".")
            pieces = ("gate_proj", "up_proj") if attr == "gate_up_proj" else ("down_proj",)
            for e in range(param.shape[0]):
                param[e].copy_(torch.cat([value(f"{module}.{e}.{piece}.weight") for piece in pieces]))
    return model


@pytest.mark.parametrize("kind", ["nvme", "cpu"])
def test_fp8_matrices_with_partial_blocks_stream_as_stored_and_equal_the_formats_dequantization(kind, tmp_path, caplog):
    # transformers 5.25 cannot load these on the CPU: 320 rows over 3 block rows raise in its Fp8Dequantize, and the
    # 192-row matrices over 2 block rows it would scale in 96-row blocks; the reference is the format's definition
    from safetensors.torch import save_file

    tensors = write_fp8_moe_checkpoint(tmp_path / "ckpt", "deepseek_v3", partial=True)
    mtp = "model.layers.61.self_attn.kv_a_proj_with_mqa.weight"  # DeepSeek-V3's MTP layer, which the model ignores
    tensors[mtp], tensors[mtp + "_scale_inv"] = fp8_blocks(torch.randn(320, 256))
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    attention = "model.layers.1.self_attn."
    shapes = {n: tuple(tensors[attention + n + ".weight_scale_inv"].shape) for n in ("kv_a_proj_with_mqa", "o_proj")}
    assert shapes == {"kv_a_proj_with_mqa": (3, 2), "o_proj": (2, 1)}  # partial rows, partial columns
    reference = naive_fp8_model(tmp_path / "ckpt", tensors)
    ids = torch.randint(0, VOCAB_FP8, (2, 6), generator=torch.Generator().manual_seed(0))
    config = OffloadConfig(offload_device=kind, nvme_path=nvme_path(kind, tmp_path), expert_cache_size=2)
    with caplog.at_level("WARNING"):
        model = load_offloaded(tmp_path / "ckpt", config).eval()
    assert "FP8 tensors" not in caplog.text and "LOAD REPORT" not in caplog.text  # nothing left to transformers
    try:
        generate_stats(model, reference, ids)
    finally:
        disable_offload(model)
    for name, param in reference.named_parameters():  # put back: the format's values
        assert torch.equal(model.get_parameter(name), param), name


def test_the_load_report_of_other_unexpected_keys_is_kept(tmp_path, caplog):
    from safetensors.torch import save_file

    tensors = write_fp8_moe_checkpoint(tmp_path / "ckpt", "deepseek_v3", partial=True)
    tensors["model.layers.0.unknown.weight"] = torch.zeros(4)  # a key the model does not have, the user's to see
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    config = OffloadConfig(offload_device="cpu", prefetch_depth=1)
    with caplog.at_level("WARNING"):
        disable_offload(load_offloaded(tmp_path / "ckpt", config))
    assert "LOAD REPORT" in caplog.text and "model.layers.0.unknown.weight" in caplog.text


@pytest.mark.parametrize(
    "rows, cols, dtype",
    [(576, 256, torch.bfloat16), (256, 200, torch.bfloat16), (70, 8256, torch.float32), (384, 128, torch.float16)],
)
def test_fp8_dequantization_of_partial_blocks_equals_the_naive_one(rows, cols, dtype):
    from hf_moe_offload.offload.quantize import Fp8BlockScheme, dequantize_into

    generator = torch.Generator().manual_seed(rows + cols)
    values, scale = fp8_blocks(torch.randn(rows, cols, generator=generator))
    target = QuantTarget(TensorSpec("w", dtype, (rows, cols)), -1, Fp8BlockScheme())
    assert tuple(scale.shape) == target.parts()[1].shape
    out = torch.empty(rows, cols + 3, dtype=dtype)[:, :cols]  # a strided output, as expert-major views are
    dequantize_into(out, (values, scale), target)
    assert torch.equal(out, naive_fp8_dequantize(values, scale, dtype))


def generate_stats(model, reference, ids, new_tokens: int = 4):
    """Logits and greedy tokens of the offloaded `model` equal `reference`'s; the offload counters of the generate."""
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    tokens = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    get_offload_stats(model, reset=True)
    assert torch.equal(model.generate(ids, max_new_tokens=new_tokens, do_sample=False), tokens)
    return get_offload_stats(model)


@pytest.mark.parametrize("kind", ["nvme", "cpu"])
def test_an_fp8_checkpoint_is_streamed_as_stored_and_equals_transformers_load(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB_FP8, (1, 6), generator=torch.Generator().manual_seed(0))
    config = OffloadConfig(offload_device=kind, nvme_path=nvme_path(kind, tmp_path), prefetch_depth=1)
    for seed in (0, 1):  # the second checkpoint replaces the first at the same path, with other weights
        write_fp8_checkpoint(tmp_path / "ckpt", seed)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()  # dequantized to bf16 on the CPU
        model = load_offloaded(tmp_path / "ckpt", config).eval()
        try:
            if kind == "nvme":
                manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
                assert [record[0] for record in manifest["fingerprint"]["files"]] == ["model.safetensors"]
                assert manifest["fingerprint"]["quantization"] == "fp8-e4m3-block128x128"
            stats = generate_stats(model, reference, ids)
        finally:
            disable_offload(model)
        for name, param in reference.named_parameters():  # put back: the dequantized values, as transformers loads
            assert torch.equal(model.get_parameter(name), param), name
        # the blocks' matrices moved as FP8 (1 byte per weight + a float32 per 128x128 block), not as bf16
        matrices = sum(p.numel() for n, p in reference.named_parameters() if ".layers." in n and p.dim() == 2)
        steps = 4
        assert stats.full_precision_bytes - stats.bytes_fetched == pytest.approx(steps * matrices, rel=0.01)


@pytest.mark.parametrize(
    "change, message",
    [
        ("drop_scale", r"is FP8 but the checkpoint holds no .*_scale_inv"),
        ("block_96_128", r"_scale_inv of .* is F32 \[2, 2\]: a float32 \(3, 2\) grid of \[96, 128\] blocks .* 256x256"),
        ("block_64_256", r"_scale_inv of .* is F32 \[2, 2\]: a float32 \(4, 1\) grid of \[64, 256\] blocks"),
        ("per_tensor", r"weight_block_size \(None\) .* per-tensor FP8 scales are not supported"),
    ],
)
def test_an_fp8_checkpoint_the_store_cannot_keep_is_refused_before_any_write(change, message, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    write_fp8_checkpoint(tmp_path / "ckpt", 0)
    fields = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    if change == "drop_scale":
        tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
        tensors.pop("model.layers.1.mlp.down_proj.weight_scale_inv")
        save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    elif change.startswith("block_"):
        fields["quantization_config"]["weight_block_size"] = [int(n) for n in change.split("_")[1:]]
    else:
        fields["quantization_config"]["weight_block_size"] = None
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(fields))
    refuse_loading(monkeypatch)  # a local checkpoint's scales are checked before transformers reads it
    config = OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store")
    with pytest.raises(ValueError, match=message):
        load_offloaded(tmp_path / "ckpt", config)
    assert not (tmp_path / "store").exists() or not [p for p in os.listdir(tmp_path / "store") if "unit" in p]


def refuse_loading(monkeypatch) -> None:
    """transformers' `from_pretrained` fails the test if it is called."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained ran before the check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)


def test_fp8_experts_with_partial_blocks_are_refused_before_any_write(tmp_path, monkeypatch):
    write_fp8_moe_checkpoint(tmp_path / "ckpt", "qwen3_moe", partial=True)
    refuse_loading(monkeypatch)
    config = OffloadConfig(offload_device="nvme", nvme_path=tmp_path / "store")
    with pytest.raises(
        ValueError, match=r"\[128, 128\] must divide .* every FP8 expert matrix: .*gate_proj.weight is 64x256"
    ):
        load_offloaded(tmp_path / "ckpt", config)
    assert not (tmp_path / "store").exists() or not [p for p in os.listdir(tmp_path / "store") if "unit" in p]


def test_weight_bits_on_an_fp8_checkpoint_is_refused(tmp_path):
    write_fp8_checkpoint(tmp_path / "ckpt", 0)
    with pytest.raises(ValueError, match=r"weight_bits \(4\) asks to quantize .* published quantized \(FP8"):
        load_offloaded(tmp_path / "ckpt", OffloadConfig(weight_bits=4, weight_group_size=GROUP))


def write_mxfp4_checkpoint(path) -> None:
    """A tiny gpt-oss whose experts are stored as the gpt-oss release stores them: `<param>_blocks` (two E2M1 values
    per byte, 32 per block along the input) and `<param>_scales` (E8M0 exponents), `quant_method` "mxfp4"."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=VOCAB_FP8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, param in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = param.shape  # stored transposed: (experts, inputs, outputs)
            blocks = (experts, outputs, inputs // 32, 16)
            tensors[name + "_blocks"] = torch.randint(0, 256, blocks, dtype=torch.uint8, generator=generator)
            tensors[name + "_scales"] = torch.randint(120, 128, blocks[:3], dtype=torch.uint8, generator=generator)
        else:
            tensors[name] = param.contiguous()
    save_checkpoint(path, model, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": ["self_attn", "router"]})


@pytest.mark.parametrize("kind, cache", [("nvme", 2), ("cpu", 0)])
def test_an_mxfp4_checkpoint_is_streamed_as_stored_and_equals_transformers_load(kind, cache, tmp_path):
    from transformers import AutoModelForCausalLM

    write_mxfp4_checkpoint(tmp_path / "ckpt")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()  # dequantized to bf16 on the CPU
    ids = torch.randint(0, VOCAB_FP8, (2, 6), generator=torch.Generator().manual_seed(0))
    config = OffloadConfig(offload_device=kind, nvme_path=nvme_path(kind, tmp_path), expert_cache_size=cache)
    model = load_offloaded(tmp_path / "ckpt", config).eval()
    try:
        stats = generate_stats(model, reference, ids)
    finally:
        disable_offload(model)
    # every routed expert moved as its MXFP4 bytes (17 per 32 weights, 64 in bf16) beside its bf16 biases
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    layer = "model.layers.0.mlp.experts."
    per_expert = sum(t[0].numel() * t.element_size() for n, t in stored.items() if n.startswith(layer))
    full = sum(t[0].numel() * t.element_size() for n, t in reference.state_dict().items() if n.startswith(layer))
    assert per_expert < 0.3 * full
    fetches = stats.expert_cache_misses + stats.speculative_fetches
    # (each of the expert's 4 tensors may start up to 63 bytes further: at its checkpoint offset's residue mod 64)
    assert fetches > 0 and fetches * per_expert <= stats.expert_bytes_fetched <= fetches * (per_expert + 4 * 63)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp8-partial", "mxfp4"])
def test_cuda_dequantization_of_a_quantized_checkpoint_equals_transformers(fmt, tmp_path):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    if fmt == "fp8-partial":  # transformers cannot load it (see above): the format's own dequantization
        reference = naive_fp8_model(tmp_path / "ckpt", write_fp8_moe_checkpoint(tmp_path / "ckpt", "deepseek_v3", True))
    elif fmt == "fp8":
        write_fp8_checkpoint(tmp_path / "ckpt", 0)
        dequantizing = FineGrainedFP8Config(weight_block_size=(128, 128), dequantize=True)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=dequantizing)
    else:
        write_mxfp4_checkpoint(tmp_path / "ckpt")
        reference = AutoModelForCausalLM.from_pretrained(
            tmp_path / "ckpt", quantization_config=Mxfp4Config(dequantize=True)
        )
    reference = reference.to("cuda").eval()
    ids = torch.randint(0, VOCAB_FP8, (2, 6), generator=torch.Generator().manual_seed(0)).to("cuda")
    config = OffloadConfig(offload_device="cpu", execution_device="cuda", prefetch_depth=1, expert_cache_size=2)
    model = load_offloaded(tmp_path / "ckpt", config).eval()
    try:
        generate_stats(model, reference, ids)
    finally:
        disable_offload(model)
