"""DSpark's light sequential heads and confidence head (paper eq. 4-7).

A sequential head adds a bias to the parallel backbone's logits at draft slot k that depends on
the previous token x_{k-1} (the anchor for slot 0; the sampled draft at inference, the ground-truth
token when teacher-forced in training):
  vanilla Markov  B_k = W2(W1[x_{k-1}])                                   (eq. 5, rank R)
  gated Markov    B_k = W2(sigmoid(G([h_k ; W1[x_{k-1}]])) * W1[x_{k-1}])
  RNN             s_k = g * s_{k-1} + (1 - g) * tanh(c), B_k = W2(tanh(o)),
                  [g, c, o] = J([s_{k-1} ; W1[x_{k-1}] ; h_k]), g = sigmoid(.)   (eq. 6)
The confidence head is c_k = sigmoid(w . [h_k ; W1[x_{k-1}]] + b) (eq. 7).
Parameter names follow DeepSpec's (markov_w1, markov_w2, gate_proj, joint_proj, proj).
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_TYPES = ("vanilla", "gated", "rnn")


class SequentialHead(nn.Module):
    """Shared W1 (token -> R) and W2 (R -> V). A head maps (x_{k-1}, h_k, state) to a rank-R feature
    u_k; its logit bias is W2(u_k). Keeping the vocabulary-sized part linear in u lets training
    compute it in chunks."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, out_size: int | None = None):
        super().__init__()
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)  # input: any previous token id
        self.markov_w2 = nn.Linear(rank, out_size or vocab_size, bias=False)  # output: the drafter's vocabulary

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def step_features(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prev_tokens [B]; hidden [B, H] -> (u [B, R], new state)."""
        raise NotImplementedError

    def step(self, prev_tokens, hidden, state):
        """One left-to-right step: (bias [B, V], new state)."""
        u, state = self.step_features(prev_tokens, hidden, state)
        return self.markov_w2(u), state

    def block_features(self, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: prev_tokens [..., K], hidden [..., K, H] -> u [..., K, R].

        The default unrolls step_features; heads without recurrence override it with one call."""
        lead, k_len = prev_tokens.shape[:-1], prev_tokens.shape[-1]
        flat_prev = prev_tokens.reshape(-1, k_len)
        flat_hidden = hidden.reshape(-1, k_len, hidden.shape[-1])
        state = self.init_state(flat_prev.shape[0], flat_hidden)
        feats = []
        for k in range(k_len):
            u, state = self.step_features(flat_prev[:, k], flat_hidden[:, k], state)
            feats.append(u)
        return torch.stack(feats, dim=1).reshape(*lead, k_len, self.rank)

    def apply_block(self, base_logits: torch.Tensor, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced corrected logits: base_logits [..., K, V] + W2(u) -> [..., K, V]."""
        return base_logits + self.markov_w2(self.block_features(prev_tokens, hidden)).to(base_logits.dtype)


class VanillaMarkovHead(SequentialHead):
    def step_features(self, prev_tokens, hidden, state):
        return self.markov_w1(prev_tokens), state

    def block_features(self, prev_tokens, hidden):
        return self.markov_w1(prev_tokens)


class GatedMarkovHead(SequentialHead):
    def __init__(self, vocab_size: int, hidden_size: int, rank: int, out_size: int | None = None):
        super().__init__(vocab_size, hidden_size, rank, out_size)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)

    def _features(self, prev_tokens, hidden):
        emb = self.markov_w1(prev_tokens)
        return torch.sigmoid(self.gate_proj(torch.cat([hidden.to(emb.dtype), emb], dim=-1))) * emb

    def step_features(self, prev_tokens, hidden, state):
        return self._features(prev_tokens, hidden), state

    def block_features(self, prev_tokens, hidden):
        return self._features(prev_tokens, hidden)


class RNNHead(SequentialHead):
    def __init__(self, vocab_size: int, hidden_size: int, rank: int, out_size: int | None = None):
        super().__init__(vocab_size, hidden_size, rank, out_size)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def init_state(self, batch, like):
        return torch.zeros(batch, self.rank, dtype=self.markov_w1.weight.dtype, device=like.device)

    def step_features(self, prev_tokens, hidden, state):
        emb = self.markov_w1(prev_tokens)
        gate, cand, out = self.joint_proj(torch.cat([state, emb, hidden.to(emb.dtype)], dim=-1)).chunk(3, dim=-1)
        gate = torch.sigmoid(gate)
        state = gate * state + (1 - gate) * torch.tanh(cand)
        return torch.tanh(out), state


def build_sequential_head(kind: str, vocab_size: int, hidden_size: int, rank: int,
                          out_size: int | None = None) -> SequentialHead | None:
    """out_size: the drafter's output vocabulary (a draft vocabulary; default the full one)."""
    if rank == 0:
        return None
    heads = {"vanilla": VanillaMarkovHead, "gated": GatedMarkovHead, "rnn": RNNHead}
    return heads[kind](vocab_size, hidden_size, rank, out_size)


class ConfidenceHead(nn.Module):
    """Per-slot acceptance estimate from [h_k ; W1[x_{k-1}]] (W1 shared with the sequential head)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size + rank, 1)

    def logits(self, hidden: torch.Tensor, prev_embedding: torch.Tensor | None) -> torch.Tensor:
        """hidden [..., H]; prev_embedding [..., R] or None -> confidence logits [...] (fp32)."""
        features = hidden if prev_embedding is None else torch.cat([hidden, prev_embedding.to(hidden.dtype)], dim=-1)
        return self.proj(features.to(self.proj.weight.dtype)).squeeze(-1).float()
