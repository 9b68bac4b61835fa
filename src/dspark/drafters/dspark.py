"""DSpark drafter (paper §3.1, eq. 2-7): a parallel DFlash-style backbone, a sequential head and a
confidence head. DFlash is this same class with both heads off (markov_rank 0, no confidence head).

Backbone. The target's hidden states at `target_layer_ids` are concatenated, projected by `fc` and
RMS-normed once (eq. 2); every draft layer attends over [context keys/values ; block keys/values],
the context projected by that layer's own k/v projections (eq. 3, "KV injection"). A block is the
anchor (the pending bonus token) followed by K-1 mask tokens; the anchor is the first prediction
position, so K inputs give K draft logits (slot k predicts the token at anchor + k + 1). Attention
is bidirectional inside a block and sees context strictly before the anchor (the anchor's own
target features do not exist yet at inference). Embedding and LM head are the target's, shared and
frozen, never copied.

Inference keeps, per slot, a cache of the context keys/values of every draft layer; it grows with
the features of committed tokens and rolls back like the target's (by length).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from dspark.drafters.base import DraftRequest, Proposal, empty_proposal
from dspark.drafters.heads import HEAD_TYPES, ConfidenceHead, build_sequential_head
from dspark.errors import DSparkError
from dspark.models.kv_cache import KVCache, build_kv_cache, write_rows
from dspark.models.gemma import GemmaArgs, GemmaDecoderLayer, GemmaLayerArgs, GemmaRMSNorm, softcap
from dspark.models.llama import (DecoderLayer, ModelArgs, RMSNorm, apply_rope, attention_precision, attention_width,
                                 grouped_attention, rope_tables)
from dspark.sampling import logits_to_probs, sample_rows


@dataclass(frozen=True)
class TargetSpec:
    """The target a drafter was made for; loading against another target is refused."""

    architecture: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    fingerprint: str | None = None
    # The target's final-logit soft-capping (Gemma), which drafters sharing its LM head apply too
    # (DeepSpec's Gemma 4 compute_logits); None: plain logits.
    logit_softcap: float | None = None


def check_confidence_temperatures(temps: tuple[float, ...], block_size: int) -> None:
    """Per-position confidence temperatures: none, or block_size values > 0."""
    if temps and (len(temps) != block_size or any(t <= 0 for t in temps)):
        raise DSparkError(f"confidence temperatures must be {block_size} values > 0, got {list(temps)}")


def check_target_layer_ids(ids: tuple[int, ...], num_layers: int) -> None:
    """Strictly increasing decoder-layer indices in [0, num_layers - 1], optionally led by -1, the
    embedding output (DeepSpec's validate_target_layer_ids allows it; the target returns it)."""
    ids = list(ids)
    if not ids or ids != sorted(set(ids)) or ids[0] < -1 or ids[-1] >= num_layers:
        raise DSparkError(
            f"target_layer_ids {ids} must be strictly increasing decoder-layer indices in "
            f"[0, {num_layers - 1}], or -1 (the embedding output)"
        )


@dataclass(frozen=True)
class DSparkConfig:
    target: TargetSpec
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    layer_args: ModelArgs  # geometry of the draft layers (the target family's decoder layer)
    block_size: int = 7  # K: anchor + K-1 masks -> K draft tokens
    num_draft_layers: int = 1
    markov_rank: int = 256  # R; 0 = no sequential head (DFlash)
    markov_head_type: str = "vanilla"
    confidence_head: bool = True
    confidence_with_markov: bool = True
    # Per-position confidence temperatures (sequential temperature scaling); filled by calibration.
    confidence_temperatures: tuple[float, ...] = field(default=())
    arch: str = "dspark"
    # Reduced drafting vocabulary (as Eagle3's draft vocabulary and FR-Spec): the drafter's output
    # is restricted to these many token ids (the most frequent of the training answers, stored as
    # the `draft_vocab` tensor); 0 = the full vocabulary. Verification stays exact: a token outside
    # the subset simply has draft probability 0.
    draft_vocab_size: int = 0

    def __post_init__(self) -> None:
        check_target_layer_ids(self.target_layer_ids, self.target.num_layers)
        if self.block_size < 1:
            raise DSparkError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_draft_layers < 1:
            raise DSparkError(f"num_draft_layers must be >= 1, got {self.num_draft_layers}")
        if self.markov_rank < 0:
            raise DSparkError(f"markov_rank must be >= 0 (0 = off), got {self.markov_rank}")
        if self.markov_head_type not in HEAD_TYPES:
            raise DSparkError(f"markov_head_type {self.markov_head_type!r} is not one of {', '.join(HEAD_TYPES)}")
        if not 0 <= self.mask_token_id < self.target.vocab_size:
            raise DSparkError(f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.target.vocab_size})")
        check_confidence_temperatures(self.confidence_temperatures, self.block_size)
        if not 0 <= self.draft_vocab_size <= self.target.vocab_size:
            raise DSparkError(f"draft_vocab_size {self.draft_vocab_size} must be in [0, {self.target.vocab_size}] "
                              "(0 = the full vocabulary)")

    @property
    def output_size(self) -> int:
        """Size of the drafter's output distribution (draft vocabulary or the full one)."""
        return self.draft_vocab_size or self.target.vocab_size


def default_target_layer_ids(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """Evenly spread layers from 1 to num_layers - 3, as DeepSpec's [1, 9, 17, 25, 33] of 36."""
    if num_layers <= count:
        return tuple(range(num_layers))
    last = num_layers - 3
    return tuple(sorted({round(1 + i * (last - 1) / (count - 1)) for i in range(count)}))


def config_fields_from_json(raw: dict) -> dict:
    """Rebuild the nested fields every drafter config shares from their JSON form."""
    raw = dict(raw)
    raw["target"] = TargetSpec(**raw["target"])
    args = dict(raw["layer_args"])
    args["sliding_windows"] = tuple(args["sliding_windows"])
    raw["layer_args"] = ModelArgs(**args)
    raw["target_layer_ids"] = tuple(raw["target_layer_ids"])
    return raw


@dataclass(frozen=True)
class BlockLocalMask:
    """The teacher-forced blocks' mask in factored form: query q sees the context positions where
    ctx_visible [B, Q, S] is True and the keys of its own block of `block_size` (queries and block
    keys are laid out block after block); blocks never see each other."""

    ctx_visible: torch.Tensor
    block_size: int


def block_local_attention(q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, mask: BlockLocalMask, scale: float | None = None) -> torch.Tensor:
    """q [B, H, Q, D]; context keys/values [B, Hkv, S, D]; block keys/values [B, Hkv, Q, D] -> [B, H, Q, D].

    The same as grouped_attention over [context ; block] keys with the dense [B, 1, Q, S + Q] mask,
    without its Q x Q block-to-block scores (all masked but each block's own K x K): those grow with
    the square of anchors x block size (block 12 with 64 anchors: 768 x 768 per head and layer)."""
    bsz, heads, q_len, dim = q.shape
    kv_heads, seq = ctx_k.shape[1], ctx_k.shape[2]
    group, block = heads // kv_heads, mask.block_size
    blocks = q_len // block
    scale = dim**-0.5 if scale is None else scale
    compute, acc = attention_precision(q)  # grouped_attention's: products, then softmax and sums
    qg = q.reshape(bsz, kv_heads, group * q_len, dim).to(compute)
    ctx_scores = torch.matmul(qg, ctx_k.to(compute).transpose(-1, -2)).to(acc).view(bsz, kv_heads, group, q_len, seq)
    ctx_scores = (ctx_scores * scale).masked_fill(~mask.ctx_visible[:, None, None], float("-inf"))
    qb = q.reshape(bsz, kv_heads, group, blocks, block, dim).to(compute)
    kb = k.reshape(bsz, kv_heads, 1, blocks, block, dim).to(compute)
    own_scores = torch.matmul(qb, kb.transpose(-1, -2)).to(acc).view(bsz, kv_heads, group, q_len, block) * scale
    probs = torch.softmax(torch.cat([ctx_scores, own_scores], dim=-1), dim=-1)
    out = torch.matmul(probs[..., :seq].reshape(bsz, kv_heads, group * q_len, seq).to(compute), ctx_v.to(compute))
    own = probs[..., seq:].reshape(bsz, kv_heads, group, blocks, block, block).to(compute)
    out_own = torch.matmul(own, v.reshape(bsz, kv_heads, 1, blocks, block, dim).to(compute))
    out = out.to(acc).view(bsz, kv_heads, group, q_len, dim) + out_own.to(acc).view(bsz, kv_heads, group, q_len, dim)
    return out.to(q.dtype).reshape(bsz, heads, q_len, dim)


def draft_attention(q, ctx_k, ctx_v, k, v, mask: "torch.Tensor | BlockLocalMask", scale: float | None = None):
    """A draft layer's attention over [context ; block] keys: mask dense [B, 1, Q, S + Q] or factored."""
    if isinstance(mask, BlockLocalMask):
        return block_local_attention(q, ctx_k, ctx_v, k, v, mask, scale)
    return grouped_attention(q, torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2), mask, scale)


class DraftLayer(DecoderLayer):
    """The target family's decoder layer (same modules and names: norms, GQA, RoPE, Qwen3 q/k norm),
    run with KV injection instead of a causal cache."""

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx [B, T, H] (already fc + hidden_norm) -> keys/values [B, Hkv, T, D] at the context positions."""
        attn = self.self_attn
        bsz, t, _ = ctx.shape
        k = attn.k_proj(ctx).view(bsz, t, attn.num_kv_heads, attn.head_dim)
        if attn.k_norm is not None:
            k = attn.k_norm(k)
        v = attn.v_proj(ctx).view(bsz, t, attn.num_kv_heads, attn.head_dim)
        return apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def forward(self, h, cos, sin, ctx_k, ctx_v, mask):
        """h [B, Q, H] block stream; cos/sin [B, 1, Q, D]; ctx_k/v [B, Hkv, T, D]; mask [B, 1, Q, T + Q]
        or a BlockLocalMask."""
        attn = self.self_attn
        bsz, q_len, _ = h.shape
        h_in = self.input_layernorm(h)
        q = attn.q_proj(h_in).view(bsz, q_len, attn.num_heads, attn.head_dim)
        k = attn.k_proj(h_in).view(bsz, q_len, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(h_in).view(bsz, q_len, attn.num_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        out = draft_attention(q, ctx_k, ctx_v, k, v.transpose(1, 2), mask)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(bsz, q_len, attn.num_heads * attn.head_dim))
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaDraftLayer(GemmaDecoderLayer):
    """DeepSpec's Gemma 4 draft layer (Gemma4DSparkDecoderLayer), run with KV injection: Gemma 4's
    sandwich norms and layer scalar, q/k norms, a weightless v norm, attention scaling 1, keys as
    values where the target's global layers have them; the context keys are k-normed and rotated
    like the block's."""

    def __init__(self, args: ModelArgs, layer_id: int):
        spec = GemmaLayerArgs("full_attention", args.head_dim, args.num_kv_heads, args.k_eq_v, 0, args.intermediate_size)
        super().__init__(GemmaArgs((spec,), args.hidden_size, args.num_heads, args.rms_norm_eps, None, 0, 0), 0)

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> rotated, normed keys and normed values [B, Hkv, T, D]."""
        attn = self.self_attn
        bsz, t, _ = x.shape
        k = attn.k_proj(x).view(bsz, t, attn.num_kv_heads, attn.head_dim)
        v = k if attn.v_proj is None else attn.v_proj(x).view(bsz, t, attn.num_kv_heads, attn.head_dim)
        return apply_rope(attn.k_norm(k).transpose(1, 2), cos, sin), attn.v_norm(v).transpose(1, 2)

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._kv(ctx, cos, sin)

    def forward(self, h, cos, sin, ctx_k, ctx_v, mask):
        attn = self.self_attn
        bsz, q_len, _ = h.shape
        h_in = self.input_layernorm(h)
        q = attn.q_norm(attn.q_proj(h_in).view(bsz, q_len, attn.num_heads, attn.head_dim))
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k, v = self._kv(h_in, cos, sin)
        out = draft_attention(q, ctx_k, ctx_v, k, v, mask, scale=1.0)
        h = h + self.post_attention_layernorm(attn.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1)))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


DRAFT_LAYERS = {"llama": DraftLayer, "gemma4": GemmaDraftLayer}


def draft_norm(args: ModelArgs) -> nn.Module:
    """The RMSNorm of the target family's draft layers (Gemma 4's computes in fp32)."""
    if args.layer_style == "gemma4":
        return GemmaRMSNorm(args.hidden_size, args.rms_norm_eps)
    return RMSNorm(args.hidden_size, args.rms_norm_eps)


class TargetSharingModel(nn.Module):
    """A drafter's trainable weights plus references to the target's embedding, LM head and RoPE.

    The shared modules sit in a tuple, so they are neither registered, saved nor trained.
    """

    def __init__(self, embed: nn.Embedding, lm_head: nn.Linear, inv_freq: torch.Tensor, rope_scale: float):
        super().__init__()
        self._shared = (embed, lm_head)
        # Kept out of the module's buffers so .to(bf16) / .float() never round the frequencies.
        self._inv_freq = (inv_freq.double(),)
        self.rope_scale = rope_scale

    @property
    def embed(self) -> nn.Embedding:
        return self._shared[0]

    @property
    def lm_head(self) -> nn.Linear:
        return self._shared[1]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(positions, self._inv_freq[0].to(positions.device), self.rope_scale, dtype)


class DSparkModel(TargetSharingModel):
    """DSpark/DFlash weights with DeepSpec's parameter names."""

    def __init__(self, config: DSparkConfig, embed: nn.Embedding, lm_head: nn.Linear, inv_freq: torch.Tensor,
                 rope_scale: float = 1.0):
        super().__init__(embed, lm_head, inv_freq, rope_scale)
        self.config = config
        args = config.layer_args
        hidden = args.hidden_size
        if args.layer_style not in DRAFT_LAYERS:
            raise DSparkError(f"draft layer style {args.layer_style!r} is not one of {', '.join(DRAFT_LAYERS)}")
        self.layers = nn.ModuleList(DRAFT_LAYERS[args.layer_style](args, i) for i in range(config.num_draft_layers))
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = draft_norm(args)
        self.norm = draft_norm(args)
        self.markov_head = build_sequential_head(config.markov_head_type, args.vocab_size, hidden, config.markov_rank,
                                                 out_size=config.output_size)
        if config.draft_vocab_size:  # output index -> token id; filled from the training answers
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_vocab = None
        self._head_rows: tuple | None = None  # (key, LM-head rows of the draft vocabulary)
        conf_rank = config.markov_rank if (config.confidence_with_markov and config.markov_rank) else 0
        self.confidence_head = ConfidenceHead(hidden, conf_rank) if config.confidence_head else None

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T, L*H] (target layers' outputs, concatenated) -> [B, T, H] (eq. 2)."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def block_inputs(self, anchors: torch.Tensor) -> torch.Tensor:
        """anchors [...] -> block token ids [..., K]: the anchor then K-1 mask tokens."""
        blocks = torch.full((*anchors.shape, self.config.block_size), self.config.mask_token_id, dtype=torch.long)
        blocks[..., 0] = anchors
        return blocks

    def forward_blocks(
        self, features: torch.Tensor, anchor_tokens: torch.Tensor, anchor_positions: torch.Tensor,
        keep: torch.Tensor | None = None, dense_mask: bool = False,
    ) -> torch.Tensor:
        """Teacher-forced blocks over a whole sequence (training and tests).

        features [B, S, L*H]; anchor_tokens/anchor_positions [B, N]; keep [B, N] (False: a dummy
        block, which sees only itself). Returns normed block hidden states [B, N, K, H].
        Mask: block n sees context positions < anchor_n and its own block; blocks never see each other.
        It is applied in factored form (BlockLocalMask); dense_mask builds the whole [Q, S + Q] mask
        instead, the reference that form is tested and benchmarked against.
        """
        bsz, seq = features.shape[:2]
        n_blocks, k_len = anchor_tokens.shape[1], self.config.block_size
        keep = torch.ones_like(anchor_tokens, dtype=torch.bool) if keep is None else keep
        ctx = self.project_context(features)
        dtype = ctx.dtype
        ctx_cos, ctx_sin = self.rope(torch.arange(seq).expand(bsz, seq), dtype)
        positions = (anchor_positions[..., None] + torch.arange(k_len)).reshape(bsz, n_blocks * k_len)
        cos, sin = self.rope(positions, dtype)
        ctx_visible = torch.arange(seq)[None, None, :] < anchor_positions.repeat_interleave(k_len, dim=1)[..., None]
        mask = BlockLocalMask(ctx_visible & keep.repeat_interleave(k_len, dim=1)[..., None], k_len)  # [B, Q, S]
        if dense_mask:
            owner = torch.arange(n_blocks).repeat_interleave(k_len)
            own_block = (owner[:, None] == owner[None, :]).expand(bsz, -1, -1)
            mask = torch.cat([mask.ctx_visible, own_block], dim=-1)[:, None]  # [B, 1, Q, S + Q]
        h = self.embed(self.block_inputs(anchor_tokens).reshape(bsz, -1)).to(dtype)
        for layer in self.layers:
            ctx_k, ctx_v = layer.context_kv(ctx, ctx_cos, ctx_sin)
            h = layer(h, cos, sin, ctx_k, ctx_v, mask)
        return self.norm(h).view(bsz, n_blocks, k_len, -1)

    def head_weight(self) -> torch.Tensor:
        """The LM-head rows the drafter predicts over: [output_size, H] (the shared head itself, or
        its draft-vocabulary rows, gathered once and reused while neither changes)."""
        weight = self.lm_head.weight
        if self.draft_vocab is None:
            return weight
        key = (weight.data_ptr(), weight.dtype, weight.device, self.draft_vocab.data_ptr(), self.draft_vocab._version)
        if self._head_rows is None or self._head_rows[0] != key:
            self._head_rows = (key, weight.detach().index_select(0, self.draft_vocab.to(weight.device)))
        return self._head_rows[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., output_size] fp32 logits over the drafter's output vocabulary."""
        weight = self.head_weight()
        return softcap((hidden.to(weight.dtype) @ weight.T).float(), self.config.target.logit_softcap)

    def to_token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Output indices -> token ids (the identity over the full vocabulary)."""
        return index if self.draft_vocab is None else self.draft_vocab[index]

    def head_logits(self, base_logits: torch.Tensor, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced sequential head: corrected logits [..., K, V] (base logits if there is no head)."""
        if self.markov_head is None:
            return base_logits
        return self.markov_head.apply_block(base_logits, prev_tokens, hidden)

    def confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        """[..., K] raw confidence logits from [h_k ; W1[x_{k-1}]] (None without a confidence head)."""
        if self.confidence_head is None:
            return None
        use_markov = self.markov_head is not None and self.config.confidence_with_markov
        prev = self.markov_head.markov_w1(prev_tokens) if use_markov else None
        return self.confidence_head.logits(hidden, prev)


class DSparkDrafter:
    """The Drafter protocol over a DSparkModel (DSpark or, with heads off, DFlash)."""

    def __init__(self, model: DSparkModel, confidence_temperatures: tuple[float, ...] | None = None):
        self.model = model
        self.config = model.config
        # Per-position temperatures of the confidence logits (calibration); () = raw confidences.
        temps = model.config.confidence_temperatures if confidence_temperatures is None else tuple(confidence_temperatures)
        check_confidence_temperatures(temps, self.config.block_size)
        self.confidence_temperatures = temps
        self.name = model.config.arch
        self.feature_layers = tuple(model.config.target_layer_ids)
        self.cache: KVCache | None = None
        self._pending: dict[int, list[torch.Tensor]] = {}  # slot -> features not yet in the context cache

    def setup(self, num_slots: int, max_seq_len: int, block_size: int) -> None:
        args = self.config.layer_args
        dtype = self.model.fc.weight.dtype
        # Headroom: a row's padded context update may run past its length by up to a block.
        self.cache = build_kv_cache(self.config.num_draft_layers, num_slots, max_seq_len, args.num_kv_heads,
                                    args.head_dim, dtype, headroom=max(block_size, self.config.block_size) + 2)

    def begin(self, slot: int, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        self.cache.lengths[slot] = 0
        self._pending[slot] = [features]

    def commit(self, slot: int, num_accepted: int, features: torch.Tensor | None) -> None:
        # The context cache holds only committed tokens (never the block), so nothing rolls back here:
        # the features of the pending token and the accepted drafts extend it.
        self._pending.setdefault(slot, []).append(features)

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
        self._pending.pop(slot, None)

    def _absorb(self, slots: list[int]) -> None:
        """Project pending context features of these slots into every layer's context cache."""
        rows = [(s, torch.cat(self._pending[s])) for s in slots if self._pending.get(s)]
        if not rows:
            return
        width = max(f.shape[0] for _, f in rows)
        feats = torch.zeros(len(rows), width, rows[0][1].shape[-1], dtype=rows[0][1].dtype)
        for i, (_, f) in enumerate(rows):
            feats[i, : f.shape[0]] = f
        starts = torch.tensor([self.cache.lengths[s] for s, _ in rows])
        positions = starts[:, None] + torch.arange(width)
        ctx = self.model.project_context(feats)
        cos, sin = self.model.rope(positions, ctx.dtype)
        slot_t = torch.tensor([s for s, _ in rows])
        num_new = torch.tensor([f.shape[0] for _, f in rows])
        for layer_id, layer in enumerate(self.model.layers):
            k, v = layer.context_kv(ctx, cos, sin)
            dtype = self.cache.keys[layer_id].dtype
            write_rows(self.cache.keys[layer_id], slot_t, positions, k.transpose(1, 2).to(dtype), num_new)
            write_rows(self.cache.values[layer_id], slot_t, positions, v.transpose(1, 2).to(dtype), num_new)
        for s, f in rows:
            self.cache.lengths[s] += f.shape[0]
            self._pending[s] = []

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        live = sorted((r for r in requests if r.max_tokens > 0), key=lambda r: r.slot)
        if not live:
            return [empty_proposal() for _ in requests]
        slots = [r.slot for r in live]
        self._absorb(slots)
        model, k_len = self.model, self.config.block_size
        ctx_lens = torch.tensor([self.cache.lengths[s] for s in slots])
        for r, n in zip(live, ctx_lens.tolist()):
            assert n == len(r.token_ids) - 1, "context must cover every committed token but the pending one"
        dtype = model.fc.weight.dtype
        width = attention_width(int(ctx_lens.max()), self.cache.capacity, dtype, model.fc.weight.device)
        anchors = torch.tensor([r.token_ids[-1] for r in live])
        positions = ctx_lens[:, None] + torch.arange(k_len)
        cos, sin = model.rope(positions, dtype)
        ctx_visible = torch.arange(width)[None, :] < ctx_lens[:, None]  # [B, T]
        mask = torch.cat([ctx_visible[:, None, :].expand(-1, k_len, -1),
                          torch.ones(len(live), k_len, k_len, dtype=torch.bool)], dim=-1)[:, None]
        h = model.embed(model.block_inputs(anchors)).to(dtype)
        slot_t = torch.tensor(slots)
        for layer_id, layer in enumerate(model.layers):
            ctx_k = self.cache.keys[layer_id][slot_t, :, :width]
            ctx_v = self.cache.values[layer_id][slot_t, :, :width]
            h = layer(h, cos, sin, ctx_k, ctx_v, mask)
        hidden = model.norm(h)  # [B, K, H]
        base = model.logits(hidden)  # [B, K, V'] (V' = the draft vocabulary's size)
        tokens, probs, prev = self._sample(base, hidden, anchors, live)
        if probs is not None and model.draft_vocab is not None:  # verification reads full-vocabulary q
            full = torch.zeros(*probs.shape[:2], self.config.target.vocab_size, dtype=probs.dtype)
            probs = full.index_copy_(2, model.draft_vocab, probs)
        conf = self._confidences(hidden, prev)
        by_slot = {}
        for row, r in enumerate(live):
            n = min(r.max_tokens, k_len)
            row_probs = None if probs is None else probs[row, :n]
            by_slot[r.slot] = Proposal(tokens[row, :n], row_probs, None if conf is None else conf[row, :n])
        return [by_slot.get(r.slot, empty_proposal()) for r in requests]

    def _sample(self, base, hidden, anchors, live):
        """Left-to-right sampling through the sequential head (or independent slots without one).

        Returns tokens [B, K] (token ids), the warped probabilities they were drawn from [B, K, V']
        over the drafter's output vocabulary (what
        verification must use, or the result is not lossless; None when every row is greedy, since
        greedy verification compares argmaxes only), and the previous tokens [B, K].
        """
        params = [r.params for r in live]
        gens = [r.generator for r in live]
        all_greedy = all(p.greedy for p in params)
        head = self.model.markov_head
        to_ids = self.model.to_token_ids
        k_len = base.shape[1]
        tokens = torch.empty(len(live), k_len, dtype=torch.long)
        probs = None if all_greedy else torch.empty_like(base)
        prev = anchors.clone()
        prevs = []
        state = head.init_state(len(live), hidden) if head is not None else None
        for k in range(k_len):
            logits = base[:, k]
            if head is not None:
                bias, state = head.step(prev, hidden[:, k], state)
                logits = logits + bias.float()
            if all_greedy:
                tokens[:, k] = to_ids(logits.argmax(-1))
            else:
                probs[:, k] = torch.stack([logits_to_probs(logits[i], p) for i, p in enumerate(params)])
                tokens[:, k] = to_ids(sample_rows(probs[:, k], params, gens))
            prevs.append(prev)
            prev = tokens[:, k]
        return tokens, probs, torch.stack(prevs, dim=1)

    def _confidences(self, hidden, prev_tokens) -> torch.Tensor | None:
        logits = self.model.confidence_logits(hidden, prev_tokens)
        if logits is None:
            return None
        temps = self.confidence_temperatures
        if temps:
            logits = logits / torch.tensor(temps[: logits.shape[-1]], dtype=logits.dtype)
        return torch.sigmoid(logits)


def dflash_config(config: DSparkConfig) -> DSparkConfig:
    """DFlash = DSpark with both heads off (one code path: comparisons are fair by construction)."""
    return replace(config, markov_rank=0, confidence_head=False, arch="dflash")
