"""Export DSpark / DFlash / Eagle3 drafters for serving engines and DeepSpec.

Two layouts:

* ``deepspec`` (default): DeepSpec's released ``Qwen3DSparkModel`` folder, the one layout both
  vLLM (``method: dspark``) and SGLang (``--speculative-algorithm DSPARK``) document as loadable.
  ``config.json`` is the target's full Qwen3 text config with the drafter fields on top;
  ``model.safetensors`` holds DeepSpec's parameter names in bf16, including copies of the
  target's ``embed_tokens`` and ``lm_head`` (SGLang skips them and uses the target's, so they must
  equal the target's). Optional sidecars: SGLang's ``sts.json`` (per-position confidence
  temperatures) and ``sps.json`` (a cost table). Eagle3 drafters get DeepSpec's ``Qwen3Eagle3Model``
  folder, which DeepSpec's evaluator loads; vLLM and SGLang serve Eagle3 through Llama draft layers
  (no per-head q/k norms, ``fc`` sized for three target layers in the versions read), so neither is
  documented to load it, and there is no speculators form of it.
* ``speculators``: the speculators config schema, loadable by vLLM only; SGLang refuses configs
  with ``speculators_model_type == "dspark"``.

Both layouts are anchor-first: block slot k predicts the token at anchor + k + 1 (DeepSpec's
convention, and ours), so ``sample_from_anchor`` is true and ``dspark_bonus_anchor`` is never
written. Shapes: K block, V vocabulary, H hidden, L tapped target layers, R Markov rank, D head dim.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from dspark.drafters.checkpoint import FORMAT, load_drafter_model
from dspark.drafters.deepspec import (
    DEEPSPEC_ARCHITECTURES, DEEPSPEC_EAGLE3_ARCHITECTURES, deepspec_arch, is_deepspec_config,
)
from dspark.drafters.dspark import DSparkConfig
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel

EXPORT_FORMATS = ("deepspec", "speculators")
EXPORTABLE_ARCHS = ("dspark", "dflash", "eagle3")
EXPORT_TARGET_FAMILIES = ("qwen3",)  # both engines implement DSpark drafters for Qwen3 only
# DeepSpec also trains and evaluates drafters for Gemma 4 targets (its Gemma4DSparkModel /
# Gemma4Eagle3Model); neither serving engine loads them, so they export to the DeepSpec layout only.
DEEPSPEC_ONLY_FAMILIES = ("gemma4_text",)
DEEPSPEC_NUM_ANCHORS = 512  # DeepSpec's configs: written when the training setting is unknown
DEEPSPEC_STEP_LOSS_DECAY = 0.8
# What DeepSpec needs in config.json to rebuild the drafter (transformers' Qwen3Config fills any
# other field with a default, so a missing geometry field would silently build other shapes):
# AutoConfig / eval.py dispatch, the attributes its modules read, the fields its model classes
# assert (`required_fields` in qwen3/modeling.py, plus the conditional ones), and for Eagle3 the
# evaluator's draft_num_hidden_layers. rope_parameters: RoPE in DeepSpec's transformers 5.x.
DEEPSPEC_LAYER_FIELDS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "hidden_act",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias",
    "attention_dropout", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
)
DEEPSPEC_DSPARK_FIELDS = ("target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head", "markov_rank",
                          "block_size", "layer_types")
DEEPSPEC_EAGLE3_FIELDS = ("target_layer_ids", "ttt_length", "step_loss_decay", "draft_num_hidden_layers")
# What DeepSpec's Gemma 4 build_draft_config asserts on top (hidden_activation replaces hidden_act).
DEEPSPEC_GEMMA4_FIELDS = ("global_head_dim", "attention_k_eq_v", "enable_moe_block",
                          "hidden_activation", "hidden_size_per_layer_input", "initializer_range",
                          "num_kv_shared_layers", "use_double_wide_mlp")
VLLM_HEAD_TYPES = ("vanilla",)  # vLLM builds markov_w1 / markov_w2 only
SGLANG_HEAD_TYPES = ("vanilla", "gated", "rnn")
SPECULATORS_VERSION = "0.3.0"
EXPORT_DTYPE = torch.bfloat16
# Keys that win an engine's lookup over the top-level fields, or make an engine refuse the folder
# (vLLM's target-layer and causality precedence, SGLang's prefixed dspark_* keys and its speculators
# refusal), plus auto_map (remote code) and torch_dtype (the old spelling of dtype). The base config
# comes from the target, so they are dropped from it and never written.
PRECEDENCE_KEYS = (
    "speculators_model_type", "eagle_aux_hidden_state_layer_ids", "dspark_bonus_anchor", "dflash_config",
    "dspark_config", "dspark_target_layer_ids", "dspark_block_size", "dspark_markov_rank",
    "dspark_markov_head_type", "dspark_noise_token_id", "is_causal", "auto_map", "torch_dtype",
)


# --------------------------------------------------------------------------------------- json
def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, or a DSparkError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DSparkError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise DSparkError(f"{what} {path} is not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise DSparkError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------- checks
def check_export_target(target: LoadedModel, fmt: str = "deepspec") -> None:
    """Refuse a target family the engines' DSpark drafters do not implement (Gemma 4: DeepSpec's
    layout only)."""
    family = target.model.args.architecture
    if family in DEEPSPEC_ONLY_FAMILIES:
        if fmt != "deepspec":
            raise DSparkError(
                f"target {target.spec!r} is {family!r}: vLLM and SGLang do not serve DSpark drafters for Gemma 4, so "
                f"its drafters export to DeepSpec's Gemma4DSparkModel layout only (format 'deepspec', which "
                "DeepSpec's evaluator loads), not to {fmt!r}"
            )
        return
    if family not in EXPORT_TARGET_FAMILIES:
        raise DSparkError(
            f"drafter export needs a Qwen3 target: vLLM (Qwen3DSparkModel) and SGLang (DSPARK) implement "
            f"DSpark drafters only for Qwen3; target {target.spec!r} is {family!r}; "
            f"supported: {', '.join(EXPORT_TARGET_FAMILIES)} (and {', '.join(DEEPSPEC_ONLY_FAMILIES)} for DeepSpec's layout)"
        )


def read_drafter_folder_config(folder: Path) -> dict:
    """The raw config.json of a dspark drafter folder or an imported DeepSpec folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise DSparkError(f"{folder} is not a drafter folder: config.json is missing")
    raw = read_json(path, "drafter config")
    if raw.get("format") != FORMAT and not is_deepspec_config(raw):
        raise DSparkError(
            f"{path} is neither a dspark drafter config (format {FORMAT!r}) nor a DeepSpec one "
            f"(architectures {list(DEEPSPEC_ARCHITECTURES + DEEPSPEC_EAGLE3_ARCHITECTURES)})"
        )
    return raw


def precheck_drafter_config(raw: dict, target: LoadedModel, where: str, fmt: str = "deepspec") -> str:
    """Refuse, before loading any weights: an unknown architecture, Eagle3 in the speculators format,
    DSpark embedding-layer taps (-1), another vocabulary. Returns the drafter's architecture."""
    if is_deepspec_config(raw):
        arch, ids, vocab = deepspec_arch(raw), raw.get("target_layer_ids", []), raw.get("vocab_size")
    else:
        arch, cfg = raw.get("arch"), raw.get("config", {})
        ids, vocab = cfg.get("target_layer_ids", []), cfg.get("target", {}).get("vocab_size")
    if arch not in EXPORTABLE_ARCHS:
        raise DSparkError(f"drafter {where} is {arch!r}, which export does not support; "
                          f"exportable: {', '.join(EXPORTABLE_ARCHS)}")
    if arch == "eagle3" and fmt != "deepspec":
        raise DSparkError(
            f"drafter {where} is Eagle3, which exports to DeepSpec's Qwen3Eagle3Model layout only (format "
            "'deepspec'): vLLM serves speculators Eagle3 folders through Llama draft layers, which lack the "
            "q/k norms of a Qwen3 Eagle3 layer"
        )
    negative = [int(i) for i in ids if int(i) < 0]
    if negative and arch != "eagle3":  # DeepSpec's Eagle3 evaluator reads -1 as hidden_states[0]
        raise DSparkError(
            f"drafter {where} taps target layer {negative[0]} (the embedding output) in target_layer_ids "
            f"{list(ids)}; SGLang rejects negative ids, so export needs ids in [0, {target.model.args.num_layers - 1}]"
        )
    if vocab is not None and int(vocab) != target.vocab_size:
        raise DSparkError(
            f"vocabulary mismatch: drafter {where} was made for a {vocab}-token vocabulary, but target "
            f"{target.spec!r} has {target.vocab_size}; export the drafter with the target it was made for"
        )
    draft_vocab = 0 if is_deepspec_config(raw) else int(raw.get("config", {}).get("draft_vocab_size", 0) or 0)
    if draft_vocab:
        # Expanding to the full vocabulary would let the engines draft tokens whose logits were never
        # trained (they were outside every softmax), and neither engine's DSpark loader takes a
        # draft-to-target token map as their Eagle3 loaders do: refuse rather than ship a weaker drafter.
        raise DSparkError(
            f"drafter {where} drafts over a reduced vocabulary (draft_vocab_size {draft_vocab} of "
            f"{target.vocab_size}); vLLM and SGLang load DSpark drafters over the full vocabulary only, so export "
            "needs a drafter trained with draft_vocab_size=0"
        )
    return arch


def engine_caveats(config) -> list[str]:
    """What the engines' (and DeepSpec's) loaders will do differently with this drafter (not errors)."""
    notes = []
    last = config.target.num_layers - 1
    if last in config.target_layer_ids:
        notes.append(f"target layer {last} is the target's last: DeepSpec's evaluator refuses it (transformers "
                     "returns that layer's output normed); vLLM and SGLang read the raw output, as dspark does")
    if config.arch == "eagle3":
        notes.append("Eagle3: loads in DeepSpec (Qwen3Eagle3Model) and back into dspark; vLLM and SGLang serve "
                     "Eagle3 through Llama draft layers without its q/k norms, so neither is known to load it")
        return notes
    if config.markov_rank > 0 and config.markov_head_type not in VLLM_HEAD_TYPES:
        notes.append(
            f"markov_head_type {config.markov_head_type!r}: vLLM builds only the vanilla Markov head "
            f"(markov_w1/markov_w2) and refuses the extra weights; SGLang supports {', '.join(SGLANG_HEAD_TYPES)}"
        )
    if config.markov_rank == 0:
        notes.append("markov_rank 0 (DFlash): SGLang's DSPARK loader requires markov_rank > 0")
    elif not config.confidence_head:
        notes.append("no confidence head: SGLang's ragged verify modes require its weights "
                     "(SGLANG_RAGGED_VERIFY_MODE=static does not)")
    return notes


# ------------------------------------------------------------------------------- DeepSpec layout
def confidence_with_markov(config: DSparkConfig) -> bool:
    """The value written for confidence_head_with_markov (always explicit: vLLM defaults it to False,
    speculators to True). A confidence head without a Markov head cannot use W1, so it reads False."""
    if config.confidence_head and config.markov_rank == 0:
        return False
    return bool(config.confidence_with_markov)


def training_settings(folder: Path, raw: dict) -> dict:
    """num_anchors and step_loss_decay (training-only fields DeepSpec's config carries): from an
    imported DeepSpec config, else from the trainer_state.json beside a training checkpoint, else
    DeepSpec's defaults."""
    out = {"num_anchors": DEEPSPEC_NUM_ANCHORS, "step_loss_decay": DEEPSPEC_STEP_LOSS_DECAY}
    state = folder / "trainer_state.json"
    if is_deepspec_config(raw):
        out.update({k: raw[k] for k in out if k in raw})
    elif state.is_file():
        train = read_json(state, "trainer state").get("train_config", {})
        out["num_anchors"] = int(train.get("num_anchors", out["num_anchors"]))
        out["step_loss_decay"] = float(train.get("loss", {}).get("ttt_decay", out["step_loss_decay"]))
    return out


def _target_base_config(target: LoadedModel, layers: int) -> dict:
    """The target's full text config (DeepSpec's build_draft_config starts from a copy of it) with
    the draft layer count, minus keys that would steer the engines' lookups."""
    hf = target.hf_config.get_text_config() if hasattr(target.hf_config, "get_text_config") else target.hf_config
    base = {k: v for k, v in hf.to_dict().items() if not k.startswith("_") and k not in PRECEDENCE_KEYS}
    base.update(model_type="qwen3", num_hidden_layers=layers, layer_types=["full_attention"] * layers,
                tie_word_embeddings=False, dtype="bfloat16")
    if is_gemma(target):
        # DeepSpec's Gemma 4 draft config: the text config with every draft layer global, its head
        # dim and KV heads spelled out (the per-layer table describes the target's layers, so it is
        # dropped and rebuilt on load), and no per-layer inputs, MoE or KV sharing in the drafter.
        args = target.model.args
        base.pop("per_layer_config", None)
        base.update(model_type=hf.model_type, global_head_dim=args.head_dim, attention_k_eq_v=args.k_eq_v,
                    num_global_key_value_heads=args.num_kv_heads if args.k_eq_v else None,
                    hidden_size_per_layer_input=0, num_kv_shared_layers=0, enable_moe_block=False,
                    use_double_wide_mlp=False, target_model_type=target.hf_config.model_type,
                    target_text_model_type=hf.model_type)
    return base


def is_gemma(target: LoadedModel) -> bool:
    return target.model.args.layer_style == "gemma4"


def deepspec_eagle3_config(config, target: LoadedModel, step_loss_decay: float) -> dict:
    """config.json of DeepSpec's Eagle3 layout (qwen3/config.py build_draft_config's fields)."""
    base = _target_base_config(target, 1)
    base.update(architectures=["Gemma4Eagle3Model" if is_gemma(target) else DEEPSPEC_EAGLE3_ARCHITECTURES[0]],
                num_target_layers=config.target.num_layers,
                target_layer_ids=[int(i) for i in config.target_layer_ids], ttt_length=config.block_size,
                step_loss_decay=step_loss_decay, draft_num_hidden_layers=1)
    return base


def deepspec_config(config: DSparkConfig, target: LoadedModel, num_anchors: int = DEEPSPEC_NUM_ANCHORS) -> dict:
    """config.json of the DeepSpec layout: the target's full text config plus the drafter fields
    (DeepSpec's build_draft_config overwrites the same fields of a copy of the target config)."""
    base = _target_base_config(target, config.num_draft_layers)  # all full attention = non-causal blocks in vLLM
    base.update(
        architectures=["Gemma4DSparkModel" if is_gemma(target) else "Qwen3DSparkModel"],
        num_target_layers=config.target.num_layers,
        block_size=config.block_size,
        mask_token_id=config.mask_token_id,
        target_layer_ids=[int(i) for i in config.target_layer_ids],  # 0-based layer outputs
        num_anchors=int(num_anchors),  # a training setting; Qwen3DSparkModel asserts it is present
        markov_rank=config.markov_rank,
        markov_head_type=config.markov_head_type,
        enable_confidence_head=bool(config.confidence_head),
        confidence_head_with_markov=confidence_with_markov(config),
        sample_from_anchor=True,  # anchor-first blocks; explicit layout metadata
    )
    return base


def missing_deepspec_fields(config: dict) -> list[str]:
    """The fields DeepSpec needs that config lacks (see DEEPSPEC_LAYER_FIELDS)."""
    layer = DEEPSPEC_LAYER_FIELDS
    if config["architectures"][0].startswith("Gemma4"):
        layer = tuple(f for f in layer if f != "hidden_act") + DEEPSPEC_GEMMA4_FIELDS
        layer += ("num_global_key_value_heads",) * bool(config.get("attention_k_eq_v"))
    if config["architectures"][0] in DEEPSPEC_EAGLE3_ARCHITECTURES:
        wanted = layer + DEEPSPEC_EAGLE3_FIELDS
    else:
        wanted = layer + DEEPSPEC_DSPARK_FIELDS
        wanted += ("markov_head_type",) * (config.get("markov_rank", 0) > 0)
        wanted += ("confidence_head_with_markov",) * bool(config.get("enable_confidence_head"))
    return [name for name in wanted if config.get(name) is None]


def expected_deepspec_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of DeepSpec's model.safetensors, derived from its config.json alone. Eagle3's
    single layer reads [embedding ; hidden] (2H wide) and keeps its hidden_norm inside the layer."""
    hidden, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    gemma = config["architectures"][0].startswith("Gemma4")
    k_eq_v = gemma and bool(config.get("attention_k_eq_v"))
    if gemma:  # DeepSpec's Gemma 4 draft layers: the global layers' head dim (and KV heads with k = v)
        head_dim = config["global_head_dim"]
        kv_heads = config["num_global_key_value_heads"] if k_eq_v else kv_heads
    eagle3 = config["architectures"][0] in DEEPSPEC_EAGLE3_ARCHITECTURES
    rank = 0 if eagle3 else config["markov_rank"]
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "fc.weight": (hidden, len(config["target_layer_ids"]) * hidden),  # [H, L*H]
        "norm.weight": (hidden,),
    }
    shapes["layers.0.hidden_norm.weight" if eagle3 else "hidden_norm.weight"] = (hidden,)
    proj_out = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        for name, rows in proj_out.items():
            if name == "v" and k_eq_v:  # values are the keys' projection
                continue
            shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, 2 * hidden if eagle3 else hidden)
            if config.get("attention_bias"):
                shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if config.get("attention_bias"):
            shapes[f"{p}self_attn.o_proj.bias"] = (hidden,)
        shapes[f"{p}self_attn.q_norm.weight"] = (head_dim,)
        shapes[f"{p}self_attn.k_norm.weight"] = (head_dim,)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
        if gemma:  # sandwich norms and the layer scalar (v_norm has no weight)
            shapes[f"{p}pre_feedforward_layernorm.weight"] = shapes[f"{p}post_feedforward_layernorm.weight"] = (hidden,)
            shapes[f"{p}layer_scalar"] = (1,)
    if rank > 0:
        shapes["markov_head.markov_w1.weight"] = (vocab, rank)  # an embedding [V, R]
        shapes["markov_head.markov_w2.weight"] = (vocab, rank)  # Linear(R -> V) weight [V, R]
        if config["markov_head_type"] == "gated":
            shapes["markov_head.gate_proj.weight"] = (rank, hidden + rank)
            shapes["markov_head.gate_proj.bias"] = (rank,)
        elif config["markov_head_type"] == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * rank, 2 * rank + hidden)
            shapes["markov_head.joint_proj.bias"] = (3 * rank,)
    if not eagle3 and config["enable_confidence_head"]:
        width = hidden + (rank if config["confidence_head_with_markov"] and rank > 0 else 0)
        shapes["confidence_head.proj.weight"] = (1, width)
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


def deepspec_state_dict(model: torch.nn.Module, target: LoadedModel) -> dict[str, torch.Tensor]:
    """The drafter's weights plus the target's embedding and LM head, in bf16, no prefixes.

    Every tensor is a fresh contiguous copy: a tied target shares one matrix between its embedding
    and LM head, and safetensors refuses to write shared storage."""
    state = {
        k.removeprefix("_orig_mod.").removeprefix("module."): v.detach().to(EXPORT_DTYPE).contiguous().clone()
        for k, v in model.state_dict().items()
    }
    tm = target.model
    state["embed_tokens.weight"] = tm.model.embed_tokens.weight.detach().to(EXPORT_DTYPE).contiguous().clone()
    state["lm_head.weight"] = tm.lm_head.weight.detach().to(EXPORT_DTYPE).contiguous().clone()
    return state


def check_state_matches_config(state: dict[str, torch.Tensor], config: dict) -> None:
    """The exported weights must be exactly DeepSpec's {name: shape} for this config."""
    expected = expected_deepspec_shapes(config)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise DSparkError(
            f"exported weights do not match DeepSpec's layout: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {[(k, tuple(state[k].shape), expected[k]) for k in wrong[:3]]}"
        )


# ------------------------------------------------------------------------------- speculators
def speculators_config(deepspec: dict, target: LoadedModel) -> dict:
    """The speculators config of the same drafter (vLLM only; SGLang refuses it).

    aux_hidden_state_layer_ids are capture ids (target layer id + 1; 0 would be the embedding);
    speculative_tokens is block_size because the blocks are anchor-first."""
    drafter_keys = {"architectures", "num_target_layers", "block_size", "mask_token_id", "target_layer_ids",
                    "num_anchors", "markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov",
                    "sample_from_anchor", "dtype"}
    layer_config = {k: v for k, v in deepspec.items() if k not in drafter_keys}
    hf = target.hf_config
    block = deepspec["block_size"]
    return {
        "speculators_model_type": "dspark",
        "architectures": ["DSparkSpeculator"],
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer_config,
        "draft_vocab_size": deepspec["vocab_size"],
        "block_size": block,
        "target_hidden_size": deepspec["hidden_size"],
        "aux_hidden_state_layer_ids": [i + 1 for i in deepspec["target_layer_ids"]],
        "mask_token_id": deepspec["mask_token_id"],
        "sliding_window_non_causal": False,
        "sample_from_anchor": True,
        "markov_rank": deepspec["markov_rank"],
        "markov_head_type": deepspec["markov_head_type"],
        "enable_confidence_head": deepspec["enable_confidence_head"],
        "confidence_head_with_markov": deepspec["confidence_head_with_markov"],
        "speculators_config": {
            "algorithm": "dspark",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": block}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": target.spec, "architectures": list(getattr(hf, "architectures", None) or [])},
        },
        "dtype": "bfloat16",
    }


def check_speculators_exportable(config: DSparkConfig, cost_profile: str | Path | None) -> None:
    if config.markov_rank == 0:
        raise DSparkError(
            "the speculators format is for DSpark drafters (markov_rank > 0); this one is DFlash, whose "
            "anchor-first layout speculators' DFlash does not use; export it with format 'deepspec'"
        )
    if config.markov_head_type not in VLLM_HEAD_TYPES:
        raise DSparkError(
            f"markov_head_type {config.markov_head_type!r} cannot be served from the speculators format: it is "
            f"vLLM-only and vLLM supports {', '.join(VLLM_HEAD_TYPES)}; export with format 'deepspec' for SGLang"
        )
    if cost_profile is not None:
        raise DSparkError("a cost profile becomes SGLang's sps.json; the speculators format is vLLM-only, "
                          "which reads no cost table; use format 'deepspec'")


# -------------------------------------------------------------------------------- sidecars
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _positive_floats(values, name: str, length: int) -> list[float]:
    """`length` finite numbers > 0 as floats, or a DSparkError naming `name`."""
    if not isinstance(values, list) or len(values) != length:
        raise DSparkError(f"{name} must be a list of {length} values (one per position), got {values!r}")
    if not all(_is_number(v) and v > 0 for v in values):
        raise DSparkError(f"{name} must all be finite numbers > 0, got {values!r}")
    return [float(v) for v in values]


def sts_table(calibration: dict, block_size: int) -> dict:
    """SGLang's sts.json from a calibration.json ({"method": "sts", "temperatures": [K floats > 0],
    "ece_before", "ece_after", "num_rounds", "dataset"}). SGLang applies sigmoid(raw / T_k) at slot k,
    as DSparkDrafter does; num_samples counts calibration rounds (one draft block each)."""
    if calibration.get("method") != "sts":
        raise DSparkError(f"calibration method {calibration.get('method')!r} cannot be exported; supported: sts")
    temps = _positive_floats(calibration.get("temperatures"), "calibration temperatures", block_size)
    ece = {key: calibration.get(key, []) for key in ("ece_before", "ece_after")}
    for key, values in ece.items():
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise DSparkError(f"calibration {key} must be a list of numbers, got {values!r}")
    rounds, dataset = calibration.get("num_rounds", 0), calibration.get("dataset", "")
    if not _is_int(rounds, 0):
        raise DSparkError(f"calibration num_rounds must be an integer >= 0, got {rounds!r}")
    if not isinstance(dataset, str):
        raise DSparkError(f"calibration dataset must be a string, got {dataset!r}")
    return {"temperatures": temps, "dataset": dataset, "num_samples": rounds,
            **{key: [float(v) for v in values] for key, values in ece.items()}}


def calibration_sidecar(folder: Path, config: DSparkConfig) -> dict | None:
    """sts.json content from the folder's calibration.json, else from the config's temperatures."""
    path = folder / "calibration.json"
    from_file = sts_table(read_json(path, "calibration"), config.block_size) if path.is_file() else None
    temps = list(config.confidence_temperatures)
    if from_file and temps and from_file["temperatures"] != temps:
        raise DSparkError(f"{path} temperatures {from_file['temperatures']} disagree with the drafter config's {temps}")
    table = from_file or (sts_table({"method": "sts", "temperatures": temps}, config.block_size) if temps else None)
    if table is not None and not config.confidence_head:
        warnings.warn(f"{folder} has confidence temperatures but no confidence head; sts.json is not written",
                      stacklevel=3)
        return None
    return table


def sps_table(profile: dict) -> dict:
    """SGLang's flat SPS cost table from a cost profile {"tokens": [strictly increasing ints],
    "sps": [target steps per second at that many batch tokens], "device": str, ...}.

    The table is hardware-specific: it describes the device it was measured on (`device`) and
    misleads SGLang's verify planner on any other."""
    tokens = profile.get("tokens")
    increasing = isinstance(tokens, list) and tokens and all(_is_int(t, 1) for t in tokens) and all(
        a < b for a, b in itertools.pairwise(tokens))
    if not increasing:
        raise DSparkError(f"cost profile tokens must be strictly increasing integers >= 1, got {tokens!r}")
    steps = _positive_floats(profile.get("sps"), "cost profile sps", len(tokens))
    max_tokens = profile.get("max_batch_tokens", tokens[-1])
    if not _is_int(max_tokens, tokens[-1]):
        raise DSparkError(f"cost profile max_batch_tokens must be an integer >= {tokens[-1]}, got {max_tokens!r}")
    return {"sample_batch_tokens": list(tokens), "sample_steps_per_sec": steps, "max_batch_tokens": max_tokens}


def readme_text(fmt: str, config: dict, target: LoadedModel, caveats: list[str], sidecars: list[str]) -> str:
    """A short note for the folder: what it is, which engine loads it, with which flags."""
    block = config.get("block_size", config.get("ttt_length"))
    family = "Gemma 4" if is_gemma(target) else "Qwen3"
    lines = [f"# Drafter export ({fmt} format)", "", f"Target: {target.spec} ({family}). block_size: {block}.", ""]
    if is_gemma(target):
        lines += [
            f"DeepSpec's {config['architectures'][0]} layout (config.json + model.safetensors, bf16): DeepSpec's",
            "eval.py loads it with --draft_name_or_path <this folder>, and dspark imports it back. vLLM and SGLang",
            "do not serve DSpark, DFlash or Eagle3 drafters for Gemma 4 targets.",
        ]
    elif "ttt_length" in config:
        lines += [
            "DeepSpec's Qwen3Eagle3Model layout (config.json + model.safetensors, bf16): DeepSpec's eval.py loads",
            "it with --draft_name_or_path <this folder>, and dspark imports it back. vLLM and SGLang are not",
            "known to load it (their Eagle3 draft layers are Llama layers without its q/k norms).",
        ]
    elif fmt == "deepspec":
        vllm = json.dumps({"method": "dspark", "model": "<this folder>", "num_speculative_tokens": block})
        sglang_block = f"--speculative-dspark-block-size {block}"
        lines += [
            "DeepSpec's Qwen3DSparkModel layout (config.json + model.safetensors, bf16), which vLLM and SGLang",
            "document as loadable. Launch flags as documented by those projects (not tested with this export):",
            f"- vLLM: --speculative-config '{vllm}'",
            f"- SGLang: --speculative-algorithm DSPARK --speculative-draft-model-path <this folder> {sglang_block}",
        ]
        if "sts.json" in sidecars:
            lines.append("  plus --speculative-dspark-confidence-sts-path <this folder>/sts.json")
        if "sps.json" in sidecars:
            lines.append("  plus --speculative-dspark-sps-table-path <this folder>/sps.json "
                         "(hardware-specific: valid only on the device it was measured on)")
    else:
        lines += [
            "Speculators format: loadable by vLLM only. NOT loadable by SGLang, which refuses configs with",
            "speculators_model_type 'dspark'. Export with format 'deepspec' for SGLang.",
            "- vLLM: --speculative-config '{\"model\": \"<this folder>\"}' (method and num_speculative_tokens",
            "  come from speculators_config, as documented by vLLM; not tested with this export)",
        ]
    if caveats:
        lines += ["", "Caveats:"] + [f"- {note}" for note in caveats]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ writing
def check_out_folder(out: Path, source: Path, overwrite: bool) -> None:
    if out.resolve() == source.resolve():
        raise DSparkError(f"the export folder {out} is the drafter folder itself; choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DSparkError(f"{out} already exists and is not empty; choose another --out or pass overwrite "
                          f"(nothing was written)")


def write_folder(out: Path, files: dict[str, str], state: dict[str, torch.Tensor], overwrite: bool) -> Path:
    """Write the folder under a temporary name, then rename it into place: a crash leaves any old
    folder intact; with overwrite, the old folder is moved aside until the new one is in place."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    old = None
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            if not overwrite and (not out.is_dir() or any(out.iterdir())):
                raise DSparkError(f"{out} appeared while exporting; nothing was overwritten")
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            (old / out.name).rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def export_drafter(
    drafter_dir: str | Path,
    target: LoadedModel,
    fmt: str = "deepspec",
    *,
    out: str | Path,
    cost_profile: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a DSpark, DFlash or Eagle3 drafter folder (dspark's own, or an imported DeepSpec one).

    fmt "deepspec": the DeepSpec layout vLLM and SGLang both load, plus sts.json when the folder has a
    calibration (calibration.json, or temperatures in its config) and sps.json from `cost_profile`
    (a hardware-specific cost table). fmt "speculators": vLLM only, not loadable by SGLang. Eagle3:
    DeepSpec's Qwen3Eagle3Model layout only (fmt "deepspec"), without sidecars.
    The drafter is checked against `target` (the one it was made for; Qwen3 only). Returns `out`.
    """
    if fmt not in EXPORT_FORMATS:
        raise DSparkError(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    folder, out = Path(drafter_dir), Path(out)
    check_out_folder(out, folder, overwrite)
    check_export_target(target, fmt)
    raw = read_drafter_folder_config(folder)
    arch = precheck_drafter_config(raw, target, str(folder), fmt)
    if arch == "eagle3" and cost_profile is not None:
        raise DSparkError("a cost profile becomes SGLang's DSpark sps.json, which an Eagle3 export has no use for")
    model = load_drafter_model(folder, target)
    settings = training_settings(folder, raw)
    if arch == "eagle3":
        config = deepspec_eagle3_config(model.config, target, settings["step_loss_decay"])
    else:
        config = deepspec_config(model.config, target, settings["num_anchors"])
    missing = missing_deepspec_fields(config)
    if missing:  # the target's config lacks what DeepSpec's Qwen3 classes need
        raise DSparkError(f"target {target.spec!r}'s config lacks {missing}, which DeepSpec's drafter config needs")
    state = deepspec_state_dict(model, target)
    check_state_matches_config(state, config)
    caveats: list[str] = []
    files: dict[str, str] = {}
    if arch == "eagle3":
        caveats = engine_caveats(model.config)
        for note in caveats:
            warnings.warn(note, stacklevel=2)
    elif fmt == "speculators":
        check_speculators_exportable(model.config, cost_profile)
        config = speculators_config(config, target)
    else:
        caveats = engine_caveats(model.config)
        for note in caveats:
            warnings.warn(note, stacklevel=2)
        sts = calibration_sidecar(folder, model.config)
        if sts is not None:
            files["sts.json"] = _json(sts)
        if cost_profile is not None:
            files["sps.json"] = _json(sps_table(read_json(Path(cost_profile), "cost profile")))
    files["config.json"] = _json(config)
    files["README.md"] = readme_text(fmt, config, target, caveats, sorted(files))
    return write_folder(out, files, state, overwrite)
