"""Issue 15, item 4: S+MoE recipes side by side against the S -> 4xS gap, as a table and a plot.

Reads the result files `examples/train_gpt_moe.py` writes (`<results>.json`): one reference run holding S and 4xS,
and any number of labelled S+MoE runs. For each S+MoE run the table gives its final validation loss, its gain over S
and the fraction of the S -> 4xS gap it closes, `(S - run) / (S - 4xS)`, at the same tokens; the plot overlays the
validation curves.

    python benchmarks/train_variants.py --reference benchmarks/results/train_gpt_moe.json \\
        --runs "MoE every other layer=benchmarks/results/train_gpt_moe_baseline_seed0.json" \\
               "MoE every layer=benchmarks/results/train_gpt_moe_every-layer_seed0.json" \\
        --output benchmarks/results/train_gpt_moe_variants

With `--scaling FILE ...` it instead compares whole runs of S, S+MoE and 4xS made at different token counts (each
file one `train_gpt_moe.py` run of the three models): does the MoE's share of the S -> 4xS gap grow with the data?

    python benchmarks/train_variants.py --scaling benchmarks/results/train_gpt_moe_quarter_seed0.json \
        benchmarks/results/train_gpt_moe.json --output benchmarks/results/train_gpt_moe_token_scaling
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict:
    if not path.exists():
        raise ValueError(f"result file {path} does not exist (write it with examples/train_gpt_moe.py --results)")
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="a result file with the S and 4xS models")
    parser.add_argument("--runs", nargs="+", help="LABEL=RESULT_FILE[#MODEL] of S+MoE runs")
    parser.add_argument("--scaling", nargs="+", type=Path, help="result files of S, S+MoE and 4xS at other tokens")
    parser.add_argument("--output", type=Path, required=True, help="writes OUTPUT.md (and OUTPUT.png)")
    args = parser.parse_args()
    if args.scaling:
        if args.reference or args.runs:
            raise ValueError("--scaling compares whole runs: give it without --reference and --runs")
        scaling(args.scaling, args.output)
        return
    if not args.reference or not args.runs:
        raise ValueError("--reference and --runs are both needed (or --scaling alone)")
    reference = {m["model"]: m for m in load(args.reference)["models"]}
    missing = {"S", "4xS"} - set(reference)
    if missing:
        raise ValueError(f"--reference {args.reference} lacks the model(s) {sorted(missing)}; it needs S and 4xS")
    small, big = reference["S"], reference["4xS"]
    gap = small["final_validation_loss"] - big["final_validation_loss"]
    runs = []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--runs entry {item!r} must be LABEL=RESULT_FILE[#MODEL]")
        path, _, model = path.partition("#")
        payload = load(Path(path))
        moe = [m for m in payload["models"] if (m["model"] == model if model else m["model"].startswith("S+"))]
        if len(moe) != 1:
            raise ValueError(f"{path} holds {len(moe)} models named {model or 'S+...'}; name one with FILE#MODEL")
        runs.append((label, payload["command"], moe[0]))
    for _, _, run in runs:
        if run["tokens"] != small["tokens"]:
            raise ValueError(f"{run['model']} trained on {run['tokens']} tokens, S on {small['tokens']}: not the same")

    lines = [
        f"S {small['final_validation_loss']:.4f}, 4xS {big['final_validation_loss']:.4f} "
        f"({small['tokens'] / 1e6:.2f}M tokens; `{args.reference}`)",
        "",
        "| run | total params | active params | val loss | gain over S | S -> 4xS gap closed | train tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, _, run in runs:
        gain = small["final_validation_loss"] - run["final_validation_loss"]
        lines.append(
            f"| {label} | {run['total_params'] / 1e6:.2f}M | {run['active_params'] / 1e6:.2f}M "
            f"| {run['final_validation_loss']:.4f} | {gain:.4f} | {gain / gap:.1%} | {run['train_tokens_per_s']:.0f} |"
        )
    lines += ["", "Commands:", ""] + [f"- {label}: `{command}`" for label, command, _ in runs]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_name(args.output.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    tokens_per_step = small["tokens"] / small["steps"]
    curves = [("S", small), ("4xS", big)] + [(label, run) for label, _, run in runs]
    for label, run in curves:
        steps, losses = zip(*run["validation_curve"])
        style = "--" if label in ("S", "4xS") else "-"
        axis.plot([s * tokens_per_step / 1e6 for s in steps], losses, style, label=label)
    axis.set_xlabel("training tokens (M)")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title("S+MoE recipes between S and 4xS (same tokens)")
    axis.set_ylim(big["final_validation_loss"] - 0.1, small["final_validation_loss"] + 0.6)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.output.with_name(args.output.name + ".png"), dpi=120)


def scaling(paths: list[Path], output: Path) -> None:
    """The S -> 4xS gap and the S+MoE's share of it, one row per run (a token count), fewest tokens first."""
    rows = []
    for path in paths:
        payload = load(path)
        models = {m["model"]: m for m in payload["models"]}
        moe = sorted(name for name in models if name.startswith("S+MoE"))
        if "S" not in models or "4xS" not in models or len(moe) != 1:
            raise ValueError(f"{path} must hold S, 4xS and one S+MoE model; it holds {sorted(models)}")
        rows.append((models["S"]["tokens"], payload["command"], models["S"], models[moe[0]], models["4xS"], moe[0]))
    rows.sort(key=lambda row: row[0])
    lines = [
        "| tokens | S | S+MoE | 4xS | S -> 4xS gap | MoE gain over S | gap closed |",
        "|---|---|---|---|---|---|---|",
    ]
    for tokens, _, small, moe, big, _ in rows:
        s_loss, m_loss, b_loss = (m["final_validation_loss"] for m in (small, moe, big))
        lines.append(
            f"| {tokens / 1e6:.2f}M | {s_loss:.4f} | {m_loss:.4f} | {b_loss:.4f} | {s_loss - b_loss:.4f} "
            f"| {s_loss - m_loss:.4f} | {(s_loss - m_loss) / (s_loss - b_loss):.1%} |"
        )
    lines += ["", "Commands:", ""] + [f"- {tokens / 1e6:.2f}M tokens: `{command}`" for tokens, command, *_ in rows]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_name(output.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
