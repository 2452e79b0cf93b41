"""How fast a low-bit store's matrices dequantize on the CPU: billions of weights per second of
`hf_moe_offload.offload.quantize.dequantize_into`, for 8 and 4 bits, bf16 and fp32 outputs, both group layouts
(groups along the rows: `nn.Linear`; down the columns: GPT-2's `Conv1D`).

With `--checkouts A B ...` each checkout's package is timed in its own process, round after round alternating
(A, B, A, B, ...), so that two versions are compared side by side in one run; the table gives each one's median over
the rounds, its spread and its ratio to the first checkout.

    python benchmarks/dequant_speed.py --checkouts /tmp/old . --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


SHAPES = ["1024x1024", "4096x1024", "1024x4096"]


def time_one(shape: str, bits: int, dtype_name: str, layout: str, group: int, repeats: int) -> float:
    """Median seconds of one `dequantize_into` of a `shape` matrix (`rows x inputs`)."""
    import torch

    from hf_moe_offload.offload.layout import TensorSpec
    from hf_moe_offload.offload.quantize import QuantScheme, QuantTarget, dequantize_into, quantize

    rows, inputs = (int(n) for n in shape.split("x"))
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    weight = (torch.randn(rows, inputs) * 0.05).to(dtype)
    if layout == "columns":  # stored (inputs, rows), groups down each column
        weight, input_dim = weight.t().contiguous(), -2
    else:
        input_dim = -1
    target = QuantTarget(TensorSpec("w", dtype, tuple(weight.shape)), input_dim, QuantScheme(bits, group))
    parts = quantize(target, weight)
    out = torch.empty_like(weight)
    dequantize_into(out, parts, target)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dequantize_into(out, parts, target)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases(args) -> list[tuple[str, int, str, str]]:
    return [
        (shape, bits, dtype, layout)
        for shape in args.shapes
        for bits in args.bits
        for dtype in args.dtypes
        for layout in args.layouts
    ]


def measure(args) -> dict[str, float]:
    """{case: seconds} in this process."""
    return {
        "/".join(map(str, case)): time_one(*case, group=args.group_size, repeats=args.repeats) for case in cases(args)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="rows x inputs of each matrix")
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4], choices=[8, 4])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--layouts", nargs="+", default=["rows", "columns"], choices=["rows", "columns"])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per case and round (their median)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per checkout, alternating")
    parser.add_argument("--checkouts", nargs="+", default=["."], help="source trees whose package is timed")
    parser.add_argument("--json", help="write the raw times here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import hf_moe_offload

        source = os.path.dirname(os.path.dirname(os.path.abspath(hf_moe_offload.__file__)))
        if source != os.environ["PYTHONPATH"]:
            raise RuntimeError(f"timed the package of {source}, not of {os.environ['PYTHONPATH']}")
        json.dump(measure(args), sys.stdout)
        return
    for checkout in args.checkouts:
        if not os.path.isdir(os.path.join(checkout, "hf_moe_offload")):
            raise ValueError(f"--checkouts: {checkout!r} holds no hf_moe_offload package")
    forwarded = sys.argv[1:]  # a worker returns before writing any --json
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in args.checkouts}
    for round_ in range(args.rounds):
        for checkout in args.checkouts:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *forwarded, "--worker"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                cwd=os.path.abspath(checkout),
            )
            runs[checkout].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}/{args.rounds}: {checkout} done", file=sys.stderr)
    print(f"load average before: {os.getloadavg()[0]:.2f}; group {args.group_size}; medians of {args.repeats} calls")
    header = "| matrix | bits | out | groups |"
    for checkout in args.checkouts:
        header += f" {checkout}: G weights/s (min-max over {args.rounds} rounds) |"
        if checkout != args.checkouts[0]:
            header += " x first |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for case in cases(args):
        key = "/".join(map(str, case))
        rows, inputs = (int(n) for n in case[0].split("x"))
        row = f"| {case[0]} | {case[1]} | {case[2]} | {case[3]} |"
        first = None
        for checkout in args.checkouts:
            rates = [rows * inputs / run[key] / 1e9 for run in runs[checkout]]
            median = statistics.median(rates)
            row += f" {median:.2f} ({min(rates):.2f}-{max(rates):.2f}) |"
            if first is None:
                first = median
            else:
                row += f" {median / first:.2f} |"
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
