"""Training-free drafters: `none` (plain autoregressive decoding) and `ngram` (prompt lookup), and
prompt lookup in front of a model drafter (`<drafter>+ngram`)."""

from __future__ import annotations

import dataclasses

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


LOOKUP_SUFFIX = "+ngram"


def behind_lookup(name: str) -> str | None:
    """The drafter name before `+ngram` in `<name>+ngram`, else None."""
    return name[: -len(LOOKUP_SUFFIX)] if name.endswith(LOOKUP_SUFFIX) and len(name) > len(LOOKUP_SUFFIX) else None


class LookupFirstDrafter:
    """Prompt lookup in front of another drafter (`--drafter <drafter>+ngram`).

    Where the committed text's last `min_match` to `max_match` tokens occurred before, the round
    proposes what followed that occurrence (NgramDrafter's proposal: point masses, no confidences);
    elsewhere the inner drafter proposes. A drafter trained on the target's sampled answers seldom
    predicts a long verbatim repeat of the prompt or of the answer itself, which lookup gets right
    at almost no cost, and a DSpark round skipped is its whole forward saved.

    The inner drafter follows every committed token whichever drafter proposed: the engine's
    commit() goes to it each round, and DSpark absorbs the features it was handed at its next
    propose. Lossless like both: each row's tokens come with the distribution they were drawn
    from (None for lookup's point masses), which is what verification uses.
    """

    def __init__(self, inner, min_match: int = 3, max_match: int = 8):
        if getattr(inner, "name", None) in ("none", "ngram") or isinstance(inner, LookupFirstDrafter):
            raise DSparkError(f"{LOOKUP_SUFFIX!r} goes after a model drafter (builtin, draft-model, a drafter "
                              f"folder), got {getattr(inner, 'name', inner)!r}")
        self.inner, self.lookup = inner, NgramDrafter(max_match, min_match)
        self.name = f"{inner.name}{LOOKUP_SUFFIX}"
        self.feature_layers = tuple(inner.feature_layers)
        self.looked_up = self.proposed = 0  # rounds drafted by lookup, and by either

    def setup(self, num_slots: int, max_seq_len: int, block_size: int) -> None:
        self.inner.setup(num_slots, max_seq_len, block_size)

    def begin(self, slot, prompt_ids, features) -> None:
        self.inner.begin(slot, prompt_ids, features)

    def commit(self, slot, num_accepted, features) -> None:
        self.inner.commit(slot, num_accepted, features)

    def release(self, slot) -> None:
        self.inner.release(slot)

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        found = self.lookup.propose(requests)  # empty where a row may draft nothing
        rest = [r if len(f) == 0 else dataclasses.replace(r, max_tokens=0) for r, f in zip(requests, found)]
        inner = self.inner.propose(rest) if any(r.max_tokens > 0 for r in rest) else [empty_proposal()] * len(rest)
        self.looked_up += sum(1 for f in found if len(f))
        self.proposed += sum(1 for r in requests if r.max_tokens > 0)
        return [f if len(f) else p for f, p in zip(found, inner)]
