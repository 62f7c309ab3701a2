"""One forward pass over the rows of many sequences, with their KV in the shared pool.

A step of the engine feeds, side by side, a prefill chunk of one request, a decode token of each of several
others, and so on. The model's matrix products take all rows at once (the weights are read once for all of
them: that is where batching's throughput comes from); attention is the one place where rows must stay
with their own sequence:

    rows:      [ a a a a | b | c | d ]       request a: 4 prompt tokens; b, c, d: one decode token each
    write:     each row's new keys/values -> its slot in the pool
    attend:    for each sequence, gather its slots (cached prefix from the tree + its own) and attend
               its query rows over them, causally

Gathering copies a sequence's keys and values into one contiguous block per layer (index_select), the shape
the attention kernels read; the pool itself is never copied. A cache hit therefore costs no copy at all
beyond what every step gathers anyway. When a sequence's slots happen to be one ascending run (a lone
request on a fresh pool gets consecutive slots), attention reads a view of the pool instead and the gather
is skipped: `views=False` turns this off for exact mode, whose bits must not depend on where slots lie.

Decode rows (one new token of a sequence, or a few: a verified draft's) skip the gather altogether where the
compiled kernels run: kernels/compiled.decode_attention reads each row's keys and values slot by slot where
they lie in the pool. Gathering copied every sequence's whole past on every step and layer; with 8 sequences
of 1,100 tokens that copy and the attention after it took 124 ms of a step (24 layers) against the kernel's
21 (tools/bench_attention.py, bench/attention_fp32.json).
Exact mode keeps the gather and scaled_dot_product_attention, the path its proofs were made on.
"""

from __future__ import annotations

import torch

from ..cache.kv_pool import KVPool
from ..kernels import compiled
from ..model.model import CausalLM, attend, attention_mask
from .plan import Segment

# Segments of at most this many rows (decode rows, a verified draft's rows) attend in the pool, each row over
# its own slots (compiled.decode_attention); longer ones (prefill chunks) gather and use SDPA.
IN_POOL_ROWS = 16


class ForwardBatch:
    """The `kv` argument of CausalLM.forward for pooled, batched attention."""

    def __init__(self, pool: KVPool, segments: list[Segment], device: torch.device | str, views: bool):
        self.pool, self.segments = pool, segments
        bounds, row = [], 0
        for s in segments:
            bounds.append((row, row + len(s.tokens)))
            row += len(s.tokens)
        self.bounds = bounds  # [(first row, end row)] of each segment
        self.write_slots = torch.cat([s.slots[s.start :] for s in segments]).to(device)  # [N]
        self.write_run = _run_of(self.write_slots)  # consecutive slots (a lone request): a plain copy, no scatter
        self.positions = torch.cat([torch.arange(s.start, s.start + len(s.tokens)) for s in segments]).to(device)
        self.lengths = torch.cat([torch.full((len(s.tokens),), s.start + len(s.tokens)) for s in segments]).to(device)
        self.tokens = torch.tensor([t for s in segments for t in s.tokens], device=device)  # [N]
        self.logit_rows = torch.tensor(
            [first + r for s, (first, _) in zip(segments, bounds) for r in s.logit_rows],
            dtype=torch.int64,
            device=device,
        )  # [R]
        self.gather = [s.slots.to(device) for s in segments]
        self.runs = [_run_of(s.slots) if views else None for s in segments]  # (first slot, count) or None
        self._masks: dict[tuple[int, int | None], tuple[torch.Tensor | None, bool]] = {}
        # decode rows attend in the pool, all in one kernel call (exact mode: views=False keeps the gather)
        in_pool = views and pool.keys.device.type == "cpu" and pool.keys.dtype in (torch.float32, torch.bfloat16)
        in_pool = in_pool and pool.keys.shape[-1] % 8 == 0 and compiled.available()
        short = [i for i, s in enumerate(segments) if len(s.tokens) <= IN_POOL_ROWS] if in_pool else []
        self.decode = short  # segment indices whose rows attend in the pool
        self.decode_rows = torch.tensor([r for i in short for r in range(*bounds[i])], dtype=torch.int64)  # [D]
        self.gathered = [i for i in range(len(segments)) if i not in self.decode]  # the others: gather + SDPA
        self.all_decode = not self.gathered
        self._decode_slots: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}

    def _slots_in_window(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots each in-pool row attends over, one row's after another, and where each row's begin
        ([D + 1]): its sequence's slots up to its own position (causal), or their last `window` (the keys a
        sliding window lets it see)."""
        if window not in self._decode_slots:
            parts = []
            for i in self.decode:
                s = self.segments[i]
                for end in range(s.start + 1, s.start + len(s.tokens) + 1):
                    parts.append(self.gather[i][:end] if window is None else self.gather[i][max(end - window, 0) : end])
            starts = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)
            self._decode_slots[window] = (torch.cat(parts), starts)
        return self._decode_slots[window]

    def _mask(self, i: int, window: int | None):
        key = (i, window)
        if key not in self._masks:  # once per sequence and window, not per layer
            s = self.segments[i]
            self._masks[key] = attention_mask(s.start, len(s.tokens), window, self.write_slots.device)
        return self._masks[key]

    def attend(
        self, layer: int, window: int | None, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """q: [heads, N, head_dim]; keys, values: [kv_heads, N, head_dim] of the N rows. Stores the keys and
        values in the rows' slots, then attends each sequence's rows over its own slots: [N, heads * head_dim]."""
        pool_keys, pool_values = self.pool.keys[layer], self.pool.values[layer]  # [kv_heads, slots, head_dim]
        if self.write_run is not None:
            pool_keys.narrow(1, *self.write_run).copy_(keys)
            pool_values.narrow(1, *self.write_run).copy_(values)
        else:
            pool_keys.index_copy_(1, self.write_slots, keys)
            pool_values.index_copy_(1, self.write_slots, values)
        out = None  # [N, heads * head_dim] when decode rows and others are mixed
        if self.decode:
            slots, starts = self._slots_in_window(window)
            queries = q if self.all_decode else q.index_select(1, self.decode_rows)  # [heads, D, head_dim]
            decoded = compiled.decode_attention(queries, pool_keys, pool_values, slots, starts)  # [D, heads * hd]
            if self.all_decode:
                return decoded
            out = q.new_empty(q.shape[1], q.shape[0] * q.shape[2])
            out[self.decode_rows] = decoded
        outs = []
        for i in self.gathered:
            first, end = self.bounds[i]
            if self.runs[i] is not None:
                seq_keys = pool_keys.narrow(1, *self.runs[i])  # [kv_heads, start + T, head_dim], a view
                seq_values = pool_values.narrow(1, *self.runs[i])
            else:
                seq_keys = pool_keys.index_select(1, self.gather[i])  # [kv_heads, start + T, head_dim], a copy
                seq_values = pool_values.index_select(1, self.gather[i])
            rows = attend(q[:, first:end], seq_keys, seq_values, *self._mask(i, window))
            if out is None:
                outs.append(rows)
            else:
                out[first:end] = rows
        if out is not None:
            return out
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def _run_of(slots: torch.Tensor) -> tuple[int, int] | None:
    """(first, count) if slots are first, first + 1, ..., first + count - 1; else None."""
    first, count = int(slots[0]), slots.shape[0]
    if int(slots[-1]) - first == count - 1 and torch.equal(slots, torch.arange(first, first + count)):
        return first, count
    return None


def run(model: CausalLM, pool: KVPool, segments: list[Segment], views: bool) -> torch.Tensor:
    """One forward over the segments' rows; logits [R, vocab] (float32) of the rows that asked for them, in
    segment order."""
    batch = ForwardBatch(pool, segments, pool.keys.device, views)
    return model(batch.tokens, batch.positions, batch, logit_rows=batch.logit_rows).float()
