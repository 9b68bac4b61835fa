"""Import DeepSpec drafter checkpoints (DeepSeek's released `dspark_*` / `dflash_*` folders).

Their config.json is the target's Qwen3 config with drafter fields added (`architectures:
["Qwen3DSparkModel"]`, `num_target_layers`, `num_hidden_layers` = draft layers, `block_size`,
`mask_token_id`, 0-based `target_layer_ids`, `markov_rank`, `markov_head_type`,
`enable_confidence_head`, `confidence_head_with_markov`); model.safetensors uses the same parameter
names as DSparkModel, plus copies of the target's `embed_tokens.weight` and `lm_head.weight`, which
must equal the loaded target's (that is how a DeepSpec folder is checked against its target).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from dspark.drafters.dspark import DSparkConfig, DSparkModel, TargetSpec
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel

DEEPSPEC_ARCHITECTURES = ("Qwen3DSparkModel",)
SHARED_KEYS = ("embed_tokens.weight", "lm_head.weight")


def is_deepspec_config(raw: dict) -> bool:
    return any(a in DEEPSPEC_ARCHITECTURES for a in raw.get("architectures") or [])


def deepspec_to_config(raw: dict, target: LoadedModel) -> DSparkConfig:
    """Map a DeepSpec config onto DSparkConfig, checking the geometry against the target."""
    targs = target.model.args
    ids = tuple(int(i) for i in raw["target_layer_ids"])
    if any(i < 0 for i in ids):
        raise DSparkError(f"target_layer_ids {list(ids)} use -1 (the embedding output), which dspark does not support")
    geometry = {
        "model_type": ("architecture", raw.get("model_type")),
        "hidden_size": ("hidden_size", raw.get("hidden_size")),
        "vocab_size": ("vocab_size", raw.get("vocab_size")),
        "num_target_layers": ("num_layers", raw.get("num_target_layers")),
        "num_attention_heads": ("num_heads", raw.get("num_attention_heads")),
        "num_key_value_heads": ("num_kv_heads", raw.get("num_key_value_heads")),
        "intermediate_size": ("intermediate_size", raw.get("intermediate_size")),
    }
    for field_name, (arg, value) in geometry.items():
        if value is not None and value != getattr(targs, arg):
            raise DSparkError(
                f"DeepSpec drafter has {field_name} {value!r}, but target {target.spec!r} has {getattr(targs, arg)!r}"
            )
    rank = int(raw.get("markov_rank", 0) or 0)
    confidence = bool(raw.get("enable_confidence_head", False))
    return DSparkConfig(
        target=TargetSpec(targs.architecture, targs.hidden_size, targs.vocab_size, targs.num_layers, None),
        target_layer_ids=ids,
        mask_token_id=int(raw["mask_token_id"]),
        layer_args=dataclasses.replace(targs, num_layers=1, sliding_windows=(None,)),
        block_size=int(raw.get("block_size", 7)),
        num_draft_layers=int(raw["num_hidden_layers"]),
        markov_rank=rank,
        markov_head_type=raw.get("markov_head_type") or "vanilla",
        confidence_head=confidence,
        confidence_with_markov=bool(raw.get("confidence_head_with_markov", True)),
        arch="dspark" if (rank or confidence) else "dflash",
    )


def same_at_coarser_precision(stored: torch.Tensor, own: torch.Tensor) -> bool:
    """Equal once both are rounded to the narrower dtype: a bf16 copy of an fp32 target's matrix
    matches it, and so does an fp32 copy of a bf16 target's."""
    if stored.dtype.itemsize < own.dtype.itemsize:
        return torch.equal(stored, own.to(stored.dtype))
    return torch.equal(stored.to(own.dtype), own)


def load_deepspec_model(folder: Path, target: LoadedModel) -> DSparkModel:
    from safetensors.torch import load_file

    from dspark.drafters.checkpoint import build_dspark_model, load_exact

    raw = json.loads((folder / "config.json").read_text())
    config = deepspec_to_config(raw, target)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise DSparkError(f"{folder} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    own = {"embed_tokens.weight": target.model.model.embed_tokens.weight, "lm_head.weight": target.model.lm_head.weight}
    for key in SHARED_KEYS:
        if key in state and not same_at_coarser_precision(state.pop(key), own[key]):
            raise DSparkError(f"{folder}: {key} differs from target {target.spec!r}'s: the drafter was made for another target")
    model = build_dspark_model(config, target, seed=None)
    load_exact(model, state, f"{folder}: weights do not match the DeepSpec layout", target.model.dtype)
    return model
