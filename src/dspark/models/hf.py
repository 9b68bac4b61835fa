"""Any causal LM through transformers: a target for architectures without a native decoder.

`HFCausalLM` wraps a transformers `AutoModelForCausalLM` behind the native decoder's forward
contract (`Transformer.forward`: ragged rows of new tokens at their positions, each row in its own
cache slot; logits, hidden states of chosen layers), so the engine, the drafters, verification and
the scheduler run unchanged on it. It is slower than a native decoder:

* each slot keeps its own transformers `DynamicCache` (full-attention layers; sliding windows are
  applied by the model's masks), and rolling back rejected drafts crops it to the row's start;
* rows of a batch run one after another (ragged rows need no padding or masks that way).

Hidden states of chosen layers are the outputs of the model's decoder layers, captured by hooks
(transformers' `hidden_states` report the last one after the final norm in many models; the native
decoder returns it before), and -1 is the embedding output (transformers' `hidden_states[0]`, after
any embedding scaling). The final hidden state handed to training is the input of the model's output embedding, captured by
a hook, so it is exactly what the logits are computed from.
"""

from __future__ import annotations

import functools
import inspect
import logging
from types import SimpleNamespace

import torch
from torch import nn

from dspark.errors import DSparkError
from dspark.models.gemma import GEMMA_ARCHITECTURES, gemma_args_from_hf_config, gemma_rope, gemma_unsupported, softcap
from dspark.models.llama import ModelArgs, ModelOutput

log = logging.getLogger(__name__)

DEFAULT_ROPE_THETA = 10_000.0  # drafters' own RoPE when the target's config names none


class SlotCaches:
    """Per-slot transformers caches with the native KV cache's slot bookkeeping (allocate, free,
    set_length). A slot's committed length may be below what its cache holds (rejected drafts): the
    next forward crops the cache to where its row starts."""

    def __init__(self, num_slots: int, max_seq_len: int, headroom: int):
        self.max_seq_len = max_seq_len
        self.lengths = [0] * num_slots
        self.in_use = [False] * num_slots
        self.caches: list[object | None] = [None] * num_slots
        self._capacity = max_seq_len + headroom

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self._capacity

    def allocate(self) -> int:
        for slot, used in enumerate(self.in_use):
            if not used:
                self.in_use[slot] = True
                self.lengths[slot] = 0
                self.caches[slot] = None
                return slot
        raise DSparkError(f"all {self.num_slots} cache slots are in use; raise max_batch_size")

    def free(self, slot: int) -> None:
        self.in_use[slot] = False
        self.lengths[slot] = 0
        self.caches[slot] = None

    def set_length(self, slot: int, length: int) -> None:
        assert 0 <= length <= self.capacity, (slot, length)
        self.lengths[slot] = length

    def cache_for(self, slot: int, start: int):
        """The slot's cache holding exactly positions < start (a new one for start 0)."""
        from transformers import DynamicCache

        cache = self.caches[slot]
        if start == 0 or cache is None:
            if start != 0:
                raise DSparkError(f"slot {slot} has no cached context, but its row starts at position {start}")
            cache = self.caches[slot] = DynamicCache()
            return cache
        held = cache.get_seq_length()
        if start > held:
            raise DSparkError(f"slot {slot} holds {held} positions, but its row starts at position {start}")
        if start < held:
            if not cache.is_croppable:
                raise DSparkError("this model's cache cannot be rolled back (e.g. recurrent layers): "
                                  "speculative decoding needs rollback")
            cache.crop(start - held)  # negative: drop that many trailing positions (every version)
        return cache


def _setting(config, name: str, default=None):
    """A config value, or `default` where the config has none or it varies across layers
    (transformers refuses to read per-layer attributes globally, e.g. Gemma 4's head_dim)."""
    try:
        value = getattr(config, name, None)
    except Exception:  # noqa: BLE001 - e.g. AmbiguousGlobalPerLayerAttributeError
        return default
    return default if value is None else value


def model_args_of(config) -> ModelArgs:
    """The geometry a drafter for this model needs (its draft layers are Llama-style layers of the
    target's width), read leniently from any transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = _setting(text, "num_attention_heads") or max(1, hidden // 64)
    layers = text.num_hidden_layers
    max_pos = (_setting(text, "max_position_embeddings") or _setting(text, "n_positions")
               or _setting(text, "max_sequence_length") or 2048)
    eps = _setting(text, "rms_norm_eps") or _setting(text, "layer_norm_eps") or 1e-6
    return ModelArgs(
        architecture=config.model_type,
        vocab_size=text.vocab_size,
        hidden_size=hidden,
        intermediate_size=_setting(text, "intermediate_size") or 4 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_setting(text, "num_key_value_heads") or heads,
        head_dim=_setting(text, "head_dim") or hidden // heads,
        rms_norm_eps=float(eps),
        max_position_embeddings=int(max_pos),
        tie_word_embeddings=bool(_setting(config, "tie_word_embeddings", False)),
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        qk_norm=False,
        sliding_windows=(None,) * layers,
    )


def drafter_rope(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for a drafter's RoPE over this target's positions: the target's theta
    where its config has one, else 10000 (the drafter's layers are its own; only positions are shared)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = _setting(text, "rope_parameters") or {}
    if isinstance(rope, dict) and "full_attention" in rope:  # per-layer-type parameters
        rope = rope["full_attention"]
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or _setting(text, "rope_theta")
    theta = float(theta or DEFAULT_ROPE_THETA)
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)), 1.0


class HFCausalLM(nn.Module):
    """A transformers causal LM with the native decoder's interface (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, args: ModelArgs, inv_freq: torch.Tensor, rope_scale: float = 1.0):
        super().__init__()
        self.hf = hf_model
        self.args = args
        embed, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise DSparkError(f"{args.architecture}: the model has no output embedding (LM head) to share")
        # Same attribute paths as the native decoder (drafters share embedding and head); a plain
        # namespace, so nothing is registered twice.
        object.__setattr__(self, "model", SimpleNamespace(embed_tokens=embed))
        object.__setattr__(self, "lm_head", head)
        self.register_buffer("inv_freq", inv_freq.double(), persistent=False)
        self.rope_scale = rope_scale
        # transformers renamed `past_key_values` to `cache`; pass whichever this model's forward takes.
        params = inspect.signature(hf_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        text = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
        self.logit_softcap = _setting(text, "final_logit_softcapping")
        self._head_input: list[torch.Tensor] = []
        head.register_forward_pre_hook(lambda _m, inputs: self._head_input.append(inputs[0]))
        self._layer_out: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(decoder_layers(hf_model, args.num_layers)):
            layer.register_forward_hook(functools.partial(self._capture, i))

    def _capture(self, index: int, _module, _inputs, output) -> None:
        self._layer_out[index] = output[0] if isinstance(output, tuple) else output

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def logits_from(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states (the LM head's input), soft-capped where the model caps
        (in the model's dtype, as transformers does)."""
        return softcap(self.lm_head(final_hidden), self.logit_softcap).float()

    def build_cache(self, num_slots: int, max_seq_len: int, headroom: int) -> SlotCaches:
        return SlotCaches(num_slots, max_seq_len, headroom)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: SlotCaches,
        num_new: torch.Tensor | None = None,
        last_only: bool = False,
        hidden_layers: tuple[int, ...] = (),
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Same contract as `Transformer.forward`; rows are run one at a time."""
        bsz, n = input_ids.shape
        counts = [n] * bsz if num_new is None else [int(c) for c in num_new]
        bad = [i for i in hidden_layers if not -1 <= i < self.args.num_layers]
        if bad:
            raise DSparkError(f"hidden layer ids {bad} are outside [-1, {self.args.num_layers - 1}]")
        logits, hidden, final = [], [], []
        for row in range(bsz):
            count = counts[row]
            ids, pos = input_ids[row : row + 1, :count], positions[row : row + 1, :count]
            past = cache.cache_for(int(slots[row]), int(pos[0, 0]))
            self._head_input.clear()
            self._layer_out.clear()
            # logits_to_keep=1 lets some models (Gemma 4's KV-shared layers) skip the other positions in
            # later layers too, so it is asked for only when no layer's states are wanted.
            keep = 1 if last_only and not hidden_layers else 0
            out = self.hf(input_ids=ids, position_ids=pos, use_cache=True, **{self._cache_arg: past},
                          output_hidden_states=-1 in hidden_layers, logits_to_keep=keep)
            logits.append(out.logits[0, -1:].float() if last_only else out.logits[0].float())
            if hidden_layers:
                layer_out = {**self._layer_out, -1: out.hidden_states[0] if -1 in hidden_layers else None}
                hidden.append(torch.cat([layer_out[i][0] for i in hidden_layers], dim=-1))
            if not compute_logits:
                final.append(self._head_input[-1][0])
        self._head_input.clear()
        self._layer_out.clear()
        width = 1 if last_only else n
        hidden_out = _pad_rows(hidden, n) if hidden_layers else None
        if not compute_logits:
            return ModelOutput(logits=None, hidden_states=hidden_out, final_hidden=_pad_rows(final, width))
        return ModelOutput(logits=_pad_rows(logits, width), hidden_states=hidden_out)


def decoder_layers(hf_model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's stack of decoder layers: the module list of exactly num_layers blocks (every
    transformers causal LM keeps one, whatever it calls it: `model.layers`, `gpt_neox.layers`, `h`)."""
    stacks = [m for m in hf_model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not stacks:
        raise DSparkError(f"cannot find the {num_layers} decoder layers of {type(hf_model).__name__}")
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def _pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-row [n_b, ...] tensors -> [B, width, ...] with zeros past each row's own tokens."""
    out = rows[0].new_zeros(len(rows), width, *rows[0].shape[1:])
    for b, t in enumerate(rows):
        out[b, : t.shape[0]] = t
    return out


def load_hf_causal_lm(model_dir, dtype: torch.dtype) -> HFCausalLM:
    """Load a folder with transformers' AutoModelForCausalLM (frozen, eval mode) behind HFCausalLM."""
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise DSparkError(f"transformers cannot load {model_dir} as a causal LM: {exc}") from exc
    hf_model.eval().requires_grad_(False)
    config = hf_model.config
    if config.model_type in GEMMA_ARCHITECTURES and not gemma_unsupported(config):
        # Drafters for Gemma 4 get DeepSpec's Gemma draft layers whichever path runs the target.
        args = gemma_args_from_hf_config(config)[0]
        inv_freq, scale = gemma_rope(config)["full_attention"]
    else:
        args = model_args_of(config)
        inv_freq, scale = drafter_rope(config, args.head_dim)
    return HFCausalLM(hf_model, args, inv_freq, scale)
