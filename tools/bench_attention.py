"""Decode attention over the KV pool: gather + scaled_dot_product_attention against the in-pool kernel.

    python tools/bench_attention.py --out bench/attention.json     # ~1 min

A batched decode step attends each sequence's one new query over all its keys and values, in every layer.
They lie in the shared pool, scattered (a cached prefix in one run of slots, the request's own tokens in
another). Two ways, timed over the 24 layers of a pool shaped like Qwen2.5-0.5B's (2 kv heads of 64, 14
query heads), with 64 MB streamed between layers as a step's matrix products do, so the pool is read from
memory, not cache:

- gather: per sequence, index_select its slots into a contiguous copy and run the model's own `attend`
  (what forward_batch.py did for every row, and still does for prompt chunks and in exact mode);
- kernel: kernels/compiled.decode_attention, one call for all sequences, reading slots in place.

Reported: ms per step (all layers) for each, at --sequences sequences of --length tokens, best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import machine_kind  # noqa: E402

from minillm.kernels import compiled  # noqa: E402
from minillm.model.model import attend  # noqa: E402

LAYERS, KV_HEADS, HEADS, HEAD_DIM = 24, 2, 14, 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", default="1,8,16", help="comma list of decode rows per step")
    parser.add_argument("--length", type=int, default=1100, help="tokens per sequence (prefix 1,024 + the rest)")
    parser.add_argument("--slots", type=int, default=43690, help="pool slots (minillm's default 1 GiB at fp32)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not compiled.available():
        raise SystemExit(f"bench_attention: the compiled kernels do not run here: {compiled.unavailable_reason()}")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    keys = torch.randn(LAYERS, KV_HEADS, args.slots, HEAD_DIM).to(dtype)  # [layers, kv_heads, slots, head_dim]
    values = torch.randn(LAYERS, KV_HEADS, args.slots, HEAD_DIM).to(dtype)
    between = torch.randn(16 * 2**20)  # 64 MB, touched between layers
    results = []
    for n in [int(x) for x in args.sequences.split(",")]:
        # each sequence: a 1,024-token prefix in one run of slots, the rest of it in another run far away
        prefix = min(1024, args.length)
        slots = [
            torch.cat(
                [torch.arange(prefix) + i * prefix, torch.arange(args.length - prefix) + args.slots // 2 + i * 128]
            )
            for i in range(n)
        ]
        q = torch.randn(HEADS, n, HEAD_DIM).to(dtype)
        flat, starts = torch.cat(slots), torch.tensor([0] + [len(s) for s in slots]).cumsum(0)

        def gather(layer: int) -> torch.Tensor:
            k, v = keys[layer], values[layer]
            rows = [
                attend(q[:, i : i + 1], k.index_select(1, s), v.index_select(1, s), None, False)
                for i, s in enumerate(slots)
            ]
            return torch.cat(rows)

        def kernel(layer: int) -> torch.Tensor:
            return compiled.decode_attention(q, keys[layer], values[layer], flat, starts)

        times = {}
        for name, fn in [("gather", gather), ("kernel", kernel)] * args.repeats:
            total = 0.0
            for layer in range(LAYERS):
                between.mul_(1.0)
                start = time.perf_counter()
                fn(layer)
                total += time.perf_counter() - start
            times[name] = min(times.get(name, float("inf")), total * 1e3)
        diff = max(float((gather(i).float() - kernel(i).float()).abs().max()) for i in range(2))
        row = {"sequences": n, "length": args.length, "gather_ms": round(times["gather"], 2),
               "kernel_ms": round(times["kernel"], 2), "max_abs_difference": diff}  # fmt: skip
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "cpu": machine_kind()},
        "dtype": args.dtype,
        "layers": LAYERS,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
