"""Text <-> token ids with the checkpoint's own tokenizer.json, its chat template, streaming decode and
stop strings.

Special tokens are added exactly as the checkpoint says: tokenizer.json's post-processor adds a BOS token
for models that want one (Llama) and none for those that do not (Qwen). A chat template already writes
the BOS token into its text, so text rendered from a template is encoded without adding another.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .errors import MinillmError
from .model.config import read_json

# Texts longer than this are encoded through encode_batch, which lets other threads run meanwhile (a server's
# event loop and the engine's step: a 2 MB prompt takes seconds to tokenize).
LONG_TEXT_CHARS = 16384


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": "..."}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _render_function(template: str):
    """Compile a chat template the way transformers does: a sandboxed jinja2 environment with
    trim_blocks/lstrip_blocks, loop controls, and the helpers templates call (tojson, raise_exception,
    strftime_now)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise MinillmError(f"the checkpoint's chat template does not compile ({e})") from None


class Tokenizer:
    def __init__(self, folder: Path):
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MinillmError(
                f"{folder} has no tokenizer.json; minillm needs the fast-tokenizer file of the checkpoint"
            )
        self.path = path  # tokenizer.json (the grammar backend reads it too: engine/guidance.py)
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exceptions for malformed files
            raise MinillmError(f"{path} could not be read as a tokenizer ({e})") from None
        config_path = folder / "tokenizer_config.json"
        settings = read_json(config_path) if config_path.is_file() else {}
        self.bos_token = _token_text(settings.get("bos_token"))
        self.eos_token = _token_text(settings.get("eos_token"))
        template = settings.get("chat_template")
        if isinstance(template, list):  # older layout: a list of named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"  # transformers >= 4.43 may save it beside the json
        if jinja_file.is_file():
            template = jinja_file.read_text()
        self.chat_template: str | None = template
        self._render = None
        self._max_token_bytes: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:  # encode_batch releases the GIL while it works; encode holds it
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def max_token_bytes(self) -> int:
        """The most bytes of UTF-8 text one token stands for (an upper bound: a token's own spelling, such as
        byte-level BPE's 'Ġ' or SentencePiece's '<0x0A>', is at least as long as the text it stands for). A
        text of B bytes thus has at least B / max_token_bytes tokens, which lets a prompt far too long for the
        context be refused without tokenizing it."""
        if self._max_token_bytes is None:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            self._max_token_bytes = max((len(t.encode("utf-8")) for t in vocab), default=1)
        return self._max_token_bytes

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation ([{"role": ..., "content": ...}]) into the prompt text the model was tuned on.
        add_generation_prompt appends the header of the assistant's turn, so the model answers next."""
        if not self.chat_template:
            raise MinillmError(
                "this checkpoint has no chat template in tokenizer_config.json; prompt it without --chat"
            )
        if self._render is None:
            self._render = _render_function(self.chat_template)
        try:
            return self._render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except Exception as e:  # TemplateError and whatever a template's own code raises
            raise MinillmError(f"the chat template failed to render ({e})") from None

    def encode_chat(self, messages: list[dict], **kwargs) -> list[int]:
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


class StreamDecoder:
    """Turns token ids into text as they arrive, without ever emitting half a character.

    One token can hold part of a multi-byte UTF-8 character (an emoji is often 2-4 byte tokens), and a
    token's text can depend on its neighbours (leading-space rules). So each step decodes a short window
    of recent tokens and emits only the text beyond what the window had already produced, and only once it
    no longer ends in U+FFFD, the replacement for an incomplete byte sequence.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for the tokens not yet emitted
        self.read_offset = 0  # tokens before this have been emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(window) > len(emitted) and not window.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return window[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes to U+FFFD)."""
        emitted = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return window[len(emitted) :]


class StopStrings:
    """Cuts the output at the first stop string, and holds back text that might be the start of one.

    A stop string can span several tokens ("\\n\\nUser:" may arrive as "\\n", "\\nUser", ":"), so the text is
    searched as a whole, and a tail that could still grow into a stop string is not shown until it can't.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.shown = 0  # characters of `text` already released
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add newly decoded text; return the part that is safe to show."""
        if self.stopped:
            return ""
        self.text += piece
        longest = max((len(s) for s in self.stops), default=0)
        search_from = max(0, self.shown - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._release(len(self.text))
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - held)

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece, self.shown = self.text[self.shown : end], max(self.shown, end)
        return piece
