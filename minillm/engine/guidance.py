"""The grammar backend of constrained decoding: llguidance (Microsoft's Rust grammar engine; its wheel has no
Python dependencies and reads tokenizer.json itself). A JSON schema, a regex or a Lark grammar is compiled to
one llguidance grammar; a matcher per request walks it token by token and fills the allowed-token bitmask.

Costs, and where they are paid: the tokenizer index (a trie of every token's bytes) is built once per loaded
model, on first use (about 1.6 s for Qwen3's 151k tokens here); a grammar is compiled once per distinct
schema text (cached); inside a JSON string, where nearly every token is allowed, a row's mask costs about 0.1 ms
to compute and 36-110 us to unpack for Qwen3's vocabulary (measured on a loaded machine; README, Structured
outputs).

JSON whitespace: the grammar allows at most `max_whitespace` whitespace characters between two JSON tokens,
so a model cannot pad forever with newlines until max_tokens (the most common complaint about JSON mode).
"""

from __future__ import annotations

import functools
import json

import torch

from ..errors import MinillmError
from .constraint import ConstraintError

_BIT_INDEX = torch.arange(32, dtype=torch.int32)
INSTALL_HINT = "structured outputs need the llguidance package: pip install 'minillm[structured]'"
DEFAULT_MAX_WHITESPACE = 8  # consecutive whitespace characters allowed between JSON tokens


def whitespace_pattern(max_whitespace: int) -> str:
    """llguidance's whitespace between JSON tokens: at most this many spaces, tabs or line breaks."""
    return f"[\\x20\\x0A\\x0D\\x09]{{0,{max_whitespace}}}"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise MinillmError(INSTALL_HINT) from None
    return llguidance


class GrammarCompiler:
    """One per loaded model: the tokenizer index, and compiled grammars cached by their text."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        self.tokenizer_json, self.vocab_size, self.eos_ids = tokenizer_json, vocab_size, eos_ids
        self._index = None

    @property
    def index(self):
        """llguidance's tokenizer, built on first use (a second or two for a large vocabulary)."""
        if self._index is None:
            ll = _llguidance()
            eos = self.eos_ids or None
            self._index = ll.LLTokenizer(self.tokenizer_json, n_vocab=self.vocab_size, eos_token=eos)
        return self._index

    def json_schema(self, schema, max_whitespace: int = DEFAULT_MAX_WHITESPACE) -> str:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise MinillmError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise MinillmError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        return self._compile("json", json.dumps(schema, sort_keys=True), max_whitespace)

    def regex(self, pattern: str) -> str:
        return self._compile("regex", pattern, 0)

    def lark(self, grammar: str) -> str:
        """A Lark grammar (llguidance's dialect), or a GBNF one (llama.cpp's), converted."""
        return self._compile("lark", grammar, 0)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one compiler per model, kept as long as the model)
    def _compile(self, kind: str, text: str, max_whitespace: int) -> str:
        """llguidance's grammar for a schema (canonical JSON text), regex or Lark text; checked once here, so a
        bad one is refused with its message before any request runs."""
        ll = _llguidance()
        what = {"json": "JSON schema", "regex": "regex", "lark": "grammar"}[kind]
        try:
            if kind == "json":
                options = {"whitespace_pattern": whitespace_pattern(max_whitespace)}
                grammar = ll.LLMatcher.grammar_from_json_schema(text, defaults=options)
            elif kind == "regex":
                grammar = ll.LLMatcher.grammar_from_regex(text)
            else:
                if "::=" in text:  # GBNF, llama.cpp's grammar format (what vLLM's guided_grammar takes too)
                    from llguidance.gbnf_to_lark import gbnf_to_lark

                    text = gbnf_to_lark(text)
                grammar = ll.LLMatcher.grammar_from_lark(text)
            error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, self.index)
        except Exception as e:  # the converters raise plain exceptions on text they cannot parse
            raise MinillmError(f"the {what} cannot be used: {_first_line(str(e))}") from None
        if error:
            raise MinillmError(f"the {what} cannot be used: {_first_line(messages[0])}")
        return grammar

    def constraint(self, grammar: str) -> Guided:
        return Guided(_llguidance().LLMatcher(self.index, grammar, log_level=0), self.vocab_size)


class Guided:
    """A Constraint (constraint.py) over an llguidance matcher."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"grammar: {_first_line(self.matcher.get_error())}")

    def allowed(self) -> torch.Tensor:
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty(words, dtype=torch.int32)  # bit t % 32 of word t // 32: token t is allowed
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
        self._check()
        bits = (bitmask[:, None] >> _BIT_INDEX) & 1  # [words, 32]: bit i of word w is token 32 w + i
        return bits.reshape(-1)[: self.vocab_size].bool()  # 36-110 us for 151,936 tokens here

    @property
    def can_end(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} does not fit the grammar ({_first_line(self.matcher.get_error())})")

    def forced(self) -> list[int]:
        return [] if self.matcher.is_stopped() else self.matcher.compute_ff_tokens()

    def rollback(self, count: int) -> None:
        self.matcher.rollback(count)


def _first_line(message: str) -> str:
    """llguidance's messages span lines (a caret under the spot, the grammar's text): the first line, and the
    first later one that says what the error is."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    return lines[0] if detail is None else f"{lines[0]} {detail}"
