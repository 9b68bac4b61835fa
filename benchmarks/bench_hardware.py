"""What this machine makes of speculative decoding on SmolLM2-135M (batch 1, greedy), in one run:

  (a) the target's forward over n = 1, 2, 4, 8 new tokens (after a 300-token context), bf16 and
      fp32, as multiples of a one-token bf16 step: verifying a block of K = 7 drafts costs t(8);
  (b) one draft round of the builtin DSpark drafter (7 tokens), as a multiple of that step, and a
      512-token prefill in bf16 and fp32 (what `--dtype auto` chooses between for compute-bound jobs);
  (c) tokens/s on GSM8K prompts (128 new tokens, chat template) of plain decoding (`none`) and of
      the builtin drafter and `ngram` under `fixed` (verify all 7) and `auto` (the scheduler on this
      machine's cost table, profiled here first), interleaved prompt by prompt, as ratios to plain.

On CPUs with bf16 units t(8) is little more than t(1) and fixed verification pays; on AVX2-only
CPUs bf16 products are emulated and t(8) is several times t(1), which `auto` is there to absorb.

    .venv/bin/python benchmarks/bench_hardware.py [--num-prompts 6] [--out bench_results/hardware]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench_drafters import CONTEXT, draft_round_ms, median_ms  # this folder: run as benchmarks/bench_hardware.py
from dspark.config import EngineConfig, StopParams
from dspark.drafters.registry import build_drafter
from dspark.engine.engine import Engine, Request
from dspark.engine.policy_spec import resolve_policy
from dspark.models.llama import native_bf16_matmul
from dspark.models.target import load_model
from dspark.text import encode_prompt

BLOCK = 7  # bench_drafters' draft round proposes 7 tokens
REPEATS = 10
PREFILL = 512  # prompt tokens of the prefill timing
EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "gsm8k.jsonl"


@torch.inference_mode()
def forward_ms(target, n: int, layers) -> float:
    """The target's forward over n new tokens after a CONTEXT-token context, returning the drafter's
    feature `layers` as the engine's verify forward does."""
    model = target.model
    cache = target.build_cache(1, CONTEXT + 64, 16)
    model(torch.randint(0, 1000, (1, CONTEXT)), torch.arange(CONTEXT)[None], torch.tensor([0]), cache)
    ids, pos = torch.randint(0, 1000, (1, n)), (CONTEXT + torch.arange(n))[None]
    return median_ms(lambda: model(ids, pos, torch.tensor([0]), cache, num_new=torch.tensor([n]),
                                   hidden_layers=layers), REPEATS)


@torch.inference_mode()
def prefill_ms(target, n: int) -> float:
    """The target's forward over an n-token prompt from an empty cache (a prefill: the work of a
    feature cache, and most of a batched regeneration's)."""
    cache = target.build_cache(1, n + 16, 16)
    ids, pos = torch.randint(0, 1000, (1, n)), torch.arange(n)[None]
    return median_ms(lambda: target.model(ids, pos, torch.tensor([0]), cache), 3)


def prompts(limit: int, tokenizer) -> list[list[int]]:
    if not EVAL.is_file():
        raise SystemExit(f"{EVAL} is missing: this benchmark needs the shared eval prompts")
    rows = [json.loads(line)["turns"][0] for line in EVAL.read_text().splitlines()[:limit]]
    return [encode_prompt(tokenizer, text, chat=True) for text in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench_results/hardware")
    args = parser.parse_args()

    target = load_model("smollm2-135m", "bf16")
    target32 = load_model("smollm2-135m", "fp32", with_tokenizer=False)
    builtin = build_drafter("builtin", target)
    layers = builtin.feature_layers
    forward_ms(target, 1, layers)  # warm-up: the first measurement pays one-time kernel creation
    step = forward_ms(target, 1, layers)
    forwards = {dtype: {n: forward_ms(t, n, layers) / step for n in (1, 2, 4, 8)}
                for dtype, t in (("bf16", target), ("fp32", target32))}
    prefill = {"bf16": prefill_ms(target, PREFILL), "fp32": prefill_ms(target32, PREFILL)}
    del target32
    draft = draft_round_ms(target, builtin, REPEATS) / step

    ids = prompts(args.num_prompts, target.tokenizer)
    config = EngineConfig(block_size=BLOCK, max_batch_size=1, max_seq_len=max(map(len, ids)) + args.max_new_tokens)
    runs = {}
    for drafter_name, policies in (("none", ("none",)), ("builtin", ("fixed", "auto")), ("ngram", ("fixed", "auto"))):
        for policy in policies:
            drafter = build_drafter(drafter_name, target)
            engine = Engine(target, drafter, config)
            runs[f"{drafter_name}/{policy}"] = (engine, resolve_policy(policy, target, drafter, config))
    totals = {name: [0, 0.0, 0] for name in runs}  # tokens, seconds, rounds
    for engine, policy in runs.values():  # warm-up
        engine.generate([Request(ids[0][:32], stop=StopParams(max_new_tokens=8))], policy)
    for prompt in tqdm(ids, desc="prompts"):
        for name, (engine, policy) in runs.items():
            start = time.perf_counter()
            out = engine.generate([Request(list(prompt), stop=StopParams(max_new_tokens=args.max_new_tokens))], policy)[0]
            totals[name][0] += len(out.token_ids)
            totals[name][1] += time.perf_counter() - start
            totals[name][2] += out.stats.rounds
    tps = {name: tokens / seconds for name, (tokens, seconds, _) in totals.items()}
    result = {
        "setup": {"model": "smollm2-135m", "dtype": "bf16", "batch": 1, "greedy": True, "block_size": BLOCK,
                  "num_prompts": len(ids), "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
                  "processor": platform.processor() or platform.machine(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "native_bf16_matmul": native_bf16_matmul(torch.device("cpu"))},
        "one_token_step_ms": step,
        "forward_vs_one_token_bf16_step": forwards,
        f"prefill_{PREFILL}_ms": prefill, "prefill_bf16_over_fp32": prefill["bf16"] / prefill["fp32"],
        "draft_round_vs_step": draft,
        "tokens_per_second": tps,
        "speedup_vs_plain": {name: v / tps["none/none"] for name, v in tps.items()},
        "tokens_per_round": {name: t / max(r, 1) for name, (t, _, r) in totals.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    setup = result["setup"]
    lines = [f"CPU capability {setup['cpu_capability']}, bf16 matrix units: {setup['native_bf16_matmul']}, "
             f"{setup['threads']} threads; one-token bf16 step {step:.1f} ms", "",
             "| forward over n tokens / one-token bf16 step | n=1 | n=2 | n=4 | n=8 |", "|---|---|---|---|---|"]
    lines += [f"| {dtype} | " + " | ".join(f"{v:.2f}x" for v in row.values()) + " |" for dtype, row in forwards.items()]
    lines += ["", f"prefill over {PREFILL} tokens: bf16 {prefill['bf16']:.0f} ms, fp32 {prefill['fp32']:.0f} ms "
              f"(bf16 / fp32 {prefill['bf16'] / prefill['fp32']:.2f}x)",
              "", f"builtin DSpark draft round (7 tokens) / one-token step: {draft:.2f}x", "",
              "| drafter / policy | tokens/s | vs plain | tokens per round |", "|---|---|---|---|"]
    lines += [f"| {name} | {tps[name]:.1f} | {result['speedup_vs_plain'][name]:.2f}x | "
              f"{result['tokens_per_round'][name]:.2f} |" for name in runs]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
