"""Where a decode step's time goes: the matrix products, the same products run back to back, and the rest.

    python tools/profile_step.py --model /tmp/serve-bf16 --quantize int8 [--dtype float32] [--tokens 64]

One stream decodes --tokens tokens after a 4-token prompt (no prefix cache). Every product of the decode
steps (each PackedLinear or QuantizedLinear call) is timed; then the last step's products are replayed back to
back on the same inputs. Reported per step: its time (1 / decode tokens per second); the time in products and
their read rate (weight bytes / time); the replay's time (the products without the rest of the step between
them: the gap is the in-step slowdown, e.g. threads that sleep between products); and the rest (norms, RoPE,
attention, sampling, Python): step - products.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import machine_kind, write_report  # noqa: E402

from minillm import LLM  # noqa: E402
from minillm.kernels import compiled  # noqa: E402
from minillm.loading.prepack import PackedLinear  # noqa: E402
from minillm.loading.quantize import QuantizedLinear  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    llm = LLM.load(args.model, dtype=args.dtype, quantize=args.quantize)
    llm.defaults.eos_token_ids = []
    layers = [m for m in llm.model.modules() if isinstance(m, (PackedLinear, QuantizedLinear))]
    calls: list[tuple[torch.nn.Module, torch.Tensor, float]] = []

    def timed(module, forward):
        def run(x):
            start = time.perf_counter()
            y = forward(x)
            calls.append((module, x, time.perf_counter() - start))
            return y

        return run

    for m in layers:
        m.forward = timed(m, m.forward)
    prompt = list(range(1000, 1004))
    llm.generate(prompt, max_new_tokens=4, temperature=0, use_prefix_cache=False)  # first-use costs
    calls.clear()
    c = llm.generate(prompt, max_new_tokens=args.tokens, temperature=0, use_prefix_cache=False)
    per_step = len(calls) // args.tokens  # forwards: the prompt's, then one per new token but the last
    decode_calls = calls[per_step:]
    step_ms = 1e3 / c.decode_tok_s
    products_ms = sum(t for _, _, t in decode_calls) / (args.tokens - 1) * 1e3
    step_calls = decode_calls[-per_step:]  # the last step's products, in order
    for m in layers:
        del m.forward  # the class's own forward again
    replay = []
    for _ in range(5):
        start = time.perf_counter()
        for m, x, _ in step_calls:
            m(x)
        replay.append(time.perf_counter() - start)
    weight_bytes = sum(m.weight_bytes for m in layers)
    report = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "cpu": machine_kind()},
        "model": args.model,
        "dtype": str(llm.dtype),
        "weight_form": llm.model.weight_form,
        "compiled_kernels": compiled.available(),
        "decode_tok_s": round(c.decode_tok_s, 2),
        "step_ms": round(step_ms, 2),
        "products_ms": round(products_ms, 2),
        "products_GBs": round(weight_bytes / products_ms / 1e6, 1),
        "products_back_to_back_ms": round(min(replay) * 1e3, 2),
        "rest_ms": round(step_ms - products_ms, 2),
        "products_per_step": per_step,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
