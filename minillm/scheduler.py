"""The scheduler: which requests run in the next step, and where their KV goes.

It owns the waiting queue, the running batch, the KV pool and the radix tree, and plans one step at a time:

    1. decode slots  every running request past its prompt needs one slot for the token it feeds next; when
                     the pool is short, unlocked cached prefixes are evicted (least recently used first),
                     and if that is not enough the most recently admitted request is preempted: its KV goes
                     to the tree, its slots are freed, and it waits at the front of the queue to resume.
    2. admission     waiting requests join while the batch has room (max_batch) and their KV fits (free slots
                     plus evictable cached ones, minus a slot per running request for its next token).
                     Order: longest cached prefix first ("lpm", SGLang's policy: what is in the tree now gets
                     used before it is evicted), or first come first served ("fcfs"). A request passed over
                     MAX_PASSED_OVER times goes first whatever the policy, so none starves.
    3. prefill       requests still in their prompt get chunks, at most max_prefill_tokens in all per step, so
                     a long prompt does not stall everyone's decode.
    4. decode        one row for every running request past its prompt.

The plan is a list of Work items (request, positions, whether to sample): everything the model needs is in
the requests' tokens and slot tables, so a plan can be run on any process holding the same pool layout.

Ownership of KV slots (check_invariants, run after every step by the tests): every slot is free, held by the
tree, or owned by exactly one running request; nothing leaks and nothing has two owners.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .disk_cache import DiskCache
from .kv_pool import KVPool
from .radix_cache import RadixCache, common_length
from .request import Request

POLICIES = ("lpm", "fcfs")
# A waiting request that shares at least this many more prompt tokens with a prompt still being prefilled
# than the tree holds (or all of its own, if fewer) waits for that prefill to land in the tree, instead of
# computing the same KV twice.
SHARE_WAIT_TOKENS = 32
# A waiting request that later arrivals went ahead of this many times is admitted next, whatever the policy.
MAX_PASSED_OVER = 16


@dataclass
class Work:
    """One request's part of a step: positions [start, start + length) of its tokens."""

    request: Request
    start: int
    length: int
    sample: bool  # the last position's logits choose the next token (else: prefill chunk or replay)

    @property
    def tokens(self) -> list[int]:
        return self.request.tokens_between(self.start, self.start + self.length)


class Scheduler:
    def __init__(self, pool: KVPool, *, max_batch: int, max_prefill_tokens: int, policy: str, prefix_cache: bool,
                 align: int, cache_decode_kv: bool, chunk_prefill: bool, disk: DiskCache | None):
        """Settings come from LLM.configure (llm.py), which documents them. align: prefill chunks start, and cache hits end, on multiples of this (exact mode's chunk size).
        cache_decode_kv: decode-step KV may go into the tree (not in exact mode, where only prefill-shaped KV
        is reusable bit for bit). chunk_prefill: False prefills each prompt in one piece (dynamic NTK RoPE,
        whose frequencies depend on the length of the forward). disk: the disk tier under the tree
        (disk_cache.py): evicted KV is written there, and a lookup continues there."""
        self.pool = pool
        self.tree = RadixCache()
        self.max_batch, self.max_prefill_tokens, self.policy = max_batch, max_prefill_tokens, policy
        self.prefix_cache, self.align, self.cache_decode_kv = prefix_cache, align, cache_decode_kv
        self.chunk_prefill = chunk_prefill
        self.disk = disk
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in admission order
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning a step ------------------------------------------------------------------------------

    def schedule(self) -> list[Work]:
        self._reserve_decode_slots()
        self._admit()
        work, budget = [], self.max_prefill_tokens
        for r in self.running:
            if r.in_prefill and budget > 0:  # max_prefill_tokens >= 1: the first prompt always progresses
                start = r.num_computed
                end = len(r.prompt)
                if self.chunk_prefill:  # at most the budget, in whole aligned chunks (the prompt's last may be short)
                    end = min(end, start + budget)
                    end = min(len(r.prompt), max(end // self.align * self.align, start + self.align))
                work.append(Work(r, start, end - start, sample=end == r.num_tokens))
                budget -= end - start
        for r in self.running:
            if not r.in_prefill:
                work.append(Work(r, r.num_computed, 1, sample=r.num_computed == r.num_tokens - 1))
        return work

    def _reserve_decode_slots(self) -> None:
        """Give each running request past its prompt a slot for its next position, evicting cached prefixes
        and then preempting the newest requests while the pool is short."""
        for r in list(self.running):
            if r.in_prefill or r.num_allocated > r.num_computed or r not in self.running:
                continue
            while r in self.running and not self._ensure_free(1):
                victim = self.running[-1]
                if victim is r and len(self.running) == 1:
                    self.release(r)  # alone and still no room: the pool is full
                    r.finish("length")
                    break
                self.preempt(victim)
            if r in self.running:
                r.slot_table[r.num_allocated] = self.pool.alloc(1)[0]
                r.num_allocated += 1

    def _ensure_free(self, n: int) -> bool:
        """Make n slots free, evicting unlocked cached prefixes if needed; False if even that is not enough."""
        short = n - self.pool.free_slots
        if short > 0 and short <= self.tree.evictable_tokens:
            self.pool.free(self.tree.evict(short, self._spill if self.disk else None))
        return self.pool.free_slots >= n

    # -- the disk tier --------------------------------------------------------------------------------

    def _spill(self, leaf) -> None:
        """An evicted leaf's KV goes to disk (the pages that reach into the leaf; its ancestors' own pages
        go when they are evicted in turn, or at spill_all)."""
        tokens, slots = self.tree.path(leaf)
        self.disk.write(list(tokens), slots, self.pool.keys, self.pool.values, from_token=len(tokens) - len(leaf.tokens))

    def spill_all(self) -> None:
        """Write everything the tree holds to disk (at the end of the process)."""
        if self.disk:
            for tokens, slots in self.tree.sequences():
                self.disk.write(list(tokens), slots, self.pool.keys, self.pool.values)

    def _load_from_disk(self, r: Request, limit: int) -> None:
        """Continue r's lookup on disk past what the tree holds (up to limit tokens) and put the pages found
        into the pool and the tree, where the match that follows finds them."""
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
        if self._ensure_free(new):
            slots = self.pool.alloc(new)
            skip = match.length - first * page  # the first page's tokens the tree already has
            for i, store in enumerate((self.pool.keys, self.pool.values)):
                kv = torch.cat([p[i] for p in pages], dim=2)[:, :, skip:]  # [layers, kv_heads, new, head_dim]
                store.index_copy_(2, slots.to(store.device), kv.to(store.device))
            self.pool.free(self.tree.insert(r.tokens[:end], torch.cat((match.slots, slots))))
        self.tree.unlock(match.node)

    def _admit(self) -> None:
        if not self.waiting:
            return
        if self.policy == "lpm" and self.prefix_cache:
            lengths = {r.id: self.tree.match_length(r.tokens) for r in self.waiting}
            self.waiting.sort(key=lambda r: (r.passed_over < MAX_PASSED_OVER, -lengths[r.id]))  # stable
        else:
            self.waiting.sort(key=lambda r: r.passed_over < MAX_PASSED_OVER)
        admitted = []
        for r in list(self.waiting):
            if len(self.running) >= self.max_batch:
                break
            outcome = self._try_admit(r)
            if outcome == "full" and not self.running:  # the whole pool is not enough: it can never run
                self.waiting.remove(r)
                r.finish("length")
            elif outcome == "full":
                break  # stop here, so that the requests behind it cannot overtake it forever
            if outcome == "admitted":
                admitted.append(r)
                self.waiting.remove(r)
        for r in self.waiting:  # aging: count how often a later arrival went first
            r.passed_over += sum(a.id > r.id for a in admitted)

    def _would_share_with_prefill(self, r: Request, cached: int) -> bool:
        """Whether a running request's prompt, still being prefilled, will give r at least SHARE_WAIT_TOKENS
        more cached tokens than the tree has now (or the rest of r's prompt): r then waits for it."""
        wanted = cached + max(1, min(SHARE_WAIT_TOKENS, r.num_tokens - 1 - cached))
        mine = tuple(r.tokens[:-1])
        return any(other.in_prefill and other.use_prefix_cache and common_length(tuple(other.prompt), mine) >= wanted
                   for other in self.running)

    def _try_admit(self, r: Request) -> str:
        """Match r's cached prefix, lock it and allocate slots for the rest: "admitted", "full" (its KV does
        not fit now) or "deferred" (a prompt being prefilled will give it a longer cached prefix soon)."""
        m, use_cache = 0, self.prefix_cache and r.use_prefix_cache
        # Exact mode reuses prefill-shaped KV only: a resumed request recomputes its generated tokens.
        limit = None if self.cache_decode_kv else min(r.num_tokens - 1, len(r.prompt))
        if use_cache and self.disk:
            self._load_from_disk(r, r.num_tokens - 1 if limit is None else limit)
        if use_cache and self._would_share_with_prefill(r, self.tree.match_length(r.tokens)):
            return "deferred"
        if use_cache:
            match = self.tree.match_prefix(r.tokens, align=self.align, limit=limit, count=r.cached_tokens is None)
            self.tree.lock(match.node)
            m = match.length
        need = r.num_tokens - m
        headroom = len(self.running) + 1  # a slot each for the next decode step
        if need + headroom > self.pool.free_slots + self.tree.evictable_tokens or not self._ensure_free(need):
            if use_cache:
                self.tree.unlock(match.node)
            return "full"
        if use_cache:
            r.node = match.node
            r.slot_table[:m] = match.slots
        r.slot_table[m : r.num_tokens] = self.pool.alloc(need)
        r.num_cached = r.num_computed = m
        r.num_allocated = r.num_tokens
        if r.cached_tokens is None:  # first admission: what the prompt reused
            r.cached_tokens = min(m, len(r.prompt))
            r.admit_time = time.perf_counter()
        self.running.append(r)
        return "admitted"

    # -- after a step ---------------------------------------------------------------------------------

    def cache_prompt(self, r: Request) -> None:
        """The prompt's KV is complete: hand it to the tree now, not at the end, so that requests arriving
        while this one decodes reuse it. The request then holds its prompt as a locked cached prefix."""
        r.prompt_cached = True
        if not (self.prefix_cache and r.use_prefix_cache):
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
        """Take r out of the batch: the KV worth keeping goes to the tree, the rest of its slots are freed."""
        self.running.remove(r)
        keep = 0
        if self.prefix_cache and r.use_prefix_cache:
            keep = r.num_computed if self.cache_decode_kv else min(r.num_computed, len(r.prompt))
            self.pool.free(self.tree.insert(r.tokens[:keep], r.slot_table[:keep]))
        self.pool.free(r.slot_table[keep : r.num_allocated])  # keep >= num_cached: the rest is r's own
        if r.node is not None:
            self.tree.unlock(r.node)
        r.node = None
        r.num_cached = r.num_allocated = r.num_computed = 0

    def preempt(self, r: Request) -> None:
        """Free r's slots (its KV goes to the tree, where it may survive) and queue it to resume first."""
        self.release(r)
        r.prompt_cached = False
        self.waiting.insert(0, r)
        self.preemptions += 1

    # -- checking -------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Every usable slot is free, held by the tree, or owned by one running request; the tree holds; a node
        is locked exactly by the running requests whose cached prefix runs through it."""
        self.tree.check_invariants()
        owners = [("free", self.pool.free_list()), ("tree", self.tree.all_slots())]
        owners += [(f"request {r.id}", r.owned_slots().tolist()) for r in self.running]
        seen: dict[int, str] = {}
        for owner, slots in owners:
            for s in slots:
                assert 0 < s <= self.pool.num_slots, f"{owner} holds slot {s}, outside the pool"
                assert s not in seen, f"slot {s} is held by {seen[s]} and {owner}"
                seen[s] = owner
        assert len(seen) == self.pool.num_slots, f"{self.pool.num_slots - len(seen)} slots leaked"
        for r in self.running:
            assert r.num_cached <= r.num_computed <= r.num_allocated <= r.num_tokens
            if r.num_cached:
                path, node = [], r.node
                while node is not self.tree.root:
                    path.append(node.slots)
                    node = node.parent
                held = torch.cat(path[::-1])
                assert torch.equal(held[: r.num_cached], r.slot_table[: r.num_cached]), f"request {r.id}: prefix slots"
        for r in self.waiting:
            assert r.node is None and r.num_allocated == 0
        holders: dict[int, int] = {}  # node id -> running requests whose locked path runs through it
        for r in self.running:
            node = r.node
            while node is not None and node is not self.tree.root:
                holders[id(node)] = holders.get(id(node), 0) + 1
                node = node.parent
        for node in self.tree._nodes():
            assert node.lock_ref == holders.get(id(node), 0), f"{node}: {holders.get(id(node), 0)} running holders"
