"""The GPU checks of the offload runtime that a test suite cannot make, for the first run on a CUDA machine.

Writes one JSON line per check to stdout (and `--out DIR/gpu_check.jsonl`):
  environment   torch, transformers, the device, whether `torch._grouped_mm` exists
  exactness     greedy tokens and logits of an offloaded Llama-like and GPT-MoE model (CPU and NVMe stores, depth 0/1/2,
                bf16) against the same model in device memory; then `disable_offload` right after `generate` gives
                the weights back bit for bit
  races         the GPU kept behind the host (`torch.cuda._sleep` in every unit's forward pre-hook) over depth 0/1/2 x
                CPU/NVMe stores x Llama / GPT-MoE / Mixtral with partial expert caches: exact tokens and logits; then a
                control run whose copies no longer wait for the compute stream (`Transfer.copying` ignores `after`),
                which must differ (otherwise the race check is blind)
  streams       exactness on a non-default compute stream, and after an exception injected in a unit's forward
  syncs         host synchronisations per decode step (`torch.cuda.set_sync_debug_mode("warn")`), offloaded minus
                in-memory
  memory        page-locked bytes (`PinnedHost.pinned_bytes`, `torch.cuda.host_memory_stats`) and device memory
                (`max_memory_allocated`) against what the store and the slots need
  throughput    a Llama-like bf16 model (hidden 4096, 8 layers) from the pinned CPU store at depth 1 and 2: bytes per
                second against the pinned host-to-device bandwidth measured in the same run; a mid-size GPT-MoE
                (hidden 1024, 8 layers, 16 experts) decoding with speculation on and off
  low_bit       8- and 4-bit stores: exactness against `dequantized_copy` (Llama-like and GPT-MoE with a partial expert
                cache, CPU and NVMe stores), then a Llama-like model (hidden 2048, 8 layers) and the mid-size GPT-MoE
                at bf16 vs 8 vs 4 bits: tokens/s, bytes per step, packed and full-precision GB/s against the pinned
                H2D bandwidth

`--device cpu` runs the same code on the CPU (no syncs, no pinned memory, a small model): a dry run of the script.

    python benchmarks/gpu_check.py --out results/        # on a GPU machine (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_check.py --device cpu --small  # the dry run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import warnings


def emit(out, **row) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def llama(hidden: int, layers: int, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 128, 1), num_key_value_heads=max(hidden // 512, 1),
                         vocab_size=32000, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).to(device).eval()


def gpt_moe(dtype, device):
    import torch

    from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM

    torch.manual_seed(0)
    config = GPTMoEConfig.from_preset("tiny-moe", num_experts=8, num_hidden_layers=4)
    return GPTMoEForCausalLM(config).to(dtype).to(device).eval()


def timed_generate(model, ids, new_tokens: int, device):
    """(seconds, offload stats) of a greedy `generate` of `new_tokens` after a warm-up of 2."""
    import torch

    from hf_moe_offload import get_offload_stats

    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
    get_offload_stats(model, reset=True)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, get_offload_stats(model)


def mixtral(dtype, device):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=1024,
                           max_position_embeddings=256)  # fmt: skip
    return MixtralForCausalLM(config).to(dtype).to(device).eval()


def races(args, out, device, dtype) -> None:
    import torch

    from hf_moe_offload import OffloadConfig, disable_offload, enable_offload
    from hf_moe_offload.offload import transfer as transfer_module
    from hf_moe_offload.offload.discovery import find_units

    cuda = device.type == "cuda"
    cycles = 2_000_000  # about 1 ms per unit: the host runs far ahead of the GPU (the CPU dry run: no sleep)

    def sleep(*_):
        if cuda:
            torch.cuda._sleep(cycles)

    def behind(model):
        return [module.register_forward_pre_hook(sleep) for _, module in find_units(model)]

    real_copying = transfer_module.Transfer.copying

    def no_wait(self, after=None, urgent=False):  # the control: copies no longer wait for the compute stream
        return real_copying(self, None, urgent)

    makes = {"llama": lambda: llama(256, 4, dtype, device), "gpt_moe": lambda: gpt_moe(dtype, device),
             "mixtral": lambda: mixtral(dtype, device)}  # fmt: skip
    cases = [(n, k, d, False) for n in makes for k in ("cpu", "nvme") for d in (0, 1, 2)]
    cases += [(n, "cpu", 1, True) for n in makes]
    for name, kind, depth, control in cases:
        model = makes[name]()
        ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4)).to(device)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        model = model.cpu()
        with tempfile.TemporaryDirectory() as tmp:
            config = OffloadConfig(offload_device=kind, nvme_path=tmp if kind == "nvme" else None,
                                   execution_device=device, prefetch_depth=depth, expert_cache_size=3,
                                   expert_break_even=1.0)  # fmt: skip
            enable_offload(model, config)
            hooks = behind(model)
            if control:
                transfer_module.Transfer.copying = no_wait
            try:
                with torch.no_grad():
                    same_logits = torch.equal(model(ids).logits, logits)
                same_tokens = torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
            finally:
                transfer_module.Transfer.copying = real_copying
                for hook in hooks:
                    hook.remove()
            disable_offload(model)
        row = {"check": "races", "model": name, "store": kind, "depth": depth, "control": control,
               "logits_equal": same_logits, "tokens_equal": same_tokens}  # fmt: skip
        # the check passes when exact; the control passes when it is NOT exact (the race check can see a race; on
        # the CPU dry run nothing races, so the control cannot pass there)
        row["ok"] = (not same_logits) if control else (same_logits and same_tokens)
        emit(out, **row)


def streams(args, out, device, dtype) -> None:
    import torch

    from hf_moe_offload import OffloadConfig, disable_offload, enable_offload
    from hf_moe_offload.offload.discovery import find_units

    cuda = device.type == "cuda"
    for name, make in (("llama", lambda: llama(256, 4, dtype, device)), ("mixtral", lambda: mixtral(dtype, device))):
        model = make()
        ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5)).to(device)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        model = model.cpu()
        enable_offload(model, OffloadConfig(execution_device=device, prefetch_depth=2, expert_cache_size=3,
                                            expert_break_even=1.0))  # fmt: skip
        side = torch.cuda.Stream(device) if cuda else None
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext(), torch.no_grad():
            side_logits = model(ids).logits  # the caller computes on a stream of its own
        if cuda:
            side.synchronize()
        on_side_stream = torch.equal(side_logits, logits)
        units = find_units(model)
        state = {"raised": False}

        def fail_once(*_, state=state):
            if not state["raised"]:
                state["raised"] = True
                raise RuntimeError("injected")

        hook = units[len(units) // 2][1].register_forward_pre_hook(fail_once)
        try:
            model.generate(ids, max_new_tokens=8, do_sample=False)
        except RuntimeError:
            pass
        hook.remove()
        after_exception = torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
        disable_offload(model)
        emit(out, check="streams", model=name, non_default_stream_logits_equal=on_side_stream,
             raised=state["raised"], tokens_equal_after_exception=after_exception)  # fmt: skip


def speculation(args, out, device, dtype) -> None:
    import torch

    from hf_moe_offload import (
        GPTMoEConfig,
        GPTMoEForCausalLM,
        OffloadConfig,
        disable_offload,
        enable_offload,
    )

    torch.manual_seed(0)
    size = {"hidden_size": 256, "num_hidden_layers": 4, "num_experts": 8} if args.small else {
        "hidden_size": 1024, "num_hidden_layers": 8, "num_experts": 16}  # fmt: skip
    config = GPTMoEConfig.from_preset("tiny-moe", num_attention_heads=size["hidden_size"] // 64,
                                      intermediate_size=4 * size["hidden_size"], vocab_size=32000, **size)  # fmt: skip
    model = GPTMoEForCausalLM(config).to(dtype).eval()
    ids = torch.randint(3, 32000, (1, 8), generator=torch.Generator().manual_seed(6))
    for speculative in (False, True):
        enable_offload(model, OffloadConfig(execution_device=device, prefetch_depth=1, expert_cache_size=4,
                                            speculative_prefetch=speculative))  # fmt: skip
        seconds, stats = timed_generate(model, ids, args.new_tokens, device)
        disable_offload(model)
        emit(out, check="speculation", speculative=speculative, tokens_per_s=args.new_tokens / seconds,
             hit_rate=stats.expert_hit_rate, precision=stats.speculation_precision,
             recall=stats.speculation_recall, expert_gb=stats.expert_bytes_fetched / 1e9,
             device_wait_fraction=stats.device_wait_seconds / seconds)  # fmt: skip


def exactness(args, out, device, dtype) -> None:
    import torch

    from hf_moe_offload import OffloadConfig, disable_offload, enable_offload

    small = 256 if args.small else 1024
    for name, make in (("llama", lambda: llama(small, 4, dtype, device)), ("gpt_moe", lambda: gpt_moe(dtype, device))):
        model = make()
        ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for kind in ("cpu", "nvme"):
            for depth in (0, 1, 2):
                with tempfile.TemporaryDirectory() as tmp:
                    config = OffloadConfig(
                        offload_device=kind,
                        nvme_path=tmp if kind == "nvme" else None,
                        execution_device=device,
                        prefetch_depth=depth,
                        expert_cache_size=3,
                    )  # fmt: skip  (a partial expert cache)
                    enable_offload(model, config)
                    with torch.no_grad():
                        same_logits = torch.equal(model(ids).logits, logits)
                    same_tokens = torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
                    disable_offload(model)  # right after generate
                    restored = all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
                emit(out, check="exactness", model=name, dtype=str(dtype), store=kind, depth=depth,
                     logits_equal=same_logits, tokens_equal=same_tokens, disable_bit_exact=restored)  # fmt: skip


def syncs_per_step(args, out, device, dtype) -> None:
    import torch

    from hf_moe_offload import OffloadConfig, disable_offload, enable_offload

    if device.type != "cuda":
        emit(out, check="syncs", skipped="no CUDA device")
        return

    def count(model, steps: int) -> float:
        ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2)).to(device)
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught) / steps

    for name, model in (("llama", llama(512, 4, dtype, device)), ("gpt_moe", gpt_moe(dtype, device))):
        in_memory = count(model, 8)
        enable_offload(model, OffloadConfig(execution_device=device, prefetch_depth=1))
        offloaded = count(model, 8)
        disable_offload(model)
        emit(out, check="syncs", model=name, in_memory_per_step=in_memory, offloaded_per_step=offloaded,
             extra_per_step=offloaded - in_memory)  # fmt: skip


def pinned_h2d_bandwidth(device) -> float | None:
    """Bytes per second of 1 GiB copies from pinned host memory to `device` (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(host, device=device)
    target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return 5 * host.numel() / (time.perf_counter() - start)


def memory_and_throughput(args, out, device, dtype) -> None:
    import torch

    from hf_moe_offload import OffloadConfig, disable_offload, enable_offload
    from hf_moe_offload.offload.api import runtime_of

    hidden, layers = (256, 4) if args.small else (4096, 8)
    model = llama(hidden, layers, dtype, "cpu")
    store_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = pinned_h2d_bandwidth(device)
    ids = torch.randint(3, 32000, (1, 8), generator=torch.Generator().manual_seed(3))
    for depth in (1, 2):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        enable_offload(model, OffloadConfig(execution_device=device, prefetch_depth=depth))
        runtime = runtime_of(model)
        pinned = runtime.transfer.pinned.pinned_bytes if runtime.transfer.pinned is not None else 0
        seconds, stats = timed_generate(model, ids, args.new_tokens, device)
        row = {"check": "throughput", "hidden": hidden, "layers": layers, "depth": depth, "store_gb": store_bytes / 1e9,
               "pinned_gb": pinned / 1e9, "slot_gb": stats.slot_bytes / 1e9,
               "fetched_gb_per_s": stats.bytes_fetched / seconds / 1e9,
               "h2d_pinned_gb_per_s": bandwidth / 1e9 if bandwidth else None,
               "fetch_wait_fraction": stats.fetch_wait_seconds / seconds,
               "device_wait_fraction": stats.device_wait_seconds / seconds}  # fmt: skip
        if device.type == "cuda":
            row["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            row["host_memory_stats"] = {k: v for k, v in torch.cuda.host_memory_stats().items() if "bytes" in k}
        disable_offload(model)
        if runtime.transfer.pinned is not None:
            row["pinned_after_disable_gb"] = runtime.transfer.pinned.pinned_bytes / 1e9
        emit(out, **row)


def low_bit(args, out, device, dtype) -> None:
    """Low-bit stores on the device: exactness against `dequantized_copy` (dequantized on the CPU, moved to the
    device), then bytes and tokens/s of bf16 vs 8 vs 4 bits, dense (pinned CPU store) and routed MoE."""
    import torch

    from hf_moe_offload import OffloadConfig, disable_offload, enable_offload
    from hf_moe_offload.offload import dequantized_copy

    small = 256 if args.small else 1024
    for name, make in (("llama", lambda: llama(small, 4, dtype, "cpu")), ("gpt_moe", lambda: gpt_moe(dtype, "cpu"))):
        for bits in (8, 4):
            for kind in ("cpu", "nvme"):
                model = make()
                ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
                ids = ids.to(device)
                with tempfile.TemporaryDirectory() as tmp:
                    config = OffloadConfig(offload_device=kind, nvme_path=tmp if kind == "nvme" else None,
                                           execution_device=device, prefetch_depth=2, expert_cache_size=3,
                                           weight_bits=bits)  # fmt: skip
                    reference = dequantized_copy(model, config).to(device)
                    with torch.no_grad():
                        logits = reference(ids).logits
                    tokens = reference.generate(ids, max_new_tokens=8, do_sample=False)
                    del reference
                    enable_offload(model, config)
                    with torch.no_grad():
                        same_logits = torch.equal(model(ids).logits, logits)
                    same_tokens = torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
                    disable_offload(model)
                emit(out, check="low_bit_exactness", model=name, dtype=str(dtype), bits=bits, store=kind,
                     logits_equal=same_logits, tokens_equal=same_tokens)  # fmt: skip
    bandwidth = pinned_h2d_bandwidth(device)
    hidden, layers = (256, 4) if args.small else (2048, 8)  # (quantizing happens on the host: keep it to seconds)
    models = (("llama", lambda: llama(hidden, layers, dtype, "cpu")), ("gpt_moe_1024x8x16", lambda: mid_moe(dtype)))
    for name, make in models:
        ids = torch.randint(3, 1024, (1, 8), generator=torch.Generator().manual_seed(3))
        for bits in (None, 8, 4):
            model = make()
            enable_offload(model, OffloadConfig(execution_device=device, prefetch_depth=2, weight_bits=bits))
            seconds, stats = timed_generate(model, ids.to(device), args.new_tokens, device)
            disable_offload(model)
            emit(out, check="low_bit_throughput", model=name, bits=bits, tokens_per_s=args.new_tokens / seconds,
                 gb_fetched_per_step=stats.bytes_fetched / args.new_tokens / 1e9,
                 fetched_fraction=stats.fetched_fraction, fetched_gb_per_s=stats.bytes_fetched / seconds / 1e9,
                 full_precision_gb_per_s=stats.full_precision_bytes / seconds / 1e9,
                 h2d_pinned_gb_per_s=bandwidth / 1e9 if bandwidth else None,
                 device_wait_fraction=stats.device_wait_seconds / seconds)  # fmt: skip


def mid_moe(dtype):
    import torch

    from hf_moe_offload import GPTMoEConfig, GPTMoEForCausalLM

    torch.manual_seed(0)
    config = GPTMoEConfig.from_preset("tiny-moe", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                      num_hidden_layers=8, num_experts=16, vocab_size=1024)  # fmt: skip
    return GPTMoEForCausalLM(config).to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small models (the CPU dry run)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", help="a folder for gpu_check.jsonl")
    args = parser.parse_args()
    import torch
    import transformers

    device = torch.device(args.device)
    out = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = open(os.path.join(args.out, "gpu_check.jsonl"), "w")
    cuda = device.type == "cuda"
    emit(out, check="environment", torch=torch.__version__, transformers=transformers.__version__,
         device=torch.cuda.get_device_name(device) if cuda else "cpu",
         grouped_mm=hasattr(torch, "_grouped_mm"))  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    exactness(args, out, device, dtype)
    races(args, out, device, dtype)
    streams(args, out, device, dtype)
    syncs_per_step(args, out, device, dtype)
    memory_and_throughput(args, out, device, dtype)
    speculation(args, out, device, dtype)
    low_bit(args, out, device, dtype)
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
