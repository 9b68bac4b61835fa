"""Confidence calibration: survival samples from round logs, ECE / AUROC / Brier per position,
Sequential Temperature Scaling (paper §3.2.1) and the static threshold sweep (paper Fig. 5).

A drafter's confidence c_k estimates the probability that draft k is accepted given drafts 1..k-1
were; the prefix-survival estimate is a_k = prod_{i<=k} c_i, and its label is 1 iff drafts 1..k were
all accepted. Calibration is measured and fitted on a_k, position by position (as DeepSpec's
evaluator measures it: 20 equal-width bins, predictions clamped to [1e-8, 1 - 1e-8]).

Shapes: N rounds, K draft positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ECE_BINS = 20
EPS = 1e-8


@dataclass
class SurvivalSamples:
    """Rounds with confidences: raw logits, accepted counts and how many positions are labelled."""

    logits: torch.Tensor  # [N, K] float64 confidence logits (0 where the proposal was shorter)
    num_accepted: torch.Tensor  # [N] int64 drafts accepted in the round
    known: torch.Tensor  # [N] int64 leading positions whose survival label is known

    def __len__(self) -> int:
        return int(self.known.numel())

    @property
    def width(self) -> int:
        return int(self.logits.shape[1])

    def labels(self) -> torch.Tensor:
        """[N, K] float64 survival labels: 1 iff drafts 1..k+1 were all accepted."""
        return (torch.arange(self.width)[None, :] < self.num_accepted[:, None]).double()

    def mask(self) -> torch.Tensor:
        """[N, K] bool: positions whose label is known."""
        return torch.arange(self.width)[None, :] < self.known[:, None]


def known_positions(verified: int, accepted: int, committed: int, proposed: int) -> int:
    """How many leading positions of a round have a known survival label.

    A stop token among the accepted drafts cut the round (committed < accepted + 1): only the
    committed drafts count, as DeepSpec truncates after an accepted EOS. A rejection at draft
    accepted + 1 fixes every later label at 0, so the whole proposal is known; when every verified
    draft was accepted, positions past the verified ones were never tested.
    """
    if committed < accepted + 1:
        return committed
    if accepted == verified:
        return verified
    return proposed


def survival_samples(round_logs: Sequence[tuple[int, int, int]], confidence_logs: Sequence[Sequence[float]],
                     width: int, temperatures: Sequence[float] = ()) -> SurvivalSamples:
    """Collect rounds that carry confidences. temperatures: those already applied to the confidences
    (their logits are multiplied back, so the result holds raw logits)."""
    rows = [(r, c) for r, c in zip(round_logs, confidence_logs) if len(c) > 0]
    logits = torch.zeros(len(rows), width, dtype=torch.float64)
    accepted = torch.zeros(len(rows), dtype=torch.long)
    known = torch.zeros(len(rows), dtype=torch.long)
    for i, ((n, a, c), conf) in enumerate(rows):
        m = min(len(conf), width)
        probs = torch.tensor(conf[:m], dtype=torch.float64).clamp(EPS, 1 - EPS)
        logits[i, :m] = torch.log(probs) - torch.log1p(-probs)
        accepted[i] = a
        known[i] = min(known_positions(n, a, c, len(conf)), m)
    if temperatures:
        logits *= torch.tensor(list(temperatures)[:width], dtype=torch.float64)
    return SurvivalSamples(logits, accepted, known)


def scaled_logits(logits: torch.Tensor, temperatures: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] logits divided by per-position temperatures (none given: unchanged)."""
    if temperatures is None or len(temperatures) == 0:
        return logits
    return logits / torch.as_tensor(list(temperatures), dtype=logits.dtype)[: logits.shape[1]]


def prefix_survival(logits: torch.Tensor, temperatures: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] logits -> [N, K] a_k = prod_{i<=k} sigmoid(z_i / T_i)."""
    return torch.cumprod(torch.sigmoid(scaled_logits(logits, temperatures)), dim=1)


def ece(pred: torch.Tensor, label: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error with equal-width bins: sum |mean pred - mean label| * n_bin / n."""
    return float(_ece_many(pred[None, :], label, bins)[0]) if pred.numel() else float("nan")


def _ece_many(preds: torch.Tensor, label: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """[G, n] candidate predictions for the same labels [n] -> [G] ECE each (one pass, no loop)."""
    g, n = preds.shape
    preds = preds.clamp(EPS, 1 - EPS)
    index = (preds * bins).long().clamp_(max=bins - 1) + bins * torch.arange(g)[:, None]
    flat = index.reshape(-1)
    count = torch.zeros(g * bins, dtype=torch.float64).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    sum_pred = torch.zeros(g * bins, dtype=torch.float64).index_add_(0, flat, preds.reshape(-1).double())
    sum_label = torch.zeros(g * bins, dtype=torch.float64).index_add_(0, flat, label.double().expand(g, n).reshape(-1))
    return ((sum_pred - sum_label).abs().view(g, bins).sum(1)) / max(n, 1)


def auroc(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half); nan with one class only."""
    positives = int(label.sum())
    negatives = int(label.numel()) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(pred)
    sorted_pred = pred[order]
    ranks = torch.empty(pred.numel(), dtype=torch.float64)
    _, counts = torch.unique_consecutive(sorted_pred, return_counts=True)
    ends = torch.cumsum(counts, 0)
    average = (ends - counts + 1 + ends).double() / 2  # mean 1-based rank of each tie group
    ranks[order] = torch.repeat_interleave(average, counts)
    rank_sum = float(ranks[label.bool()].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def reliability_bins(pred: torch.Tensor, label: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per bin: mean prediction, observed rate and count (the reliability diagram's points)."""
    index = (pred.clamp(EPS, 1 - EPS) * bins).long().clamp(max=bins - 1)
    out = []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        if n:
            out.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                        "mean_pred": float(pred[sel].mean()), "observed": float(label[sel].double().mean())})
    return out


def calibration_metrics(samples: SurvivalSamples, temperatures: Sequence[float] | None = None) -> dict:
    """Per-position ECE, AUROC, Brier, mean prediction and observed survival, plus count-weighted means."""
    survival = prefix_survival(samples.logits, temperatures)
    labels, mask = samples.labels(), samples.mask()
    per = []
    for k in range(samples.width):
        sel = mask[:, k]
        pred, label = survival[sel, k], labels[sel, k]
        n = int(sel.sum())
        per.append({
            "position": k + 1, "count": n,
            "ece": ece(pred, label), "auroc": auroc(pred, label) if n else float("nan"),
            "brier": float(((pred - label) ** 2).mean()) if n else float("nan"),
            "mean_pred": float(pred.mean()) if n else float("nan"),
            "observed": float(label.mean()) if n else float("nan"),
            "reliability": reliability_bins(pred, label),
        })
    return {"positions": per, **{f"{m}_mean": _weighted_mean(per, m) for m in ("ece", "auroc", "brier")}}


def _weighted_mean(per: list[dict], key: str) -> float:
    pairs = [(p[key], p["count"]) for p in per if p["count"] and not math.isnan(p[key])]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else float("nan")


def fit_sts(samples: SurvivalSamples, grid: torch.Tensor | None = None) -> list[float]:
    """Sequential Temperature Scaling: for k = 1..K, left to right, the temperature T_k minimising the
    ECE of a_k = prod_{i<=k} sigmoid(z_i / T_i) with T_1..T_{k-1} already fixed.

    1-D search: a log-spaced grid over [0.05, 20] (the paper leaves the grid open), then a finer
    grid around the best point. Ties go to the temperature closest to 1. Positions without samples
    keep T = 1.
    """
    coarse = torch.logspace(math.log10(0.05), math.log10(20.0), 161, dtype=torch.float64) if grid is None else grid
    labels, mask = samples.labels(), samples.mask()
    temps: list[float] = []
    prefix = torch.ones(len(samples), dtype=torch.float64)  # a_{k-1} under the fitted temperatures
    for k in range(samples.width):
        sel = mask[:, k]
        z, label, before = samples.logits[sel, k], labels[sel, k], prefix[sel]
        best = 1.0
        if z.numel():
            best = _search(z, before, label, coarse)
            step = float(coarse[1] / coarse[0]) if coarse.numel() > 1 else 1.1
            fine = best * torch.logspace(math.log10(1 / step), math.log10(step), 41, dtype=torch.float64)
            best = _search(z, before, label, torch.cat([fine, torch.tensor([best], dtype=torch.float64)]))
        temps.append(best)
        prefix = prefix * torch.sigmoid(samples.logits[:, k] / best)
    return temps


def _search(z: torch.Tensor, before: torch.Tensor, label: torch.Tensor, grid: torch.Tensor) -> float:
    errors = []
    for chunk in torch.split(grid, max(1, 4_000_000 // max(z.numel(), 1))):
        preds = before[None, :] * torch.sigmoid(z[None, :] / chunk[:, None])
        errors.append(_ece_many(preds, label))
    err = torch.cat(errors)
    # Smallest ECE; among (numerically) equal ones, the temperature closest to 1.
    near_best = err <= err.min() + 1e-12
    candidates = grid[near_best]
    return float(candidates[torch.argmin(candidates.log().abs())])


def threshold_sweep(samples: SurvivalSamples, thresholds: Sequence[float],
                    temperatures: Sequence[float] | None = None) -> list[dict]:
    """Offline static-threshold verification (paper Fig. 5; DeepSpec's --confidence-threshold rule):
    verify drafts up to the first position whose own confidence c_k is below the threshold.

    Replayed on rounds recorded with full verification (the evaluation runs so): a round verified
    to a shorter length L accepts min(accepted, L) drafts. Lengths never exceed a round's known
    positions. Per threshold: verified, accepted and rejected drafts per round, acceptance rate and
    tau (accepted + 1).
    """
    conf = torch.sigmoid(scaled_logits(samples.logits, temperatures))
    outside = torch.arange(samples.width)[None, :] >= samples.known[:, None]
    n = max(len(samples), 1)
    out = []
    for t in thresholds:
        stop = (conf < t) | outside
        length = torch.where(stop.any(1), stop.double().argmax(1), samples.known).double()
        acc = torch.minimum(samples.num_accepted.double(), length)
        out.append({"threshold": float(t), "rounds": len(samples),
                    "verified_per_round": float(length.sum()) / n, "accepted_per_round": float(acc.sum()) / n,
                    "rejected_per_round": float((length - acc).sum()) / n,
                    "acceptance_rate": float(acc.sum() / length.sum()) if length.sum() > 0 else float("nan"),
                    "accept_length": 1 + float(acc.sum()) / n})
    return out
