"""Merge answers.jsonl folders and hold out a deterministic share of prompts from training.

    .venv/bin/python scripts/split_answers.py --data runs/data runs/data_b --out runs/train_data \\
        --holdout-out runs/holdout_prompts.jsonl --holdout-every 40

A prompt is held out by `dspark distill`'s rule (crc32(id) % holdout_every == 0): the same prompts
on every machine and rerun, and the ones `dspark distill --holdout-every N` holds out. Held-out prompts go to a DeepSpec-format JSONL (`turns`) for calibration and checkpoint
selection (never the eval split); the rest, deduplicated by id, to OUT/answers.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspark.train.distill import is_held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="folders with answers.jsonl")
    parser.add_argument("--out", required=True, help="folder for the training answers.jsonl")
    parser.add_argument("--holdout-out", required=True, help="JSONL file for the held-out prompts")
    parser.add_argument("--holdout-every", type=int, default=40)
    args = parser.parse_args()
    seen, train, held = set(), [], []
    for folder in args.data:
        for line in (Path(folder) / "answers.jsonl").read_text().split("\n"):  # not splitlines: answers hold U+2028
            if not line.strip():
                continue
            record = json.loads(line)
            if record["id"] in seen:
                continue
            seen.add(record["id"])
            if is_held_out(record["id"], args.holdout_every):
                user = next(m["content"] for m in record["messages"] if m["role"] == "user")
                held.append({"id": record["id"], "turns": [user]})
            else:
                train.append(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.jsonl").write_text("\n".join(train) + "\n")
    Path(args.holdout_out).write_text("\n".join(json.dumps(h) for h in held) + "\n")
    print(f"{len(train)} training answers -> {out / 'answers.jsonl'}; {len(held)} held-out prompts -> {args.holdout_out}")


if __name__ == "__main__":
    main()
