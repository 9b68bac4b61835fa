"""Learning curve of a training run: the real accept length tau of every checkpoint, at T = 0 and
T = 1, through the serving engine on held-out prompts, against the training tokens it had seen.

    .venv/bin/python benchmarks/learning_curve.py --run runs/dspark \\
        --prompts ../shared/data/eval/gsm8k.jsonl ../shared/data/eval/humaneval.jsonl --limit 8 \\
        --out docs/results/learning_curve

Writes results.json, report.md and learning_curve.png (with the `eval` extra). Checkpoints already
measured (same prompts and settings) are kept in results.json and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspark.drafters.checkpoint import load_drafter
from dspark.eval.runner import EvalConfig, run_pair
from dspark.models.target import load_model
from dspark.text import encode_messages
from dspark.data.prompts import read_prompts


def checkpoints(run: Path) -> list[Path]:
    steps = [p for p in run.glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(steps, key=lambda p: int(p.name.split("_")[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run folder (step_N/ checkpoints)")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--prompts", nargs="+", required=True, help="held-out prompt files (JSONL)")
    parser.add_argument("--limit", type=int, default=8, help="prompts per file")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--every", type=int, default=1, help="measure every Nth checkpoint (the last one always)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    target = load_model(args.target, "bf16")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"prompts": args.prompts, "limit": args.limit, "max_new_tokens": args.max_new_tokens}
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "checkpoints": {}}
    prompt_ids = {}
    for file in args.prompts:
        records = read_prompts([file])[: args.limit]
        prompt_ids[Path(file).stem] = [encode_messages(target.tokenizer, list(r.messages)) for r in records]
    found = checkpoints(Path(args.run))
    for ckpt in [c for i, c in enumerate(found) if (len(found) - 1 - i) % args.every == 0]:
        if ckpt.name in results["checkpoints"]:
            continue
        state = json.loads((ckpt / "trainer_state.json").read_text())
        drafter = load_drafter(ckpt, target)
        row = {"step": state["step"], "tokens_seen": state.get("tokens_seen", 0)}
        for temperature in (0.0, 1.0):
            cfg = EvalConfig(temperature=temperature, block_size=drafter.config.block_size,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            taus = {name: run_pair(target, drafter, ids, cfg, f"{ckpt.name} T={temperature:g} {name}")["accept_length"]
                    for name, ids in prompt_ids.items()}
            row[f"tau_T{temperature:g}"] = taus
        results["checkpoints"][ckpt.name] = row
        results_path.write_text(json.dumps(results, indent=2))
        print(ckpt.name, json.dumps(row), flush=True)
    rows = sorted(results["checkpoints"].values(), key=lambda r: r["step"])
    names = list(prompt_ids)
    lines = [f"Learning curve of `runs/{Path(args.run).name}`: tau (committed tokens per round, bonus included) on the first "
             f"{args.limit} prompts of each file, {args.max_new_tokens} new tokens.", "",
             "| step | training tokens | " + " | ".join(f"{n} T=0 | {n} T=1" for n in names) + " |",
             "|---|---|" + "---|---|" * len(names)]
    for r in rows:
        cells = " | ".join(f"{r['tau_T0'][n]:.2f} | {r['tau_T1'][n]:.2f}" for n in names)
        lines.append(f"| {r['step']} | {r['tokens_seen']:,} | {cells} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is missing (pip install 'dspark[eval]')")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for n in names:
        for temp, style in (("0", "-"), ("1", "--")):
            ax.plot([r["tokens_seen"] for r in rows], [r[f"tau_T{temp}"][n] for r in rows], style, marker="o",
                    label=f"{n}, T={temp}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("accept length tau")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    print(f"wrote {out / 'learning_curve.png'}")


if __name__ == "__main__":
    main()
