"""python -m minillm generate | chat | serve | verify | perplexity | convert | cache: text streams to stdout,
statistics go to stderr, and a problem with the input is one line on stderr with exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from .engine.sampling import SamplingParams
from .errors import MinillmError
from .flags import build_parser
from .options import ServerOptions


def _options(args) -> dict:
    """The generation settings given as flags (the sampling ones are SamplingParams' fields that have a flag)."""
    sampling = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if hasattr(args, f.name)}
    options = dict(
        sampling, max_new_tokens=args.max_new_tokens, stop=args.stop, use_prefix_cache=not args.no_prefix_cache
    )
    if getattr(args, "json_schema", None) is not None:
        options["json_schema"] = _read_text(args.json_schema, "JSON schema")
    if getattr(args, "grammar", None) is not None:
        options["grammar"] = _read_text(args.grammar, "grammar")
    for name in ("regex", "choice"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    if hasattr(args, "max_whitespace"):
        options["max_whitespace"] = args.max_whitespace
    return options


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MinillmError(f"cannot read the {what} file {path} ({getattr(e, 'strerror', None) or e})") from None


def load_llm(args):
    from .llm import LLM

    return LLM.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        exact=args.exact,
        prepack=False if args.no_prepack else None,
        quantize=args.quantize,
        group_size=args.group_size,
        tp=args.tp,
        kv_mb=args.kv_mb,
        max_batch=args.max_batch,
        max_prefill_tokens=args.max_prefill_tokens,
        schedule_policy=args.schedule,
        prefix_cache=not args.no_prefix_cache,
        cache_dir=args.cache_dir,
        disk_cache_mb=args.disk_cache_mb,
        speculate=args.speculate,
        num_draft_tokens=args.num_draft_tokens,
        draft_model=args.draft_model,
    )


def read_prompts_file(path: Path) -> list[str]:
    """Plain text: one prompt per non-empty line. JSONL (every line a JSON object): its "prompt" field."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise MinillmError(f"cannot read prompts file {path} ({e.strerror})") from None
    if lines and all(line.lstrip().startswith("{") for line in lines):
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MinillmError(f"{path} line {number}: expected a JSON object with a 'prompt' field") from None
        return prompts
    return lines


def _stats_line(c, index: int) -> str:
    return (
        f"[{index}: {c.prompt_tokens} prompt tokens ({c.cached_tokens} cached, {c.computed_tokens} computed), "
        f"ttft {c.ttft_s * 1000:.0f} ms, prefill {c.prefill_tok_s:.1f} tok/s, {len(c.token_ids)} new tokens, "
        f"decode {c.decode_tok_s:.1f} tok/s{f', {c.forced_tokens} forced' if c.forced_tokens else ''}"
        f"{f', {c.draft_accepted} of {c.draft_proposed} drafted accepted' if c.draft_proposed else ''}, "
        f"finish: {c.finish_reason}]"
    )


def _summary(completions) -> str:
    """Hit rate over all prompt tokens, and the prefill time the hits saved, estimated at the prefill speed
    measured on the tokens that were computed."""
    cached = sum(c.cached_tokens for c in completions)
    computed = sum(c.computed_tokens for c in completions)
    seconds = sum(c.prefill_s for c in completions)
    saved = cached * seconds / computed if computed else 0.0
    rate = cached / (cached + computed) if cached + computed else 0.0
    return (
        f"[prefix cache: {len(completions)} prompts, hit rate {rate:.1%}, {cached} of {cached + computed} "
        f"prompt tokens reused, about {saved:.2f} s of prefill saved]"
    )


def _chat_prompt(llm, text: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return llm.chat_ids(messages)


def generate(args) -> int:
    """All prompts are submitted at once and run concurrently (up to --max-batch per step); their outputs are
    printed in order, the first streaming as it is generated."""
    prompts = list(args.prompts) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise MinillmError("no prompt given; pass the prompt text as an argument or use --prompts-file")
    llm = load_llm(args)
    chat = args.chat or args.system is not None
    requests = [
        llm.request(_chat_prompt(llm, text, args.system) if chat else text, **_options(args)) for text in prompts
    ]
    handles = [llm.engine.submit(r) for r in requests]
    completions = []
    for index, handle in enumerate(handles, 1):
        for piece in handle:
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        c = handle.completion
        completions.append(c)
        if args.json:
            print(json.dumps(c.to_dict(), ensure_ascii=False), flush=True)
        else:
            sys.stdout.write("\n")
            print(_stats_line(c, index), file=sys.stderr, flush=True)
    if len(completions) > 1 and not args.no_prefix_cache:
        print(_summary(completions), file=sys.stderr, flush=True)
    _close(llm)
    return 0


def _close(llm) -> None:
    """Write the cached KV to the disk tier, if there is one, and say what it did."""
    llm.close()
    disk = llm.stats().disk
    if disk is not None:
        print(
            f"[disk cache: {disk['tokens_read']} tokens read in {disk['read_s']:.3f} s, {disk['tokens_written']} "
            f"written in {disk['write_s']:.3f} s, in {disk['dir']}]",
            file=sys.stderr,
            flush=True,
        )


def cache(args) -> int:
    """python -m minillm cache info | clear: what the disk tier holds, and removing it."""
    from .cache import disk_cache

    root = args.cache_dir or os.environ.get(disk_cache.ENV_DIR)
    if not root:
        raise MinillmError(f"no cache directory: pass --cache-dir DIR or set {disk_cache.ENV_DIR}")
    root = Path(root)
    entries = disk_cache.describe(root)
    if args.action == "clear":
        for entry in entries:
            shutil.rmtree(root / entry["fingerprint"], ignore_errors=True)
        print(f"removed {len(entries)} fingerprint(s), {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB, from {root}")
        return 0
    print(f"{root}: {len(entries)} fingerprint(s)")
    for e in entries:
        print(
            f"  {e['fingerprint']}  {e['pages']} pages, {e['tokens']} tokens, {e['bytes'] / 2**20:.1f} MiB  "
            f"({e['model']}, {e['dtype']}{', exact' if e['exact'] is True else ''})"
        )
    return 0


def perplexity(args) -> int:
    """python -m minillm perplexity FILE: perplexity (+- standard error); with --kl-base, KL divergence."""
    from .perplexity import score

    text = _read_text(args.file, "text")
    llm = load_llm(args)
    stride = args.stride or max(1, args.context // 2)
    scores = score(llm, text, args.context, stride, args.save_logits, args.kl_base)
    figures = scores.summary() | {"context": args.context, "stride": stride}
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"perplexity {figures['perplexity']:.4f} +- {figures['perplexity_stderr']:.4f} over "
            f"{figures['tokens_scored']} tokens (windows of {args.context}, stride {stride})"
        )
        if "kl_mean" in figures:
            print(
                f"KL divergence from {args.kl_base.name}: mean {figures['kl_mean']:.6f} nats, 99th percentile "
                f"{figures['kl_p99']:.6f}, top-1 token unchanged at {figures['top1_same']:.2%} of positions"
            )
    llm.close()
    return 0


def convert(args) -> int:
    """python -m minillm convert model.gguf OUT_DIR: the Hugging Face folder that minillm and transformers load."""
    from .loading import gguf_import
    from .model.config import DTYPES

    out = gguf_import.convert(args.gguf, args.out_dir, DTYPES[args.dtype])
    print(f"wrote {out} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)")
    return 0


def chat(args) -> int:
    """A terminal chat. The whole conversation is re-rendered with the chat template every turn; the prefix
    cache finds everything up to the new message already computed, so only the new turn is prefilled."""
    llm = load_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print("minillm chat: Ctrl-D or /exit to leave", file=sys.stderr)
    completions = []
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stream = llm.stream(llm.chat_ids(messages), **_options(args))
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        c = stream.completion
        completions.append(c)
        messages.append({"role": "assistant", "content": c.text})
        print(
            f"[turn {len(completions)}: reused {c.cached_tokens} of {c.prompt_tokens} prompt tokens, "
            f"ttft {c.ttft_s * 1000:.0f} ms, decode {c.decode_tok_s:.1f} tok/s]",
            file=sys.stderr,
            flush=True,
        )
    if completions:
        print(_summary(completions), file=sys.stderr)
    _close(llm)
    return 0


def serve(args) -> int:
    """Load the model, then hand it to the HTTP server (server.py), which steps it on this thread."""
    try:
        from .serving.server import serve as run_server
    except ImportError as e:
        raise MinillmError(
            f"the server needs fastapi, uvicorn and prometheus-client ({e}); pip install 'minillm[serve]'"
        ) from None
    if args.max_body_mb <= 0:
        raise MinillmError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    settings = ServerOptions(
        model_name=args.served_model_name or (args.model if args.model else "minillm-bundled"),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    return run_server(load_llm(args), settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    try:
        if args.command == "verify":
            from .verify import main as verify

            return verify(args)
        if args.command == "serve":
            return serve(args)
        commands = {"generate": generate, "chat": chat, "perplexity": perplexity, "convert": convert, "cache": cache}
        return commands[args.command](args)
    except MinillmError as e:
        print(f"minillm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
