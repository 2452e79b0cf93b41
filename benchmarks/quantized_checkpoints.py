"""Checkpoints published quantized, streamed as stored: bytes per decoding step against their bf16 expansion, and
tokens against transformers' own (dequantizing) load, for an FP8 block-wise Qwen3, a Qwen3-MoE-FP8 (experts stored one
by one), a DeepSeek-V3-shaped FP8 checkpoint with partial blocks (against the format's definition: transformers
cannot load it on the CPU) and an MXFP4 gpt-oss.

Both checkpoints are written here with random weights in the published layouts (Qwen3-FP8: `float8_e4m3fn` matrices
with a float32 `weight_scale_inv` per 128x128 block; gpt-oss: experts as `*_blocks` + `*_scales`), then loaded twice:
by transformers (dequantized to bf16, in memory: the reference) and by `load_offloaded` (NVMe store, CPU execution
device, prefetch depth 1; the MXFP4 experts fetched as routed, 2 cached per layer). Greedy decoding of --new-tokens
tokens at batch 1; "GB per step" is `bytes_fetched` per step, "bf16" the bytes the same fetches stand for in bf16.

    python benchmarks/quantized_checkpoints.py --work-dir /tmp/quantized_checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from hf_moe_offload import OffloadConfig, disable_offload, get_offload_stats, load_offloaded


def write(model, tensors: dict, quantization: dict, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    fields = model.config.to_dict()
    fields.update(architectures=[type(model).__name__], dtype="bfloat16", quantization_config=quantization)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(fields, f)


def fp8_qwen3(path: str) -> None:
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=128, vocab_size=4096, tie_word_embeddings=False)  # fmt: skip
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    tensors = {}
    for name, param in model.state_dict().items():
        if ".layers." in name and param.dim() == 2:
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(param)
        else:
            tensors[name] = param.contiguous()
    write(
        model, tensors, {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}, path
    )


def fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` as FP8 values and a float32 scale per 128x128 block (a partly filled last block included)."""
    rows, cols = weight.shape
    grid = (-(-rows // 128), -(-cols // 128))
    padded = torch.zeros(grid[0] * 128, grid[1] * 128)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid[0], 128, grid[1], 128)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / 448.0
    values = (blocks / scale).to(torch.float8_e4m3fn).view(grid[0] * 128, grid[1] * 128)
    return values[:rows, :cols].contiguous(), scale.view(grid)


def per_expert_fp8(tensors: dict, name: str, param: torch.Tensor) -> bool:
    """Store a v5 fused experts parameter as the FP8 releases do, expert by expert (gate, up, down); False if `name`
    is not one."""
    module, _, attr = name.rpartition(".")
    if attr not in ("gate_up_proj", "down_proj") or param.dim() != 3:
        return False
    names = ("gate_proj", "up_proj") if attr == "gate_up_proj" else ("down_proj",)
    for e in range(param.shape[0]):
        for piece, piece_name in zip(param[e].chunk(len(names)), names, strict=True):
            values, scale = fp8_blocks(piece)
            tensors[f"{module}.{e}.{piece_name}.weight"] = values
            tensors[f"{module}.{e}.{piece_name}.weight_scale_inv"] = scale
    return True


def fp8_deepseek_v3(path: str) -> None:
    """DeepSeek-V3's layout at a small width: MLA with its 576-row `kv_a_proj_with_mqa` (kv_lora_rank 512 + rope 64: 5
    block rows, the last one half filled), a dense first layer, a shared expert, routed experts stored one by one."""
    torch.manual_seed(0)
    config = DeepseekV3Config(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=512,
                              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16,
                              n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, vocab_size=4096, tie_word_embeddings=False)  # fmt: skip
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    tensors = {}
    for name, param in model.state_dict().items():
        if per_expert_fp8(tensors, name, param):
            continue
        if ".layers." in name and param.dim() == 2 and not name.endswith("mlp.gate.weight"):
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(param)
        else:
            tensors[name] = param.contiguous()
    write(
        model, tensors, {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}, path
    )


def format_reference(path: str) -> torch.nn.Module:
    """The in-memory model of an FP8 checkpoint transformers cannot dequantize (partial blocks): each FP8 matrix times
    the scale of its 128x128 block in float32, rounded once to bf16 (the format's definition), experts stacked."""
    tensors = load_file(os.path.join(path, "model.safetensors"))
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

    def value(name: str) -> torch.Tensor:
        stored = tensors[name]
        if stored.dtype != torch.float8_e4m3fn:
            return stored
        rows, cols = stored.shape
        scale = tensors[name + "_scale_inv"].repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        return (stored.float() * scale).to(torch.bfloat16)

    with torch.no_grad():
        for name, buffer in model.named_buffers():
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


def fp8_qwen3_moe(path: str) -> None:
    """Qwen3-MoE-FP8's layout: attention and every expert in FP8, the experts stored one by one."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=4096,
                            num_experts=16, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                            tie_word_embeddings=False)  # fmt: skip
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    tensors = {}
    for name, param in model.state_dict().items():
        if per_expert_fp8(tensors, name, param):
            continue
        if "self_attn" in name and param.dim() == 2:
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(param)
        else:
            tensors[name] = param.contiguous()
    write(
        model, tensors, {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}, path
    )


def mxfp4_gpt_oss(path: str) -> None:
    torch.manual_seed(0)
    config = GptOssConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=64, vocab_size=4096, num_local_experts=16,
                          num_experts_per_tok=2, sliding_window=64,
                          layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, param in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = param.shape
            shape = (experts, outputs, inputs // 32, 16)
            tensors[name + "_blocks"] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
            tensors[name + "_scales"] = torch.randint(118, 124, shape[:3], dtype=torch.uint8, generator=generator)
        else:
            tensors[name] = param.contiguous()
    write(model, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": ["self_attn", "router"]}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "quantized_checkpoints"))
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    rows = []
    checkpoints = (
        ("Qwen3 FP8 block-wise", fp8_qwen3),
        ("Qwen3-MoE FP8, experts one by one", fp8_qwen3_moe),
        ("DeepSeek-V3 FP8, 576-row kv_a_proj_with_mqa (partial blocks)", fp8_deepseek_v3),
        ("gpt-oss MXFP4 experts", mxfp4_gpt_oss),
    )
    for name, make in checkpoints:
        path = os.path.join(args.work_dir, name.split()[0].rstrip(",") + ("-partial" if "partial" in name else ""))
        make(path)
        stored = os.path.getsize(os.path.join(path, "model.safetensors"))
        # transformers cannot load partial FP8 blocks on the CPU: that row's reference is the format's definition
        partial = "partial" in name
        reference = format_reference(path) if partial else AutoModelForCausalLM.from_pretrained(path).eval()
        expanded = sum(p.numel() * p.element_size() for p in reference.parameters())
        ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
        tokens = reference.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        config = OffloadConfig(offload_device="nvme", nvme_path=os.path.join(path + "-store"), expert_cache_size=2)
        model = load_offloaded(path, config).eval()
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: the routing and the order learned
        get_offload_stats(model, reset=True)
        same = torch.equal(model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False), tokens)
        stats = get_offload_stats(model)
        disable_offload(model)
        steps = args.new_tokens
        row = {
            "checkpoint": name,
            "stored_gb": stored / 1e9,
            "bf16_gb": expanded / 1e9,
            "gb_per_step": stats.bytes_fetched / steps / 1e9,
            "bf16_gb_per_step": stats.full_precision_bytes / steps / 1e9,
            "same_tokens": same,
            "reference": "format" if partial else "transformers",
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| checkpoint | stored (bf16 expansion) | GB per step (x its bf16) | tokens = the reference |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['checkpoint']} | {r['stored_gb']:.3f} GB ({r['bf16_gb']:.3f} GB) | {r['gb_per_step']:.4f} "
            f"({r['gb_per_step'] / r['bf16_gb_per_step']:.2f}x) | {'yes' if r['same_tokens'] else 'NO'} "
            f"({r['reference']}) |"
        )


if __name__ == "__main__":
    main()
