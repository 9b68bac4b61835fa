"""Throughput against concurrency for verification policies, on this machine and in simulation.

Measured side by side in one run, on SmolLM2-135M (bf16), greedy, one engine per (R, policy):
  1. the target's cost table SPS(B) (verify forwards of B tokens, profiled first, with one curve per
     concurrency R in the engine's shape: R rows of 1..K+1 tokens);
  2. for each concurrency R and policy — `none` (plain decoding, no drafter), `fixed:3`, `fixed:7`,
     `scheduled` (Algorithm 1 on the profiled table; `--policies` adds `async`) — continuous
     batching: R requests in flight, a finished one replaced at once by the next prompt (as a server
     under constant load), max(`--requests-per-level` x R, `--min-requests`) requests in all. Each
     asks for its own number of new tokens, drawn once per level uniformly in [N/2, 3N/2] for
     N = `--max-new-tokens` and the same for every policy, so that requests do not finish in
     lockstep (in lockstep, where a measuring window ends decides how many prefills it holds).
     Aggregate tokens/s = tokens generated while R requests were in flight / that time, prefills
     included: from the start to the first finish that no queued request replaces (the simulator's
     and the paper's sense of throughput at concurrency R). The whole run's figure, final drain
     included as vLLM's serving benchmark counts it, is kept as `tokens_per_s_whole_run`: with a
     few dozen requests its drain, whose length depends on which request happens to finish last,
     moved a policy's figure by ~4% at R = 2. Per-user tokens/s is the mean over requests.
     Every policy generates the same number of tokens; the share of requests whose text equals the
     level's first run (plain decoding, when `none` leads --policies as by default) is reported:
     bf16 logits depend slightly on the batch's shape, so greedy texts can part at a near tie, and
     with them what there is to draft.
     Goal: scheduled >= the best of the others at every R, and never below no speculation;
  3. the fixed:7 rounds (when fixed:7 is measured) as a trace, replayed by the simulator at up to 256 concurrent requests on
     the measured table (with the drafter's measured time per round, so the draft gate plays its
     part) and on a synthetic GPU-shaped table (flat to a knee, then linear; no draft cost).

Torch runs on `--threads` threads (default 1): on a small shared CPU, two threads drift by up to 20%
between back-to-back identical runs, more than the differences being measured; one is steadier.
Each (R, policy) runs `--repeats` times, the policies' order rotating between repeats, and the
median run is reported (all runs are kept in results.json), with each policy's ratio to the same
repeat's plain decoding (median over repeats): the repeats drift apart by up to ~10%, the ratio
within a repeat far less.

    .venv/bin/python benchmarks/bench_serving.py --drafter runs/dspark/step_100 [--concurrency 1,2,4,8,16]
    .venv/bin/python benchmarks/bench_serving.py --drafter ngram --prompts ../shared/data/eval/humaneval.jsonl

Writes bench_results/serving/{results.json, report.md, throughput.png, simulation_*.png, cost_table.json,
trace.jsonl} (the last two replay with `dspark simulate --profile ... --trace ...`).
"""

from __future__ import annotations

import argparse
import json
import random
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
from dspark.engine.simulate import plot_simulation, results_to_json, save_trace, simulate, trace_from_stats
from dspark.models.target import load_model
from dspark.text import encode_messages

POLICIES = ("none", "fixed:3", "fixed:7", "scheduled")  # --policies adds e.g. async
BLOCK = 7


def new_token_counts(num_requests: int, max_new: int, seed: int = 0) -> list[int]:
    """Each request's number of new tokens, uniform in [max_new / 2, 3 max_new / 2] (fixed by seed)."""
    rng = random.Random(seed)
    return [rng.randint(max(1, max_new // 2), max(1, 3 * max_new // 2)) for _ in range(num_requests)]


def run_level(target, drafter, policy, prompts: list[list[int]], concurrency: int, lengths: list[int]) -> dict:
    """Keep `concurrency` requests in flight until len(lengths) requests (request i asks for
    lengths[i] new tokens) have finished."""
    engine = Engine(target, drafter, EngineConfig(block_size=BLOCK, max_batch_size=concurrency,
                                                  max_seq_len=max(map(len, prompts)) + max(lengths) + 1))
    requests = [Request(prompts[i % len(prompts)], SamplingParams(0.0), StopParams(n, ignore_eos=True), request_id=i)
                for i, n in enumerate(lengths)]
    queue = iter(requests)
    for _ in range(min(concurrency, len(requests))):
        engine.add_request(next(queue))
    outs = []
    steady = None  # (seconds, tokens) when the first request finished that nothing was left to replace
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step(policy):
            outs.append(out)
            following = next(queue, None)
            if following is not None:
                engine.add_request(following)
            elif steady is None:
                steady = (time.perf_counter() - start,
                          sum(o.stats.num_generated for o in outs) + sum(len(t) for _, t in engine.running_tokens()))
    wall_s = time.perf_counter() - start
    tokens = sum(o.stats.num_generated for o in outs)
    rounds = sum(o.stats.rounds for o in outs)
    steady_s, steady_tokens = steady or (wall_s, tokens)
    # Throughput at concurrency R is measured while R requests are in flight: from the start to the
    # first finish that no queued request replaces. The drain after it runs fewer requests, and how
    # long it lasts depends on which request happens to finish last (at R = 2 with 16 requests it
    # moved a policy's whole-run figure by ~4%); the whole run's figure is kept alongside.
    return {"tokens_per_s": steady_tokens / steady_s, "tokens_per_s_whole_run": tokens / wall_s,
            "per_user_tokens_per_s": sum(o.stats.tokens_per_second for o in outs) / len(outs),
            "accept_length": sum(o.stats.committed_in_rounds for o in outs) / max(rounds, 1),
            "verified_per_round": sum(o.stats.num_verified for o in outs) / max(rounds, 1), "wall_s": wall_s,
            "tokens": tokens, "stats": [o.stats for o in outs], "texts": {o.request_id: o.token_ids for o in outs},
            "prompt_lengths": [len(o.prompt_ids) for o in outs]}


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
    parser.add_argument("--max-new-tokens", type=int, default=64, help="mean new tokens per request")
    parser.add_argument("--requests-per-level", type=int, default=4, help="requests per level, times R")
    parser.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (profile and runs alike)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (R, policy), interleaved; the median is kept")
    parser.add_argument("--policies", default=",".join(POLICIES), help="measured policies (comma-separated specs)")
    parser.add_argument("--prompts", default="../shared/data/eval/gsm8k.jsonl")
    parser.add_argument("--out", default="bench_results/serving")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = load_model("smollm2-135m", "bf16")
    drafter = build_drafter(args.drafter, target)
    num_prompts = max(max(levels) * args.requests_per_level, args.min_requests)
    prompts_all = [encode_messages(target.tokenizer, list(p.messages)) for p in read_prompts([args.prompts])[:num_prompts]]

    most = max(levels) * (BLOCK + 1)
    points = sorted({1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, most} & set(range(1, most + 1)))
    # Profiled at the contexts these requests will have: their mean prompt plus half the new tokens.
    context = round(sum(map(len, prompts_all)) / len(prompts_all) + args.max_new_tokens / 2)
    cost = profile_target(target, points, context=context, block_size=BLOCK, feature_layers=drafter.feature_layers,
                          rows=levels, drafter=drafter, drafter_requests=levels)
    cost.save(out / "cost_table.json")
    print("SPS(B):", {b: round(s, 1) for b, s in zip(cost.tokens, cost.sps)})
    for r, curve in cost.by_rows:
        print(f"  R={r}: ms per step at B =", {b: round(1000 / s, 1) for b, s in zip(curve.tokens, curve.sps)})

    policies = tuple(args.policies.split(","))
    results: dict = {spec: {} for spec in policies}
    traces = []
    for c in levels:
        lengths = new_token_counts(max(c * args.requests_per_level, args.min_requests), args.max_new_tokens, seed=c)
        prompts = prompts_all[: len(lengths)]
        runs: dict = {spec: [] for spec in policies}
        reference = None  # the first run's texts, which every other run is compared with
        for repeat in range(args.repeats):
            # Each repeat starts the rotation one policy later: none always runs first or last.
            for spec in policies[repeat % len(policies):] + policies[: repeat % len(policies)]:
                d = NoDrafter() if spec == "none" else build_drafter(args.drafter, target)
                r = run_level(target, d, build_policy(spec, BLOCK, cost), prompts, c, lengths)
                stats, texts, prompt_lengths = r.pop("stats"), r.pop("texts"), r.pop("prompt_lengths")
                reference = reference or texts
                r["same_text"] = sum(texts[i] == reference[i] for i in texts) / len(texts)
                if spec == "fixed:7" and repeat == 0:
                    traces += trace_from_stats(stats, [f"{c}:{i}" for i in range(len(stats))], prompt_lengths)
                runs[spec].append(r)
                print(f"R={c:3d} {spec:10s} {r['tokens_per_s']:7.1f} tok/s (whole run {r['tokens_per_s_whole_run']:.1f})  per user {r['per_user_tokens_per_s']:6.1f}  "
                      f"tau {r['accept_length']:.2f}  verified/round {r['verified_per_round']:.2f}  "
                      f"same text as the first run {r['same_text']:.0%}", flush=True)
        for spec, rs in runs.items():  # the median repeat (by aggregate tokens/s) stands for the level
            r = dict(sorted(rs, key=lambda x: x["tokens_per_s"])[len(rs) // 2])
            r["tokens_per_s_runs"] = [x["tokens_per_s"] for x in rs]
            if "none" in runs:
                # Paired with the same repeat's plain decoding, run minutes apart at most: this CPU
                # drifts by up to ~10% between repeats, which the ratio cancels and a median of
                # absolute figures from different repeats does not.
                ratios = sorted(x["tokens_per_s"] / n["tokens_per_s"] for x, n in zip(rs, runs["none"]))
                r["vs_none_runs"] = ratios
                r["vs_none"] = ratios[len(ratios) // 2]
            results[spec][str(c)] = r
    plot_throughput(results, out / "throughput.png")
    sim = {}
    if traces:  # fixed:7 was measured: its rounds verify everything drafted
        save_trace(traces, out / "trace.jsonl")  # replay: dspark simulate --profile cost_table.json --trace trace.jsonl
        for label, table in (("measured", cost), ("gpu-shaped", CostTable.gpu_shaped(knee=64, max_tokens=4096))):
            res = simulate(traces, table, ("none", "fixed:3", "fixed:7", "scheduled", "async"),
                           (1, 2, 4, 8, 16, 32, 64, 128, 256), steps=1024)
            sim[label] = results_to_json(res)
            plot_simulation(res, out / f"simulation_{label}.png")
    (out / "results.json").write_text(json.dumps({"drafter": args.drafter, "threads": args.threads,
                                                  "requests_per_level": args.requests_per_level, "repeats": args.repeats,
                                                  "max_new_tokens": args.max_new_tokens, "cost_table": cost.to_json(),
                                                  "measured": results, "simulated": sim}, indent=2))
    lines = ["Aggregate tokens/s while R requests were in flight (whole run, drain included, in brackets):", "",
             "| policy | " + " | ".join(f"R={c}" for c in levels) + " |", "|---|" + "---|" * len(levels)]
    for spec, per in results.items():
        lines.append(f"| {spec} | " + " | ".join(f"{per[str(c)]['tokens_per_s']:.1f} ({per[str(c)]['tokens_per_s_whole_run']:.1f})"
                                                for c in levels) + " |")
    if "none" in results:
        lines += ["", "Each run against the same repeat's plain decoding (median of the per-repeat ratios):", "",
                  "| policy | " + " | ".join(f"R={c}" for c in levels) + " |", "|---|" + "---|" * len(levels)]
        for spec, per in results.items():
            lines.append(f"| {spec} | " + " | ".join(f"{per[str(c)]['vs_none']:.3f}" for c in levels) + " |")
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
