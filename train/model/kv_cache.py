"""Decoding's memory: the keys and values of every layer for rows decoded together
(`GPT.prefill` fills it through the training attention backends, `GPT.decode` appends one token
per row). Local layers keep a ring of `window_size` slots, so their memory does not grow with
the generated length."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.config.model import ModelConfig
from train.model.attention import visible


class KVCache:
    """Keys and values of every layer for rows decoded together.

    Rows are independent: row b holds `positions[b]` tokens at sequence indices
    0 .. positions[b] - 1, so prompts of different lengths need no padding mask. A layer keeps
    its keys in `slots` places, the key of index p in slot p % slots:

        global, strided   slots = capacity: every index the rows will reach (a strided query
                          sees keys at every multiple of the stride back to the start)
        local             slots = min(window, capacity): a ring. Writing index p overwrites
                          index p - window, the first key the query at p cannot see, so the
                          memory does not grow with the generated length and a decoding step
                          reads `window` keys.

    `index[slots]` (B, slots) holds the sequence index stored in each slot (-1: empty); which
    slots a query may read comes from `visible`, attention's one mask definition.
    """

    def __init__(self, config: ModelConfig, lengths: torch.Tensor, capacity: int):
        config.check_sequence_length(capacity)
        if int(lengths.min()) < 1 or int(lengths.max()) > capacity:
            raise ValueError(f"prompt lengths must be within 1..{capacity}")
        self.capacity = capacity
        self.positions = lengths.clone()  # the next index of each row
        self.rows = torch.arange(len(lengths), device=lengths.device)
        self.last_index = int(lengths.max()) - 1  # the largest index any row holds
        self.shortest = int(lengths.min())  # the fewest tokens any row holds
        self.decoding = False
        self.layers = [
            LayerCache(self, kind, config.window_size, config.sparse_stride, capacity)
            for kind in config.layer_kinds()
        ]
        self.index: dict[int, torch.Tensor] = {}
        self._masks: dict[tuple[str, int], torch.Tensor] = {}

    def fill_index(self, slots: int) -> torch.Tensor:
        """(B, slots): after the prompt, the index in each slot: the largest p < length with
        p % slots == slot, or -1."""
        if slots not in self.index:
            last = (self.positions - 1)[:, None]
            slot = torch.arange(slots, device=last.device)[None, :]
            index = last - (last - slot) % slots
            self.index[slots] = torch.where(index >= 0, index, -1)
        return self.index[slots]

    def start_decoding(self) -> None:
        self.decoding = True

    def begin_step(self) -> None:
        if self.last_index + 1 >= self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens per row and is full")
        self.last_index += 1
        self.shortest += 1
        self._masks.clear()
        self.write_slot = {}
        for slots, index in self.index.items():
            self.write_slot[slots] = slot = self.positions % slots
            index[self.rows, slot] = self.positions

    def end_step(self) -> None:
        self.positions += 1

    def used(self, slots: int) -> int:
        """Slots that can hold a key so far (all of a ring; the start of the others)."""
        return min(slots, self.last_index + 1)

    def mask(self, kind: str, slots: int, window: int, stride: int) -> torch.Tensor | None:
        """(B, 1, 1, used) True where this step's query may read the slot; None when it may
        read them all: a global or local layer whose slots are all filled in every row (what
        a slot holds is then, by construction, a key its pattern lets the query see)."""
        if kind != "strided" and self.shortest >= self.used(slots):
            return None
        key = (kind, slots)
        if key not in self._masks:
            index = self.index[slots][:, : self.used(slots)]
            allowed = visible(kind, self.positions[:, None], index, window, stride) & (index >= 0)
            self._masks[key] = allowed[:, None, None, :]
        return self._masks[key]

    def reorder(self, order: torch.Tensor) -> None:
        """Keep rows `order` (beam search): row i becomes the old row order[i]."""
        self.positions = self.positions.index_select(0, order)
        self.rows = torch.arange(len(order), device=order.device)
        self.last_index = int(self.positions.max()) - 1
        self.shortest = int(self.positions.min())
        self.index = {s: index.index_select(0, order) for s, index in self.index.items()}
        for layer in self.layers:
            layer.k = layer.k.index_select(0, order)
            layer.v = layer.v.index_select(0, order)

    def nbytes(self, kind: str) -> int:
        """Bytes of keys and values held for the layers of one kind."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers if layer.kind == kind)


class LayerCache:
    """One layer's keys and values (B, H, slots, D); the slot bookkeeping is the KVCache's."""

    def __init__(self, cache: KVCache, kind: str, window: int, stride: int, capacity: int):
        self.cache = cache
        self.kind, self.window, self.stride = kind, window, stride
        self.slots = min(window, capacity) if kind == "local" else capacity
        self.k = self.v = None

    @property
    def decoding(self) -> bool:
        return self.cache.decoding

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the prompt's keys and values (B, H, T, D), each row's up to its length."""
        B, H, _, D = k.shape
        index = self.cache.fill_index(self.slots)
        gather = index.clamp(min=0)[:, None, :, None].expand(B, H, self.slots, D)
        self.k = k.gather(2, gather)
        self.v = v.gather(2, gather)

    def attend_step(self, q, k, v, scale: float) -> torch.Tensor:
        """One new token per row: store its key and value, attend over the visible slots."""
        cache = self.cache
        slot = cache.write_slot[self.slots]
        self.k[cache.rows, :, slot] = k[:, :, 0]
        self.v[cache.rows, :, slot] = v[:, :, 0]
        n = cache.used(self.slots)
        mask = cache.mask(self.kind, self.slots, self.window, self.stride)
        return F.scaled_dot_product_attention(
            q, self.k[:, :, :n], self.v[:, :, :n], attn_mask=mask, scale=scale
        )
