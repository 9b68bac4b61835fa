"""Logits -> probabilities (temperature, top-k, top-p) and sampling with explicit generators.

The same warping is applied to the target and to the drafts, so rejection sampling is lossless
with respect to the *warped* target distribution (what plain decoding with those settings samples).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dspark.config import SamplingParams


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Warp logits [..., V] with one request's sampling parameters; returns fp32 (or fp64) probs [..., V].

    Greedy (temperature 0) gives the one-hot distribution of the argmax, so greedy decoding is the
    temperature-0 case of the same algebra.
    """
    if logits.dtype != torch.float64:  # float64 stays float64 for the exact-algebra tests
        logits = logits.float()
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return probs
    logits = logits / params.temperature
    if params.top_k > 0 or params.top_p < 1.0:
        logits = _mask_top_k_top_p(logits, params.top_k, params.top_p)
    return torch.softmax(logits, dim=-1)


def _mask_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k (ties with the k-th kept, as HF) and outside the top-p nucleus
    (the smallest set whose mass reaches top_p, at least one token) to -inf; k applies first.

    With top-k on, only the surviving candidates are sorted (k entries, not the whole vocabulary)."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p >= 1.0:
            return logits
        width = int(torch.isfinite(logits).sum(-1).max())  # k plus any ties
    else:
        width = vocab
    if top_p < 1.0:
        sorted_logits, order = torch.topk(logits, width, dim=-1)  # descending
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token if the mass strictly before it is below top_p; the most likely token always
        # (a top_p that rounds to 0 in the logits' precision would otherwise drop every token).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop_sorted[..., 0] = False
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, ~drop_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token from probs [V] (need not be normalised) by inverting the CDF with one uniform.

    torch.multinomial draws one exponential per vocabulary entry (~0.7 ms for 49k entries on a CPU);
    this costs one cumulative sum. A zero-probability token is never drawn: the search returns the
    first index whose cumulative mass exceeds the uniform, and ties in the CDF come from zeros.
    """
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))
    if index >= cdf.numel():  # u rounded up to the total: take the last token with mass
        index = int(torch.nonzero(probs > 0)[-1])
    return index


def sample_rows(
    probs: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Draw one token for each row of probs [B, V] with that row's generator; greedy rows take argmax."""
    out = torch.empty(probs.shape[0], dtype=torch.long)
    for row, (row_params, gen) in enumerate(zip(params, generators)):
        out[row] = int(probs[row].argmax()) if row_params.greedy else sample(probs[row], gen)
    return out


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from `seed`, or from fresh OS entropy when seed is None."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
