"""Position-indexed KV cache with request slots.

Keys and values of slot s live at [s, :, position, :] of a preallocated buffer per layer, so a
token's K/V are written where its position says and rolling back a rejected draft is setting the
slot's length: nothing is copied or freed. Slots are filled and freed between rounds, which is what
continuous batching needs.
"""

from __future__ import annotations

import torch

from dspark.errors import DSparkError


class KVCache:
    """K/V buffers [S, Hkv, T, D] per layer for S slots of capacity T positions each."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], max_seq_len: int):
        self.keys = keys
        self.values = values
        self.max_seq_len = max_seq_len  # usable context; the buffer has headroom past it
        self.lengths = [0] * keys[0].shape[0]  # committed positions per slot
        self.in_use = [False] * keys[0].shape[0]

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def allocate(self) -> int:
        for slot, used in enumerate(self.in_use):
            if not used:
                self.in_use[slot] = True
                self.lengths[slot] = 0
                return slot
        raise DSparkError(f"all {self.num_slots} cache slots are in use; raise max_batch_size")

    def free(self, slot: int) -> None:
        self.in_use[slot] = False
        self.lengths[slot] = 0

    def set_length(self, slot: int, length: int) -> None:
        """Roll back (or forward over already written positions): positions >= length are dead."""
        assert 0 <= length <= self.capacity, (slot, length)
        self.lengths[slot] = length


def build_kv_cache(
    num_layers: int,
    num_slots: int,
    max_seq_len: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    headroom: int = 16,
) -> KVCache:
    """Allocate a cache. `headroom` extra positions absorb padded rows of a ragged forward."""
    shape = (num_slots, num_kv_heads, max_seq_len + headroom, head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    return KVCache(keys, values, max_seq_len)


def real_token_index(num_new: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Flat [B * N] indices of the first num_new[b] of each row's N tokens; None when no row is short."""
    if num_new is None or int(num_new.min()) >= n:
        return None
    real = torch.arange(n, device=num_new.device)[None, :] < num_new[:, None]
    return real.flatten().nonzero().squeeze(1)


def write_rows(buffer: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, new: torch.Tensor,
               num_new: torch.Tensor | None = None) -> None:
    """buffer[slots[b], :, positions[b, i]] = new[b, i] for i < num_new[b] (every i when None).

    buffer [S, H, T, D]; slots [B]; positions [B, N]; new [B, N, H, D]. Padding past a row's own
    tokens is never written: in a ragged batch a short row with a long context would otherwise
    write past the buffer (a request that joins with its whole prompt next to one deep in its
    answer, or one whose drafting was skipped for many rounds).
    """
    index = real_token_index(None if num_new is None else num_new.to(positions.device), positions.shape[1])
    if index is None:
        buffer[slots[:, None], :, positions] = new
        return
    flat_slots = slots[:, None].expand_as(positions).reshape(-1)[index]
    buffer[flat_slots, :, positions.reshape(-1)[index]] = new.reshape(-1, *new.shape[2:])[index]
