"""Native decoder for the Llama family: Llama/SmolLM, Qwen2, Qwen3 (q/k norm), Mistral.

One forward serves prefill, plain decoding and ragged verification: every row brings N new tokens
(right-padded; `num_new[b]` of them are real) at its own positions, writes their K/V into its cache
slot at those positions, and attends to its slot's positions <= its own. The same forward returns
the hidden states of chosen layers, which drafters use as context features.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dspark.config import bf16_is_native
from dspark.errors import DSparkError
from dspark.models.kv_cache import KVCache, build_kv_cache, real_token_index

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelArgs:
    """Everything the native decoder needs, read from a Hugging Face config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    # Drafter layers for this target follow this family's decoder layer: "llama" (the Llama family
    # and targets through transformers) or "gemma4" (DeepSpec's Gemma 4 draft layer: sandwich norms,
    # q/k/v norms, attention scaling 1, the global layers' head dim and KV heads, keys as values
    # where `k_eq_v`, GELU MLP). head_dim / num_kv_heads above are the draft layers' own.
    layer_style: str = "llama"
    k_eq_v: bool = False


def model_args_from_hf_config(config) -> ModelArgs:
    """Map a transformers config (Llama/Mistral/Qwen2/Qwen3) to ModelArgs, refusing what we do not run."""
    arch = config.model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        raise DSparkError(
            f"architecture {arch!r} has no native decoder; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise DSparkError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise DSparkError(f"activation {act!r} is not supported; supported: silu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if arch == "mistral":  # Mistral's config has no layer_types: the window applies to every layer
        layer_types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    windows = tuple(window if kind == "sliding_attention" and window else None for kind in layer_types)
    return ModelArgs(
        architecture=arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else attention_bias,
        o_bias=False if arch in ("qwen2", "mistral") else attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=arch == "qwen3",
        sliding_windows=windows,
    )


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the cos/sin scale of the config's RoPE (transformers' own formulas)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = rope["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)), 1.0
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.double(), float(scale)


def rope_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, N] -> cos, sin [B, 1, N, D] (computed in float64, then cast)."""
    freqs = positions[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype).unsqueeze(1), (emb.sin() * scale).to(dtype).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (it accumulates in fp32). Hugging Face rounds to the input dtype before
        # the weight multiply; fused, the product is rounded once: identical in fp32, within one
        # rounding step in bf16.
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)  # bf16 autocast
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D]; cos/sin [B, 1, N, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Decode and verification forwards bring few queries; for them a plain grouped-query attention in
# fp32 is ~3x faster on a CPU than the SDPA kernel, whose fixed cost dominates at this size.
SMALL_QUERY = 16


def attention_precision(q: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(products, softmax) dtypes of attention with queries q. bf16 queries where the hardware has
    bf16 matmul units: both products in bf16 (fp32 accumulation in the kernel), the softmax in fp32
    (converting the whole K/V cache to fp32 at every step cost more than the attention itself).
    Other half-precision queries: fp32 throughout; fp32/fp64: their own dtype."""
    if q.dtype == torch.bfloat16 and native_bf16_matmul(q.device):
        return torch.bfloat16, torch.float32
    compute = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    return compute, compute


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """q [B, H, N, D]; k/v [B, Hkv, T, D]; mask [B, 1, N, T] bool or None -> [B, H, N, D].

    Queries of the heads that share a KV head are stacked, so K/V are never repeated. Scores are
    scaled by `scale` (default D ** -0.5).
    """
    bsz, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    compute, acc = attention_precision(q)
    scores = torch.matmul(q.reshape(bsz, kv_heads, group * n, dim).to(compute), k.to(compute).transpose(-1, -2)).to(acc)
    scores = scores.view(bsz, kv_heads, group, n, -1) * (dim**-0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(bsz, kv_heads, group * n, -1).to(compute)
    return torch.matmul(probs, v.to(compute)).to(q.dtype).view(bsz, heads, n, dim)


KEY_BUCKET = 64  # key-count granularity of small-query bf16 attention on CPUs (see attention_width)


def key_bucket(dtype: torch.dtype, device: torch.device) -> int:
    """The multiple that attention_width rounds key counts up to: KEY_BUCKET for bf16 on CPUs with
    native bf16 units, else 1 (no rounding)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and native_bf16_matmul(device):
        return KEY_BUCKET
    return 1


def attention_width(num_keys: int, capacity: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many cached keys a small-query attention reads when `num_keys` are live.

    On CPUs with native bf16 units, oneDNN builds a kernel for every new shape of a bf16 product
    (1-3 ms each, against ~50 us for the product itself), and a decode step that attends over
    exactly its live keys meets a new shape at every token. There the count is rounded up to a
    multiple of the bucket (within the buffer's `capacity`): the keys past the live ones are masked
    (probability exactly 0; the buffers hold zeros or finite stale values), and the few shapes that
    remain are built once and then reused. Elsewhere the count is returned unchanged.
    """
    bucket = key_bucket(dtype, device)
    return max(num_keys, min(-(-num_keys // bucket) * bucket, capacity))


@functools.cache
def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matrix products run on native units here (CUDA, or CPUs with AVX512-BF16 or
    AMX); on other CPUs they are emulated and slower than fp32."""
    return bf16_is_native(device.type)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_weight: torch.Tensor | None = None  # set by fuse_projections (inference only)
        self.qkv_bias: torch.Tensor | None = None

    def fuse_projections(self) -> None:
        """One matmul for q, k and v: the three weights become views of one fused tensor (no extra
        memory). For frozen models only: gradients would not reach the views."""
        linears = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = _fuse(linears, "weight")
        if self.q_proj.bias is not None:
            self.qkv_bias = _fuse(linears, "bias")

    def forward(self, x: torch.Tensor, ctx: "ForwardContext", cache: KVCache) -> torch.Tensor:
        # x is [B, N, hidden], or [T, hidden] with only the real tokens when ctx.pack is set: the
        # projections then skip the padding, and only attention sees the padded [B, N] grid.
        bsz, n = ctx.positions.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if self.qkv_weight is not None:
            qkv = ctx.unpack(F.linear(x, self.qkv_weight, self.qkv_bias)).view(bsz, n, heads + 2 * kv_heads, self.head_dim)
            q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
        else:
            q = ctx.unpack(self.q_proj(x)).view(bsz, n, heads, self.head_dim)
            k = ctx.unpack(self.k_proj(x)).view(bsz, n, kv_heads, self.head_dim)
            v = ctx.unpack(self.v_proj(x)).view(bsz, n, kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qkv_weight is not None and self.q_norm is None:  # rotate q and k in one pass
            qk = apply_rope(qkv[:, :, : heads + kv_heads].transpose(1, 2), ctx.cos, ctx.sin)
            q, k = qk.split([heads, kv_heads], dim=1)
        else:
            q = apply_rope(q.transpose(1, 2), ctx.cos, ctx.sin)
            k = apply_rope(k.transpose(1, 2), ctx.cos, ctx.sin)
        out = cached_attention(q, k, v.transpose(1, 2), ctx, cache, self.layer_id)
        return self.o_proj(ctx.pack_rows(out.transpose(1, 2).reshape(bsz, n, heads * self.head_dim)))


def cached_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, ctx: "ForwardContext",
                     cache: KVCache, layer_id: int, scale: float | None = None) -> torch.Tensor:
    """Write the new tokens' k/v [B, Hkv, N, D] into layer `layer_id`'s cache at their positions, then
    attend q [B, H, N, D] over the cached keys under that layer's mask -> [B, H, N, D]. k/v None:
    the layer reads keys another layer wrote (KV sharing) and writes nothing."""
    n = q.shape[2]
    keys, values = cache.keys[layer_id], cache.values[layer_id]
    if k is not None:  # None: KV sharing, the producing layer already wrote this forward's keys
        write_kv(keys, values, k, v, ctx)
    if ctx.slot_range is not None:  # contiguous slots: a view, no copy
        k_all = keys[ctx.slot_range[0] : ctx.slot_range[1], :, : ctx.num_keys]
        v_all = values[ctx.slot_range[0] : ctx.slot_range[1], :, : ctx.num_keys]
    else:
        k_all = keys[ctx.slots, :, : ctx.num_keys]
        v_all = values[ctx.slots, :, : ctx.num_keys]
    mask = ctx.masks[layer_id]
    if n <= SMALL_QUERY:
        return grouped_attention(q, k_all, v_all, mask, scale)
    causal = ctx.causal is not None and ctx.causal[layer_id]
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=k_all.shape[1] != q.shape[1])


def write_kv(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "ForwardContext") -> None:
    """keys/values [S, Hkv, T, D] <- k/v [B, Hkv, N, D] at each row's slot and positions."""
    if ctx.write_range is not None:  # one row: a slice copy
        slot, start, stop = ctx.write_range
        keys[slot, :, start:stop] = k[0]
        values[slot, :, start:stop] = v[0]
    elif ctx.pack is None:  # write by position: [slot_b, :, pos_bi, :] <- k[b, :, i, :]
        keys[ctx.slot_index, :, ctx.positions] = k.transpose(1, 2)
        values[ctx.slot_index, :, ctx.positions] = v.transpose(1, 2)
    else:  # real tokens only: a short row's padding could run past the buffer
        keys[ctx.write_slots, :, ctx.write_positions] = ctx.pack_rows(k.transpose(1, 2))
        values[ctx.write_slots, :, ctx.write_positions] = ctx.pack_rows(v.transpose(1, 2))


def _fuse(linears: tuple[nn.Linear, ...], attr: str) -> torch.Tensor:
    """Concatenate the linears' `attr` ("weight" or "bias") and make each one a view of the result."""
    fused = torch.cat([getattr(lin, attr).detach() for lin in linears], dim=0)
    offset = 0
    for lin in linears:
        rows = getattr(lin, attr).shape[0]
        setattr(lin, attr, nn.Parameter(fused[offset : offset + rows], requires_grad=False))
        offset += rows
    return fused


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse_projections (inference only)
        self.gate_up_bias: torch.Tensor | None = None

    def fuse_projections(self) -> None:
        linears = (self.gate_proj, self.up_proj)
        self.gate_up_weight = _fuse(linears, "weight")
        if self.gate_proj.bias is not None:
            self.gate_up_bias = _fuse(linears, "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.self_attn = Attention(args, layer_id)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: "ForwardContext", cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class ForwardContext:
    """Per-forward tensors shared by every layer: positions, slots, RoPE tables, masks."""

    positions: torch.Tensor  # [B, N]
    slots: torch.Tensor  # [B]
    slot_index: torch.Tensor  # [B, 1], for writing by position
    slot_range: tuple[int, int] | None
    write_range: tuple[int, int, int] | None  # (slot, start, stop) when there is a single row
    num_keys: int
    cos: torch.Tensor  # [B, 1, N, D]
    sin: torch.Tensor  # [B, 1, N, D]
    masks: list[torch.Tensor | None]  # per layer: [B, 1, N, num_keys] bool, or None (see causal)
    # per layer: the mask is causal over exactly N keys (one row prefilling from position 0): SDPA's
    # is_causal path, about twice as fast as the same mask spelled out. masks[i] is then None.
    causal: list[bool] | None = None
    # Flat indices into the [B * N] grid of the real tokens when rows are ragged (num_new), else None,
    # with the slot and position of each of those tokens (where its K/V go).
    pack: torch.Tensor | None = None
    write_slots: torch.Tensor | None = None
    write_positions: torch.Tensor | None = None
    # RoPE cos/sin per layer type, for decoders whose layer types differ in RoPE (Gemma 4).
    rope_by_type: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def pack_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] -> [T, ...] real tokens only (unchanged when nothing is packed)."""
        return t if self.pack is None else t.reshape(-1, *t.shape[2:]).index_select(0, self.pack)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """[T, ...] real tokens -> [B, N, ...] with zeros in the padding (unchanged when nothing is packed)."""
        if self.pack is None:
            return t
        bsz, n = self.positions.shape
        full = t.new_zeros(bsz * n, *t.shape[1:])
        return full.index_copy_(0, self.pack, t).view(bsz, n, *t.shape[1:])


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, N, V] or [B, 1, V] (last real token of each row), fp32
    hidden_states: torch.Tensor | None  # [B, N, L*hidden]: chosen layers' outputs, concatenated
    final_hidden: torch.Tensor | None = None  # [B, N, hidden] after the final norm (compute_logits=False)


class Transformer(nn.Module):
    """The decoder. Parameter names follow Hugging Face's, so safetensors load without renaming."""

    logit_softcap: float | None = None  # cap * tanh(logits / cap) after the LM head (Gemma); None: none

    def __init__(self, args: ModelArgs, inv_freq: torch.Tensor, rope_scale: float = 1.0):
        super().__init__()
        self.args = args
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.add_head_and_rope(inv_freq, rope_scale)

    def add_head_and_rope(self, inv_freq: torch.Tensor, rope_scale: float) -> None:
        """The LM head (tied to the embedding where the config says so) and the RoPE buffer, once
        `model.embed_tokens` exists (every native decoder's last construction step)."""
        args = self.args
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", inv_freq.double(), persistent=False)
        self.rope_scale = rope_scale

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up matmuls of every layer (frozen inference models)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def build_context(
        self, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache, num_new: torch.Tensor | None = None
    ) -> ForwardContext:
        """positions [B, N] (row b's N new tokens), slots [B]; num_new [B] real tokens per row."""
        pack = real_token_index(None if num_new is None else num_new.to(positions.device), positions.shape[1])
        # Keys up to the last real position (padding may point past the buffer; it is never written).
        num_keys = int((positions if pack is None else positions.reshape(-1)[pack]).max()) + 1
        if positions.shape[1] <= SMALL_QUERY:  # decode and verify steps: a reusable key count
            num_keys = attention_width(num_keys, cache.capacity, self.dtype, self.device)
        cos, sin = self.rope(positions)
        slot_list = slots.tolist()
        contiguous = slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list)))
        key_pos = torch.arange(num_keys, device=positions.device)
        query_pos = positions[:, None, :, None]  # [B, 1, N, 1]
        masks_by_window: dict[int | None, torch.Tensor | None] = {}
        n_new = positions.shape[1]
        # One row prefilling an empty slot: positions 0..N-1 over exactly N keys, a plain causal mask.
        fresh_prefix = (positions.shape[0] == 1 and pack is None and n_new > SMALL_QUERY and num_keys == n_new
                        and bool((positions[0] == key_pos).all()))
        causal_by_window = {w: fresh_prefix and (w is None or w >= n_new) for w in set(self.args.sliding_windows)}
        for window in set(self.args.sliding_windows):
            if causal_by_window[window]:
                masks_by_window[window] = None
                continue
            visible = key_pos <= query_pos
            if window is not None:
                visible = visible & (key_pos > query_pos - window)
            # One query over a full prefix sees every key: skip the mask (faster SDPA path).
            trivial = positions.shape[1] == 1 and bool(visible.all())
            masks_by_window[window] = None if trivial else visible
        return ForwardContext(
            positions=positions,
            slots=slots,
            slot_index=slots[:, None],
            slot_range=(slot_list[0], slot_list[0] + len(slot_list)) if contiguous else None,
            write_range=(slot_list[0], int(positions[0, 0]), int(positions[0, -1]) + 1)
            if len(slot_list) == 1 and pack is None else None,
            num_keys=num_keys,
            cos=cos,
            sin=sin,
            masks=[masks_by_window[w] for w in self.args.sliding_windows],
            causal=[causal_by_window[w] for w in self.args.sliding_windows],
            pack=pack,
            write_slots=None if pack is None else slots[:, None].expand_as(positions).reshape(-1)[pack],
            write_positions=None if pack is None else positions.reshape(-1)[pack],
        )

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, N, D] of the decoder's RoPE at these positions."""
        return rope_tables(positions, self.inv_freq, self.rope_scale, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
        num_new: torch.Tensor | None = None,
        last_only: bool = False,
        hidden_layers: tuple[int, ...] = (),
        compute_logits: bool = True,
    ) -> ModelOutput:
        """input_ids/positions [B, N]; slots [B]; num_new [B] real tokens per row (default all N).

        Writes K/V of every row's tokens into its slot at their positions (the caller sets the
        committed length afterwards). `hidden_layers` are decoder-layer indices whose outputs are
        returned (Hugging Face's hidden_states[i + 1]); -1 is the embedding output (hidden_states[0]),
        which DeepSpec allows as a feature layer. With `last_only`, logits are computed at each
        row's last real token only. Without `compute_logits`, the final normed hidden states are
        returned instead of logits (training recomputes target logits in chunks from them).
        """
        ctx = self.build_context(positions, slots, cache, num_new)
        # Ragged rows (num_new): every per-token layer runs on the real tokens only (packed).
        captured: dict[int, torch.Tensor] = {}
        x = self.run_layers(ctx.pack_rows(input_ids), ctx, cache, set(hidden_layers), captured)
        x = self.model.norm(x)
        if last_only:
            if ctx.pack is not None:
                x = x[torch.cumsum(num_new.to(x.device), 0) - 1][:, None]
            else:
                bsz, n = input_ids.shape
                last = (num_new - 1) if num_new is not None else torch.full((bsz,), n - 1)
                x = x[torch.arange(bsz), last][:, None]
        elif not compute_logits:
            x = ctx.unpack(x)
        hidden = ctx.unpack(torch.cat([captured[i] for i in hidden_layers], dim=-1)) if hidden_layers else None
        if not compute_logits:
            return ModelOutput(logits=None, hidden_states=hidden, final_hidden=x)
        logits = self.logits_from(x)
        return ModelOutput(logits=logits if last_only else ctx.unpack(logits), hidden_states=hidden)

    def run_layers(self, input_ids: torch.Tensor, ctx: ForwardContext, cache: KVCache, wanted: set[int],
                   captured: dict[int, torch.Tensor]) -> torch.Tensor:
        """Embedding and decoder layers over the (packed) tokens; outputs of the `wanted` layers go
        into `captured` (-1: the embedding output). Returns the last layer's output, before the norm."""
        x = self.model.embed_tokens(input_ids)
        if -1 in wanted:
            captured[-1] = x
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx, cache)
            if i in wanted:
                captured[i] = x
        return x

    def logits_from(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final normed hidden states (what training recomputes from them)."""
        return self.lm_head(final_hidden).float()

    def build_cache(self, num_slots: int, max_seq_len: int, headroom: int = 16) -> KVCache:
        args = self.args
        return build_kv_cache(args.num_layers, num_slots, max_seq_len, args.num_kv_heads, args.head_dim,
                              self.dtype, self.device, headroom=headroom)
