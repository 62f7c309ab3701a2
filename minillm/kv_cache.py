"""The KV cache of one sequence: every layer's keys and values, kept so each new token is computed once.

Attention for token t needs the keys and values of tokens 0..t. They never change once computed, so prefill
computes them for the whole prompt in one pass, and each decode step appends one more token's worth
instead of recomputing the sequence: O(n) work per token instead of O(n^2).

Layout: two preallocated buffers, keys and values, each [layers, kv_heads, capacity, head_dim]. Slot i holds
the token at absolute position i; slots [0, length) are filled. Appending writes into the buffer in place
(no torch.cat per step), and each layer's attention reads the view [:, :length] of its slice.
With grouped-query attention only kv_heads (not all query heads) are stored: the saving GQA exists for.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # [layers, kv_heads, capacity, head_dim]
        self.values = torch.empty(shape, dtype=dtype, device=device)  # [layers, kv_heads, capacity, head_dim]
        self.length = 0  # tokens stored (the next token's position)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` tokens, copying what is stored into larger buffers if needed."""
        if capacity <= self.capacity:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values [kv_heads, T, head_dim] after the `length` tokens already cached;
        return all of that layer's keys and values so far, [kv_heads, length + T, head_dim].
        `length` itself moves on only in `advance`, once every layer has written."""
        end = self.length + keys.shape[1]
        self.keys[layer, :, self.length : end] = keys
        self.values[layer, :, self.length : end] = values
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (their slots will be overwritten)."""
        self.length = min(self.length, length)

    def bytes_per_token(self) -> int:
        """2 (keys and values) x layers x kv_heads x head_dim x bytes per element."""
        layers, kv_heads, _, head_dim = self.keys.shape
        return 2 * layers * kv_heads * head_dim * self.keys.element_size()
