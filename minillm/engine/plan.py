"""The step plan: what one step computes, as the scheduler decides it and a forward runs it.

    Work      one request's part of a step: positions [start, start + length) of its tokens, and whether the
              last of them picks the next token (the scheduler makes these); a decode Work may carry a draft,
              tokens guessed to follow, to be verified in the same forward (speculation.py)
    Segment   one sequence's rows as a forward reads them: tokens, first position, the slot of every position
              up to the last row, the rows whose logits are wanted (forward_batch.py reads these; under
              tensor parallelism they are what rank 0 sends the other ranks)
    segment() the one from the other, optionally padded to a fixed number of rows (exact mode's tiles)

Everything a forward needs is in the requests' tokens and slot tables, so a plan can run on any process that
holds the same pool layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..cache.kv_pool import DUMP_SLOT

if TYPE_CHECKING:
    from .request import Request


@dataclass
class Work:
    """One request's part of a step: positions [start, start + length) of its tokens, then its draft's."""

    request: Request
    start: int
    length: int
    sample: bool  # the last position's logits choose the next token (else: prefill chunk or replay)
    draft: list[int] = field(default_factory=list)  # guessed next tokens: rows after the last, each with logits

    @property
    def rows(self) -> int:
        return self.length + len(self.draft)

    def tokens_between(self, start: int, end: int) -> list[int]:
        """The tokens of positions [start, end), the draft's included (it follows the request's tokens)."""
        known = self.request.num_tokens
        return self.request.tokens_between(start, min(end, known)) + self.draft[max(start - known, 0) : end - known]


@dataclass
class Segment:
    """One sequence's rows: tokens at positions start .. start + len(tokens) - 1."""

    tokens: list[int]
    start: int
    slots: torch.Tensor  # [start + len(tokens)] int64: the pool slot of every position up to the last row
    logit_rows: range = range(0)  # the rows (within the segment) whose logits are wanted: the last real row's
    # for a step that samples, every row's for a verified draft


def segment(
    work: Work, start: int | None = None, length: int | None = None, rows: int | None = None, logits: bool | None = None
) -> Segment:
    """Positions [start, start + length) of work (default: all its rows, the draft's too) as a forward's rows,
    padded to `rows` rows (default: none) with rows that read token 0 and write to the pool's dump slot.
    logits: those of its last real row are wanted (default: if work samples); a draft's rows all want theirs."""
    start = work.start if start is None else start
    length = work.rows if length is None else length
    pad = 0 if rows is None else rows - length
    tokens = work.tokens_between(start, start + length)
    slots = work.request.slot_table[: start + length]
    if pad:
        tokens = tokens + [0] * pad
        slots = torch.cat((slots, torch.full((pad,), DUMP_SLOT, dtype=torch.int64)))
    wanted = work.sample if logits is None else logits
    drafted = max(0, start + length - (work.start + work.length))  # rows of the draft in this segment
    first = max(length - 1 - drafted, 0)  # the last known token's row (or the segment's first)
    return Segment(tokens, start, slots, range(first, length) if wanted else range(0))
