"""Lossless verification of a ragged batch of drafts (pure functions).

Glossary (as vLLM): *accepted* drafts passed verification; after the first rejection one
*recovered* token is drawn from the normalised residual max(target - draft, 0); after a full accept
one *bonus* token is drawn from the target. Greedy is the temperature-0 case: accept while the draft
equals the target's argmax, then emit the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dspark.config import SamplingParams
from dspark.sampling import logits_to_probs, sample

# Residual mass below this is treated as zero (target == draft at that position) and the target
# distribution is used instead, which is then exactly the residual's limit.
RESIDUAL_EPS = 1e-12


@dataclass
class VerifyResult:
    num_accepted: list[int]  # accepted drafts per row
    next_tokens: list[int]  # recovered (num_accepted < num_draft) or bonus token per row
    # Per row, for k = 1..n: the probability, given the drafted tokens, that the first k drafts are
    # all accepted (see prefix_survival); its sum is the expected num_accepted.
    survival: list[list[float]] = field(default_factory=list)


def residual_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """max(target - draft, 0), normalised: target_probs/draft_probs [V] -> [V].

    Falls back to target_probs when the residual has no mass (identical distributions).
    """
    residual = (target_probs - draft_probs).clamp_min(0.0)
    mass = residual.sum()
    if float(mass) <= RESIDUAL_EPS:
        return target_probs
    return residual / mass


def _drafted_probs(target_probs: torch.Tensor, draft_tokens: torch.Tensor,
                   draft_probs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's and the drafter's probability of each drafted token ([n] each; the drafter's is
    1 for point-mass drafts)."""
    rows = torch.arange(int(draft_tokens.numel()))
    p_target = target_probs[rows, draft_tokens]
    p_draft = draft_probs[rows, draft_tokens] if draft_probs is not None else torch.ones_like(p_target)
    return p_target, p_draft


def prefix_survival(target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                    greedy: bool) -> list[float]:
    """For k = 1..n, the probability that verification accepts the first k drafts, given them.

    Greedy: 1 while the drafts match the argmax, then 0 (what verification does). Sampled: the
    product of min(1, target / draft) over the first k, each draft's acceptance probability given
    its prefix (the target's row k is conditioned on drafts < k). The sum is E[num_accepted | drafts]:
    the same mean as the realised count without the noise of the acceptance draws, which at
    temperature 1 is most of a round's variance. Arguments as verify_row's."""
    n = int(draft_tokens.numel())
    if n == 0:
        return []
    if greedy:
        accept = (target_probs[:n].argmax(-1) == draft_tokens).double()
    else:
        p_target, p_draft = (t.double() for t in _drafted_probs(target_probs, draft_tokens, draft_probs))
        # As verify_row's test `uniform * draft < target`: a draft the drafter gave 0 is accepted
        # surely where the target gives it mass, never where it does not.
        accept = torch.where(p_draft > 0, (p_target / p_draft.clamp_min(1e-300)).clamp(max=1.0),
                             (p_target > 0).double())
    return accept.cumprod(0).tolist()


def verify_row(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: bool,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """One request: target_probs [n+1, V]; draft_tokens [n]; draft_probs [n, V] or None (point masses).

    Returns (num_accepted, next_token).
    """
    n = int(draft_tokens.numel())
    if greedy:
        argmax = target_probs.argmax(-1)
        matches = (argmax[:n] == draft_tokens).int()
        num_accepted = int(matches.cumprod(0).sum()) if n else 0
        return num_accepted, int(argmax[num_accepted])
    num_accepted = n
    if n:
        p_target, p_draft = _drafted_probs(target_probs, draft_tokens, draft_probs)
        uniform = torch.rand(n, generator=generator, dtype=target_probs.dtype)
        # Accept with probability min(1, target / draft), written without a division.
        accepted = (uniform * p_draft < p_target).int()
        num_accepted = int(accepted.cumprod(0).sum())
    if num_accepted < n:
        pos = num_accepted
        if draft_probs is not None:
            draft_dist = draft_probs[pos]
        else:
            draft_dist = torch.zeros_like(target_probs[pos])
            draft_dist[draft_tokens[pos]] = 1.0
        dist = residual_probs(target_probs[pos], draft_dist)
    else:
        dist = target_probs[n]
    return num_accepted, sample(dist, generator)


def verify_ragged(
    target_logits: torch.Tensor,
    draft_tokens: Sequence[torch.Tensor],
    draft_probs: Sequence[torch.Tensor | None],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> VerifyResult:
    """Verify every row of a ragged batch.

    target_logits [B, N, V]: row b's first n_b + 1 positions are the target's logits after its
    pending token and each of its n_b = len(draft_tokens[b]) drafts (n_b = 0 allowed); the rest is
    padding. draft_probs[b] is [n_b, V] (warped like the target) or None for point-mass drafts.
    """
    num_accepted, next_tokens, survival = [], [], []
    for row, tokens in enumerate(draft_tokens):
        n = int(tokens.numel())
        logits = target_logits[row, : n + 1]
        # Greedy needs only the argmax, which the raw logits already give.
        probs = logits if params[row].greedy else logits_to_probs(logits, params[row])
        a, token = verify_row(probs, tokens, draft_probs[row], params[row].greedy, generators[row])
        num_accepted.append(a)
        next_tokens.append(token)
        survival.append(prefix_survival(probs, tokens, draft_probs[row], params[row].greedy))
    return VerifyResult(num_accepted, next_tokens, survival)
