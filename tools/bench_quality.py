"""What quantization costs in quality: held-out loss (nats per token) of one model in each mode.

    python tools/bench_quality.py --out bench/quality.json        # the bundled model, ~2 min

Text: the bundled model's held-out split (tools/train_tiny.py: the standard-library files that training
never saw, chosen by a hash of their names), cut into windows of --seq-len tokens; each window's mean
next-token cross-entropy, averaged over up to --windows windows. Every mode reads the same windows and
runs the same engine code (LLM.logits), so the differences are the weights' and the arithmetic's.
Modes: float32 and bfloat16 as loaded, then int8 and int4 (group 32) with each as activation dtype. Each
quantized mode is measured twice: weight-only (every product of a 256-token window takes the dense path,
activations as they are) and as decode computes (every product forced through the compiled kernels, which
quantize the activations to int8 per block of 32), so the second row's delta is what activation
quantization costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import write_report  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from train_tiny import corpus_files, encode_all, read_texts, split_corpus  # noqa: E402

from minillm import LLM  # noqa: E402
from minillm.kernels import compiled  # noqa: E402
from minillm.loading import quantize as quantization  # noqa: E402

MODES = [
    ("float32", None),
    ("bfloat16", None),
    ("bfloat16", "int8"),
    ("bfloat16", "int4"),
    ("float32", "int8"),
    ("float32", "int4"),
]


def held_out_windows(model_dir: Path, seq_len: int, windows: int) -> list[list[int]]:
    _, held = split_corpus(corpus_files())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = encode_all(tokenizer, read_texts(held)).tolist()
    return [ids[s : s + seq_len + 1] for s in range(0, len(ids) - seq_len - 1, seq_len)][:windows]


@torch.inference_mode()
def held_out_loss(llm: LLM, windows: list[list[int]]) -> float:
    losses = [F.cross_entropy(llm.logits(w[:-1]), torch.tensor(w[1:])).item() for w in windows]
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "weights",
        help="a checkpoint trained by tools/train_tiny.py (default: the bundled model)",
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    windows = held_out_windows(args.model, args.seq_len, args.windows)
    rows = []
    for dtype, quantize in MODES:
        llm = LLM.load(args.model, dtype=dtype, quantize=quantize, group_size=args.group_size)
        ways = ["as they are"] + (["int8 per block of 32"] if quantize and compiled.available() else [])
        for activations in ways:
            dense_from = quantization.DENSE_FROM_ROWS
            if activations != "as they are":
                quantization.DENSE_FROM_ROWS = sys.maxsize  # every product through the kernels
            try:
                loss = held_out_loss(llm, windows)
            finally:
                quantization.DENSE_FROM_ROWS = dense_from
            rows.append(
                {
                    "dtype": dtype,
                    "quantize": quantize or "none",
                    "activations": activations,
                    "weights": llm.model.weight_form,
                    "held_out_loss_nats_per_token": round(loss, 5),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    base = {r["dtype"]: r["held_out_loss_nats_per_token"] for r in rows if r["quantize"] == "none"}
    weight_only = {
        (r["dtype"], r["quantize"]): r["held_out_loss_nats_per_token"]
        for r in rows
        if r["activations"] == "as they are"
    }
    for r in rows:
        if r["activations"] != "as they are":
            r["delta_vs_weight_only"] = round(
                r["held_out_loss_nats_per_token"] - weight_only[(r["dtype"], r["quantize"])], 5
            )
        r["delta_vs_unquantized_same_dtype"] = round(r["held_out_loss_nats_per_token"] - base[r["dtype"]], 5)
        r["delta_vs_bfloat16"] = round(r["held_out_loss_nats_per_token"] - base["bfloat16"], 5)
    report = {
        "model": str(args.model),
        "windows": len(windows),
        "seq_len": args.seq_len,
        "tokens": len(windows) * args.seq_len,
        "group_size": args.group_size,
        "torch": torch.__version__,
        "rows": rows,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
