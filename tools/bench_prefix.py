"""Prefix-cache benchmarks: what reusing cached KV saves, and what the cache costs when nothing is shared.

    python tools/make_bench_checkpoint.py /tmp/qwen-0.5b-shape
    python tools/bench_prefix.py --model /tmp/qwen-0.5b-shape --out bench_prefix.json [--chart bench_prefix.png]

Workloads (prompts are token ids: random weights make the text meaningless, and cost does not depend on it):
  ttft        time to first token, 2,048-token cached prefix + 32 new tokens, warm vs cold
  no_sharing  prompts with nothing in common, cache on vs off (the cache's pure overhead)
  radix_ops   match_prefix + insert of a 4,096-token prompt (the tree holds slot numbers: no KV is copied)
  rag         the course article's RAG experiment: 2 documents x 6 questions, order A (document by
              document) and order B (shuffled), cache on vs off, 16 new tokens per answer
  shared      SGLang-style generated shared prefix: G groups x P prompts, long shared prefix, short question
  chat        multi-turn chat: each turn's prompt is the whole conversation so far
  exact       exact mode against fast mode: cold prefill time (512 and 2,048 tokens), decode speed, and
              warm vs cold time to first token on a 2,048-token cached prefix
Cache on and off run interleaved in one process, so the ratios compare like with like on a noisy machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm import LLM  # noqa: E402
from minillm.cache.radix_cache import RadixCache  # noqa: E402


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 150000) for _ in range(n)]


def run(llm: LLM, prompt: list[int], new_tokens: int, cache: bool) -> dict:
    c = llm.generate(prompt, max_new_tokens=new_tokens, temperature=0, use_prefix_cache=cache)
    total = c.ttft_s + c.decode_s
    return {
        "prompt_tokens": c.prompt_tokens,
        "cached_tokens": c.cached_tokens,
        "computed_tokens": c.computed_tokens,
        "ttft_s": round(c.ttft_s, 4),
        "total_s": round(total, 4),
    }


def bench_ttft(llm: LLM, rng: random.Random, prefix_len: int, suffix_len: int, repeats: int) -> dict:
    prefix = random_tokens(rng, prefix_len)
    rows = []
    for _ in range(repeats):
        llm.configure()  # an empty prefix cache
        prompt = prefix + random_tokens(rng, suffix_len)
        cold = run(llm, prompt, 1, cache=False)
        llm.generate(prefix + [7], max_new_tokens=1, temperature=0)  # cache the prefix
        warm = run(llm, prompt, 1, cache=True)
        assert warm["cached_tokens"] == prefix_len
        rows.append(
            {
                "cold_ttft_s": cold["ttft_s"],
                "warm_ttft_s": warm["ttft_s"],
                "speedup": round(cold["ttft_s"] / warm["ttft_s"], 1),
            }
        )
    return {
        "prefix_tokens": prefix_len,
        "suffix_tokens": suffix_len,
        "runs": rows,
        "median_speedup": statistics.median(r["speedup"] for r in rows),
    }


def bench_no_sharing(llm: LLM, rng: random.Random, prompts: int, length: int, new_tokens: int, rounds: int) -> dict:
    """Fresh prompts (never a hit), each run with the cache on and off back to back, the order alternating:
    a slow spell of the machine then lands on both modes alike."""
    totals = {"on": 0.0, "off": 0.0}
    for i in range(prompts * rounds):
        prompt = random_tokens(rng, length)
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            start = time.perf_counter()
            llm.generate(prompt, max_new_tokens=new_tokens, temperature=0, use_prefix_cache=mode == "on")
            totals[mode] += time.perf_counter() - start
    return {
        "prompts": prompts * rounds,
        "prompt_tokens": length,
        "new_tokens": new_tokens,
        "cache_on_s": round(totals["on"], 3),
        "cache_off_s": round(totals["off"], 3),
        "on_over_off": round(totals["on"] / totals["off"], 4),
    }


def bench_radix_ops(llm: LLM, rng: random.Random, length: int, repeats: int) -> dict:
    """The tree's own work for one request: it stores slot numbers, so no KV is copied in or out."""
    miss, hit = [], []
    for _ in range(repeats):
        tree = RadixCache()
        for _ in range(20):  # some other content in the tree
            other = random_tokens(rng, 256)
            tree.insert(other, torch.arange(256))
        prompt = random_tokens(rng, length)
        slots = torch.arange(length)
        start = time.perf_counter()
        tree.insert(prompt, slots)
        tree.match_prefix(prompt)  # (unused here, measured as in a request)
        miss.append(time.perf_counter() - start)
        start = time.perf_counter()
        m = tree.match_prefix(prompt + [5])
        tree.insert(prompt, slots)
        hit.append(time.perf_counter() - start)
        assert m.length == length
    return {
        "prompt_tokens": length,
        "insert_new_then_match_ms": round(1000 * statistics.median(miss), 3),
        "match_hit_then_insert_ms": round(1000 * statistics.median(hit), 3),
    }


def bench_requests(llm: LLM, prompts: list[list[int]], new_tokens: int, doc_tokens: list[int] | None = None) -> dict:
    """Run the prompts in order with the cache on (from empty), then with it off; interleaving per request."""
    llm.configure()  # an empty prefix cache
    per_request = []
    for i, prompt in enumerate(prompts):
        on = run(llm, prompt, new_tokens, cache=True)
        off = run(llm, prompt, new_tokens, cache=False)
        row = {
            "request": i,
            **{f"on_{k}": v for k, v in on.items()},
            "off_total_s": off["total_s"],
            "off_ttft_s": off["ttft_s"],
        }
        per_request.append(row)
    cached = sum(r["on_cached_tokens"] for r in per_request)
    prompt_total = sum(r["on_prompt_tokens"] for r in per_request)
    on_s = sum(r["on_total_s"] for r in per_request)
    off_s = sum(r["off_total_s"] for r in per_request)
    summary = {
        "requests": len(prompts),
        "hit_rate": round(cached / prompt_total, 4),
        "cached_tokens": cached,
        "prompt_tokens": prompt_total,
        "cache_on_s": round(on_s, 2),
        "cache_off_s": round(off_s, 2),
        "end_to_end_speedup": round(off_s / on_s, 2),
        "misses": sum(1 for r in per_request if r["on_cached_tokens"] < r["on_prompt_tokens"] // 2),
    }
    if doc_tokens is not None:
        summary["document_tokens_skipped"] = round(
            sum(min(r["on_cached_tokens"], d) for r, d in zip(per_request, doc_tokens)) / sum(doc_tokens), 4
        )
    return {"summary": summary, "per_request": per_request}


def bench_rag(llm: LLM, rng: random.Random, doc_len: int, questions: int, new_tokens: int, seed: int) -> dict:
    header, sep = random_tokens(rng, 12), random_tokens(rng, 6)
    docs = [random_tokens(rng, doc_len) for _ in range(2)]
    requests = [(d, random_tokens(rng, rng.randrange(12, 24))) for d in range(2) for _ in range(questions)]
    prompts_a = [header + docs[d] + sep + q for d, q in requests]
    doc_a = [len(header) + doc_len] * len(requests)
    shuffled = requests[:]
    random.Random(seed).shuffle(shuffled)
    prompts_b = [header + docs[d] + sep + q for d, q in shuffled]
    return {
        "documents": 2,
        "document_tokens": doc_len,
        "questions_per_document": questions,
        "new_tokens": new_tokens,
        "order_A": bench_requests(llm, prompts_a, new_tokens, doc_a),
        "order_B": bench_requests(llm, prompts_b, new_tokens, doc_a),
    }


def bench_shared(
    llm: LLM, rng: random.Random, groups: int, per_group: int, prefix_len: int, q_len: int, new_tokens: int
) -> dict:
    prompts = []
    for _ in range(groups):
        prefix = random_tokens(rng, prefix_len)
        prompts += [prefix + random_tokens(rng, q_len) for _ in range(per_group)]
    result = bench_requests(llm, prompts, new_tokens)
    result["summary"].update(groups=groups, prompts_per_group=per_group, shared_prefix_tokens=prefix_len)
    return result


def bench_chat(llm: LLM, rng: random.Random, turns: int, system_len: int, user_len: int, new_tokens: int) -> dict:
    """Each turn appends a user message and the model's answer; the next prompt is the whole history."""
    llm.configure()  # an empty prefix cache
    history = random_tokens(rng, system_len)
    rows = []
    for turn in range(turns):
        history = history + random_tokens(rng, user_len)
        on = llm.generate(history, max_new_tokens=new_tokens, temperature=0)
        off = llm.generate(history, max_new_tokens=new_tokens, temperature=0, use_prefix_cache=False)
        rows.append(
            {
                "turn": turn,
                "prompt_tokens": on.prompt_tokens,
                "cached_tokens": on.cached_tokens,
                "on_ttft_s": round(on.ttft_s, 4),
                "off_ttft_s": round(off.ttft_s, 4),
                "on_total_s": round(on.ttft_s + on.decode_s, 4),
                "off_total_s": round(off.ttft_s + off.decode_s, 4),
            }
        )
        history = history + on.token_ids
    on_s, off_s = sum(r["on_total_s"] for r in rows), sum(r["off_total_s"] for r in rows)
    return {
        "summary": {
            "turns": turns,
            "cache_on_s": round(on_s, 2),
            "cache_off_s": round(off_s, 2),
            "end_to_end_speedup": round(off_s / on_s, 2),
            "hit_rate": round(sum(r["cached_tokens"] for r in rows) / sum(r["prompt_tokens"] for r in rows), 4),
        },
        "per_turn": rows,
    }


def bench_exact(fast: LLM, rng: random.Random, lengths: list[int], prefix_len: int, repeats: int) -> dict:
    """Same weights, two engines: fast mode and exact mode (chunked prefill), interleaved."""
    exact = LLM(fast.model, fast.tokenizer, fast.defaults, fast.device, exact=True)
    result = {"chunk": exact.engine.exact_tiles[0]}
    for length in lengths:
        times = {"fast": [], "exact": []}
        for r in range(repeats):
            prompt = random_tokens(rng, length)
            for name in ("fast", "exact") if r % 2 == 0 else ("exact", "fast"):
                engine = fast if name == "fast" else exact
                times[name].append(
                    engine.generate(prompt, max_new_tokens=1, temperature=0, use_prefix_cache=False).prefill_s
                )
        fast_s, exact_s = statistics.median(times["fast"]), statistics.median(times["exact"])
        result[f"prefill_{length}"] = {
            "fast_s": round(fast_s, 3),
            "exact_s": round(exact_s, 3),
            "exact_over_fast": round(exact_s / fast_s, 3),
        }
    prompt = random_tokens(rng, 128)
    decode = {
        name: max(
            e.generate(prompt, max_new_tokens=32, temperature=0, use_prefix_cache=False).decode_tok_s
            for _ in range(repeats)
        )
        for name, e in (("fast", fast), ("exact", exact))
    }
    result["decode_tok_s"] = {k: round(v, 2) for k, v in decode.items()}
    prefix = random_tokens(rng, prefix_len)
    exact.generate(prefix + [7], max_new_tokens=1, temperature=0)  # caches the prefix (whole chunks)
    prompt = prefix + random_tokens(rng, 32)
    cold = exact.generate(prompt, max_new_tokens=1, temperature=0, use_prefix_cache=False)
    warm = exact.generate(prompt, max_new_tokens=1, temperature=0)
    result["exact_ttft"] = {
        "prefix_tokens": prefix_len,
        "cached_tokens": warm.cached_tokens,
        "cold_s": round(cold.ttft_s, 3),
        "warm_s": round(warm.ttft_s, 3),
        "speedup": round(cold.ttft_s / warm.ttft_s, 1),
    }
    return result


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, on, off = [], [], []
    for key, label in [("rag", None), ("shared", "shared prefix"), ("chat", "multi-turn chat")]:
        if key not in results:
            continue
        parts = [("order_A", "RAG order A"), ("order_B", "RAG order B")] if key == "rag" else [(None, label)]
        for sub, name in parts:
            s = (results[key][sub] if sub else results[key])["summary"]
            names.append(name)
            on.append(s["cache_on_s"])
            off.append(s["cache_off_s"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], off, width=0.4, label="cache off")
    ax.bar([i + 0.2 for i in x], on, width=0.4, label="cache on")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("seconds (whole workload)")
    ax.set_title("minillm prefix cache: end-to-end time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (see tools/make_bench_checkpoint.py)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the checkpoint's")
    parser.add_argument(
        "--only", nargs="+", choices=["ttft", "no_sharing", "radix_ops", "rag", "shared", "chat", "exact"]
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--chart", type=Path, help="write a PNG chart here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.chart:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--chart needs matplotlib: pip install -e '.[bench]'")
    torch.manual_seed(args.seed)
    llm = LLM.load(args.model, dtype=args.dtype)
    rng = random.Random(args.seed)
    q = args.quick
    todo = args.only or ["ttft", "no_sharing", "radix_ops", "rag", "shared", "chat", "exact"]
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": str(args.model),
        "dtype": str(llm.dtype).replace("torch.", ""),
    }
    llm.generate(random_tokens(rng, 64), max_new_tokens=4, use_prefix_cache=False)  # warm-up
    steps = {
        "ttft": lambda: bench_ttft(llm, rng, 512 if q else 2048, 32, 2 if q else 3),
        "no_sharing": lambda: bench_no_sharing(llm, rng, 4 if q else 8, 128 if q else 256, 8, 2 if q else 4),
        "radix_ops": lambda: bench_radix_ops(llm, rng, 4096, 5),
        "rag": lambda: bench_rag(llm, rng, 300 if q else 1500, 3 if q else 6, 16, args.seed),
        "shared": lambda: bench_shared(llm, rng, 2 if q else 4, 3 if q else 4, 256 if q else 1024, 24, 8),
        "chat": lambda: bench_chat(llm, rng, 3 if q else 6, 64 if q else 256, 32, 32 if q else 48),
        "exact": lambda: bench_exact(llm, rng, [512] if q else [512, 2048], 512 if q else 2048, 2 if q else 3),
    }
    for name in todo:
        start = time.perf_counter()
        results[name] = steps[name]()
        brief = results[name].get(
            "summary", {k: v for k, v in results[name].items() if not isinstance(v, (list, dict))}
        )
        print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(brief)}", file=sys.stderr, flush=True)
        if name == "rag":
            for order in ("order_A", "order_B"):
                print(f"  {order}: {json.dumps(results[name][order]['summary'])}", file=sys.stderr)
        if name in ("radix_ops", "exact"):
            print(f"  {json.dumps(results[name])}", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.chart:
        chart(results, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
