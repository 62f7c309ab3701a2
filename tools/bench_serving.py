"""Serving benchmark: throughput and latency of any OpenAI-compatible server under concurrent load.

    python -m minillm serve --model /tmp/serve-bf16 --port 8000 &
    python tools/bench_serving.py --base-url http://127.0.0.1:8000 --tokenizer /tmp/serve-bf16 \\
        --workload shared-prefix --max-concurrency 1,4,8 --out sweep.json --plot sweep.png

The client is the standard library only (one thread per request in flight, streaming over http.client), so
the same run can measure minillm's server and a peer's (tools/bench_serving_compare.py starts both).

Workloads (every prompt drawn from --seed; text made of whole-word tokens of the model's tokenizer, so
it tokenizes back to the counts asked for):
- shared-prefix: G groups x P prompts; each group shares a prefix of L tokens and each prompt adds a question
  of Q tokens (SGLang's generated-shared-prefix benchmark). Requests are sent in a shuffled order.
- rag: D documents of L tokens, each asked P questions of Q tokens ("Document: ... Question: ..."), shuffled.
- chat: G conversations x T turns; a turn adds a user message of Q tokens and the prompt is the whole
  conversation so far (earlier replies included), so each turn extends the previous turn's prompt. A
  conversation's turns go one after another; conversations run concurrently.
- random: G x P prompts of L/2..L tokens with nothing in common.
Every request asks for O output tokens, greedy, with `ignore_eos` (an extension minillm, vLLM, SGLang and
llama-server accept) so each produces exactly O.

Arrivals: a closed loop of --max-concurrency requests (or conversations) in flight, optionally paced by
Poisson arrivals at --request-rate per second (seeded). A comma-separated --max-concurrency sweeps; each
level gets fresh prompts (seed + level index), so an earlier level's cache does not help a later one.

Metrics, as SGLang's and vLLM's serving benchmarks report them: duration, completed and failed requests,
request / input / output token throughput, time to first token (TTFT), time per output token after the
first (TPOT), inter-token latency (ITL, between streamed chunks) and end-to-end latency, each as mean,
median, p90 and p99 (milliseconds), and the cache hit rate: the sum of
`usage.prompt_tokens_details.cached_tokens` over the sum of prompt tokens.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tokenizers import Tokenizer

WORKLOADS = ("shared-prefix", "rag", "chat", "random")


# -- prompts ------------------------------------------------------------------------------------------------


class Words:
    """Random text whose token count is known: words that are one token each, with their leading space.
    A tokenizer with too few such words (a test's tiny one) gets made-up 3-letter words instead, and the
    counts become approximate (the servers' usage still reports the true ones)."""

    def __init__(self, tokenizer: Tokenizer, rng: random.Random):
        vocab = tokenizer.get_vocab()
        words = sorted(t for t in vocab if re.fullmatch(r"Ġ[a-z]{3,10}", t))  # byte-level BPE: Ġ is a space
        # keep only words that encode back to themselves alone (a few merge differently in context)
        self.words = [w[1:] for w in words if len(tokenizer.encode(" " + w[1:] + " " + w[1:]).ids) == 2]
        if len(self.words) < 100:
            letters = "abcdefghijklmnopqrstuvwxyz"
            self.words = sorted({a + b + c for a in letters[:8] for b in "aeiou" for c in letters[10:18]})
        self.rng = rng

    def text(self, tokens: int) -> str:
        return " ".join(self.rng.choice(self.words) for _ in range(tokens))


@dataclass
class Item:
    """One unit of work for a client thread: a single prompt, or a conversation's turns."""

    prompts: list[str]  # one prompt, or one user message per turn
    conversation: bool = False


def build_workload(name: str, args, tokenizer: Tokenizer, seed: int) -> list[Item]:
    rng = random.Random(seed)
    words = Words(tokenizer, rng)
    G, P, L, Q = args.groups, args.prompts_per_group, args.prefix_len, args.question_len
    if name == "shared-prefix":
        prefixes = [words.text(L) for _ in range(G)]
        items = [Item([prefix + "\nQuestion:" + words.text(Q)]) for prefix in prefixes for _ in range(P)]
    elif name == "rag":
        documents = [words.text(L) for _ in range(G)]
        items = [
            Item([f"Answer from the document.\nDocument:{doc}\nQuestion:{words.text(Q)}\nAnswer:"])
            for doc in documents
            for _ in range(P)
        ]
    elif name == "chat":
        return [Item([words.text(Q) for _ in range(args.turns)], conversation=True) for _ in range(G)]
    else:
        items = [Item([words.text(rng.randint(L // 2, L))]) for _ in range(G * P)]
    rng.shuffle(items)
    return items


# -- one request ----------------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first text
    e2e: float = 0.0  # seconds from sending to the last byte
    itl: list[float] = field(default_factory=list)  # seconds between streamed chunks with text
    text: str = ""


class Client:
    def __init__(
        self, base_url: str, endpoint: str, model: str | None, output_len: int, timeout: float, tokenizer: Tokenizer
    ):
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme != "http" or not url.hostname:
            raise SystemExit(f"bench_serving: --base-url must look like http://127.0.0.1:8000, got {base_url!r}")
        self.host, self.port, self.root = url.hostname, url.port or 80, url.path.removesuffix("/v1")
        self.endpoint, self.output_len, self.timeout, self.tokenizer = endpoint, output_len, timeout, tokenizer
        self.model = model or self.first_model()

    def first_model(self) -> str:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request("GET", self.root + "/v1/models")
            return json.loads(connection.getresponse().read())["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise SystemExit(
                f"bench_serving: no model list at {self.host}:{self.port}{self.root}/v1/models ({e}); is the server up?"
            ) from None
        finally:
            connection.close()

    def body(self, prompt: str | list[dict]) -> dict:
        body = {
            "model": self.model,
            "max_tokens": self.output_len,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if self.endpoint == "chat":
            body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def send(self, prompt: str | list[dict]) -> Result:
        path = self.root + ("/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions")
        result, pieces = Result(), []
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        start = last = time.perf_counter()
        try:
            connection.request("POST", path, json.dumps(self.body(prompt)), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                result.error = f"HTTP {response.status}: {response.read()[:200]!r}"
                return result
            usage = None
            while line := response.readline():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        now = time.perf_counter()
                        if not pieces:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        pieces.append(piece)
            result.e2e = time.perf_counter() - start
            result.text = "".join(pieces)
            if usage:
                result.prompt_tokens = usage.get("prompt_tokens", 0)
                result.output_tokens = usage.get("completion_tokens", 0)
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            else:  # a server that does not report usage: count what came back
                result.output_tokens = len(self.tokenizer.encode(result.text).ids)
            result.ok = bool(pieces)
            if not result.ok:
                result.error = "no text came back"
        except (OSError, ValueError, http.client.HTTPException) as e:
            result.error = f"{type(e).__name__}: {e}"
        finally:
            connection.close()
        return result

    def run(self, item: Item) -> list[Result]:
        if not item.conversation:
            return [self.send(item.prompts[0])]
        results, history = [], ""
        messages: list[dict] = []
        for message in item.prompts:
            if self.endpoint == "chat":
                messages.append({"role": "user", "content": message})
                result = self.send(list(messages))
                messages.append({"role": "assistant", "content": result.text})
            else:
                history += f"User:{message}\nAssistant:"
                result = self.send(history)
                history += result.text + "\n"
            results.append(result)
            if not result.ok:
                break
        return results


# -- a run --------------------------------------------------------------------------------------------------


def run_load(
    client: Client,
    items: list[Item],
    concurrency: int,
    request_rate: float,
    seed: int,
    progress: bool = True,
    deadline_s: float = 3600,
) -> tuple[list[Result], float]:
    """Send every item with at most `concurrency` in flight; returns the results and the duration (s)."""
    rng = random.Random(seed)
    results: list[Result] = []
    lock = threading.Lock()
    total = sum(len(item.prompts) for item in items)
    stop_at = time.monotonic() + deadline_s

    def work(item: Item) -> None:
        if time.monotonic() > stop_at:
            out = [Result(error="benchmark deadline passed")]
        else:
            out = client.run(item)
        with lock:
            results.extend(out)
            if progress:
                done = len(results)
                bar = "#" * (30 * done // total)
                print(f"\r  [{bar:<30}] {done}/{total} requests", end="", file=sys.stderr, flush=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for item in items:
            if request_rate != float("inf"):
                time.sleep(rng.expovariate(request_rate))
            pool.submit(work, item)
    duration = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    return results, duration


def percentiles(values: list[float]) -> dict:
    """mean, median, p90, p99 in milliseconds (linear interpolation between ranks)."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    v = sorted(values)

    def at(q: float) -> float:
        x = q * (len(v) - 1)
        lo = int(x)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (x - lo)

    return {
        "mean": round(1000 * sum(v) / len(v), 2),
        "median": round(1000 * at(0.5), 2),
        "p90": round(1000 * at(0.9), 2),
        "p99": round(1000 * at(0.99), 2),
    }


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "duration_s": round(duration, 3),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "request_throughput": round(len(ok) / duration, 4),
        "input_token_throughput": round(prompt / duration, 2),
        "output_token_throughput": round(output / duration, 2),
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "cache_hit_rate": round(sum(r.cached_tokens for r in ok) / prompt, 4) if prompt else None,
        "mean_concurrency": round(sum(r.e2e for r in ok) / duration, 2),
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in ok]),
        "ttft_samples_ms": sorted(round(1000 * r.ttft, 1) for r in ok),
        "e2e_samples_ms": sorted(round(1000 * r.e2e, 1) for r in ok),
    }


def benchmark(args, tokenizer: Tokenizer, workload: str, concurrency: int, seed: int, progress: bool = True) -> dict:
    """One workload at one concurrency against args.base_url: the summary plus what was run."""
    client = Client(args.base_url, args.endpoint, args.model_name, args.output_len, args.timeout, tokenizer)
    client.send("Warm up." if args.endpoint == "completions" else [{"role": "user", "content": "Warm up."}])
    items = build_workload(workload, args, tokenizer, seed)
    results, duration = run_load(client, items, concurrency, args.request_rate, seed, progress, args.deadline)
    return {
        "workload": workload,
        "endpoint": args.endpoint,
        "max_concurrency": concurrency,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "seed": seed,
        **summarize(results, duration),
    }


def report(run: dict, label: str = "") -> str:
    t, e = run["ttft_ms"], run["e2e_ms"]
    arrivals = f"c={run['max_concurrency']}" + (f" Poisson {run['request_rate']}/s" if run["request_rate"] else "")
    return (
        f"{label}{run['workload']} {arrivals}: {run['completed']} ok, {run['failed']} failed "
        f"in {run['duration_s']:.1f} s; output {run['output_token_throughput']:.1f} tok/s, "
        f"input {run['input_token_throughput']:.0f} tok/s; TTFT median {t['median']} ms p99 {t['p99']} ms; "
        f"TPOT median {run['tpot_ms']['median']} ms; E2E median {e['median']} ms; "
        f"cache hit {run['cache_hit_rate']}"
    )


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Output throughput against concurrency (one line per label), and TTFT / end-to-end latency CDFs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_serving: matplotlib is not installed (pip install -e '.[bench]'); no chart", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series: dict[str, list[dict]] = {}
    for run in runs:
        series.setdefault(run.get("label") or run["workload"], []).append(run)
    for label, group in series.items():
        group = sorted(group, key=lambda r: r["max_concurrency"])
        axes[0].plot(
            [r["max_concurrency"] for r in group],
            [r["output_token_throughput"] for r in group],
            marker="o",
            label=label,
        )
        for ax, key in ((axes[1], "ttft_samples_ms"), (axes[2], "e2e_samples_ms")):
            for r in group:
                samples = r[key]
                name = label if len(group) == 1 else f"{label} c={r['max_concurrency']}"
                ax.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], label=name)
    axes[0].set(xlabel="max concurrency", ylabel="output tokens / s", title="throughput")
    axes[1].set(xlabel="ms", ylabel="fraction of requests", title="time to first token (CDF)", xscale="log")
    axes[2].set(xlabel="ms", ylabel="fraction of requests", title="end-to-end latency (CDF)", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="a model folder (or tokenizer.json) whose tokenizer counts the tokens",
    )
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--groups", type=int, default=8, help="groups / documents / conversations (default 8)")
    parser.add_argument("--prompts-per-group", type=int, default=8, help="prompts per group or document (default 8)")
    parser.add_argument("--prefix-len", type=int, default=1024, help="shared prefix / document tokens (default 1024)")
    parser.add_argument("--question-len", type=int, default=64, help="question / chat message tokens (default 64)")
    parser.add_argument("--turns", type=int, default=6, help="chat turns per conversation (default 6)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (default inf: a closed loop at --max-concurrency)",
    )
    parser.add_argument("--model-name", help="the model field to send (default: the server's first /v1/models id)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take (default 600)")
    parser.add_argument(
        "--deadline", type=float, default=3600, help="seconds after which no more requests start (default 3600)"
    )
    parser.add_argument("--seed", type=int, default=0)


def load_tokenizer(path: Path) -> Tokenizer:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"bench_serving: no tokenizer at {file}; pass --tokenizer MODEL_FOLDER")
    return Tokenizer.from_file(str(file))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--workload", choices=WORKLOADS, default="shared-prefix")
    parser.add_argument("--max-concurrency", default="8", help="requests in flight; a comma list sweeps (default 8)")
    parser.add_argument("--label", default="", help="name for this server in the JSON and the chart")
    parser.add_argument("--out", type=Path, help="write the runs as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG chart here (needs matplotlib)")
    add_workload_args(parser)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    runs = []
    for i, level in enumerate(int(c) for c in args.max_concurrency.split(",")):
        run = benchmark(args, tokenizer, args.workload, level, args.seed + i)
        run["label"] = args.label or args.workload
        print(report(run), file=sys.stderr)
        runs.append(run)
    if args.out:
        args.out.write_text(
            json.dumps(
                {"base_url": args.base_url, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1
            )
        )
    if args.plot:
        plot(runs, args.plot, f"{args.workload} against {args.base_url}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
