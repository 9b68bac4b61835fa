"""Package a trained drafter as a builtin drafter of the dspark package (bf16 weights, its
calibration, and card.json saying how it was made and what it measured).

    .venv/bin/python scripts/package_builtin_drafter.py --checkpoint runs/dspark/step_N \\
        --name smollm2-135m-dspark --card card.json

Writes src/dspark/drafters/builtin/NAME/ (config.json, model.safetensors, calibration.json,
card.json); refuses to replace an existing one unless --replace is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "dspark" / "drafters" / "builtin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a drafter folder (a training checkpoint)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--card", required=True, help="JSON file: data, training, figures")
    parser.add_argument("--replace", action="store_true")
    args = parser.parse_args()
    src, out = Path(args.checkpoint), BUILTIN / args.name
    if out.exists() and not args.replace:
        raise SystemExit(f"{out} exists; pass --replace to replace it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(src / "config.json", tmp / "config.json")
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if (src / "calibration.json").is_file():
        shutil.copy(src / "calibration.json", tmp / "calibration.json")
    card = json.loads(Path(args.card).read_text())
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
