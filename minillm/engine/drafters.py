"""Drafters: cheap guesses of the tokens a request will generate next, for speculation.py to verify.

A drafter only proposes; the model decides (Request.accept takes a draft's tokens only while they are the
ones the model picks), so a bad guess costs the extra rows of one forward and never changes the output.

    propose(wanted)   wanted: [(request, k)] -> a draft of at most k tokens for each (maybe empty)
    forget(request)   the request left the batch: drop what the drafter keeps for it

    PromptLookup  the request's last n tokens (n = 4, 3, 2: longest first) found earlier in its own prompt or
                  output propose what followed them there: answers that quote their document, code edits
                  that copy their input, chats that repeat an earlier turn
    TreeLookup    the same n-grams looked up in the prefix cache's radix tree, over every prompt and finished
                  output it holds: a document another request quoted, an answer given to the same question
                  before; the request's own tokens when the tree has nothing
    DraftModel    a smaller (or quantized) model with the same tokenizer proposes greedily, k forwards of
                  every drafting request at once, with its own KV pool
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ..cache.kv_pool import KVPool
from ..cache.radix_cache import Node, RadixCache
from ..model.model import CausalLM
from . import forward_batch
from .plan import Segment

if TYPE_CHECKING:
    from .request import Request

NGRAM_SIZES = (4, 3, 2)  # lookups try the longest n-gram first: the longer the match, the likelier the guess


class Drafter(Protocol):
    prompt_s: float  # of the last propose, seconds spent prefilling new requests' prompts (a draft model's)

    def propose(self, wanted: list[tuple[Request, int]]) -> list[list[int]]: ...

    def forget(self, request: Request) -> None: ...


def ngrams_ending(tokens: tuple[int, ...] | list[int], end: int):
    """The n-grams (n in NGRAM_SIZES) that end just before position `end` of tokens."""
    for n in NGRAM_SIZES:
        if end >= n:
            yield tuple(tokens[end - n : end])


@dataclass
class _OwnNgrams:
    """One request's index: each n-gram of its tokens -> the position right after its latest occurrence."""

    after: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # positions [0, indexed) have had the n-grams ending there recorded


class PromptLookup:
    """Lookup in the request's own tokens, through an index per request extended as the request grows (each
    position is indexed once)."""

    prompt_s = 0.0  # no model: nothing to prefill

    def __init__(self):
        self.indexes: dict[int, _OwnNgrams] = {}  # request id -> its index

    def propose(self, wanted: list[tuple[Request, int]]) -> list[list[int]]:
        return [self.lookup(r, k) for r, k in wanted]

    def lookup(self, r: Request, k: int) -> list[int]:
        tokens = r.tokens
        own = self.indexes.setdefault(r.id, _OwnNgrams())
        for end in range(own.indexed, len(tokens)):  # not the current end: the suffix would find itself
            for gram in ngrams_ending(tokens, end):
                own.after[gram] = end
        own.indexed = len(tokens)
        for gram in ngrams_ending(tokens, len(tokens)):
            if gram in own.after:
                return tokens[own.after[gram] : own.after[gram] + k]
        return []

    def forget(self, request: Request) -> None:
        self.indexes.pop(request.id, None)


class TreeLookup:
    """Lookup in the radix tree. The tree tells this index of every leaf it creates (RadixCache.on_new_leaf);
    each n-gram maps to the node holding its last token and the depth (position from the root) after it.
    Splits keep depths and move a node's head into a new parent, so a continuation is found by walking up from
    the node recorded; an evicted node (parent None) makes its entries stale, and they are dropped when met."""

    prompt_s = 0.0

    def __init__(self, tree: RadixCache):
        self.tree = tree
        self.after: dict[tuple[int, ...], tuple[Node, int]] = {}
        self.own = PromptLookup()
        tree.on_new_leaf = self.index  # made with the engine, so the tree is empty: every leaf comes through here

    def index(self, tokens: tuple[int, ...], first: int, leaf: Node) -> None:
        """The tree made `leaf` for tokens[first:] of the sequence `tokens`."""
        for end in range(max(first, 1), len(tokens) + 1):
            for gram in ngrams_ending(tokens, end):
                self.after[gram] = (leaf, end)
        if len(self.after) > 8 * len(NGRAM_SIZES) * (self.tree.total_tokens + 1024):
            self.after = {g: (n, d) for g, (n, d) in self.after.items() if self._start(n) is not None}

    def _start(self, node: Node) -> int | None:
        """node's depth (tokens from the root to its edge); None if it is no longer in the tree."""
        start = 0
        while node is not self.tree.root:
            if node.parent is None:
                return None
            node = node.parent
            start += len(node.tokens)
        return start

    def continuation(self, node: Node, depth: int, k: int) -> list[int] | None:
        """Up to k tokens the tree holds from `depth` on, along the path through node (then through the most
        recently used children); None if node was evicted."""
        start = self._start(node)
        if start is None:
            return None
        while depth < start:
            node = node.parent
            start -= len(node.tokens)
        out, offset = [], depth - start
        while len(out) < k:
            if offset < len(node.tokens):
                out.extend(node.tokens[offset : offset + k - len(out)])
                offset = len(node.tokens)
            elif node.children:
                node, offset = max(node.children.values(), key=lambda c: c.last_access), 0
            else:
                break
        return out

    def propose(self, wanted: list[tuple[Request, int]]) -> list[list[int]]:
        return [self.lookup(r, k) for r, k in wanted]

    def lookup(self, r: Request, k: int) -> list[int]:
        tokens = r.tokens
        for gram in ngrams_ending(tokens, len(tokens)):
            entry = self.after.get(gram)
            if entry is not None:
                draft = self.continuation(*entry, k)
                if draft is None:
                    del self.after[gram]
                elif draft:
                    return draft
        return self.own.lookup(r, k)

    def forget(self, request: Request) -> None:
        self.own.forget(request)


class _DraftKV:
    """One request's KV in the draft model's pool: the tokens fed so far and the slot of each."""

    def __init__(self, capacity: int):
        self.tokens: list[int] = []
        self.slots = torch.zeros(capacity, dtype=torch.int64)
        self.allocated = 0


class DraftModel:
    """A draft model proposes greedily. Per step, every drafting request first feeds what its draft KV lacks
    (the whole prompt the first time; after a rejection, from the first token that differs), then one token
    at a time; all requests side by side in each forward (forward_batch.run, on a pool of the draft's own)."""

    def __init__(self, model: CausalLM, num_slots: int, dtype: torch.dtype, device: str):
        """num_slots: usable slots of its KV pool (build.py gives it as many as the model's pool)."""
        self.model = model
        self.pool = KVPool(model.rank_config, num_slots + 1, dtype, device, poison_freed=False)
        self.kv: dict[int, _DraftKV] = {}  # request id -> its KV here
        self.prompt_s = 0.0  # of the last propose, the time spent feeding new requests' prompts (a prefill)

    def forget(self, request: Request) -> None:
        state = self.kv.pop(request.id, None)
        if state is not None and state.allocated:
            self.pool.free(state.slots[: state.allocated])

    def _room(self, r: Request, state: _DraftKV, positions: int) -> bool:
        """Slots for the first `positions` positions of r in the draft pool (False if the pool is short)."""
        need = positions - state.allocated
        if need > 0:
            if need > self.pool.free_slots:
                return False
            state.slots[state.allocated : positions] = self.pool.alloc(need)
            state.allocated = positions
        return True

    @torch.inference_mode()
    def propose(self, wanted: list[tuple[Request, int]]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in wanted]
        live = []  # (index in wanted, request, state, k)
        for i, (r, k) in enumerate(wanted):
            state = self.kv.setdefault(r.id, _DraftKV(len(r.prompt) + r.max_new_tokens + 1))
            tokens = r.tokens
            keep = 0  # draft KV still valid: the common prefix of what was fed and the request's tokens
            while keep < min(len(state.tokens), len(tokens) - 1) and state.tokens[keep] == tokens[keep]:
                keep += 1
            state.tokens = tokens[:keep]
            if k > 0 and self._room(r, state, len(tokens) + k - 1):
                live.append((i, r, state, k))
        feed = {i: r.tokens[len(state.tokens) :] for i, r, state, _ in live}  # first forward: the catch-up
        new_prompts = any(not state.tokens for _, _, state, _ in live)
        self.prompt_s = 0.0
        for step in range(max((k for *_, k in live), default=0)):
            began = time.perf_counter()
            live = [entry for entry in live if len(drafts[entry[0]]) < entry[3]]
            if not live:
                break
            segments = []
            for i, _, state, _ in live:
                start = len(state.tokens)
                state.tokens = state.tokens + feed[i]
                rows = len(feed[i])
                segments.append(Segment(feed[i], start, state.slots[: start + rows], range(rows - 1, rows)))
            logits = forward_batch.run(self.model, self.pool, segments, views=True)
            for (i, *_), row in zip(live, logits.argmax(dim=-1).tolist()):
                drafts[i].append(row)
                feed[i] = [row]
            if step == 0 and new_prompts:
                self.prompt_s = time.perf_counter() - began
        return drafts
