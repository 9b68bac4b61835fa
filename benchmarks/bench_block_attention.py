"""Training forward + backward of the teacher-forced blocks (`forward_blocks`), factored block mask
against the dense [Q, S + Q] one, measured side by side in one run on SmolLM2-135M's drafter
geometry (the `dspark-smollm2-135m` preset: 2 draft layers, 64 anchors per sequence), at blocks
4, 7 and 12 over a 1024-token sequence.

With Q = anchors x block queries, the dense mask scores every query against every block's keys:
Q x Q per head and layer, of which only each block's own K x K are visible. The factored form
keeps those and the Q x S context scores, so its cost grows linearly in the block size.

    .venv/bin/python benchmarks/bench_block_attention.py [--seq 1024] [--out bench_results/block_attention]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dspark.drafters.checkpoint import build_dspark_model, new_dspark_config
from dspark.models.target import load_model
from dspark.train.trainer import get_preset

sys.path.insert(0, str(Path(__file__).parent))
from bench_drafters import median_ms  # noqa: E402


def step_ms(model, feats, tokens, positions, dense: bool, repeats: int) -> float:
    def one():
        hidden = model.forward_blocks(feats, tokens, positions, dense_mask=dense)
        hidden.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return median_ms(one, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024, help="sequence length (context positions)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/block_attention")
    args = parser.parse_args()
    target = load_model("smollm2-135m", "bf16", with_tokenizer=False)
    preset = get_preset("dspark-smollm2-135m")
    anchors = preset.num_anchors
    gen = torch.Generator().manual_seed(0)
    rows = []
    for block in (4, 7, 12):
        model = build_dspark_model(new_dspark_config(target, "dspark", {**preset.drafter, "block_size": block}), target)
        model.float().train().requires_grad_(True)  # as the trainer holds it
        feats = torch.randn(1, args.seq, target.model.args.hidden_size * len(model.config.target_layer_ids), generator=gen)
        positions = torch.randperm(args.seq - block, generator=gen)[:anchors].sort().values[None] + 1
        tokens = torch.randint(0, target.vocab_size, positions.shape, generator=gen)
        dense = step_ms(model, feats, tokens, positions, True, args.repeats)
        factored = step_ms(model, feats, tokens, positions, False, args.repeats)
        rows.append({"block": block, "queries": anchors * block, "dense_ms": dense, "factored_ms": factored,
                     "dense_over_factored": dense / factored})
    base = next(r for r in rows if r["block"] == 7)
    for r in rows:
        r["factored_over_block7"] = r["factored_ms"] / base["factored_ms"]
        r["dense_over_block7"] = r["dense_ms"] / base["dense_ms"]
    lines = [f"forward + backward of {anchors} teacher-forced blocks over {args.seq} positions, 2 draft layers "
             f"(median of {args.repeats})", "",
             "| block | queries | dense mask (ms) | factored (ms) | dense / factored | factored vs block 7 | dense vs block 7 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['queries']} | {r['dense_ms']:.0f} | {r['factored_ms']:.0f} | "
                     f"{r['dense_over_factored']:.2f}x | {r['factored_over_block7']:.2f}x | {r['dense_over_block7']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"seq": args.seq, "anchors": anchors, "rows": rows}, indent=2))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
