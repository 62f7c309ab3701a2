"""Speculative decoding changes nothing: in exact mode bitwise (tokens, logits, logprobs), in fast mode in
distribution (a chi-square test); rejected drafts, failures and preemption leak no slot."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm import LLM
from minillm.engine.drafters import DraftModel, PromptLookup, TreeLookup
from minillm.engine.speculation import Speculation, draft_length

CHUNK = 16
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_loaded = {}


class Oracle:
    """A test drafter: proposes the plain run's own continuation (`reference`: prompt -> its generated ids),
    spoiled from draft position `wrong_from` on (0: every guess wrong; None: every guess right)."""

    prompt_s = 0.0

    def __init__(self, reference: dict, wrong_from: int | None, vocab: int):
        self.reference, self.wrong_from, self.vocab = reference, wrong_from, vocab
        self.calls = 0

    def propose(self, wanted):
        self.calls += 1
        drafts = []
        for r, k in wanted:
            truth = self.reference[tuple(r.prompt)][len(r.generated) : len(r.generated) + k]
            if self.wrong_from is not None:
                truth = truth[: self.wrong_from] + [(t + 1) % self.vocab for t in truth[self.wrong_from :]]
            drafts.append(truth)
        return drafts

    def forget(self, request):
        pass


@pytest.fixture
def exact_llm(checkpoint):
    def get(family="qwen2", dtype=torch.float32, **engine):
        key = (family, dtype)
        if key not in _loaded:
            llm = LLM.load(checkpoint(family), dtype=dtype, exact=True)
            llm.defaults.eos_token_ids = []  # run every step
            _loaded[key] = llm
        _loaded[key].configure(**{"exact_chunk": CHUNK, "kv_tokens": 1000, **engine})  # a small pool: quick checks
        return _loaded[key]

    return get


def run_checked(llm, prompts, concurrent, **options):
    """Generate each prompt (all submitted at once, or one after another), checking the KV ownership
    invariant after every step; the completions."""
    out = []
    batches = [prompts] if concurrent else [[p] for p in prompts]
    for batch in batches:
        handles = [llm.submit(p, **options) for p in batch]
        while llm.engine.step():
            llm.check_invariants()
        out += [h.result() for h in handles]
    return out


def assert_same(plain, spec):
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.logits, b.logits), "a step's logits differ"
        assert [(t.token, t.logprob, t.top) for t in a.logprobs] == [(t.token, t.logprob, t.top) for t in b.logprobs]


prompts = st.lists(st.integers(2, 299), min_size=2, max_size=40)


@pytest.mark.parametrize("drafter", ["oracle", "lookup", "radix", "draft"])
@PROPERTY
@given(
    base=prompts,
    tails=st.lists(st.lists(st.integers(2, 299), max_size=12), min_size=1, max_size=3),
    concurrent=st.booleans(),
    cache=st.booleans(),
    sampling=st.sampled_from([{"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.3}]),
    wrong_from=st.sampled_from([None, 0, 1, 3]),
    k=st.integers(1, 6),
)
def test_speculation_changes_no_bit_in_exact_mode(exact_llm, drafter, base, tails, concurrent, cache, sampling,
                                                  wrong_from, k):  # fmt: skip
    """Every drafter, greedy and seeded sampling (penalties included), alone and batched, cached and uncached,
    drafts all right, all wrong or right up to a point: tokens, every step's logits and logprobs are bitwise
    those of plain decoding, and the KV invariant holds after every step."""
    llm = exact_llm()
    prompts = [base + t for t in tails]
    options = dict(max_new_tokens=10, use_prefix_cache=cache, return_logits=True, logprobs=2, **sampling)
    seeded = [dict(options, seed=i) for i in range(len(prompts))]

    def generate():
        if concurrent:
            handles = [llm.submit(p, **o) for p, o in zip(prompts, seeded)]
            while llm.engine.step():
                llm.check_invariants()
            return [h.result() for h in handles]
        return [run_checked(llm, [p], False, **o)[0] for p, o in zip(prompts, seeded)]

    plain = generate()
    if drafter == "oracle":
        llm.configure(exact_chunk=CHUNK, kv_tokens=1000)
        reference = {tuple(c_prompt): c.token_ids for c_prompt, c in zip(map(llm.prompt_ids, prompts), plain)}
        oracle = Oracle(reference, wrong_from, llm.config.vocab_size)
        llm.engine.speculation = Speculation(oracle, llm.engine.kv, k, adaptive=False)
    else:
        llm.configure(exact_chunk=CHUNK, kv_tokens=1000, speculate=drafter, num_draft_tokens=k)
        llm.engine.speculation.adaptive = False  # guess wherever the drafter can
    spec = generate()
    assert_same(plain, spec)
    proposed = sum(c.draft_proposed for c in spec)
    accepted = sum(c.draft_accepted for c in spec)
    assert accepted <= proposed
    if drafter == "oracle":
        assert proposed > 0
        if wrong_from is None and sampling["temperature"] == 0:
            assert accepted == proposed  # every guess right: taken whole
        if wrong_from == 0:
            assert accepted == 0
    assert llm.prefix_cache.protected_tokens == 0


def test_a_draft_taken_whole_saves_its_forwards(load, monkeypatch):
    """With every guess right, a request of 12 tokens and drafts of 3 takes 4 tokens per verify: its prompt's
    forward plus 3 verify steps (12 = 1 + 4 + 4 + 3), each verify a k + 1-row segment."""
    import minillm.engine.forward_batch

    llm = load("llama")  # fast mode: one forward per step, a draft's rows in one segment
    llm.defaults.eos_token_ids = []
    prompt = list(range(5, 25))
    plain = llm.generate(prompt, max_new_tokens=12, temperature=0)
    oracle = Oracle({tuple(prompt): plain.token_ids}, None, llm.config.vocab_size)
    llm.engine.speculation = Speculation(oracle, llm.engine.kv, 3, adaptive=False)
    rows = []
    real = minillm.engine.forward_batch.run
    monkeypatch.setattr(
        minillm.engine.forward_batch,
        "run",
        lambda m, p, s, v: rows.append([len(x.tokens) for x in s]) or real(m, p, s, v),
    )
    spec = llm.generate(prompt, max_new_tokens=12, temperature=0, use_prefix_cache=False)
    assert spec.token_ids == plain.token_ids
    assert (spec.draft_proposed, spec.draft_accepted) == (3 + 3 + 2, 3 + 3 + 2)
    assert rows[1:] == [[4], [4], [3]]  # the last draft is cut to what max_new_tokens leaves


def test_rejected_drafts_free_their_slots_in_the_same_step(exact_llm):
    """A draft of k wrong guesses holds k slots for one forward; after the step the request owns exactly the
    slots of its tokens again (num_allocated == num_tokens), and the other guesses' slots are free."""
    llm = exact_llm("llama", kv_tokens=400)
    prompt = list(range(5, 25))
    plain = llm.generate(prompt, max_new_tokens=8, temperature=0, use_prefix_cache=False)
    llm.configure(exact_chunk=CHUNK, kv_tokens=400)
    llm.engine.speculation = Speculation(
        Oracle({tuple(prompt): plain.token_ids}, 0, llm.config.vocab_size), llm.engine.kv, 5, adaptive=False
    )
    h = llm.submit(prompt, max_new_tokens=8, temperature=0, use_prefix_cache=False)
    r = h.request
    while not r.generated:  # the prompt, in chunks
        llm.engine.step()
    free = llm.engine.pool.free_slots
    llm.engine.step()  # a decode row with 5 wrong guesses
    assert r.draft_proposed == 5 and r.draft_accepted == 0
    assert r.num_allocated == r.num_tokens and r.num_computed == r.num_tokens - 1
    # the fed token's slot, and the first guess's kept for the token picked in its place; the other 4 are back
    assert llm.engine.pool.free_slots == free - 2
    llm.check_invariants()
    assert h.result().token_ids == plain.token_ids


def test_a_failed_verify_forward_and_an_abort_leave_no_slot_behind(exact_llm, monkeypatch):
    """The forward of a step with drafts fails: every request ends with the error and every slot, the
    drafts' included, is free or the tree's. An abort between verify steps frees everything as well."""
    llm = exact_llm("llama", kv_tokens=400)
    prompts = [list(range(5, 25)), list(range(7, 30))]
    plain = [llm.generate(p, max_new_tokens=8, temperature=0) for p in prompts]
    reference = {tuple(p): c.token_ids for p, c in zip(prompts, plain)}
    llm.configure(exact_chunk=CHUNK, kv_tokens=400)
    llm.engine.speculation = Speculation(Oracle(reference, 2, llm.config.vocab_size), llm.engine.kv, 4, adaptive=False)
    handles = [llm.submit(p, max_new_tokens=8, temperature=0) for p in prompts]
    llm.engine.step()
    llm.engine.step()  # verifies drafts, rejects their tails
    handles[0].abort()
    llm.engine.step()
    assert handles[0].request.finish_reason == "abort"
    llm.check_invariants()

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr("minillm.engine.forward_batch.run", broken)
    with pytest.raises(RuntimeError, match="planted"):
        llm.engine.step()
    assert handles[1].request.finish_reason == "error"
    llm.check_invariants()
    assert llm.engine.pool.free_slots + llm.prefix_cache.total_tokens == llm.engine.pool.num_slots
    assert llm.prefix_cache.protected_tokens == 0


def test_a_failing_row_of_a_draft_ends_its_request_alone(exact_llm):
    """Row 2 of a verified draft has NaN logits: that request fails alone, its slots come back, and the other
    request's tokens are those of plain decoding."""
    llm = exact_llm("llama", kv_tokens=400)
    prompts = [list(range(5, 25)), list(range(7, 30))]
    plain = [llm.generate(p, max_new_tokens=8, temperature=0) for p in prompts]
    reference = {tuple(p): c.token_ids for p, c in zip(prompts, plain)}
    llm.configure(exact_chunk=CHUNK, kv_tokens=400)
    llm.engine.speculation = Speculation(
        Oracle(reference, None, llm.config.vocab_size), llm.engine.kv, 4, adaptive=False
    )
    handles = [llm.submit(p, max_new_tokens=8, temperature=0) for p in prompts]
    victim = handles[0].request
    real_accept = victim.accept

    def spoiled(logits, draft=()):
        if draft:
            logits = logits.clone()
            logits[2] = float("nan")
        return real_accept(logits, draft)

    victim.accept = spoiled
    while llm.engine.step():
        llm.check_invariants()
    assert victim.finish_reason == "error" and len(victim.generated) == 1 + 2  # the prompt's token, 2 guesses
    assert handles[1].result().token_ids == plain[1].token_ids
    assert llm.prefix_cache.protected_tokens == 0


def test_preempted_speculating_requests_resume_bitwise(exact_llm):
    """A pool too small for every request: speculating requests are preempted and resumed, and still give the
    plain run's bits; the invariant holds after every step."""
    llm = exact_llm("llama", kv_tokens=110, max_batch=4)
    prompts = [list(range(5 + i, 30 + i)) for i in range(4)]
    options = dict(max_new_tokens=14, temperature=0, return_logits=True, logprobs=1)
    plain = [llm.generate(p, **options) for p in prompts]
    reference = {tuple(p): c.token_ids for p, c in zip(prompts, plain)}
    llm.configure(exact_chunk=CHUNK, kv_tokens=110, max_batch=4)
    llm.engine.speculation = Speculation(Oracle(reference, 2, llm.config.vocab_size), llm.engine.kv, 4, adaptive=False)
    spec = run_checked(llm, prompts, True, **options)
    assert llm.engine.scheduler.preemptions > 0
    assert_same(plain, spec)
    assert sum(c.draft_accepted for c in spec) > 0


# -- fast mode: the distribution ------------------------------------------------------------------


def test_sampled_tokens_follow_the_models_distribution_with_speculation(load):
    """Fast mode, temperature 0.05 and top-k 6 (six tokens possible at each step): 2,000 seeded requests of 4
    tokens, drafts of two fixed guesses. The second and third tokens come from verified rows. Their
    frequencies against the model's own distribution (computed exactly, by enumerating the first tokens):
    chi-square, significance 0.001. The guesses are taken sometimes, not always (a rule that took them always
    would make them the only tokens)."""
    llm = load("llama", engine=dict(max_batch=64, kv_tokens=20_000))
    llm.defaults.eos_token_ids = []
    prompt = list(range(5, 17))
    sampling = dict(temperature=0.05, top_k=6)
    from minillm.engine.sampling import Sampler, SamplingParams

    process = Sampler(SamplingParams(**sampling)).process

    def probs(ids):
        return torch.softmax(process(llm.logits(ids)[-1:], None), dim=-1)[0].double()  # [vocab]

    p0 = probs(prompt)
    second = torch.zeros_like(p0)
    third = torch.zeros_like(p0)
    for t0 in p0.nonzero()[:, 0].tolist():
        p1 = probs(prompt + [t0])
        second += p0[t0] * p1
        for t1 in p1.nonzero()[:, 0].tolist():
            third += p0[t0] * p1[t1] * probs(prompt + [t0, t1])
    guesses = [int(second.argmax()), int(third.argmax())]

    class Fixed:
        prompt_s = 0.0

        def propose(self, wanted):
            return [guesses[:k] for _, k in wanted]

        def forget(self, request):
            pass

    llm.engine.speculation = Speculation(Fixed(), llm.engine.kv, 2, adaptive=False)
    n = 2000
    handles = [llm.submit(prompt, max_new_tokens=4, seed=i, **sampling) for i in range(n)]
    results = [h.result() for h in handles]
    proposed = sum(c.draft_proposed for c in results)
    accepted = sum(c.draft_accepted for c in results)
    assert proposed >= 2 * n and 0 < accepted < proposed
    for position, expected in ((1, second), (2, third)):
        counts = torch.bincount(torch.tensor([c.token_ids[position] for c in results]), minlength=len(expected))
        assert counts[expected == 0].sum() == 0, "a token the model gives no probability was produced"
        e = expected * n
        keep = e >= 5
        stat = float((((counts.double() - e) ** 2 / e)[keep]).sum() + ((counts[~keep].sum() - e[~keep].sum()) ** 2
                     / max(float(e[~keep].sum()), 1e-9) if (~keep & (expected > 0)).any() else 0.0))  # fmt: skip
        dof = int(keep.sum()) - 1 + int(bool((~keep & (expected > 0)).any()))
        p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))
        assert p_value > 0.001, f"token {position + 1}: chi-square {stat:.1f} on {dof} dof, p = {p_value:.2g}"


def test_the_chi_square_check_has_power():
    """The same statistic rejects a sampler that always takes its guess a fifth of the time too often."""
    expected = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    wrong = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    n = 2000
    counts = torch.round(wrong * n)
    stat = float(((counts - expected * n) ** 2 / (expected * n)).sum())
    assert float(torch.special.gammaincc(torch.tensor(3 / 2), torch.tensor(stat / 2))) < 0.001


# -- drafters and the adaptive length -------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match(load):
    llm = load("llama")
    lookup = PromptLookup()
    r = llm.request([10, 11, 12, 13, 14, 50, 11, 12, 13, 60, 61, 70, 12, 13], max_new_tokens=8)
    assert lookup.propose([(r, 3)]) == [[60, 61, 70]]  # "12 13": its latest earlier occurrence is followed by 60
    r.generated = [99]  # nothing ends in "13 99"
    assert lookup.propose([(r, 3)]) == [[]]
    r2 = llm.request([10, 11, 12, 13, 14, 50, 11, 12, 13, 60, 5, 11, 12, 13], max_new_tokens=8)
    assert lookup.propose([(r2, 2)]) == [[60, 5]]  # the 4-gram "11 12 13" wins over the 2-gram's later hit


def test_tree_lookup_finds_other_requests_tokens_across_splits_and_forgets_evicted_ones(load):
    llm = load("llama", engine=dict(kv_tokens=400))
    tree = llm.prefix_cache
    drafter = TreeLookup(tree)
    document = list(range(100, 140))
    tree.insert([5, 6] + document, torch.arange(1, 43))
    tree.insert([5, 7, 8], torch.arange(50, 53))  # splits the first edge after [5]
    r = llm.request([20, 21] + document[10:14], max_new_tokens=8)
    assert drafter.propose([(r, 5)]) == [document[14:19]]
    tree.insert([5, 6] + document[:20] + [250, 251], torch.cat((torch.arange(1, 23), torch.tensor([60, 61]))))
    assert drafter.propose([(r, 5)]) == [document[14:19]]  # split at 22, continuation through the old tail
    tree.evict(10_000)
    assert drafter.propose([(r, 5)]) == [[]] and not any(n.parent for n, _ in drafter.after.values())


def test_a_draft_model_equal_to_the_model_guesses_every_greedy_token(load, checkpoint):
    """The draft model is the checkpoint itself: every greedy guess is right; its KV is freed per request."""
    llm = load("llama")
    llm.defaults.eos_token_ids = []
    llm.configure(speculate="draft", draft_model=str(checkpoint("llama")), num_draft_tokens=4)
    llm.engine.speculation.adaptive = False
    out = llm.generate(list(range(5, 30)), max_new_tokens=12, temperature=0)
    plain_llm = load("llama")
    plain = plain_llm.generate(list(range(5, 30)), max_new_tokens=12, temperature=0)
    assert out.token_ids == plain.token_ids
    assert out.draft_accepted == out.draft_proposed > 0
    llm.configure(speculate="draft", draft_model=str(checkpoint("llama")))
    drafter = llm.engine.speculation.drafter
    assert isinstance(drafter, DraftModel)
    llm.generate(list(range(5, 30)), max_new_tokens=12, temperature=0)
    llm.generate(list(range(6, 31)), max_new_tokens=2, temperature=0)  # the first request's draft KV is freed
    assert len(drafter.kv) <= 1
    plain_llm.configure()


def test_a_draft_model_with_another_vocabulary_is_refused(load, checkpoint):
    from minillm.errors import MinillmError

    llm = load("llama")
    with pytest.raises(MinillmError, match="does not share this model's tokenizer"):
        llm.configure(speculate="draft", draft_model=str(checkpoint("llama", vocab_size=352)))
    with pytest.raises(MinillmError, match="only with speculate 'draft'"):
        llm.configure(speculate="lookup", draft_model=str(checkpoint("llama")))
    with pytest.raises(MinillmError, match="unknown speculation"):
        llm.configure(speculate="sometimes")
    llm.configure()


def test_draft_length_pays_alone_and_stops_in_a_large_batch():
    assert draft_length(0.9, 1, 8) == 8 and draft_length(0.5, 1, 8) >= 3
    assert draft_length(0.3, 16, 8) == 0 and draft_length(0.05, 1, 8) == 0
    lengths = [draft_length(0.6, b, 8) for b in (1, 2, 4, 8, 16, 32)]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert [draft_length(a, 4, 8) for a in (0.3, 0.5, 0.7, 0.9)] == sorted(
        draft_length(a, 4, 8) for a in (0.3, 0.5, 0.7, 0.9)
    )
    assert draft_length(1.0, 32, 5) == 5


def test_adaptive_speculation_stops_guessing_when_guesses_fail(exact_llm):
    """Always-wrong guesses: the acceptance estimate falls below the break-even and the request stops being
    given drafts after a few tries (then probes now and then as the estimate drifts back)."""
    llm = exact_llm("llama")
    prompt = list(range(5, 25))
    plain = llm.generate(prompt, max_new_tokens=40, temperature=0)
    oracle = Oracle({tuple(prompt): plain.token_ids}, 0, llm.config.vocab_size)
    llm.engine.speculation = Speculation(oracle, llm.engine.kv, 8)
    spec = llm.generate(prompt, max_new_tokens=40, temperature=0)
    assert spec.token_ids == plain.token_ids
    assert 0 < oracle.calls < 20 and spec.draft_proposed < 40


def test_a_stop_string_inside_an_accepted_draft_ends_the_request_where_plain_decoding_does(exact_llm):
    """The stop string's text is reached in the middle of a draft taken whole: the request ends there, with
    the same text, tokens and finish reason as without speculation, and leaks no slot."""
    llm = exact_llm("llama")
    prompt = list(range(5, 25))
    full = llm.generate(prompt, max_new_tokens=20, temperature=0)
    text = full.text
    assert len(text) > 8
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    plain = llm.generate(prompt, max_new_tokens=20, temperature=0, stop=stop)
    assert plain.finish_reason == "stop"
    llm.configure(exact_chunk=CHUNK, kv_tokens=1000)
    oracle = Oracle({tuple(prompt): full.token_ids}, None, llm.config.vocab_size)
    llm.engine.speculation = Speculation(oracle, llm.engine.kv, 6, adaptive=False)
    (spec,) = run_checked(llm, [prompt], False, max_new_tokens=20, temperature=0, stop=stop)
    assert (spec.text, spec.token_ids, spec.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)
    assert spec.draft_accepted > 0
    assert llm.prefix_cache.protected_tokens == 0
