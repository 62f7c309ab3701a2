"""One request's life in the engine: its tokens, where their KV lives, how it picks tokens and streams text.

    waiting --admit--> running (prefill chunks, then a decode row per step) --> finished
       ^                  |
       +----preempt-------+   (its KV goes to the tree, its slots are freed; it resumes later)

KV bookkeeping, positions of `tokens` (prompt, then generated):
    [0, num_cached)              slots held by the radix tree, locked through `node`
    [num_cached, num_allocated)  slots this request owns (allocated, maybe not yet computed)
    [0, num_computed)            positions whose KV is in the pool
`slot_table[p]` is the pool slot of position p. A preempted request keeps its generated tokens, sampler
state and streamed text; on resuming it recomputes (or finds in the tree) their KV, feeding the generated
tokens back as decode rows ("replay"), so its output is what it would have been. A decode step computes every
position not yet computed: the last token, plus any a constraint forced after it (or a replay's tokens).

Text pieces travel through a thread-safe queue (`pieces`, ended by DONE), so a server's handler threads can
read them while one engine thread steps; the caller holds an engine.RequestHandle over it.
"""

from __future__ import annotations

import itertools
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..tokenizer import StopStrings, StreamDecoder
from .constraint import Constraint, mask_logits
from .sampling import Sampler

if TYPE_CHECKING:
    from ..cache.radix_cache import Node

_ids = itertools.count(1)
DONE = None  # end of a handle's stream


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before any sampling setting), and the most likely
    alternatives at that position: [(token id, logprob)], best first. A prompt's first token has neither
    (None): nothing comes before it."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Completion:
    text: str  # generated text, stop string and everything after it removed
    token_ids: list[int]  # generated ids only (an EOS id that ended generation is included)
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_new_tokens, context or KV pool full), "abort",
    # or "error" (the request failed: engine.py's failure isolation; LLM.generate raises the error)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    computed_tokens: int = 0  # prompt tokens prefilled by the model (prompt_tokens - cached_tokens)
    prefill_s: float = 0.0  # from admission to the first token (the prompt's prefill, maybe in chunks)
    ttft_s: float = 0.0  # time to first token, from submission: waiting, prefill, choosing the token
    decode_s: float = 0.0  # time of every step after the first token
    logits: torch.Tensor | None = None  # [new tokens, vocab] float32 raw logits of each step, if asked for
    logprobs: list[TokenLogprob] | None = None  # per generated token, if asked for
    forced_tokens: int = 0  # output tokens a constraint forced: appended without a forward of their own
    draft_proposed: int = 0  # speculation: draft tokens verified by the model
    draft_accepted: int = 0  # of those, taken as output (each one a forward saved)

    @property
    def prefill_tok_s(self) -> float:
        return self.computed_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = len(self.token_ids) - 1  # the first token came from prefill
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "cached_tokens": self.cached_tokens,
            "computed_tokens": self.computed_tokens,
            "forced_tokens": self.forced_tokens,
            "ttft_s": self.ttft_s,
            "timings": {
                "prefill_s": self.prefill_s,
                "ttft_s": self.ttft_s,
                "decode_s": self.decode_s,
                "prefill_tok_s": self.prefill_tok_s,
                "decode_tok_s": self.decode_tok_s,
                "draft_proposed": self.draft_proposed,  # speculation (as llama-server's draft_n, draft_n_accepted)
                "draft_accepted": self.draft_accepted,
            },
        }


class Request:
    def __init__(
        self,
        prompt: list[int],
        sampler: Sampler,
        stops: StopStrings,
        detok: StreamDecoder,
        max_new_tokens: int,
        eos_ids: set[int],
        use_prefix_cache: bool,
        return_logits: bool,
        logprobs: int | None,
        constraint: Constraint | None = None,
    ):
        """logprobs: record each generated token's logprob and this many top alternatives (None: off).
        constraint: what the output must look like (constraint.py). Its forced tokens are taken without
        sampling, and appended together so that one step computes their KV (skip_forced), unless logprobs or
        logits are wanted: a token appended that way has no logits of its own."""
        self.id = next(_ids)
        self.prompt = prompt
        self.generated: list[int] = []
        self.sampler, self.stops, self.detok = sampler, stops, detok
        self.max_new_tokens = max_new_tokens  # already capped so prompt + output fits the context
        self.eos_ids = eos_ids
        self.use_prefix_cache = use_prefix_cache
        self.return_logits = return_logits
        self.step_logits: list[torch.Tensor] = []
        self.logprobs = logprobs
        self.token_logprobs: list[TokenLogprob] = []
        self.constraint = constraint
        self.skip_forced = constraint is not None and logprobs is None and not return_logits
        self.forced_tokens = 0  # output tokens appended without a forward of their own (forced by the constraint)
        self.draft_proposed = self.draft_accepted = 0  # speculation: draft tokens verified, and taken
        self.speculation = None  # the speculation's state for this request (speculation.py), if it speculates

        self.slot_table = torch.zeros(len(prompt) + max_new_tokens, dtype=torch.int64)  # position -> pool slot
        self.node: Node | None = None  # locked end of the cached prefix
        self.num_cached = self.num_allocated = self.num_computed = 0
        self.prompt_cached = False  # the prompt's KV has been handed to the tree
        self.cached_tokens: int | None = None  # prompt tokens reused at first admission (reported)
        self.passed_over = 0  # times a later request was admitted first (aging, see scheduler.py)

        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submit_time = time.perf_counter()
        self.admit_time = self.finish_time = 0.0
        self.token_times: list[float] = []  # when each token was chosen (inter-token latency)
        self.pieces = queue.Queue()  # text pieces, then DONE; anything with put() (a server swaps in its own)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    def tokens_between(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (a decode step needs one token of it)."""
        p = len(self.prompt)
        return self.prompt[start:end] + self.generated[max(start - p, 0) : max(end - p, 0)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def owned_slots(self) -> torch.Tensor:
        return self.slot_table[self.num_cached : self.num_allocated]

    # -- choosing tokens ------------------------------------------------------------------------------

    def accept(self, logits: torch.Tensor, draft: list[int] = ()) -> int:
        """The step computed the logits [1, vocab] (float32) of this request's last token: pick the next token
        (within the constraint, if any), stream its text, and decide whether the request is done. Then append
        the tokens the constraint forces, if any: the next step computes their KV together.

        With a draft of k guessed tokens, the step fed them after the last token and computed logits
        [k + 1, vocab]: row i is what the model says after the draft's first i tokens. Each row picks a token
        exactly as a step of its own would (same sampler, same generator, the history so far); while the pick
        equals the draft's token, the next row is valid too and picks the token after it. The first pick that
        differs (or the last row's, after a draft taken whole) ends the step. So the tokens are those the
        request would have picked one step at a time; a draft only saves the steps (speculation.py).
        Returns how many of the draft's tokens were taken."""
        taken_before = self.draft_accepted
        for i in range(len(draft) + 1):
            token = self._accept_one(logits[i : i + 1])
            taken = i < len(draft) and token == draft[i]
            self.draft_accepted += taken
            if not taken or self.finished:
                break
        self.draft_proposed += len(draft)
        return self.draft_accepted - taken_before

    def _accept_one(self, logits: torch.Tensor) -> int:
        """accept() for one row of logits [1, vocab]; the token picked."""
        if self.return_logits:
            self.step_logits.append(logits)
        forced = self.constraint.forced() if self.constraint is not None else []
        # a forced token is taken as it is: no draw from the sampler's generator, so a seeded request's later
        # draws are the same whether its forced tokens come one step at a time or together
        token = forced[0] if forced else self.sampler(logits if self.constraint is None else self._masked(logits))
        if self.logprobs is not None:
            logprobs = torch.log_softmax(logits[0], dim=-1)
            top = logprobs.topk(self.logprobs) if self.logprobs else None
            self.token_logprobs.append(
                TokenLogprob(
                    token,
                    float(logprobs[token]),
                    [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())),
                )
            )
        self._append(token)
        while self.skip_forced and not self.finished:
            forced = self.constraint.forced()
            for t in forced:
                self.forced_tokens += 1
                if self._append(t):
                    break
            if not forced:
                break
        return token

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        """logits with every token the constraint does not allow now at -inf (EOS only where it may end)."""
        allowed = self.constraint.allowed()
        if allowed is None:  # nothing restricted (a dormant constraint): the logits as they are
            return logits
        return mask_logits(logits, allowed, self.eos_ids, self.constraint.can_end)

    def _append(self, token: int) -> bool:
        """token is the next output token: record it, stream its text; True if the request is now finished."""
        self.generated.append(token)
        self.token_times.append(time.perf_counter())
        self.sampler.record(token)
        if token in self.eos_ids:
            self.finish("stop")
            return True
        if self.constraint is not None:
            self.constraint.accept(token)
        self._emit(self.stops.feed(self.detok.push(token)))
        if self.stops.stopped or (self.constraint is not None and self.constraint.done):
            self.finish("stop")
        elif len(self.generated) == self.max_new_tokens:
            self.finish("length")
        return self.finished

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.put(piece)

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """Mark the request done and release the rest of its text (the engine frees its KV)."""
        self.finish_reason, self.error = reason, error
        self.finish_time = time.perf_counter()
        try:
            if not self.stops.stopped and error is None:
                self._emit(self.stops.feed(self.detok.flush()) + self.stops.finish())
        except Exception as e:  # the text's tail could not be decoded: the request failed after all
            self.finish_reason, self.error = "error", e
            raise
        finally:
            self.pieces.put(DONE)  # whatever happened, the reader learns that nothing more comes

    def completion(self) -> Completion:
        cached = self.cached_tokens or 0
        first = self.token_times[0] if self.token_times else self.finish_time
        return Completion(
            text=self.stops.text,
            token_ids=list(self.generated),
            prompt_tokens=len(self.prompt),
            finish_reason=self.finish_reason,
            cached_tokens=cached,
            computed_tokens=len(self.prompt) - cached,
            prefill_s=first - self.admit_time if self.admit_time else 0.0,
            ttft_s=first - self.submit_time,
            decode_s=self.finish_time - first,
            logits=torch.cat(self.step_logits) if self.return_logits and self.step_logits else None,
            logprobs=list(self.token_logprobs) if self.logprobs is not None else None,
            forced_tokens=self.forced_tokens,
            draft_proposed=self.draft_proposed,
            draft_accepted=self.draft_accepted,
        )
