"""Drafter folders: config.json (everything needed to rebuild the drafter, including the target it
was made for) + model.safetensors (trainable weights only; the embedding and LM head are the
target's and are not stored). Weights are read only from safetensors, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

# build_dspark_model is also imported from here by callers that create drafter folders.
from dspark.drafters.building import build_dspark_model, check_target, load_exact, target_spec_of
from dspark.drafters.deepspec import is_deepspec_config, load_deepspec_model
from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, config_fields_from_json, default_target_layer_ids
from dspark.drafters.eagle3 import Eagle3Drafter, build_eagle3_model, eagle3_config_from_json
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel

FORMAT = "dspark-drafter"
FORMAT_VERSION = 1
ARCHS = ("dspark", "dflash", "eagle3")
CALIBRATION_FILE = "calibration.json"
SETTABLE = ("block_size", "num_draft_layers", "markov_rank", "markov_head_type", "confidence_head",
            "confidence_with_markov", "target_layer_ids", "mask_token_id", "draft_vocab_size")


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings (values parsed as JSON when they can be) -> dict of known settable keys."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise DSparkError(f"--set expects key=value, got {pair!r}")
        if key not in SETTABLE:
            raise DSparkError(f"unknown drafter setting {key!r}; settable: {', '.join(SETTABLE)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def default_mask_token_id(target: LoadedModel) -> int:
    """The tokenizer's mask token where it declares one (Gemma's <mask>, which DeepSpec's Gemma 4
    configs use), else the last vocabulary row: a fixed embedding row, as DeepSpec's unused Qwen3 id."""
    mask = getattr(target.tokenizer, "mask_token_id", None)
    vocab = target.model.args.vocab_size
    return int(mask) if isinstance(mask, int) and 0 <= mask < vocab else vocab - 1


def new_dspark_config(target: LoadedModel, arch: str = "dspark", overrides: dict | None = None) -> DSparkConfig:
    """Config of a fresh DSpark (or DFlash) drafter for this target."""
    if arch not in ("dspark", "dflash"):
        raise DSparkError(f"unknown drafter architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    overrides = dict(overrides or {})
    targs = target.model.args
    base = dict(
        target=target_spec_of(target),
        target_layer_ids=default_target_layer_ids(targs.num_layers),
        mask_token_id=default_mask_token_id(target),
        layer_args=dataclasses.replace(targs, num_layers=1, sliding_windows=(None,)),
        arch=arch,
    )
    if arch == "dflash":
        base.update(markov_rank=0, confidence_head=False)
    base.update(overrides)
    return DSparkConfig(**base)


def _config_to_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _dspark_config_from_json(raw: dict) -> DSparkConfig:
    raw = config_fields_from_json(raw)
    raw["confidence_temperatures"] = tuple(raw.get("confidence_temperatures", ()))
    return DSparkConfig(**raw)


def save_drafter(model: nn.Module, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a drafter folder atomically (temporary folder, then rename): a crash leaves the old one intact."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DSparkError(f"{out} already exists and is not empty; choose another --out (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        config = model.config
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": config.arch, "config": _config_to_json(config)}
        (tmp / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_drafter_config(path: str | Path) -> dict:
    folder = Path(path)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise DSparkError(f"{folder} is not a drafter folder: config.json is missing")
    raw = json.loads(cfg.read_text())
    if raw.get("format") != FORMAT:
        raise DSparkError(f"{cfg} is not a dspark drafter config (format {raw.get('format')!r}, expected {FORMAT!r})")
    if raw.get("arch") not in ARCHS:
        raise DSparkError(f"{cfg}: unknown drafter architecture {raw.get('arch')!r}; known: {', '.join(ARCHS)}")
    return raw


def load_drafter_model(path: str | Path, target: LoadedModel) -> nn.Module:
    """A drafter model from a dspark folder or an imported DeepSpec folder, checked against the target."""
    from safetensors.torch import load_file

    folder = Path(path)
    if (folder / "config.json").is_file() and is_deepspec_config(json.loads((folder / "config.json").read_text())):
        return load_deepspec_model(folder, target)
    raw = read_drafter_config(folder)
    if raw["arch"] == "eagle3":
        config = eagle3_config_from_json(raw["config"])
        check_target(config.target, target, str(folder))
        model = build_eagle3_model(config, target, seed=None)
    else:
        config = _dspark_config_from_json(raw["config"])
        check_target(config.target, target, str(folder))
        model = build_dspark_model(config, target, seed=None)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise DSparkError(f"{folder} has no model.safetensors")
    load_exact(model, load_file(str(weights)), f"{weights} does not fit its config", target.model.dtype)
    return model


def read_calibration(path: str | Path) -> dict | None:
    """The folder's calibration.json (per-position confidence temperatures), else SGLang's sts.json
    (what an export or a DeepSpec-layout folder carries), or None if neither is there."""
    file = Path(path) / CALIBRATION_FILE
    if not file.is_file():
        file = Path(path) / "sts.json"
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    temps = raw.get("temperatures")
    if not isinstance(temps, list) or not temps or any(not isinstance(t, (int, float)) or t <= 0 for t in temps):
        raise DSparkError(f"{file}: 'temperatures' must be a non-empty list of numbers > 0, got {temps!r}")
    return raw


def write_calibration(path: str | Path, calibration: dict) -> Path:
    """Write calibration.json into a drafter folder atomically (the weights are never touched)."""
    file = Path(path) / CALIBRATION_FILE
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(calibration, indent=2))
    os.replace(tmp, file)
    return file


def load_drafter(path: str | Path, target: LoadedModel, calibrated: bool = True):
    """A ready Drafter from a folder, checked against the target.

    calibrated: apply the folder's calibration.json temperatures to the confidences (if present);
    False gives the raw confidences (what calibration itself fits on).
    """
    model = load_drafter_model(path, target)
    if model.config.arch == "eagle3":
        return Eagle3Drafter(model)
    calibration = read_calibration(path) if calibrated else None
    if calibration is not None:
        if len(calibration["temperatures"]) != model.config.block_size:
            raise DSparkError(f"{path}/{CALIBRATION_FILE} has {len(calibration['temperatures'])} temperatures, "
                              f"the drafter's block_size is {model.config.block_size}")
        return DSparkDrafter(model, tuple(calibration["temperatures"]))
    return DSparkDrafter(model, None if calibrated else ())
