"""Continuous-batching benchmarks: what serving many requests at once gains, and what it costs a lone one.

    python tools/make_bench_checkpoint.py /tmp/qwen05-bf16 --dtype bfloat16
    python tools/bench_batching.py --model /tmp/qwen05-bf16 --out bench/batching_bf16.json

Workloads (prompts are token ids: random weights make text meaningless, and cost does not depend on it):
  decode      decode throughput over all requests at batch 1, 8 and 16 (128-token prompts, 32 new tokens
              each), counted over the steps that only decode; the ratio to batch 1 in the same run
  lone        one request through the batching engine against the previous single-sequence engine (the
              git revision --baseline-ref, imported side by side, reading the same weight tensors):
              prefill of 512 tokens, decode of 32, alternating
  shared      16 concurrent requests sharing a 1,024-token prefix: peak pool slots in use against
              prefix + the sum of the suffixes (the prefix is held once)
  ttft        time to first token with 2,048 cached + 32 new tokens against 256 cached + 32 new (a hit
              copies nothing, so the cached length should barely matter)
  policy      an interleaved shared-prefix workload whose groups do not all fit in the pool: LPM against
              FCFS against the cache off, hit rate (and the best possible) and throughput
  exact       exact mode's batched decode throughput (batch 16) against the fast mode's
Everything compared runs in one process, interleaved where it matters, so the ratios compare like with like
on a noisy machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minillm import LLM  # noqa: E402


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 150000) for _ in range(n)]


def drive(llm: LLM, prompts: list[list[int]], new_tokens: int, **options) -> dict:
    """Submit all prompts at once and step until done, timing each step. Returns the completions and the
    decode-only steps (steps in which no prompt token was computed) with their row counts."""
    engine = llm.engine
    handles = [llm.submit(p, max_new_tokens=new_tokens, temperature=0, **options) for p in prompts]
    decode_rows = decode_s = 0.0
    peak_used = 0
    start = time.perf_counter()
    while True:
        in_prefill = any(r.in_prefill for r in engine.scheduler.running) or engine.scheduler.waiting
        rows = sum(1 for r in engine.scheduler.running if not r.in_prefill)
        t = time.perf_counter()
        if not engine.step():
            break
        if not in_prefill and rows:
            decode_rows += rows
            decode_s += time.perf_counter() - t
        peak_used = max(peak_used, engine.pool.num_slots - engine.pool.free_slots)
    total_s = time.perf_counter() - start
    results = [h.result() for h in handles]
    prompt_tokens = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    return {
        "completions": results,
        "total_s": total_s,
        "decode_tok_s": decode_rows / decode_s if decode_s else 0.0,
        "peak_slots": peak_used,
        "hit_rate": cached / prompt_tokens,
        "output_tok_s": sum(len(r.token_ids) for r in results) / total_s,
    }


def bench_decode(llm: LLM, rng: random.Random, batches: list[int], rounds: int) -> dict:
    per_round = []
    for _ in range(rounds):
        row = {}
        for b in batches:
            llm.configure(max_batch=b)
            row[b] = drive(llm, [tokens(rng, 128) for _ in range(b)], 32)["decode_tok_s"]
        per_round.append(row)
    best = {b: max(r[b] for r in per_round) for b in batches}
    return {
        "prompt_tokens": 128,
        "new_tokens": 32,
        "rounds": [{str(b): round(v, 2) for b, v in r.items()} for r in per_round],
        "best_tok_s": {str(b): round(v, 2) for b, v in best.items()},
        "speedup_vs_batch_1": {str(b): round(best[b] / best[1], 2) for b in batches},
    }


def load_baseline(ref: str):
    """The package as it was at git revision `ref`, importable beside the current one as minillm_baseline."""
    folder = Path(tempfile.mkdtemp(prefix="minillm_baseline_"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "minillm"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    shutil.move(str(folder / "minillm"), str(folder / "minillm_baseline"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("minillm_baseline")


def share_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Point every weight of target at source's tensor of the same name (the two model classes have the same
    modules): both engines then read the very same memory, so neither gains from where its copy happens to lie."""
    modules = dict(source.named_modules())
    for name, module in target.named_modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):
                setattr(module, key, getattr(modules[name], key))
        for key in list(module._parameters):
            module._parameters[key] = modules[name]._parameters[key]


def bench_lone(llm: LLM, baseline_llm, rng: random.Random, rounds: int) -> dict:
    rows = []
    for i in range(rounds):
        prompt = tokens(rng, 512)
        for name in ("new", "baseline") if i % 2 == 0 else ("baseline", "new"):
            engine = llm if name == "new" else baseline_llm
            c = engine.generate(prompt, max_new_tokens=33, temperature=0, use_prefix_cache=False)
            rows.append({"engine": name, "prefill_tok_s": c.prefill_tok_s, "decode_tok_s": c.decode_tok_s})

    def ratio(key):  # median over rounds of new / baseline, each round's two runs back to back
        pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]
        return round(
            statistics.median(
                (a if a["engine"] == "new" else b)[key] / (b if a["engine"] == "new" else a)[key] for a, b in pairs
            ),
            3,
        )

    return {
        "prompt_tokens": 512,
        "new_tokens": 33,
        "runs": rows,
        "prefill_new_over_baseline": ratio("prefill_tok_s"),
        "decode_new_over_baseline": ratio("decode_tok_s"),
    }


def bench_shared(llm: LLM, rng: random.Random) -> dict:
    llm.configure(max_batch=16)
    prefix = tokens(rng, 1024)
    suffixes = [tokens(rng, 32) for _ in range(16)]
    out = drive(llm, [prefix + s for s in suffixes], 16)
    ideal = len(prefix) + sum(len(s) + 16 for s in suffixes)
    return {
        "prefix_tokens": 1024,
        "requests": 16,
        "suffix_tokens": 32,
        "new_tokens": 16,
        "peak_slots_in_use": out["peak_slots"],
        "prefix_plus_suffixes_plus_outputs": ideal,
        "requests_that_reused_the_prefix": sum(c.cached_tokens >= 1024 for c in out["completions"]),
        "unshared_would_need": 16 * (1024 + 32 + 16),
    }


def bench_ttft(llm: LLM, rng: random.Random, rounds: int) -> dict:
    llm.configure()
    rows = {256: [], 2048: []}
    for i in range(rounds):
        for cached in (256, 2048) if i % 2 == 0 else (2048, 256):
            prefix = tokens(rng, cached)
            llm.generate(prefix + [7], max_new_tokens=1, temperature=0)
            c = llm.generate(prefix + tokens(rng, 32), max_new_tokens=1, temperature=0)
            assert c.cached_tokens == cached
            rows[cached].append(c.ttft_s)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "new_tokens": 32,
        "ttft_s": {str(k): [round(x, 4) for x in v] for k, v in rows.items()},
        "median_ttft_s": {str(k): round(v, 4) for k, v in med.items()},
        "ratio_2048_over_256": round(med[2048] / med[256], 3),
    }


def bench_policy(
    llm: LLM,
    rng: random.Random,
    groups: int,
    per_group: int,
    prefix_len: int,
    question: int,
    new_tokens: int,
    pool_prefixes: float,
) -> dict:
    prefixes = [tokens(rng, prefix_len) for _ in range(groups)]
    prompts = [prefixes[g] + tokens(rng, question) for p in range(per_group) for g in range(groups)]  # interleaved
    kv_tokens = int(pool_prefixes * prefix_len)
    total = sum(len(p) for p in prompts)
    best_hit = (groups * (per_group - 1) * prefix_len) / total  # each prefix computed once
    out = {
        "groups": groups,
        "per_group": per_group,
        "prefix_tokens": prefix_len,
        "question_tokens": question,
        "new_tokens": new_tokens,
        "pool_tokens": kv_tokens,
        "max_batch": 4,
        "best_possible_hit_rate": round(best_hit, 4),
    }
    for name, settings in (
        ("lpm", dict(schedule_policy="lpm")),
        ("fcfs", dict(schedule_policy="fcfs")),
        ("cache_off", dict(prefix_cache=False)),
    ):
        llm.configure(kv_tokens=kv_tokens, max_batch=4, **settings)
        r = drive(llm, prompts, new_tokens)
        out[name] = {
            "hit_rate": round(r["hit_rate"], 4),
            "total_s": round(r["total_s"], 2),
            "requests_per_s": round(len(prompts) / r["total_s"], 3),
            "preemptions": llm.engine.scheduler.preemptions,
        }
    out["lpm_hit_rate_over_best"] = round(out["lpm"]["hit_rate"] / best_hit, 3)
    out["lpm_over_fcfs_throughput"] = round(out["fcfs"]["total_s"] / out["lpm"]["total_s"], 3)
    return out


def bench_exact(model: str, dtype: str, fast: LLM, rng: random.Random, rounds: int) -> dict:
    exact = LLM.load(model, dtype=dtype, exact=True, max_batch=16)
    rows = []
    for i in range(rounds):
        prompts = [tokens(rng, 128) for _ in range(16)]
        for name, llm in (("fast", fast), ("exact", exact)) if i % 2 == 0 else (("exact", exact), ("fast", fast)):
            llm.configure(max_batch=16)
            rows.append({"mode": name, "decode_tok_s": drive(llm, prompts, 32)["decode_tok_s"]})
    best = {m: max(r["decode_tok_s"] for r in rows if r["mode"] == m) for m in ("fast", "exact")}
    return {
        "batch": 16,
        "exact_decode_rows": exact.engine.exact_tiles[1],
        "runs": rows,
        "best_tok_s": best,
        "exact_over_fast": round(best["exact"] / best["fast"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default=None, help="default: the checkpoint's own")
    parser.add_argument("--only", nargs="*", default=["decode", "lone", "shared", "ttft", "policy", "exact"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-ref", default="ccf367e", help="git revision of the single-sequence engine")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    llm = LLM.load(args.model, dtype=args.dtype)
    llm.defaults.eos_token_ids = []  # random weights: never stop early, so every run does the same work
    report = {
        "machine": {
            "cpus": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model": args.model,
        "dtype": str(llm.dtype),
    }
    if "decode" in args.only:
        report["decode"] = bench_decode(llm, rng, [1, 8, 16], args.rounds)
        print("decode", report["decode"]["speedup_vs_batch_1"], flush=True)
    if "lone" in args.only:
        baseline = load_baseline(args.baseline_ref).LLM.load(args.model, dtype=args.dtype)
        baseline.defaults.eos_token_ids = []
        share_weights(llm.model, baseline.model)
        llm.configure()
        report["lone"] = bench_lone(llm, baseline, rng, 2 * args.rounds)
        del baseline
        print(
            "lone", report["lone"]["prefill_new_over_baseline"], report["lone"]["decode_new_over_baseline"], flush=True
        )
    if "shared" in args.only:
        report["shared"] = bench_shared(llm, rng)
        print("shared", report["shared"], flush=True)
    if "ttft" in args.only:
        report["ttft"] = bench_ttft(llm, rng, 2 * args.rounds + 1)
        print("ttft", report["ttft"]["ratio_2048_over_256"], flush=True)
    if "policy" in args.only:
        report["policy"] = bench_policy(
            llm, rng, groups=8, per_group=4, prefix_len=512, question=32, new_tokens=8, pool_prefixes=6
        )
        print("policy", report["policy"], flush=True)
    if "exact" in args.only:
        report["exact"] = bench_exact(args.model, args.dtype, llm, rng, args.rounds)
        print("exact", report["exact"]["exact_over_fast"], flush=True)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
