"""Continuous batching: a request's output does not depend on what else runs, when it arrives, or how
tight the KV pool is; and the pool's bookkeeping holds after every step."""

import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minillm import LLM

PROPERTY = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_exact = {}


@pytest.fixture
def exact_llm(checkpoint):
    def get(family="qwen2", dtype=torch.float32, **engine):
        key = (family, dtype)
        if key not in _exact:
            _exact[key] = LLM.load(checkpoint(family), dtype=dtype, exact=True)
        _exact[key].configure(exact_chunk=16, exact_decode_rows=4, **engine)
        return _exact[key]

    return get


@st.composite
def workloads(draw, max_requests=6):
    """Requests that share prefixes (a few bases, random tails), arrive at random steps, greedy or seeded
    sampling, with their own max_new_tokens and sometimes a stop string."""
    bases = draw(st.lists(st.lists(st.integers(2, 299), min_size=1, max_size=30), min_size=1, max_size=3))
    requests = []
    for _ in range(draw(st.integers(1, max_requests))):
        base = draw(st.sampled_from(bases))
        prompt = base + draw(st.lists(st.integers(2, 299), min_size=1, max_size=12))
        options = dict(max_new_tokens=draw(st.integers(1, 8)))
        if draw(st.booleans()):
            options.update(temperature=0.9, top_p=0.95, seed=draw(st.integers(0, 2**31)))
        else:
            options.update(temperature=0)
        if draw(st.integers(0, 3)) == 0:
            options["stop"] = draw(st.sampled_from(["e", "\n", " t"]))
        requests.append((draw(st.integers(0, 6)), prompt, options))
    return requests


def run_batched(llm, workload):
    """Submit each request at its arrival step; step until all are done, checking the slot accounting after
    every step. Returns the completions in workload order."""
    engine = llm.engine
    handles = [None] * len(workload)
    step = 0
    while step <= max(a for a, _, _ in workload) or engine.scheduler.has_work:
        for i, (arrival, prompt, options) in enumerate(workload):
            if arrival == step:
                handles[i] = llm.submit(prompt, return_logits=True, **options)
        engine.step()
        engine.scheduler.check_invariants()
        step += 1
    return [h.result() for h in handles]


def run_alone(llm, workload):
    results = []
    for _, prompt, options in workload:
        llm.configure(kv_tokens=4096)  # empty cache, nothing else running
        results.append(llm.generate(prompt, return_logits=True, use_prefix_cache=False, **options))
    return results


def assert_close_runs(batched, alone, atol):
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        torch.testing.assert_close(b.logits, a.logits, atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@PROPERTY
@given(workload=workloads(), kv_tokens=st.sampled_from([4096, 90]), max_batch=st.sampled_from([16, 2]))
def test_batched_equals_one_at_a_time(load, family, workload, kv_tokens, max_batch):
    """fp32, fast mode: the same tokens, logits within 1e-4, also with a pool so small that requests are
    evicted and preempted, and with a batch cap that keeps requests waiting."""
    options = dict(sliding_window=8) if family == "mistral" else {}
    llm = load(family, **options)
    llm.defaults.eos_token_ids = []
    alone = run_alone(llm, workload)
    llm.configure(kv_tokens=kv_tokens, max_batch=max_batch, max_prefill_tokens=24, poison_freed=True)
    assert_close_runs(run_batched(llm, workload), alone, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@PROPERTY
@given(workload=workloads(), kv_tokens=st.sampled_from([4096, 90]))
def test_exact_mode_batched_bitwise_equals_one_at_a_time(exact_llm, dtype, workload, kv_tokens):
    llm = exact_llm(dtype=dtype)
    llm.defaults.eos_token_ids = []
    alone = run_alone(llm, workload)
    llm.configure(kv_tokens=kv_tokens, exact_chunk=16, exact_decode_rows=4, max_prefill_tokens=32, poison_freed=True)
    assert_close_runs(run_batched(llm, workload), alone, atol=0)  # atol 0 with rtol 0: torch.equal


def test_preempted_request_resumes_bitwise_as_if_uninterrupted(exact_llm):
    llm = exact_llm()
    llm.defaults.eos_token_ids = []
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 300) for _ in range(20)] for _ in range(3)]
    alone = run_alone(llm, [(0, p, dict(max_new_tokens=30, temperature=0.8, seed=i)) for i, p in enumerate(prompts)])
    llm.configure(kv_tokens=80, exact_chunk=16, exact_decode_rows=4, poison_freed=True)  # 3 x 50 tokens do not fit
    batched = run_batched(
        llm, [(0, p, dict(max_new_tokens=30, temperature=0.8, seed=i)) for i, p in enumerate(prompts)]
    )
    assert llm.engine.scheduler.preemptions > 0
    assert_close_runs(batched, alone, atol=0)


def test_exact_mode_a_resumed_request_recomputes_its_generated_tokens_even_when_the_tree_has_them(exact_llm):
    """Exact mode's tree holds prefill-shaped KV only. Another prompt that runs on into a request's generated
    tokens puts prefill-shaped KV for them in the tree; the request, preempted and resumed, must still compute
    those positions as decode rows (replay), as they were computed uninterrupted, or its bits change."""
    llm = exact_llm()  # chunks of 16 tokens
    prompt = random.Random(3).choices(range(2, 300), k=20)
    options = dict(max_new_tokens=24, temperature=0, ignore_eos=True, return_logits=True)
    alone = llm.generate(prompt, **options)
    llm.configure(exact_chunk=16, exact_decode_rows=4)  # an empty tree
    llm.generate(prompt + alone.token_ids[:20] + [5, 6, 7], max_new_tokens=1)  # its prompt's KV (43 positions) stays
    handle = llm.submit(prompt, **options)
    while len(handle.request.tokens) < 36:  # generated past the second chunk boundary (32)
        llm.engine.step()
    llm.engine.scheduler.preempt(handle.request)
    llm.engine.run_until_done()
    resumed = handle.result()
    assert resumed.token_ids == alone.token_ids and torch.equal(resumed.logits, alone.logits)


def test_abort_frees_everything(load):
    llm = load("llama", engine=dict(kv_tokens=200))
    pool = llm.engine.pool
    running = llm.submit(list(range(2, 40)), max_new_tokens=50, temperature=0)
    waiting = llm.submit(list(range(5, 30)), max_new_tokens=50, temperature=0)
    for _ in range(3):
        llm.engine.step()
    running.abort()
    waiting.abort()
    llm.engine.step()
    assert running.result().finish_reason == "abort" and waiting.result().finish_reason == "abort"
    assert not llm.engine.scheduler.has_work
    llm.engine.scheduler.check_invariants()
    assert llm.prefix_cache.protected_tokens == 0  # nothing locked
    assert pool.free_slots + llm.prefix_cache.total_tokens == pool.num_slots


def test_leaving_a_stream_early_aborts_the_request(load):
    llm = load("llama", engine=dict(kv_tokens=200))
    llm.defaults.eos_token_ids = []
    stream = llm.stream(list(range(2, 40)), max_new_tokens=50, temperature=1.0, seed=0)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    llm.engine.step()
    assert not llm.engine.scheduler.has_work and llm.prefix_cache.protected_tokens == 0
    llm.engine.scheduler.check_invariants()


def test_concurrent_requests_sharing_a_prefix_hold_it_once(load):
    """16 requests with one 48-token prefix, submitted together: one computes the prefix, the others wait a
    step and reuse it, so the pool holds the prefix once (plus each request's own tokens)."""
    llm = load("llama", engine=dict(kv_tokens=4096))
    prefix = list(range(2, 50))
    handles = [llm.submit(prefix + [100 + i, 200 + i], max_new_tokens=4, temperature=0) for i in range(16)]
    peak = 0
    while llm.engine.step():
        used = llm.engine.pool.num_slots - llm.engine.pool.free_slots
        peak = max(peak, used)
    results = [h.result() for h in handles]
    assert sum(r.cached_tokens >= len(prefix) for r in results) == 15
    assert peak <= len(prefix) + 16 * (2 + 4)  # the prefix once, each request's 2 prompt + 4 new tokens


def test_lpm_admits_longest_cached_prefix_first_and_aging_bounds_the_wait(load):
    llm = load("llama", engine=dict(kv_tokens=4096, max_batch=1))
    shared = list(range(2, 40))
    llm.generate(shared + [5], max_new_tokens=1, temperature=0)  # cache the shared prefix
    loner = llm.submit([299] * 20, max_new_tokens=2, temperature=0)  # nothing cached: LPM puts it last
    hits = [llm.submit(shared + [60 + i], max_new_tokens=2, temperature=0) for i in range(20)]
    finished_before_loner = 0
    while not loner.request.finished:
        llm.engine.step()
        for h in hits:
            if h.request.finished and not getattr(h, "counted", False):
                h.counted = True
                finished_before_loner += 1
    # LPM ran the hits first, until the loner had been passed over MAX_PASSED_OVER (16) times
    assert finished_before_loner == 16
    llm.engine.run_until_done()
    fcfs = load("llama", engine=dict(kv_tokens=4096, max_batch=1, schedule_policy="fcfs"))
    first = fcfs.submit([299] * 20, max_new_tokens=2, temperature=0)
    later = fcfs.submit(list(range(2, 40)), max_new_tokens=2, temperature=0)
    while not first.request.finished:
        fcfs.engine.step()
    assert not later.request.finished


def test_background_thread_serves_concurrent_submitters(load):
    llm = load("qwen2", engine=dict(kv_tokens=2048))
    llm.defaults.eos_token_ids = []
    prompts = [[7, 8, 9] + [i + 2] * (i + 3) for i in range(8)]
    expected = [llm.generate(p, max_new_tokens=6, temperature=0, use_prefix_cache=False).text for p in prompts]
    llm.engine.start()
    try:
        results = [None] * len(prompts)

        def client(i):
            results[i] = "".join(llm.stream(prompts[i], max_new_tokens=6, temperature=0))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == expected
    finally:
        llm.engine.stop()
    llm.engine.scheduler.check_invariants()


def test_the_serving_loop_sleeps_while_idle_and_stops_when_asked(load, monkeypatch):
    """Idle, serve() sleeps on the submission queue (a few steps a second, not a busy loop) and still sees
    should_stop; the background thread is a daemon (a program that forgets stop() can exit), handles wait
    for it from the moment start() returns, and after stop() they step the engine themselves again."""
    llm = load("llama")
    engine = llm.engine
    steps = []
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: steps.append(1) or real_step())
    monkeypatch.setattr("minillm.engine.engine.IDLE_WAIT_S", 0.05)
    release = threading.Event()
    real_serve = engine.serve
    monkeypatch.setattr(engine, "serve", lambda should_stop: release.wait(10) and real_serve(should_stop))
    engine.start()
    assert engine.serving and engine._thread.daemon  # before the thread has run a line of serve()
    release.set()
    time.sleep(0.5)
    stopper = threading.Thread(target=engine.stop, daemon=True)
    stopper.start()
    stopper.join(timeout=10)
    assert not stopper.is_alive(), "stop() did not return: the idle loop never checked should_stop"
    assert 1 <= len(steps) <= 20 and not engine.serving  # ~10 idle wake-ups in 0.5 s, not thousands
    assert llm.generate([2, 3, 4], max_new_tokens=2, temperature=0).token_ids  # stepped by the caller again
    engine.start()  # and the thread can start again
    try:
        assert engine._thread.is_alive()
    finally:
        engine.stop()


def test_a_failing_forward_ends_every_request_and_frees_its_slots(load, monkeypatch):
    llm = load("llama", engine=dict(kv_tokens=300))
    handles = [llm.submit(list(range(2, 20 + i)), max_new_tokens=5, temperature=0) for i in range(3)]
    llm.engine.step()

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr("minillm.engine.forward_batch.run", broken)
    with pytest.raises(RuntimeError, match="planted"):
        llm.engine.step()
    for h in handles:
        with pytest.raises(RuntimeError, match="planted"):
            h.result()
        assert h.request.finish_reason == "error"
    llm.engine.scheduler.check_invariants()
    assert not llm.engine.scheduler.has_work and llm.prefix_cache.protected_tokens == 0


class EngineMachine(RuleBasedStateMachine):
    """Pool + tree + scheduler under random submits, steps and aborts, with a pool small enough that
    eviction and preemption happen all the time; every finished request must equal its lone run."""

    def __init__(self):
        super().__init__()
        self.llm = EngineMachine.llm
        self.llm.configure(kv_tokens=60, max_batch=3, max_prefill_tokens=8, poison_freed=True)
        self.handles = []

    @rule(
        base=st.sampled_from([[5, 6, 7, 8, 9, 10], [5, 6, 7, 30], [40]]),
        tail=st.lists(st.integers(2, 299), max_size=8),
        new=st.integers(1, 10),
    )
    def submit(self, base, tail, new):
        self.handles.append((base + tail, new, self.llm.submit(base + tail, max_new_tokens=new, temperature=0)))

    @rule()
    def step(self):
        self.llm.engine.step()

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 100))
    def abort(self, index):
        self.handles[index % len(self.handles)][2].abort()

    @invariant()
    def accounting_holds(self):
        self.llm.engine.scheduler.check_invariants()

    def teardown(self):
        self.llm.engine.run_until_done()
        self.llm.engine.scheduler.check_invariants()
        for prompt, new, handle in self.handles:
            result = handle.result()
            if result.finish_reason != "abort":
                assert result.token_ids == EngineMachine.alone(prompt, new)


@pytest.fixture
def engine_machine(load):
    llm = load("llama")
    llm.defaults.eos_token_ids = []
    memo = {}

    def alone(prompt, new):
        key = (tuple(prompt), new)
        if key not in memo:
            memo[key] = llm.generate(prompt, max_new_tokens=new, temperature=0, use_prefix_cache=False).token_ids
        return memo[key]

    EngineMachine.llm, EngineMachine.alone = llm, staticmethod(alone)
    return EngineMachine


def test_engine_state_machine(engine_machine):
    run = engine_machine.TestCase()
    run.settings = settings(
        max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    run.runTest()


def test_identical_prompts_submitted_together_share_one_prefill(load):
    """What the server's `n` relies on: the first computes the prompt, the others wait a step and reuse it."""
    llm = load("llama", engine=dict(kv_tokens=4096))
    prompt = list(range(2, 12))  # shorter than SHARE_WAIT_TOKENS: identical prompts wait all the same
    handles = [llm.submit(prompt, max_new_tokens=3, temperature=1.0, seed=i) for i in range(3)]
    results = [h.result() for h in handles]
    assert [r.cached_tokens for r in results] == [0, len(prompt) - 1, len(prompt) - 1]
    assert llm.prefix_cache.stats.computed_tokens == len(prompt) + 2  # one prefill, then the last token each


@pytest.mark.parametrize("top", [0, 3])
def test_logprobs_are_those_of_the_raw_logits_batched_or_alone(load, top):
    """Each generated token's logprob is log_softmax of that step's raw logits (not of the sampling
    distribution), with the `top` likeliest tokens best first, and batching does not change them."""
    llm = load("llama")
    options = dict(
        max_new_tokens=5, temperature=0.7, top_k=5, seed=1, ignore_eos=True, return_logits=True, logprobs=top
    )
    prompts = [list(range(2, 20)), list(range(40, 47))]
    alone = [llm.generate(p, **options) for p in prompts]
    handles = [llm.submit(p, **options) for p in prompts]
    batched = [h.result() for h in handles]
    for a, b in zip(alone, batched):
        assert len(a.logprobs) == len(a.token_ids) == 5
        for step, (token, lp) in enumerate(zip(a.token_ids, a.logprobs)):
            expected = torch.log_softmax(a.logits[step], dim=-1)
            assert lp.token == token and lp.logprob == pytest.approx(float(expected[token]), abs=1e-5)
            best = expected.topk(top) if top else None
            assert [t for t, _ in lp.top] == ([] if best is None else best.indices.tolist())
            assert [v for _, v in lp.top] == pytest.approx([] if best is None else best.values.tolist(), abs=1e-5)
        assert b.token_ids == a.token_ids
        assert [x.logprob for x in b.logprobs] == pytest.approx([x.logprob for x in a.logprobs], abs=1e-4)
    assert llm.generate(prompts[0], max_new_tokens=2).logprobs is None


@pytest.mark.parametrize(
    "penalties",
    [dict(repetition_penalty=0.2), dict(presence_penalty=-2.0, frequency_penalty=-1.0)],
    ids=["repetition", "presence-frequency"],
)
def test_penalties_see_the_prompt_and_every_token_generated_so_far(load, penalties):
    """Each step's token is the argmax of that step's raw logits after the repetition penalty over prompt and
    output so far, or the presence/frequency penalties over the output so far (greedy, so checkable). The
    settings favour repeats, so a history that missed the newest tokens would pick other tokens."""
    from minillm.engine.sampling import presence_frequency_penalty, repetition_penalty

    llm = load("llama")
    prompt = [5, 6, 7, 5, 9]
    out = llm.generate(prompt, max_new_tokens=24, temperature=0, ignore_eos=True, return_logits=True, **penalties)
    for step, token in enumerate(out.token_ids):
        logits = out.logits[step][None]
        if "repetition_penalty" in penalties:
            logits = repetition_penalty(logits, torch.tensor(prompt + out.token_ids[:step]), 0.2)
        else:
            counts = torch.bincount(torch.tensor(out.token_ids[:step], dtype=torch.int64), minlength=logits.shape[1])
            logits = presence_frequency_penalty(
                logits, counts.float(), penalties["presence_penalty"], penalties["frequency_penalty"]
            )
        assert token == int(logits.argmax())


def test_a_completion_reports_its_rates_and_fields():
    from minillm.engine.request import Completion

    c = Completion(
        text="ab",
        token_ids=[1, 2, 3],
        prompt_tokens=12,
        finish_reason="length",
        cached_tokens=2,
        computed_tokens=10,
        prefill_s=2.0,
        ttft_s=2.5,
        decode_s=4.0,
        forced_tokens=1,
        draft_proposed=7,
        draft_accepted=5,
    )
    assert c.prefill_tok_s == 5.0 and c.decode_tok_s == 0.5  # 2 decode steps in 4 s (the first token: prefill)
    assert c.to_dict() == {
        "text": "ab",
        "token_ids": [1, 2, 3],
        "prompt_tokens": 12,
        "finish_reason": "length",
        "cached_tokens": 2,
        "computed_tokens": 10,
        "forced_tokens": 1,
        "ttft_s": 2.5,
        "timings": {
            "prefill_s": 2.0,
            "ttft_s": 2.5,
            "decode_s": 4.0,
            "prefill_tok_s": 5.0,
            "decode_tok_s": 0.5,
            "draft_proposed": 7,
            "draft_accepted": 5,
        },
    }
    idle = Completion(text="", token_ids=[1], prompt_tokens=1, finish_reason="stop")
    assert idle.prefill_tok_s == 0.0 and idle.decode_tok_s == 0.0  # no time measured, one token: no rate


def test_a_completion_counts_its_prompt_and_times_its_phases(load):
    """prompt_tokens, cached + computed = prompt, and the phases in order: admitted after submission, first token
    after admission, decode after the first token."""
    llm = load("llama", engine=dict(max_batch=1))
    prompt = list(range(2, 40))
    llm.generate(prompt[:30], max_new_tokens=1)
    start = time.perf_counter()
    c = llm.generate(prompt, max_new_tokens=4, temperature=0, ignore_eos=True)
    elapsed = time.perf_counter() - start
    assert c.prompt_tokens == 38 and c.cached_tokens == 30 and c.computed_tokens == 8
    assert 0 < c.prefill_s <= c.ttft_s < c.ttft_s + c.decode_s <= elapsed
    # never admitted (aborted while another request runs): no prefill time, no token, no logits
    running = llm.submit(prompt, max_new_tokens=3, temperature=0)
    waiting = llm.submit(prompt[:20], max_new_tokens=3, return_logits=True)
    llm.engine.step()
    waiting.abort()
    running.result()
    c = waiting.result()
    assert c.finish_reason == "abort" and c.token_ids == [] and c.logits is None and c.prefill_s == 0.0
    assert 0 <= c.ttft_s and c.decode_s == 0.0


def test_a_request_keeps_a_token_history_only_for_the_penalties_that_need_it(load):
    llm = load("llama")
    plain = llm.request([5, 6, 7], max_new_tokens=2)
    assert plain.sampler.seen is None and plain.sampler.counts is None
    assert llm.request([5, 6], max_new_tokens=2, repetition_penalty=2.0).sampler.seen.tolist() == [5, 6]
    assert llm.request([5, 6], max_new_tokens=2, presence_penalty=0.5).sampler.counts.shape == (llm.config.vocab_size,)
    handle = llm.submit([5, 6], max_new_tokens=10, temperature=0, ignore_eos=True, frequency_penalty=-2.0)
    generated = handle.result().token_ids  # the negative penalty makes tokens repeat
    expected = torch.bincount(torch.tensor(generated), minlength=llm.config.vocab_size).float()
    assert expected.max() > 1 and torch.equal(handle.request.sampler.counts, expected)
