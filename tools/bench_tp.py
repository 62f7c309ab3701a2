"""Tensor parallelism on this machine: TP=2 (two processes, one thread each) against TP=1 (one process, two
threads), and the resident memory of each rank.

    python tools/bench_tp.py --model /tmp/serve-fp32 --dtype float32 --out bench/tp_fp32.json

Each measurement runs in a fresh process (so resident memory is the configuration's own), the two
configurations alternating for --rounds rounds; reported is each one's best round. Measured: load time;
prefill tokens/s of one --prompt-tokens prompt; decode tokens/s of one request (--new-tokens after a
128-token prompt); decode tokens/s of --batch requests at once; per rank, resident memory (VmRSS, of which
RssAnon and RssFile: mapped checkpoint pages count as file) after generating, also less what rank 0's
process held before loading (python, torch and minillm imported: the same in every rank), and the bytes of
weights it holds (its shard, packed forms included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"tp1 (2 threads)": dict(tp=None, threads=2), "tp2 (1 thread per rank)": dict(tp=2, threads=2)}


def memory(pid: int | str = "self") -> dict:
    """VmRSS, RssAnon, RssFile of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def weight_bytes(model) -> int:
    """Bytes of weights this rank holds: parameters (the tied embedding once) and packed/quantized forms."""
    from minillm.loading.prepack import PackedLinear
    from minillm.loading.quantize import QuantizedLinear

    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.nbytes
    return total + sum(m.weight_bytes for m in model.modules() if isinstance(m, (PackedLinear, QuantizedLinear)))


def child(args) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    torch.set_num_threads(CONFIGS[args.child]["threads"])
    from minillm import LLM

    before = memory()
    start = time.perf_counter()
    llm = LLM.load(args.model, dtype=args.dtype, tp=CONFIGS[args.child]["tp"], kv_mb=args.kv_mb)
    load_s = time.perf_counter() - start
    vocab = llm.config.vocab_size
    ids = lambda n, seed: [(seed * 7919 + i * 104729) % (vocab - 10) + 5 for i in range(n)]  # noqa: E731
    options = dict(temperature=0, ignore_eos=True, use_prefix_cache=False)
    llm.generate(ids(32, 0), max_new_tokens=4, **options)  # warm up
    prefill = llm.generate(ids(args.prompt_tokens, 1), max_new_tokens=1, **options)
    decode = llm.generate(ids(128, 2), max_new_tokens=args.new_tokens, **options)
    start = time.perf_counter()
    batch = llm.generate([ids(128, 10 + i) for i in range(args.batch)], max_new_tokens=args.new_tokens, **options)
    batch_s = time.perf_counter() - start
    ranks = [{"rank": 0, **memory(), "weight_bytes": weight_bytes(llm.model)}]
    for rank, p in enumerate(getattr(llm.runner, "followers", []), 1):
        ranks.append({"rank": rank, **memory(p.pid)})
    for r in ranks:  # every rank's process imported the same python, torch and minillm as rank 0 before loading
        r["rss_less_before_load_bytes"] = r["VmRSS"] - before["VmRSS"]
    llm.close()
    return {
        "load_s": round(load_s, 2),
        "prefill_tok_s": round(prefill.prefill_tok_s, 1),
        "decode_tok_s": round(decode.decode_tok_s, 2),
        "batch_decode_tok_s": round(sum(len(c.token_ids) for c in batch) / batch_s, 2),
        "ranks": ranks,
        "rss_before_load_bytes": before["VmRSS"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kv-mb", type=float, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for round_ in range(args.rounds):
        for name in names[round_ % 2 :] + names[: round_ % 2]:  # alternate who goes first
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--dtype",
                args.dtype,
                "--rounds",
                "1",
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--new-tokens",
                str(args.new_tokens),
                "--batch",
                str(args.batch),
                "--kv-mb",
                str(args.kv_mb),
            ] + (["--model", args.model] if args.model else [])
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=1800, env=dict(os.environ, OMP_NUM_THREADS="2")
            )
            if out.returncode != 0:
                raise SystemExit(f"bench_tp: {name} failed: {out.stderr.strip()[-400:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[name][-1]
            print(
                f"round {round_ + 1} {name:24} prefill {r['prefill_tok_s']:7.1f} tok/s  "
                f"decode {r['decode_tok_s']:6.2f} "
                f"tok/s  batch {r['batch_decode_tok_s']:6.2f} tok/s  rss "
                + " ".join(f"{x['VmRSS'] / 2**20:.0f}" for x in r["ranks"])
                + " MiB",
                file=sys.stderr,
                flush=True,
            )
    best = {}
    for name, rs in runs.items():
        best[name] = {key: max(r[key] for r in rs) for key in ("prefill_tok_s", "decode_tok_s", "batch_decode_tok_s")}
        best[name]["load_s"] = min(r["load_s"] for r in rs)
        best[name]["ranks"] = min(rs, key=lambda r: sum(x["VmRSS"] for x in r["ranks"]))["ranks"]
    one, two = (best[n] for n in names)
    ratios = {key: round(two[key] / one[key], 3) for key in ("prefill_tok_s", "decode_tok_s", "batch_decode_tok_s")}
    ratios["rank_rss_over_tp1_rss"] = [round(r["VmRSS"] / one["ranks"][0]["VmRSS"], 3) for r in two["ranks"]]
    ratios["rank_loaded_rss_over_tp1"] = [  # what loading and running added, past the imports
        round(r["rss_less_before_load_bytes"] / one["ranks"][0]["rss_less_before_load_bytes"], 3) for r in two["ranks"]
    ]
    ratios["rank_weights_over_tp1_weights"] = round(
        two["ranks"][0]["weight_bytes"] / one["ranks"][0]["weight_bytes"], 3
    )
    import torch

    report = {
        "model": args.model or "bundled",
        "dtype": args.dtype,
        "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "best": best,
        "tp2_over_tp1": ratios,
        "runs": runs,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(
        json.dumps(
            {
                "best": {n: {k: v for k, v in b.items() if k != "ranks"} for n, b in best.items()},
                "tp2_over_tp1": ratios,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
