"""Every request setting's type and legal range, in one table that the Python API, the CLI and the server share.

A setting is checked once, where it enters (LLM.request, which the CLI and the server also go through), and a
bad one is refused there with one line naming it: InvalidSetting, whose `name` says which setting it was (the
server turns it into a 400 with that `param`). Nothing that passes these checks may fail later in a step:
where a legal value is numerically hostile (a temperature of 1e-40, a repetition penalty of 1e-300), the
sampler makes it safe (sampling.py) instead of refusing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import MinillmError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_STOP_CHARS = 1024  # per stop string: the matcher looks for every prefix of every stop string at each token
MAX_LOGPROBS = 20  # alternatives per token


class InvalidSetting(MinillmError):
    """A request setting outside its type or range; `name` is the setting's name in LLM.generate's terms."""

    def __init__(self, name: str, message: str):
        super().__init__(f"invalid setting: {message}")
        self.name = name


@dataclass(frozen=True)
class Limit:
    kind: type  # int or float (an int is a legal float; a bool is neither)
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    meaning: str = ""  # what special values mean, for the error message

    def check(self, name: str, value):
        """value if it is legal (ints given for floats stay as given), else InvalidSetting."""
        number = (int, float) if self.kind is float else int
        if isinstance(value, bool) or not isinstance(value, number):
            what = "a number" if self.kind is float else "an integer"
            raise InvalidSetting(name, f"{name} must be {what}, got {value!r}")
        if self.kind is float and not math.isfinite(value):
            raise InvalidSetting(name, f"{name} must be finite, got {value}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and value > self.high
        if below or above:
            low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
            high = "" if self.high is None else f"<= {self.high}"
            bounds = " and ".join(b for b in (low, high) if b)
            note = f" ({self.meaning})" if self.meaning else ""
            raise InvalidSetting(name, f"{name} must be {bounds}{note}, got {value}")
        return value


# The sampling settings (sampling.SamplingParams' fields) and the request's own numeric settings.
LIMITS = {
    "temperature": Limit(float, 0, meaning="0 means greedy"),
    "top_k": Limit(int, 0, meaning="0 turns it off"),
    "top_p": Limit(float, 0, 1, low_open=True, meaning="1 turns it off"),
    "min_p": Limit(float, 0, 1, meaning="0 turns it off"),
    "repetition_penalty": Limit(float, 0, low_open=True, meaning="1 turns it off"),
    "presence_penalty": Limit(float, -2, 2, meaning="OpenAI's range"),
    "frequency_penalty": Limit(float, -2, 2, meaning="OpenAI's range"),
    "seed": Limit(int, SEED_MIN, SEED_MAX, meaning="a 64-bit seed"),
    "max_new_tokens": Limit(int, 1),
    "logprobs": Limit(int, 0, MAX_LOGPROBS, meaning="alternatives per token"),
    "max_whitespace": Limit(int, 0, 256, meaning="whitespace characters allowed between JSON tokens"),
}


def check(name: str, value):
    """value, checked against LIMITS[name]; None (unset) passes."""
    return None if value is None else LIMITS[name].check(name, value)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidSetting(name, f"{name} must be True or False, got {value!r}")
    return value


def check_stop(stop) -> list[str]:
    """A string or a list of strings, each at most MAX_STOP_CHARS long; the list form."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidSetting("stop", f"stop must be a string or a list of strings, got {stop!r:.80}")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidSetting("stop", f"a stop string may be at most {MAX_STOP_CHARS} characters long")
    return list(stops)
