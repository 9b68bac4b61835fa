"""DSpark losses (paper eq. 9-12; DeepSpec `compute_dspark_loss`, digest §3). Pure functions.

Per supervised slot (weight w_k = exp(-k / gamma), gamma = 4.0 as DeepSpec):
  CE    cross-entropy of the corrected draft logits against the dataset token;
  L1    sum_v |p_draft - p_target| (the un-halved total variation, as DeepSpec), both at T = 1,
        the target distribution recomputed from its final hidden state through the frozen LM head;
  CONF  BCE-with-logits of the confidence against the detached analytic acceptance
        1 - L1/2 (clamped to [0, 1]).
loss = 0.1 CE + 0.9 L1 + 1.0 CONF, each a w-weighted mean. The w-weighted sums and the summed
weights are returned too: the trainer divides the sums of every process by the weights summed over
all processes (DeepSpec's normalisation: every supervised slot of a micro-step counts equally).

Memory: by default the vocabulary-sized logits of every supervised slot are kept for the backward
pass (on a CPU with GBs of memory this is the fast path). `recompute=True` keeps only one chunk of
rows at a time and recomputes it in the backward pass (activation checkpointing), so memory does
not grow with anchors x vocabulary (for GPUs with 150k vocabularies and thousands of anchors).

Draft vocabulary. With a drafter restricted to N token ids (`head_w` the LM-head rows of those ids,
`labels` mapped to their index or -1), the target's distribution over the subset is
exp(h_t . W_S - lse_t), with lse_t the target's log-normaliser over the full vocabulary (computed
once per position and reused by every block that supervises it; cached by `dspark data cache`),
and L1 = sum_S |q - p| + (1 - sum_S p): the target's mass outside the subset is a constant the
drafter cannot reach. CE counts slots whose label is in the subset. Equal to the full-vocabulary
terms when the subset is the whole vocabulary (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dspark.models.gemma import softcap


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    l1: float = 0.9
    confidence: float = 1.0
    decay_gamma: float = 4.0
    ttt_decay: float = 0.8  # Eagle3: weight 0.8^k of training-time-test step k (DeepSpec)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable: the sums over this call's own weights
    ce: float
    l1: float
    confidence: float
    acceptance: torch.Tensor  # [M] detached analytic acceptance per supervised slot
    sums: torch.Tensor  # [3] differentiable w-weighted sums of CE, L1 and BCE
    weights: torch.Tensor  # [2] detached summed weights: of the CE rows (label in the vocabulary), of all rows


def normalised_loss(sums: torch.Tensor, weights: torch.Tensor, lw: LossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, [3] term means) from sums [3] (CE, L1, BCE) and weights [2] (CE rows, all rows).

    DeepSpec's _build_loss: each term is its sum over its summed weight, so every supervised slot
    counts equally whatever sequence it comes from; a term without weight contributes 0."""
    means = sums / weights[[0, 1, 1]].clamp_min(1e-6)
    return lw.ce * means[0] + lw.l1 * means[1] + lw.confidence * means[2], means


def position_weights(block_size: int, gamma: float) -> torch.Tensor:
    """[K]: exp(-k / gamma) for k = 0..K-1."""
    return torch.exp(-torch.arange(block_size, dtype=torch.float32) / gamma)


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def _chunk_terms(hidden, head_feats, target_hidden, labels, head_w, w2, target_lse, matmul_dtype=torch.float32,
                 cap=None):
    """Per-row CE and L1 for one chunk of rows; vocabulary-sized tensors live only here. The
    products run in matmul_dtype (bf16 where the hardware has native bf16 units and training
    autocasts), logits and everything after them in fp32. target_lse None: head_w is the full LM
    head and the target's softmax is taken over it; else the target's log-normaliser per row
    (head_w a draft vocabulary's rows). cap: the target's final-logit soft-capping, applied to the
    target's logits and to the draft's base logits before the sequential head's bias (DeepSpec)."""
    md = matmul_dtype
    head = head_w.to(md)
    logits = softcap((hidden.to(md) @ head.T).float(), cap)
    if head_feats is not None:
        logits = logits + (head_feats.to(md) @ w2.to(md).T).float()
    log_draft = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        target_logits = softcap((target_hidden.to(md) @ head.T).float(), cap)
        if target_lse is None:
            target, outside = torch.softmax(target_logits, dim=-1), None
        else:
            target = torch.exp(target_logits - target_lse[:, None])
            outside = (1 - target.sum(-1)).clamp_min(0)
    ce = -log_draft.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1) * (labels >= 0)
    l1 = (log_draft.exp() - target).abs().sum(-1)
    if outside is not None:
        l1 = l1 + outside
    return ce, l1


@torch.no_grad()
def log_normalizer(hidden: torch.Tensor, lm_head_w: torch.Tensor, chunk_rows: int = 256,
                   matmul_dtype: torch.dtype = torch.float32, cap: float | None = None) -> torch.Tensor:
    """[S, H] final hidden states -> [S] fp32 logsumexp of the target's (soft-capped) logits
    (chunked over rows; the product in matmul_dtype, the sum in fp32)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32)
    head = lm_head_w.to(matmul_dtype)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = softcap((hidden[start : start + chunk_rows].to(matmul_dtype) @ head.T).float(), cap)
        out[start : start + chunk_rows] = torch.logsumexp(logits, -1)
    return out


def dspark_loss(
    hidden: torch.Tensor,
    head_feats: torch.Tensor | None,
    conf_logits: torch.Tensor | None,
    target_hidden: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    lm_head_w: torch.Tensor,
    w2: torch.Tensor | None,
    lw: LossWeights,
    chunk_rows: int = 128,
    target_lse: torch.Tensor | None = None,
    recompute: bool = False,
    matmul_dtype: torch.dtype = torch.float32,
    cap: float | None = None,
) -> LossOutput:
    """Rows are supervised slots: hidden [M, H] (draft, normed), head_feats [M, R] or None (the
    sequential head's rank-R features; its logit bias is w2 @ feats), conf_logits [M] or None,
    target_hidden [M, H] (target final hidden at the predicting position), labels [M] (indices into
    the drafter's output vocabulary; -1 = outside it), weights [M] (position weights), lm_head_w
    [V', H] fp32 frozen (the LM head, or a draft vocabulary's rows of it), w2 [V', R] or None,
    target_lse [M] (the target's full-vocabulary log-normaliser; required with a draft vocabulary),
    matmul_dtype: precision of the vocabulary-sized products (fp32 default; bf16 under autocast),
    cap: the target's final-logit soft-capping (Gemma) or None."""
    ces, l1s = [], []
    step = chunk_rows if recompute else max(hidden.shape[0], 1)
    for start in range(0, hidden.shape[0], step):
        sl = slice(start, start + step)
        args = (hidden[sl], head_feats[sl] if head_feats is not None else None, target_hidden[sl], labels[sl],
                lm_head_w, w2, None if target_lse is None else target_lse[sl], matmul_dtype, cap)
        if recompute and torch.is_grad_enabled():
            ce, l1 = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            ce, l1 = _chunk_terms(*args)
        ces.append(ce)
        l1s.append(l1)
    ce, l1 = torch.cat(ces), torch.cat(l1s)
    acceptance = (1 - 0.5 * l1.detach()).clamp(0, 1)
    ce_weights = weights * (labels >= 0)
    conf_sum = torch.zeros(())
    if conf_logits is not None and lw.confidence > 0:
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), acceptance, reduction="none")
        conf_sum = (weights * bce).sum()
    sums = torch.stack([(ce_weights * ce).sum(), (weights * l1).sum(), conf_sum])
    totals = torch.stack([ce_weights.sum(), weights.sum()]).detach().float()
    loss, means = normalised_loss(sums, totals, lw)
    ce_mean, l1_mean, conf_mean = means.detach().tolist()
    return LossOutput(loss, ce_mean, l1_mean, conf_mean, acceptance, sums, totals)


def expected_accept_length(acceptance: torch.Tensor, label_mask: torch.Tensor) -> float:
    """Running tau estimate: mean over kept blocks of 1 + sum_k prod_{i<=k} acc_i (analytic, T = 1).

    acceptance [M] in the row order of label_mask [N, K].nonzero(); label_mask [N, K] bool.
    """
    acc = torch.zeros(label_mask.shape, dtype=torch.float32)
    acc[label_mask] = acceptance.float()
    blocks = label_mask.any(dim=1)
    if not bool(blocks.any()):
        return math.nan
    return float((1 + acc.cumprod(dim=1).sum(dim=1))[blocks].mean())


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def _soft_terms(hidden, target_hidden, lm_head_w, cap=None, matmul_dtype=torch.float32):
    """Per-row soft cross-entropy -sum p_t log q and L1 |q - p_t| for one chunk of rows (logits
    soft-capped by cap where the target caps its own; the products in matmul_dtype, the rest in fp32)."""
    md = matmul_dtype
    head = lm_head_w.to(md)
    log_draft = torch.log_softmax(softcap((hidden.to(md) @ head.T).float(), cap), dim=-1)
    with torch.no_grad():
        target = torch.softmax(softcap((target_hidden.to(md) @ head.T).float(), cap), dim=-1)
    return -(target * log_draft).sum(-1), (log_draft.exp() - target).abs().sum(-1)


def eagle3_rows(loss_mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Per training-time-test step k, the rows t that DeepSpec's compute_eagle3_loss counts.

    Its position mask is loss_mask with the sequence's last token zeroed (that position has no
    next-token target inside the sequence), shifted left once per step: row t counts at step k
    when loss_mask[t + k] is set and t + k <= S - 2. Row t at step k reads the target features of
    t and token t + 1 + k and predicts token t + 2 + k, whose soft target is the target's
    distribution at position t + 1 + k (token S, past the sequence, for t + k = S - 2).
    loss_mask [S] -> `steps` index tensors.
    """
    seq = loss_mask.numel()
    out = []
    for k in range(steps):
        rows = torch.arange(max(seq - 1 - k, 0))
        out.append(rows[loss_mask[rows + k].bool()])
    return out


def eagle3_loss(
    step_hidden: list[torch.Tensor], final_hidden: torch.Tensor, loss_mask: torch.Tensor, lm_head_w: torch.Tensor,
    lw: LossWeights, chunk_rows: int = 128, cap: float | None = None, matmul_dtype: torch.dtype = torch.float32,
    recompute: bool = True, max_rows: int = 0, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eagle3's training-time-test loss, as DeepSpec's compute_eagle3_loss: the rows of
    `eagle3_rows`, soft cross-entropy against the target's distribution at t + 1 + k, each step's
    sum divided by the sequence length S (DeepSpec's "local_mean": B*S positions, masked ones
    included, so every sequence weighs the same whatever its length), steps weighted decay^k.

    step_hidden: K tensors [S, H] (final-normed); final_hidden [S, H]; loss_mask [S].
    matmul_dtype: precision of the vocabulary-sized products; recompute: keep one chunk of logits
    and recompute it in the backward pass. max_rows > 0 supervises at most that many of each step's
    rows, drawn uniformly with `generator`, their sum scaled by counted / drawn so the loss stays an
    unbiased estimate of DeepSpec's (an equal-budget setting: as many supervised slots as DSpark's
    anchors; 0, the default, counts every row as DeepSpec does).
    Returns the loss and, per step, the analytic acceptance 1 - L1/2 of the supervised rows (detached).
    """
    seq = final_hidden.shape[0]
    total = torch.zeros(())
    accepts = []
    for k, (hidden, rows) in enumerate(zip(step_hidden, eagle3_rows(loss_mask, len(step_hidden)))):
        if rows.numel() == 0:
            accepts.append(torch.empty(0))
            continue
        scale = 1.0
        if 0 < max_rows < rows.numel():
            scale = rows.numel() / max_rows
            rows = rows[torch.randperm(rows.numel(), generator=generator)[:max_rows].sort().values]
        ces, l1s = [], []
        for start in range(0, rows.numel(), chunk_rows):
            r = rows[start : start + chunk_rows]
            args = (hidden[r], final_hidden[r + 1 + k], lm_head_w, cap, matmul_dtype)
            if recompute and torch.is_grad_enabled():
                ce, l1 = checkpoint(_soft_terms, *args, use_reentrant=False)
            else:
                ce, l1 = _soft_terms(*args)
            ces.append(ce)
            l1s.append(l1)
        total = total + lw.ttt_decay**k * scale * torch.cat(ces).sum() / seq
        accepts.append((1 - 0.5 * torch.cat(l1s).detach()).clamp(0, 1))
    return total, accepts
