"""This checkout's speed against an earlier commit's, side by side in one process (the redesign's guard rail:
a change of shape must not cost speed).

    python tools/make_bench_checkpoint.py /tmp/qwen05-fp32 --dtype float32
    python tools/bench_compare.py --model /tmp/qwen05-fp32 --baseline-ref 9b48432 --dtype float32 \
        --out bench/compare_fp32.json

Both packages are imported into one process (the baseline from `git archive`, as minillm_baseline, the way
bench_batching.py does it) and read the very same weight tensors. Workloads, in fast and in exact mode: a lone
request (a 128-token prompt, 32 new tokens: its prefill and decode tokens per second) and a batch of 8 (eight
128-token prompts, 32 new tokens each: output tokens per second over the whole run). Each round runs every
workload on both packages back to back, alternating which goes first; reported per workload: the median over
rounds of new / baseline, each side's best and the ratio of the bests. On a shared machine single runs vary by
10% or more (other tenants only ever slow a run down), so the ratio of the bests over many rounds is the
steadiest figure, and the median ratio the second.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_batching import load_baseline, share_weights  # noqa: E402

from minillm import LLM  # noqa: E402

PROMPT, NEW, BATCH = 128, 32, 8


def cpu_name() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    kind = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "neither AVX2 nor AVX-512"
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return f"{model} ({kind}{', AVX-512 BF16' if ' avx512_bf16' in flags else ''})"


def lone(llm, rng: random.Random) -> dict:
    """One request on a fresh engine (no prefix cache carried over): its prefill and decode speed."""
    llm.configure()
    out = llm.generate(
        [rng.randrange(2, 30000) for _ in range(PROMPT)], max_new_tokens=NEW, temperature=0, ignore_eos=True
    )
    return {"lone_prefill_tok_s": out.prefill_tok_s, "lone_decode_tok_s": out.decode_tok_s}


def batch8(llm, rng: random.Random) -> dict:
    """BATCH requests at once on a fresh engine: output tokens per second over the whole run."""
    llm.configure()
    prompts = [[rng.randrange(2, 30000) for _ in range(PROMPT)] for _ in range(BATCH)]
    start = time.perf_counter()
    outs = llm.generate(prompts, max_new_tokens=NEW, temperature=0, ignore_eos=True)
    return {"batch8_tok_s": sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--baseline-ref", required=True, help="git revision to compare with")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    baseline = load_baseline(args.baseline_ref)
    report = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "baseline_ref": args.baseline_ref,
        "workloads": f"lone: {PROMPT}-token prompt, {NEW} new tokens; batch8: {BATCH} x ({PROMPT} + {NEW})",
    }
    print(report["cpu"], f"{report['threads']} threads, {args.dtype}, against {args.baseline_ref}", flush=True)
    for mode in ("fast", "exact"):
        new = LLM.load(args.model, dtype=args.dtype, exact=mode == "exact")
        old = baseline.LLM.load(args.model, dtype=args.dtype, exact=mode == "exact")
        share_weights(new.model, old.model)
        rounds = []
        for i in range(args.rounds):  # each workload on both packages back to back, the order alternating
            order = ("new", "baseline") if i % 2 == 0 else ("baseline", "new")
            got = {"new": {}, "baseline": {}}
            for workload in (lone, batch8):
                for name in order:
                    got[name].update(workload(new if name == "new" else old, random.Random(i)))
            rounds.append(got)
            print(
                mode, f"round {i + 1}", {k: {m: round(v, 2) for m, v in r.items()} for k, r in got.items()}, flush=True
            )
        metrics = list(rounds[0]["new"])
        report[mode] = {
            m: {
                "new_over_baseline": round(statistics.median(r["new"][m] / r["baseline"][m] for r in rounds), 3),
                "new_best": round(max(r["new"][m] for r in rounds), 2),
                "baseline_best": round(max(r["baseline"][m] for r in rounds), 2),
                "best_over_best": round(max(r["new"][m] for r in rounds) / max(r["baseline"][m] for r in rounds), 3),
            }
            for m in metrics
        }
        print(mode, json.dumps(report[mode]), flush=True)
        del new, old
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
