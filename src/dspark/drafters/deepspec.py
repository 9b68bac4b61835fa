"""Import DeepSpec drafter checkpoints (DeepSeek's released `dspark_*` / `dflash_*` / `eagle3_*` folders).

Their config.json is the target's Qwen3 (or Gemma 4 text) config with drafter fields added; Gemma 4
folders name `Gemma4DSparkModel` / `Gemma4Eagle3Model` and hold Gemma draft layers of the target's
global-attention geometry (`global_head_dim`, `num_global_key_value_heads` where
`attention_k_eq_v`). DSpark and DFlash:
`architectures: ["Qwen3DSparkModel"]`, `num_target_layers`, `num_hidden_layers` = draft layers,
`block_size`, `mask_token_id`, `target_layer_ids` (0-based layer outputs; -1 the embedding output),
`num_anchors`, `markov_rank`, `markov_head_type`, `enable_confidence_head`,
`confidence_head_with_markov`. Eagle3: `architectures: ["Qwen3Eagle3Model"]` (DeepSpec's eval.py
also loads `Eagle3DraftModel` folders with that class), `num_hidden_layers` = draft layers (1),
`target_layer_ids`, `ttt_length` (chained steps), `step_loss_decay`, `draft_num_hidden_layers`.
model.safetensors uses the same parameter names as DSparkModel / Eagle3Model, plus copies of the
target's `embed_tokens.weight` and `lm_head.weight`, which must equal the loaded target's (that is
how a DeepSpec folder is checked against its target).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from dspark.drafters.building import build_dspark_model, load_exact
from dspark.drafters.dspark import DSparkConfig, TargetSpec
from dspark.drafters.eagle3 import Eagle3Config, build_eagle3_model
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel

DEEPSPEC_ARCHITECTURES = ("Qwen3DSparkModel", "Gemma4DSparkModel")
DEEPSPEC_EAGLE3_ARCHITECTURES = ("Qwen3Eagle3Model", "Eagle3DraftModel", "Gemma4Eagle3Model")
SHARED_KEYS = ("embed_tokens.weight", "lm_head.weight")


def deepspec_arch(raw: dict) -> str | None:
    """'dspark' (DSpark or DFlash) or 'eagle3' for a DeepSpec config, None for anything else."""
    names = raw.get("architectures") or []
    if any(a in DEEPSPEC_ARCHITECTURES for a in names):
        return "dspark"
    if any(a in DEEPSPEC_EAGLE3_ARCHITECTURES for a in names):
        return "eagle3"
    return None


def is_deepspec_config(raw: dict) -> bool:
    return deepspec_arch(raw) is not None


def _target_spec(raw: dict, target: LoadedModel) -> TargetSpec:
    """The target's spec, after checking the folder's geometry fields against it."""
    targs = target.model.args
    geometry = {
        "model_type": ("architecture", raw.get("model_type")),
        "hidden_size": ("hidden_size", raw.get("hidden_size")),
        "vocab_size": ("vocab_size", raw.get("vocab_size")),
        "num_target_layers": ("num_layers", raw.get("num_target_layers")),
        "num_attention_heads": ("num_heads", raw.get("num_attention_heads")),
        "num_key_value_heads": ("num_kv_heads", raw.get("num_key_value_heads")),
        "intermediate_size": ("intermediate_size", raw.get("intermediate_size")),
    }
    if targs.layer_style == "gemma4":  # Gemma 4 draft layers take the global layers' geometry
        kv_key = "num_global_key_value_heads" if raw.get("attention_k_eq_v") else "num_key_value_heads"
        geometry["num_key_value_heads"] = ("num_kv_heads", raw.get(kv_key))
        geometry["global_head_dim"] = ("head_dim", raw.get("global_head_dim"))
        geometry["attention_k_eq_v"] = ("k_eq_v", raw.get("attention_k_eq_v"))
    for field_name, (arg, value) in geometry.items():
        if value is not None and value != getattr(targs, arg):
            raise DSparkError(
                f"DeepSpec drafter has {field_name} {value!r}, but target {target.spec!r} has {getattr(targs, arg)!r}"
            )
    return TargetSpec(targs.architecture, targs.hidden_size, targs.vocab_size, targs.num_layers, None,
                      target.logit_softcap)


def deepspec_to_config(raw: dict, target: LoadedModel) -> DSparkConfig:
    """Map a DeepSpec DSpark/DFlash config onto DSparkConfig, checking the geometry against the target."""
    spec = _target_spec(raw, target)
    rank = int(raw.get("markov_rank", 0) or 0)
    confidence = bool(raw.get("enable_confidence_head", False))
    return DSparkConfig(
        target=spec,
        target_layer_ids=tuple(int(i) for i in raw["target_layer_ids"]),
        mask_token_id=int(raw["mask_token_id"]),
        layer_args=dataclasses.replace(target.model.args, num_layers=1, sliding_windows=(None,)),
        block_size=int(raw.get("block_size", 7)),
        num_draft_layers=int(raw["num_hidden_layers"]),
        markov_rank=rank,
        markov_head_type=raw.get("markov_head_type") or "vanilla",
        confidence_head=confidence,
        confidence_with_markov=bool(raw.get("confidence_head_with_markov", True)),
        arch="dspark" if (rank or confidence) else "dflash",
    )


def deepspec_to_eagle3_config(raw: dict, target: LoadedModel):
    """Map a DeepSpec Eagle3 config onto Eagle3Config (ttt_length chained steps = block_size)."""
    spec = _target_spec(raw, target)
    layers = int(raw.get("draft_num_hidden_layers", raw.get("num_hidden_layers", 1)))
    if layers != 1:
        raise DSparkError(f"DeepSpec Eagle3 drafter has {layers} draft layers; dspark's Eagle3 (like DeepSpec's "
                          "evaluator, which asserts draft_num_hidden_layers == 1) runs exactly one")
    return Eagle3Config(
        target=spec,
        target_layer_ids=tuple(int(i) for i in raw["target_layer_ids"]),
        layer_args=dataclasses.replace(target.model.args, num_layers=1, sliding_windows=(None,)),
        block_size=int(raw.get("ttt_length", 7)),
    )


def same_at_coarser_precision(stored: torch.Tensor, own: torch.Tensor) -> bool:
    """Equal once both are rounded to the narrower dtype: a bf16 copy of an fp32 target's matrix
    matches it, and so does an fp32 copy of a bf16 target's."""
    if stored.dtype.itemsize < own.dtype.itemsize:
        return torch.equal(stored, own.to(stored.dtype))
    return torch.equal(stored.to(own.dtype), own)


def load_deepspec_model(folder: Path, target: LoadedModel) -> nn.Module:
    """A DSparkModel (DSpark/DFlash) or Eagle3Model from a DeepSpec folder, checked against the target."""
    from safetensors.torch import load_file

    raw = json.loads((folder / "config.json").read_text())
    if deepspec_arch(raw) == "eagle3":
        model = build_eagle3_model(deepspec_to_eagle3_config(raw, target), target, seed=None)
    else:
        model = build_dspark_model(deepspec_to_config(raw, target), target, seed=None)
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
    load_exact(model, state, f"{folder}: weights do not match the DeepSpec layout", target.model.dtype)
    return model
