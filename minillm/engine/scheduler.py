"""The scheduler: which requests run in the next step, and how much of each. Policy only: where their KV
lives is the KV manager's business (kv_manager.py), which it asks for slots.

A step has three verbs: the scheduler plans it (plan), the engine runs the planned rows and samples, and the
scheduler finishes it (finish_step). Planning, in order:

    1. decode slots  every running request past its prompt needs one slot for the token it feeds next; when
                     the pool is short (even after evicting cached prefixes), the most recently admitted
                     request is preempted: its KV goes to the tree, its slots are freed, and it waits at the
                     front of the queue to resume.
    2. admission     waiting requests join while the batch has room (max_batch) and their KV fits (free slots
                     plus evictable cached ones, minus a slot per running request for its next token).
                     Order: longest cached prefix first ("lpm", SGLang's policy: what is in the tree now gets
                     used before it is evicted), or first come first served ("fcfs"). A request passed over
                     MAX_PASSED_OVER times goes first whatever the policy, so none starves. A request whose
                     prompt shares enough with a prompt still being prefilled waits for it (SHARE_WAIT_TOKENS).
    3. prefill       requests still in their prompt get chunks, at most max_prefill_tokens in all per step, so
                     a long prompt does not stall everyone's decode. Shortest rest of prompt first: a question
                     behind a cached prefix gets its first token in this step, not after a long prompt's
                     chunks; the request admitted first keeps 1 / OLDEST_SHARE of the budget, so none starves.
    4. decode        one row for every running request past its prompt.

The plan is a list of plan.Work items (request, positions, whether to sample).
"""

from __future__ import annotations

import enum
import time

from ..cache.radix_cache import common_length
from .kv_manager import KVManager
from .plan import Work
from .request import Request

POLICIES = ("lpm", "fcfs")
# A waiting request that shares at least this many more prompt tokens with a prompt still being prefilled
# than the tree holds (or all of its own, if fewer) waits for that prefill to land in the tree, instead of
# computing the same KV twice.
SHARE_WAIT_TOKENS = 32
# A waiting request that later arrivals went ahead of this many times is admitted next, whatever the policy.
MAX_PASSED_OVER = 16
# The prompt admitted first gets at least 1 / OLDEST_SHARE of each step's prompt budget, however many shorter
# prompts go ahead of it.
OLDEST_SHARE = 4


class Admission(enum.Enum):
    ADMITTED = "admitted"
    FULL = "full"  # its KV does not fit now
    DEFERRED = "deferred"  # a prompt being prefilled will give it a longer cached prefix soon


class Scheduler:
    def __init__(self, kv: KVManager, *, max_batch: int, max_prefill_tokens: int, policy: str, chunk_prefill: bool):
        """Settings come from LLM.configure (llm.py), which documents them. chunk_prefill: False prefills each
        prompt in one piece (dynamic NTK RoPE, whose frequencies depend on the length of the forward)."""
        self.kv = kv
        self.max_batch, self.max_prefill_tokens, self.policy = max_batch, max_prefill_tokens, policy
        self.chunk_prefill = chunk_prefill
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in admission order
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning a step ------------------------------------------------------------------------------

    def plan(self) -> list[Work]:
        self._reserve_decode_slots()
        self._admit()
        work, budget, align = [], self.max_prefill_tokens, self.kv.align
        prefilling = [r for r in self.running if r.in_prefill]
        oldest = prefilling[0] if prefilling else None
        kept = min(_rest(oldest), self.max_prefill_tokens // OLDEST_SHARE) if oldest else 0  # oldest's share
        for r in sorted(prefilling, key=_rest):  # stable: equal rests in admission order
            allowance = budget if r is oldest else budget - kept
            if allowance <= 0:
                continue
            start = r.num_computed
            end = len(r.prompt)
            if self.chunk_prefill:  # at most the allowance, in whole aligned chunks (the prompt's last may be short)
                end = min(end, start + allowance)
                end = min(len(r.prompt), max(end // align * align, start + align))
            work.append(Work(r, start, end - start, sample=end == r.num_tokens))
            budget -= end - start
            if r is oldest:
                kept = 0
        for r in self.running:
            if not r.in_prefill:  # every position not yet computed: the last token, and any forced after it
                work.append(Work(r, r.num_computed, r.num_tokens - r.num_computed, sample=True))
        return work

    def _reserve_decode_slots(self) -> None:
        """Give each running request past its prompt slots for its positions still without one (its next
        token, and any tokens a constraint forced), preempting the newest requests while the pool (after
        eviction) is short."""
        for r in list(self.running):
            if r.in_prefill or r.num_allocated == r.num_tokens or r not in self.running:
                continue
            while r in self.running and not self.kv.reserve(r, r.num_tokens - r.num_allocated):
                victim = self.running[-1]
                if victim is r and len(self.running) == 1:
                    self.release(r)  # alone and still no room: the pool is full
                    r.finish("length")
                    break
                self.preempt(victim)

    def _admit(self) -> None:
        if not self.waiting:
            return
        if self.policy == "lpm" and self.kv.prefix_cache:
            lengths = {r.id: self.kv.cached_length(r.tokens) for r in self.waiting}
            self.waiting.sort(key=lambda r: (r.passed_over < MAX_PASSED_OVER, -lengths[r.id]))  # stable
        else:
            self.waiting.sort(key=lambda r: r.passed_over < MAX_PASSED_OVER)
        admitted = []
        for r in list(self.waiting):
            if len(self.running) >= self.max_batch:
                break
            outcome = self._try_admit(r)
            if outcome is Admission.FULL and not self.running:  # the whole pool is not enough: it can never run
                self.waiting.remove(r)
                r.finish("length")
            elif outcome is Admission.FULL:
                break  # stop here, so that the requests behind it cannot overtake it forever
            if outcome is Admission.ADMITTED:
                admitted.append(r)
                self.waiting.remove(r)
        for r in self.waiting:  # aging: count how often a later arrival went first
            r.passed_over += sum(a.id > r.id for a in admitted)

    def _would_share_with_prefill(self, r: Request, cached: int) -> bool:
        """Whether a running request's prompt, still being prefilled, will give r at least SHARE_WAIT_TOKENS
        more cached tokens than the tree has now (or the rest of r's prompt): r then waits for it."""
        wanted = cached + max(1, min(SHARE_WAIT_TOKENS, r.num_tokens - 1 - cached))
        mine = tuple(r.tokens[:-1])
        return any(
            other.in_prefill and other.use_prefix_cache and common_length(tuple(other.prompt), mine) >= wanted
            for other in self.running
        )

    def _try_admit(self, r: Request) -> Admission:
        self.kv.prefetch(r)  # the disk tier's pages of r's prompt into the tree first
        if self.kv.caches(r) and self._would_share_with_prefill(r, self.kv.cached_length(r.tokens)):
            return Admission.DEFERRED
        headroom = len(self.running) + 1  # a slot each for the next decode step
        if not self.kv.admit(r, headroom):
            return Admission.FULL
        if r.cached_tokens is None:  # first admission: what the prompt reused
            r.cached_tokens = min(r.num_cached, len(r.prompt))
            r.admit_time = time.perf_counter()
        self.running.append(r)
        return Admission.ADMITTED

    # -- finishing a step -----------------------------------------------------------------------------

    def finish_step(self, works: list[Work]) -> None:
        """The planned rows were computed (and the sampling rows sampled): count them (of a verified draft, the
        rows whose tokens were taken), hand a completed prompt to the tree, and take finished requests out of
        the batch."""
        for w in works:
            r = w.request
            if w.draft:  # valid KV: the rows up to the last token taken (a rejected draft token's KV is not)
                r.num_computed += min(w.rows, r.num_tokens - 1 - w.start)
                self.kv.trim(r)
            else:
                r.num_computed += w.length
            if not r.prompt_cached and r.num_computed >= len(r.prompt):
                self.kv.cache_prompt(r)
            if r.finished:
                self.release(r)

    def release(self, r: Request) -> None:
        """Take r out of the batch; its KV worth keeping goes to the tree, the rest of its slots are freed."""
        self.running.remove(r)
        self.kv.release(r)

    def preempt(self, r: Request) -> None:
        """Free r's slots (its KV goes to the tree, where it may survive) and queue it to resume first."""
        self.release(r)
        r.prompt_cached = False
        self.waiting.insert(0, r)
        self.preemptions += 1

    def check_invariants(self) -> None:
        """The KV manager's ownership invariant over this batch and queue (kv_manager.py)."""
        self.kv.check(self.running, self.waiting)


def _rest(r: Request) -> int:
    """Prompt tokens r still has to compute."""
    return len(r.prompt) - r.num_computed
