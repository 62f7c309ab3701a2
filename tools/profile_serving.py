"""Where a serving workload's time goes, in-process (no HTTP): matrix products, attention, the rest.

    python tools/profile_serving.py --model /tmp/serve-fp32 --dtype float32 --out bench/profile_serving_fp32.json

The shared-prefix load of tools/bench_serving_compare.py (G groups x P prompts, a prefix of L token ids shared
within a group, Q more each, O tokens out, greedy, C requests in flight, shuffled) goes straight to the engine:
requests are submitted as others finish and the engine is stepped until all are done. Timed: every step;
inside it, the forward; inside that, the matrix products (each PackedLinear / QuantizedLinear call),
attention (ForwardBatch.attend: writing the new KV, decode rows in the pool, prompt rows through gather +
scaled_dot_product_attention, the latter also timed alone). The rest of the forward is norms, RoPE,
embeddings and Python; step minus forward is scheduling, sampling and bookkeeping. Reported in seconds over
the run, with the output tokens per second (an HTTP server adds its own costs on top: compare with
bench_serving_compare.py's figure for the same load).
"""

from __future__ import annotations

import argparse
import collections
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import machine_kind, write_report  # noqa: E402

from minillm import LLM  # noqa: E402
from minillm.engine import forward_batch  # noqa: E402
from minillm.loading.prepack import PackedLinear  # noqa: E402
from minillm.loading.quantize import QuantizedLinear  # noqa: E402


def timed(seconds: collections.Counter, key: str, fn):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start

    return run


FEW_ROWS = 32  # products of fewer rows: decode steps (up to the batch's rows); more: prompt chunks


def timed_products(seconds: collections.Counter, fn):
    """PackedLinear.forward timed apart by its row count: fewer than FEW_ROWS rows (decode steps) or more
    (steps with prompt chunks)."""

    def run(self, x):
        start = time.perf_counter()
        try:
            return fn(self, x)
        finally:
            elapsed = time.perf_counter() - start
            few = x.reshape(-1, x.shape[-1]).shape[0] < FEW_ROWS
            seconds["products"] += elapsed
            seconds["products: fewer than 32 rows" if few else "products: 32 rows or more"] += elapsed

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prompts-per-group", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--question-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-prefill-tokens", type=int, help="prompt tokens per step (default: the engine's)")
    parser.add_argument("--max-batch", type=int, help="requests running at once (default: the engine's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    llm = LLM.load(args.model, dtype=args.dtype, quantize=args.quantize)
    settings = {"max_prefill_tokens": args.max_prefill_tokens, "max_batch": args.max_batch}
    if changed := {k: v for k, v in settings.items() if v is not None}:
        llm.configure(**changed)
    llm.defaults.eos_token_ids = []  # every request produces output-len tokens, as ignore_eos does
    vocab = llm.config.vocab_size
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(1000, vocab) for _ in range(args.prefix_len)] for _ in range(args.groups)]
    question = lambda: [rng.randrange(1000, vocab) for _ in range(args.question_len)]  # noqa: E731
    prompts = [p + question() for p in prefixes for _ in range(args.prompts_per_group)]
    rng.shuffle(prompts)

    seconds: collections.Counter = collections.Counter()
    patches = [
        (QuantizedLinear, "forward", "products"),
        (forward_batch.ForwardBatch, "attend", "attention"),
        (forward_batch, "attend", "attention: prompt rows' SDPA"),
        (forward_batch, "run", "forward"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    originals.append((PackedLinear, "forward", PackedLinear.forward))
    for owner, name, key in patches:
        setattr(owner, name, timed(seconds, key, getattr(owner, name)))
    PackedLinear.forward = timed_products(seconds, PackedLinear.forward)
    prompt_rows: list[bool] = []  # per forward of this step: whether it had a segment of more than one row
    timed_run = forward_batch.run
    forward_batch.run = lambda model, pool, segments, views: (
        prompt_rows.append(any(len(s.tokens) > 1 for s in segments)) or timed_run(model, pool, segments, views)
    )
    try:
        engine, waiting, running, steps, decode_only_steps = llm.engine, list(prompts), [], 0, 0
        handles = []
        start = time.perf_counter()
        while waiting or running:
            while waiting and len(running) < args.concurrency:
                handles.append(llm.submit(waiting.pop(), max_new_tokens=args.output_len, temperature=0))
                running.append(handles[-1])
            prompt_rows.clear()
            step_start = time.perf_counter()
            engine.step()
            step_s = time.perf_counter() - step_start
            seconds["step"] += step_s
            if not any(prompt_rows):
                seconds["steps of decode rows only"] += step_s
                decode_only_steps += 1
            steps += 1
            running = [h for h in running if not h.request.finished]
        total = time.perf_counter() - start
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    requests = [h.request for h in handles]
    ttfts = sorted(r.token_times[0] - r.submit_time for r in requests)
    tpots = sorted((r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in requests)
    report = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "cpu": machine_kind()},
        "model": args.model,
        "dtype": str(llm.dtype),
        "weight_form": llm.model.weight_form,
        "max_prefill_tokens": llm.engine.scheduler.max_prefill_tokens,
        "max_batch": llm.engine.scheduler.max_batch,
        "load": {k: getattr(args, k) for k in ("groups", "prompts_per_group", "prefix_len", "question_len")}
        | {"output_len": args.output_len, "concurrency": args.concurrency},
        "duration_s": round(total, 1),
        "steps": steps,
        "steps_of_decode_rows_only": decode_only_steps,
        "output_tok_s": round(len(prompts) * args.output_len / total, 1),
        "prefix_cache_hit_rate": round(llm.stats().prefix_cache_hit_rate, 4),
        "ttft_s": {"median": round(statistics.median(ttfts), 3), "p90": round(ttfts[int(0.9 * (len(ttfts) - 1))], 3)},
        "tpot_ms_median": round(1000 * statistics.median(tpots), 1),
        "seconds": {
            "step": round(seconds["step"], 1),
            "forward": round(seconds["forward"], 1),
            "products": round(seconds["products"], 1),
            "products: fewer than 32 rows": round(seconds["products: fewer than 32 rows"], 1),
            "products: 32 rows or more": round(seconds["products: 32 rows or more"], 1),
            "attention": round(seconds["attention"], 1),
            "attention: prompt rows' SDPA": round(seconds["attention: prompt rows' SDPA"], 1),
            "rest of the forward": round(seconds["forward"] - seconds["products"] - seconds["attention"], 1),
            "outside the forward (scheduling, sampling)": round(seconds["step"] - seconds["forward"], 1),
            "steps of decode rows only": round(seconds["steps of decode rows only"], 1),
        },
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
