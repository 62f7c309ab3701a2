"""Structured outputs and tool calls through a real `python -m minillm serve` on 127.0.0.1, as the official
openai client sends them: response_format, vLLM's guided_* fields, tools with every tool_choice, streamed
tool-call deltas, a whole tool round trip; and the refusals, each a 400 naming its field."""

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from test_server import Server, call

from minillm.llm import bundled_model
from minillm.serving.structured import Tools, split_tool_calls

# A Hermes / Qwen-style template that shows the model its tools and replays earlier calls and results.
TEMPLATE = (
    "{% if tools %}# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    'Call a tool as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>\n{% endif %}'
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% if m.content %}{{ m.content }}{% endif %}"
    '{% for c in m.tool_calls or [] %}<tool_call>\n{"name": "{{ c.function.name }}", '
    '"arguments": {{ c.function.arguments }}}\n</tool_call>{% endfor %}\n\n'
    "{% elif m.role == 'tool' %}# result: {{ m.content }}\n{% else %}# {{ m.content }}\n{% endif %}{% endfor %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The bundled model with a chat template that renders tools."""
    out = tmp_path_factory.mktemp("tools")
    for f in bundled_model().iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    settings["chat_template"] = TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    return out


@pytest.fixture(scope="module")
def server(folder):
    server = Server(folder, "--kv-mb", "8", "--max-batch", "8")
    yield server
    assert server.stop() == 0


def test_response_format_and_guided_fields(server):
    client = server.client()
    reply = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=200, temperature=0, response_format={"type": "json_object"}
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].finish_reason == "length"
    reply = client.completions.create(
        model="tiny", prompt="The sky is", max_tokens=10, temperature=0, extra_body={"guided_choice": ["blue", "grey"]}
    )
    assert reply.choices[0].text in ("blue", "grey")
    reply = client.completions.create(
        model="tiny", prompt="Call", max_tokens=10, temperature=1, seed=3, extra_body={"guided_regex": "[0-9]{3}"}
    )
    assert len(reply.choices[0].text) == 3 and reply.choices[0].text.isdigit()
    grammar = 'start: "light is " COLOR\nCOLOR: "red" | "green"'
    reply = client.completions.create(
        model="tiny", prompt="The", max_tokens=10, temperature=0, extra_body={"guided_grammar": grammar}
    )
    assert reply.choices[0].text in ("light is red", "light is green")
    server.assert_idle_and_no_slot_owned()


def test_required_and_named_tool_calls_and_a_round_trip(server):
    client = server.client()
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            parallel_tool_calls=False,
            max_tokens=120,
            temperature=0,
        )
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls
        for c in message.tool_calls:
            assert c.type == "function" and c.id.startswith("call_")
            if c.function.name == "get_weather":
                jsonschema.validate(json.loads(c.function.arguments), WEATHER["function"]["parameters"])
            else:
                assert choice == "required" and c.function.name == "get_time"
        assert len(message.tool_calls) == 1
        if isinstance(choice, dict):
            assert message.tool_calls[0].function.name == "get_weather"
    # the round trip: the call, its result, then an answer in prose (tool_choice none: no call possible)
    messages = [*ASK, message.model_dump(exclude_none=True)]
    messages.append({"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"sky": "clear"}'})
    final = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0
    )
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    assert isinstance(final.choices[0].message.content, str)
    # parallel calls allowed (the default): one or more, each complete; this model keeps calling until max_tokens
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=120, temperature=0,
                                           tool_choice="required")  # fmt: skip
    assert reply.choices[0].finish_reason in ("tool_calls", "length") and reply.choices[0].message.tool_calls
    server.assert_idle_and_no_slot_owned()


def test_streamed_tool_calls_equal_the_whole_reply(server):
    client = server.client()
    options = dict(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120, temperature=0,
                   parallel_tool_calls=False)  # fmt: skip
    whole = client.chat.completions.create(**options).choices[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **options):
        delta = chunk.choices[0].delta
        for c in delta.tool_calls or []:
            entry = calls.setdefault(c.index, {"name": "", "arguments": ""})
            entry["name"] += c.function.name or ""
            entry["arguments"] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


def test_auto_without_a_tool_call_token_answers_and_parses_what_it_can(server):
    """The bundled tokenizer has no <tool_call> token, so under "auto" nothing is enforced: the reply is
    prose, or calls if the model wrote valid ones; never a half-parsed call."""
    reply = server.client().chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], max_tokens=20, temperature=0
    )
    choice = reply.choices[0]
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_structured_requests_are_400s_naming_the_field(server, body, param):
    reply = call("POST", f"{server.url}/v1/chat/completions", {"messages": ASK, "max_tokens": 5, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]


def test_tools_on_a_template_without_them_are_refused(tmp_path):
    """The bundled model's own template has no place for tools: refused, not silently dropped."""
    server = Server(None, "--kv-mb", "4")
    try:
        reply = call("POST", f"{server.url}/v1/chat/completions", {"messages": ASK, "tools": [WEATHER]})
        assert reply.status_code == 400 and "tools" in reply.json()["error"]["message"]
    finally:
        assert server.stop() == 0


def test_split_tool_calls():
    text = 'Let me look.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    content, calls = split_tool_calls(text)
    assert content == "Let me look." and calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert split_tool_calls("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    assert split_tool_calls("plain") == ("plain", [])


QWEN3 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen3"


@pytest.mark.skipif(not (QWEN3 / "tokenizer.json").is_file(), reason="needs ../shared/tokenizers/qwen3")
def test_qwen3s_tool_call_tokens_wake_the_grammar():
    """With Qwen3's tokenizer <tool_call> is one token: "auto" sleeps until it and then enforces the call;
    "required" starts with it. A call as Qwen writes it walks the grammar to its end."""
    from minillm.engine.constraint import Dormant
    from minillm.engine.guidance import GrammarCompiler
    from minillm.tokenizer import Tokenizer

    tokenizer = Tokenizer(QWEN3)
    compiler = GrammarCompiler((QWEN3 / "tokenizer.json").read_text(), 151936, [151645])
    auto = Tools([WEATHER], "auto", True).constraint_options(tokenizer)
    assert auto["grammar_trigger"] == tokenizer.token_id("<tool_call>")
    grammar = compiler.lark(auto["grammar"])
    d = Dormant(auto["grammar_trigger"], lambda: compiler.constraint(grammar))
    reply = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    for token in tokenizer.encode(reply, add_special_tokens=False):
        allowed = d.allowed()
        assert allowed is None or allowed[token]
        d.accept(token)
    assert d.inner is None and d.can_end  # the call is complete: asleep again
    required = compiler.lark(Tools([WEATHER], "required", False).constraint_options(tokenizer)["grammar"])
    c = compiler.constraint(required)
    assert c.forced()[:1] == [tokenizer.token_id("<tool_call>")]
