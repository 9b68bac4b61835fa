"""Training-free drafters: `none` (plain autoregressive decoding) and `ngram` (prompt lookup)."""

from __future__ import annotations

import torch

from dspark.drafters.base import DraftRequest, Proposal, empty_proposal
from dspark.errors import DSparkError


class NoDrafter:
    """Proposes nothing: every round verifies only the pending token, i.e. plain decoding."""

    name = "none"
    feature_layers: tuple[int, ...] = ()

    def setup(self, num_slots: int, max_seq_len: int, block_size: int) -> None:
        pass

    def begin(self, slot, prompt_ids, features) -> None:
        pass

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        return [empty_proposal() for _ in requests]

    def commit(self, slot, num_accepted, features) -> None:
        pass

    def release(self, slot) -> None:
        pass


class NgramDrafter(NoDrafter):
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n tokens
    (n from max_ngram down to min_ngram) and propose the tokens that followed it.

    Drafts are deterministic (point masses), so rejection sampling accepts a draft with the
    target's probability of it and stays lossless at any temperature.
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise DSparkError(f"ngram sizes need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        return [self._lookup(r.token_ids, r.max_tokens) for r in requests]

    def _lookup(self, token_ids: list[int], max_tokens: int) -> Proposal:
        if max_tokens <= 0:
            return empty_proposal()
        seq = torch.tensor(token_ids, dtype=torch.long)
        total = seq.numel()
        for n in range(min(self.max_ngram, total - 1), self.min_ngram - 1, -1):
            # Windows that start before the suffix itself and so have at least one token after them.
            windows = seq[:-1].unfold(0, n, 1)  # [total - n, n]
            hits = (windows == seq[-n:]).all(dim=1).nonzero()
            if hits.numel():
                start = int(hits[-1]) + n
                return Proposal(tokens=seq[start : start + max_tokens].clone())
        return empty_proposal()
