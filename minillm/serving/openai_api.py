"""The OpenAI wire format: request bodies in, checked generation settings out; results in, response JSON out.

No HTTP here (server.py does that): plain functions from dicts to dicts, so the rules are easy to read and
test. Every field a client may send is either honoured or refused with a 400 that names it; none is
silently ignored (a server that drops `stop` or `n` gives wrong answers with a 200).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import fields

from .. import limits
from ..engine.request import Completion, TokenLogprob
from ..engine.sampling import SamplingParams
from ..errors import MinillmError

# Body fields that are generation settings, and their names in LLM.generate (checked by limits.py). The
# first of two fields for one setting wins.
OPTION_OF_FIELD = {
    "max_completion_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
    **{f.name: f.name for f in fields(SamplingParams)},  # the sampling settings keep their names
}
# Fields that change nothing about the result; accepted and not used.
IGNORED = {"user", "stream_options", "metadata", "store", "service_tier"}
# Fields that constrain the reply, and tools (read by structured.py)
CONSTRAINT_FIELDS = {"response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar"}
TOOL_FIELDS = {"tools", "tool_choice", "parallel_tool_calls"}
COMMON = {"model", "stop", "n", "stream", "logprobs", "ignore_eos", *OPTION_OF_FIELD, *CONSTRAINT_FIELDS}
FIELDS = {
    "completions": COMMON | {"prompt", "echo", "suffix", "best_of"},
    "chat": COMMON | {"messages", "top_logprobs", *TOOL_FIELDS},
}
MAX_N = 16
MAX_STOPS = 4  # OpenAI's limit
DEFAULT_ONLY = {"suffix": None, "best_of": 1}  # fields refused unless they ask for the default
FIELD_OF_OPTION = {"max_new_tokens": "max_tokens"}  # the other settings' fields have their names


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, kind=float, low=None, high=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return kind(value)


def parse(body, endpoint: str, model_name: str) -> dict:
    """Check a request body; returns {"prompts": [...], "options": {...}, "n": int, "stream": bool,
    "include_usage": bool, "echo": bool, "generate": bool} where each prompt is text, token ids or chat
    messages. echo (completions): the answer starts with the prompt, and logprobs cover the prompt's tokens too
    (the first one's are null); with max_tokens 0 nothing is generated (generate: False)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS[endpoint] - IGNORED)
    if unknown:
        raise ApiError(400, f"unsupported field(s): {', '.join(unknown)}", unknown[0])
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(
            400,
            f"the model '{model}' does not exist; this server serves '{model_name}'",
            "model",
            code="model_not_found",
        )
    for name, default in DEFAULT_ONLY.items():  # type too: in Python True == 1 and 1 == 1.0
        if name in body and not (type(body[name]) is type(default) and body[name] == default):
            raise ApiError(400, f"'{name}' is not supported (only its default, {json.dumps(default)})", name)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, "'echo' must be true or false", "echo")
    if echo and body.get("stream"):
        raise ApiError(400, "'echo' is not supported with 'stream'; ask without streaming", "echo")
    score_only = echo and type(body.get("max_tokens")) is int and body["max_tokens"] == 0
    if score_only:  # the prompt's logprobs and nothing generated (what evaluation harnesses ask for)
        body = {k: v for k, v in body.items() if k != "max_tokens"}
    options = {}
    for field, option in OPTION_OF_FIELD.items():  # types and ranges: the engine's own (limits.py)
        value = body.get(field)
        if value is None or option in options:  # max_completion_tokens wins over max_tokens
            continue
        if option == "top_k" and value == -1 and not isinstance(value, bool):
            value = 0  # -1 means off, as in vLLM
        try:
            options[option] = limits.check(option, value)
        except limits.InvalidSetting as e:
            raise ApiError(400, str(e), field) from None
    n = _number(body, "n", int, 1, MAX_N) or 1
    if options.get("seed") is not None and options["seed"] + n - 1 > limits.SEED_MAX:
        raise ApiError(400, f"'seed' + n - 1 (the last choice's seed) must be at most {limits.SEED_MAX}", "seed")
    try:
        options["stop"] = limits.check_stop(body.get("stop"))
    except limits.InvalidSetting as e:
        raise ApiError(400, str(e), "stop") from None
    if len(options["stop"]) > MAX_STOPS:
        raise ApiError(400, f"'stop' may hold at most {MAX_STOPS} strings", "stop")
    options["logprobs"] = _logprobs(body, endpoint)
    ignore_eos = body.get("ignore_eos", False)  # vLLM's, SGLang's and llama-server's extension
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos")
    if ignore_eos:
        options["ignore_eos"] = True
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return {
        "prompts": _prompts(body, endpoint),
        "options": options,
        "n": n,
        "stream": stream,
        "include_usage": bool(stream_options.get("include_usage")),
        "echo": echo,
        "generate": not score_only,
    }


def _logprobs(body: dict, endpoint: str) -> int | None:
    """Completions: logprobs is the number of alternatives (0-5). Chat: logprobs is a boolean and
    top_logprobs the number of alternatives (0-20)."""
    if endpoint == "completions":
        return _number(body, "logprobs", int, 0, 5)
    wanted = body.get("logprobs", False)
    if not isinstance(wanted, bool):
        raise ApiError(400, "'logprobs' must be true or false", "logprobs")
    top = _number(body, "top_logprobs", int, 0, 20)
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _prompts(body: dict, endpoint: str) -> list:
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message must be an object with a string 'role'", "messages")
            calls = m.get("tool_calls")  # an assistant's earlier calls: content may be null
            if not (isinstance(m.get("content"), str) or (m.get("content") is None and isinstance(calls, list))):
                raise ApiError(400, "each message needs a string 'content' (or 'tool_calls')", "messages")
        return [messages]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]  # one prompt of token ids
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return list(prompt)
    raise ApiError(
        400, "'prompt' must be a string, a list of strings, token ids, or a list of token-id lists", "prompt"
    )


# -- responses -----------------------------------------------------------------------------------------


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(completions: list[Completion], n: int) -> dict:
    """completions: n choices per prompt, prompt by prompt. A prompt counts once (its n choices share its
    prefill); its cached tokens are those its first choice found in the cache."""
    firsts = completions[::n]
    prompt_tokens = sum(c.prompt_tokens for c in firsts)
    completion_tokens = sum(len(c.token_ids) for c in completions)
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)},
    }
    proposed = sum(c.draft_proposed for c in completions)
    if proposed:  # speculation guessed: OpenAI's fields for predicted tokens taken and turned down
        accepted = sum(c.draft_accepted for c in completions)
        out["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": proposed - accepted,
        }
    return out


def logprobs_json(items: list[TokenLogprob], endpoint: str, token_text, offset: int = 0) -> dict:
    """token_text: id -> its text."""
    if endpoint == "chat":

        def entry(token, logprob):
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in items]
        }
    texts = [token_text(i.token) for i in items]
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)

    def top(item):  # keyed by text, as OpenAI's format has it: tokens with the same text keep the likeliest
        if item.top is None:  # an echoed prompt's first token
            return None
        alternatives = {}
        for t, lp in item.top:
            alternatives.setdefault(token_text(t), lp)
        return alternatives

    return {
        "tokens": texts,
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [top(i) for i in items],
        "text_offset": offsets,
    }


def response(
    endpoint: str,
    request_id: str,
    model: str,
    completions: list[Completion],
    n: int,
    token_text,
    replies: list[tuple[str | None, list[dict]]] | None = None,
    echoes: list[tuple[str, list[TokenLogprob]]] | None = None,
) -> dict:
    """replies: each chat choice's (content, tool calls), where the request had tools (structured.py).
    echoes: each completion choice's prompt (text, per-token logprobs), where the request had echo."""
    choices = []
    for index, c in enumerate(completions):
        echo_text, echo_logprobs = echoes[index] if echoes else ("", [])
        lp = logprobs_json(echo_logprobs + c.logprobs, endpoint, token_text) if c.logprobs is not None else None
        if endpoint == "chat":
            content, calls = replies[index] if replies else (c.text, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            choices.append(
                {"index": index, "text": echo_text + c.text, "logprobs": lp, "finish_reason": c.finish_reason}
            )
    return {
        "id": request_id,
        "object": "chat.completion" if endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(completions, n),
    }


def chunk(
    endpoint: str,
    request_id: str,
    model: str,
    index: int,
    text: str | None = None,
    finish_reason: str | None = None,
    logprobs: dict | None = None,
    first: bool = False,
    tool_calls: list[dict] | None = None,
) -> dict:
    """One server-sent event's payload: a piece of one choice's text, its tool calls, or its end."""
    if endpoint == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        if tool_calls:  # whole calls, each with its index among the reply's calls (OpenAI's delta form)
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(endpoint: str, request_id: str, model: str, completions: list[Completion], n: int) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(completions, n),
    }


def tokens(llm, body, route: str, model_name: str) -> dict:
    """/tokenize: {"prompt": text} or {"messages": [...]} (rendered with the chat template, generation prompt
    added unless "add_generation_prompt": false) -> {"tokens", "count", "max_model_len"}; "add_special_tokens"
    (default true) as for a completion's prompt. /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    allowed = (
        {"model", "tokens"}
        if route == "detokenize"
        else {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
    )
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unsupported field(s): {', '.join(unknown)}", unknown[0])
    if body.get("model") not in (None, model_name):
        raise ApiError(400, f"the model '{body['model']}' does not exist; this server serves '{model_name}'", "model")
    vocab = llm.tokenizer.vocab_size
    if route == "detokenize":
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise ApiError(400, f"'tokens' must be a list of token ids (0 to {vocab - 1})", "tokens")
        return {"prompt": llm.tokenizer.decode(ids, skip_special_tokens=False)}
    flags = {name: body.get(name, True) for name in ("add_special_tokens", "add_generation_prompt")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be true or false", name)
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "send either 'prompt' (text) or 'messages' (a chat)", "prompt")
    try:
        if "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise ApiError(400, "'prompt' must be a string", "prompt")
            ids = llm.tokenizer.encode(body["prompt"], add_special_tokens=flags["add_special_tokens"])
        else:
            if not isinstance(body["messages"], list) or not all(isinstance(m, dict) for m in body["messages"]):
                raise ApiError(400, "'messages' must be a list of message objects", "messages")
            ids = llm.tokenizer.encode_chat(body["messages"], add_generation_prompt=flags["add_generation_prompt"])
    except MinillmError as e:
        raise ApiError(400, str(e), "messages" if "messages" in body else "prompt") from None
    return {"tokens": ids, "count": len(ids), "max_model_len": llm.config.context_length}
