"""The Drafter protocol: what the engine asks of every drafter (DSpark, DFlash, Eagle3, baselines).

A request's committed tokens always end with one *pending* token (the last bonus or recovered
token), which is not yet in the target's cache. Each round the engine asks the drafter for up to
`max_tokens` tokens following the committed ones; the verification policy may then verify only a
prefix of them; the engine reports how many were accepted, and the drafter rolls its own state back
to the committed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from dspark.config import SamplingParams


@dataclass
class DraftRequest:
    """One request's state as the drafter sees it in a round."""

    slot: int
    token_ids: list[int]  # prompt + generated; the last one is pending (not in the target cache)
    max_tokens: int  # propose at most this many (0 allowed)
    params: SamplingParams
    generator: torch.Generator
    # Identifies the request across rounds (unique among the engine's requests; None: unknown), so
    # a policy can keep per-request statistics although slots are reused.
    uid: int | None = None


@dataclass
class Proposal:
    """Drafted tokens with the distributions they were sampled from (after warping and any head)."""

    tokens: torch.Tensor  # [k] int64
    # [k, V] probabilities the tokens were drawn from, warped like the target's; None means each token
    # was chosen deterministically (a point mass), as n-gram lookup does, or that the request is
    # greedy (greedy verification compares argmaxes only).
    draft_probs: torch.Tensor | None = None
    confidences: torch.Tensor | None = None  # [k] in [0, 1], optional per-position acceptance estimates

    def __len__(self) -> int:
        return int(self.tokens.numel())


def empty_proposal() -> Proposal:
    return Proposal(tokens=torch.empty(0, dtype=torch.long))


@runtime_checkable
class Drafter(Protocol):
    """Implemented by every drafter. Slots are the engine's request slots."""

    name: str
    # Target decoder layers whose outputs the drafter consumes as context features (empty: none).
    feature_layers: tuple[int, ...]

    def setup(self, num_slots: int, max_seq_len: int, block_size: int) -> None:
        """Allocate per-slot state once, before any request."""

    def begin(self, slot: int, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        """Start a request from its prefill; features [P, L*hidden] of the prompt tokens, if asked for."""

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        """Draft for a batch of requests (one Proposal each, at most max_tokens long)."""

    def commit(self, slot: int, num_accepted: int, features: torch.Tensor | None) -> None:
        """The first num_accepted drafted tokens were accepted; roll back the rest.

        features [num_accepted + 1, L*hidden]: target hidden states of the tokens that entered the
        target cache this round (the pending token and the accepted drafts).
        """

    def release(self, slot: int) -> None:
        """Forget the request in this slot."""
