"""The command line's flags, one function per group, with defaults and choices taken from options.py (and the
sampling flags named as SamplingParams' fields), so a default is written once; cli.py runs the commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options
from .engine.guidance import DEFAULT_MAX_WHITESPACE
from .options import EngineOptions, LoadOptions, ServerOptions


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model's and the engine's flags; defaults and choices come from options.py."""
    load, engine = LoadOptions, EngineOptions
    parser.add_argument(
        "--model",
        "-m",
        help="checkpoint folder, .gguf file, smollm2, or Hugging Face Hub id (default: the bundled model)",
    )
    parser.add_argument("--dtype", choices=options.DTYPES, help="default: the checkpoint's own")
    parser.add_argument("--device", default=load.device, help="torch device (default: %(default)s)")
    parser.add_argument("--no-prefix-cache", action="store_true", help="compute every prompt from scratch")
    parser.add_argument(
        "--kv-mb",
        type=float,
        default=engine.kv_mb,
        help="memory for the KV pool that running requests and the prefix cache share (default %(default)s)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=engine.max_batch,
        help="requests decoded together in one step (default %(default)s)",
    )
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=engine.max_prefill_tokens,
        help="prompt tokens per step; longer prompts go over several steps (default %(default)s)",
    )
    parser.add_argument(
        "--schedule",
        choices=options.POLICIES,
        default=engine.schedule_policy,
        help="admission order: longest cached prefix first (lpm) or first come first served (default %(default)s)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="exact mode: cache hits give bitwise the logits of a cold run (chunked prefill)",
    )
    parser.add_argument(
        "--no-prepack",
        action="store_true",
        help="keep weights in their checkpoint layout "
        "(plain F.linear: slower on CPU, bitwise transformers' fp32 results)",
    )
    parser.add_argument(
        "--quantize",
        choices=options.QUANTIZE,
        help="weight-only quantization at load: int8 per output channel, int4 per group of input channels",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=load.group_size,
        help="int4: input channels per scale and zero (default %(default)s)",
    )
    parser.add_argument(
        "--tp",
        type=int,
        help="tensor parallelism: split the model over this many processes on this machine "
        "(under torchrun: its processes, on one machine or several)",
    )
    parser.add_argument(
        "--cache-dir",
        help="keep the prefix cache's KV on disk here, for later runs (default: $MINILLM_CACHE_DIR; none if unset)",
    )
    parser.add_argument(
        "--disk-cache-mb",
        type=float,
        default=engine.disk_cache_mb,
        help="byte budget of --cache-dir; least recently used KV removed beyond it (default %(default)s)",
    )
    parser.add_argument(
        "--speculate",
        choices=options.SPECULATE,
        default=engine.speculate,
        help="speculative decoding: guess next tokens from the request's own tokens (lookup), from everything "
        "in the prefix cache (radix) or with a draft model (draft), and verify them in one forward; the output "
        "is what it would be without (default %(default)s)",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=int,
        default=engine.num_draft_tokens,
        help="the most guessed tokens per request and step (fewer where guesses fail; default %(default)s)",
    )
    parser.add_argument(
        "--draft-model",
        help="--speculate draft: a checkpoint with the same tokenizer (default: this model's weights in int4)",
    )


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation (unset options take the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", "-n", type=int)
    g.add_argument("--temperature", "-t", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int, help="0 = off")
    g.add_argument("--top-p", type=float, help="1 = off")
    g.add_argument("--min-p", type=float, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, help="1 = off")
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")


def _add_structured_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("structured output (one of these; engine/constraint.py, needs minillm[structured])")
    g.add_argument("--json-schema", type=Path, metavar="FILE", help="the output is JSON valid against this schema")
    g.add_argument("--regex", help="the output matches this regular expression")
    g.add_argument("--choice", action="append", help="the output is one of these strings (repeatable)")
    g.add_argument("--grammar", type=Path, metavar="FILE", help="the output follows this Lark grammar")
    g.add_argument(
        "--max-whitespace",
        type=int,
        default=DEFAULT_MAX_WHITESPACE,
        help="JSON: whitespace characters allowed between two tokens (default %(default)s)",
    )


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every command and its flags; description: the CLI's own (cli.py's docstring)."""
    parser = argparse.ArgumentParser(prog="python -m minillm", description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate", help="complete one or more prompts (run concurrently, sharing the prefix cache)"
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text; several run as one batch")
    gen.add_argument("--prompts-file", type=Path, help="one prompt per line, or JSONL with a 'prompt' field")
    _add_model_options(gen)
    _add_sampling_options(gen)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    gen.add_argument("--system", help="system message for --chat (implies --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming")
    _add_structured_options(gen)
    chat = commands.add_parser("chat", help="multi-turn chat; each turn reuses the conversation's KV")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.add_argument("--system", help="system message")
    srv = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (needs minillm[serve])")
    _add_model_options(srv)
    srv.add_argument("--host", default=ServerOptions.host, help="address to listen on (default %(default)s)")
    srv.add_argument("--port", type=int, default=ServerOptions.port, help="default %(default)s")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    srv.add_argument("--max-waiting", type=int, help="answer 429 when more requests than this are waiting")
    srv.add_argument("--served-model-name", help="the model id clients send (default: --model, or minillm-bundled)")
    srv.add_argument(
        "--max-body-mb",
        type=float,
        default=ServerOptions.max_body_bytes / 2**20,
        help="answer 413 to request bodies larger than this (default %(default)s)",
    )
    ver = commands.add_parser(
        "verify", help="check the engine's properties (parity, cache, batching, exact) on a checkpoint"
    )
    ver.add_argument(
        "--model",
        "-m",
        help="checkpoint folder, .gguf file, smollm2, or Hugging Face Hub id (default: the bundled model)",
    )
    ver.add_argument("--dtype", choices=options.DTYPES, help="default: the checkpoint's own")
    ver.add_argument("--device", default="cpu")
    ver.add_argument("--no-prepack", action="store_true", help="check the plain F.linear path instead")
    ver.add_argument("--prompts", type=int, default=4, help="random prompts per check (default 4)")
    ver.add_argument("--json", action="store_true", help="one JSON object with every check")
    ppl = commands.add_parser("perplexity", help="perplexity of a text file, and KL divergence from a saved run")
    ppl.add_argument("file", type=Path, metavar="FILE", help="a UTF-8 text file")
    _add_model_options(ppl)
    ppl.add_argument("--context", type=int, default=512, help="tokens per window (default %(default)s)")
    ppl.add_argument("--stride", type=int, help="tokens a window advances (default: half of --context)")
    ppl.add_argument("--save-logits", type=Path, help="save this run's log-probabilities (a --kl-base for later)")
    ppl.add_argument("--kl-base", type=Path, help="a --save-logits file of a reference run: report KL divergence")
    ppl.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    conv = commands.add_parser("convert", help="write a GGUF file as a Hugging Face folder (needs minillm[gguf])")
    conv.add_argument("gguf", type=Path, metavar="MODEL.gguf")
    conv.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new or empty folder")
    conv.add_argument(
        "--dtype", choices=options.DTYPES, default="float32", help="dequantized tensors' dtype (default %(default)s)"
    )
    cache = commands.add_parser("cache", help="what the prefix cache's disk tier holds, or remove it")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--cache-dir", help="default: $MINILLM_CACHE_DIR")
    return parser
