"""Drafter export: DeepSpec's layout (vLLM and SGLang), the speculators format (vLLM only), SGLang's
sts.json / sps.json sidecars, and the round trip back through the DeepSpec import.

The engines' config rules are re-implemented here as small functions (nothing is vendored); each
cites the engine file it follows, as summarised in the project's notes on export formats.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from dspark.drafters.checkpoint import load_drafter, load_drafter_model, save_drafter
from dspark.drafters.export import export_drafter
from dspark.errors import DSparkError
from dspark.models.target import load_model
from tests.conftest import save_tiny_model
from tests.test_drafters import PROMPTS, _requests, _start, make, round_to_bf16, write_deepspec_folder

HEAD_KINDS = ["dspark-vanilla", "dspark-gated", "dspark-rnn", "dflash"]
PRECEDENCE_STEALING = ("speculators_model_type", "eagle_aux_hidden_state_layer_ids", "dspark_bonus_anchor",
                       "dflash_config", "dspark_target_layer_ids", "is_causal")


@pytest.fixture(scope="module")
def target(tiny_dirs):
    return load_model(str(tiny_dirs["qwen3"]), "fp32")


def saved_drafter(root: Path, target, kind: str, seed: int = 0, **overrides):
    """A drafter folder whose weights are bf16 values (stored in the target's dtype), so that the
    bf16 export holds them exactly and the round trip can be compared bit for bit."""
    overrides = {"num_draft_layers": 2, "block_size": 4, **overrides}
    model = make(kind, target, seed=seed, **overrides).model
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.to(torch.bfloat16))
    folder = save_drafter(model, root / f"src-{kind}")
    return folder, model


def export(folder: Path, target, out: Path, **kwargs) -> Path:
    """export_drafter with its engine caveats (warnings) silenced; tests of the caveats use pytest.warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_drafter(folder, target, out=out, **kwargs)


def read_export(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((out / "config.json").read_text()), load_file(str(out / "model.safetensors"))


# ------------------------------------------------------------------------- the weight contract
def deepspec_shapes_from_config(cfg: dict) -> dict[str, tuple[int, ...]]:
    """DeepSpec's safetensors names and shapes (its modeling file, as listed in the digest's
    checkpoint section), derived from config.json only."""
    h, v, inter, r = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["markov_rank"]
    d = cfg["head_dim"]
    q_rows, kv_rows = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {"embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
           "hidden_norm.weight": (h,), "fc.weight": (h, h * len(cfg["target_layer_ids"]))}
    per_layer = {
        "self_attn.q_proj.weight": (q_rows, h), "self_attn.k_proj.weight": (kv_rows, h),
        "self_attn.v_proj.weight": (kv_rows, h), "self_attn.o_proj.weight": (h, q_rows),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    out.update({f"layers.{i}.{k}": s for i in range(cfg["num_hidden_layers"]) for k, s in per_layer.items()})
    if r:
        out.update({"markov_head.markov_w1.weight": (v, r), "markov_head.markov_w2.weight": (v, r)})
        extra = {"gated": {"gate_proj.weight": (r, h + r), "gate_proj.bias": (r,)},
                 "rnn": {"joint_proj.weight": (3 * r, 2 * r + h), "joint_proj.bias": (3 * r,)}}
        out.update({f"markov_head.{k}": s for k, s in extra.get(cfg["markov_head_type"], {}).items()})
    if cfg["enable_confidence_head"]:
        with_markov = r if cfg["confidence_head_with_markov"] else 0
        out.update({"confidence_head.proj.weight": (1, h + with_markov), "confidence_head.proj.bias": (1,)})
    return out


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_deepspec_export_has_exactly_deepspecs_weights_in_bf16(target, tmp_path, kind):
    folder, _ = saved_drafter(tmp_path, target, kind)
    cfg, state = read_export(export(folder, target, tmp_path / "out"))
    expected = deepspec_shapes_from_config(cfg)
    assert set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert not [k for k in state if k.startswith(("module.", "_orig_mod.", "model."))]
    # vLLM stacks q/k/v into qkv_proj and gate/up into gate_up_proj: the row counts must add up
    qkv_rows = sum(state[f"layers.0.self_attn.{n}_proj.weight"].shape[0] for n in "qkv")
    assert qkv_rows == (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * cfg["head_dim"]
    gate_up_rows = sum(state[f"layers.1.mlp.{n}_proj.weight"].shape[0] for n in ("gate", "up"))
    assert gate_up_rows == 2 * cfg["intermediate_size"]
    # fc reads the concatenated target features: target hidden size x number of tapped layers (both engines)
    assert state["fc.weight"].shape[1] == cfg["hidden_size"] * len(cfg["target_layer_ids"])


def test_export_embedding_and_lm_head_are_the_targets_in_bf16(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    _, state = read_export(export(folder, target, tmp_path / "out"))
    tm = target.model
    for key, own in (("embed_tokens.weight", tm.model.embed_tokens.weight), ("lm_head.weight", tm.lm_head.weight)):
        expected = own.detach().to(torch.bfloat16)
        assert state[key].dtype == torch.bfloat16
        assert state[key].view(torch.int16).numpy().tobytes() == expected.view(torch.int16).numpy().tobytes()


def test_export_config_is_the_targets_qwen3_config_plus_drafter_fields(target, tmp_path, tiny_dirs):
    from transformers import AutoConfig

    folder, model = saved_drafter(tmp_path, target, "dspark-vanilla")
    out = export(folder, target, tmp_path / "out")
    cfg, _ = read_export(out)
    target_cfg = json.loads((tiny_dirs["qwen3"] / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "vocab_size", "max_position_embeddings", "rope_parameters"):
        assert cfg[key] == target_cfg[key], key
    c = model.config
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "qwen3"
    assert cfg["num_hidden_layers"] == 2 and cfg["layer_types"] == ["full_attention"] * 2
    assert cfg["num_target_layers"] == target_cfg["num_hidden_layers"]
    assert (cfg["block_size"], cfg["mask_token_id"]) == (4, c.mask_token_id)
    assert cfg["target_layer_ids"] == list(c.target_layer_ids)
    assert (cfg["markov_rank"], cfg["markov_head_type"]) == (8, "vanilla")
    assert cfg["enable_confidence_head"] is True and cfg["confidence_head_with_markov"] is True
    assert cfg["sample_from_anchor"] is True and cfg["tie_word_embeddings"] is False and cfg["dtype"] == "bfloat16"
    assert not [k for k in PRECEDENCE_STEALING if k in cfg]
    loaded = AutoConfig.from_pretrained(out)  # both engines read the folder through transformers
    assert type(loaded).__name__ == "Qwen3Config" and loaded.num_hidden_layers == 2 and loaded.markov_rank == 8


def test_dflash_export_carries_the_fields_deepspec_writes_for_dflash(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dflash")
    with pytest.warns(UserWarning, match="markov_rank > 0"):
        out = export_drafter(folder, target, out=tmp_path / "out")
    cfg, state = read_export(out)
    assert (cfg["markov_rank"], cfg["enable_confidence_head"]) == (0, False)
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["sample_from_anchor"] is True
    assert not [k for k in state if k.startswith(("markov_head", "confidence_head"))]
    assert "markov_rank > 0" in (out / "README.md").read_text()


# -------------------------------------------------------------------------- engine config rules
def vllm_aux_layer_ids(cfg: dict) -> list[int] | None:
    """vLLM eagle3_utils.py (get_eagle3_aux_layers_from_config): capture ids (target id + 1), by
    precedence eagle_aux_hidden_state_layer_ids (as is) > dflash_config.target_layer_ids (+1) >
    dspark_target_layer_ids (as is) > top-level target_layer_ids (+1)."""
    if cfg.get("eagle_aux_hidden_state_layer_ids") is not None:
        return list(cfg["eagle_aux_hidden_state_layer_ids"])
    nested = (cfg.get("dflash_config") or {}).get("target_layer_ids")
    if nested is not None:
        return [i + 1 for i in nested]
    if cfg.get("dspark_target_layer_ids") is not None:
        return list(cfg["dspark_target_layer_ids"])
    if cfg.get("target_layer_ids") is not None:
        return [i + 1 for i in cfg["target_layer_ids"]]
    return None


def vllm_resolve(cfg: dict) -> dict:
    """The fields vLLM's Qwen3DSparkModel reads (qwen3_dspark.py, qwen3_dflash.py)."""
    nested = cfg.get("dflash_config") or {}
    layer_types = cfg.get("layer_types")
    if cfg.get("is_causal") is not None:  # qwen3_dflash.py: is_causal > dflash_config.causal > layer_types
        causal = bool(cfg["is_causal"])
    elif nested.get("causal") is not None:
        causal = bool(nested["causal"])
    else:
        causal = bool(layer_types) and "sliding_attention" in layer_types
    aux = vllm_aux_layer_ids(cfg)
    return {
        "aux_layer_ids": aux,
        "mask_token_id": nested.get("mask_token_id", cfg.get("mask_token_id")),  # dflash_config first
        "markov_rank": cfg["markov_rank"],  # required at the top level
        "enable_confidence_head": bool(cfg.get("enable_confidence_head", False)),
        "confidence_head_with_markov": bool(cfg.get("confidence_head_with_markov", False)),  # vLLM default False
        "bonus_anchor": bool(cfg.get("dspark_bonus_anchor", False)),  # False = anchor-first
        "fc_width": (cfg.get("target_hidden_size") or cfg["hidden_size"]) * len(aux),
        "draft_vocab_size": cfg.get("draft_vocab_size") or cfg["vocab_size"],
        "causal": causal,
    }


def sglang_parse(cfg: dict, target_vocab_size: int, block_size_flag: int | None = None) -> dict:
    """SGLang's DSPARK parse rules (dspark_config.py parse_dspark_draft_config + resolve_runtime_config,
    dflash_utils.py parse_dflash_draft_config): nested dflash_config first, then the top level."""
    if cfg.get("speculators_model_type") == "dspark":
        raise ValueError("speculators_model_type 'dspark' uses another slot convention: refused")
    nested, dspark = cfg.get("dflash_config") or {}, cfg.get("dspark_config") or {}
    rank = int(dspark.get("markov_rank", cfg.get("markov_rank", 0)))
    if rank <= 0:
        raise ValueError(f"DSpark draft requires markov_rank > 0; got markov_rank={rank}")
    head = dspark.get("markov_head_type", cfg.get("markov_head_type"))
    if head not in ("vanilla", "gated", "rnn"):
        raise ValueError(f"markov_head_type {head!r} is required and must be vanilla, gated or rnn")
    mask = dspark.get("mask_token_id", cfg.get("mask_token_id"))
    if mask is None or not 0 <= int(mask) < target_vocab_size:
        raise ValueError(f"mask_token_id {mask} outside the target vocabulary {target_vocab_size}")
    block = nested.get("block_size", cfg.get("block_size"))
    gamma = block_size_flag or block or 7  # --speculative-dspark-block-size, else block_size, else 7
    ids = nested.get("target_layer_ids", cfg.get("target_layer_ids"))
    layers = nested.get("num_target_layers", cfg.get("num_target_layers"))
    if not ids or any(not 0 <= i < layers for i in ids):
        raise ValueError(f"target_layer_ids {ids} out of range for num_target_layers={layers}")
    return {
        "gamma": gamma, "block_size": block, "verify_window": gamma + 1, "capture_layer_ids": [i + 1 for i in ids],
        "mask_token_id": int(mask), "markov_rank": rank, "markov_head_type": head,
        "confidence_head_with_markov": bool(cfg.get("confidence_head_with_markov", rank > 0)),
        "fc_width": len(ids) * cfg["hidden_size"],
    }


@pytest.mark.parametrize("kind", ["dspark-vanilla", "dspark-gated"])
def test_engine_rules_resolve_the_intended_layers_mask_rank_and_confidence(target, tmp_path, kind):
    folder, model = saved_drafter(tmp_path, target, kind)
    cfg, state = read_export(export(folder, target, tmp_path / "out"))
    c = model.config
    capture = [i + 1 for i in c.target_layer_ids]
    vllm = vllm_resolve(cfg)
    assert vllm["aux_layer_ids"] == capture and vllm["mask_token_id"] == c.mask_token_id
    assert (vllm["markov_rank"], vllm["enable_confidence_head"], vllm["confidence_head_with_markov"]) == (8, True, True)
    assert vllm["bonus_anchor"] is False and vllm["causal"] is False
    assert vllm["fc_width"] == state["fc.weight"].shape[1] and vllm["draft_vocab_size"] == target.vocab_size
    sglang = sglang_parse(cfg, target.vocab_size)
    assert sglang["capture_layer_ids"] == capture and sglang["mask_token_id"] == c.mask_token_id
    assert (sglang["gamma"], sglang["block_size"], sglang["markov_rank"]) == (4, 4, 8)
    assert sglang["markov_head_type"] == kind.split("-")[1] and sglang["confidence_head_with_markov"] is True
    assert sglang["fc_width"] == state["fc.weight"].shape[1]


def test_dflash_export_resolves_in_vllm_and_is_refused_by_sglangs_dspark_rules(target, tmp_path):
    folder, model = saved_drafter(tmp_path, target, "dflash")
    cfg, _ = read_export(export(folder, target, tmp_path / "out"))
    vllm = vllm_resolve(cfg)
    assert vllm["aux_layer_ids"] == [i + 1 for i in model.config.target_layer_ids]
    assert (vllm["markov_rank"], vllm["enable_confidence_head"]) == (0, False)
    with pytest.raises(ValueError, match="markov_rank > 0"):
        sglang_parse(cfg, target.vocab_size)


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("kind", ["dspark-vanilla", "dspark-rnn", "dflash"])
def test_export_loads_back_through_the_deepspec_import_with_identical_logits(target, tmp_path, kind):
    folder, model = saved_drafter(tmp_path, target, kind, seed=3)
    loaded = load_drafter_model(export(folder, target, tmp_path / "out"), target)
    c, lc = model.config, loaded.config
    assert (lc.arch, lc.num_draft_layers, lc.block_size, lc.target_layer_ids) == (c.arch, 2, 4, c.target_layer_ids)
    heads = ("markov_rank", "markov_head_type", "confidence_head")
    assert [getattr(lc, name) for name in heads] == [getattr(c, name) for name in heads]
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 10, 32 * len(c.target_layer_ids), generator=gen)
    anchor_pos = torch.tensor([[3, 7], [2, 9]])
    anchor_tok = torch.randint(0, target.vocab_size, (2, 2), generator=gen)
    prev = torch.randint(0, target.vocab_size, (2, 2, 4), generator=gen)
    outs = []
    for m in (model, loaded):
        hidden = m.forward_blocks(feats, anchor_tok, anchor_pos)  # [B, N, K, H]
        logits = m.head_logits(m.logits(hidden), prev, hidden)  # [B, N, K, V]
        outs.append((logits, m.confidence_logits(hidden, prev)))
    assert outs[0][0].dtype == torch.float32
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1] is None and outs[1][1] is None) or torch.equal(outs[0][1], outs[1][1])


def test_an_imported_deepspec_folder_exports_to_the_same_weights(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    first = export(folder, target, tmp_path / "a")
    second = export(first, target, tmp_path / "b")
    (cfg_a, state_a), (cfg_b, state_b) = read_export(first), read_export(second)
    assert cfg_a == cfg_b and state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


# -------------------------------------------------------------------------------------- sidecars
def test_calibration_becomes_sglangs_sts_json(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    calibration = {"method": "sts", "temperatures": [1.5, 1.2, 1.0, 0.9], "ece_before": [0.1, 0.2, 0.2, 0.3],
                   "ece_after": [0.01, 0.02, 0.02, 0.03], "num_rounds": 640, "dataset": "held-out"}
    (folder / "calibration.json").write_text(json.dumps(calibration))
    out = export(folder, target, tmp_path / "out")
    sts = json.loads((out / "sts.json").read_text())
    assert set(sts) == {"temperatures", "dataset", "num_samples", "ece_before", "ece_after"}
    assert len(sts["temperatures"]) == json.loads((out / "config.json").read_text())["block_size"]
    assert all(t > 0 for t in sts["temperatures"]) and sts["temperatures"] == calibration["temperatures"]
    assert (sts["dataset"], sts["num_samples"], sts["ece_after"]) == ("held-out", 640, calibration["ece_after"])
    assert "--speculative-dspark-confidence-sts-path" in (out / "README.md").read_text()
    # Loading the export back applies the same temperatures (sts.json stands in for calibration.json).
    from dspark.drafters.checkpoint import load_drafter

    assert list(load_drafter(out, target).confidence_temperatures) == calibration["temperatures"]


@pytest.mark.parametrize(("temps", "match"), [([1.0, 1.0, 1.0], "4 values"), ([1.0, 0.0, 1.0, 1.0], "> 0"),
                                              ([1.0, -2.0, 1.0, 1.0], "> 0")])
def test_bad_calibration_is_refused_and_nothing_is_written(target, tmp_path, temps, match):
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    (folder / "calibration.json").write_text(json.dumps({"method": "sts", "temperatures": temps}))
    with pytest.raises(DSparkError, match=match):
        export(folder, target, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (folder / "calibration.json").write_text(json.dumps({"method": "platt", "temperatures": [1.0] * 4}))
    with pytest.raises(DSparkError, match="method 'platt'.*supported: sts"):
        export(folder, target, tmp_path / "out")


def test_cost_profile_becomes_sglangs_flat_sps_table(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"tokens": [1, 8, 64], "sps": [90.0, 85.5, 40.0], "device": "H200"}))
    out = export(folder, target, tmp_path / "out", cost_profile=profile)
    sps = json.loads((out / "sps.json").read_text())
    assert sps == {"sample_batch_tokens": [1, 8, 64], "sample_steps_per_sec": [90.0, 85.5, 40.0],
                   "max_batch_tokens": 64}
    assert not (out / "sts.json").exists()  # no calibration in the folder
    profile.write_text(json.dumps({"tokens": [8, 8, 64], "sps": [1.0, 1.0, 1.0], "device": "H200"}))
    with pytest.raises(DSparkError, match="strictly increasing"):
        export(folder, target, tmp_path / "out2", cost_profile=profile)


# -------------------------------------------------------------------------------------- refusals
def test_non_qwen3_target_is_refused_naming_the_family(tiny_dirs, tmp_path):
    llama = load_model(str(tiny_dirs["llama"]), "fp32")
    folder = save_drafter(make("dspark-vanilla", llama).model, tmp_path / "d")
    with pytest.raises(DSparkError, match="'llama'.*supported: qwen3"):
        export_drafter(folder, llama, out=tmp_path / "out")


def test_embedding_layer_tap_is_refused(target, tmp_path):
    model = make("dspark-vanilla", target, seed=1).model
    write_deepspec_folder(model, target, tmp_path / "ds", layer_ids=[-1, 1])
    with pytest.raises(DSparkError, match=r"-1 \(the embedding output\).*\[0, 1\]"):
        export_drafter(tmp_path / "ds", target, out=tmp_path / "out")


def test_vocabulary_mismatch_is_refused(target, tmp_path):
    other = load_model(str(save_tiny_model(tmp_path / "v100", "qwen3", vocab_size=100, tokenizer=False)), "fp32",
                       with_tokenizer=False)
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    with pytest.raises(DSparkError, match="vocabulary mismatch.*96-token.*has 100"):
        export_drafter(folder, other, out=tmp_path / "out")


def test_eagle3_in_the_speculators_format_and_unknown_formats_are_refused(target, tmp_path):
    """(Eagle3 used to be refused outright; it now exports to DeepSpec's Eagle3 layout, below.)"""
    folder = save_drafter(make("eagle3", target).model, tmp_path / "e3")
    with pytest.raises(DSparkError, match="Eagle3.*Qwen3Eagle3Model layout only.*q/k norms"):
        export_drafter(folder, target, "speculators", out=tmp_path / "out")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"tokens": [1, 8], "sps": [90.0, 85.0]}))
    with pytest.raises(DSparkError, match="cost profile"):
        export_drafter(folder, target, out=tmp_path / "out", cost_profile=profile)
    with pytest.raises(DSparkError, match="format 'gguf'.*deepspec, speculators"):
        export_drafter(folder, target, "gguf", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_vanilla_heads_warn_that_vllm_builds_only_the_vanilla_head(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dspark-rnn")
    with pytest.warns(UserWarning, match="'rnn': vLLM builds only the vanilla Markov head"):
        export_drafter(folder, target, out=tmp_path / "out")


def test_export_never_overwrites_a_folder_unless_asked(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DSparkError, match="already exists"):
        export(folder, target, out)
    assert (out / "keep.txt").read_text() == "precious"
    export(folder, target, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src-dspark-vanilla"]  # no temporary folders left
    with pytest.raises(DSparkError, match="drafter folder itself"):
        export(folder, target, folder, overwrite=True)


# ------------------------------------------------------------------------------------ speculators
def update_dspark_as_documented(spec: dict) -> dict:
    """vLLM's speculators mapping for DSpark (transformers_utils/configs/speculators/algos.py,
    update_dflash + update_dspark): start from transformer_layer_config, then set the layer ids,
    the layout flag and copy the method fields through."""
    cfg = dict(spec["transformer_layer_config"])
    aux = spec["aux_hidden_state_layer_ids"]
    cfg["architectures"] = ["Qwen3DSparkModel"]
    cfg["eagle_aux_hidden_state_layer_ids"] = aux
    cfg["target_layer_ids"] = [i - 1 for i in aux]
    cfg["dflash_config"] = {"mask_token_id": spec["mask_token_id"], "target_layer_ids": [i - 1 for i in aux]}
    cfg["dspark_bonus_anchor"] = not spec.get("sample_from_anchor", False)
    for key in ("draft_vocab_size", "target_hidden_size", "mask_token_id", "markov_rank", "markov_head_type",
                "block_size", "enable_confidence_head", "confidence_head_with_markov"):
        cfg[key] = spec[key]
    return cfg


def test_speculators_export_maps_back_to_the_deepspec_exports_fields(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    deepspec_cfg, deepspec_state = read_export(export(folder, target, tmp_path / "ds"))
    out = export(folder, target, tmp_path / "sp", fmt="speculators")
    spec, state = read_export(out)
    assert spec["speculators_model_type"] == "dspark" and spec["sample_from_anchor"] is True
    assert spec["aux_hidden_state_layer_ids"] == [i + 1 for i in deepspec_cfg["target_layer_ids"]]
    proposal = spec["speculators_config"]["proposal_methods"][0]
    assert proposal["speculative_tokens"] == deepspec_cfg["block_size"]  # anchor-first: K tokens per block
    assert spec["speculators_config"]["verifier"]["name_or_path"] == target.spec
    ours, theirs = vllm_resolve(update_dspark_as_documented(spec)), vllm_resolve(deepspec_cfg)
    assert ours == theirs
    assert state.keys() == deepspec_state.keys() and all(torch.equal(state[k], deepspec_state[k]) for k in state)
    with pytest.raises(ValueError, match="speculators_model_type"):
        sglang_parse(spec, target.vocab_size)
    assert "NOT loadable by SGLang" in (out / "README.md").read_text()


def test_speculators_export_refuses_what_vllm_cannot_serve(target, tmp_path):
    for kind, match in (("dflash", "DFlash"), ("dspark-gated", "'gated'.*vLLM supports vanilla")):
        folder, _ = saved_drafter(tmp_path, target, kind)
        with pytest.raises(DSparkError, match=match):
            export(folder, target, tmp_path / f"out-{kind}", fmt="speculators")


# ---------------------------------------------------------------------- the engines' own parsers
def test_sglangs_own_parser_accepts_the_export(target, tmp_path):
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed; its parse rules are re-implemented in sglang_parse above")
    from sglang.srt.speculative.dspark_components.dspark_config import parse_dspark_draft_config

    folder, model = saved_drafter(tmp_path, target, "dspark-vanilla")
    cfg, _ = read_export(export(folder, target, tmp_path / "out"))
    parsed = parse_dspark_draft_config(draft_hf_config=cfg)
    assert parsed.target_layer_ids == list(model.config.target_layer_ids)
    assert (parsed.mask_token_id, parsed.markov_rank, parsed.gamma) == (model.config.mask_token_id, 8, 4)


def test_vllms_own_speculators_parser_accepts_the_export(target, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed; its config rules are re-implemented in vllm_resolve above")
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    folder, model = saved_drafter(tmp_path, target, "dspark-vanilla")
    spec, _ = read_export(export(folder, target, tmp_path / "out", fmt="speculators"))
    cfg = SpeculatorsConfig.extract_transformers_pre_trained_config(spec)
    assert vllm_aux_layer_ids(cfg) == [i + 1 for i in model.config.target_layer_ids]
    assert SpeculatorsConfig.extract_vllm_speculative_config(spec)["num_speculative_tokens"] == 4


def test_export_cli(target, tiny_dirs, tmp_path, capsys):
    from dspark.cli import main

    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["drafter", "export", str(folder), "--target", str(tiny_dirs["qwen3"]), "--out", str(tmp_path / "x")]) == 0
    assert "deepspec export" in capsys.readouterr().out
    assert (tmp_path / "x" / "config.json").is_file() and (tmp_path / "x" / "model.safetensors").is_file()
    assert main(["drafter", "export", str(folder), "--target", str(tiny_dirs["qwen3"]), "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["drafter", "export", str(folder), "--target", str(tiny_dirs["llama"]), "--out", str(tmp_path / "y")]) == 2
    assert "Qwen3" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_a_draft_vocabulary_drafter_is_refused_and_nothing_is_written(target, tmp_path):
    folder, _ = saved_drafter(tmp_path, target, "dspark-vocab")
    with pytest.raises(DSparkError, match="reduced vocabulary.*draft_vocab_size=0"):
        export(folder, target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ what DeepSpec needs to load it
# Read in DeepSpec's source (deepspec-ai/DeepSpec): eval.py picks the evaluator from
# architectures[0] and AutoConfig the config class from model_type; transformers' Qwen3Config fills
# any other missing field with a default (which would build other shapes), so every field the
# modules read must be there: the decoder geometry (modeling/{dspark,eagle3}/qwen3/modeling.py,
# Qwen3MLP, Qwen3RotaryEmbedding through rope_parameters in transformers 5.x).
DEEPSPEC_READS = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "hidden_act",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias",
                  "attention_dropout", "rms_norm_eps", "max_position_embeddings", "rope_parameters"]
# Qwen3DSparkModel.__init__: `required_fields` asserted present (the export used to lack num_anchors:
# "AssertionError: config.num_anchors must be provided."), markov_head_type when markov_rank > 0,
# confidence_head_with_markov when enable_confidence_head; int(config.block_size) and
# config.layer_types[i] are read without a default.
DEEPSPEC_DSPARK_REQUIRES = ["target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head",
                            "markov_rank", "block_size", "layer_types"]
# Qwen3Eagle3Model.__init__ asserts target_layer_ids, ttt_length, step_loss_decay; the Eagle3
# evaluator asserts draft_num_hidden_layers == 1.
DEEPSPEC_EAGLE3_REQUIRES = ["target_layer_ids", "ttt_length", "step_loss_decay", "draft_num_hidden_layers"]


def saved_eagle3(root: Path, target, seed: int = 0, block_size: int = 3):
    model = make("eagle3", target, seed=seed, block_size=block_size).model
    round_to_bf16(model)
    return save_drafter(model, root / "src-eagle3"), model


@pytest.mark.parametrize("kind", ["dspark-vanilla", "dflash", "eagle3"])
def test_export_config_carries_every_field_deepspec_requires(target, tmp_path, kind):
    folder = saved_eagle3(tmp_path, target)[0] if kind == "eagle3" else saved_drafter(tmp_path, target, kind)[0]
    cfg, _ = read_export(export(folder, target, tmp_path / "out"))
    required = DEEPSPEC_READS + (DEEPSPEC_EAGLE3_REQUIRES if kind == "eagle3" else DEEPSPEC_DSPARK_REQUIRES)
    if cfg.get("markov_rank", 0) > 0:
        required.append("markov_head_type")
    if cfg.get("enable_confidence_head"):
        required.append("confidence_head_with_markov")
    assert [name for name in required if cfg.get(name) is None] == []
    if kind == "eagle3":
        assert cfg["architectures"] == ["Qwen3Eagle3Model"] and cfg["ttt_length"] == 3
        assert cfg["num_hidden_layers"] == cfg["draft_num_hidden_layers"] == 1
        assert cfg["step_loss_decay"] == 0.8  # DeepSpec's default: no training state beside the folder
    else:
        assert cfg["num_anchors"] == 512  # DeepSpec's default: no training state beside the folder


def test_export_writes_the_training_settings_deepspec_records(target, tmp_path):
    """num_anchors / step_loss_decay: the trainer's (trainer_state.json beside a checkpoint), or an
    imported DeepSpec folder's own."""
    folder, _ = saved_drafter(tmp_path, target, "dspark-vanilla")
    state = {"step": 1, "train_config": {"num_anchors": 64, "loss": {"ttt_decay": 0.5}}}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    cfg, _ = read_export(export(folder, target, tmp_path / "a"))
    assert cfg["num_anchors"] == 64
    imported = tmp_path / "ds"
    write_deepspec_folder(make("dspark-vanilla", target, seed=2).model, target, imported)
    raw = json.loads((imported / "config.json").read_text())
    (imported / "config.json").write_text(json.dumps({**raw, "num_anchors": 256}))
    assert read_export(export(imported, target, tmp_path / "b"))[0]["num_anchors"] == 256
    e3, _ = saved_eagle3(tmp_path, target)
    (e3 / "trainer_state.json").write_text(json.dumps(state))
    assert read_export(export(e3, target, tmp_path / "c"))[0]["step_loss_decay"] == 0.5


def test_eagle3_export_has_deepspecs_weights_and_imports_back_with_identical_proposals(target, tmp_path):
    """DeepSpec's Qwen3Eagle3Model names and shapes (modeling/eagle3/qwen3/modeling.py): one layer
    whose q/k/v read [embedding ; hidden] (2H), its hidden_norm inside the layer, bf16."""
    folder, model = saved_eagle3(tmp_path, target, seed=5, block_size=4)
    out = export(folder, target, tmp_path / "out")
    cfg, state = read_export(out)
    h, v, inter, d = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_rows, kv_rows = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    layer = {"hidden_norm.weight": (h,), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (q_rows, 2 * h), "self_attn.k_proj.weight": (kv_rows, 2 * h),
             "self_attn.v_proj.weight": (kv_rows, 2 * h), "self_attn.o_proj.weight": (h, q_rows),
             "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,), "mlp.gate_proj.weight": (inter, h),
             "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
    expected = {"embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
                "fc.weight": (h, h * len(cfg["target_layer_ids"])), **{f"layers.0.{k}": s for k, s in layer.items()}}
    assert {k: tuple(t.shape) for k, t in state.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    readme = (out / "README.md").read_text()
    assert "DeepSpec's eval.py" in readme and "target layer 1 is the target's last" in readme  # tiny target: ids (0, 1)
    source, loaded = load_drafter(folder, target), load_drafter(out, target)
    for d in (source, loaded):
        _start(d, target, PROMPTS)
    for pa, pb in zip(source.propose(_requests(target, enumerate(PROMPTS), 4)),
                      loaded.propose(_requests(target, enumerate(PROMPTS), 4))):
        assert torch.equal(pa.tokens, pb.tokens) and torch.equal(pa.draft_probs, pb.draft_probs)
