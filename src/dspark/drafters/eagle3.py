"""Eagle3 baseline, configured as DeepSpec does for comparison: one decoder layer fed the fused target
features (fc over the concatenated `target_layer_ids` outputs, no norm after fc) and the token that
follows them; attention input is [input_layernorm(embed(x_{t+1})) ; hidden_norm(h_t)] (2H wide),
the residual stream is h; full vocabulary through the target's frozen LM head (no draft vocabulary).

Inference chains K steps: the element at position t pairs the target features of token t with
token t+1 and predicts token t+2; each further step feeds the layer's own output hidden state with
the token just drafted, at the next position. The draft cache keeps the committed pairs; chained
entries are dead space after rollback (length = committed pairs).

Training-time test (`forward_ttt`): step k's query at index t sees step-0 keys at indices <= t and
the keys of steps 1..k at index t itself (the same view inference has of its own chain).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dspark.drafters.base import DraftRequest, Proposal, empty_proposal
from dspark.drafters.building import build_sharing_model, target_spec_of
from dspark.drafters.dspark import (
    TargetSharingModel, TargetSpec, check_target_layer_ids, config_fields_from_json, default_target_layer_ids, draft_norm,
)
from dspark.errors import DSparkError
from dspark.models.kv_cache import KVCache, build_kv_cache, write_rows
from dspark.models.gemma import GemmaMLP, GemmaRMSNorm, softcap
from dspark.models.llama import (
    MLP, ModelArgs, RMSNorm, apply_rope, attention_precision, attention_width, grouped_attention,
)
from dspark.sampling import logits_to_probs, sample_rows


@dataclass(frozen=True)
class Eagle3Config:
    target: TargetSpec
    target_layer_ids: tuple[int, ...]
    layer_args: ModelArgs
    block_size: int = 7  # chained draft steps (DeepSpec's ttt_length)
    arch: str = "eagle3"

    def __post_init__(self) -> None:
        check_target_layer_ids(self.target_layer_ids, self.target.num_layers)
        if self.block_size < 1:
            raise DSparkError(f"block_size must be >= 1, got {self.block_size}")


def eagle3_config_from_json(raw: dict) -> Eagle3Config:
    return Eagle3Config(**config_fields_from_json(raw))


class Eagle3Attention(nn.Module):
    scale: float | None = None  # attention scaling (None: head_dim ** -0.5)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        wide = 2 * args.hidden_size
        self.q_proj = nn.Linear(wide, args.num_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(wide, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(wide, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        bsz, n, _ = x.shape
        q = self.q_proj(x).view(bsz, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


class Eagle3Layer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Eagle3Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hidden_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def attn_input(self, token_emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(token_emb), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """attn_out [B, H, N, D] -> new hidden [B, N, H] (residual on the hidden stream, then the MLP)."""
        bsz, _, n, _ = attn_out.shape
        h = hidden + self.self_attn.o_proj(attn_out.transpose(1, 2).reshape(bsz, n, -1))
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaEagle3Attention(Eagle3Attention):
    """DeepSpec's Gemma 4 Eagle3 attention: q/k norms and a weightless v norm, keys as values where
    the target's global layers have them, attention scaling 1, over [embedding ; hidden] (2H)."""

    scale = 1.0

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        if args.k_eq_v:
            self.v_proj = None
        self.q_norm = GemmaRMSNorm(args.head_dim, args.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(args.head_dim, args.rms_norm_eps)
        self.v_norm = GemmaRMSNorm(args.head_dim, args.rms_norm_eps, with_scale=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        bsz, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(bsz, n, self.num_heads, self.head_dim))
        k = self.k_proj(x).view(bsz, n, self.num_kv_heads, self.head_dim)
        v = k if self.v_proj is None else self.v_proj(x).view(bsz, n, self.num_kv_heads, self.head_dim)
        k, v = self.k_norm(k), self.v_norm(v)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


class GemmaEagle3Layer(nn.Module):
    """DeepSpec's Gemma4Eagle3DecoderLayer: Gemma 4's sandwich norms, GELU MLP and layer scalar."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = GemmaEagle3Attention(args)
        self.mlp = GemmaMLP(hidden, args.intermediate_size)
        self.hidden_norm = GemmaRMSNorm(hidden, eps)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def attn_input(self, token_emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(token_emb), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        bsz, _, n, _ = attn_out.shape
        h = hidden + self.post_attention_layernorm(self.self_attn.o_proj(attn_out.transpose(1, 2).reshape(bsz, n, -1)))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class Eagle3Model(TargetSharingModel):
    def __init__(self, config: Eagle3Config, embed: nn.Embedding, lm_head: nn.Linear, inv_freq: torch.Tensor,
                 rope_scale: float = 1.0):
        super().__init__(embed, lm_head, inv_freq, rope_scale)
        self.config = config
        hidden = config.layer_args.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        gemma = config.layer_args.layer_style == "gemma4"
        self.layers = nn.ModuleList([(GemmaEagle3Layer if gemma else Eagle3Layer)(config.layer_args)])
        self.norm = draft_norm(config.layer_args)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw layer output [..., H] -> logits [..., V] (final norm, then the shared LM head)."""
        return self.lm_logits(self.norm(hidden))

    def lm_logits(self, normed: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(normed.to(self.lm_head.weight.dtype)).float(), self.config.target.logit_softcap)

    def forward_ttt(self, features: torch.Tensor, input_ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over whole sequences: features [B, S, L*H], input_ids [B, S].

        Step k's element t pairs (hidden, token t+1+k) at position t+k and predicts token t+2+k.
        Returns the final-normed hidden states [B, S, H] per step (their logits are lm_logits(.);
        positions past the sequence use token 0: mask them in the loss).
        """
        layer = self.layers[0]
        bsz, seq = input_ids.shape
        dtype = self.fc.weight.dtype
        hidden = self.fc(features.to(dtype))
        index = torch.arange(seq)
        keys, values, outputs = [], [], []
        for k in range(steps):
            shifted = torch.zeros_like(input_ids)
            shifted[:, : max(seq - 1 - k, 0)] = input_ids[:, 1 + k :]
            cos, sin = self.rope((index + k).expand(bsz, seq), dtype)
            q, key, value = layer.self_attn.qkv(layer.attn_input(self.embed(shifted).to(dtype), hidden), cos, sin)
            keys.append(key)
            values.append(value)
            hidden = layer.finish(hidden, ttt_attention(q, keys, values, layer.self_attn.scale))
            outputs.append(self.norm(hidden))
        return outputs


def ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float | None) -> torch.Tensor:
    """Attention of training-time-test step k = len(keys) - 1: the query at index t sees step 0's
    keys at indices <= t and the keys of steps 1..k at index t only. q [B, H, S, D]; keys/values:
    k + 1 tensors [B, Hkv, S, D] -> [B, H, S, D].

    The same as grouped_attention over the k + 1 concatenated key sets with a [causal | diagonal x k]
    mask, without its S x (k + 1)S scores: the diagonal keys give one score per query each.
    """
    bsz, heads, seq, dim = q.shape
    kv_heads = keys[0].shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    compute, acc = attention_precision(q)  # grouped_attention's: products, then softmax and sums
    qg = q.reshape(bsz, kv_heads, group, seq, dim).to(compute)
    k0, v0 = keys[0][:, :, None].to(compute), values[0][:, :, None].to(compute)
    causal = torch.matmul(qg, k0.transpose(-1, -2)).to(acc) * scale  # [B, Hkv, G, S, S]
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    causal = causal.masked_fill(future, float("-inf"))
    diag = [(qg.to(acc) * key[:, :, None].to(acc)).sum(-1, keepdim=True) * scale for key in keys[1:]]
    probs = torch.softmax(torch.cat([causal] + diag, dim=-1), dim=-1)
    out = torch.matmul(probs[..., :seq].to(compute), v0).to(acc)
    for j, value in enumerate(values[1:]):
        out = out + probs[..., seq + j, None] * value[:, :, None].to(acc)
    return out.to(q.dtype).reshape(bsz, heads, seq, dim)


class Eagle3Drafter:
    name = "eagle3"

    def __init__(self, model: Eagle3Model):
        self.model = model
        self.config = model.config
        self.feature_layers = tuple(model.config.target_layer_ids)
        self.cache: KVCache | None = None
        self._pending: dict[int, list[torch.Tensor]] = {}

    def setup(self, num_slots: int, max_seq_len: int, block_size: int) -> None:
        args = self.config.layer_args
        self.cache = build_kv_cache(1, num_slots, max_seq_len, args.num_kv_heads, args.head_dim,
                                    self.model.fc.weight.dtype, headroom=block_size + 2)

    def begin(self, slot, prompt_ids, features) -> None:
        self.cache.lengths[slot] = 0
        self._pending[slot] = [features]

    def commit(self, slot, num_accepted, features) -> None:
        self._pending.setdefault(slot, []).append(features)

    def release(self, slot) -> None:
        self.cache.lengths[slot] = 0
        self._pending.pop(slot, None)

    def _forward(self, slots, tokens, hidden, positions, num_new):
        """One padded forward of (token, hidden) pairs at positions [B, N]; writes K/V; returns new hidden [B, N, H]."""
        model, layer = self.model, self.model.layers[0]
        dtype = model.fc.weight.dtype
        cos, sin = model.rope(positions, dtype)
        q, k, v = layer.self_attn.qkv(layer.attn_input(model.embed(tokens).to(dtype), hidden), cos, sin)
        slot_t = torch.tensor(slots)
        write_rows(self.cache.keys[0], slot_t, positions, k.transpose(1, 2), num_new)
        write_rows(self.cache.values[0], slot_t, positions, v.transpose(1, 2), num_new)
        # Keys up to the last real position (or a few past it, masked: see attention_width).
        width = attention_width(int((positions[:, 0] + num_new).max()), self.cache.capacity, dtype,
                                model.fc.weight.device)
        mask = torch.arange(width)[None, None, :] <= positions[:, :, None]  # causal by position
        out = grouped_attention(q, self.cache.keys[0][slot_t, :, :width], self.cache.values[0][slot_t, :, :width],
                                mask[:, None], layer.self_attn.scale)
        return layer.finish(hidden, out)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        live = sorted((r for r in requests if r.max_tokens > 0), key=lambda r: r.slot)
        if not live:
            return [empty_proposal() for _ in requests]
        slots = [r.slot for r in live]
        model = self.model
        dtype = model.fc.weight.dtype
        # 1) Absorb committed pairs (features of token t, token t+1) the cache lacks.
        feats = [torch.cat(self._pending[s]) for s in slots]
        width = max(f.shape[0] for f in feats)
        hidden = torch.zeros(len(live), width, model.fc.weight.shape[0], dtype=dtype)
        tokens = torch.zeros(len(live), width, dtype=torch.long)
        starts = torch.tensor([self.cache.lengths[s] for s in slots])
        for row, (r, f) in enumerate(zip(live, feats)):
            start = int(starts[row])
            assert start + f.shape[0] == len(r.token_ids) - 1
            hidden[row, : f.shape[0]] = model.fc(f.to(dtype))
            tokens[row, : f.shape[0]] = torch.tensor(r.token_ids[start + 1 :])
        positions = starts[:, None] + torch.arange(width)
        num_new = torch.tensor([f.shape[0] for f in feats])
        out = self._forward(slots, tokens, hidden, positions, num_new)
        for row, s in enumerate(slots):
            self.cache.lengths[s] += int(num_new[row])
            self._pending[s] = []
        last = num_new - 1
        h = out[torch.arange(len(live)), last][:, None]  # [B, 1, H]
        pos = (starts + num_new)[:, None]  # next position per row
        # 2) Chain: sample, then feed (own hidden, sampled token) at the next position.
        steps = max(r.max_tokens for r in live)
        params, gens = [r.params for r in live], [r.generator for r in live]
        drafted, probs = [], []
        for step in range(steps):
            logits = model.logits(h[:, 0])
            step_probs = torch.stack([logits_to_probs(logits[i], p) for i, p in enumerate(params)])
            step_tokens = sample_rows(step_probs, params, gens)
            drafted.append(step_tokens)
            probs.append(step_probs)
            if step + 1 < steps:
                h = self._forward(slots, step_tokens[:, None], h, pos + step, torch.ones(len(live), dtype=torch.long))
        by_slot = {}
        for row, r in enumerate(live):
            n = r.max_tokens
            by_slot[r.slot] = Proposal(torch.stack([t[row] for t in drafted[:n]]), torch.stack([p[row] for p in probs[:n]]))
        return [by_slot.get(r.slot, empty_proposal()) for r in requests]


def new_eagle3_config(target, overrides: dict | None = None) -> Eagle3Config:
    targs = target.model.args
    base = dict(target=target_spec_of(target), target_layer_ids=default_target_layer_ids(targs.num_layers),
                layer_args=dataclasses.replace(targs, num_layers=1, sliding_windows=(None,)))
    for key, value in (overrides or {}).items():
        if key not in ("block_size", "target_layer_ids"):
            raise DSparkError(f"setting {key!r} does not apply to eagle3; settable: block_size, target_layer_ids")
        base[key] = value
    return Eagle3Config(**base)


def build_eagle3_model(config: Eagle3Config, target, seed: int | None = 0) -> Eagle3Model:
    return build_sharing_model(Eagle3Model, config, target, seed)
