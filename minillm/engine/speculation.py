"""Speculative decoding: guess a request's next tokens, verify them all in one forward, keep what the model
would have picked anyway.

On a CPU a decode step reads every weight once to produce one token per sequence; a few more rows in the same
forward cost little (bench/kernels_rows_fp32.json: 8 rows 1.42x one row). So a request with a draft of k
guessed tokens (drafters.py) feeds its last token and the k guesses as one segment of k + 1 rows, beside the
other requests' rows, and gets k + 1 rows of logits. Row i is the model's prediction after the first i
guesses. Request.accept picks a token from row 0 exactly as a plain step would; if it equals guess 0, row 1
is a valid prediction too and picks the next token; and so on, until a pick differs from its guess or the
last row has picked. A step therefore yields 1 to k + 1 tokens, and they are the tokens plain decoding picks:

  * greedy: each pick is the argmax of the same logits (bitwise the same logits in exact mode: exact.tiles
    computes each verify row as a lone decode row, so `speculate` changes no bit of tokens or logprobs);
  * sampling: each pick is a draw from the request's own generator, one draw per token as in plain decoding,
    so a seeded request draws the same numbers and, in exact mode, picks the same tokens. A drafter's guess
    is a single token (a point mass), and for such a proposal drawing x from the model's distribution p and
    taking the guess d only if x = d *is* the rejection-sampling rule: d is accepted with probability
    min(1, p(d) / 1) = p(d), and on rejection x is distributed as p without d, renormalised, which is the
    rule's residual max(0, p - q) normalised. The output distribution is the model's;
  * penalties, logprobs, stop strings, max_tokens: each pick runs through the same code with the history
    so far, and the loop ends when the request finishes.

The rejected guesses' KV slots go back to the pool in the same step (scheduler.finish_step, KVManager.trim).
Requests with a constraint (constraint.py) do not speculate: their forced tokens are already taken in bulk.

When to guess (fast mode), per request and step. With B rows of plain decode in the step, a step costs about
S (1 + c (B - 1)) for B tokens, c = ROW_COST the measured cost of one more row relative to the first. A draft
row costs c S and yields a token with probability a^j for the j-th guess, a the request's recent per-token
acceptance. It pays while a^j > c B / (1 + c (B - 1)): alone (B = 1) a guess pays from a = 0.1, among 8
rows from 0.47, among 16 from 0.64. So the draft length is the largest j that passes (at most
num_draft_tokens), and when the batch is large and guesses poor, speculation is off by itself. A request that
stopped guessing forgets its record slowly (FORGET per step), so it tries again now and then: with guesses
that are always wrong, a lone request verifies a one-token draft in about one step of twenty. Making a guess
costs too where a draft model makes it: that cost, measured per guess against the measured one-row step
(Speculation.timed), is added to the row's, so a draft model that is slow next to the model guesses less.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .drafters import Drafter
from .kv_manager import KVManager
from .plan import Work
from .request import Request

# One more row of a decode forward, relative to a one-row step. Measured: 0.06-0.075 per row for the products
# of a Qwen2.5-0.5B-shaped model (bench/kernels_rows_fp32.json: 24 layers, 1 row 51.8 ms, 8 rows 73.6, 32 rows
# 172.6); 0.1-0.2 for SmolLM2-135M's whole forward at 2-9 rows, and about 0.04 per row past 8 (fp32, 30
# layers: 1 row 31.7 ms, 2 rows 39.1, 5 rows 54.5, 8 rows 53.8, 16 rows 70.7). 0.1 kept 8 concurrent chats at
# 0.98x the throughput without speculation in tools/bench_speculative.py (0.07 let them fall to 0.84x).
ROW_COST = 0.1
PRIOR, PRIOR_WEIGHT = 0.5, 0.5  # acceptance assumed before any verify, worth half a judged guess
MEMORY = 0.9  # per verify, the weight of the past in the running acceptance estimate
FORGET = 0.985  # per step without a draft, the past fades this much (so a request that stopped guessing retries)
COST_FORGET = 0.995  # per step without any draft, the measured cost of a guess fades this much (half-life 140)


@dataclass
class Acceptance:
    """A request's running estimate of how likely each guessed token is to be taken."""

    taken: float = 0.0  # decayed counts: guesses taken
    tried: float = 0.0  # and guesses the model judged (taken, plus the first rejected one)
    rate: float = PRIOR

    def update(self, proposed: int, accepted: int) -> None:
        self.taken = MEMORY * self.taken + accepted
        self.tried = MEMORY * self.tried + accepted + (accepted < proposed)
        self._estimate()

    def idle(self) -> None:
        self.taken, self.tried = FORGET * self.taken, FORGET * self.tried
        self._estimate()

    def _estimate(self) -> None:
        self.rate = (self.taken + PRIOR * PRIOR_WEIGHT) / (self.tried + PRIOR_WEIGHT)


def draft_length(rate: float, decode_rows: int, limit: int, draft_cost: float = 0.0) -> int:
    """How many guesses pay at this acceptance rate with this many plain decode rows in the step (see above).
    draft_cost: what making one guess costs, relative to a one-row step (a draft model's forwards)."""
    threshold = (ROW_COST + draft_cost) * decode_rows / (1 + ROW_COST * (decode_rows - 1))
    if rate <= threshold:
        return 0
    if rate >= 1:
        return limit
    return min(limit, int(math.log(threshold) / math.log(rate)))


class Speculation:
    def __init__(self, drafter: Drafter, kv: KVManager, max_draft: int, adaptive: bool = True):
        """max_draft: the most guesses per request and step (num_draft_tokens). adaptive: False always guesses
        max_draft tokens where the drafter has them (for tests and measurements)."""
        self.drafter, self.kv, self.max_draft, self.adaptive = drafter, kv, max_draft, adaptive
        self._drafting: dict[int, Request] = {}  # request id -> request, those the drafter may hold state for
        self.step_s: float | None = None  # running estimate of a one-row step's forward (seconds)
        self.draft_cost = 0.0  # running estimate of one guess's cost, in one-row steps (~0 for lookups)
        self._draft_s, self._guesses = 0.0, 0  # this step's drafting time and guesses

    def attach(self, works: list[Work], running: list[Request]) -> None:
        """Give the step's plain decode works a draft (and slots for its rows, from free slots only)."""
        for rid in [rid for rid, r in self._drafting.items() if r not in running]:  # left the batch
            self.drafter.forget(self._drafting.pop(rid))
        decode = [w for w in works if w.sample and w.length == 1 and not w.request.in_prefill]
        wanted = []
        for w in decode:
            r = w.request
            if r.constraint is not None:
                continue
            if r.speculation is None:
                r.speculation = Acceptance()
            limit = min(self.max_draft, r.max_new_tokens - len(r.generated) - 1)
            k = draft_length(r.speculation.rate, len(decode), limit, self.draft_cost) if self.adaptive else limit
            if k > 0:
                wanted.append((w, k))
            else:
                r.speculation.idle()
        self._draft_s, self._guesses = 0.0, 0
        if not wanted:
            self.draft_cost *= COST_FORGET  # measured only while guessing: let an old high cost fade, slowly
            return
        for w, _ in wanted:
            self._drafting[w.request.id] = w.request
        began = time.perf_counter()
        drafts = self.drafter.propose([(w.request, k) for w, k in wanted])
        # a draft model's first forward over a new request's prompt is a prefill, paid once per request: not
        # counted as the cost of guessing
        self._draft_s = time.perf_counter() - began - self.drafter.prompt_s
        for (w, k), draft in zip(wanted, drafts):
            draft = list(draft[:k])
            self._guesses += len(draft)
            if draft and self.kv.reserve_free(w.request, len(draft)):
                w.draft = draft

    def timed(self, works: list[Work], forward_s: float) -> None:
        """The step's forward took forward_s: update the one-row step estimate (from steps of decode rows only)
        and, if this step guessed, the cost of a guess relative to it."""
        if any(w.request.in_prefill for w in works):
            return
        rows = sum(w.rows for w in works)
        one_row = forward_s / (1 + ROW_COST * (rows - 1))
        self.step_s = one_row if self.step_s is None else 0.8 * self.step_s + 0.2 * one_row
        if self._guesses:
            cost = self._draft_s / self._guesses / self.step_s
            self.draft_cost = 0.5 * self.draft_cost + 0.5 * cost

    def verified(self, w: Work, accepted: int) -> None:
        """After the forward: fold a verified draft's outcome into its request's acceptance estimate."""
        w.request.speculation.update(len(w.draft), accepted)
