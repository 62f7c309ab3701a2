"""The scheduler's plans, step by step, without a model: how the prefill budget is shared, aligned chunks,
where a preempted request goes, and that check_invariants fires on each kind of broken bookkeeping."""

import pytest
import torch

from minillm.kv_pool import KVPool
from minillm.scheduler import Scheduler


def make_scheduler(llm, slots=200, max_prefill_tokens=10, align=1, policy="fcfs"):
    pool = KVPool(llm.config, slots + 1, torch.float32)
    return Scheduler(pool, max_batch=8, max_prefill_tokens=max_prefill_tokens, policy=policy, prefix_cache=True,
                     align=align, cache_decode_kv=align == 1, chunk_prefill=True, disk=None)


def plan(scheduler):
    return [(w.request.id, w.start, w.length, w.sample) for w in scheduler.schedule()]


def requests(llm, *lengths, start=2):
    return [llm.request(list(range(start + 10 * i, start + 10 * i + n)), max_new_tokens=4) for i, n in enumerate(lengths)]


def test_the_prefill_budget_is_shared_in_admission_order(load):
    llm = load("llama")
    s = make_scheduler(llm)
    a, b, c = requests(llm, 9, 5, 3)
    for r in (a, b, c):
        s.add(r)
    # 9 of 10 tokens to a, the last one to b, nothing left for c
    assert plan(s) == [(a.id, 0, 9, True), (b.id, 0, 1, False)]
    s.check_invariants()


def test_a_prompt_longer_than_the_budget_continues_next_step(load):
    llm = load("llama")
    s = make_scheduler(llm)
    a, b = requests(llm, 12, 5)
    s.add(a)
    s.add(b)
    assert plan(s) == [(a.id, 0, 10, False)]
    a.num_computed = 10  # what the engine does after the forward
    assert plan(s) == [(a.id, 10, 2, True), (b.id, 0, 5, True)]


@pytest.mark.parametrize("align, budget, chunks", [(2, 9, [8, 8, 6, 1]), (4, 10, [8, 8, 4, 3]), (8, 3, [8, 8, 7])])
def test_chunks_start_on_multiples_of_align(load, align, budget, chunks):
    """Exact mode's chunks: each ends on the last multiple of align within the budget (at least one whole
    chunk) or at the prompt's end."""
    llm = load("llama")
    s = make_scheduler(llm, max_prefill_tokens=budget, align=align)
    (a,) = requests(llm, 23)
    s.add(a)
    seen = []
    while a.in_prefill:
        (w,) = s.schedule()
        assert type(w.length) is int and w.start == a.num_computed
        seen.append(w.length)
        a.num_computed += w.length
    assert seen == chunks


def test_a_preempted_request_waits_at_the_front_and_is_counted(load):
    llm = load("llama")
    s = make_scheduler(llm)
    a, b, c = requests(llm, 5, 5, 5)
    s.add(a)
    s.add(b)
    s.schedule()
    s.add(c)
    s.preempt(a)
    s.preempt(b)
    assert [r.id for r in s.waiting] == [b.id, a.id, c.id] and s.preemptions == 2
    s.check_invariants()


def test_a_resumed_request_hands_its_recomputed_prompt_to_the_tree(load):
    """Preempted, its cached KV evicted meanwhile: after its prompt is computed again, the prompt is back in the
    tree (for the requests that arrive while it decodes)."""
    llm = load("llama", engine=dict(kv_tokens=300))
    llm.defaults.eos_token_ids = []
    engine, s = llm.engine, llm.engine.scheduler
    prompt = list(range(2, 30))
    handle = llm.submit(prompt, max_new_tokens=12, temperature=0)
    while len(handle.request.tokens) < len(prompt) + 3:
        engine.step()
    s.preempt(handle.request)
    s.pool.free(s.tree.evict(10_000))
    assert s.tree.total_tokens == 0
    while handle.request.in_prefill or handle.request.num_computed < len(prompt):
        engine.step()
    assert s.tree.match_length(prompt + [0]) == len(prompt)
    engine.run_until_done()
    s.check_invariants()


def broken(load, how):
    """a: prompt cached in the tree; c: prefilling into slots of its own; b: waiting. Then one thing broken."""
    llm = load("llama")
    s = make_scheduler(llm, slots=40)
    a, c, b = requests(llm, 6, 6, 6)
    s.add(a)
    s.add(c)
    s.schedule()
    a.num_computed, c.num_computed = 6, 3
    s.cache_prompt(a)
    s.add(b)
    s.check_invariants()
    if how == "slot 0 handed out":
        c.slot_table[0] = 0
    elif how == "slot outside the pool":
        s.pool._free[-1] = 41
    elif how == "two owners":
        s.pool._free.append(int(a.slot_table[a.num_cached - 1]))
    elif how == "leaked":
        s.pool._free.pop()
    elif how == "more allocated than tokens":
        a.num_allocated = a.num_tokens + 1
        a.slot_table[a.num_tokens] = s.pool._free.pop()
    elif how == "computed beyond allocated":
        a.num_computed = a.num_allocated + 1
    elif how == "cached prefix not the tree's":
        a.slot_table[0], a.slot_table[1] = a.slot_table[1].item(), a.slot_table[0].item()
    elif how == "waiting with slots":
        b.num_allocated = 1
    elif how == "waiting with a node":
        b.node = a.node
    return s


@pytest.mark.parametrize("how", ["slot 0 handed out", "slot outside the pool", "two owners", "leaked",
                                 "more allocated than tokens", "computed beyond allocated",
                                 "cached prefix not the tree's", "waiting with slots", "waiting with a node"])
def test_check_invariants_catches_each_broken_account(load, how):
    """The batching tests lean on check_invariants after every step, so each of its checks is shown to fire."""
    with pytest.raises(AssertionError):
        broken(load, how).check_invariants()
