"""The disk tier, measured as a user meets it: whole `python -m minillm generate` processes, one after another.

Each round, side by side (no-disk first in every other round):
    cold      a fresh cache directory: document + question 1 (its KV is written to disk as the process ends)
    second    the same directory: document + question 2 (the document's KV is read back from disk)
    no-disk   no cache directory: document + question 1, the baseline for what writing costs

Reported per round and as medians: time to first token of each run, the second run's speed-up over the
cold one, the time the cold run spent writing pages (against its request's end-to-end time), and whole-
process wall times. Usage:

    python tools/make_bench_checkpoint.py /tmp/qwen05-fp32 --dtype float32
    python tools/bench_disk.py --model /tmp/qwen05-fp32 --out bench/disk_fp32.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer


def document(model: Path, tokens: int, seed: int) -> str:
    """Random words, trimmed to about `tokens` tokens of the model's tokenizer."""
    rng = random.Random(seed)
    words = [w for w in re.findall(r"[a-z]{3,}", Path(__file__).read_text()) if len(w) < 12]
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    text = ""
    while len(tok.encode(text).ids) < tokens:
        text += " ".join(rng.choice(words) for _ in range(64)) + ". "
    ids = tok.encode(text).ids[:tokens]
    return tok.decode(ids)


def run(model: Path, prompt: str, new_tokens: int, cache_dir: Path | None, threads: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "minillm",
        "generate",
        "--model",
        str(model),
        "--json",
        "-n",
        str(new_tokens),
        "-t",
        "0",
        prompt,
    ]
    if cache_dir is not None:
        cmd[4:4] = ["--cache-dir", str(cache_dir)]
    env = {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"minillm failed:\n{done.stderr[-2000:]}")
    c = json.loads(done.stdout.strip().splitlines()[-1])
    result = {
        "wall_s": wall,
        "ttft_s": c["ttft_s"],
        "end_to_end_s": c["ttft_s"] + c["timings"]["decode_s"],
        "prompt_tokens": c["prompt_tokens"],
        "cached_tokens": c["cached_tokens"],
        "token_ids": c["token_ids"],
    }
    disk = re.search(r"(\d+) tokens read in ([\d.]+) s, (\d+) written in ([\d.]+) s", done.stderr)
    if disk:
        result |= {
            "read_tokens": int(disk[1]),
            "read_s": float(disk[2]),
            "written_tokens": int(disk[3]),
            "write_s": float(disk[4]),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    doc = document(args.model, args.doc_tokens, seed=0)
    questions = [doc + " Question: what is the first word?", doc + " Question: and what is the last one?"]
    rounds = []
    for i in range(args.rounds):
        if i % 2:  # alternate which comes first, so that drift in the machine's speed does not favour one
            plain = run(args.model, questions[0], args.new_tokens, None, args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            cold = run(args.model, questions[0], args.new_tokens, Path(tmp), args.threads)
            second = run(args.model, questions[1], args.new_tokens, Path(tmp), args.threads)
        if not i % 2:
            plain = run(args.model, questions[0], args.new_tokens, None, args.threads)
        assert cold["token_ids"] == plain["token_ids"], "the disk tier changed the output"
        r = {
            "cold": cold,
            "second": second,
            "no_disk": plain,
            "ttft_speedup": cold["ttft_s"] / second["ttft_s"],
            "write_share_of_request": cold["write_s"] / cold["end_to_end_s"],
            "cold_wall_over_no_disk": cold["wall_s"] / plain["wall_s"],
        }
        rounds.append(r)
        print(
            f"round {i + 1}: prompt {cold['prompt_tokens']} tokens; ttft cold {cold['ttft_s']:.2f} s, second "
            f"{second['ttft_s']:.3f} s ({second['cached_tokens']} cached, read in {second['read_s']:.3f} s) = "
            f"{r['ttft_speedup']:.1f}x; writing {cold['written_tokens']} tokens took {cold['write_s']:.3f} s = "
            f"{r['write_share_of_request']:.1%} of the cold request ({cold['end_to_end_s']:.2f} s); process wall "
            f"cold {cold['wall_s']:.1f} s, no-disk {plain['wall_s']:.1f} s, second {second['wall_s']:.1f} s",
            flush=True,
        )
    summary = {
        k: statistics.median(r[k] for r in rounds)
        for k in ("ttft_speedup", "write_share_of_request", "cold_wall_over_no_disk")
    }
    print("medians: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if args.out:
        for r in rounds:
            for run_ in ("cold", "second", "no_disk"):
                r[run_].pop("token_ids")
        args.out.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "doc_tokens": args.doc_tokens,
                    "new_tokens": args.new_tokens,
                    "threads": args.threads,
                    "medians": summary,
                    "rounds": rounds,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
