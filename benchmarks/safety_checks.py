"""What the store's safety checks cost on the offloaded decode step, and what saving from the store costs.

Part 1, in one process, alternating (variant order rotated every repeat; `checks` and `no-checks` on one loaded
model, so only the checks differ): GPT-2 medium shaped (355m, float32, random
weights) loaded with `load_offloaded` on the CPU execution device, NVMe store, prefetch_depth 1, 10 new tokens after
a 4-token prompt, batch 1; per variant the median and min-max of --repeats runs of the generation phase (time per
decoded step):
  checks        as shipped: every read / page mapping checks its file's identity (fstat + stat)
  no-checks     the identity checks replaced by a no-op (this benchmark only: there is no switch in the package)
  verify-reads  `OffloadConfig(verify_reads=True)`: a CRC32 of each unit's files before each fetch
for two read paths: `mapped` (the CPU default: checkpoint shards read in place, pages mapped) and `store-copy` (the
store's own unit files, copied into slot buffers by the readers, as the CUDA path reads). The identity checks per step
are counted, and one check is timed alone (200,000 calls) for a second, noise-free estimate.

Part 2, each in its own process (peak RSS is its own: VmHWM): the whole store checked (`store.verify_all`, what
`disable_offload` does before bytes leave the store), `save_pretrained` of the offloaded model
(seconds, peak RSS) beside the peak RSS of generating.

    python benchmarks/safety_checks.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from offload_generate import checkpoint  # noqa: E402  (the benchmark checkpoints, made once)


VARIANTS = ("checks", "no-checks", "verify-reads")


def load(args, path: str, read_path: str, verify_reads: bool):
    from hf_moe_offload import OffloadConfig, load_offloaded

    store = os.path.join(args.work_dir, "store-safety-355m-float32")
    config = OffloadConfig(
        offload_device="nvme",
        nvme_path=store,
        prefetch_depth=1,
        map_files=read_path == "mapped",
        reuse_checkpoint=read_path == "mapped",
        verify_reads=verify_reads,
    )
    return load_offloaded(path, config)


def decode_seconds_per_step(model, new_tokens: int) -> float:
    import torch
    from transformers import LogitsProcessorList

    from hf_moe_offload.timing import StepClock

    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    clock = StepClock()
    clock.start()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    phase = clock.phase(1)
    return phase.generation_seconds / phase.steps


def part1(args) -> list[dict]:
    from hf_moe_offload import disable_offload
    from hf_moe_offload.offload import store as store_module

    path = checkpoint(args.work_dir, "355m", "float32")
    real_check = store_module._FileStore.check_identity
    calls = [0]

    def counted(self, key, fd=None):
        calls[0] += 1
        return real_check(self, key, fd)

    def skipped(self, key, fd=None):
        calls[0] += 1

    results = []
    for read_path in ("mapped", "store-copy"):
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        per_step_calls = {}
        # checks and no-checks alternate on one loaded model (only the check differs); verify-reads needs its own
        models = {False: load(args, path, read_path, verify_reads=False), True: load(args, path, read_path, True)}
        for model in models.values():
            decode_seconds_per_step(model, 3)  # warm-up: pages in the cache, slots allocated
        for repeat in range(args.repeats):
            order = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]
            for variant in order:
                store_module._FileStore.check_identity = skipped if variant == "no-checks" else counted
                try:
                    calls[0] = 0
                    seconds = decode_seconds_per_step(models[variant == "verify-reads"], args.new_tokens)
                    per_step_calls[variant] = calls[0] / (args.new_tokens - 1)
                    times[variant].append(seconds)
                finally:
                    store_module._FileStore.check_identity = real_check
        for model in models.values():
            disable_offload(model)
        # one identity check alone
        model = load(args, path, read_path, verify_reads=False)
        store = model._hf_moe_offload_state.store
        key = next(iter(store._paths))
        store.check_identity(key)
        n = 200_000
        start = time.perf_counter()
        for _ in range(n):
            store.check_identity(key)
        one_check = (time.perf_counter() - start) / n
        disable_offload(model)
        base = statistics.median(times["no-checks"])
        for variant in VARIANTS:
            row = {
                "read_path": read_path,
                "variant": variant,
                "median_step_s": statistics.median(times[variant]),
                "min_step_s": min(times[variant]),
                "max_step_s": max(times[variant]),
                "vs_no_checks": statistics.median(times[variant]) / base,
                "identity_checks_per_step": per_step_calls[variant],
                "one_check_us": one_check * 1e6,
                "estimated_check_fraction": per_step_calls["checks"] * one_check / base,
            }
            results.append(row)
            print("RESULT " + json.dumps(row), flush=True)
    return results


def peak_rss_gb() -> float:
    """This process's own peak resident set (VmHWM; `ru_maxrss` would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def part2_child(args) -> None:
    from hf_moe_offload import disable_offload

    path = checkpoint(args.work_dir, "355m", "float32")
    model = load(args, path, args.read_path, verify_reads=False)
    row = {"task": args.task, "read_path": args.read_path}
    start = time.perf_counter()
    if args.task == "generate":
        decode_seconds_per_step(model, args.new_tokens)
    elif args.task == "verify":
        runtime = model._hf_moe_offload_state
        runtime.store.verify_all(runtime.plans)  # what disable_offload runs first
    else:
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            model.save_pretrained(tmp)
            row["saved_gb"] = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 1e9
    row["seconds"] = time.perf_counter() - start
    row["peak_rss_gb"] = peak_rss_gb()
    disable_offload(model)
    print("RESULT " + json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/hf_moe_offload_bench"))
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--read-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        part2_child(args)
        return
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    results = part1(args)
    for read_path in ("mapped", "store-copy"):
        for task in ("generate", "verify", "save"):
            command = [sys.executable, __file__, "--task", task, "--read-path", read_path, "--work-dir", args.work_dir,
                       "--new-tokens", str(args.new_tokens)]  # fmt: skip
            run = subprocess.run(command, capture_output=True, text=True)
            rows = [json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode != 0:
                print(f"{task}: failed\n{run.stderr[-2000:]}", flush=True)
            for row in rows:
                print("RESULT " + json.dumps(row), flush=True)
            results += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
