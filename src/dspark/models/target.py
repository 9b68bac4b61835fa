"""A loaded causal LM: native decoder (or a transformers model behind the same interface) + its
config, tokenizer and stop ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.config import resolve_dtype, torch_dtype
from dspark.models.kv_cache import KVCache
from dspark.models.llama import Transformer
from dspark.models.loading import load_hf_config, load_native_model, no_native_decoder, resolve_model_dir, weights_fingerprint

log = logging.getLogger(__name__)

TRANSFORMERS_PREFIX = "transformers:"  # --target transformers:SPEC runs SPEC through transformers


@dataclass
class LoadedModel:
    """What the engine and drafters need of a model; the tokenizer is used only at the edges."""

    spec: str
    model_dir: Path
    model: Transformer
    hf_config: object
    tokenizer: object | None
    eos_token_ids: tuple[int, ...]
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def logit_softcap(self) -> float | None:
        """Final-logit soft-capping (Gemma): logits = cap * tanh(head(h) / cap); None: plain logits."""
        return self.model.logit_softcap

    @property
    def max_position_embeddings(self) -> int:
        return self.model.args.max_position_embeddings

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @property
    def implementation(self) -> str:
        """"native" (dspark's own decoder) or "transformers" (any causal LM, slower)."""
        return "native" if isinstance(self.model, Transformer) else "transformers"

    def build_cache(self, num_slots: int, max_seq_len: int, headroom: int = 16) -> KVCache:
        return self.model.build_cache(num_slots, max_seq_len, headroom)


def eos_ids_of(model_dir: Path, hf_config) -> tuple[int, ...]:
    """Stop ids: generation_config.json's eos_token_id(s), else the config's."""
    ids: list[int] = []
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_dir)
        eos = gen.eos_token_id
    except (OSError, ValueError):
        eos = None
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    for value in eos if isinstance(eos, (list, tuple)) else [eos]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return tuple(ids)


def load_model(spec: str, dtype: str = "bf16", with_tokenizer: bool = True) -> LoadedModel:
    """Resolve a spec (builtin name, .gguf file, HF folder) and load it on the CPU.

    Architectures with a native decoder (Llama family, Gemma 4) get it; any other causal LM runs through
    transformers (slower), with a one-line notice. `transformers:SPEC` asks for transformers
    explicitly (e.g. to compare both, or to sidestep a native-decoder problem)."""
    resolved = resolve_dtype(dtype)
    if dtype == "auto" and resolved == "fp32":
        log.warning("%s: --dtype auto runs it in fp32: this CPU has no bf16 matmul units, where bf16 products run "
                    "several times slower (--dtype bf16 halves the memory instead)", spec)
    forced = spec.startswith(TRANSFORMERS_PREFIX)
    model_dir = resolve_model_dir(spec.removeprefix(TRANSFORMERS_PREFIX) if forced else spec)
    reason = no_native_decoder(load_hf_config(model_dir))
    if forced or reason:
        from dspark.models.hf import load_hf_causal_lm

        if not forced:
            log.warning("%s: %s; running it through transformers, slower", spec, reason)
        model = load_hf_causal_lm(model_dir, torch_dtype(resolved))
        hf_config = model.hf.config
    else:
        model, hf_config = load_native_model(model_dir, torch_dtype(resolved))
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LoadedModel(spec, model_dir, model, hf_config, tokenizer, eos_ids_of(model_dir, hf_config))


@torch.inference_mode()
def reference_greedy(model: Transformer, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Plain greedy decoding by full forwards over the whole sequence (no cache reuse): the slow
    reference every speculative path must reproduce token for token."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(num_tokens):
        cache = model.build_cache(1, len(ids), headroom=0)
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([0]), cache, last_only=True).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
    return out
