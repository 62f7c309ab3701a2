"""LLM: load a checkpoint and generate, one prompt or many at once.

    llm = LLM.load("path/or/hub-id")
    llm.generate("Hello")                 -> Completion
    llm.generate(["Hi", "Hello"])         -> [Completion, Completion], computed concurrently
    for piece in llm.stream("Hello"): ... -> text as it is generated

Everything runs through one Engine (engine.py): requests are batched step by step over a shared KV pool,
and the radix tree finds the prefixes already computed. Generation ends at an EOS token, at a stop string,
or after max_new_tokens (finish_reason "stop" or "length").
"""

from __future__ import annotations

import atexit
import numbers
import weakref
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from . import limits, ranks
from .engine.build import build_engine
from .engine.constraint import Choice, Dormant
from .engine.engine import EngineStats, RequestHandle
from .engine.guidance import DEFAULT_MAX_WHITESPACE, GrammarCompiler
from .engine.request import Completion, Request, TokenLogprob
from .engine.runner import LocalRunner, Runner
from .engine.sampling import Sampler, SamplingParams
from .errors import MinillmError
from .generation_config import GenerationDefaults
from .limits import InvalidSetting
from .loading.loader import load_model, resolve_model_dir
from .model.config import DTYPES, ModelConfig, load_config
from .model.model import CausalLM
from .options import EngineOptions, LoadOptions
from .tokenizer import StopStrings, StreamDecoder, Tokenizer

TEXT_MARGIN = 4  # see prompt_ids


def bundled_model() -> Path:
    """The small model that ships with minillm: inside the installed package (a wheel puts weights/ there), or
    in a repository checkout's weights/ folder (an editable install)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "weights", here.parent / "weights"):
        if (folder / "config.json").is_file():
            return folder
    raise MinillmError(f"no model given and the bundled model is missing (looked in {here / 'weights'}); pass --model")


def _same_tokenizer(folder: Path, other: Path | None) -> bool:
    """Whether two checkpoint folders hold the same tokenizer.json (or either has none to compare)."""
    mine, theirs = folder / "tokenizer.json", (other / "tokenizer.json") if other is not None else None
    if theirs is None or not (mine.is_file() and theirs.is_file()):
        return True
    return mine.read_bytes() == theirs.read_bytes()


def _is_token_id(value) -> bool:
    """An int of any kind (numpy's too); not a float, a string or a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class LLM:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        defaults: GenerationDefaults,
        device: str,
        exact: bool = False,
        model_dir: Path | None = None,
        runner: Runner | None = None,
        **engine_options,
    ):
        self.model = model
        # what runs each forward: this process, or under tensor parallelism rank 0's ranks.Leader (runner.py)
        self.runner = runner or LocalRunner(model)
        # what the disk tier's fingerprint hashes; the weight form ("plain", "prepacked", "q8_0",
        # "q4_1-g32-head-q8_0", "bf16-kept") is what the loader made of the matrices
        self.model_dir = model_dir
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.device = device
        self.dtype = model.model.norm.weight.dtype  # the model's dtype (norms are never packed or quantized)
        self.exact = exact  # see exact.py: bitwise the same logits with the cache on or off, alone or batched
        self._grammars: GrammarCompiler | None = None
        self._draft: tuple[str | None, CausalLM] | None = None  # (its name, the draft model) once loaded
        self.configure(**engine_options)

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str = LoadOptions.device,
        exact: bool = LoadOptions.exact,
        prepack: bool | None = LoadOptions.prepack,
        quantize: str | None = LoadOptions.quantize,
        group_size: int = LoadOptions.group_size,
        tp: int | None = LoadOptions.tp,
        **engine_options,
    ) -> LLM:
        """model: a checkpoint folder, a GGUF file (converted once into a cached folder: gguf_import.py), a named
        model ("smollm2"), or a Hugging Face Hub id; None: the small bundled model. dtype: None
        keeps the checkpoint's own (but a bf16 checkpoint computes in float32 on a CPU without native bf16,
        its matrices kept in bf16: loader.py); "float32", "bfloat16" or "float16" converts as they load.
        exact: run in exact mode (exact.py). prepack: repack the weight matrices for oneDNN (prepack.py; None:
        wherever available, i.e. on CPU in float32/bfloat16); False keeps plain F.linear, whose float32
        results are bitwise transformers'. quantize: "int8" or "int4" quantizes the weight matrices as they
        load (quantize.py; int4 in groups of group_size input channels; the compiled kernels quantize the
        activations of few-row products per block of 32); the rest of the model computes in dtype.
        tp: tensor parallelism over this many ranks (tensor_parallel.py, ranks.py): tp - 1 follower processes
        start on this machine, and this process's threads are shared out among the ranks. Under torchrun the
        group is torchrun's (tp may be left out), and on ranks other than 0 load() does not return: the
        process serves rank 0 and exits when rank 0 closes.
        engine_options: EngineOptions' fields (options.py), as configure() takes them."""
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise MinillmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        folder = bundled_model() if model is None else resolve_model_dir(str(model), dtype)
        config = load_config(folder)
        dtype_name = next((name for name, d in DTYPES.items() if d == dtype), None)
        load_args = dict(
            folder=str(folder),
            dtype=dtype_name,
            device=device,
            prepack=prepack,
            quantize=quantize,
            group_size=group_size,
            exact=exact,
        )
        rank, followers, device = ranks.start(tp, config, device, load_args)
        try:
            network = load_model(folder, config, dtype, device, prepack, quantize, group_size, rank, exact)
            if rank is not None:
                ranks.wait_until_every_rank_loaded()
        except BaseException:
            if rank is not None:
                ranks.abandon(followers)
            raise
        if rank is not None and rank.rank > 0:  # a follower under torchrun
            ranks.follow_and_exit(network, device)
        runner = ranks.Leader(network, followers) if rank is not None else None
        return cls(
            network,
            Tokenizer(folder),
            GenerationDefaults.from_folder(folder, config),
            device,
            exact,
            folder,
            runner,
            **engine_options,
        )

    def configure(self, **options) -> None:
        """(Re)build the engine: a fresh KV pool and an empty prefix cache. options: EngineOptions' fields
        (options.py, which gives each one's meaning and default)."""
        settings = EngineOptions(**options)
        settings.check()  # before the old engine stops
        if hasattr(self, "engine"):
            self._close_engine()  # the old engine's cached KV goes to the disk tier, if there is one
        draft = self._draft_model(settings.draft_model) if settings.speculate == "draft" else None
        self.engine = build_engine(
            self.runner, self.model, self.dtype, self.device, self.exact, self.model_dir, settings, draft
        )
        if self.engine.kv.disk is not None and not hasattr(self, "_close_at_exit"):
            ref = weakref.ref(self)  # once per LLM, without keeping it alive
            self._close_at_exit = lambda: ref() is not None and ref().close()
            atexit.register(self._close_at_exit)

    def _draft_model(self, name: str | None) -> CausalLM:
        """The draft model for speculate="draft", loaded once per name: a checkpoint with this model's
        vocabulary and tokenizer, in this model's dtype; None: this model's own checkpoint quantized to int4
        (a draft that guesses well and reads a quarter of the bytes per step)."""
        if self._draft is None or self._draft[0] != name:
            if name is None and self.model_dir is None:
                raise MinillmError("this model was not loaded from a folder; give a draft model (--draft-model)")
            folder = self.model_dir if name is None else resolve_model_dir(name, self.dtype)
            config = load_config(folder)
            if config.vocab_size != self.config.vocab_size or not _same_tokenizer(folder, self.model_dir):
                raise MinillmError(
                    f"the draft model {name} does not share this model's tokenizer "
                    f"(vocabulary {config.vocab_size} vs {self.config.vocab_size}); pick one of the same family"
                )
            quantize = "int4" if name is None else None
            self._draft = (name, load_model(folder, config, self.dtype, self.device, quantize=quantize))
        return self._draft[1]

    def _close_engine(self) -> None:
        self.engine.stop()
        self.engine.kv.spill_all()

    def close(self) -> None:
        """Stop the background engine thread, if any, and write the prefix cache's KV to the disk tier (if
        there is one; it also runs at the end of the process). Under tensor parallelism, also stop the other
        ranks: the LLM cannot generate after that."""
        self._close_engine()
        self.runner.close()

    def stats(self) -> EngineStats:
        """The engine's counts now: requests running and waiting, KV slots, cache hit rate, disk traffic."""
        return self.engine.stats()

    def check_invariants(self) -> None:
        """The KV pool's ownership invariant and the tree's own (AssertionError if broken): what the tests
        check after every step, and `minillm verify` after its runs."""
        self.engine.scheduler.check_invariants()

    @property
    def prefix_cache(self):
        """The radix tree (radix_cache.RadixCache): its stats, total_tokens, check_invariants()."""
        return self.engine.kv.tree

    # -- inputs ---------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[int], in_pool: bool = True) -> list[int]:
        """Token ids of a prompt given as text (special tokens added as the tokenizer says) or as ids.
        in_pool: it must also fit the KV pool (not for logits(), which keeps no KV)."""
        limit, where = self._prompt_limit(in_pool)
        if isinstance(prompt, str):
            ids = self._text_ids(prompt, limit, where)
        elif isinstance(prompt, (list, tuple)) and all(_is_token_id(t) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise MinillmError(f"a prompt must be text or a list of token ids, got {prompt!r:.60}")
        if not ids or prompt == "":  # "" alone may still encode to a BOS token
            raise MinillmError("the prompt is empty; give some text or token ids")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise MinillmError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if len(ids) >= limit:
            raise MinillmError(
                f"the prompt has {len(ids)} tokens but the {where} holds {limit} "
                "(prompt plus at least one new token); shorten it"
            )
        return ids

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation rendered by the checkpoint's chat template (checked as prompt_ids checks
        ids: not empty, within the context and the KV pool). tools: OpenAI-style function specs the template
        shows the model (refused if the template has no place for them)."""
        if tools is not None and "tools" not in (self.tokenizer.chat_template or ""):
            raise MinillmError("this model's chat template does not show tools to the model; send no 'tools'")
        text = self.tokenizer.apply_chat_template(messages, **({"tools": tools} if tools is not None else {}))
        return self.prompt_ids(self._text_ids(text, *self._prompt_limit(in_pool=True), special_tokens=False))

    def _prompt_limit(self, in_pool: bool) -> tuple[int, str]:
        """The most tokens a prompt may have (plus one new token), and what sets that limit, for the error."""
        context = self.config.context_length
        limit = min(context, self.engine.pool.num_slots) if in_pool else context
        return limit, "model's context" if limit == context else "KV pool (raise --kv-mb)"

    def _text_ids(self, text: str, limit: int, where: str, special_tokens: bool = True) -> list[int]:
        """Tokenize text, unless its size alone shows it is far too long for `limit` tokens: it has at least
        bytes / max_token_bytes tokens (tokenizer.py), and refusing it untokenized spares the tokenizer's
        time and memory (about 300 bytes per character). TEXT_MARGIN covers normalizers that shrink text."""
        size = len(text.encode("utf-8", errors="replace"))
        if size > TEXT_MARGIN * self.tokenizer.max_token_bytes * limit:
            raise MinillmError(
                f"the prompt has {size} bytes of text, far more than the {where} holds ({limit} tokens); shorten it"
            )
        return self.tokenizer.encode(text, add_special_tokens=special_tokens)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len, vocab] (float32) for every position of token_ids: one forward, nothing cached."""
        ids = torch.tensor(self.prompt_ids(list(token_ids), in_pool=False), device=self.device)
        return self.runner.logits(ids).float()

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[int], top: int = 0) -> list[TokenLogprob]:
        """Each token's log-probability given the tokens before it, with the `top` likeliest alternatives at its
        position (the first token has none: None): what a completion with echo and logprobs returns, and what
        evaluation harnesses sum to score a continuation."""
        ids = list(token_ids)
        logprobs = torch.log_softmax(self.logits(ids)[:-1], dim=-1)  # [len - 1, vocab]: row i predicts ids[i + 1]
        items = [TokenLogprob(ids[0], None, None)] if ids else []
        chosen = logprobs.gather(1, torch.tensor(ids[1:], device=logprobs.device)[:, None])[:, 0].tolist()
        best = logprobs.topk(top) if top else None
        for i, (token, logprob) in enumerate(zip(ids[1:], chosen)):
            alternatives = list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else []
            items.append(TokenLogprob(token, logprob, alternatives))
        return items

    # -- generation -----------------------------------------------------------------------------------

    def request(
        self,
        prompt: str | list[int],
        max_new_tokens: int | None = None,
        stop: str | list[str] | None = None,
        use_prefix_cache: bool = True,
        return_logits: bool = False,
        logprobs: int | None = None,
        ignore_eos: bool = False,
        json_schema: dict | str | None = None,
        regex: str | None = None,
        choice: list[str] | None = None,
        grammar: str | None = None,
        grammar_trigger: int | None = None,
        max_whitespace: int = DEFAULT_MAX_WHITESPACE,
        **sampling_options,
    ) -> Request:
        """A checked request: options as in generate(); bad settings are reported here, before anything runs."""
        names = [f.name for f in fields(SamplingParams)]
        unknown = set(sampling_options) - set(names)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        base = self.defaults.sampling
        sampling = SamplingParams(
            **{n: getattr(base, n) if sampling_options.get(n) is None else sampling_options[n] for n in names}
        )
        sampling.validate()  # (limits.py) before the prompt is tokenized
        max_new_tokens = limits.check("max_new_tokens", max_new_tokens) or self.defaults.max_new_tokens
        limits.check("logprobs", logprobs)
        stops = limits.check_stop(stop)
        for name, flag in (
            ("use_prefix_cache", use_prefix_cache),
            ("return_logits", return_logits),
            ("ignore_eos", ignore_eos),
        ):
            limits.check_flag(name, flag)
        make_constraint = self._constraint(json_schema, regex, choice, grammar, grammar_trigger, max_whitespace)
        ids = self.prompt_ids(prompt)
        eos_ids = set() if ignore_eos else set(self.defaults.eos_token_ids)
        return Request(
            ids,
            Sampler(sampling, ids, self.config.vocab_size),
            StopStrings(stops),
            StreamDecoder(self.tokenizer),
            min(max_new_tokens, self.config.context_length - len(ids)),
            eos_ids,
            use_prefix_cache,
            return_logits,
            logprobs,
            make_constraint() if make_constraint is not None else None,
        )

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar backend for this model (engine/guidance.py): its tokenizer index is built on first use."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(
                self.tokenizer.path.read_text(encoding="utf-8"), self.config.vocab_size, self.defaults.eos_token_ids
            )
        return self._grammars

    def _constraint(self, json_schema, regex, choice, grammar, trigger, max_whitespace) -> Callable | None:
        """What the output must look like, as a maker of fresh Constraints (engine/constraint.py), checked and
        compiled now (the compiled grammar is cached by its text); None if unconstrained."""
        given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                                   ("grammar", grammar)) if v is not None}  # fmt: skip
        if len(given) > 1:
            raise InvalidSetting(next(iter(given)), f"give one constraint, not {' and '.join(given)}")
        limits.check("max_whitespace", max_whitespace)
        if trigger is not None and (
            grammar is None or not _is_token_id(trigger) or not 0 <= trigger < self.config.vocab_size
        ):
            raise InvalidSetting("grammar_trigger", "grammar_trigger must be a token id, given with a grammar")
        if not given:
            return None
        vocab = self.config.vocab_size
        ((name, value),) = given.items()
        if name == "choice":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidSetting(name, "choice must be a list of non-empty strings")
            ids = [self.tokenizer.encode(c, add_special_tokens=False) for c in value]
            if not all(ids):
                raise InvalidSetting(name, "a choice encodes to no tokens at all")
            return lambda: Choice(ids, vocab)
        if name != "json_schema" and (not isinstance(value, str) or not value):
            raise InvalidSetting(name, f"{name} must be a non-empty string, got {value!r:.60}")
        try:
            if name == "json_schema":
                compiled = self.grammars.json_schema(value, max_whitespace)
            else:
                compiled = self.grammars.regex(value) if name == "regex" else self.grammars.lark(value)
        except InvalidSetting:
            raise
        except MinillmError as e:
            raise InvalidSetting(name, str(e)) from None
        if trigger is not None:
            return lambda: Dormant(trigger, lambda: self.grammars.constraint(compiled))
        return lambda: self.grammars.constraint(compiled)

    def submit(self, prompt: str | list[int], **options) -> RequestHandle:
        """Queue a request in the engine; iterate the handle for its text, or call .result()."""
        return self.engine.submit(self.request(prompt, **options))

    def generate(
        self, prompt: str | list[int] | list[str] | list[list[int]], **options
    ) -> Completion | list[Completion]:
        """Generate a completion; given a list of prompts, a list of completions computed concurrently (up to
        max_batch at a time). Options: max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, seed, stop (a string or list of strings), use_prefix_cache
        (default True), return_logits (keep each step's raw logits in Completion.logits), logprobs (record
        each token's logprob and this many alternatives in Completion.logprobs), ignore_eos (go on past
        end-of-sequence tokens, to max_new_tokens or a stop string: what benchmarks use). Unset options take
        the checkpoint's generation_config.json defaults; temperature 0 is greedy. A seed makes a request's
        tokens the same whatever runs beside it."""
        if isinstance(prompt, list) and prompt and not _is_token_id(prompt[0]):
            requests = [self.request(p, **options) for p in prompt]  # all checked before any runs
            handles = [self.engine.submit(r) for r in requests]
            for h in handles:  # every request runs to its end, even if an earlier one failed alone
                try:
                    h.result()
                except Exception:
                    if h.request.error is None:  # not the request's own failure
                        raise
            failed = next((r.error for r in requests if r.error is not None), None)
            if failed is not None:
                raise failed
            return [h.completion for h in handles]
        return self.submit(prompt, **options).result()

    def stream(self, prompt: str | list[int], **options) -> RequestHandle:
        """Like generate, but iterate over the result to receive text as it is produced; afterwards
        `.completion` holds the Completion. Bad settings are reported here, before anything runs."""
        return self.submit(prompt, **options)
