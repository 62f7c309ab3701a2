"""python -m minillm generate: text streams to stdout, timings go to stderr, errors are one line (exit 2)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import MinillmError


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, help="checkpoint folder or Hugging Face Hub id")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's own")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minillm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete one or more prompts")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (several: one after another)")
    _add_model_options(gen)
    _add_sampling_options(gen)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    gen.add_argument("--system", help="system message for --chat (implies --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming")
    return parser


def _options(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )


def _prompt(llm, text: str, args) -> str | list[int]:
    if not (args.chat or args.system is not None):
        return text
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": text}]
    return llm.tokenizer.encode_chat(messages)


def generate(args) -> int:
    from .engine import LLM

    if not args.prompts:
        raise MinillmError("no prompt given; pass the prompt text as an argument")
    llm = LLM.load(args.model, dtype=args.dtype, device=args.device)
    for text in args.prompts:
        stream = llm.stream(_prompt(llm, text, args), **_options(args))
        if args.json:
            for _ in stream:
                pass
            print(json.dumps(stream.completion.to_dict(), ensure_ascii=False), flush=True)
            continue
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        c = stream.completion
        print(
            f"[{c.prompt_tokens} prompt tokens, prefill {c.prefill_tok_s:.1f} tok/s, "
            f"{len(c.token_ids)} new tokens, decode {c.decode_tok_s:.1f} tok/s, finish: {c.finish_reason}]",
            file=sys.stderr, flush=True,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return generate(args)
    except MinillmError as e:
        print(f"minillm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
