"""Structured outputs (engine/constraint.py, engine/guidance.py): every constrained output has its form, a
constraint changes nothing where the free output already has that form, forced tokens computed together give
exactly what one step per token gives, and a constrained request batched, cached or alone gives the same bits
in exact mode. The server's response_format, guided_* and tools fields are in test_structured_server.py."""

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm import LLM
from minillm.engine.constraint import Choice, ConstraintError, Dormant, mask_logits
from minillm.errors import MinillmError
from minillm.limits import InvalidSetting

PROMPT = "The weather in the north is"


@pytest.fixture(scope="module")
def llm():
    return LLM.load()  # the bundled model: a real (tiny) language model with a real tokenizer


@pytest.fixture(scope="module")
def exact():
    return LLM.load(exact=True)


# -- the pure-Python backend and the seam ---------------------------------------------------------------

token_lists = st.lists(st.lists(st.integers(1, 12), min_size=1, max_size=5), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(choices=token_lists, picks=st.lists(st.integers(0, 2**16), min_size=12, max_size=12))
def test_a_walk_through_the_choice_trie_ends_in_a_choice(choices, picks):
    """Any walk that takes allowed tokens (or the forced ones) and stops only where the output may end spells
    one of the choices; forced tokens are each the only allowed token; rollback restores the mask."""
    c = Choice(choices, vocab_size=16)
    out = []
    for pick in picks:
        if c.done or (c.can_end and pick % 3 == 0):
            break
        forced = c.forced()
        allowed = c.allowed().nonzero().flatten().tolist()
        assert allowed, "a state that may not end must allow some token"
        if forced:
            assert allowed == [forced[0]]
        before = c.allowed().clone()
        token = allowed[pick % len(allowed)]
        c.accept(token)
        c.rollback(1)
        assert torch.equal(c.allowed(), before)
        c.accept(token)
        out.append(token)
    if c.can_end:
        assert out in choices
    with pytest.raises(ConstraintError):
        c.accept(15)  # never in a choice (ids are 1..12)


def test_dormant_waits_for_its_trigger_and_rolls_back_across_it():
    d = Dormant(trigger=7, make=lambda: Choice([[1, 2]], vocab_size=10))
    assert d.allowed() is None and d.can_end and not d.done
    d.accept(3)
    d.accept(7)  # wakes: only 1 may follow
    assert d.allowed().nonzero().flatten().tolist() == [1] and not d.can_end and d.forced() == [1, 2]
    d.accept(1)
    d.accept(2)  # the call is complete: asleep again
    assert d.allowed() is None and d.can_end
    d.rollback(1)
    assert d.allowed().nonzero().flatten().tolist() == [2]
    d.rollback(2)
    assert d.allowed() is None


def test_the_mask_allows_eos_only_where_the_output_may_end():
    logits = torch.zeros(1, 6)
    allowed = torch.tensor([False, True, True, False, False, True])
    out = mask_logits(logits, allowed, eos_ids={5}, can_end=False)
    assert torch.isinf(out[0, [0, 3, 4, 5]]).all() and (out[0, [1, 2]] == 0).all()
    out = mask_logits(logits, allowed, eos_ids={0}, can_end=True)
    assert out[0, 0] == 0 and out[0, 5] == 0 and torch.isinf(out[0, 3])  # 5 is no EOS here
    assert logits.eq(0).all()  # the caller's logits are untouched


# -- on a model ---------------------------------------------------------------------------------------


def test_choice_and_regex_outputs_have_their_form(llm):
    llm.configure()
    choices = ["sunny", "raining hard", "cold"]
    for options in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        out = llm.generate(PROMPT, choice=choices, max_new_tokens=20, **options)
        assert out.text in choices and out.finish_reason == "stop"
        out = llm.generate(PROMPT, regex=r"[0-9]{2,3}-[a-z]{2}", max_new_tokens=20, **options)
        assert re.fullmatch(r"[0-9]{2,3}-[a-z]{2}", out.text) and out.finish_reason == "stop"
        lark = 'start: "it is " WORD\nWORD: /[a-z]+/ "."'
        out = llm.generate(PROMPT, grammar=lark, max_new_tokens=20, **options)
        assert re.fullmatch(r"it is [a-z]+\.", out.text) or out.finish_reason == "length"
        out = llm.generate(PROMPT, grammar='root ::= "on" | "off"', max_new_tokens=5, **options)  # GBNF
        assert out.text in ("on", "off")
    llm.check_invariants()


@st.composite
def bounded_schemas(draw, depth=0):
    """JSON schemas whose every instance is short (strings, arrays and integers bounded; no free-form
    numbers), so a constrained run must finish; objects nest, with required and optional fields."""
    kinds = ["string", "integer", "boolean", "enum", "pattern"] + (["object", "array"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "string":
        return {"type": "string", "maxLength": draw(st.integers(0, 8))}
    if kind == "integer":
        low = draw(st.integers(-50, 50))
        return {"type": "integer", "minimum": low, "maximum": low + draw(st.integers(0, 200))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": draw(st.lists(st.sampled_from(["a", "bb", 3, None, True, "x y"]), min_size=1, unique=True))}
    if kind == "pattern":
        return {"type": "string", "pattern": draw(st.sampled_from(["^[a-z]{1,5}$", "^[0-9]{3}$", "^(yes|no)$"]))}
    if kind == "array":
        return {"type": "array", "items": draw(bounded_schemas(depth + 1)), "maxItems": draw(st.integers(0, 3))}
    names = draw(st.lists(st.sampled_from(["id", "name", "tags", "ok", "n"]), min_size=1, max_size=4, unique=True))
    properties = {n: draw(bounded_schemas(depth + 1)) for n in names}
    required = [n for n in names if draw(st.booleans())]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=bounded_schemas(), seed=st.integers(0, 1000))
def test_every_output_validates_against_its_schema(llm, schema, seed):
    """Sampled at temperature 1 (the model's own wanderings, within the mask): a bounded schema must finish
    ("stop") within the budget, and what it returns parses and validates."""
    out = llm.generate(PROMPT, json_schema=schema, max_new_tokens=400, temperature=1.0, seed=seed, max_whitespace=2)
    assert out.finish_reason == "stop", (schema, out.text)
    jsonschema.validate(json.loads(out.text), schema)


def test_a_run_that_hits_max_tokens_says_length(llm):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    out = llm.generate(PROMPT, json_schema=schema, max_new_tokens=6, temperature=0)
    assert out.finish_reason == "length" and len(out.token_ids) == 6


def test_whitespace_between_json_tokens_is_capped(llm):
    out = llm.generate(PROMPT, json_schema={"type": "array", "items": {"type": "integer"}}, max_new_tokens=80,
                       temperature=1.0, seed=1, max_whitespace=3)  # fmt: skip
    assert not re.search(r"\s{4}", out.text.replace('" "', "")), out.text


def _open_regex(text: str) -> str:
    """A regex the text satisfies that forces nothing: each character or one other, then anything."""
    parts = []
    for ch in text:
        other = "q" if ch != "q" else "z"
        parts.append(f"[{re.escape(ch)}{other}]")
    return "".join(parts) + r"[\s\S]*"


def test_a_constraint_the_free_output_meets_changes_nothing(exact):
    """Exact mode: the greedy free output satisfies the regex, so the constrained run is token for token the
    same (the mask never removes the model's choice), and its logprobs are bitwise the same."""
    exact.configure()
    free = exact.generate(PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    constrained = exact.generate(PROMPT, regex=_open_regex(free.text), max_new_tokens=16, temperature=0,
                                 ignore_eos=True, logprobs=2)  # fmt: skip
    assert constrained.token_ids == free.token_ids
    assert [(i.token, i.logprob) for i in constrained.logprobs] == [(i.token, i.logprob) for i in free.logprobs]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


LONG_PROMPT = " ".join([PROMPT] * 16)  # longer than exact mode's chunk: a second run finds it cached


def _run(llm, skip_forced: bool, others: int = 0, **options):
    """The constrained request (and `others` free ones beside it), stepped by hand: (completion, steps)."""
    r = llm.request(LONG_PROMPT, json_schema=SCHEMA, max_new_tokens=200, max_whitespace=0, **options)
    r.skip_forced = skip_forced
    handle = llm.engine.submit(r)
    free = [llm.submit(f"{PROMPT} {i}", max_new_tokens=12, temperature=0, ignore_eos=True) for i in range(others)]
    steps = 0
    while llm.engine.step():
        steps += 1
        llm.check_invariants()
    for f in free:
        f.result()
    return handle.result(), steps


def test_forced_tokens_together_give_exactly_the_tokens_of_one_step_each(exact):
    """Exact mode: the forced tokens (the fixed keys, the closing brace) appended together and computed as
    extra rows of one step give bitwise the output of picking them one step at a time, in fewer steps; and
    the same again batched beside free requests and with the prompt cached."""
    for options in ({"temperature": 0}, {"temperature": 1.0, "seed": 11}):
        exact.configure()
        one_each, steps_one_each = _run(exact, skip_forced=False, **options)
        exact.configure()
        together, steps_together = _run(exact, skip_forced=True, **options)
        assert together.token_ids == one_each.token_ids and together.finish_reason == "stop"
        assert together.forced_tokens > 0 and steps_together < steps_one_each
        jsonschema.validate(json.loads(together.text), SCHEMA)
        batched, _ = _run(exact, skip_forced=True, others=3, **options)  # the prompt is cached by now
        assert batched.token_ids == together.token_ids and batched.cached_tokens > 0


def test_constrained_and_free_requests_share_a_batch(llm):
    llm.configure()
    alone = llm.generate("Once upon", max_new_tokens=10, temperature=0, ignore_eos=True)
    outs = llm.generate(["Once upon", PROMPT, PROMPT], max_new_tokens=10, temperature=0, ignore_eos=True)
    assert outs[0].token_ids == alone.token_ids
    llm.configure()
    handles = [llm.submit("Once upon", max_new_tokens=10, temperature=0, ignore_eos=True),
               llm.submit(PROMPT, choice=["yes", "no"], max_new_tokens=10, temperature=0)]  # fmt: skip
    results = [h.result() for h in handles]
    assert results[1].text in ("yes", "no")
    llm.check_invariants()


@pytest.mark.parametrize(
    "options, name",
    [
        ({"json_schema": {"type": "strnig"}}, "json_schema"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"regex": "(unclosed"}, "regex"),
        ({"grammar": "start: nothing_defined"}, "grammar"),
        ({"grammar": "root ::= ("}, "grammar"),
        ({"choice": []}, "choice"),
        ({"choice": ["a", 3]}, "choice"),
        ({"regex": "a", "choice": ["a"]}, "regex"),
        ({"max_whitespace": -1}, "max_whitespace"),
        ({"grammar_trigger": 5}, "grammar_trigger"),
    ],
)
def test_a_bad_constraint_is_refused_before_anything_runs(llm, options, name):
    with pytest.raises(InvalidSetting) as caught:
        llm.request(PROMPT, **options)
    assert caught.value.name == name and "\n" not in str(caught.value)


def test_a_failing_constraint_ends_its_request_alone(llm):
    """A constraint that breaks mid-run (here: one that refuses every token) fails its own request only."""
    llm.configure()

    class Broken(Choice):
        def accept(self, token):
            raise ConstraintError("broken on purpose")

    bad = llm.request(PROMPT, max_new_tokens=5, temperature=0)
    bad.constraint, bad.skip_forced = Broken([[1]], llm.config.vocab_size), True
    good = llm.submit("Once upon", max_new_tokens=5, temperature=0, ignore_eos=True)
    handle = llm.engine.submit(bad)
    with pytest.raises(MinillmError):
        handle.result()
    assert bad.finish_reason == "error" and len(good.result().token_ids) == 5
    llm.check_invariants()


def test_the_cli_takes_a_schema_file_and_refuses_a_bad_one(tmp_path, capsys):
    from minillm.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(["generate", PROMPT, "--json-schema", str(schema), "-n", "80", "-t", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert out["forced_tokens"] > 0
    schema.write_text('{"type": "strnig"}')
    assert main(["generate", PROMPT, "--json-schema", str(schema)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "strnig" in err
    assert main(["generate", PROMPT, "--choice", "yes", "--choice", "no", "-t", "0"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
