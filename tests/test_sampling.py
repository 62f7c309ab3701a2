"""Sampling processors against transformers' own, and seeded reproducibility."""

import math

import pytest
import torch

from minillm import MinillmError
from minillm.engine.sampling import (
    Sampler,
    SamplingParams,
    min_p,
    presence_frequency_penalty,
    repetition_penalty,
    top_k,
    top_p,
)


def random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 500, generator=g) * 3


@pytest.mark.parametrize("seed", range(5))
def test_processors_match_transformers(seed):
    from transformers import generation as g

    logits = random_logits(seed)
    seen = torch.randint(0, 500, (30,), generator=torch.Generator().manual_seed(seed))
    ids = seen[None]
    assert torch.equal(
        repetition_penalty(logits, seen, 1.3), g.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    )
    assert torch.equal(top_k(logits, 17), g.TopKLogitsWarper(17)(ids, logits.clone()))
    for p in (0.1, 0.5, 0.9, 1.0):
        assert torch.equal(top_p(logits, p), g.TopPLogitsWarper(p)(ids, logits.clone()))
    for p in (0.01, 0.1, 0.5):
        assert torch.equal(min_p(logits, p), g.MinPLogitsWarper(p)(ids, logits.clone()))
    # The whole chain, in transformers' order.
    chain = g.LogitsProcessorList(
        [
            g.RepetitionPenaltyLogitsProcessor(1.2),
            g.TemperatureLogitsWarper(0.7),
            g.TopKLogitsWarper(50),
            g.TopPLogitsWarper(0.9),
            g.MinPLogitsWarper(0.05),
        ]
    )
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    assert torch.equal(Sampler(params).process(logits, seen), chain(ids, logits.clone()))


def test_greedy_is_argmax_and_same_seed_same_draws():
    logits = random_logits(9)
    seen = torch.tensor([1, 2])
    assert Sampler(SamplingParams(temperature=0))(logits, seen) == int(logits.argmax())
    params = SamplingParams(temperature=1.0, seed=42)
    a, b = Sampler(params), Sampler(params)
    draws = [a(logits, seen) for _ in range(20)]
    assert draws == [b(logits, seen) for _ in range(20)]
    assert len(set(draws)) > 1  # it really samples


def test_seeded_generation_matches_transformers_sampling(checkpoint):
    """Same seed, same processors, same draws: our sampled tokens equal transformers' generate()."""
    from checkpoints import hf_model

    from minillm import LLM

    folder = checkpoint("llama")
    ids = list(range(5, 25))
    opts = dict(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1)
    torch.manual_seed(123)
    with torch.no_grad():
        out = hf_model(folder).generate(
            torch.tensor([ids]),
            do_sample=True,
            max_new_tokens=24,
            min_new_tokens=24,
            eos_token_id=None,
            pad_token_id=0,
            **opts,
        )
    llm = LLM.load(folder)
    llm.defaults.eos_token_ids = []
    assert llm.generate(ids, max_new_tokens=24, seed=123, **opts).token_ids == out[0, len(ids) :].tolist()


def test_same_seed_same_text_different_seed_differs(load):
    llm = load("qwen2")
    a = llm.generate("The quick", max_new_tokens=20, temperature=1.5, seed=7)
    b = llm.generate("The quick", max_new_tokens=20, temperature=1.5, seed=7)
    c = llm.generate("The quick", max_new_tokens=20, temperature=1.5, seed=8)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=1.5),
        dict(repetition_penalty=0.0),
        dict(temperature=float("nan")),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3.0),
        dict(seed=2**64),
        dict(seed=-(2**63) - 1),
        dict(temperature="hot"),
        dict(top_k=2.0),
        dict(seed=True),
        dict(top_p=float("inf")),
    ],
)
def test_invalid_settings_are_refused(bad):
    with pytest.raises(MinillmError, match="invalid setting") as refused:
        Sampler(SamplingParams(**bad))
    assert refused.value.name == next(iter(bad)) and next(iter(bad)) in str(refused.value)


def test_presence_and_frequency_penalties_as_openai_defines_them():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(50)
    counts[3], counts[7] = 2, 1  # generated twice and once
    out = presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    expected = logits.clone()
    expected[0, 3] -= 0.5 + 2 * 0.25
    expected[0, 7] -= 0.5 + 1 * 0.25
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_frequency_penalty_breaks_a_greedy_loop(load):
    llm = load("llama")
    llm.defaults.eos_token_ids = []
    plain = llm.generate("The quick", max_new_tokens=30, temperature=0).token_ids
    penalized = llm.generate("The quick", max_new_tokens=30, temperature=0, frequency_penalty=2.0).token_ids
    assert max(plain.count(t) for t in plain) > max(penalized.count(t) for t in penalized)


def test_min_p_of_one_keeps_every_token_tied_at_the_top():
    logits = torch.tensor([[0.0, 0.0, -1.0, 0.0]])
    kept = torch.isfinite(min_p(logits, 1.0))
    assert kept.tolist() == [[True, True, False, True]]
    SamplingParams(min_p=1.0).validate()  # 1 is allowed


def test_min_p_can_leave_a_single_token():
    assert torch.isfinite(min_p(torch.tensor([[0.0, 10.0, -10.0]]), 0.5)).tolist() == [[False, True, False]]


def test_top_p_drops_a_tail_whose_mass_equals_one_minus_p():
    """Four equal tokens, p = 0.75: the least likely quarter goes (transformers drops mass <= 1 - p)."""
    assert int(torch.isfinite(top_p(torch.zeros(1, 4), 0.75)).sum()) == 3


def test_top_k_of_one_always_draws_the_best_token():
    logits = torch.zeros(1, 50)
    logits[0, 3] = 0.1  # barely the best: without top-k almost every draw would be another token
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert {sampler(logits, None) for _ in range(20)} == {3}


def test_unseeded_samplers_draw_different_seeds():
    seeds = {Sampler(SamplingParams(temperature=1.0)).generator.initial_seed() for _ in range(50)}
    assert len(seeds) == 50


@pytest.mark.parametrize(
    "setting, value",
    [
        ("temperature", -0.5),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 2.5),
    ],
)
def test_each_invalid_setting_is_named_in_its_error(setting, value):
    with pytest.raises(MinillmError, match=f"invalid setting: {setting} must be .*got {value}"):
        SamplingParams(**{setting: value}).validate()


def test_penalties_accept_the_ends_of_openais_range():
    for value in (-2.0, 2.0):
        SamplingParams(presence_penalty=value, frequency_penalty=value).validate()


# -- the sampler's edges (any logits a model may give, any legal setting) ------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from minillm.engine.sampling import BadLogits  # noqa: E402

EXTREMES = [0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-30, math.inf, -math.inf]
LOGIT = st.one_of(st.sampled_from(EXTREMES), st.floats(-1e6, 1e6, width=32))  # NaN-free; ties come from EXTREMES


@st.composite
def hostile_case(draw):
    vocab = draw(st.integers(1, 24))
    logits = draw(st.lists(LOGIT, min_size=vocab, max_size=vocab))
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 1e-40, 1e-6, 1e-5, 0.5, 1.0, 100.0, 1e30])),
        top_k=draw(st.integers(0, vocab + 3)),
        top_p=draw(st.sampled_from([1e-30, 0.1, 0.5, 0.999, 1.0])),
        min_p=draw(st.sampled_from([0.0, 1e-30, 0.5, 1.0])),
        repetition_penalty=draw(st.sampled_from([1e-300, 1e-30, 0.5, 1.0, 2.0, 1e30, 1e300])),
        presence_penalty=draw(st.sampled_from([-2.0, 0.0, 1.5, 2.0])),
        frequency_penalty=draw(st.sampled_from([-2.0, 0.0, 2.0])),
        seed=draw(st.integers(-(2**63), 2**64 - 1)),
    )
    seen = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
    counts = draw(st.lists(st.integers(0, 50), min_size=vocab, max_size=vocab))
    return (
        torch.tensor([logits], dtype=torch.float32),
        params,
        torch.tensor(seen),
        torch.tensor(counts, dtype=torch.float32),
    )


@settings(max_examples=300, deadline=None)
@given(hostile_case())
def test_any_logits_and_legal_settings_give_a_possible_token(case):
    """A token id always comes back, never a removed one (-inf logit), and with +inf logits one of those;
    greedy without penalties is argmax. Only NaN-free logits with nothing above -inf are refused."""
    logits, params, seen, counts = case
    sampler = Sampler(params)
    if bool((logits == -math.inf).all()):
        with pytest.raises(BadLogits):
            sampler(logits, seen, counts)
        return
    token = sampler(logits, seen, counts)
    assert 0 <= token < logits.shape[1]
    assert logits[0, token] > -math.inf
    if bool((logits == math.inf).any()):
        assert logits[0, token] == math.inf
    if params.greedy and params.repetition_penalty == 1 and not params.counts_output:
        assert token == int(logits.argmax())


def test_nan_logits_are_refused_with_a_reason():
    logits = torch.zeros(1, 10)
    logits[0, 3] = math.nan
    for temperature in (0.0, 1.0):
        with pytest.raises(BadLogits, match="NaN"):
            Sampler(SamplingParams(temperature=temperature))(logits, torch.tensor([1]))


@pytest.mark.parametrize("seed", range(8))
def test_overflow_is_clamped_the_right_way_round(seed):
    """Temperature 0.5 doubles -3e38 past float32's range: that logit stays the least likely one (clamped to
    -max, not +max), it still counts (not -inf: with every logit overflowing, one is still picked), and a
    removed token (-inf) never ties with it."""
    sampler = Sampler(SamplingParams(temperature=0.5, seed=seed))
    assert sampler(torch.tensor([[0.0, -3e38]])) == 0
    assert sampler(torch.tensor([[-3e38, -3e38]])) in (0, 1)
    assert sampler(torch.tensor([[-math.inf, -3e38]])) == 1


def test_the_sampler_counts_every_generated_token():
    sampler = Sampler(SamplingParams(frequency_penalty=1.0), prompt=[1, 2], vocab_size=8)
    for token in (3, 3, 5):
        sampler.record(token)
    assert sampler.counts.tolist() == [0, 0, 0, 2, 0, 1, 0, 0] and sampler.seen is None
    sampler = Sampler(SamplingParams(repetition_penalty=1.5), prompt=[1, 2], vocab_size=8)
    sampler.record(3)
    assert sampler.seen.tolist() == [1, 2, 3] and sampler.counts is None


def test_unsamplable_logits_are_refused_with_what_is_wrong():
    sampler = Sampler(SamplingParams(temperature=0))
    with pytest.raises(BadLogits, match=r"^the model's logits for this request contain NaN$"):
        sampler(torch.tensor([[0.0, math.nan]]))
    with pytest.raises(BadLogits, match=r"^the model gave every token a logit of -inf$"):
        sampler(torch.full((1, 3), -math.inf))


def test_the_inf_tokens_tie_whatever_the_penalties():
    """Where the model gives some tokens +inf, only they remain, all alike (logit 0): a repetition penalty
    cannot order them (0 / penalty is 0), so greedy takes the first of them, seen or not."""
    logits = torch.tensor([[0.0, 1.0, 2.0, math.inf, 5.0, math.inf]])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[3], vocab_size=6)
    assert sampler(logits) == 3


def test_a_history_passed_in_is_the_one_penalized():
    """sampler(logits, seen): the ids given are penalized, not the sampler's own history."""
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=10.0), prompt=[2], vocab_size=4)
    assert sampler(logits) == 1  # its own history: token 2
    assert sampler(logits, torch.tensor([1])) == 2  # given: token 1
