"""Prefill and decode speed of minillm, side by side with transformers, against the memory-bandwidth bound.

    python tools/make_bench_checkpoint.py /tmp/qwen-0.5b-shape
    python tools/bench_speed.py --model /tmp/qwen-0.5b-shape --out bench_speed.json

For each dtype: prefill tokens/s on 512- and 2,048-token prompts, decode tokens/s for 64 tokens after a
128-token prompt, for minillm and (when installed) transformers on the same checkpoint, runs interleaved,
best of --repeats. Decoding one token reads every weight once, so memory bandwidth bounds its speed:
bound = measured read bandwidth / weight bytes; the share of the bound each engine reaches is reported.
Also: peak resident memory right after loading (measured in a fresh process) and KV bytes per token.
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
from minillm.kv_cache import KVCache  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Best-of read bandwidth: sum a buffer far larger than the caches (every byte read once)."""
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def weight_bytes(llm: LLM) -> int:
    """Bytes of weights one decode step reads: every matrix once (a tied embedding once, as lm_head)."""
    seen, total = set(), 0
    for p in llm.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.nbytes
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


def peak_rss_after_load(model: str, dtype: str) -> int:
    """Peak resident set size (bytes) of a fresh process that only loads the model."""
    code = (f"import resource, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            f"from minillm import LLM; LLM.load({model!r}, dtype={dtype!r}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024  # Linux reports KiB


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
    bandwidth = read_bandwidth_gbs()
    results = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "read_bandwidth_GBs": round(bandwidth, 1)},
               "transformers": transformers.__version__ if use_hf else None, "model": str(args.model), "runs": {}}
    print(f"read bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    for name in args.dtypes:
        dtype = DTYPES[name]
        llm = LLM.load(args.model, dtype=dtype)
        llm.defaults.eos_token_ids = []
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval() if use_hf else None
        row: dict = {"weight_bytes": weight_bytes(llm)}
        row["bound_decode_tok_s"] = round(bandwidth * 1e9 / row["weight_bytes"], 1)
        for length in args.prefill_lengths:
            prompt = torch.randint(1000, 150000, (length,), generator=g).tolist()
            ours, theirs = [], []
            for r in range(args.repeats):
                if r % 2 == 0:
                    ours.append(ours_prefill(llm, prompt))
                    if hf is not None:
                        theirs.append(hf_prefill(hf, prompt))
                else:
                    if hf is not None:
                        theirs.append(hf_prefill(hf, prompt))
                    ours.append(ours_prefill(llm, prompt))
            row[f"prefill_{length}"] = {"minillm_tok_s": round(max(ours), 1)}
            if theirs:
                row[f"prefill_{length}"].update(transformers_tok_s=round(max(theirs), 1),
                                                ratio=round(max(ours) / max(theirs), 2))
            print(f"{name} prefill {length}: {row[f'prefill_{length}']}", file=sys.stderr, flush=True)
        prompt = torch.randint(1000, 150000, (128,), generator=g).tolist()
        ours, theirs = [], []
        for r in range(args.repeats):
            ours.append(ours_decode(llm, prompt, 64))
            if hf is not None:
                theirs.append(hf_decode(hf, prompt, 64))
        decode = {"minillm_tok_s": round(max(ours), 2),
                  "minillm_share_of_bound": round(max(ours) / row["bound_decode_tok_s"], 3)}
        if theirs:
            decode.update(transformers_tok_s=round(max(theirs), 2), ratio=round(max(ours) / max(theirs), 2),
                          transformers_share_of_bound=round(max(theirs) / row["bound_decode_tok_s"], 3))
        row["decode_64_after_128"] = decode
        print(f"{name} decode: {decode} (bound {row['bound_decode_tok_s']} tok/s)", file=sys.stderr, flush=True)
        row["kv_bytes_per_token"] = KVCache(llm.config, 0, dtype, "meta").bytes_per_token()
        cfg = llm.config
        assert row["kv_bytes_per_token"] == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        del llm, hf
        rss = peak_rss_after_load(str(args.model), name)
        row["peak_rss_after_load_bytes"] = rss
        row["peak_rss_over_weights"] = round(rss / row["weight_bytes"], 3)
        print(f"{name} peak RSS after load: {rss / 2**20:.0f} MiB ({row['peak_rss_over_weights']}x weights)",
              file=sys.stderr, flush=True)
        results["runs"][name] = row
    results["machine"]["bench_process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
