"""One request never harms another: a failure in one request's own part of a step (its sampler, its logits,
its logprobs, its stop strings) ends that request alone, the batch goes on with the tokens it would have had
anyway, and the pool's ownership invariant holds after every step. Numerically hostile but legal settings
give tokens, not errors."""

import math

import pytest
import torch

from minillm import MinillmError
from minillm.engine import forward_batch
from minillm.engine.sampling import BadLogits

PROMPTS = [list(range(5, 17)), list(range(40, 49)), list(range(70, 85)), list(range(100, 106))]


def step_all(llm, handles):
    """Step the engine until every request is done, checking the invariant after each step."""
    for _ in range(500):
        if all(h.request.finished for h in handles):
            return
        llm.engine.step()
        llm.engine.scheduler.check_invariants()
    raise AssertionError("the requests did not finish in 500 steps")


class FailingSampler:
    """Wraps a request's sampler: the `at`-th call gets logits made hostile by `spoil`, or raises."""

    def __init__(self, sampler, at, spoil=None):
        self.sampler, self.at, self.spoil, self.calls = sampler, at, spoil, 0
        self.params = sampler.params

    def __call__(self, logits):
        self.calls += 1
        if self.calls == self.at:
            if self.spoil is None:
                raise RuntimeError("planted sampler failure")
            logits = self.spoil(logits)
        return self.sampler(logits)

    def record(self, token):
        self.sampler.record(token)


def alone(llm, prompt, **options):
    llm.configure()
    return llm.generate(prompt, **options).token_ids


@pytest.mark.parametrize(
    "spoil, error",
    [
        (None, RuntimeError),
        (lambda logits: torch.full_like(logits, math.nan), BadLogits),  # a model's NaN row
        (lambda logits: torch.full_like(logits, -math.inf), BadLogits),  # nothing can be sampled
    ],
)
def test_a_failing_row_ends_its_request_alone(load, spoil, error, caplog):
    llm = load("llama")
    options = dict(max_new_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    expected = [alone(llm, p, **options) for p in PROMPTS]
    llm.configure()
    requests = [llm.request(p, **options) for p in PROMPTS]
    requests[1].sampler = FailingSampler(requests[1].sampler, at=3, spoil=spoil)
    handles = [llm.engine.submit(r) for r in requests]
    with caplog.at_level("WARNING", logger="minillm.engine"):
        step_all(llm, handles)
    assert requests[1].finish_reason == "error" and isinstance(requests[1].error, error)
    assert len(requests[1].generated) == 2  # two tokens, then its third step failed
    logged = [r.getMessage() for r in caplog.records if r.name == "minillm.engine"]  # one line, naming it
    assert logged == [f"request {requests[1].id} failed in its own part of a step ({requests[1].error!r}); the "
                      "other requests go on"]  # fmt: skip
    with pytest.raises(error):
        handles[1].result()
    for i in (0, 2, 3):
        assert handles[i].result().token_ids == expected[i]  # the others: as if alone
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting
    assert llm.engine.pool.free_slots + llm.prefix_cache.total_tokens == llm.engine.pool.num_slots


def test_generate_of_a_list_finishes_every_prompt_before_raising_the_failure(load, monkeypatch):
    llm = load("llama")
    llm.configure()
    real = llm.request

    def request(prompt, **options):
        r = real(prompt, **options)
        if prompt == PROMPTS[0]:
            r.sampler = FailingSampler(r.sampler, at=1)
        return r

    monkeypatch.setattr(llm, "request", request)
    with pytest.raises(RuntimeError, match="planted"):
        llm.generate(PROMPTS, max_new_tokens=4, temperature=0)
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting  # nothing left behind
    llm.engine.scheduler.check_invariants()


def test_a_failure_while_streaming_a_token_fails_only_that_request(load):
    """The stop-string matcher and the stream are the request's own too."""
    llm = load("llama")
    llm.configure()
    requests = [llm.request(p, max_new_tokens=6, temperature=0, ignore_eos=True) for p in PROMPTS[:2]]

    def broken_feed(piece):
        raise ValueError("planted stop-string failure")

    requests[0].stops.feed = broken_feed
    handles = [llm.engine.submit(r) for r in requests]
    step_all(llm, handles)
    assert requests[0].finish_reason == "error" and isinstance(requests[0].error, ValueError)
    assert handles[1].result().finish_reason == "length"


def test_a_failure_in_the_texts_tail_at_the_end_fails_that_request_with_its_error(load):
    """Finishing releases the text held back (a possible stop string, an incomplete character): if that fails,
    the request ends with "error" and that error, and its stream still gets DONE."""
    llm = load("llama")
    llm.configure()
    requests = [llm.request(p, max_new_tokens=3, temperature=0, ignore_eos=True) for p in PROMPTS[:2]]

    def broken_flush():
        raise ValueError("planted tail failure")

    requests[0].detok.flush = broken_flush
    handles = [llm.engine.submit(r) for r in requests]
    step_all(llm, handles)
    assert requests[0].finish_reason == "error" and str(requests[0].error) == "planted tail failure"
    with pytest.raises(ValueError, match="planted tail failure"):  # its stream ends (DONE came), with the error
        list(handles[0])
    assert handles[1].result().finish_reason == "length"
    llm.check_invariants()


def test_a_failed_forward_fails_the_batch_and_leaves_the_pool_consistent(load, monkeypatch):
    llm = load("llama")
    expected = alone(llm, PROMPTS[0], max_new_tokens=6, temperature=0)
    llm.configure()
    real, calls = forward_batch.run, []

    def failing_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted forward failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_batch, "run", failing_run)
    handles = [llm.submit(p, max_new_tokens=6, temperature=0) for p in PROMPTS]
    with pytest.raises(RuntimeError, match="planted forward"):
        for _ in range(20):
            llm.engine.step()
    assert all(h.request.finish_reason == "error" for h in handles)
    llm.engine.scheduler.check_invariants()
    assert llm.engine.pool.free_slots + llm.prefix_cache.total_tokens == llm.engine.pool.num_slots
    monkeypatch.setattr(forward_batch, "run", real)
    assert llm.generate(PROMPTS[0], max_new_tokens=6, temperature=0).token_ids == expected  # serving goes on


@pytest.mark.parametrize("exact", [False, True])
def test_hostile_but_legal_settings_give_tokens(load, exact):
    """Each of these made the whole batch fail before (NaN probabilities in torch.multinomial)."""
    llm = load("llama")
    llm.exact = exact  # exact mode's step (tiles) on weights packed for fast mode: tokens, not bits, are asserted
    try:
        greedy = alone(llm, PROMPTS[0], max_new_tokens=8, temperature=0)
        assert alone(llm, PROMPTS[0], max_new_tokens=8, temperature=1e-40) == greedy  # below 1e-5: greedy
        for options in (
            dict(temperature=1.0, repetition_penalty=1e-300),
            dict(temperature=1.0, repetition_penalty=1e300),
            dict(temperature=1e-5, top_p=1e-30),
            dict(temperature=1e30, min_p=1.0),
            dict(temperature=0.7, top_k=10**9, frequency_penalty=-2.0, presence_penalty=-2.0),
            dict(temperature=0, repetition_penalty=1e-300),
        ):
            llm.configure()
            handles = [llm.submit(p, max_new_tokens=8, seed=1, **options) for p in PROMPTS]
            outs = [h.result() for h in handles]
            assert all(len(o.token_ids) >= 1 and o.finish_reason in ("stop", "length") for o in outs), options
            assert all(0 <= t < llm.config.vocab_size for o in outs for t in o.token_ids)
            llm.engine.scheduler.check_invariants()
    finally:
        llm.exact = False
        llm.configure()


def test_seeds_are_checked_where_they_enter(load):
    llm = load("llama")
    llm.configure()
    for seed in (2**64 - 1, -(2**63), 0):  # the sampler's whole range works
        assert llm.generate(PROMPTS[0], max_new_tokens=2, temperature=1.0, seed=seed).token_ids
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(MinillmError, match="seed must be"):
            llm.generate(PROMPTS[0], max_new_tokens=2, temperature=1.0, seed=seed)


# -- no client input gets a 5xx: the server's request building, fuzzed ----------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20)
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "n",
    "stream",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
    "echo",
    "suffix",
    "best_of",
    "model",
    "stream_options",
    "user",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
]
# shapes close to legal for the structured fields, so the fuzz reaches past their first check
SCHEMA = st.fixed_dictionaries(
    {"type": st.sampled_from(["object", "string", "integer", "array", "nope"])},
    optional={
        "properties": st.dictionaries(st.text(max_size=4), JSON, max_size=2),
        "enum": JSON,
        "pattern": st.text(max_size=6),
    },
)
NEAR = {
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["json_object", "json_schema", "text", "xml"])},
        optional={"json_schema": st.fixed_dictionaries({}, optional={"schema": SCHEMA | JSON})},
    ),
    "guided_json": SCHEMA,
    "guided_regex": st.text(alphabet="ab()[]{}*+?|0-9\\.", max_size=10),
    "guided_choice": st.lists(st.text(max_size=5), max_size=3),
    "tools": st.lists(
        st.fixed_dictionaries(
            {
                "type": st.just("function"),
                "function": st.fixed_dictionaries(
                    {"name": st.sampled_from(["f", "g", ""])}, optional={"parameters": SCHEMA | JSON}
                ),
            }
        ),
        max_size=2,
    ),  # fmt: skip
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}]),
}
VALUE = {name: (NEAR[name] | JSON) if name in NEAR else JSON for name in FIELDS}
GOOD = {"prompt": "The quick", "messages": [{"role": "user", "content": "hi"}]}
BODY = (
    st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)
    .flatmap(lambda names: st.fixed_dictionaries({n: VALUE[n] for n in names}))
    .map(lambda b: {**GOOD, **b})
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODY, endpoint=st.sampled_from(["completions", "chat"]))
def test_any_json_body_is_built_into_requests_or_refused_with_a_4xx(load, body, endpoint):
    """Whatever fields and values a client sends, building its requests either succeeds (with settings the
    sampler accepts) or raises the API's own 4xx error: never another exception, which would be a 500."""
    import json

    from minillm.serving.handler import build_requests
    from minillm.serving.openai_api import ApiError

    llm = load("llama")
    try:
        _, requests = build_requests(llm, json.dumps(body).encode(), endpoint, "tiny")
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message
        return
    for r in requests:  # what was accepted can be sampled from, within its constraint if it has one
        logits = torch.zeros(1, llm.config.vocab_size)
        if r.constraint is not None and not r.constraint.forced():
            logits = r._masked(logits)
        assert r.sampler(logits) in range(llm.config.vocab_size)
