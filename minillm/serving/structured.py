"""Structured outputs and tool calls on the wire: the OpenAI fields that constrain a reply, turned into LLM.request's
constraint options (engine/constraint.py), and a reply's text turned back into `message.tool_calls`.

    response_format   {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema"}}
    guided_json, guided_regex, guided_choice, guided_grammar   vLLM's extension fields (grammar: Lark or GBNF)
    tools, tool_choice  "none": the tools are left out of the prompt; "auto": the model may answer or call, and a
                      call it opens must be valid (the grammar sleeps until the model writes <tool_call>);
                      "required" or a named function: the reply is one or more calls (one if
                      parallel_tool_calls is false)

Tool calls follow the Hermes / Qwen convention that their chat templates teach the model:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..engine.guidance import DEFAULT_MAX_WHITESPACE, whitespace_pattern
from .openai_api import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def constraint_options(body: dict) -> dict:
    """LLM.request's constraint option (json_schema, regex, choice or grammar) from response_format or vLLM's
    guided_* fields; {} when the reply is free. The values are checked and compiled by LLM.request."""
    options = {}
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(400, "'response_format' must have type text, json_object or json_schema", "response_format")
        if fmt["type"] == "json_object":
            options["json_schema"] = {"type": "object"}
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ApiError(
                    400, "'response_format.json_schema' must be an object with a 'schema'", "response_format"
                )
            options["json_schema"] = spec.get("schema", {})  # no schema: any JSON value (OpenAI's default)
    for field, option in GUIDED.items():
        if body.get(field) is not None:
            if options:
                raise ApiError(400, f"'{field}' cannot be combined with another output constraint", field)
            options[option] = body[field]
    return options


@dataclass
class Tools:
    """A chat request's tools and what it asked of them."""

    tools: list[dict]  # OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]
    choice: str  # "none", "auto", "required", or the name of the function to call
    parallel: bool  # more than one call in a reply

    @property
    def active(self) -> bool:
        return self.choice != "none"

    def functions(self) -> list[dict]:
        wanted = [t["function"] for t in self.tools]
        return wanted if self.choice in ("auto", "required") else [f for f in wanted if f["name"] == self.choice]

    def constraint_options(self, tokenizer, max_whitespace: int = DEFAULT_MAX_WHITESPACE) -> dict:
        """The grammar of the reply (a Lark grammar for llguidance with each function's parameters as a JSON
        schema), and under "auto" the token that wakes it: {} if nothing can be enforced ("none"; or "auto"
        with a tokenizer that has no single <tool_call> token, where a call is parsed if the model writes one)."""
        if not self.active:
            return {}
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in self.functions()
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        # the whitespace cap of LLM.request's json_schema option, here inside the grammar (guidance.py)
        schema = json.dumps({**schema, "x-guidance": {"whitespace_pattern": whitespace_pattern(max_whitespace)}})
        open_id, close_id = tokenizer.token_id(OPEN), tokenizer.token_id(CLOSE)
        open_tag = f"<[{open_id}]>" if open_id is not None else json.dumps(OPEN)
        close_tag = f"<[{close_id}]>" if close_id is not None else json.dumps(CLOSE)
        body = f'"\\n" %json {schema} "\\n" {close_tag}'
        if self.choice == "auto":
            if open_id is None:
                return {}
            return {"grammar": f"start: {body}", "grammar_trigger": open_id}
        repeat = ' ("\\n" call)*' if self.parallel else ""
        return {"grammar": f"start: call{repeat}\ncall: {open_tag} {body}"}


def parse_tools(body: dict) -> Tools | None:
    """The request's tools, checked; None if it has none."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, "'tools' must be a non-empty list", "tools")
    for t in tools:
        function = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(function, dict)):
            raise ApiError(400, "each tool must be {'type': 'function', 'function': {...}}", "tools")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, "each function needs a 'name'", "tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"the parameters of '{function['name']}' must be a JSON schema object", "tools")
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, dict):
        named = choice.get("function") if choice.get("type") == "function" else None
        name = named.get("name") if isinstance(named, dict) else None
        if name not in names:
            raise ApiError(400, f"'tool_choice' names no function of 'tools' ({name!r})", "tool_choice")
        choice = name
    elif choice is None:
        choice = "auto"
    elif choice not in ("none", "auto", "required"):
        raise ApiError(400, "'tool_choice' must be none, auto, required or a named function", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError(400, "'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    return Tools(tools, choice, parallel)


def split_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """A reply's text -> (the prose before its first call, or None; its calls in OpenAI's form). A reply whose
    calls do not all parse is prose, whole (no call is half-reported)."""
    found = CALL.findall(text)
    if not found:
        return text, []
    calls = []
    for raw in found:
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", {})
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
    content = text[: text.index(OPEN)].strip()
    return content or None, calls


def safe_prefix(text: str) -> int:
    """How much of a streamed reply may go out as prose now: up to its first <tool_call>, and short of a tail
    that could be the start of one."""
    at = text.find(OPEN)
    if at >= 0:
        return at
    for keep in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
