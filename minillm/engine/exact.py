"""Exact mode: a request's logits are bit for bit the same with the prefix cache on or off, and whether it runs
alone or batched with any other requests, in any order.

Why the fast mode is only close: a CPU matrix multiply picks its blocking (and so the order in which it adds
up each dot product) from the shapes of its operands. Row i of X W^T (F.linear, or prepack.py's oneDNN
product) therefore changes in its last bits with the number of rows of X: prefilling a whole prompt and
prefilling only its uncached suffix do not produce the same bits, nor does a decode row computed alone and
among 15 others. Elementwise kernels have the same trait (a vectorised body and a scalar tail). What does
hold: the same operation on the same shapes gives the same bits, and with a fixed number of rows a row's
result does not depend on where it sits in the block or on the other rows.

So exact mode makes every shape a function of absolute position alone, never of the batch:
  * every forward is a fixed-shape tile: one prefill chunk of C rows, or D decode rows (of up to D requests);
    a step with more work runs several tiles, and short tiles are padded (token 0 at position 0, writing to
    the pool's dump slot), the padding's results dropped;
  * prefill chunks are aligned to absolute positions (chunk k = positions kC..kC+C-1), and chunk k always
    attends over the same kC+C key positions, causally masked; padding keys sit only where the mask hides them;
  * the prefix cache is reused only in whole chunks (a match is rounded down to a multiple of C), so a
    warm run recomputes exactly the chunks a cold run computes, on identical inputs;
  * only prompt KV goes into the cache: decode rows run other shapes than prefill, so their KV is not what
    a prefill of the same tokens would give (a preempted request recomputes its output tokens as decode rows);
  * several positions of one request computed in one step (tokens a constraint forced, a replay) are
    several decode rows, each as it would be in a step of its own: a row attends over the KV its
    predecessors wrote earlier in the same forward, layer by layer, with the shapes of a lone decode row.
By induction over chunks and steps, every KV a request reads is bitwise what a lone cold run computes, hence
so are its logits and its (greedy or seeded) tokens.

It does not cover: logits from LLM.logits() (one unchunked forward), other thread counts, devices or
torch builds (bits are equal within one setup, not across setups), dynamic NTK RoPE (never cached).
Cost: up to C-1 padding rows per prompt, attention over whole chunks, padded decode tiles, and one forward
(one read of the weights) per D decode rows instead of one per step.
"""

from __future__ import annotations

import torch

from ..cache.kv_pool import DUMP_SLOT
from .plan import Segment, Work, segment

DEFAULT_CHUNK = 64  # prefill rows per tile
DEFAULT_DECODE_ROWS = 8  # decode rows per tile

# A decode row that computes nothing anyone reads. Decode tiles ask for the logits of every row, padding
# included: the output projection's row count must not depend on how many rows sample.
_PAD_ROW = Segment([0], 0, torch.tensor([DUMP_SLOT]), logit_rows=range(1))


def tiles(works: list[Work], chunk: int, decode_rows: int) -> list[list[tuple[Segment, Work | None]]]:
    """Split a step's work into fixed-shape forwards: each prefill chunk alone (padded to `chunk` rows, the
    logits of its last real row if it samples), decode rows in groups of `decode_rows` (padded with rows that
    compute nothing, logits of every row). Each segment comes with the work whose token(s) its logits choose
    (None when they choose nothing). A verified draft's rows are decode rows like any other, so each of its
    logits is bitwise what a lone decode step at that position computes."""
    out, decode = [], []
    for w in works:
        if w.start >= len(w.request.prompt):  # decode rows: one per position, each as a lone decode step
            for p in range(w.start, w.start + w.rows):
                chooses = w.sample and p >= w.start + w.length - 1  # the last known token's row, or a draft's
                decode.append((segment(w, p, 1, logits=True), w if chooses else None))
            continue
        assert w.start % chunk == 0, "exact prefill must start on a chunk boundary"
        for start in range(w.start, w.start + w.length, chunk):
            n = min(chunk, w.start + w.length - start)
            last = start + n == w.start + w.length
            out.append([(segment(w, start, n, chunk, logits=w.sample and last), w if w.sample and last else None)])
    for i in range(0, len(decode), decode_rows):
        group = decode[i : i + decode_rows]
        out.append(group + [(_PAD_ROW, None)] * (decode_rows - len(group)))
    return out
