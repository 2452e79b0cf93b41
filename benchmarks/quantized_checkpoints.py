"""Checkpoints published quantized, streamed as stored: bytes per decoding step against their bf16 expansion, and
tokens against transformers' own (dequantizing) load, for an FP8 block-wise Qwen3, a Qwen3-MoE-FP8 (experts stored one
by one) and an MXFP4 gpt-oss.

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
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
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
    rows, cols = weight.shape
    blocks = weight.float().view(rows // 128, 128, cols // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / 448.0
    return (blocks / scale).to(torch.float8_e4m3fn).view(rows, cols), scale.view(rows // 128, cols // 128)


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
        module, _, attr = name.rpartition(".")
        if attr in ("gate_up_proj", "down_proj") and param.dim() == 3:
            names = ("gate_proj", "up_proj") if attr == "gate_up_proj" else ("down_proj",)
            for e in range(param.shape[0]):
                for piece, piece_name in zip(param[e].chunk(len(names)), names, strict=True):
                    values, scale = fp8_blocks(piece)
                    tensors[f"{module}.{e}.{piece_name}.weight"] = values
                    tensors[f"{module}.{e}.{piece_name}.weight_scale_inv"] = scale
        elif "self_attn" in name and param.dim() == 2:
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
        ("gpt-oss MXFP4 experts", mxfp4_gpt_oss),
    )
    for name, make in checkpoints:
        path = os.path.join(args.work_dir, name.split()[0].rstrip(","))
        make(path)
        stored = os.path.getsize(os.path.join(path, "model.safetensors"))
        reference = AutoModelForCausalLM.from_pretrained(path).eval()
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
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| checkpoint | stored (bf16 expansion) | GB per step (x its bf16) | tokens = transformers' load |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['checkpoint']} | {r['stored_gb']:.3f} GB ({r['bf16_gb']:.3f} GB) | {r['gb_per_step']:.4f} "
            f"({r['gb_per_step'] / r['bf16_gb_per_step']:.2f}x) | {'yes' if r['same_tokens'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
