"""One completion request over HTTP, from its body to its answer: read the body (bounded), build checked engine
requests in a worker thread, submit them, then answer with JSON or stream server-sent events, aborting what is
unfinished if the client leaves. The handlers never touch the engine's state beyond submit and abort: the
engine runs on another thread and hands each piece of text to the event loop (_LoopSink)."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging

from fastapi import Request as HttpRequest
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from ..engine.request import DONE, Completion, Request
from ..errors import MinillmError
from ..limits import InvalidSetting
from ..options import ServerOptions
from . import openai_api, structured
from .metrics import Metrics
from .openai_api import ApiError

log = logging.getLogger("minillm.server")

TRIM_AFTER_BYTES = 2**20  # after a body this large, give the freed heap back (return_freed_memory)


class _LoopSink:
    """Stands in for a request's piece queue: each put, made on the engine thread, lands on an asyncio queue
    of the event loop as (choice index, item)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))
        except RuntimeError:  # the event loop has closed (the server is shutting down): nobody reads this
            pass


class App:
    """The routes' shared state: the LLM (whose engine another thread steps), the settings, the metrics."""

    def __init__(self, llm, settings: ServerOptions):
        self.llm, self.engine, self.settings = llm, llm.engine, settings
        self.metrics = Metrics(llm)

    def check_key(self, http: HttpRequest) -> None:
        key = self.settings.api_key
        if key is not None and http.headers.get("authorization") != f"Bearer {key}":
            raise ApiError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                kind="authentication_error",
                code="invalid_api_key",
            )

    def token_text(self, token: int) -> str:
        return self.llm.tokenizer.decode([token], skip_special_tokens=False)

    def abort_unfinished(self, requests: list[Request]) -> None:
        for r in requests:
            if r.finish_reason is None:
                self.engine.abort(r)
                self.metrics.requests.labels("abort").inc()


async def read_body(http: HttpRequest, limit: int) -> bytes:
    """The request's body, refused with 413 as soon as it is known to exceed `limit` bytes (from its
    Content-Length, before reading anything, or while reading a body sent without one)."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"the request body has {int(declared)} bytes, more than this server accepts ({limit}; see --max-body-mb)",
            code="body_too_large",
        )
    body = bytearray()
    async for piece in http.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(
                413,
                f"the request body is larger than this server accepts ({limit} bytes; see --max-body-mb)",
                code="body_too_large",
            )
    return bytes(body)


def build_requests(llm, body: bytes, endpoint: str, model_name: str) -> tuple[dict, list[Request]]:
    """From the raw body to checked engine requests, or ApiError: JSON, the wire format's fields
    (openai_api.parse), then each prompt tokenized (or a chat rendered) and each setting checked
    (LLM.request, limits.py). n requests per prompt: choice j's seed is seed + j, so the choices differ and
    each is reproducible; identical prompts make the scheduler prefill once and the others reuse it.
    Runs in a worker thread: a long prompt takes seconds to tokenize, which the event loop must not wait for."""
    try:
        data = json.loads(body)
        parsed = openai_api.parse(data, endpoint, model_name)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    constraint = structured.constraint_options(data)
    tools = parsed["tools"] = structured.parse_tools(data) if endpoint == "chat" else None
    if tools is not None and tools.active:
        if constraint:
            raise ApiError(400, "an output constraint cannot be combined with tools", _constraint_field(data))
        constraint = tools.constraint_options(llm.tokenizer)
    requests = []
    for prompt in parsed["prompts"]:
        try:
            if endpoint == "chat":
                ids = llm.chat_ids(prompt, tools.tools if tools is not None and tools.active else None)
            else:
                ids = llm.prompt_ids(prompt)
            for j in range(parsed["n"]):
                options = dict(parsed["options"], **constraint)
                if options.get("seed") is not None:
                    options["seed"] += j
                requests.append(llm.request(ids, **options))
        except InvalidSetting as e:
            field = openai_api.FIELD_OF_OPTION.get(e.name, e.name)
            if field in ("json_schema", "regex", "choice", "grammar", "grammar_trigger"):  # from a body field
                field = "tools" if tools is not None and tools.active else _constraint_field(data)
            raise ApiError(400, str(e), field) from None
        except MinillmError as e:
            raise ApiError(400, str(e), "messages" if endpoint == "chat" else "prompt") from None
    return parsed, requests


def _constraint_field(data: dict) -> str:
    """The body field a constraint came from (for a 400's param)."""
    return next((f for f in openai_api.CONSTRAINT_FIELDS if data.get(f) is not None), "response_format")


async def generate(app: App, http: HttpRequest, endpoint: str):
    app.check_key(http)
    try:
        body = await read_body(http, app.settings.max_body_bytes)
    except ClientDisconnect:  # the client left while sending: nobody to answer
        log.info("a client disconnected while sending its request")
        return Response(status_code=499)
    try:
        parsed, requests = await asyncio.to_thread(build_requests, app.llm, body, endpoint, app.settings.model_name)
    finally:
        if len(body) >= TRIM_AFTER_BYTES:  # a large prompt's tokenizing left hundreds of MB with the allocator
            await asyncio.to_thread(return_freed_memory)
    max_waiting = app.settings.max_waiting
    if max_waiting is not None and app.llm.stats().waiting + len(requests) > max_waiting:
        raise ApiError(
            429,
            f"too many requests waiting (limit {max_waiting}); retry later",
            kind="rate_limit_error",
            code="queue_full",
        )
    echoes = await echo_prompts(app, parsed, requests) if parsed["echo"] else None
    if not parsed["generate"]:  # max_tokens 0 with echo: the prompts' logprobs were the whole answer
        completions = [
            Completion("", [], len(r.prompt), "length", logprobs=[] if r.logprobs is not None else None)
            for r in requests
        ]
        return openai_api.response(
            endpoint,
            openai_api.new_id(endpoint),
            app.settings.model_name,
            completions,
            parsed["n"],
            app.token_text,
            echoes=echoes,
        )
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for i, r in enumerate(requests):
        r.pieces = _LoopSink(loop, queue, i)
        app.engine.submit(r)
    request_id = openai_api.new_id(endpoint)
    if parsed["stream"]:
        return StreamingResponse(
            stream(app, requests, queue, endpoint, request_id, parsed), media_type="text/event-stream"
        )
    try:
        remaining = len(requests)
        while remaining:
            _, item = await queue.get()
            remaining -= item is DONE
    finally:
        app.abort_unfinished(requests)
    failed = next((r for r in requests if r.error is not None), None)
    if failed is not None:
        raise ApiError(500, f"generation failed: {failed.error}", kind="server_error")
    for r in requests:
        app.metrics.finished(r)
    completions = [r.completion() for r in requests]
    tools = parsed["tools"]
    replies = [structured.split_tool_calls(c.text) for c in completions] if tools and tools.active else None
    return openai_api.response(
        endpoint, request_id, app.settings.model_name, completions, parsed["n"], app.token_text, replies, echoes
    )


async def echo_prompts(app: App, parsed: dict, requests: list[Request]) -> list[tuple[str, list]]:
    """Each choice's prompt as echo returns it: its text (as sent, or decoded from its ids) and, if logprobs
    were asked for, each prompt token's logprobs. They come from one forward of the prompt outside the engine's
    requests (LLM.prompt_logprobs), run on the engine's thread between two steps (Engine.call)."""
    n, echoes = parsed["n"], []
    for prompt, r in zip(parsed["prompts"], requests[::n]):
        text = prompt if isinstance(prompt, str) else app.llm.tokenizer.decode(r.prompt, skip_special_tokens=False)
        items = []
        if r.logprobs is not None:
            future = app.engine.call(functools.partial(app.llm.prompt_logprobs, r.prompt, r.logprobs))
            items = await asyncio.wrap_future(future)
        echoes.extend([(text, items)] * n)
    return echoes


async def stream(app: App, requests: list[Request], queue: asyncio.Queue, endpoint: str, request_id: str, parsed: dict):
    """Server-sent events: a chunk per piece of text, a last chunk per choice with its finish_reason, the
    usage if asked for, then [DONE]. Leaving early (the client went away) aborts what is unfinished. With
    tools, prose goes out as it comes but a tool call is held back until the reply ends, then sent whole as
    one tool_calls delta (what OpenAI's clients accumulate), with finish_reason "tool_calls"."""
    model_name = app.settings.model_name
    tools = parsed["tools"] is not None and parsed["tools"].active

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    sent_logprobs = [0] * len(requests)
    offsets = [0] * len(requests)
    started = [False] * len(requests)
    texts, shown = [""] * len(requests), [0] * len(requests)  # with tools: each reply so far, and prose sent

    def logprobs(i: int):
        r = requests[i]
        if r.logprobs is None:
            return None
        items = r.token_logprobs[sent_logprobs[i] :]
        sent_logprobs[i] += len(items)
        out = openai_api.logprobs_json(items, endpoint, app.token_text, offsets[i])
        if endpoint == "completions":
            offsets[i] += sum(len(t) for t in out["tokens"])
        return out

    def chunk(i: int, text: str | None, finish: str | None = None, calls: list[dict] | None = None) -> str:
        payload = openai_api.chunk(
            endpoint, request_id, model_name, i, text, finish, logprobs(i), first=not started[i], tool_calls=calls
        )
        started[i] = True
        return event(payload)

    try:
        remaining = len(requests)
        while remaining:
            i, item = await queue.get()
            if item is not DONE and tools:
                texts[i] += item
                cut = structured.safe_prefix(texts[i])
                if cut > shown[i]:
                    yield chunk(i, texts[i][shown[i] : cut])
                    shown[i] = cut
            elif item is not DONE:
                yield chunk(i, item)
            else:
                remaining -= 1
                r = requests[i]
                if r.error is not None:
                    yield event(
                        {
                            "error": {
                                "message": f"generation failed: {r.error}",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                    continue
                app.metrics.finished(r)
                calls = structured.split_tool_calls(texts[i])[1] if tools else []
                if calls:
                    yield chunk(i, None, calls=calls)
                    yield chunk(i, None, "tool_calls" if r.finish_reason == "stop" else r.finish_reason)
                    continue
                if texts[i][shown[i] :]:  # held back as a possible call's start, and prose after all
                    yield chunk(i, texts[i][shown[i] :])
                yield chunk(i, None, r.finish_reason)
        if parsed["include_usage"]:
            yield event(
                openai_api.usage_chunk(
                    endpoint, request_id, model_name, [r.completion() for r in requests], parsed["n"]
                )
            )
        yield "data: [DONE]\n\n"
    finally:
        app.abort_unfinished(requests)


async def tokens(app: App, http: HttpRequest, route: str) -> dict:
    """/tokenize and /detokenize (vLLM's form): text or chat messages to ids, ids to text, with the model's
    tokenizer and chat template, so a client can count, cut and check prompts as the server sees them."""
    app.check_key(http)
    body = await read_body(http, app.settings.max_body_bytes)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    return await asyncio.to_thread(openai_api.tokens, app.llm, data, route, app.settings.model_name)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing): Python and the
    tokenizer free a large request's memory, but the allocator keeps it for the process otherwise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
