"""Throughput against concurrency for verification policies, on this machine and in simulation.

Measured side by side in one run, on SmolLM2-135M (bf16), greedy, GSM8K prompts:
  1. the target's cost table SPS(B) (verify forwards of B tokens, profiled first);
  2. for each concurrency R (all R requests decode together in the engine) and policy — `none`
     (plain decoding, no drafter), `fixed:3`, `fixed:7`, `scheduled` (Algorithm 1 on the
     profiled table), `async` (§5.2) — aggregate tokens/s and per-user tokens/s;
     goal: scheduled >= the best of the others at every R, and never below no speculation;
  3. the fixed:7 rounds as a trace, replayed by the simulator at up to 256 concurrent requests on
     the measured table and on a synthetic GPU-shaped table (flat to a knee, then linear).

    .venv/bin/python benchmarks/bench_serving.py --drafter runs/dspark/step_100 [--concurrency 1,2,4,8,16]
    .venv/bin/python benchmarks/bench_serving.py --drafter ngram

Writes bench_results/serving/{results.json, report.md, throughput.png, simulation_*.png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.data.prompts import read_prompts
from dspark.drafters.registry import build_drafter
from dspark.drafters.simple import NoDrafter
from dspark.engine.cost import CostTable
from dspark.engine.engine import Engine, Request
from dspark.engine.profile import profile_target
from dspark.engine.scheduler import build_policy
from dspark.engine.simulate import plot_simulation, results_to_json, simulate, trace_from_stats
from dspark.models.target import load_model
from dspark.text import encode_messages

POLICIES = ("none", "fixed:3", "fixed:7", "scheduled", "async")
BLOCK = 7


def run_level(target, drafter, policy, prompts: list[list[int]], max_new: int) -> dict:
    engine = Engine(target, drafter, EngineConfig(block_size=BLOCK, max_batch_size=len(prompts),
                                                  max_seq_len=max(map(len, prompts)) + max_new + 1))
    requests = [Request(p, SamplingParams(0.0), StopParams(max_new, ignore_eos=True), request_id=i) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    outs = engine.generate(requests, policy)
    wall = time.perf_counter() - start
    tokens = sum(o.stats.num_generated for o in outs)
    rounds = sum(o.stats.rounds for o in outs)
    return {"tokens_per_s": tokens / wall, "per_user_tokens_per_s": sum(o.stats.tokens_per_second for o in outs) / len(outs),
            "accept_length": sum(o.stats.committed_in_rounds for o in outs) / max(rounds, 1),
            "verified_per_round": sum(o.stats.num_verified for o in outs) / max(rounds, 1), "wall_s": wall,
            "stats": [o.stats for o in outs]}


def plot_throughput(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for policy, levels in results.items():
        xs = sorted(int(c) for c in levels)
        axes[0].plot(xs, [levels[str(c)]["tokens_per_s"] for c in xs], marker="o", label=policy)
        axes[1].plot(xs, [levels[str(c)]["per_user_tokens_per_s"] for c in xs], marker="o", label=policy)
    for ax, title in zip(axes, ("aggregate tokens/s", "per-user tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", default="ngram", help="ngram or a drafter folder")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", default="../shared/data/eval/gsm8k.jsonl")
    parser.add_argument("--out", default="bench_results/serving")
    args = parser.parse_args()
    torch.manual_seed(0)
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = load_model("smollm2-135m", "bf16")
    drafter = build_drafter(args.drafter, target)
    prompts_all = [encode_messages(target.tokenizer, list(p.messages)) for p in read_prompts([args.prompts])[: max(levels)]]

    most = max(levels) * (BLOCK + 1)
    points = sorted({1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, most} & set(range(1, most + 1)))
    cost = profile_target(target, points, context=256, block_size=BLOCK, feature_layers=drafter.feature_layers)
    cost.save(out / "cost_table.json")
    print("SPS(B):", {b: round(s, 1) for b, s in zip(cost.tokens, cost.sps)})

    results: dict = {}
    traces = []
    for c in levels:
        prompts = prompts_all[:c]
        for spec in POLICIES:
            d = NoDrafter() if spec == "none" else build_drafter(args.drafter, target)
            r = run_level(target, d, build_policy(spec, BLOCK, cost), prompts, args.max_new_tokens)
            stats = r.pop("stats")
            if spec == "fixed:7":
                traces += trace_from_stats(stats, [f"{c}:{i}" for i in range(len(stats))])
            results.setdefault(spec, {})[str(c)] = r
            print(f"R={c:3d} {spec:10s} {r['tokens_per_s']:7.1f} tok/s  per user {r['per_user_tokens_per_s']:6.1f}  "
                  f"tau {r['accept_length']:.2f}  verified/round {r['verified_per_round']:.2f}", flush=True)
    plot_throughput(results, out / "throughput.png")

    sim = {}
    for label, table in (("measured", cost), ("gpu-shaped", CostTable.gpu_shaped(knee=64, max_tokens=4096))):
        res = simulate(traces, table, ("none", "fixed:3", "fixed:7", "scheduled", "async"),
                       (1, 2, 4, 8, 16, 32, 64, 128, 256), steps=256)
        sim[label] = results_to_json(res)
        plot_simulation(res, out / f"simulation_{label}.png")
    (out / "results.json").write_text(json.dumps({"drafter": args.drafter, "cost_table": cost.to_json(),
                                                  "measured": results, "simulated": sim}, indent=2))
    lines = ["| policy | " + " | ".join(f"R={c}" for c in levels) + " |", "|---|" + "---|" * len(levels)]
    for spec, per in results.items():
        lines.append(f"| {spec} | " + " | ".join(f"{per[str(c)]['tokens_per_s']:.1f}" for c in levels) + " |")
    for label, rows in sim.items():
        concs = sorted({r["concurrency"] for r in rows})
        lines += ["", f"Simulated ({label} cost table), aggregate tokens/s:", "",
                  "| policy | " + " | ".join(f"R={c}" for c in concs) + " |", "|---|" + "---|" * len(concs)]
        for spec in dict.fromkeys(r["policy"] for r in rows):
            vals = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["policy"] == spec}
            lines.append(f"| {spec} | " + " | ".join(f"{vals[c]:.0f}" for c in concs) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
