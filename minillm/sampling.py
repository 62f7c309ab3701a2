"""Choosing the next token from the logits: greedy, or sampling reshaped by the usual processors.

Order and formulas follow transformers' generate(), so the same seed picks the same tokens:
  repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw.
OpenAI's presence and frequency penalties (which transformers lacks) apply right after the repetition
penalty, over the tokens generated so far, as vLLM applies them.
Each processor works on logits [1, vocab] in float32 and removes tokens by setting them to -inf.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from .errors import MinillmError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the top token's probability; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages every token already in prompt or output; 1 = off
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far; 0 = off
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far; 0 = off
    seed: int | None = None  # same seed, same prompt, same settings -> same tokens

    def validate(self) -> None:
        def bad(what: str) -> MinillmError:
            return MinillmError(f"invalid sampling setting: {what}")

        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise bad(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:  # OpenAI's range
                raise bad(f"{name} must be in [-2, 2], got {value}")

    @property
    def counts_output(self) -> bool:
        """Whether sampling needs the counts of the tokens generated so far."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token in `seen` (prompt and output ids) less likely: positive logits are divided by the
    penalty, negative ones multiplied (dividing a negative logit would raise it)."""
    scores = torch.gather(logits, 1, seen[None])
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen[None], scores)


def presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                               frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logit - frequency x count - presence x (count > 0), counts [vocab] of the tokens
    generated so far."""
    return logits - (frequency * counts + presence * (counts > 0).float())[None]


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    kth_best = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth_best, -math.inf)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: sort ascending, drop the low tail whose total probability is <= 1 - p; the most
    likely token always stays."""
    sorted_logits, order = torch.sort(logits, dim=1)  # ascending
    cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, -math.inf)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least p times the most likely token's (the bar moves with the
    model's confidence); the most likely token always stays."""
    probs = torch.softmax(logits, dim=1)
    remove = probs < p * probs.amax(dim=1, keepdim=True)
    order = torch.argsort(logits, dim=1, descending=True)
    remove_sorted = torch.gather(remove, 1, order)
    remove_sorted[..., :1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, -math.inf)


class Sampler:
    """Picks tokens for one request; holds the request's random generator so its seed governs every draw."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        params.validate()
        self.params = params
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def process(self, logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None = None) -> torch.Tensor:
        """logits [1, vocab] float32, seen [n] int64 (prompt and output ids, for the repetition penalty),
        counts [vocab] float32 (times each token was generated, for presence/frequency) -> processed logits."""
        p = self.params
        if p.repetition_penalty != 1.0:
            logits = repetition_penalty(logits, seen, p.repetition_penalty)
        if p.counts_output:
            logits = presence_frequency_penalty(logits, counts, p.presence_penalty, p.frequency_penalty)
        if p.temperature == 0:
            return logits
        logits = logits / p.temperature
        if p.top_k > 0:
            logits = top_k(logits, p.top_k)
        if p.top_p < 1.0:
            logits = top_p(logits, p.top_p)
        if p.min_p > 0:
            logits = min_p(logits, p.min_p)
        return logits

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None = None) -> int:
        logits = self.process(logits, seen, counts)
        if self.params.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits, dim=1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
