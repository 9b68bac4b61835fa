"""Training-side figures on SmolLM2-135M (bf16 target), measured side by side in one run:

  * regeneration tokens/s: the local batched engine at batch 8 (the earlier default) and at batch
    16 (the default) vs transformers `generate` (batch 8, left padding), same prompts and sampling
    (T 0.7, top-p 0.8, top-k 20);
  * feature-cache bytes per token, standard (bf16) and compact (fp8), against DeepSpec's 6 + 12*H;
  * training throughput (sequence tokens/s, anchors/s), peak resident memory and where a step's
    time goes (features: the target forward online or the cache read; drafter forward + losses;
    backward; optimizer), online features vs cache, for the earlier recipe (full 49k vocabulary,
    logits recomputed in the backward pass, fp32 products) and the current preset (draft
    vocabulary, logits kept, bf16 products where the CPU has bf16 units), plus each lever alone.

    .venv/bin/python benchmarks/bench_training.py [--prompts 16] [--out bench_results/training]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch

from dspark.data.feature_cache import deepspec_bytes_per_token, write_cache
from dspark.data.prompts import read_prompts
from dspark.data.regenerate import RegenerateConfig, regenerate_local
from dspark.models.target import load_model
from dspark.text import encode_messages
from dspark.train.trainer import Trainer, apply_overrides, get_preset, load_sequences

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"


class PeakRSS:
    """Samples the process's resident memory every 20 ms while active."""

    def __enter__(self):
        self.peak, self._stop = psutil.Process().memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        proc = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@torch.inference_mode()
def hf_regenerate_tokens_per_second(hf, tokenizer, prompts, cfg: RegenerateConfig, eos: list[int]) -> float:
    tokenizer.padding_side = "left"
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), cfg.batch_size):
        batch = [encode_messages(tokenizer, list(p.messages)) for p in prompts[i : i + cfg.batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[eos[0]] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos, pad_token_id=eos[0])
        new = out[:, width:]
        for row in new.tolist():  # count up to and including the first stop token
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            tokens += cut
    return tokens / (time.perf_counter() - start)


def train_throughput(target, cfg, data, out, steps: int = 3) -> dict:
    trainer = Trainer(target, cfg, data, out)
    trainer.train_step()  # warm-up
    trainer.timings = dict.fromkeys(trainer.timings, 0.0)
    losses = []
    with PeakRSS() as mem:
        start = time.perf_counter()
        for _ in range(steps):
            losses.append(trainer.train_step()["loss"])
        seconds = time.perf_counter() - start
    sequences = steps * cfg.grad_accum
    t = trainer.timings
    return {"tokens_per_second": t["tokens"] / seconds, "anchors_per_second": sequences * cfg.num_anchors / seconds,
            "peak_rss_mb": mem.peak / 1e6, "loss": sum(losses) / len(losses),
            "ms_per_sequence": {k.removesuffix("_s"): 1000 * t[k] / sequences for k in t if k.endswith("_s")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench_results/training")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: the shared prompt sets live beside the repository")
    from transformers import AutoModelForCausalLM

    target = load_model("smollm2-135m", "bf16")
    prompts = read_prompts([SHARED / "math500.jsonl"])[: args.prompts]
    cfg = RegenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=8)
    work = Path(tempfile.mkdtemp(prefix="dspark-bench-"))
    data = work / "data"
    stats = regenerate_local(target, prompts, data, cfg, progress=False)
    engine_tps = stats["tokens"] / stats["seconds"]
    stats16 = regenerate_local(target, prompts, work / "data16", replace(cfg, batch_size=16), progress=False)
    engine16_tps = stats16["tokens"] / stats16["seconds"]
    hf = AutoModelForCausalLM.from_pretrained(target.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    hf_tps = hf_regenerate_tokens_per_second(hf, target.tokenizer, prompts, cfg, list(target.eos_token_ids))
    del hf
    train_cfg = apply_overrides(get_preset("dspark-smollm2-135m"), ["grad_accum=4", "max_steps=100"])
    # The earlier recipe: full vocabulary, logits recomputed in the backward pass, fp32 products.
    before = apply_overrides(train_cfg, ["drafter.draft_vocab_size=0", "recompute_logits=true", "autocast=off"])
    seqs = load_sequences(data, target.tokenizer, train_cfg.max_length)
    tokens = sum(s.input_ids.numel() for s in seqs)
    from dspark.drafters.checkpoint import new_dspark_config

    layers = new_dspark_config(target, "dspark", dict(train_cfg.drafter)).target_layer_ids
    cache_bytes = {}
    for dtype in ("bf16", "fp8"):
        write_cache(target, seqs, layers, work / f"cache-{dtype}", dtype=dtype, progress=False)
        size = sum(f.stat().st_size for f in (work / f"cache-{dtype}").glob("*.safetensors"))
        cache_bytes[dtype] = size / tokens
    variants = {
        "before": before,
        "no recompute": apply_overrides(before, ["recompute_logits=false"]),
        "bf16 products": apply_overrides(before, ["autocast=auto"]),
        "draft vocabulary": apply_overrides(before, [f"drafter.draft_vocab_size={train_cfg.drafter['draft_vocab_size']}"]),
        "preset": train_cfg,
    }
    training = {}
    for name, variant in variants.items():
        for source, folder in (("online", data), ("cached", work / "cache-bf16")):
            training[f"{name}, {source}"] = train_throughput(target, variant, folder, work / f"run-{name}-{source}")
    online, cached = training["preset, online"], training["preset, cached"]
    hidden = target.model.args.hidden_size
    result = {
        "regeneration_tokens_per_second": {"dspark_engine_batch8": engine_tps, "dspark_engine_batch16": engine16_tps,
                                           "transformers_generate": hf_tps, "ratio": engine16_tps / hf_tps,
                                           "batch16_over_batch8": engine16_tps / engine_tps},
        "cache_bytes_per_token": {**cache_bytes, "deepspec_formula": deepspec_bytes_per_token(hidden),
                                  "layers": len(layers), "hidden": hidden},
        "training": training,
        "preset_over_before": {"online": online["tokens_per_second"] / training["before, online"]["tokens_per_second"],
                               "cached": cached["tokens_per_second"] / training["before, cached"]["tokens_per_second"]},
        "cached_over_online_speed": cached["tokens_per_second"] / online["tokens_per_second"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"regeneration: dspark engine {engine_tps:.1f} tok/s at batch 8, {engine16_tps:.1f} at batch 16 "
        f"({engine16_tps / engine_tps:.2f}x) vs transformers generate {hf_tps:.1f} tok/s ({engine16_tps / hf_tps:.2f}x)",
        f"cache bytes/token: bf16 {cache_bytes['bf16']:.0f}, fp8 {cache_bytes['fp8']:.0f}; DeepSpec 6+12H = "
        f"{deepspec_bytes_per_token(hidden)} (H={hidden}, {len(layers)} layers)",
        f"training tokens/s, preset over the earlier recipe: {result['preset_over_before']['online']:.2f}x online, "
        f"{result['preset_over_before']['cached']:.2f}x cached",
        "",
        "| training | tokens/s | anchors/s | loss | peak RSS (MB) | ms/seq: features | forward | backward | optimizer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in training.items():
        ms = r["ms_per_sequence"]
        lines.append(f"| {name} | {r['tokens_per_second']:.0f} | {r['anchors_per_second']:.1f} | {r['loss']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {ms['features']:.0f} | {ms['forward']:.0f} | {ms['backward']:.0f} | "
                     f"{ms['optimizer']:.0f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
