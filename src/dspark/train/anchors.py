"""Anchor sampling and block labels for DSpark training (DeepSpec §1.3 steps 1, 6, 8, 9).

An anchor p must be an assistant token whose next token is one too (loss_mask[p] and
loss_mask[p + 1]); N anchors are drawn without replacement, sorted, and padded with dummy blocks.
Slot k of the block at anchor p predicts token p + k + 1; only a contiguous prefix of valid labels
(inside the sequence, assistant tokens, kept block) is supervised. Slot k's previous token is the
ground-truth token p + k (teacher forcing). The target distribution for slot k is the target's
prediction at position p + k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Blocks:
    anchor_positions: torch.Tensor  # [N] long (dummy blocks: 0)
    keep: torch.Tensor  # [N] bool
    labels: torch.Tensor  # [N, K] long: token at anchor + k + 1 (clamped)
    label_mask: torch.Tensor  # [N, K] bool: supervised slots, a contiguous prefix per block
    prev_tokens: torch.Tensor  # [N, K] long: anchor token, then labels[:, :-1]
    target_positions: torch.Tensor  # [N, K] long: where the target predicts each label (anchor + k)

    @property
    def anchor_tokens(self) -> torch.Tensor:
        return self.prev_tokens[:, 0]


def sample_blocks(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, num_anchors: int, block_size: int, generator: torch.Generator
) -> Blocks:
    """input_ids/loss_mask [S] -> Blocks of N = num_anchors blocks of K = block_size slots."""
    seq = input_ids.numel()
    mask = loss_mask.bool()
    valid = torch.nonzero(mask[:-1] & mask[1:]).squeeze(-1) if seq > 1 else torch.empty(0, dtype=torch.long)
    chosen = valid[torch.randperm(valid.numel(), generator=generator)[:num_anchors]].sort().values
    count = chosen.numel()
    anchors = torch.zeros(num_anchors, dtype=torch.long)
    anchors[:count] = chosen
    keep = torch.arange(num_anchors) < count
    label_pos = anchors[:, None] + torch.arange(1, block_size + 1)  # [N, K]
    inside = label_pos < seq
    clamped = label_pos.clamp(max=seq - 1)
    labels = input_ids[clamped]
    label_mask = (inside & mask[clamped] & keep[:, None]).int().cumprod(dim=1).bool()
    prev = torch.cat([input_ids[anchors][:, None], labels[:, :-1]], dim=1)
    return Blocks(anchors, keep, labels, label_mask, prev, clamped - 1)
