"""Drafter costs on SmolLM2-135M (bf16, batch 1), measured side by side in one run:

  * draft cost per round (block 7) of DFlash/DSpark with 1 and 2 draft layers, as a fraction of one
    target decode step (goal <= 0.25 for 1 layer);
  * extra cost of the Markov head's sequential loop over DFlash for a whole decode round
    (draft + verify + bookkeeping; paper: 0.2-1.3% on GPUs at batch 128; goal <= 3% here);
  * memory of a drafter beside its target (trainable weights; embedding and LM head are shared);
  * the same drafters over a draft vocabulary of 8k and 16k ids (the builtin drafter's setting):
    on a CPU a draft round is mostly the 49k-row LM head and the sampling over it.

Drafters are randomly initialised: costs do not depend on training.

    .venv/bin/python benchmarks/bench_drafters.py [--out bench_results/drafters]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.drafters.base import DraftRequest
from dspark.drafters.checkpoint import build_dspark_model, new_dspark_config
from dspark.drafters.dspark import DSparkDrafter
from dspark.engine.engine import Engine, Request
from dspark.models.target import load_model

CONTEXT = 300


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def target_step_ms(target, repeats: int) -> float:
    model = target.model
    cache = target.build_cache(1, CONTEXT + 64, 16)
    model(torch.randint(0, min(1000, target.vocab_size), (1, CONTEXT)), torch.arange(CONTEXT)[None], torch.tensor([0]), cache)
    token, pos = torch.tensor([[5]]), torch.tensor([[CONTEXT]])
    return median_ms(lambda: model(token, pos, torch.tensor([0]), cache), repeats)


@torch.inference_mode()
def draft_round_ms(target, drafter, repeats: int, block: int = 7) -> float:
    """One propose of `block` tokens over a 300-token context, plus absorbing 2 new context features."""
    hidden = target.model.args.hidden_size
    feats = torch.randn(CONTEXT, hidden * len(drafter.feature_layers), dtype=target.model.dtype)
    drafter.setup(1, CONTEXT + 512, block)
    tokens = [i % target.vocab_size for i in range(CONTEXT + 1)]
    drafter.begin(0, tokens[:-1], feats)
    gen = torch.Generator().manual_seed(0)

    def one_round():
        drafter.propose([DraftRequest(0, tokens, block, SamplingParams(temperature=1.0), gen)])
        drafter.commit(0, 1, feats[:2])
        tokens.extend([7, 8])

    return median_ms(one_round, repeats)


def round_ms_in_engine(target, drafter, prompt_ids, new_tokens: int) -> float:
    engine = Engine(target, drafter, EngineConfig(block_size=7, max_batch_size=1, max_seq_len=len(prompt_ids) + new_tokens + 8))
    engine.generate([Request(prompt_ids, SamplingParams(temperature=1.0, seed=0), StopParams(new_tokens, ignore_eos=True))])
    return 1000 * engine.timings.round_s / engine.timings.rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="bench_results/drafters")
    args = parser.parse_args()
    target = load_model("smollm2-135m", "bf16")
    configs = {
        f"{arch}-{layers}L": new_dspark_config(target, arch, {"num_draft_layers": layers, "block_size": 7})
        for arch in ("dflash", "dspark") for layers in (1, 2)
    }
    configs["dspark-1L-rank64"] = new_dspark_config(target, "dspark", {"num_draft_layers": 1, "block_size": 7, "markov_rank": 64})
    for vocab in (8192, 16384):
        for layers in (1, 2):
            configs[f"dspark-{layers}L-rank64-vocab{vocab // 1024}k"] = new_dspark_config(
                target, "dspark", {"num_draft_layers": layers, "block_size": 7, "markov_rank": 64, "draft_vocab_size": vocab})
    drafters = {name: DSparkDrafter(build_dspark_model(cfg, target)) for name, cfg in configs.items()}
    step = target_step_ms(target, args.repeats)
    result = {"target_decode_step_ms": step, "draft_round_ms": {}, "draft_round_over_target_step": {},
              "engine_round_ms": {}, "drafter_megabytes": {}, "target_megabytes": 0.0}
    for name, drafter in drafters.items():
        ms = draft_round_ms(target, drafter, args.repeats)
        result["draft_round_ms"][name] = ms
        result["draft_round_over_target_step"][name] = ms / step
    prompt = target.tokenizer.encode("def fibonacci(n):\n    " * 30)
    for _ in range(2):  # alternate to spread machine noise over both
        for name in ("dflash-1L", "dspark-1L", "dspark-1L-rank64"):
            result["engine_round_ms"].setdefault(name, []).append(round_ms_in_engine(target, drafters[name], prompt, 48))
    rounds = {k: statistics.median(v) for k, v in result["engine_round_ms"].items()}
    result["engine_round_ms"] = rounds
    result["markov_round_overhead"] = rounds["dspark-1L"] / rounds["dflash-1L"] - 1
    result["markov_round_overhead_rank64"] = rounds["dspark-1L-rank64"] / rounds["dflash-1L"] - 1
    for name, drafter in drafters.items():
        result["drafter_megabytes"][name] = sum(p.numel() * p.element_size() for p in drafter.model.parameters()) / 1e6
    result["target_megabytes"] = sum(p.numel() * p.element_size() for p in target.model.parameters()) / 1e6
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"target decode step: {step:.2f} ms (1 token, {CONTEXT}-token context)", "",
             "| drafter | draft round (ms) | / target step | weights (MB) |", "|---|---|---|---|"]
    for name in drafters:
        lines.append(f"| {name} | {result['draft_round_ms'][name]:.2f} | {result['draft_round_over_target_step'][name]:.2f} "
                     f"| {result['drafter_megabytes'][name]:.1f} |")
    lines += ["", f"target weights: {result['target_megabytes']:.1f} MB (embedding and LM head shared with every drafter)",
              f"whole decode round, DSpark-1L vs DFlash-1L: {rounds['dspark-1L']:.2f} vs {rounds['dflash-1L']:.2f} ms "
              f"-> Markov head (rank 256) overhead {result['markov_round_overhead']:+.1%} (goal <= 3%)",
              f"whole decode round, DSpark-1L rank 64: {rounds['dspark-1L-rank64']:.2f} ms "
              f"-> overhead {result['markov_round_overhead_rank64']:+.1%}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
