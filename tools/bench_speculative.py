"""Speculative decoding, measured: decode speed with each drafter against none, side by side in one run.

    python tools/bench_speculative.py --model smollm2 --out bench/speculative_fp32.json

Workloads (chat prompts through the checkpoint's template, greedy, up to --max-new-tokens each):
  rag-quote    a document (README paragraphs) and a request to quote its first paragraphs word for word
  code-edit    a Python method (from minillm's radix tree) and a request to rename one variable in it
  chat         an open-ended question: little to copy, the case speculation must not slow down
  chat-again   the same open-ended question asked a second time (a regenerate, an FAQ): the first answer is in
               the prefix cache's tree, where `radix` finds it and `lookup` cannot
  concurrent-8 eight different open-ended questions at once: throughput (all tokens / wall time), where the
               adaptive off-switch has to keep the extra rows from costing more than they save
Modes: off, lookup, radix, draft (--draft-model, default this model's own weights in int4). Each round runs
every mode once per workload, in a rotated order, each on a fresh engine (empty prefix cache; chat-again
answers once first). Reported per workload and mode: median decode tokens/s (tokens after the first / time
after the first; concurrent-8: tokens / wall time), its ratio to off, draft tokens proposed and accepted, the
acceptance rate, tokens per step (tokens / forwards after the first), and whether the text equals off's
(fast mode: a verify forward's rows round differently from a one-row step, so a near tie may go the other
way; exact mode makes them bitwise equal, tests/test_speculation.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_decode import machine_kind, write_report  # noqa: E402
from bench_speed import interleaved  # noqa: E402

from minillm import LLM  # noqa: E402

QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a cat.",
    "Explain how a bicycle gear system works, in simple words.",
    "What should I pack for a three-day hiking trip in autumn?",
    "Describe the water cycle to a ten-year-old.",
    "Give me five ideas for a rainy Sunday afternoon.",
    "Why do leaves change colour in autumn?",
    "Write a polite email asking a neighbour to trim their hedge.",
    "How do I make a good cup of tea?",
]


def workloads() -> dict[str, list[list[dict]]]:
    """Each workload's conversations (one, or eight for concurrent-8)."""
    paragraphs = [p for p in (ROOT / "README.md").read_text().split("\n\n") if len(p) > 200 and "|" not in p]
    document = "\n\n".join(paragraphs[:4])[:1600]
    source = (ROOT / "minillm" / "cache" / "radix_cache.py").read_text()
    method = source[source.index("    def match_prefix") : source.index("    def match_length")]

    def user(text):
        return [{"role": "user", "content": text}]

    return {
        "rag-quote": [
            user(f"Document:\n{document}\n\nQuote the document's first two paragraphs exactly, word for word.")
        ],
        "code-edit": [
            user(
                "Rename the variable `matched` to `count` in this Python method and give the whole method back:"
                f"\n\n```python\n{method}```"
            )
        ],
        "chat": [user(QUESTIONS[0])],
        "chat-again": [user(QUESTIONS[1])],
        "concurrent-8": [user(q) for q in QUESTIONS],
    }


def measure(llm: LLM, workload: str, prompts: list[list[int]], mode: str, max_new: int, draft_model) -> dict:
    llm.configure(speculate=mode, draft_model=draft_model if mode == "draft" else None)
    llm.generate(prompts[0][:16], max_new_tokens=2)  # warm: compiled kernels, draft model
    if workload == "chat-again":
        llm.generate(prompts[0], max_new_tokens=max_new, temperature=0)
    start = time.perf_counter()
    completions = llm.generate(prompts, max_new_tokens=max_new, temperature=0)
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    proposed = sum(c.draft_proposed for c in completions)
    accepted = sum(c.draft_accepted for c in completions)
    after_first = sum(len(c.token_ids) - 1 for c in completions)
    if len(completions) == 1:
        c = completions[0]
        speed = (len(c.token_ids) - 1) / c.decode_s
    else:
        speed = tokens / wall
    return {
        "tok_s": speed,
        "tokens": tokens,
        "proposed": proposed,
        "accepted": accepted,
        "tokens_per_step": after_first / max(after_first - accepted, 1),
        "texts": [c.text for c in completions],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="checkpoint folder, .gguf file or smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--draft-model", help="checkpoint for the draft mode (default: the model's own, int4)")
    parser.add_argument("--modes", default="off,lookup,radix,draft")
    parser.add_argument("--workloads", default=",".join(workloads()))
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    llm = LLM.load(args.model, dtype=args.dtype)
    modes = args.modes.split(",")
    report = {
        "machine": {"cpu": machine_kind(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": str(args.model),
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "workloads": {},
    }
    for name, conversations in workloads().items():
        if name not in args.workloads.split(","):
            continue
        prompts = [llm.chat_ids(c) for c in conversations]
        runs: dict[str, list[dict]] = {m: [] for m in modes}

        def one(mode):
            result = measure(llm, name, prompts, mode, args.max_new_tokens, args.draft_model)
            runs[mode].append(result)
            return result["tok_s"]

        speeds = interleaved(modes, one, args.rounds)
        rows = {}
        base = statistics.median(speeds["off"]) if "off" in speeds else None
        for mode in modes:
            last = runs[mode][-1]
            rows[mode] = {
                "tok_s": round(statistics.median(speeds[mode]), 2),
                "tok_s_per_round": [round(s, 2) for s in speeds[mode]],
                "ratio_to_off": round(statistics.median(speeds[mode]) / base, 3) if base else None,
                "proposed": last["proposed"],
                "accepted": last["accepted"],
                "acceptance": round(last["accepted"] / last["proposed"], 3) if last["proposed"] else None,
                "tokens_per_step": round(last["tokens_per_step"], 2),
                "same_text_as_off": last["texts"] == runs["off"][-1]["texts"] if "off" in runs else None,
            }
        report["workloads"][name] = {"prompt_tokens": [len(p) for p in prompts], "modes": rows}
        print(name, {m: (r["tok_s"], r["ratio_to_off"], r["acceptance"]) for m, r in rows.items()}, flush=True)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
