"""The scheduler's plans, step by step, without a model: how the prefill budget is shared, aligned chunks,
where a preempted request goes, and that check_invariants fires on each kind of broken bookkeeping."""

import pytest
import torch

from minillm.cache.kv_pool import KVPool
from minillm.engine.kv_manager import KVManager
from minillm.engine.scheduler import MAX_PASSED_OVER, OLDEST_SHARE, Scheduler


def make_scheduler(llm, slots=200, max_prefill_tokens=10, align=1, policy="fcfs"):
    pool = KVPool(llm.config, slots + 1, torch.float32)
    kv = KVManager(pool, prefix_cache=True, align=align, cache_decode_kv=align == 1, disk=None)
    return Scheduler(kv, max_batch=8, max_prefill_tokens=max_prefill_tokens, policy=policy, chunk_prefill=True)


def plan(scheduler):
    return [(w.request.id, w.start, w.length, w.sample) for w in scheduler.plan()]


def requests(llm, *lengths, start=2):
    return [
        llm.request(list(range(start + 10 * i, start + 10 * i + n)), max_new_tokens=4) for i, n in enumerate(lengths)
    ]


def test_the_prefill_budget_goes_to_the_shortest_rest_first_and_the_oldest_keeps_a_share(load):
    llm = load("llama")
    s = make_scheduler(llm)
    a, b, c = requests(llm, 9, 5, 3)
    for r in (a, b, c):
        s.add(r)
    # c (3 left) and b (5) first; a, admitted first, keeps 10 // OLDEST_SHARE = 2 of the 10 tokens
    assert plan(s) == [(c.id, 0, 3, True), (b.id, 0, 5, True), (a.id, 0, 2, False)]
    s.check_invariants()


def test_equal_rests_go_in_admission_order_and_the_budget_runs_out(load):
    llm = load("llama")
    s = make_scheduler(llm, max_prefill_tokens=10)
    a, b, c = requests(llm, 6, 6, 6)
    for r in (a, b, c):
        s.add(r)
    assert plan(s) == [(a.id, 0, 6, True), (b.id, 0, 4, False)]


def test_a_prompt_longer_than_the_budget_continues_next_step(load):
    llm = load("llama")
    s = make_scheduler(llm)
    a, b = requests(llm, 12, 5)
    s.add(a)
    s.add(b)
    assert plan(s) == [(b.id, 0, 5, True), (a.id, 0, 5, False)]
    a.num_computed = 5  # what the engine does after the forward (b's prompt is done; it stops)
    s.release(b)
    b.finish("stop")
    assert plan(s) == [(a.id, 5, 7, True)]


def test_a_long_prompt_is_not_starved_by_short_ones_arriving_every_step(load):
    """Shortest rest first would let a stream of short prompts hold a long one back for ever; the oldest
    prompt's share (max_prefill_tokens // OLDEST_SHARE) makes it progress on every step."""
    llm = load("llama")
    s = make_scheduler(llm, slots=400, max_prefill_tokens=8)
    (long,) = requests(llm, 30)
    s.add(long)
    steps = 0
    while long.in_prefill:
        for i in range(3):  # fresh prompts: 3 distinct tokens each, none a prefix of another
            s.add(llm.request([100 + 9 * steps + 3 * i + j for j in range(3)], max_new_tokens=4))
        rest = 30 - long.num_computed
        works = s.plan()
        assert [w.length for w in works if w.request is long] == [min(rest, 8 // OLDEST_SHARE)]
        for w in works:  # what the engine does after the forward: the short ones finish at once
            w.request.num_computed += w.length
            if w.request is not long:
                s.release(w.request)
                w.request.finish("stop")
        steps += 1
    assert steps == 30 // (8 // OLDEST_SHARE)


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
        (w,) = s.plan()
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
    s.plan()
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
    s.kv.pool.free(s.kv.tree.evict(10_000))
    assert s.kv.tree.total_tokens == 0
    while handle.request.in_prefill or handle.request.num_computed < len(prompt):
        engine.step()
    assert s.kv.tree.match_length(prompt + [0]) == len(prompt)
    engine.run_until_done()
    s.check_invariants()


def broken(load, how):
    """a: prompt cached in the tree; c: prefilling into slots of its own; b: waiting. Then one thing broken."""
    llm = load("llama")
    s = make_scheduler(llm, slots=40)
    a, c, b = requests(llm, 6, 6, 6)
    s.add(a)
    s.add(c)
    s.plan()
    a.num_computed, c.num_computed = 6, 3
    s.kv.cache_prompt(a)
    s.add(b)
    s.check_invariants()
    if how == "slot 0 handed out":
        c.slot_table[0] = 0
    elif how == "slot outside the pool":
        s.kv.pool._free[-1] = 41
    elif how == "two owners":
        s.kv.pool._free.append(int(a.slot_table[a.num_cached - 1]))
    elif how == "leaked":
        s.kv.pool._free.pop()
    elif how == "more allocated than tokens":
        a.num_allocated = a.num_tokens + 1
        a.slot_table[a.num_tokens] = s.kv.pool._free.pop()
    elif how == "computed beyond allocated":
        a.num_computed = a.num_allocated + 1
    elif how == "cached prefix not the tree's":
        a.slot_table[0], a.slot_table[1] = a.slot_table[1].item(), a.slot_table[0].item()
    elif how == "waiting with slots":
        b.num_allocated = 1
    elif how == "waiting with a node":
        b.node = a.node
    elif how == "a lock nobody holds":
        a.node.lock_ref += 1
    return s


@pytest.mark.parametrize(
    "how",
    [
        "slot 0 handed out",
        "slot outside the pool",
        "two owners",
        "leaked",
        "more allocated than tokens",
        "computed beyond allocated",
        "cached prefix not the tree's",
        "waiting with slots",
        "waiting with a node",
        "a lock nobody holds",
    ],
)
def test_check_invariants_catches_each_broken_account(load, how):
    """The batching tests lean on check_invariants after every step, so each of its checks is shown to fire."""
    with pytest.raises(AssertionError):
        broken(load, how).check_invariants()


@pytest.mark.parametrize("mode", ["fast", "exact", "no cache"])
def test_what_a_finished_request_leaves_in_the_tree(load, checkpoint, mode):
    """Fast mode keeps prompt and generated tokens (a chat's next turn reuses both); exact mode only the
    prompt (only prefill-shaped KV is reusable bit for bit); without the prefix cache, nothing."""
    from minillm import LLM

    llm = LLM.load(checkpoint("llama"), exact=True) if mode == "exact" else load("llama")
    llm.configure(prefix_cache=mode != "no cache")
    llm.defaults.eos_token_ids = []
    prompt = list(range(2, 40))
    out = llm.generate(prompt, max_new_tokens=5, temperature=0)
    held = {"fast": len(prompt) + len(out.token_ids) - 1, "exact": len(prompt), "no cache": 0}[mode]
    assert llm.prefix_cache.total_tokens == held


def test_a_prompt_is_handed_to_the_tree_once(load):
    llm = load("llama")
    llm.defaults.eos_token_ids = []
    s = llm.engine.scheduler
    handed, original = [], s.kv.cache_prompt
    s.kv.cache_prompt = lambda r: (handed.append(r.id), original(r))
    out = llm.generate(list(range(2, 30)), max_new_tokens=6, temperature=0)
    assert len(handed) == 1 and len(out.token_ids) == 6


@pytest.mark.parametrize(
    "rest, shared, waits",
    [
        (11, 11, True),  # everything r still has to compute is being prefilled by another request
        (11, 10, False),  # all but one token of it: r goes ahead (fewer than its rest and than 32)
        (1, 1, True),  # one token to compute, and it is being prefilled
        (40, 32, True),  # 32 shared tokens are worth a wait even when more remain
        (40, 31, False),
    ],
)
def test_a_request_waits_for_a_prefill_that_will_cache_what_it_needs(load, rest, shared, waits):
    """r (nothing cached) versus x, a running request still prefilling a prompt that shares `shared` tokens
    with r's own `rest` tokens to compute."""
    llm = load("llama")
    s = make_scheduler(llm, max_prefill_tokens=4)
    base = list(range(2, 80))
    (x,) = [llm.request(base, max_new_tokens=2)]
    s.add(x)
    s.plan()  # x admitted, 4 of its tokens prefilled at most: still in prefill
    r = llm.request(base[:shared] + [299] * (rest - shared) + [5], max_new_tokens=2)
    assert s._would_share_with_prefill(r, 0) is waits


def test_the_wait_counts_from_what_the_tree_already_holds(load):
    llm = load("llama")
    s = make_scheduler(llm, max_prefill_tokens=4)
    base = list(range(2, 80))
    s.kv.tree.insert(base[:20], s.kv.pool.alloc(20))  # 20 tokens cached
    x = llm.request(base, max_new_tokens=2)
    s.add(x)
    s.plan()
    r = llm.request(base[:30] + [5], max_new_tokens=2)  # 10 tokens left to compute, all being prefilled by x
    assert s._would_share_with_prefill(r, 20)
    assert not s._would_share_with_prefill(llm.request(base[:29] + [299, 5], max_new_tokens=2), 20)


def test_locks_follow_the_request_from_its_cached_prefix_to_its_whole_prompt(load):
    llm = load("llama")
    s = make_scheduler(llm)
    base = list(range(2, 40))
    s.kv.tree.insert(base[:10], s.kv.pool.alloc(10))
    r = llm.request(base[:20], max_new_tokens=2)
    s.add(r)
    s.plan()
    assert r.num_cached == 10 and s.kv.tree.protected_tokens == 10
    r.num_computed = 20
    s.kv.cache_prompt(r)  # the lock moves from the 10 cached tokens to the whole 20-token prompt
    s.check_invariants()
    assert s.kv.tree.protected_tokens == 20
    s.release(r)
    s.check_invariants()
    assert s.kv.tree.protected_tokens == 0


def test_ensure_free_evicts_just_the_shortfall_and_nothing_when_it_cannot_succeed(load):
    llm = load("llama")
    s = make_scheduler(llm, slots=20)
    for i in range(10):  # ten one-token prompts cached: ten leaves of one slot each
        s.kv.pool.free(s.kv.tree.insert([1000 + i], s.kv.pool.alloc(1)))
    assert s.kv.pool.free_slots == 10 and s.kv.tree.evictable_tokens == 10
    assert s.kv.ensure_free(13)  # 3 short: three leaves go, seven stay
    assert s.kv.pool.free_slots == 13 and s.kv.tree.total_tokens == 7
    assert s.kv.ensure_free(5) and s.kv.tree.total_tokens == 7  # enough free already: nothing goes
    assert not s.kv.ensure_free(21)  # more than free + evictable: refused, and nothing is evicted in vain
    assert s.kv.pool.free_slots == 13 and s.kv.tree.total_tokens == 7
    assert s.kv.ensure_free(20)  # exactly free + evictable: all of it
    assert s.kv.pool.free_slots == 20 and s.kv.tree.total_tokens == 0
    s.check_invariants()


def test_a_request_that_exactly_fits_the_pool_runs_to_its_length_without_preemption(load):
    """Prompt P and M new tokens need P + M - 1 slots (the last token is never fed back)."""
    llm = load("llama", engine=dict(kv_tokens=20 + 12 - 1))
    c = llm.generate(list(range(2, 22)), max_new_tokens=12, temperature=0, ignore_eos=True)
    assert len(c.token_ids) == 12 and c.finish_reason == "length" and llm.engine.scheduler.preemptions == 0
    llm.engine.scheduler.check_invariants()


def test_a_lone_request_that_outgrows_the_pool_ends_with_length_not_preemption(load):
    llm = load("llama", engine=dict(kv_tokens=20 + 12 - 4))
    c = llm.generate(list(range(2, 22)), max_new_tokens=12, temperature=0, ignore_eos=True)
    s = llm.engine.scheduler
    assert c.finish_reason == "length" and len(c.token_ids) == 9 and s.preemptions == 0
    assert not s.has_work and s.kv.pool.free_slots + s.kv.tree.total_tokens == s.kv.pool.num_slots
    s.check_invariants()


def test_the_newest_running_request_is_the_one_preempted(load, monkeypatch):
    llm = load("llama", engine=dict(kv_tokens=3 * 20 + 12, max_batch=3))
    s = llm.engine.scheduler
    victims = []
    preempt = s.preempt

    def recording(r):
        victims.append((r.id, [q.id for q in s.running]))
        preempt(r)

    monkeypatch.setattr(s, "preempt", recording)
    prompts = [list(range(2 + 30 * i, 22 + 30 * i)) for i in range(3)]
    llm.generate(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert victims and any(len(running) == 3 for _, running in victims)
    assert all(victim == running[-1] for victim, running in victims)
    s.check_invariants()


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_admission_order_fcfs_ignores_the_tree_and_aging_goes_first_in_both(load, policy):
    """c's prefix is cached, d was passed over MAX_PASSED_OVER times: FCFS admits in arrival order after d,
    LPM takes c before the others (after d)."""
    llm = load("llama")
    s = make_scheduler(llm, policy=policy)
    a, b, c, d = requests(llm, 5, 5, 5, 5)
    s.kv.pool.free(s.kv.tree.insert(c.tokens[:4], s.kv.pool.alloc(4)))
    d.passed_over = MAX_PASSED_OVER
    for r in (a, b, c, d):
        s.add(r)
    s.plan()
    expected = [d, a, b, c] if policy == "fcfs" else [d, c, a, b]
    assert [r.id for r in s.running] == [r.id for r in expected]
    s.check_invariants()


def test_a_request_larger_than_the_whole_pool_ends_with_length_and_the_next_one_is_admitted(load):
    """With nothing running, a request whose tokens (plus one for its next) exceed the pool can never run (a
    preempted request whose generated tokens grew past it, say): it ends at once, and the queue moves on."""
    llm = load("llama")
    s = make_scheduler(llm, slots=10)
    big, small = requests(llm, 12, 4)
    s.add(big)
    s.add(small)
    assert plan(s) == [(small.id, 0, 4, True)]
    assert big.finish_reason == "length" and big not in s.waiting and s.running == [small]
    s.check_invariants()


def test_a_request_that_does_not_fit_blocks_those_behind_it_and_counts_who_passed_it(load):
    """x arrived first but does not fit beside the running request; y, later, has a cached prefix and fits:
    LPM admits y, stops at x (the small z behind x must not overtake it, or x could wait forever), and x
    counts one more pass."""
    llm = load("llama")
    s = make_scheduler(llm, slots=30, policy="lpm")
    (running,) = requests(llm, 10, start=300)
    s.add(running)
    s.plan()
    x, y, z = requests(llm, 18, 4, 2)
    s.kv.pool.free(s.kv.tree.insert(y.tokens[:3], s.kv.pool.alloc(3)))
    for r in (x, y, z):
        s.add(r)
    s.plan()
    assert [r.id for r in s.running] == [running.id, y.id]
    assert [r.id for r in s.waiting] == [x.id, z.id] and x.passed_over == 1 and z.passed_over == 0
    s.check_invariants()


@pytest.mark.parametrize("length, cached", [(64, 0), (65, 64), (129, 128)])
def test_exact_mode_reuses_whole_chunks_short_of_the_last_token(checkpoint, length, cached):
    """A repeated prompt: the hit ends on a chunk boundary before its last token (whose logits must be
    computed): 64 tokens reuse nothing, 65 reuse 64."""
    from minillm import LLM

    llm = LLM.load(checkpoint("llama"), exact=True)
    prompt = list(range(2, 2 + length))
    first = llm.generate(prompt, max_new_tokens=3, temperature=0, ignore_eos=True, return_logits=True)
    again = llm.generate(prompt, max_new_tokens=3, temperature=0, ignore_eos=True, return_logits=True)
    assert again.cached_tokens == cached and torch.equal(first.logits, again.logits)


@pytest.mark.parametrize("length, admitted", [(8, True), (9, False)])
def test_admission_keeps_one_slot_per_running_request_for_its_next_token(load, length, admitted):
    """10 slots free and one request running: a newcomer may take 10 - 2 (its own next token and the running
    one's), not 9."""
    llm = load("llama")
    s = make_scheduler(llm, slots=20)
    (running,) = requests(llm, 10, start=300)
    s.add(running)
    s.plan()
    assert s.kv.pool.free_slots == 10
    (new,) = requests(llm, length)
    s.add(new)
    s.plan()
    assert (new in s.running) == admitted
    s.check_invariants()


def test_a_resumed_request_is_not_counted_again_in_the_hit_statistics(load):
    llm = load("llama")
    s = make_scheduler(llm)
    (a,) = requests(llm, 6)
    s.add(a)
    s.plan()
    assert s.kv.tree.stats.lookups == 1
    s.preempt(a)
    s.plan()
    assert a in s.running and s.kv.tree.stats.lookups == 1
    s.check_invariants()


def test_a_completion_times_its_wait_prefill_and_decode(load):
    """ttft counts from submission (waiting included), prefill_s from admission: the second request waits for
    the first to finish, so its prefill_s is shorter than its ttft."""
    llm = load("llama", engine=dict(max_batch=1))
    first, second = (llm.submit(list(range(2 + i, 30 + i)), max_new_tokens=4, temperature=0) for i in range(2))
    llm.engine.run_until_done()
    for c in (first.result(), second.result()):
        assert 0 < c.prefill_s <= c.ttft_s and c.decode_s > 0
    assert second.result().prefill_s < second.result().ttft_s - first.result().decode_s


def test_a_resumed_request_reuses_the_kv_of_its_generated_tokens_outside_exact_mode(load):
    """Preempted with its KV left in the tree, it resumes with everything but its last token cached (exact mode
    recomputes its generated tokens instead: tests/test_batching.py)."""
    llm = load("llama")
    llm.defaults.eos_token_ids = []
    prompt = list(range(2, 30))
    handle = llm.submit(prompt, max_new_tokens=12, temperature=0)
    r = handle.request
    while len(r.tokens) < len(prompt) + 5:
        llm.engine.step()
    llm.engine.scheduler.preempt(r)
    llm.engine.scheduler.plan()
    assert r in llm.engine.scheduler.running and r.num_cached == r.num_tokens - 1 > len(prompt)
    llm.engine.run_until_done()


def test_only_the_rows_that_pick_a_token_compute_logits(load, monkeypatch):
    """The output projection is the largest product: a prompt's chunks before its last ask for no logits, the
    last chunk for its last row's only."""
    import minillm.engine.forward_batch

    llm = load("llama", engine=dict(max_prefill_tokens=8))
    asked = []
    real_run = minillm.engine.forward_batch.run

    def recording_run(model, pool, segments, views):
        asked.extend((s.start, len(s.tokens), list(s.logit_rows)) for s in segments)
        return real_run(model, pool, segments, views)

    monkeypatch.setattr(minillm.engine.forward_batch, "run", recording_run)
    llm.generate(list(range(2, 22)), max_new_tokens=2, temperature=0, ignore_eos=True)
    assert asked == [(0, 8, []), (8, 8, []), (16, 4, [3]), (20, 1, [0])]


def test_every_forward_goes_through_the_runner(load, monkeypatch):
    """The engine never runs the model itself: its runner does (runner.py), the same lines for one process and
    for ranks.Leader, which broadcasts each plan first (a recording runner here; tests/test_tensor_parallel.py
    runs real ranks)."""
    from minillm.engine.engine import Engine
    from minillm.engine.runner import LocalRunner

    llm = load("llama")
    calls = []

    class RecordingRunner(LocalRunner):
        def forward(self, pool, segments, views):
            calls.append(len(segments))
            return super().forward(pool, segments, views)

    led = Engine(RecordingRunner(llm.model), llm.engine.scheduler, None, views=True)
    monkeypatch.setattr(llm, "engine", led)
    llm.generate(list(range(2, 12)), max_new_tokens=3, temperature=0, ignore_eos=True)
    assert calls == [1, 1, 1]


def test_engine_stats_count_what_runs_waits_and_is_cached(load, tmp_path):
    """Engine.stats(): the numbers /metrics and the CLI report, each against the state it counts."""
    from types import SimpleNamespace

    from minillm.engine.engine import EngineStats

    llm = load("llama", engine=dict(max_batch=1, kv_tokens=64))
    engine = llm.engine
    assert engine.stats() == EngineStats(0, 0, 64, 0, 0, 0.0, 0, None)
    handles = [llm.submit(list(range(2, 12)), max_new_tokens=3, temperature=0, ignore_eos=True) for _ in range(2)]
    engine.step()  # one admitted (max_batch 1), one waiting
    s = engine.stats()
    assert (s.running, s.waiting, s.kv_slots_total) == (1, 1, 64)
    assert s.kv_slots_used == 64 - engine.pool.free_slots == 10  # the prompt (the new token: a slot next step)
    for h in handles:
        h.result()
    s = engine.stats()
    assert (s.running, s.waiting, s.preemptions, s.disk) == (0, 0, 0, None)
    assert s.kv_slots_cached == llm.prefix_cache.total_tokens > 0 and s.kv_slots_used == s.kv_slots_cached
    assert s.prefix_cache_hit_rate == llm.prefix_cache.stats.hit_rate > 0  # the second prompt found the first's
    engine.kv.disk = SimpleNamespace(enabled=True, dir=tmp_path, page=4, pages_read=2, read_s=0.5,
                                     pages_written=3, write_s=0.25)  # fmt: skip
    assert engine.stats().disk == {
        "dir": str(tmp_path), "tokens_read": 8, "read_s": 0.5, "tokens_written": 12, "write_s": 0.25
    }  # fmt: skip
    engine.kv.disk.enabled = False  # turned off after an error: no traffic reported
    assert engine.stats().disk is None
    engine.kv.disk = None
