"""What the tests share: tiny models of every architecture the runtime claims, prompts, store configs, the naive
references (in-memory logits and tokens, cached per test module), the assertions on weights put back, and the end of
every script run on several processes."""

from __future__ import annotations

import textwrap

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Qwen2MoeConfig,
)

from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM, OffloadConfig


VOCAB = 96
SMALL = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def _tiny_config(arch: str):
    if arch == "gpt_moe":
        return GPTMoEConfig.from_preset("tiny-moe", vocab_size=VOCAB, num_hidden_layers=3)
    if arch == "gpt_moe_top2_capacity":
        return GPTMoEConfig.from_preset(
            "tiny-moe", vocab_size=VOCAB, num_experts_per_tok=2, eval_capacity_factor=1.0, min_capacity=1
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **SMALL)
    if arch == "opt":
        return OPTConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            **SMALL,
        )
    if arch == "bloom":
        return BloomConfig(hidden_size=32, n_layer=3, n_head=4, **SMALL)
    llama_like = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **SMALL,
    }
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=True, **llama_like)
    if arch == "mistral":
        return MistralConfig(sliding_window=8, **llama_like)
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **llama_like)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=2,
            mlp_only_layers=[0],
            **llama_like,
        )
    raise ValueError(arch)


ARCHS = ["gpt_moe", "gpt_moe_top2_capacity", "gpt2", "opt", "bloom", "llama", "mistral", "mixtral", "qwen2_moe"]


def tiny_model(arch: str):
    torch.manual_seed(0)
    config = _tiny_config(arch)
    if arch.startswith("gpt_moe"):
        return GPTMoEForCausalLM(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


def prompts(batch=2, seq=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


def snapshot(model):
    return {name: (param, param.detach().clone()) for name, param in model.named_parameters(remove_duplicate=False)}


def assert_unchanged(model, before):
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    for name, (param, value) in before.items():
        assert after[name] is param, f"{name} is another Parameter object after disable_offload"
        assert param.device == value.device and param.dtype == value.dtype
        assert torch.equal(param, value), name


# "nvme" maps the store's pages on the CPU device; "nvme-copy" reads them into slot buffers like the CUDA path does;
# "nvme-direct" reads with O_DIRECT into slot buffers.
KINDS = {"cpu": {}, "nvme": {}, "nvme-copy": {"map_files": False}, "nvme-direct": {"direct_io": True}}


def nvme_path(kind: str, tmp_path) -> str | None:
    """The store directory of a test: a folder of `tmp_path` for NVMe stores, none for the CPU store."""
    return None if kind == "cpu" else str(tmp_path / "store")


def store_config(kind: str, tmp_path, depth: int, **kwargs) -> OffloadConfig:
    device = "cpu" if kind == "cpu" else "nvme"
    options = {**KINDS[kind], **kwargs}
    path = tmp_path / "store" if device == "nvme" else None
    return OffloadConfig(offload_device=device, nvme_path=path, prefetch_depth=depth, **options)


def reference(arch: str, max_new_tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, greedy tokens) of `tiny_model(arch)` in memory on `prompts()`; cached, since every tiny model of an
    architecture is the same (seed 0)."""
    key = (arch, max_new_tokens)
    if key not in _REFERENCES:
        model = tiny_model(arch)
        ids = prompts()
        with torch.no_grad():
            logits = model(ids).logits
        _REFERENCES[key] = (logits, model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False))
    return _REFERENCES[key]


_REFERENCES: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


# The last lines of every script the tests run on several processes: every rank is past its last collective, and the
# process leaves without the interpreter's finalization. A gloo worker thread that frees its last work item while the
# interpreter finalizes needs the GIL to drop a Python object, is ended by the finalizing interpreter and aborts the
# process ("terminate called without an active exception", pytorch#190489; a core dump here, torch 2.13:
# ProcessGroupGloo::runLoop -> ~ThreadLocalState -> SafePyObject decref -> take_gil -> pthread_exit).
# `destroy_process_group` does not prevent it (gloo has no shutdown, and a DDP model keeps its group alive), and the
# fine-tuning example ending with it hung once in CI under load (600 s timeout), so it is not called here either.
# A script is judged by what it wrote and by its exit code up to these lines.
SCRIPT_END = """
import os as _os, sys as _sys
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""


def ended(script: str) -> str:
    """`script` (dedented) followed by `SCRIPT_END`."""
    return textwrap.dedent(script) + SCRIPT_END


def running(path) -> str:
    """A script that runs the file `path` as `python path ARGS` would, followed by `SCRIPT_END`."""
    return ended(
        f"import runpy, sys\nsys.argv[0] = {str(path)!r}\nrunpy.run_path({str(path)!r}, run_name='__main__')\n"
    )
