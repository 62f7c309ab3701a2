"""Exact mode: with the prefix cache on or off, logits are bitwise equal (torch.equal, no tolerance)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm import LLM

CHUNK = 16  # small chunks, so short prompts span several
FAMILIES = [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", dict(sliding_window=12))]
DTYPES = [torch.float32, torch.bfloat16]
PROPERTY = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

prompts = st.lists(st.integers(2, 299), min_size=2, max_size=70)
_loaded = {}


@pytest.fixture
def exact_llm(checkpoint):
    def get(family, options, dtype, **engine):
        key = (family, str(options), dtype)
        if key not in _loaded:
            llm = LLM.load(checkpoint(family, **options), dtype=dtype, exact=True)
            llm.defaults.eos_token_ids = []  # run every step
            _loaded[key] = llm
        _loaded[key].configure(exact_chunk=CHUNK, **engine)
        return _loaded[key]

    return get


def run(llm, prompt, cache, **sampling):
    return llm.generate(prompt, max_new_tokens=6, use_prefix_cache=cache, return_logits=True, **sampling)


def assert_bitwise_same(a, b):
    assert torch.equal(a.logits[0], b.logits[0]), "last prompt token's logits differ"
    assert torch.equal(a.logits, b.logits), "decode-step logits differ"
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,options", FAMILIES, ids=[f[0] for f in FAMILIES])
@PROPERTY
@given(prompt=prompts, data=st.data())
def test_cache_on_and_off_bitwise_equal(exact_llm, family, options, dtype, prompt, data):
    budget = data.draw(st.sampled_from([100_000, 80]), label="KV pool (tokens)")
    llm = exact_llm(family, options, dtype, kv_tokens=budget, poison_freed=True)
    for _ in range(data.draw(st.integers(0, 3), label="earlier requests")):
        cut = data.draw(st.integers(1, len(prompt)), label="shared length")
        tail = data.draw(st.lists(st.integers(2, 299), max_size=20), label="other tail")
        llm.generate(prompt[:cut] + tail, max_new_tokens=3, temperature=1.0, seed=data.draw(st.integers(0, 9)))
    cold = run(llm, prompt, cache=False, temperature=0)
    warm = run(llm, prompt, cache=True, temperature=0)
    assert_bitwise_same(cold, warm)
    hot = run(llm, prompt, cache=True, temperature=0)  # the prompt itself is cached now
    if budget == 100_000:
        assert hot.cached_tokens == (len(prompt) - 1) // CHUNK * CHUNK
    assert_bitwise_same(cold, hot)
    seed = data.draw(st.integers(0, 2**32), label="seed")
    sampled = [run(llm, prompt, cache=c, temperature=0.9, top_p=0.9, seed=seed) for c in (False, True)]
    assert_bitwise_same(*sampled)
    llm.engine.scheduler.check_invariants()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    base=prompts,
    tails=st.lists(st.lists(st.integers(2, 299), min_size=1, max_size=30), min_size=2, max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_same_prompts_in_any_order_give_the_same_bits(exact_llm, dtype, base, tails, order):
    llm = exact_llm("qwen2", {}, dtype)
    requests = [base + t for t in tails]
    cold = [run(llm, p, cache=False, temperature=0) for p in requests]
    shuffled = list(range(len(requests)))
    order.shuffle(shuffled)
    for i in shuffled:
        assert_bitwise_same(cold[i], run(llm, requests[i], cache=True, temperature=0))
    assert llm.prefix_cache.stats.hit_tokens > 0 or len(base) < CHUNK


def test_reuse_is_in_whole_chunks_and_decode_kv_is_not_cached(exact_llm):
    llm = exact_llm("llama", {}, torch.float32)
    prompt = list(range(2, 52))  # 50 tokens
    first = run(llm, prompt, cache=True, temperature=0)
    assert first.cached_tokens == 0
    assert llm.prefix_cache.total_tokens == 50  # the prompt only: no decode-step KV
    longer = run(llm, prompt + first.token_ids + [9, 9], cache=True, temperature=0)
    assert longer.cached_tokens == 48  # 50 cached tokens, rounded down to whole 16-token chunks


def test_bitwise_on_the_bundled_model_with_prepacked_weights():
    """The tiny test models have hidden size 64; the bundled model's 256 gives the prepacked (oneDNN)
    kernels real blocking to do. Exact mode must hold with the default weights there too."""
    llm = LLM.load(dtype="float32", exact=True)
    llm.defaults.eos_token_ids = []
    chunk = 64
    text = "import os\nimport sys\n\n\ndef main(argv):\n    for name in sorted(os.listdir(argv[1])):\n"
    doc = llm.tokenizer.encode(text * 8)
    assert len(doc) > 3 * chunk
    llm.generate(doc[: 2 * chunk + 5] + [7, 8, 9], max_new_tokens=3)  # caches two whole chunks
    cold = run(llm, doc, cache=False, temperature=0)
    warm = run(llm, doc, cache=True, temperature=0)
    assert warm.cached_tokens == 2 * chunk
    assert_bitwise_same(cold, warm)


def test_tiles_have_fixed_shapes_and_sample_only_where_asked(load):
    """exact.tiles on a step with a resumed request's replay row (no sampling), two decode rows and a prompt of
    a chunk and a row: decode rows go together, one row each, padded to decode_rows; the prompt's chunks start
    on chunk boundaries and are padded to a whole chunk, whatever their length, logits only where it samples."""
    from minillm.cache.kv_pool import DUMP_SLOT
    from minillm.engine.exact import tiles
    from minillm.engine.plan import Work

    llm = load("llama")

    def request(prompt_length, generated=0):
        r = llm.request(list(range(2, 2 + prompt_length)), max_new_tokens=8)
        r.generated = list(range(100, 100 + generated))
        return r

    replay, a, b, prompt = request(5, 3), request(4, 1), request(6, 2), request(9)
    works = [Work(replay, 6, 1, False), Work(a, 4, 1, True), Work(prompt, 0, 9, True), Work(b, 7, 1, True)]
    out = tiles(works, chunk=8, decode_rows=4)
    assert len(out) == 3
    first_chunk, last_row, decode = out
    assert [(s.start, len(s.tokens), s.logit_rows, w) for s, w in first_chunk] == [(0, 8, range(0), None)]
    ((segment, work),) = last_row
    assert (segment.start, len(segment.tokens), segment.logit_rows, work) == (
        8,
        8,
        range(1),
        works[2],
    )  # 1 row + 7 padding
    assert segment.tokens[1:] == [0] * 7 and segment.slots[9:].tolist() == [DUMP_SLOT] * 7
    assert [(s.start, len(s.tokens), s.logit_rows) for s, _ in decode] == [
        (6, 1, range(1)),
        (4, 1, range(1)),
        (7, 1, range(1)),
        (0, 1, range(1)),
    ]
    assert [w for _, w in decode] == [None, works[1], works[3], None]  # the replay row and the padding pick nothing
    # a prompt's last token alone (the rest was cached) is still a prefill chunk, not a decode row
    cached = request(9)
    (((segment, work),),) = tiles([Work(cached, 8, 1, True)], chunk=8, decode_rows=4)
    assert (segment.start, len(segment.tokens), segment.logit_rows) == (8, 8, range(1))
