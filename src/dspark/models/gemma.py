"""Native decoder for Gemma 4 text models (`gemma4_text`, and the text part of `gemma4` folders).

Same forward contract, KV cache and ragged rows as the Llama-family decoder (models/llama.py), with
every detail of transformers' Gemma 4 that changes numerics:

* word embeddings scaled by sqrt(hidden) (the scale rounded to the weights' dtype, as transformers does);
* four RMSNorms per layer (around attention and around the MLP), computed in fp32 and multiplied by
  the weight itself (Gemma 4 has no `1 + weight`); q and k norms, and a weightless v norm;
* attention scaling 1.0 (the q/k norms set the scale);
* sliding-window and global layers, each with its own head dim, KV-head count and RoPE (global
  layers: proportional RoPE over part of the head dim);
* keys as values (`attention_k_eq_v`) on global layers, which then have no v projection;
* KV-shared last layers (`num_kv_shared_layers`): they attend over the keys of the last earlier
  layer of their type and write none; double-wide MLPs on them where configured;
* per-layer inputs (PLE) where `hidden_size_per_layer_input` is set;
* a per-layer output scalar, GELU (tanh) MLPs, tied embeddings, and logit soft-capping.

Mixture-of-experts blocks and fully bidirectional attention have no native path: such configs run
through transformers (models/hf.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dspark.errors import DSparkError
from dspark.models.kv_cache import KVCache
from dspark.models.llama import ForwardContext, ModelArgs, Transformer, apply_rope, cached_attention, rope_tables

GEMMA_ARCHITECTURES = ("gemma4_text", "gemma4")


def text_config_of(config):
    """The text model's config (a `gemma4` folder wraps it with vision/audio configs)."""
    return config.get_text_config() if config.model_type == "gemma4" else config


def gemma_unsupported(config) -> str | None:
    """Why this Gemma 4 config has no native path (None: it has one)."""
    text = text_config_of(config)
    if getattr(text, "enable_moe_block", False):
        return "mixture-of-experts blocks"
    if getattr(text, "use_bidirectional_attention", None) == "all":
        return "bidirectional attention"
    if getattr(text, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        return f"activation {text.hidden_activation!r}"
    return None


@dataclass(frozen=True)
class GemmaLayerArgs:
    layer_type: str  # "sliding_attention" or "full_attention"
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # values are the keys' projection (no v_proj)
    kv_source: int  # the layer whose cache this one attends over (itself unless KV-shared)
    intermediate_size: int


@dataclass(frozen=True)
class GemmaArgs:
    layers: tuple[GemmaLayerArgs, ...]
    hidden_size: int
    num_heads: int
    rms_norm_eps: float
    final_logit_softcapping: float | None
    per_layer_input_size: int  # 0: no per-layer inputs
    per_layer_vocab_size: int


def gemma_args_from_hf_config(config) -> tuple[ModelArgs, GemmaArgs]:
    """(the ModelArgs drafters and the engine read, Gemma's own per-layer geometry)."""
    reason = gemma_unsupported(config)
    if reason:
        raise DSparkError(f"Gemma 4 with {reason} has no native decoder")
    text = text_config_of(config)
    n = text.num_hidden_layers
    types = list(text.layer_types)
    first_shared = n - (text.num_kv_shared_layers or 0)
    layers = []
    for i, kind in enumerate(types):
        per_layer = text.per_layer_config[i]
        shared = i >= first_shared
        source = max(j for j in range(first_shared) if types[j] == kind) if shared else i
        wide = 2 if text.use_double_wide_mlp and shared else 1
        layers.append(GemmaLayerArgs(kind, per_layer.head_dim, per_layer.num_key_value_heads,
                                     bool(text.attention_k_eq_v) and kind == "full_attention", source,
                                     text.intermediate_size * wide))
    # The geometry drafters read: DeepSpec's Gemma 4 draft layers are global-attention layers (their
    # head dim, and their KV-head count where keys are values); the target's own layers use `layers`.
    k_eq_v = bool(text.attention_k_eq_v)
    model_args = ModelArgs(
        architecture=text.model_type,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=n,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.per_layer_config["full_attention"].num_key_value_heads if k_eq_v else text.num_key_value_heads,
        head_dim=text.per_layer_config["full_attention"].head_dim,
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", text.tie_word_embeddings)),
        qkv_bias=bool(text.attention_bias),
        o_bias=bool(text.attention_bias),
        mlp_bias=False,
        qk_norm=True,
        sliding_windows=tuple(text.sliding_window if kind == "sliding_attention" else None for kind in types),
        layer_style="gemma4",
        k_eq_v=k_eq_v,
    )
    gemma_args = GemmaArgs(
        layers=tuple(layers),
        hidden_size=text.hidden_size,
        num_heads=text.num_attention_heads,
        rms_norm_eps=text.rms_norm_eps,
        final_logit_softcapping=text.final_logit_softcapping,
        per_layer_input_size=text.hidden_size_per_layer_input or 0,
        per_layer_vocab_size=text.vocab_size_per_layer_input,
    )
    return model_args, gemma_args


def gemma_rope(config) -> dict[str, tuple[torch.Tensor, float]]:
    """Inverse frequencies and cos/sin scale per layer type, from transformers' own Gemma 4 RoPE."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    text = text_config_of(config)
    rope = Gemma4TextRotaryEmbedding(text)
    return {kind: (getattr(rope, f"{kind}_inv_freq").double(), float(getattr(rope, f"{kind}_attention_scaling")))
            for kind in rope.rope_type}


class ScaledEmbedding(nn.Embedding):
    """Word embeddings times a scale rounded to the weights' dtype first (transformers'
    Gemma4TextScaledWordEmbedding). Drafters share this module, so they embed as the target does."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float):
        super().__init__(num_embeddings, embedding_dim)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype, device=self.weight.device)


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * weight in fp32 (fp64 for fp64 inputs), cast back (Gemma 4: the weight itself, not
    1 + weight); no weight for the value norm."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight = None if self.weight is None else self.weight.to(compute)
        return F.rms_norm(x.to(compute), (x.shape[-1],), weight, self.eps).to(x.dtype)


class GemmaAttention(nn.Module):
    def __init__(self, g: GemmaArgs, layer_id: int):
        super().__init__()
        spec = g.layers[layer_id]
        self.layer_id, self.kv_source, self.layer_type = layer_id, spec.kv_source, spec.layer_type
        self.num_heads, self.num_kv_heads, self.head_dim = g.num_heads, spec.num_kv_heads, spec.head_dim
        eps = g.rms_norm_eps
        self.q_proj = nn.Linear(g.hidden_size, g.num_heads * spec.head_dim, bias=False)
        self.q_norm = GemmaRMSNorm(spec.head_dim, eps)
        self.shared = spec.kv_source != layer_id
        if not self.shared:
            self.k_proj = nn.Linear(g.hidden_size, spec.num_kv_heads * spec.head_dim, bias=False)
            self.v_proj = None if spec.k_eq_v else nn.Linear(g.hidden_size, spec.num_kv_heads * spec.head_dim, bias=False)
            self.k_norm = GemmaRMSNorm(spec.head_dim, eps)
            self.v_norm = GemmaRMSNorm(spec.head_dim, eps, with_scale=False)
        self.o_proj = nn.Linear(g.num_heads * spec.head_dim, g.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: KVCache) -> torch.Tensor:
        bsz, n = ctx.positions.shape
        cos, sin = ctx.rope_by_type[self.layer_type]
        q = self.q_norm(ctx.unpack(self.q_proj(x)).view(bsz, n, self.num_heads, self.head_dim))
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = v = None
        if not self.shared:
            k = ctx.unpack(self.k_proj(x)).view(bsz, n, self.num_kv_heads, self.head_dim)
            v = k if self.v_proj is None else ctx.unpack(self.v_proj(x)).view(bsz, n, self.num_kv_heads, self.head_dim)
            k = apply_rope(self.k_norm(k).transpose(1, 2), cos, sin)
            v = self.v_norm(v).transpose(1, 2)
        # A KV-shared layer's cache entry is its source layer's buffers (build_cache), which that
        # layer wrote earlier in this forward; it attends over them and writes nothing.
        out = cached_attention(q, k, v, ctx, cache, self.layer_id, scale=1.0)
        return self.o_proj(ctx.pack_rows(out.transpose(1, 2).reshape(bsz, n, self.num_heads * self.head_dim)))


class GemmaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, g: GemmaArgs, layer_id: int):
        super().__init__()
        hidden, eps = g.hidden_size, g.rms_norm_eps
        self.self_attn = GemmaAttention(g, layer_id)
        self.mlp = GemmaMLP(hidden, g.layers[layer_id].intermediate_size)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        if g.per_layer_input_size:
            self.per_layer_input_gate = nn.Linear(hidden, g.per_layer_input_size, bias=False)
            self.per_layer_projection = nn.Linear(g.per_layer_input_size, hidden, bias=False)
            self.post_per_layer_input_norm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: KVCache,
                per_layer_input: torch.Tensor | None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx, cache))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if per_layer_input is not None:
            gated = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return x * self.layer_scalar


class GemmaTransformer(Transformer):
    """The Gemma 4 text decoder behind the Llama decoder's forward contract. Parameter names follow
    transformers' `Gemma4ForCausalLM`, so its safetensors load without renaming.

    `inv_freq`/`rope_scale` are the RoPE that drafters built for this target use (the target's own
    layers use `rope_by_type`); `args` is the geometry drafters and the engine read."""

    def __init__(self, args: ModelArgs, gemma: GemmaArgs, rope: dict[str, tuple[torch.Tensor, float]],
                 inv_freq: torch.Tensor, rope_scale: float = 1.0):
        nn.Module.__init__(self)
        self.args, self.gemma = args, gemma
        self.model = nn.Module()
        self.model.embed_tokens = ScaledEmbedding(args.vocab_size, args.hidden_size, args.hidden_size**0.5)
        self.model.layers = nn.ModuleList(GemmaDecoderLayer(gemma, i) for i in range(args.num_layers))
        self.model.norm = GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
        if gemma.per_layer_input_size:
            width = args.num_layers * gemma.per_layer_input_size
            self.model.embed_tokens_per_layer = ScaledEmbedding(gemma.per_layer_vocab_size, width,
                                                                gemma.per_layer_input_size**0.5)
            self.model.per_layer_model_projection = nn.Linear(args.hidden_size, width, bias=False)
            self.model.per_layer_projection_norm = GemmaRMSNorm(gemma.per_layer_input_size, args.rms_norm_eps)
        self.add_head_and_rope(inv_freq, rope_scale)
        self.rope_params = {kind: (freq.double(), scale) for kind, (freq, scale) in rope.items()}
        self.logit_softcap = gemma.final_logit_softcapping

    def fuse_projections(self) -> None:
        """Nothing is fused: q, k and v each have their own norm here."""

    def rope(self, positions: torch.Tensor) -> tuple[None, None]:
        return None, None  # per layer type: set by build_context

    def build_context(self, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache,
                      num_new: torch.Tensor | None = None) -> ForwardContext:
        ctx = super().build_context(positions, slots, cache, num_new)
        ctx.rope_by_type = {kind: rope_tables(positions, freq.to(positions.device), scale, self.dtype)
                            for kind, (freq, scale) in self.rope_params.items()}
        return ctx

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """[..., num_layers, per_layer_input_size]: token-identity and context parts of the PLE."""
        size = self.gemma.per_layer_input_size
        if not size:
            return None
        m = self.model
        tokens = m.embed_tokens_per_layer(input_ids)
        context = m.per_layer_model_projection(x) * self.args.hidden_size**-0.5
        context = m.per_layer_projection_norm(context.view(*x.shape[:-1], self.args.num_layers, size))
        return (context + tokens.view_as(context)) * 2.0**-0.5

    def run_layers(self, input_ids: torch.Tensor, ctx: ForwardContext, cache: KVCache, wanted: set[int],
                   captured: dict[int, torch.Tensor]) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        per_layer = self.per_layer_inputs(input_ids, x)
        if -1 in wanted:
            captured[-1] = x
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, cache, None if per_layer is None else per_layer[..., i, :])
            if i in wanted:
                captured[i] = x
        return x

    def logits_from(self, final_hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(final_hidden).float(), self.logit_softcap)

    def build_cache(self, num_slots: int, max_seq_len: int, headroom: int = 16) -> KVCache:
        """Per-layer buffers of that layer's KV heads and head dim; KV-shared layers hold their
        source layer's buffers (the same tensors)."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for i, spec in enumerate(self.gemma.layers):
            if spec.kv_source != i:
                keys.append(keys[spec.kv_source])
                values.append(values[spec.kv_source])
                continue
            shape = (num_slots, spec.num_kv_heads, max_seq_len + headroom, spec.head_dim)
            keys.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            values.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        return KVCache(keys, values, max_seq_len)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma's final-logit soft-capping); unchanged without a cap."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def gemma_state_dict(state: dict[str, torch.Tensor], gemma: GemmaArgs) -> dict[str, torch.Tensor]:
    """The text model's tensors under `Gemma4ForCausalLM` names: a `gemma4` (multimodal) folder's
    vision and audio towers are dropped, and so are KV projections that checkpoints may hold for
    KV-shared layers (transformers ignores them too)."""
    prefix = "model.language_model."
    if any(k.startswith(prefix) for k in state):
        state = {("model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()
                 if k.startswith(prefix) or k == "lm_head.weight"}
    unused = {f"model.layers.{i}.self_attn.{name}.weight" for i, spec in enumerate(gemma.layers) if spec.kv_source != i
              for name in ("k_proj", "v_proj", "k_norm", "v_norm")}
    return {k: v for k, v in state.items() if k not in unused}
