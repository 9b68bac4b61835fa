"""Draft vocabulary (as Eagle3's draft vocabulary and FR-Spec): the N token ids the drafter may
propose, chosen as the most frequent assistant tokens of the training data, plus the target's stop
tokens (a drafter that cannot end an answer loses the last round of every request). Ties, which are
many among rare tokens, go to tokens frequent in the prompts (answers copy names and numbers from
them), then to the lower id."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dspark.errors import DSparkError


def token_counts(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int,
                 supervised: bool = True) -> torch.Tensor:
    """[V] counts of the supervised (loss-mask) tokens over (input_ids, loss_mask) pairs, or of the
    other (prompt) tokens with supervised=False."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in pairs:
        keep = mask.bool() if supervised else ~mask.bool()
        counts += torch.bincount(ids[keep].long(), minlength=vocab_size)
    return counts


def select_draft_vocab(counts: torch.Tensor, size: int, required: Iterable[int] = (),
                       tie_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The `size` most frequent ids with every `required` id included, sorted ascending; ties
    broken by tie_counts (descending), then by the lower id. Returns [size] long."""
    vocab = counts.numel()
    if not 0 < size <= vocab:
        raise DSparkError(f"draft_vocab_size {size} must be in [1, {vocab}]")
    required = sorted({int(t) for t in required if 0 <= int(t) < vocab})
    if len(required) > size:
        raise DSparkError(f"draft_vocab_size {size} is smaller than the {len(required)} stop tokens it must hold")
    score = counts.double().clone()
    score[required] = float("inf")
    order = torch.arange(vocab)
    if tie_counts is not None:  # stable sorts: the last key sorted first
        order = torch.argsort(-tie_counts.double(), stable=True)
    order = order[torch.argsort(-score[order], stable=True)]
    return order[:size].sort().values


def coverage(counts: torch.Tensor, ids: torch.Tensor) -> float:
    """Share of the counted tokens that fall inside the draft vocabulary."""
    total = int(counts.sum())
    return float(counts[ids].sum()) / total if total else 1.0
