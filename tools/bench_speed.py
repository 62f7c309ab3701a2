"""Prefill and decode speed of minillm, side by side with transformers, against the memory-bandwidth bound.

    python tools/make_bench_checkpoint.py /tmp/qwen-0.5b-shape
    python tools/bench_speed.py --model /tmp/qwen-0.5b-shape --out bench_speed.json

For each dtype: prefill tokens/s on 512- and 2,048-token prompts, decode tokens/s for 64 tokens after a
128-token prompt, for minillm and (when installed) transformers on the same checkpoint, runs interleaved,
best of --repeats; minillm also with --no-prepack weights (plain F.linear), to show what prepacking does.
Decoding one token reads every weight once, so memory bandwidth bounds its speed: bound = read bandwidth
/ weight bytes. The bandwidth is probed in every round of decode runs (it drifts on a shared machine), and
each engine's share of the bound is taken round by round.
Also: resident memory of a fresh process before and after loading, and KV bytes per token.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm import LLM  # noqa: E402
from minillm.cache.kv_pool import kv_bytes_per_token  # noqa: E402
from minillm.loading.prepack import PackedLinear  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_bandwidth_gbs(size_mb: int = 1024, repeats: int = 7) -> float:
    """Read bandwidth: sum a buffer far larger than the caches (every byte read once), median of repeats
    (a shared machine gives the odd run far off either way)."""
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.nbytes / sorted(times)[repeats // 2] / 1e9


def weight_bytes(llm: LLM) -> int:
    """Bytes of weights one decode step reads: every matrix once. The embedding table is not among them
    (a step reads one row of it) unless it is also the output projection (tied, not prepacked)."""
    model = llm.model
    embed = model.model.embed_tokens.weight
    total = sum(p.nbytes for p in model.parameters() if p is not embed)  # norms, biases, plain matrices
    total += sum(m.weight_bytes for m in model.modules() if isinstance(m, PackedLinear))  # opaque tensors
    if getattr(model.lm_head, "weight", None) is embed:
        total += embed.nbytes
    return total


def ours_prefill(llm: LLM, prompt: list[int]) -> float:
    c = llm.generate(prompt, max_new_tokens=1, temperature=0, use_prefix_cache=False)
    return len(prompt) / c.prefill_s


def ours_decode(llm: LLM, prompt: list[int], new: int) -> float:
    c = llm.generate(prompt, max_new_tokens=new, temperature=0, use_prefix_cache=False)
    assert len(c.token_ids) == new
    return c.decode_tok_s


def hf_prefill(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        return len(prompt) / (time.perf_counter() - start)


def hf_decode(model, prompt: list[int], new: int) -> float:
    """Decode tok/s: time of generate(new tokens) minus generate(1 token), over new - 1 steps."""
    ids = torch.tensor([prompt])
    args = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **args)
        one = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **args)
        many = time.perf_counter() - start
    return (new - 1) / (many - one)


def rss_of_load(model: str, dtype: str) -> tuple[int, int]:
    """(resident bytes before loading, peak resident bytes after) of a fresh process that only imports
    minillm and loads the model. The difference is what loading costs; the rest is Python and torch.
    Read from /proc/self/status: getrusage's ru_maxrss would include this (parent) process's peak."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
        "from pathlib import Path; from minillm import LLM\n"
        "def kib(key): return next(l.split()[1] for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(key))\n"  # noqa: E501
        f"before = kib('VmHWM:'); LLM.load({model!r}, dtype={dtype!r}); print(before, kib('VmHWM:'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = (int(n) * 1024 for n in out.stdout.split())
    return before, after


def interleaved(names: list[str], measure, repeats: int) -> dict[str, list[float]]:
    """Run measure(name) for each name, repeats times, rotating the order each round so that no engine
    always runs first (or right after the same one) on a machine whose speed drifts."""
    results = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            results[name].append(measure(name))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (see tools/make_bench_checkpoint.py)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--prefill-lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="minillm only")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        transformers = None
    use_hf = transformers is not None and not args.no_transformers
    results = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "transformers": transformers.__version__ if use_hf else None,
        "model": str(args.model),
        "runs": {},
    }
    g = torch.Generator().manual_seed(0)
    for name in args.dtypes:
        dtype = DTYPES[name]
        # minillm as it runs by default (prepacked weights), minillm with plain F.linear, and transformers.
        llms = {
            "minillm": LLM.load(args.model, dtype=dtype),
            "minillm_no_prepack": LLM.load(args.model, dtype=dtype, prepack=False),
        }
        for llm in llms.values():
            llm.defaults.eos_token_ids = []
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval() if use_hf else None
        engines = list(llms) + (["transformers"] if hf is not None else [])

        def prefill(engine: str) -> float:
            return hf_prefill(hf, prompt) if engine == "transformers" else ours_prefill(llms[engine], prompt)

        def decode(engine: str) -> float:
            if engine == "read_bandwidth":  # probed between the runs, under the same conditions
                return read_bandwidth_gbs()
            return hf_decode(hf, prompt, 64) if engine == "transformers" else ours_decode(llms[engine], prompt, 64)

        row: dict = {"weight_bytes": weight_bytes(llms["minillm"])}
        for length in args.prefill_lengths:
            prompt = torch.randint(1000, 150000, (length,), generator=g).tolist()
            row[f"prefill_{length}"] = summarize(interleaved(engines, prefill, args.repeats))
            print(f"{name} prefill {length}: {row[f'prefill_{length}']}", file=sys.stderr, flush=True)
        prompt = torch.randint(1000, 150000, (128,), generator=g).tolist()
        runs = interleaved(engines + ["read_bandwidth"], decode, args.repeats)
        bandwidths = runs.pop("read_bandwidth")
        result = summarize(runs, decimals=2)
        # The machine's bandwidth drifts (other tenants), so each round's speeds are set against the
        # bandwidth probed in that same round: share = tok/s x weight bytes / bandwidth.
        result["read_bandwidth_GBs"] = [round(b, 1) for b in bandwidths]
        for engine, speeds in runs.items():
            shares = [tok_s * row["weight_bytes"] / (b * 1e9) for tok_s, b in zip(speeds, bandwidths)]
            result[engine]["tok_s_per_round"] = [round(v, 2) for v in speeds]
            result[engine]["share_of_bound_per_round"] = [round(v, 3) for v in shares]
            result[engine]["share_of_bound"] = round(max(shares), 3)
        row["decode_64_after_128"] = result
        print(f"{name} decode: {result}", file=sys.stderr, flush=True)
        cfg = llms["minillm"].config
        row["kv_bytes_per_token"] = kv_bytes_per_token(cfg, dtype)
        assert row["kv_bytes_per_token"] == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        llms.clear()  # free their memory before the next dtype
        hf = None
        before, peak = rss_of_load(str(args.model), name)
        row["rss_before_load_bytes"], row["peak_rss_after_load_bytes"] = before, peak
        row["load_rss_over_weights"] = round((peak - before) / row["weight_bytes"], 3)
        row["peak_rss_over_weights"] = round(peak / row["weight_bytes"], 3)
        print(
            f"{name} load: peak RSS {peak / 2**20:.0f} MiB, {before / 2**20:.0f} MiB of it before loading; "
            f"loading added {row['load_rss_over_weights']}x the weights",
            file=sys.stderr,
            flush=True,
        )
        results["runs"][name] = row
    results["machine"]["bench_process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def summarize(runs: dict[str, list[float]], decimals: int = 1) -> dict:
    """Best of the repeats per engine (the least disturbed run), and minillm's ratio to each other engine."""
    best = {engine: max(values) for engine, values in runs.items()}
    out = {engine: {"tok_s": round(value, decimals)} for engine, value in best.items()}
    for engine in best:
        if engine != "minillm":
            out[f"minillm_over_{engine}"] = round(best["minillm"] / best[engine], 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
