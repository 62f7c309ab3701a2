"""The KV pool: one store of token slots that every running request and the prefix cache share.

Attention for token t needs the keys and values of tokens 0..t. They never change once computed, so each
token's are computed once and kept in a slot of the pool; a request keeps a slot table (position -> slot)
and attention gathers its keys through it. Slots are the unit of sharing: requests with a common prefix
point at the same slots, and the radix tree (radix_cache.py) stores slot numbers, never copies of KV.

Layout: keys and values, each [layers, kv_heads, slots, head_dim], preallocated once from a memory budget.
Gathering a request's slots along dim 2 gives its [kv_heads, length, head_dim] keys, contiguous, the shape
attention reads. With grouped-query attention only kv_heads (not all query heads) are stored.

Slot 0 is never handed out: padding rows (exact mode's fixed-size tiles) write their KV there, so a padded
row needs no special case. Ownership of every other slot: free (in the free list), held by the tree, or
owned by exactly one running request; Scheduler.check_invariants verifies it.
"""

from __future__ import annotations

import torch

from ..model.config import ModelConfig

DUMP_SLOT = 0  # where padding rows write


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """2 (keys and values) x layers x kv_heads x head_dim x bytes per element."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


class KVPool:
    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        poison_freed: bool = False,
    ):
        """num_slots: slots including the reserved slot 0. poison_freed: debug mode that fills freed slots
        with NaN, so a read of KV after it was freed shows in the output."""
        shape = (config.num_layers, config.num_kv_heads, num_slots, config.head_dim)
        # torch.empty maps the memory without touching it: pages become resident as slots are first used.
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # [layers, kv_heads, slots, head_dim]
        self.values = torch.empty(shape, dtype=dtype, device=device)  # [layers, kv_heads, slots, head_dim]
        self.poison_freed = poison_freed
        # A stack, highest slot at the bottom: a fresh pool hands out 1, 2, 3, ... in order.
        self._free: list[int] = list(range(num_slots - 1, 0, -1))

    @property
    def num_slots(self) -> int:
        """Usable slots (slot 0 excluded)."""
        return self.keys.shape[2] - 1

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def free_list(self) -> list[int]:
        return list(self._free)

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots as an int64 tensor, or None (nothing taken) if fewer than n are free."""
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return torch.tensor(taken, dtype=torch.int64)

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        if self.poison_freed:
            with torch.inference_mode():
                self.keys[:, :, slots] = float("nan")
                self.values[:, :, slots] = float("nan")
        self._free.extend(reversed(slots.tolist()))

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values in these slots: [layers, kv_heads, len(slots), head_dim] each."""
        index = slots.to(self.keys.device)
        return self.keys.index_select(2, index), self.values.index_select(2, index)

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys and values [layers, kv_heads, len(slots), head_dim] in these slots."""
        index = slots.to(self.keys.device)
        self.keys.index_copy_(2, index, keys.to(self.keys.device))
        self.values.index_copy_(2, index, values.to(self.values.device))

    def slot_bytes(self) -> int:
        """Bytes one slot takes in the buffers as allocated: measured, where kv_bytes_per_token is the
        config's expectation (`minillm verify` compares the two)."""
        return (self.keys[:, :, :1].numel() + self.values[:, :, :1].numel()) * self.keys.element_size()
