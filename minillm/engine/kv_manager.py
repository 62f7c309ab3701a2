"""The KV manager: where each request's KV lives, in the pool, the radix tree and the disk tier below it.

The scheduler decides who runs and how much (scheduler.py); this file keeps the books its decisions need:

    prefetch(r)         continue r's prompt lookup on disk, past what the tree holds, into the pool and tree
    admit(r, headroom)  match r's tokens in the tree, lock the match, allocate slots for the rest
    reserve(r, n)       slots for r's next decode positions
    reserve_free(r, n)  slots for a draft's positions, from free slots only; trim(r) frees the rejected ones
    ensure_free(n)      evict unlocked cached prefixes, least recently used first (to disk, with a tier)
    cache_prompt(r)     r's prompt KV is complete: into the tree now, so requests arriving while r decodes
                        reuse it
    release(r)          r leaves the batch: the KV worth keeping goes to the tree, the rest is freed
    check(running, waiting)  the ownership invariant, below

A request's own bookkeeping (request.py): positions [0, num_cached) are tree slots locked through r.node,
[num_cached, num_allocated) slots r owns. Ownership of every KV slot: free, held by the tree, or owned by
exactly one running request; nothing leaks and nothing has two owners (check, run after every step by the
tests).
"""

from __future__ import annotations

import torch

from ..cache.disk_cache import DiskCache
from ..cache.kv_pool import KVPool
from ..cache.radix_cache import RadixCache
from .request import Request


class KVManager:
    def __init__(self, pool: KVPool, *, prefix_cache: bool, align: int, cache_decode_kv: bool, disk: DiskCache | None):
        """prefix_cache: False computes every prompt whole. align: cache hits end on multiples of this (exact
        mode's chunk size). cache_decode_kv: decode-step KV may go into the tree (not in exact mode, where only
        prefill-shaped KV is reusable bit for bit). disk: the disk tier under the tree (disk_cache.py)."""
        self.pool = pool
        self.tree = RadixCache()
        self.prefix_cache, self.align, self.cache_decode_kv = prefix_cache, align, cache_decode_kv
        self.disk = disk

    def caches(self, r: Request) -> bool:
        """Whether r's KV is looked up in and handed to the prefix cache."""
        return self.prefix_cache and r.use_prefix_cache

    def cached_length(self, tokens: list[int]) -> int:
        """How many leading tokens the tree holds now."""
        return self.tree.match_length(tokens)

    def _reusable_limit(self, r: Request) -> int | None:
        """How far r may reuse cached KV: all but its last token, or, in exact mode, which reuses
        prefill-shaped KV only, at most its prompt (a resumed request recomputes its generated tokens)."""
        return None if self.cache_decode_kv else min(r.num_tokens - 1, len(r.prompt))

    # -- making room ----------------------------------------------------------------------------------

    def ensure_free(self, n: int) -> bool:
        """Make n slots free, evicting unlocked cached prefixes if needed; False if even that is not enough."""
        short = n - self.pool.free_slots
        if short > 0 and short <= self.tree.evictable_tokens:
            self.pool.free(self.tree.evict(short, self._spill if self.disk else None))
        return self.pool.free_slots >= n

    def _spill(self, leaf) -> None:
        """An evicted leaf's KV goes to disk (the pages that reach into the leaf; its ancestors' own pages
        go when they are evicted in turn, or at spill_all)."""
        tokens, slots = self.tree.path(leaf)
        self.disk.write(list(tokens), slots, self.pool, from_token=len(tokens) - len(leaf.tokens))

    def spill_all(self) -> None:
        """Write everything the tree holds to disk (at the end of the process)."""
        if self.disk:
            for tokens, slots in self.tree.sequences():
                self.disk.write(list(tokens), slots, self.pool)

    # -- a request joins ------------------------------------------------------------------------------

    def prefetch(self, r: Request) -> None:
        """Continue r's lookup on disk past what the tree holds and put the pages found into the pool and the
        tree, where admit's match finds them."""
        if not (self.disk and self.caches(r)):
            return
        limit = self._reusable_limit(r)
        limit = r.num_tokens - 1 if limit is None else limit
        page = self.disk.page
        match = self.tree.match_prefix(r.tokens, limit=limit, count=False)
        first = match.length // page  # the page in which the tree's match ends
        layers, kv_heads, _, head_dim = self.pool.keys.shape
        pages = self.disk.read(r.tokens, first, limit // page, (layers, kv_heads, page, head_dim), self.pool.keys.dtype)
        end = (first + len(pages)) * page
        new = end - match.length  # tokens the disk adds
        if new <= 0:
            return
        self.tree.lock(match.node)  # evicting to make room must not take the prefix being extended
        if self.ensure_free(new):
            slots = self.pool.alloc(new)
            skip = match.length - first * page  # the first page's tokens the tree already has
            keys, values = (torch.cat([p[i] for p in pages], dim=2)[:, :, skip:] for i in (0, 1))
            self.pool.write(slots, keys, values)  # [layers, kv_heads, new, head_dim] each
            self.pool.free(self.tree.insert(r.tokens[:end], torch.cat((match.slots, slots))))
        self.tree.unlock(match.node)

    def admit(self, r: Request, headroom: int) -> bool:
        """Match r's cached prefix, lock it and allocate slots for the rest, keeping `headroom` slots
        obtainable for the running requests' next tokens; False (nothing changed) if r's KV does not fit."""
        m, match = 0, None
        if self.caches(r):
            match = self.tree.match_prefix(
                r.tokens, align=self.align, limit=self._reusable_limit(r), count=r.cached_tokens is None
            )
            self.tree.lock(match.node)
            m = match.length
        need = r.num_tokens - m
        if need + headroom > self.pool.free_slots + self.tree.evictable_tokens or not self.ensure_free(need):
            if match is not None:
                self.tree.unlock(match.node)
            return False
        if match is not None:
            r.node = match.node
            r.slot_table[:m] = match.slots
        r.slot_table[m : r.num_tokens] = self.pool.alloc(need)
        r.num_cached = r.num_computed = m
        r.num_allocated = r.num_tokens
        return True

    def reserve(self, r: Request, count: int) -> bool:
        """Slots for r's next `count` positions (evicting if needed); False (nothing changed) if they cannot
        all be had."""
        if not self.ensure_free(count):
            return False
        r.slot_table[r.num_allocated : r.num_allocated + count] = self.pool.alloc(count)
        r.num_allocated += count
        return True

    def reserve_free(self, r: Request, count: int) -> bool:
        """Slots for r's next `count` positions from the free slots alone (a draft's: guessing must never evict
        cached prefixes nor preempt anyone); False (nothing changed) if there are not that many."""
        return self.pool.free_slots >= count and self.reserve(r, count)

    def trim(self, r: Request) -> None:
        """Free r's slots past its last token (those of a draft's rejected tokens) at once."""
        if r.num_allocated > r.num_tokens:
            self.pool.free(r.slot_table[r.num_tokens : r.num_allocated])
            r.num_allocated = r.num_tokens

    # -- a request's KV is complete, or it leaves -----------------------------------------------------

    def cache_prompt(self, r: Request) -> None:
        """The prompt's KV is complete: hand it to the tree now, not at the end, so that requests arriving
        while this one decodes reuse it. The request then holds its prompt as a locked cached prefix."""
        r.prompt_cached = True
        if not self.caches(r):
            return
        n = len(r.prompt)
        self.pool.free(self.tree.insert(r.prompt, r.slot_table[:n]))
        match = self.tree.match_prefix(r.prompt, limit=n, count=False)
        self.tree.lock(match.node)
        if r.node is not None:
            self.tree.unlock(r.node)
        r.node, r.num_cached = match.node, n
        r.slot_table[:n] = match.slots  # a duplicate computed here was freed: point at the tree's copy

    def release(self, r: Request) -> None:
        """r's KV worth keeping goes to the tree, the rest of its slots are freed, its lock released."""
        keep = 0
        if self.caches(r):
            keep = r.num_computed if self.cache_decode_kv else min(r.num_computed, len(r.prompt))
            self.pool.free(self.tree.insert(r.tokens[:keep], r.slot_table[:keep]))
        self.pool.free(r.slot_table[keep : r.num_allocated])  # keep >= num_cached: the rest is r's own
        if r.node is not None:
            self.tree.unlock(r.node)
        r.node = None
        r.num_cached = r.num_allocated = r.num_computed = 0

    # -- checking -------------------------------------------------------------------------------------

    def check(self, running: list[Request], waiting: list[Request]) -> None:
        """Every usable slot is free, held by the tree, or owned by one running request; the tree holds; a node
        is locked exactly by the running requests whose cached prefix runs through it."""
        self.tree.check_invariants()
        owners = [("free", self.pool.free_list()), ("tree", self.tree.all_slots())]
        owners += [(f"request {r.id}", r.owned_slots().tolist()) for r in running]
        seen: dict[int, str] = {}
        for owner, slots in owners:
            for s in slots:
                assert 0 < s <= self.pool.num_slots, f"{owner} holds slot {s}, outside the pool"
                assert s not in seen, f"slot {s} is held by {seen[s]} and {owner}"
                seen[s] = owner
        assert len(seen) == self.pool.num_slots, f"{self.pool.num_slots - len(seen)} slots leaked"
        for r in running:
            assert r.num_cached <= r.num_computed <= r.num_allocated <= r.num_tokens
            if r.num_cached:
                path, node = [], r.node
                while node is not self.tree.root:
                    path.append(node.slots)
                    node = node.parent
                held = torch.cat(path[::-1])
                assert torch.equal(held[: r.num_cached], r.slot_table[: r.num_cached]), f"request {r.id}: prefix slots"
        for r in waiting:
            assert r.node is None and r.num_allocated == 0
        holders: dict[int, int] = {}  # node id -> running requests whose locked path runs through it
        for r in running:
            node = r.node
            while node is not None and node is not self.tree.root:
                holders[id(node)] = holders.get(id(node), 0) + 1
                node = node.parent
        for node in self.tree.nodes():
            assert node.lock_ref == holders.get(id(node), 0), f"{node}: {holders.get(id(node), 0)} running holders"
