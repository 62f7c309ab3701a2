"""python -m minillm serve: an OpenAI-compatible HTTP server on the batching engine.

    client ──HTTP──► handler (asyncio, HTTP thread) ──submit──► main thread: engine.step(), step(), ...
           ◄──SSE─── handler ◄──pieces (thread-safe hand-off to the event loop)──┘

The main thread owns the engine and steps it while there is work (engine.py explains why the main one);
uvicorn and its event loop run in a second thread. HTTP handlers never touch the engine's state: they submit
requests, abort them, and await their text through an asyncio queue that the engine feeds with
loop.call_soon_threadsafe. A client that disconnects mid-stream aborts its
requests: their slots are freed and their locks released at the next step. The wire format (fields,
errors, chunks) lives in openai_api.py; this file is the HTTP plumbing, metrics and the process's life.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import openai_api
from .errors import MinillmError
from .openai_api import ApiError
from .request import DONE, Request

log = logging.getLogger("minillm.server")


class _LoopSink:
    """Stands in for a request's piece queue: each put, made on the engine thread, lands on an asyncio queue
    of the event loop as (choice index, item)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))


class Metrics:
    """What /metrics exports, in Prometheus' text format (prometheus-client, a registry of its own)."""

    def __init__(self, llm):
        self.registry = registry = CollectorRegistry()
        scheduler, pool, tree = llm.engine.scheduler, llm.engine.pool, llm.engine.scheduler.tree
        Gauge("minillm_requests_running", "Requests in the running batch", registry=registry).set_function(
            lambda: len(scheduler.running))
        Gauge("minillm_requests_waiting", "Requests waiting to be admitted", registry=registry).set_function(
            lambda: len(scheduler.waiting))
        Gauge("minillm_kv_slots_total", "Token slots in the KV pool", registry=registry).set_function(
            lambda: pool.num_slots)
        Gauge("minillm_kv_slots_used", "KV pool slots in use (by running requests or the prefix cache)",
              registry=registry).set_function(lambda: pool.num_slots - pool.free_slots)
        Gauge("minillm_kv_slots_cached", "KV pool slots held by the prefix cache", registry=registry).set_function(
            lambda: tree.total_tokens)
        Gauge("minillm_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache, of all prompt tokens",
              registry=registry).set_function(lambda: tree.stats.hit_rate)
        self.prompt_tokens = Counter("minillm_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.cached_tokens = Counter("minillm_cached_tokens", "Prompt tokens found in the prefix cache", registry=registry)
        self.generated_tokens = Counter("minillm_generated_tokens", "Tokens generated", registry=registry)
        self.requests = Counter("minillm_requests", "Finished requests", ["finish_reason"], registry=registry)
        self.ttft = Histogram("minillm_time_to_first_token_seconds", "From submission to the first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.itl = Histogram("minillm_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry)

    def finished(self, r: Request) -> None:
        c = r.completion()
        self.prompt_tokens.inc(c.prompt_tokens)
        self.cached_tokens.inc(c.cached_tokens)
        self.generated_tokens.inc(len(c.token_ids))
        self.requests.labels(c.finish_reason).inc()
        if r.token_times:
            self.ttft.observe(c.ttft_s)
        for before, after in zip(r.token_times, r.token_times[1:]):
            self.itl.observe(after - before)
        log.info("request %d: %d prompt tokens (%d cached), %d generated, ttft %.0f ms, %.1f tok/s, %s", r.id,
                 c.prompt_tokens, c.cached_tokens, len(c.token_ids), 1000 * c.ttft_s, c.decode_tok_s, c.finish_reason)

    def text(self) -> bytes:
        return generate_latest(self.registry)


def create_app(llm, model_name: str, api_key: str | None = None, max_waiting: int | None = None):
    """The FastAPI application; something must step llm.engine (serve() below, or engine.start())."""
    engine = llm.engine
    metrics = Metrics(llm)

    @asynccontextmanager
    async def lifespan(app):
        print(f"minillm: serving {model_name} at http://{app.state.address}/v1 (Ctrl-C to stop)", file=sys.stderr,
              flush=True)
        yield

    app = FastAPI(title="minillm", lifespan=lifespan)
    app.state.address = "127.0.0.1"

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    def check_key(http: HttpRequest) -> None:
        if api_key is not None and http.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", kind="authentication_error",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        check_key(http)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "minillm"}]}

    def token_text(token: int) -> str:
        return llm.tokenizer.decode([token], skip_special_tokens=False)

    def build_requests(parsed: dict, endpoint: str) -> list[Request]:
        """n requests per prompt (choice j's seed is seed + j, so the choices differ and each is reproducible);
        identical prompts make the scheduler prefill once and the others reuse it."""
        requests = []
        for prompt in parsed["prompts"]:
            try:
                ids = llm.tokenizer.encode_chat(prompt) if endpoint == "chat" else llm.prompt_ids(prompt)
                for j in range(parsed["n"]):
                    options = dict(parsed["options"])
                    if options.get("seed") is not None:
                        options["seed"] += j
                    requests.append(llm.request(ids, **options))
            except MinillmError as e:
                raise ApiError(400, str(e), "messages" if endpoint == "chat" else "prompt") from None
        return requests

    async def generate(http: HttpRequest, endpoint: str):
        check_key(http)
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        parsed = openai_api.parse(body, endpoint, model_name)
        requests = build_requests(parsed, endpoint)
        if max_waiting is not None and len(engine.scheduler.waiting) + len(requests) > max_waiting:
            raise ApiError(429, f"too many requests waiting (limit {max_waiting}); retry later",
                           kind="rate_limit_error", code="queue_full")
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, r in enumerate(requests):
            r.pieces = _LoopSink(loop, queue, i)
            engine.submit(r)
        request_id = openai_api.new_id(endpoint)
        if parsed["stream"]:
            return StreamingResponse(stream(requests, queue, endpoint, request_id, parsed),
                                     media_type="text/event-stream")
        try:
            remaining = len(requests)
            while remaining:
                _, item = await queue.get()
                remaining -= item is DONE
        finally:
            abort_unfinished(requests)
        failed = next((r for r in requests if r.error is not None), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}", kind="server_error")
        for r in requests:
            metrics.finished(r)
        completions = [r.completion() for r in requests]
        return openai_api.response(endpoint, request_id, model_name, completions, parsed["n"], token_text)

    def abort_unfinished(requests: list[Request]) -> None:
        for r in requests:
            if r.finish_reason is None:
                engine.abort(r)
                metrics.requests.labels("abort").inc()

    async def stream(requests, queue, endpoint, request_id, parsed):
        """Server-sent events: a chunk per piece of text, a last chunk per choice with its finish_reason, the
        usage if asked for, then [DONE]. Leaving early (the client went away) aborts what is unfinished."""
        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        sent_logprobs = [0] * len(requests)
        offsets = [0] * len(requests)
        started = [False] * len(requests)

        def logprobs(i: int):
            r = requests[i]
            if r.logprobs is None:
                return None
            items = r.token_logprobs[sent_logprobs[i] :]
            sent_logprobs[i] += len(items)
            out = openai_api.logprobs_json(items, endpoint, token_text, offsets[i])
            if endpoint == "completions":
                offsets[i] += sum(len(t) for t in out["tokens"])
            return out

        try:
            remaining = len(requests)
            while remaining:
                i, item = await queue.get()
                if item is DONE:
                    remaining -= 1
                    r = requests[i]
                    if r.error is not None:
                        yield event({"error": {"message": f"generation failed: {r.error}", "type": "server_error",
                                               "param": None, "code": None}})
                        continue
                    metrics.finished(r)
                    yield event(openai_api.chunk(endpoint, request_id, model_name, i, None, r.finish_reason,
                                                 logprobs(i), first=not started[i]))
                else:
                    yield event(openai_api.chunk(endpoint, request_id, model_name, i, item, None, logprobs(i),
                                                 first=not started[i]))
                started[i] = True
            if parsed["include_usage"]:
                yield event(openai_api.usage_chunk(endpoint, request_id, model_name,
                                                   [r.completion() for r in requests], parsed["n"]))
            yield "data: [DONE]\n\n"
        finally:
            abort_unfinished(requests)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await generate(http, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await generate(http, "chat")

    return app


def serve(args) -> int:
    """Load the model, start uvicorn in a thread, and step the engine on this (the main) thread until uvicorn
    has stopped. SIGINT or SIGTERM stop it gracefully: no new connections, open requests served to their end
    (30 s at most), then exit status 0. A second signal stops at once."""
    from .cli import load_llm

    llm = load_llm(args)
    name = args.served_model_name or (args.model if args.model else "minillm-bundled")
    app = create_app(llm, name, api_key=args.api_key, max_waiting=args.max_waiting)
    app.state.address = f"{args.host}:{args.port}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=30))

    def stop(*_):
        server.force_exit = server.should_exit  # the second signal
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http_thread = threading.Thread(target=server.run, name="minillm-http")
    started = time.perf_counter()
    http_thread.start()
    try:
        llm.engine.serve(should_stop=lambda: not http_thread.is_alive())
    finally:  # the engine failed for good (a tensor-parallel rank was lost): stop the HTTP side too
        server.should_exit = True
        http_thread.join()
    llm.close()  # the prefix cache's KV to the disk tier, if there is one
    if not server.started:
        raise MinillmError(f"could not listen on {args.host}:{args.port} (is the port in use?); pick another --port")
    print(f"minillm: server stopped after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0
