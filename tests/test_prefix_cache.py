"""The prefix cache inside the engine: a cache hit must compute what a cold run computes."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAMILIES = [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", dict(sliding_window=8))]
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

prompts = st.lists(st.integers(2, 299), min_size=2, max_size=40)


def assert_same_greedy(llm, prompt, cached, cold):
    """Token-identical, except that a near-tie (top-2 logits within 1e-4 in the cold run) may break either
    way when the two runs differ in the last bits; then both must agree up to that step."""
    if cached == cold:
        return
    step = next(i for i, (a, b) in enumerate(zip(cached, cold)) if a != b)
    top2 = llm.logits(prompt + cold[:step])[-1].topk(2).values
    assert top2[0] - top2[1] < 1e-4, f"greedy tokens differ at step {step} without a near-tie"


@pytest.mark.parametrize("family,options", FAMILIES)
@PROPERTY
@given(prompt=prompts, data=st.data())
def test_cache_hit_logits_equal_cold_logits(load, family, options, prompt, data):
    llm = load(family, **options)
    split = data.draw(st.integers(1, len(prompt) - 1), label="split")
    for _ in range(data.draw(st.integers(0, 3), label="earlier requests")):  # unrelated or overlapping history
        other = data.draw(prompts, label="earlier")
        llm.generate(other, max_new_tokens=2, temperature=0)
    llm.generate(prompt[:split], max_new_tokens=1, temperature=0)  # caches the first `split` tokens
    hit = llm.generate(prompt, max_new_tokens=1, temperature=0, return_logits=True)
    assert split <= hit.cached_tokens <= len(prompt) - 1
    torch.testing.assert_close(hit.logits[0], llm.logits(prompt)[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,options", FAMILIES)
@PROPERTY
@given(prompt=prompts, data=st.data())
def test_greedy_generation_same_with_cache_on_and_off_under_eviction(load, family, options, prompt, data):
    budget = data.draw(st.sampled_from([10_000, 64, 52]), label="KV pool (tokens)")
    llm = load(family, engine=dict(kv_tokens=budget, poison_freed=True), **options)
    for _ in range(data.draw(st.integers(0, 3), label="earlier requests")):
        cut = data.draw(st.integers(1, len(prompt)), label="shared part")
        tail = data.draw(st.lists(st.integers(2, 299), max_size=10), label="other tail")
        llm.generate(prompt[:cut] + tail, max_new_tokens=4, temperature=0)
    cold = llm.generate(prompt, max_new_tokens=10, temperature=0, use_prefix_cache=False)
    warm = llm.generate(prompt, max_new_tokens=10, temperature=0)
    assert cold.cached_tokens == 0 and warm.cached_tokens + warm.computed_tokens == len(prompt)
    assert_same_greedy(llm, prompt, warm.token_ids, cold.token_ids)
    again = llm.generate(prompt, max_new_tokens=10, temperature=0)  # now the whole prompt is cached...
    if budget == 10_000:
        assert again.cached_tokens == len(prompt) - 1  # ...all but the last token, whose logits are needed
    assert_same_greedy(llm, prompt, again.token_ids, cold.token_ids)
    llm.engine.scheduler.check_invariants()


def test_eviction_never_touches_kv_a_running_request_holds(load):
    llm = load("qwen3", engine=dict(kv_tokens=72, poison_freed=True))
    rng = random.Random(0)
    prompt = [rng.randrange(2, 300) for _ in range(30)]
    expected = llm.generate(prompt, max_new_tokens=12, temperature=0, use_prefix_cache=False).token_ids
    llm.generate(prompt[:20], max_new_tokens=1, temperature=0)  # cache a prefix
    stream = llm.stream(prompt, max_new_tokens=12, temperature=0)
    iterator = iter(stream)
    next(iterator)  # the request is running: its prefix is matched and locked
    for _ in range(6):  # other requests fill the pool far past its size
        llm.generate([rng.randrange(2, 300) for _ in range(25)], max_new_tokens=3, temperature=0)
    assert llm.prefix_cache.stats.evicted_tokens > 0
    llm.engine.scheduler.check_invariants()
    for _ in iterator:
        pass
    result = stream.completion
    assert result.cached_tokens == 20 and result.token_ids == expected
    logits = llm.logits(prompt + result.token_ids)
    assert not torch.isnan(logits).any()


def test_rag_scenario_only_first_question_per_document_misses(load):
    """The course article's experiment: two documents, several questions each, in mixed order."""
    llm = load("llama", max_position_embeddings=1024)
    docs = {
        "fox": "The quick brown fox jumps over the lazy dog. " * 12,
        "code": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 8,
    }
    questions = ["What happens?", "Who is lazy?", "How many times?", "Why?"]
    requests = [(d, q) for d in docs for q in questions]
    random.Random(4).shuffle(requests)
    seen_docs = set()
    for doc, question in requests:
        prompt = f"Document:\n{docs[doc]}\nQuestion: {question}\nAnswer:"
        doc_tokens = len(llm.tokenizer.encode(f"Document:\n{docs[doc]}\nQuestion:"))
        result = llm.generate(prompt, max_new_tokens=4, temperature=0)
        if doc in seen_docs:
            assert result.cached_tokens >= doc_tokens, "a repeated document was not reused whole"
        else:
            assert result.cached_tokens < doc_tokens // 4, "first sight of a document cannot hit"
            seen_docs.add(doc)
    stats = llm.prefix_cache.stats
    assert stats.lookups == len(requests) and stats.hit_rate > 0.6


def test_dynamic_rope_models_do_not_reuse_kv(load):
    llm = load(
        "llama", max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=4.0)
    )
    prompt = list(range(2, 40))
    llm.generate(prompt, max_new_tokens=2, temperature=0)
    assert llm.generate(prompt, max_new_tokens=2, temperature=0).cached_tokens == 0
