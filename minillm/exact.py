"""Exact mode: a prefix-cache hit computes bit for bit what a cold run computes.

Why the fast mode is only close: a CPU matrix multiply picks its blocking (and so the order in which it adds
up each dot product) from the shapes of its operands. Row i of X W^T (F.linear, or prepack.py's oneDNN
product) therefore changes in its last bits with the number of rows of X: prefilling a whole prompt and
prefilling only its uncached suffix do not produce the same bits. Elementwise kernels have the same trait
(a vectorised body and a scalar tail). What does hold: the same operation on the same shapes gives the
same bits, and with a fixed number of rows a row's result does not depend on where it sits in the block or
on the other rows.

So exact mode makes every shape a function of absolute position alone:
  * prefill runs in chunks of C tokens aligned to absolute positions (chunk k = positions kC..kC+C-1);
    the last chunk is padded to C rows with token 0, and the padding's results are dropped;
  * chunk k always attends over the same kC+C key slots, causally masked; padding keys sit only where the
    mask already hides them;
  * the prefix cache is reused only in whole chunks (a match is rounded down to a multiple of C), so a
    warm run recomputes exactly the chunks a cold run computes, on identical inputs;
  * only prompt KV goes into the cache: decode steps run one row at a time, other shapes than prefill,
    so their KV is not what a prefill of the same tokens would give.
By induction over chunks, a cached chunk's KV equals what the cold run computes for it (its rows met the
same operations on the same shapes), hence the first token's logits, and with them every decode step
(identical KV, identical one-row shapes), are bitwise equal with the cache on or off.

It does not cover: logits from LLM.logits() (one unchunked forward), other thread counts, devices or
torch builds (bits are equal within one setup, not across setups), dynamic NTK RoPE (never cached).
Cost: up to C-1 padding rows per prompt, and attention over whole chunks.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .model import CausalLM

DEFAULT_CHUNK = 64


def chunked_prefill(model: CausalLM, ids: list[int], kv: KVCache, chunk: int) -> torch.Tensor:
    """Prefill ids[kv.length:] chunk by chunk (kv.length must be a multiple of chunk); return the logits
    [1, vocab] of the last prompt token."""
    assert kv.length % chunk == 0, "exact prefill must start on a chunk boundary"
    device = kv.keys.device
    logits = None
    for start in range(kv.length, len(ids), chunk):
        real = ids[start : start + chunk]
        tokens = torch.tensor(real + [0] * (chunk - len(real)), device=device)  # [chunk], padded with 0
        logits = model(tokens, kv, logit_rows=slice(len(real) - 1, len(real)))
        kv.truncate(start + len(real))  # forget the padding's KV (its slots get overwritten)
    return logits
