"""python -m minillm serve: an OpenAI-compatible HTTP server on the batching engine.

    client ──HTTP──► handler (asyncio, HTTP thread) ──submit──► main thread: engine.step(), step(), ...
           ◄──SSE─── handler ◄──pieces (thread-safe hand-off to the event loop)──┘

The main thread owns the engine and steps it while there is work (engine.py explains why the main one);
uvicorn and its event loop run in a second thread. HTTP handlers never touch the engine's state: they submit
requests, abort them, and await their text through an asyncio queue that the engine feeds with
loop.call_soon_threadsafe. A client that disconnects mid-stream aborts its
requests: their slots are freed and their locks released at the next step. The wire format (fields,
errors, chunks) lives in openai_api.py, one request's path from body to answer in handler.py; this file is
the routes and the process's life.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response

from ..errors import MinillmError
from ..options import ServerOptions
from .handler import App, generate, tokens
from .openai_api import ApiError


def create_app(llm, settings: ServerOptions) -> FastAPI:
    """The FastAPI application; something must step llm.engine (serve() below, or engine.start())."""
    app = App(llm, settings)

    @asynccontextmanager
    async def lifespan(_):
        print(
            f"minillm: serving {settings.model_name} at http://{settings.host}:{settings.port}/v1 (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        yield

    api = FastAPI(title="minillm", lifespan=lifespan)

    @api.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @api.get("/health")
    async def health():
        return {"status": "ok"}

    @api.get("/metrics")
    async def prometheus():
        return Response(app.metrics.text(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(http: HttpRequest):
        app.check_key(http)
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "minillm"}],
        }

    @api.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await generate(app, http, "completions")

    @api.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await generate(app, http, "chat")

    @api.post("/tokenize")
    async def tokenize(http: HttpRequest):
        return await tokens(app, http, "tokenize")

    @api.post("/detokenize")
    async def detokenize(http: HttpRequest):
        return await tokens(app, http, "detokenize")

    return api


def serve(llm, settings: ServerOptions) -> int:
    """Start uvicorn in a thread, and step the engine on this (the main) thread until uvicorn has stopped.
    SIGINT or SIGTERM stop it gracefully: no new connections, open requests served to their end (30 s at
    most), then exit status 0. A second signal stops at once."""
    app = create_app(llm, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=30)
    )

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
        raise MinillmError(
            f"could not listen on {settings.host}:{settings.port} (is the port in use?); pick another --port"
        )
    print(f"minillm: server stopped after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0
