"""The engine: requests in, one batched step at a time, text out.

    submit(prompt)  -> a handle (iterate it for text; abort it)
    step()          three verbs: the scheduler plans (scheduler.py), and speculation may add a draft to a
                    decode row (speculation.py); the runner runs one forward over every planned row (runner.py,
                    forward_batch.py) and each request that got logits picks its token(s) with its own
                    sampler; the scheduler finishes the step (counts the computed rows, hands
                    completed prompts to the tree, releases finished requests through the KV manager)

A lone request is a batch of one: the same path. A failure in one request's own part of a step (choosing its
token, its stop strings, its stream) ends that request alone; only a failed forward fails the batch (_accept).
The engine's state is touched by one thread only, the one that calls step(): submit and abort may come from
any thread (they go through a queue). A server calls `serve()` on its main thread, which steps while there is
work and sleeps while there is none, and its handlers read their requests' text from other threads. (Why the
main thread: on CPU, PyTorch's parallel elementwise and attention kernels, run from any other thread, made a
step 1.2-1.6x slower here, as OpenMP's workers there do not stay hot between kernels. `start()` steps in a
background thread anyway, for programs that need their main thread.)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from ..model.tensor_parallel import RankFailure
from . import exact as exact_mode
from .plan import Work, segment
from .request import DONE, Completion, Request
from .runner import Runner
from .scheduler import Scheduler
from .speculation import Speculation

log = logging.getLogger("minillm.engine")

IDLE_WAIT_S = 0.1  # an idle serve() loop sleeps on the submission queue this long between should_stop() checks


@dataclass
class EngineStats:
    """A snapshot of the engine for metrics and reports (counts only: safe to read from any thread)."""

    running: int  # requests in the running batch
    waiting: int  # requests waiting to be admitted
    kv_slots_total: int  # token slots in the KV pool
    kv_slots_used: int  # by running requests or the prefix cache
    kv_slots_cached: int  # held by the prefix cache
    prefix_cache_hit_rate: float  # prompt tokens served from the prefix cache, of all prompt tokens looked up
    preemptions: int
    disk: dict | None  # the disk tier's traffic (dir, tokens read and written, seconds), if there is one


class Engine:
    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        exact_tiles: tuple[int, int] | None,
        views: bool,
        speculation: Speculation | None = None,
    ):
        """runner: what runs each forward (runner.py: this process, or every rank of a tensor-parallel group).
        exact_tiles: exact mode's (prefill chunk, decode rows) tile sizes (exact.py), None outside exact mode.
        views: attention may read consecutive slots as a view of the pool (not in exact mode).
        speculation: drafts for decode rows, verified in the same forward (speculation.py), or None."""
        self.runner = runner
        self.scheduler = scheduler
        self.speculation = speculation
        self.kv = scheduler.kv
        self.pool = scheduler.kv.pool
        self.exact_tiles, self.views = exact_tiles, views
        self._inbox: queue.Queue = queue.Queue()  # ("submit" | "abort", request) or ("call", (fn, future))
        self._serving = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def serving(self) -> bool:
        """Whether a serve() loop steps the engine (handles then wait for their text instead of stepping)."""
        return self._serving

    # -- from any thread ------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        kv, pool, disk = self.kv, self.pool, self.kv.disk
        traffic = None
        if disk is not None and disk.enabled:
            traffic = {
                "dir": str(disk.dir),
                "tokens_read": disk.pages_read * disk.page,
                "read_s": disk.read_s,
                "tokens_written": disk.pages_written * disk.page,
                "write_s": disk.write_s,
            }
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_slots_total=pool.num_slots,
            kv_slots_used=pool.num_slots - pool.free_slots,
            kv_slots_cached=kv.tree.total_tokens,
            prefix_cache_hit_rate=kv.tree.stats.hit_rate,
            preemptions=self.scheduler.preemptions,
            disk=traffic,
        )

    def submit(self, request: Request) -> RequestHandle:
        self._inbox.put(("submit", request))
        return RequestHandle(request, self)

    def abort(self, request: Request) -> None:
        self._inbox.put(("abort", request))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the engine thread between two steps (from a server's handler: a forward of the model
        outside any request, such as echo's prompt logprobs, must not run beside a step); its result or
        exception comes back through the Future."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    # -- the engine thread ----------------------------------------------------------------------------

    def _take_inbox(self, wait: float = 0.0) -> None:
        """Apply what other threads sent; wait: seconds to block for the first item if none is there."""
        while True:
            try:
                kind, r = self._inbox.get(block=wait > 0, timeout=wait or None)
            except queue.Empty:
                return
            wait = 0.0
            if kind == "submit":
                self.scheduler.add(r)
            elif kind == "abort":
                self._end(r, "abort")
            elif kind == "call":
                fn, future = r
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # the caller's to handle, not the engine's
                        future.set_exception(e)

    @torch.inference_mode()
    def step(self) -> bool:
        """Run one step; False if there was nothing to do. If the forward fails, every request in the engine
        is ended with that error (their slots freed), and the error is raised."""
        self._take_inbox()
        if not self.scheduler.has_work:
            return False
        try:
            works = self.scheduler.plan()
            if works and self.speculation is not None:
                self.speculation.attach(works, self.scheduler.running)
            if works:
                self._run(works)
                self.scheduler.finish_step(works)
        except BaseException as e:
            self._fail_all(e)
            raise
        return True

    def _run(self, works: list[Work]) -> None:
        """The runner's forward over every planned row (in exact mode, fixed-shape tiles, one forward each);
        each request whose last row was computed picks its next token (with a draft: its next tokens)."""
        if self.exact_tiles is not None:
            tiles = exact_mode.tiles(works, *self.exact_tiles)
        else:
            tiles = [[(segment(w), w if w.sample else None) for w in works]]
        chosen: dict[int, list[torch.Tensor]] = {}  # id(work) -> the logits [rows, vocab] its tokens come from
        began = time.perf_counter()
        for tile in tiles:
            logits = self.runner.forward(self.pool, [rows for rows, _ in tile], views=self.views)
            at = 0
            for rows, w in tile:
                if w is not None:
                    chosen.setdefault(id(w), []).append(logits[at : at + len(rows.logit_rows)])
                at += len(rows.logit_rows)
        if self.speculation is not None:
            self.speculation.timed(works, time.perf_counter() - began)
        for w in works:
            if id(w) in chosen:
                taken = self._accept(w.request, torch.cat(chosen[id(w)]), w.draft)
                if w.draft and taken is not None:
                    self.speculation.verified(w, taken)

    @staticmethod
    def _accept(r: Request, logits: torch.Tensor, draft: list[int]) -> int | None:
        """r picks its next token from its logits [1, vocab] (with a draft of k tokens: [k + 1, vocab], and it
        takes the draft's tokens while they are the ones it picks). What can fail here is r's alone (its
        sampler, its logprobs, its stop strings, its stream): such a failure ends r with the error and the rest
        of the batch goes on. r is then finished, so the bookkeeping after the forward releases its slots as for
        any finished request; only a failure of the shared forward itself fails everyone (step())."""
        try:
            return r.accept(logits, draft)
        except Exception as e:
            log.warning("request %d failed in its own part of a step (%r); the other requests go on", r.id, e)
            if not r.finished:
                r.finish("error", e)

    def _end(self, r: Request, reason: str, error: BaseException | None = None) -> None:
        """Take r out of the engine (its KV handed to the tree or freed) and finish it, unless it is done."""
        if r in self.scheduler.running:
            self.scheduler.release(r)
        elif r in self.scheduler.waiting:
            self.scheduler.waiting.remove(r)
        if not r.finished:
            r.finish(reason, error)

    def _fail_all(self, error: BaseException) -> None:
        for r in [*self.scheduler.running, *self.scheduler.waiting]:
            self._end(r, "error", error)

    def run_until_done(self) -> None:
        while self.step():
            pass

    # -- serving ------------------------------------------------------------------------------------

    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Step in the calling thread until should_stop() is true: while there is work, one step after another;
        while there is none, asleep on the queue of submissions (waking every IDLE_WAIT_S to check should_stop)."""
        self._serving = True
        try:
            while not should_stop():
                self.runner.check()  # a lost tensor-parallel rank ends serving (RankFailure)
                try:
                    busy = self.step()
                except RankFailure:
                    raise
                except Exception:  # the requests got the error; keep serving the next ones
                    busy = True
                if not busy:
                    self._take_inbox(wait=IDLE_WAIT_S)
        finally:
            self._serving = False

    def start(self) -> None:
        """serve() in a background thread until stop()."""
        if self._thread is None:
            self._stop.clear()
            self._serving = True  # from now on, handles wait for their text
            self._thread = threading.Thread(
                target=self.serve, args=(self._stop.is_set,), name="minillm-engine", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current step (requests still in the engine stay there)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


class RequestHandle:
    """Iterate for the text as it is generated; afterwards (or from `result()`) the Completion.

    Unless a serve() loop drives the engine, iterating steps the engine itself (every running request
    advances, not just this one). Leaving the loop early aborts the request."""

    def __init__(self, request: Request, engine: Engine):
        self.request = request
        self.engine = engine
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        if self.completion is not None:  # already read to the end
            return
        try:
            while True:
                try:
                    piece = self.request.pieces.get_nowait()
                except queue.Empty:
                    if self.engine.serving:
                        piece = self.request.pieces.get()
                    else:
                        if not self.engine.step():
                            raise RuntimeError(
                                f"request {self.request.id} is not done but the engine has no work"
                            ) from None
                        continue
                if piece is DONE:
                    break
                yield piece
        finally:
            if self.request.finish_reason is None:  # the caller left early
                self.abort()
        if self.request.error is not None:
            raise self.request.error
        self.completion = self.request.completion()

    def result(self) -> Completion:
        """Wait for the request to finish; its Completion."""
        for _ in self:
            pass
        return self.completion

    def abort(self) -> None:
        """Stop the request; its slots are freed and its locks released at the engine's next step."""
        self.engine.abort(self.request)
