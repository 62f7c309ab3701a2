"""What the HTTP layer costs: the same workload through `python -m minillm serve` and in-process.

    python tools/bench_http.py --model /tmp/qwen05-bf16 --out bench/http_bf16.json   # ~4 min

Workload: R requests (a shared prefix of P tokens and a distinct question of Q tokens, O output tokens,
greedy), all in flight at once (concurrency = max_batch). Through HTTP: one client thread per request, the
official openai client, streaming, against a server this script starts on 127.0.0.1 and stops. In-process:
llm.generate(list of prompts) on an engine configured the same way. Rounds alternate the two, each round
with fresh prompts (so the prefix cache helps both alike: the shared prefix is warmed once per round) and
the throughput ratio is taken round by round.
"""

from __future__ import annotations

import argparse
import http.client
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_decode import write_report  # noqa: E402

from minillm import LLM  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def start_server(args, port: int) -> subprocess.Popen:
    flags = ["--dtype", args.dtype] if args.dtype else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "minillm",
            "serve",
            "--model",
            args.model,
            "--port",
            str(port),
            "--served-model-name",
            "bench",
            "--max-batch",
            str(args.requests),
            *flags,
        ],
        cwd=ROOT,
        stderr=open(args.server_log, "w") if args.server_log else subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if healthy(port):
            return proc
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def workload(rng: random.Random, args) -> list[list[int]]:
    prefix = [rng.randrange(1000, 150000) for _ in range(args.prefix)]
    return [prefix + [rng.randrange(1000, 150000) for _ in range(args.question)] for _ in range(args.requests)]


def over_http(client, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    def one(prompt):
        stream = client.completions.create(
            model="bench",
            prompt=prompt,
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [c for c in stream][-1].usage.completion_tokens

    client.completions.create(model="bench", prompt=prompts[0][:-1], max_tokens=1)  # warm the shared prefix
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(one, prompts))
    return time.perf_counter() - start, tokens


def in_process(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    llm.generate(prompts[0][:-1], max_new_tokens=1)  # warm the shared prefix
    start = time.perf_counter()
    out = llm.generate(prompts, max_new_tokens=new_tokens, temperature=0)
    return time.perf_counter() - start, sum(len(c.token_ids) for c in out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--question", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--server-log", type=Path, help="write the server's stderr here")
    args = parser.parse_args()
    import openai

    port = free_port()
    server = start_server(args, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    llm = LLM.load(args.model, dtype=args.dtype, max_batch=args.requests)
    rng = random.Random(0)
    rows = []
    try:
        for r in range(args.rounds):
            for name in ("http", "in_process") if r % 2 == 0 else ("in_process", "http"):
                prompts = workload(rng, args)
                seconds, tokens = (
                    over_http(client, prompts, args.new_tokens)
                    if name == "http"
                    else in_process(llm, prompts, args.new_tokens)
                )
                rows.append(
                    {
                        "round": r,
                        "mode": name,
                        "seconds": round(seconds, 3),
                        "output_tokens": tokens,
                        "output_tok_s": round(tokens / seconds, 2),
                    }
                )
                print(rows[-1], flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    ratios = []
    for r in range(args.rounds):
        by_mode = {row["mode"]: row["output_tok_s"] for row in rows if row["round"] == r}
        ratios.append(by_mode["http"] / by_mode["in_process"])
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "requests": args.requests,
        "prefix_tokens": args.prefix,
        "question_tokens": args.question,
        "new_tokens": args.new_tokens,
        "rounds": rows,
        "http_over_in_process": [round(x, 3) for x in ratios],
        "median": round(statistics.median(ratios), 3),
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
