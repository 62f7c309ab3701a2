"""The LLM class: load a checkpoint, then prefill and decode one request at a time.

    prefill: one forward over the whole prompt fills the KV cache and gives the first token's logits;
    decode:  each step feeds back the token just chosen (one row), appending its keys/values to the cache.
Generation ends at an EOS token, at a stop string, or after max_new_tokens (finish_reason "stop" or
"length").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import exact as exact_mode
from .config import DTYPES, ModelConfig, load_config
from .errors import MinillmError
from .kv_cache import KVCache
from .loader import load_model, resolve_model_dir
from .model import CausalLM
from .radix_cache import PrefixMatch, RadixCache
from .sampling import Sampler, SamplingParams
from .tokenizer import StopStrings, StreamDecoder, Tokenizer

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_PREFIX_CACHE_MB = 1024
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "weights"  # a repository checkout's weights/


@dataclass
class Completion:
    text: str  # generated text, stop string and everything after it removed
    token_ids: list[int]  # generated ids only (an EOS id that ended generation is included)
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_new_tokens or context full)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    computed_tokens: int = 0  # prompt tokens prefilled by the model (prompt_tokens - cached_tokens)
    prefill_s: float = 0.0  # time of the prompt's forward pass
    ttft_s: float = 0.0  # time to first token: prefill plus choosing the token
    decode_s: float = 0.0  # time of every step after the first token
    logits: torch.Tensor | None = None  # [new tokens, vocab] float32 raw logits of each step, if asked for

    @property
    def prefill_tok_s(self) -> float:
        return self.computed_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = len(self.token_ids) - 1  # the first token came from prefill
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason, "cached_tokens": self.cached_tokens,
            "computed_tokens": self.computed_tokens, "ttft_s": self.ttft_s,
            "timings": {
                "prefill_s": self.prefill_s, "ttft_s": self.ttft_s, "decode_s": self.decode_s,
                "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
            },
        }


@dataclass
class GenerationDefaults:
    """What the checkpoint's generation_config.json asks for, used where a request leaves a setting out."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_folder(cls, folder: Path, config: ModelConfig) -> "GenerationDefaults":
        raw = {}
        path = folder / "generation_config.json"
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise MinillmError(f"{path} is not valid JSON ({e})") from None
        eos = raw.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        sampling = SamplingParams()
        if raw.get("do_sample"):  # as in transformers, sampling settings apply only when do_sample is set
            sampling.temperature = float(raw.get("temperature", 1.0))
            sampling.top_k = int(raw.get("top_k") or 0)
            sampling.top_p = float(raw.get("top_p", 1.0))
            sampling.min_p = float(raw.get("min_p") or 0.0)
        sampling.repetition_penalty = float(raw.get("repetition_penalty", 1.0))
        return cls(
            sampling=sampling,
            max_new_tokens=int(raw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            eos_token_ids=sorted(set(eos_ids) | set(config.eos_token_ids)),
        )


@dataclass
class Request:
    """One generation request, checked and ready to run."""

    ids: list[int]  # prompt token ids
    sampler: Sampler
    stops: StopStrings
    max_new_tokens: int  # already capped so prompt + output fits the context
    use_prefix_cache: bool = True
    return_logits: bool = False


class TextStream:
    """Iterate to receive text pieces as they are generated; afterwards `.completion` holds the result."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        self.completion = yield from self._pieces


class LLM:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, defaults: GenerationDefaults, device: str,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, exact: bool = False,
                 exact_chunk: int = exact_mode.DEFAULT_CHUNK):
        self.model = model
        self.exact = exact  # see exact.py: cache hits bitwise equal to cold runs
        self.exact_chunk = exact_chunk
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.device = device
        self.dtype = model.model.embed_tokens.weight.dtype
        per_token = KVCache(self.config, 0, self.dtype, "meta").bytes_per_token()
        self.prefix_cache = RadixCache(max_tokens=int(prefix_cache_mb * 2**20) // per_token)
        # Dynamic NTK RoPE rotates keys with frequencies that depend on the sequence length at the time, so
        # KV computed for a prefix is not what a longer request would compute: never reuse it.
        self.prefix_cache_usable = self.config.rope.type != "dynamic"

    @classmethod
    def load(cls, model: str | Path | None = None, dtype: str | torch.dtype | None = None, device: str = "cpu",
             prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, exact: bool = False,
             prepack: bool | None = None) -> "LLM":
        """model: a checkpoint folder, or a Hugging Face Hub id; None: the small model bundled in the
        repository's weights/ folder. dtype: None keeps the checkpoint's own;
        "float32", "bfloat16" or "float16" converts the weights as they load. prefix_cache_mb: memory the
        prefix cache may hold KV in (least recently used entries are evicted beyond it). exact: run in
        exact mode (exact.py), where a cache hit gives bitwise the logits of a cold run. prepack: repack the
        weight matrices for oneDNN (prepack.py; None: wherever available, i.e. on CPU in float32/bfloat16);
        False keeps plain F.linear, whose float32 results are bitwise transformers'."""
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise MinillmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        if model is None:
            if not (BUNDLED_MODEL / "config.json").is_file():
                raise MinillmError(f"no model given and the bundled model is missing from {BUNDLED_MODEL}; pass --model")
            model = BUNDLED_MODEL
        folder = resolve_model_dir(str(model))
        config = load_config(folder)
        tokenizer = Tokenizer(folder)
        network = load_model(folder, config, dtype, device, prepack)
        return cls(network, tokenizer, GenerationDefaults.from_folder(folder, config), device, prefix_cache_mb, exact)

    # -- inputs ---------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text (special tokens added as the tokenizer says) or as ids."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids or prompt == "":  # "" alone may still encode to a BOS token
            raise MinillmError("the prompt is empty; give some text or token ids")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise MinillmError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        limit = self.config.context_length
        if len(ids) >= limit:
            raise MinillmError(
                f"the prompt has {len(ids)} tokens but the model's context holds {limit} (prompt plus at least one new token); shorten it"
            )
        return ids

    # -- forward passes -------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len, vocab] (float32) for every position of token_ids: one forward, nothing cached."""
        ids = self.prompt_ids(list(token_ids))
        cache = KVCache(self.config, len(ids), self.dtype, self.device)
        return self.model(torch.tensor(ids, device=self.device), cache, logit_rows=slice(None)).float()

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        """Run ids after what the cache holds; the last position's logits [1, vocab] as float32."""
        return self.model(torch.tensor(ids, device=self.device), cache).float()

    # -- generation -----------------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], **options) -> Completion:
        """Generate a completion. Options: max_new_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, stop (a string or list of strings), use_prefix_cache (default True),
        return_logits (keep each step's raw logits in Completion.logits).
        Unset options take the checkpoint's generation_config.json defaults; temperature 0 is greedy."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        return stream.completion

    def stream(self, prompt: str | list[int], **options) -> TextStream:
        """Like generate, but iterate over the result to receive text as it is produced. Bad settings are
        reported here, before anything runs."""
        return TextStream(self._run(self._request(prompt, **options)))

    def _request(
        self, prompt: str | list[int], max_new_tokens: int | None = None, stop: str | list[str] | None = None,
        use_prefix_cache: bool = True, return_logits: bool = False, **sampling_options,
    ) -> "Request":
        names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
        unknown = set(sampling_options) - set(names)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        base = self.defaults.sampling
        sampling = SamplingParams(
            **{n: getattr(base, n) if sampling_options.get(n) is None else sampling_options[n] for n in names}
        )
        max_new_tokens = self.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise MinillmError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        sampler = Sampler(sampling)  # validates the settings
        ids = self.prompt_ids(prompt)
        return Request(
            ids=ids, sampler=sampler, stops=StopStrings([stop] if isinstance(stop, str) else list(stop or [])),
            max_new_tokens=min(max_new_tokens, self.config.context_length - len(ids)),
            use_prefix_cache=use_prefix_cache, return_logits=return_logits,
        )

    def _prefill(self, ids: list[int], kv: KVCache, use_prefix_cache: bool) -> tuple[torch.Tensor, PrefixMatch | None, int]:
        """Fill kv for the prompt; return the last token's logits, the cache match (locked; None without the
        cache) and how many tokens were reused. The longest cached prefix (whole chunks of it in exact mode)
        is copied in, and only the rest of the prompt runs through the model."""
        match = None
        if use_prefix_cache:
            match = self.prefix_cache.match_prefix(ids, align=self.exact_chunk if self.exact else 1)
            self.prefix_cache.lock(match.node)
            match.copy_into(kv.keys, kv.values)
            kv.advance(match.length)
        reused = kv.length
        try:
            if self.exact:
                logits = exact_mode.chunked_prefill(self.model, ids, kv, self.exact_chunk).float()
            else:
                logits = self._forward(ids[reused:], kv)
        except BaseException:  # interrupted or failed: the request never runs, so release its prefix
            if match is not None:
                self.prefix_cache.unlock(match.node)
            raise
        return logits, match, reused

    def _run(self, request: "Request") -> Iterator[str]:
        ids, sampler, stops, max_new_tokens = request.ids, request.sampler, request.stops, request.max_new_tokens
        eos = set(self.defaults.eos_token_ids)
        detok = StreamDecoder(self.tokenizer)
        seen = torch.tensor(ids, device=self.device)  # for the repetition penalty: prompt and output
        use_prefix_cache = request.use_prefix_cache and self.prefix_cache_usable

        start = time.perf_counter()
        capacity = len(ids) + max_new_tokens
        if self.exact:  # room for the last chunk's padding
            capacity = max(capacity, -(-len(ids) // self.exact_chunk) * self.exact_chunk)
        kv = KVCache(self.config, capacity, self.dtype, self.device)
        generated: list[int] = []
        step_logits: list[torch.Tensor] = []
        with torch.inference_mode():
            logits, match, cached = self._prefill(ids, kv, use_prefix_cache)
        try:
            prefill_s = time.perf_counter() - start
            finish_reason, ttft_s = "length", 0.0
            while True:
                if request.return_logits:
                    step_logits.append(logits)
                token = sampler(logits, seen)
                generated.append(token)
                if len(generated) == 1:
                    ttft_s = time.perf_counter() - start
                if token in eos:
                    finish_reason = "stop"
                    break
                piece = stops.feed(detok.push(token))
                if piece:
                    yield piece
                if stops.stopped:
                    finish_reason = "stop"
                    break
                if len(generated) == max_new_tokens:
                    break
                if sampler.params.repetition_penalty != 1.0:  # the only user of `seen`
                    seen = torch.cat((seen, torch.tensor([token], device=self.device)))
                logits = self._forward([token], kv)
            decode_s = time.perf_counter() - start - ttft_s
            if not stops.stopped:
                piece = stops.feed(detok.flush()) + stops.finish()
                if piece:
                    yield piece
        finally:  # also when the caller abandons the stream: keep what was computed, release the lock
            if match is not None:
                # The KV covers the prompt and every generated token but the last (never fed back). Exact
                # mode keeps only the prompt's: decode computes with other shapes than prefill.
                tokens = ids if self.exact else (ids + generated)[: kv.length]
                with torch.inference_mode():
                    self.prefix_cache.insert(tokens, kv.keys, kv.values)
                self.prefix_cache.unlock(match.node)
        return Completion(
            text=stops.text, token_ids=generated, prompt_tokens=len(ids), finish_reason=finish_reason,
            cached_tokens=cached, computed_tokens=len(ids) - cached, prefill_s=prefill_s, ttft_s=ttft_s,
            decode_s=decode_s, logits=torch.cat(step_logits) if request.return_logits else None,
        )
