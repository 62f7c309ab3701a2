"""Constrained decoding: which tokens a request may pick next, so that its output has a required form (one of a
few choices, a regex, JSON that validates against a schema, a grammar).

The seam is small. Before a constrained request samples, the engine asks its constraint for the tokens allowed
now and sets every other logit to -inf (a row mask: the other rows of the batch are untouched); after the pick,
the constraint is told the token. Where the constraint allows exactly one continuation (a fixed key, a closing
brace), `forced()` names it and the request appends those tokens without sampling: their KV is computed in
the next forward, as extra rows of that request's segment, instead of one forward per token.

    Constraint   the protocol every backend implements
    Choice       the teaching version: one of a few strings, over a trie of their token ids (pure Python)
    Dormant      a constraint that sleeps until the model emits a trigger token (a tool call under "auto")
    mask_logits  the row mask itself

The grammar backend (llguidance, compiled per schema, regex or Lark grammar) is in guidance.py.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..errors import MinillmError

_MINUS_INF = torch.tensor(-math.inf)


class ConstraintError(MinillmError):
    """A token the constraint does not allow was fed to it (a bug, or a model that ignored the mask)."""


class Constraint(Protocol):
    def allowed(self) -> torch.Tensor | None:
        """[vocab] bool: the tokens that may come next (end-of-sequence tokens are the caller's: see
        can_end), or None when nothing is restricted now (EOS included: the output may end here)."""
        ...

    @property
    def can_end(self) -> bool:
        """The output so far is complete: the request may end here (an EOS token is allowed)."""
        ...

    @property
    def done(self) -> bool:
        """Complete, and nothing more may follow: the request ends ("stop") without waiting for EOS."""
        ...

    def accept(self, token: int) -> None:
        """token was appended to the output (ConstraintError if it was not allowed)."""
        ...

    def forced(self) -> list[int]:
        """Tokens that must come next whatever the model says, maybe none: the text that is the only
        continuation, as the tokenizer writes it (its canonical tokens; the mask alone would also allow the same
        text split into other tokens)."""
        ...

    def rollback(self, count: int) -> None:
        """Forget the last `count` accepted tokens (a speculative draft's rejected tail)."""
        ...


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor, eos_ids: set[int], can_end: bool) -> torch.Tensor:
    """logits [1, vocab] with every token outside `allowed` at -inf; the EOS tokens allowed exactly when the
    output may end here. A new tensor: the caller's raw logits (logprobs, return_logits) stay as they were."""
    out = torch.where(allowed[None, : logits.shape[-1]], logits, _MINUS_INF)  # 73-100 us for 151,936 tokens here
    for eos in eos_ids:
        if eos < logits.shape[-1]:
            out[0, eos] = logits[0, eos] if can_end else -math.inf
    return out


class Choice:
    """The output is exactly one of `choices` (strings), as the tokenizer writes each one. A trie over their
    token ids: the allowed tokens are the children of the node the output has reached. Complete when the node
    ends a choice; done when it also has no children (no longer choice continues it)."""

    def __init__(self, choices: list[list[int]], vocab_size: int):
        if not choices or any(not ids for ids in choices):
            raise MinillmError("choice needs at least one non-empty string")
        self.vocab_size = vocab_size
        self.root: dict = {}  # token -> child node; the key None marks the end of a choice
        for ids in choices:
            node = self.root
            for token in ids:
                node = node.setdefault(token, {})
            node[None] = True
        self.path = [self.root]  # the nodes reached, one per accepted token after the root

    def allowed(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[[t for t in self.path[-1] if t is not None]] = True
        return mask

    @property
    def can_end(self) -> bool:
        return None in self.path[-1]

    @property
    def done(self) -> bool:
        return self.can_end and len(self.path[-1]) == 1

    def accept(self, token: int) -> None:
        child = self.path[-1].get(token)
        if child is None:
            raise ConstraintError(f"token {token} continues none of the choices")
        self.path.append(child)

    def forced(self) -> list[int]:
        out, node = [], self.path[-1]
        while len(node) == 1 and None not in node:  # one child, and the choice does not end here
            ((token, node),) = node.items()
            out.append(token)
        return out

    def rollback(self, count: int) -> None:
        del self.path[len(self.path) - count :]


class Dormant:
    """No restriction until the model emits `trigger` (a token such as <tool_call>); from then on `make()`'s
    constraint governs, and once it is done the request is free again (it may open another). So a model that
    answers in prose is never masked, and one that starts a call must complete a valid one."""

    def __init__(self, trigger: int, make):
        self.trigger, self.make = trigger, make
        self.inner: Constraint | None = None
        self.history: list[Constraint | None] = []  # the inner constraint before each accepted token

    def allowed(self) -> torch.Tensor | None:
        return None if self.inner is None else self.inner.allowed()

    @property
    def can_end(self) -> bool:
        return self.inner is None or self.inner.can_end

    @property
    def done(self) -> bool:
        return False  # the model ends the turn (EOS), after prose or calls

    def accept(self, token: int) -> None:
        self.history.append(self.inner)
        if self.inner is None:
            if token == self.trigger:
                self.inner = self.make()
            return
        self.inner.accept(token)
        if self.inner.done:
            self.inner = None

    def forced(self) -> list[int]:
        return [] if self.inner is None else self.inner.forced()

    def rollback(self, count: int) -> None:
        for _ in range(count):
            before = self.history.pop()  # None: the token was prose, or the trigger that woke `make()`'s
            if before is not None:
                before.rollback(1)
            self.inner = before
