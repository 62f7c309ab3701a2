"""Choosing the next token from the logits: greedy, or sampling reshaped by the usual processors.

Order and formulas follow transformers' generate(), so the same seed picks the same tokens:
  repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw.
OpenAI's presence and frequency penalties (which transformers lacks) apply right after the repetition
penalty, over the tokens generated so far, as vLLM applies them.
Each processor works on logits [1, vocab] in float32 and removes tokens by setting them to -inf.

Every legal setting gives a token, never an error (limits.py says what is legal). Three edges need care,
because transformers' formulas turn them into NaN probabilities and torch.multinomial then raises:
  * a temperature below GREEDY_BELOW is greedy (as in vLLM): dividing logits by 1e-40 overflows float32;
  * a processor whose arithmetic overflows (a repetition penalty of 1e-300 divides a positive logit into
    +inf) is clamped to the largest finite float32 wherever its input was finite, so -inf keeps meaning
    "removed" and nothing else becomes infinite; settings beyond float32's own range (1e-300 is 0 there,
    1e300 is inf) are applied in float64 or capped, so no 0 / 0 or inf / inf arises;
  * a model's +inf logits mean "infinitely more likely than the rest": only those tokens stay, equally
    likely. NaN logits, or none above -inf, have no meaning: that request fails alone (engine.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields

import torch

from ..errors import MinillmError
from ..limits import LIMITS

GREEDY_BELOW = 1e-5  # temperatures under this are greedy
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


class BadLogits(MinillmError):
    """The model's logits for a row cannot be sampled from (NaN, or every token at -inf)."""


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
        """Each field against its limit (limits.py): InvalidSetting naming the first bad one."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name != "seed":
                LIMITS[f.name].check(f.name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def counts_output(self) -> bool:
        """Whether sampling needs the counts of the tokens generated so far."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token in `seen` (prompt and output ids) less likely: positive logits are divided by the
    penalty, negative ones multiplied (dividing a negative logit would raise it)."""
    scores = torch.gather(logits, 1, seen[None])
    # float32 arithmetic would turn a penalty outside its range into 0 or inf (then 0 / 0 = NaN): use float64
    wide = scores if FLOAT32_TINY <= penalty <= FLOAT32_MAX else scores.double()
    penalized = torch.where(wide < 0, wide * penalty, wide / penalty).float()
    return logits.scatter(1, seen[None], finite_where_finite(penalized, scores))


def finite_where_finite(result: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """result clamped to float32's finite range where `before` was finite: an extreme but legal setting
    must not overflow a logit into +-inf (and then NaN probabilities). A no-op unless something overflowed."""
    overflowed = torch.isinf(result) & torch.isfinite(before)
    if not bool(overflowed.any()):
        return result
    return torch.where(overflowed, result.clamp(-FLOAT32_MAX, FLOAT32_MAX), result)


def presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
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


def only_samplable(logits: torch.Tensor) -> torch.Tensor:
    """logits [1, vocab] as they can be sampled from: unchanged, or, if some are +inf, those tokens alone
    (logit 0, the rest -inf). BadLogits if any is NaN or none is above -inf. One reduction in the common case."""
    top = float(logits.max())  # NaN if any logit is NaN
    if math.isnan(top):
        raise BadLogits("the model's logits for this request contain NaN")
    if top == -math.inf:
        raise BadLogits("the model gave every token a logit of -inf")
    if top == math.inf:
        return torch.where(torch.isposinf(logits), 0.0, -math.inf)
    return logits


class Sampler:
    """Picks one request's tokens. It holds the request's random generator, so its seed governs every draw, and
    the history its penalties read (kept only when a penalty needs it): the ids of the prompt and output for
    the repetition penalty, and the count of each generated token for the presence and frequency penalties."""

    def __init__(
        self, params: SamplingParams, prompt: list[int] = (), vocab_size: int = 0, device: torch.device | str = "cpu"
    ):
        params.validate()
        self.params = params
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seen = torch.tensor(list(prompt), dtype=torch.int64) if params.repetition_penalty != 1.0 else None
        self.counts = torch.zeros(vocab_size) if params.counts_output else None  # [vocab]

    def record(self, token: int) -> None:
        """The request generated `token`: the penalties see it from the next pick on."""
        if self.seen is not None:
            self.seen = torch.cat((self.seen, torch.tensor([token])))
        if self.counts is not None:
            self.counts[token] += 1

    def process(
        self, logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits [1, vocab] float32, seen [n] int64 (prompt and output ids, for the repetition penalty),
        counts [vocab] float32 (times each token was generated, for presence/frequency) -> processed logits."""
        p = self.params
        if p.repetition_penalty != 1.0:
            logits = repetition_penalty(logits, seen, p.repetition_penalty)
        if p.counts_output:
            logits = presence_frequency_penalty(logits, counts, p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            return logits
        # a temperature beyond float32's range would become inf, and -inf / inf is NaN
        logits = finite_where_finite(logits / min(p.temperature, FLOAT32_MAX), logits)
        if p.top_k > 0:
            logits = top_k(logits, p.top_k)
        if p.top_p < 1.0:
            logits = top_p(logits, p.top_p)
        if p.min_p > 0:
            logits = min_p(logits, p.min_p)
        return logits

    def __call__(
        self, logits: torch.Tensor, seen: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> int:
        """The next token for logits [1, vocab]; seen and counts default to the sampler's own history."""
        seen = self.seen if seen is None else seen
        counts = self.counts if counts is None else counts
        logits = self.process(only_samplable(logits), seen, counts)
        if self.params.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits, dim=1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
