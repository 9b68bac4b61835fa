"""`draft-model`: an independent small causal LM that shares the target's tokenizer.

It keeps its own position-indexed KV cache per slot. Each round it feeds the committed tokens it has
not seen yet (at least the pending one) in one forward, then drafts one token per forward,
sampling from its distribution warped exactly like the target's so the draft probabilities match
what verification assumes.
"""

from __future__ import annotations

import torch

from dspark.drafters.base import DraftRequest, Proposal, empty_proposal
from dspark.errors import DSparkError
from dspark.models.kv_cache import KVCache
from dspark.models.target import LoadedModel
from dspark.sampling import logits_to_probs, sample_rows


def check_same_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """Refuse a drafter whose token ids mean something else than the target's."""
    if draft.vocab_size != target.vocab_size:
        raise DSparkError(
            f"vocab mismatch: drafter {draft.spec!r} has vocab_size {draft.vocab_size}, "
            f"target {target.spec!r} has {target.vocab_size}; a draft model must share the target's tokenizer"
        )
    if draft.tokenizer is not None and target.tokenizer is not None:
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise DSparkError(
                f"tokenizer mismatch: drafter {draft.spec!r} and target {target.spec!r} map tokens to "
                "different ids; a draft model must share the target's tokenizer"
            )


class DraftModelDrafter:
    name = "draft-model"
    feature_layers: tuple[int, ...] = ()

    def __init__(self, draft: LoadedModel):
        self.draft = draft
        self.cache: KVCache | None = None
        self._fed_drafts: dict[int, int] = {}  # slot -> drafts written to the cache by the last propose

    def setup(self, num_slots: int, max_seq_len: int, block_size: int) -> None:
        if max_seq_len > self.draft.max_position_embeddings:
            raise DSparkError(
                f"max_seq_len {max_seq_len} exceeds the draft model's context {self.draft.max_position_embeddings}"
            )
        self.cache = self.draft.build_cache(num_slots, max_seq_len, headroom=block_size + 2)

    def begin(self, slot: int, prompt_ids: list[int], features) -> None:
        self.cache.lengths[slot] = 0  # the prompt is fed with the first proposal

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        live = [r for r in requests if r.max_tokens > 0]
        if not live:
            return [empty_proposal() for _ in requests]
        live.sort(key=lambda r: r.slot)
        cache, model = self.cache, self.draft.model
        slots = torch.tensor([r.slot for r in live])
        # 1) Catch up on committed tokens the draft cache lacks (the pending token, and any accepted
        #    drafts it never fed) in one padded forward.
        chunks = [r.token_ids[cache.lengths[r.slot] :] for r in live]
        width = max(len(c) for c in chunks)
        ids = torch.zeros(len(live), width, dtype=torch.long)
        pos = torch.zeros(len(live), width, dtype=torch.long)
        for row, (r, chunk) in enumerate(zip(live, chunks)):
            ids[row, : len(chunk)] = torch.tensor(chunk)
            pos[row] = cache.lengths[r.slot] + torch.arange(width)
        num_new = torch.tensor([len(c) for c in chunks])
        logits = model(ids, pos, slots, cache, num_new=num_new, last_only=True).logits[:, -1]
        for r in live:
            cache.lengths[r.slot] = len(r.token_ids)
        next_pos = torch.tensor([len(r.token_ids) for r in live])
        # 2) Draft left to right; rows that need fewer tokens ignore the extra ones.
        steps = max(r.max_tokens for r in live)
        tokens, probs = [], []
        for step in range(steps):
            step_probs = torch.stack([logits_to_probs(logits[row], r.params) for row, r in enumerate(live)])
            step_tokens = sample_rows(step_probs, [r.params for r in live], [r.generator for r in live])
            tokens.append(step_tokens)
            probs.append(step_probs)
            if step + 1 < steps:
                logits = model(step_tokens[:, None], (next_pos + step)[:, None], slots, cache).logits[:, -1]
        # The cache now holds drafts d_1..d_{steps-1} past each row's committed length; commit()
        # decides how many stay valid.
        by_slot = {}
        for row, r in enumerate(live):
            self._fed_drafts[r.slot] = steps - 1
            k = r.max_tokens
            by_slot[r.slot] = Proposal(
                tokens=torch.stack([t[row] for t in tokens[:k]]),
                draft_probs=torch.stack([p[row] for p in probs[:k]]),
            )
        return [by_slot.get(r.slot, empty_proposal()) for r in requests]

    def commit(self, slot: int, num_accepted: int, features) -> None:
        # The cache holds the committed tokens up to the pending one, then the drafts it fed back
        # (d_1..d_{steps-1}); the accepted ones among those stay valid. An accepted draft it never
        # fed (the last one) is fed next round with the new pending token.
        self.cache.lengths[slot] += min(num_accepted, self._fed_drafts.pop(slot, 0))

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
        self._fed_drafts.pop(slot, None)
