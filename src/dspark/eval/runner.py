"""Benchmark runner: several drafters on the same prompts and seeds, against plain decoding of the
same target in the same run. Resumable per (benchmark, drafter): finished pairs are kept in
OUT/partial/ and skipped on a rerun. Writes OUT/results.json and OUT/report.md.

Protocol (as DeepSpec's evaluator): first turn only, the target's chat template, no system prompt
added, batch 1, prompt i seeded with 980406 + i, tau includes the bonus token.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.data.prompts import read_prompts
from dspark.engine.engine import Engine, Request
from dspark.eval.metrics import summarize_rounds
from dspark.text import encode_messages

SEED = 980406


@dataclass(frozen=True)
class EvalConfig:
    temperature: float = 1.0
    block_size: int = 7
    max_new_tokens: int = 256
    limit: int | None = None


def benchmark_files(specs: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        files.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    return files


def run_pair(target, drafter, prompt_ids: list[list[int]], cfg: EvalConfig, desc: str) -> dict:
    max_len = max(map(len, prompt_ids)) + cfg.max_new_tokens
    engine = Engine(target, drafter, EngineConfig(block_size=cfg.block_size, max_batch_size=1, max_seq_len=max_len))
    rounds, tokens, seconds = [], 0, 0.0
    for i, ids in enumerate(tqdm(prompt_ids, desc=desc, unit="prompt", leave=False)):
        start = time.perf_counter()
        out = engine.generate([Request(ids, SamplingParams(cfg.temperature, seed=SEED + i), StopParams(cfg.max_new_tokens))])[0]
        seconds += time.perf_counter() - start
        rounds.extend(out.stats.round_log)
        tokens += out.stats.num_generated
    return {**summarize_rounds(rounds, cfg.block_size), "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds else 0.0}


def run_eval(target, drafters: dict, benchmarks: list[str], out_dir, cfg: EvalConfig) -> dict:
    """drafters: name -> Drafter (the name 'none' is run as the baseline if absent)."""
    from dspark.drafters.simple import NoDrafter

    out = Path(out_dir)
    (out / "partial").mkdir(parents=True, exist_ok=True)
    runs = {"none": NoDrafter(), **drafters}
    results: dict = {"config": cfg.__dict__, "benchmarks": {}}
    for file in benchmark_files(benchmarks):
        prompts = read_prompts([file])[: cfg.limit]
        ids = [encode_messages(target.tokenizer, list(p.messages)) for p in prompts]
        bench = results["benchmarks"].setdefault(file.stem, {"prompts": len(ids)})
        for name, drafter in runs.items():
            partial = out / "partial" / f"{file.stem}__{Path(name).name}.json"
            if partial.is_file():
                bench[name] = json.loads(partial.read_text())
                continue
            bench[name] = run_pair(target, drafter, ids, cfg, f"{file.stem} / {Path(name).name}")
            tmp = partial.with_suffix(".tmp")
            tmp.write_text(json.dumps(bench[name]))
            os.replace(tmp, partial)
        base = bench["none"]["tokens_per_second"]
        for name in runs:
            bench[name]["speedup_vs_plain"] = bench[name]["tokens_per_second"] / base if base else math.nan
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report_markdown(results))
    return results


def report_markdown(results: dict) -> str:
    lines = ["| benchmark | drafter | tau | verified/round | acceptance rate | tok/s | speedup vs plain |",
             "|---|---|---|---|---|---|---|"]
    for bench, per in results["benchmarks"].items():
        for name, r in per.items():
            if name == "prompts":
                continue
            lines.append(f"| {bench} | {name} | {r['accept_length']:.2f} | {r['verified_per_round']:.2f} | "
                         f"{r['acceptance_rate']:.2f} | {r['tokens_per_second']:.1f} | {r['speedup_vs_plain']:.2f}x |")
    lines += ["", "Conditional acceptance per draft position (paper Fig. 2):", "",
              "| benchmark | drafter | " + " | ".join(f"pos {k + 1}" for k in range(results["config"]["block_size"])) + " |",
              "|---|---|" + "---|" * results["config"]["block_size"]]
    for bench, per in results["benchmarks"].items():
        for name, r in per.items():
            if name in ("prompts", "none"):
                continue
            cells = " | ".join("-" if math.isnan(x) else f"{x:.2f}" for x in r["conditional_acceptance"])
            lines.append(f"| {bench} | {name} | {cells} |")
    return "\n".join(lines) + "\n"
