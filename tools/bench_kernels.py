"""One-row matrix products, kernel by kernel, at the speed a decode step sees them: streamed from memory.

    python tools/bench_kernels.py --out bench/kernels_avx2.json        # ~4 min
    python tools/bench_kernels.py --rows 1,2,4,8,16,24,32,64,512 --out bench/kernels_rows_fp32.json   # ~5 min

With --rows: float32 products of several rows (a batched decode step; 64 and 512: prompt chunks) over the 24
layers' matrices, for the kernel every float32 PackedLinear takes where it runs (linear_f32 on its packed
layout; its AVX2 and AVX-512 variants both where the CPU has AVX-512), oneDNN (on the plain layout: what
PackedLinear ran for prompt rows before; on its own packed one) and MKL's, taking turns.

A decode step multiplies one row by each matrix of a Qwen2.5-0.5B-shaped model once: 24 layers of q/k/v
(1152 x 896, stacked), o (896 x 896), gate/up (9728 x 896, stacked) and down (896 x 4864), then the output
head (151936 x 896). Here every kernel gets 24 distinct copies of the layer matrices (more than any cache
holds) and the head, and is timed over the layers in order and over the head, best of --repeats passes; the
figure is the weight bytes read per second. Kernels (those this torch build lacks are reported as such):

- minillm's compiled kernels (kernels/matmul.cpp): `linear_f32`, `linear_bf16` (bf16 weights, float32
  activations), `linear_q8_0` and `linear_q4_1` (group 32; activations quantized per block of 32 inside);
- fp32 / bf16 `F.linear` (MKL), fp32 / bf16 oneDNN on weights reordered once (prepack.py's choices);
- PyTorch's weight-only kernels, which quantize.py used before the compiled ones: int8
  `_weight_int8pack_mm` and int4 (group 32) `_weight_int4pack_mm_for_cpu`, bf16 activations;
- not used by minillm, measured for the record: int8 x int8 `torch._int_mm`, oneDNN's `qlinear_pointwise`
  and fbgemm's dynamic int8 linear (both of which quantize the activations too).
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

from minillm.kernels import compiled  # noqa: E402
from minillm.loading.quantize import quantize_int4, quantize_int8  # noqa: E402

LAYERS = 24
LAYER_SHAPES = [(1152, 896), (896, 896), (9728, 896), (896, 4864)]  # [out, in]
HEAD_SHAPE = (151936, 896)


def int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = w.shape
    groups = w.reshape(out, inp // group, group)
    low, high = groups.amin(2), groups.amax(2)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(out, inp)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed, torch.stack([scale.t(), (low + 8 * scale).t()], 2).bfloat16().contiguous()


def onednn(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def onednn_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def fbgemm(w: torch.Tensor):
    q, scale = int8(w)
    qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None)


def qlinear(w: torch.Tensor):
    q, scale = int8(w)
    return torch.ops.onednn.qlinear_prepack(q, [1, w.shape[1]]), scale, torch.zeros(w.shape[0], dtype=torch.long)


# name -> (make(w fp32) -> prepared weight, product(x, prepared), activation dtype, bytes read per weight)
def f32_product(x: torch.Tensor, packed: torch.Tensor, width: int = 0) -> torch.Tensor:
    """linear_f32 with this CPU's default vectors (width 0), or AVX2's (256) or AVX-512's (512)."""
    return compiled.linear_f32(x, packed, packed.shape[0] * compiled.F32_BLOCK, width)  # every shape: whole blocks


KERNELS = {
    "fp32 minillm linear_f32": (compiled.pack_f32, f32_product, torch.float32, 4),
    "bf16 minillm linear_bf16": (lambda w: w.bfloat16(), compiled.linear_bf16, torch.float32, 2),
    "int8 minillm linear_q8_0": (quantize_int8, lambda x, w: compiled.linear_q8_0(x, *w), torch.float32, 1 + 2 / 32),
    "int4 minillm linear_q4_1": (
        lambda w: quantize_int4(w, 32),
        lambda x, w: compiled.linear_q4_1(x, *w),
        torch.float32,
        0.5 + 4 / 32,
    ),  # a float16 scale and minimum per 32 weights
    "fp32 F.linear (MKL)": (lambda w: w, lambda x, w: torch.nn.functional.linear(x, w), torch.float32, 4),
    "fp32 oneDNN packed": (onednn, onednn_product, torch.float32, 4),
    "bf16 F.linear (MKL)": (lambda w: w.bfloat16(), lambda x, w: torch.nn.functional.linear(x, w), torch.bfloat16, 2),
    "bf16 oneDNN packed": (lambda w: onednn(w.bfloat16()), onednn_product, torch.bfloat16, 2),
    "int8 _weight_int8pack_mm": (
        lambda w: (lambda q, s: (q, s.bfloat16()))(*int8(w)),
        lambda x, w: torch.ops.aten._weight_int8pack_mm(x, *w),
        torch.bfloat16,
        1,
    ),
    "int4 _weight_int4pack_mm_for_cpu": (
        int4,
        lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], 32, w[1]),
        torch.bfloat16,
        0.5 + 4 / 32,
    ),  # a bf16 scale and zero per 32 weights
    "int8 x int8 torch._int_mm": (lambda w: int8(w)[0].t(), torch._int_mm, torch.int8, 1),
    "int8 oneDNN qlinear_pointwise": (
        qlinear,
        lambda x, w: torch.ops.onednn.qlinear_pointwise(
            x, 0.5, 0, w[0], w[1], w[2], None, 1.0, 0, torch.float32, "none", [], ""
        ),
        torch.int8,
        1,
    ),
    "int8 fbgemm linear_dynamic": (
        fbgemm,
        lambda x, w: torch.ops.quantized.linear_dynamic(x, w, True),
        torch.float32,
        1,
    ),
}


def measure(make, product, act_dtype, bytes_per_weight: float, repeats: int) -> dict:
    torch.manual_seed(0)
    layers = [(make(torch.randn(o, i) * 0.05), i) for _ in range(LAYERS) for o, i in LAYER_SHAPES]
    head = make(torch.randn(*HEAD_SHAPE) * 0.05)
    rows = {
        i: (torch.randint(-100, 100, (1, i)) if act_dtype == torch.int8 else torch.randn(1, i)).to(act_dtype)
        for i in {i for _, i in LAYER_SHAPES}
    }

    def best(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    layer_s = best(lambda: [product(rows[i], w) for w, i in layers])
    head_s = best(lambda: product(rows[HEAD_SHAPE[1]], head))
    layer_bytes = LAYERS * sum(o * i for o, i in LAYER_SHAPES) * bytes_per_weight
    head_bytes = HEAD_SHAPE[0] * HEAD_SHAPE[1] * bytes_per_weight
    return {
        "layers_ms": round(layer_s * 1e3, 1),
        "layers_GBs": round(layer_bytes / layer_s / 1e9, 1),
        "head_ms": round(head_s * 1e3, 1),
        "head_GBs": round(head_bytes / head_s / 1e9, 1),
    }


# --rows: float32 products of several rows; name -> (make(w) -> prepared weight, product(x, prepared))
ROW_KERNELS = {
    "fp32 minillm linear_f32 AVX2": (compiled.pack_f32, lambda x, p: f32_product(x, p, 256)),
    "fp32 minillm linear_f32 AVX-512": (compiled.pack_f32, lambda x, p: f32_product(x, p, 512)),
    "fp32 oneDNN plain layout": (lambda w: w, onednn_product),
    "fp32 oneDNN packed": (onednn, onednn_product),
    "fp32 F.linear (MKL)": (lambda w: w, torch.nn.functional.linear),
}


def measure_rows(row_counts: list[int], repeats: int) -> dict:
    """ms over one copy of each layer matrix for LAYERS layers (read from memory), per row count and kernel;
    the kernels take turns within each repeat, so they meet the same machine state; best of the repeats."""
    torch.manual_seed(0)
    plain = [(torch.randn(o, i) * 0.05, i) for _ in range(LAYERS) for o, i in LAYER_SHAPES]
    layers = {name: [(make(w), i) for w, i in plain] for name, (make, _) in ROW_KERNELS.items()}
    out = {}
    for n in row_counts:
        x = {i: torch.randn(n, i) for i in {i for _, i in LAYER_SHAPES}}
        best = dict.fromkeys(ROW_KERNELS, float("inf"))
        for _ in range(repeats):
            for name, (_, product) in ROW_KERNELS.items():
                start = time.perf_counter()
                for w, i in layers[name]:
                    product(x[i], w)
                best[name] = min(best[name], time.perf_counter() - start)
        out[n] = {name: round(seconds * 1e3, 1) for name, seconds in best.items()}
        print(f"{n:3} rows: {out[n]}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", help="comma list of row counts: float32 products of several rows instead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    kernels = compiled.available()  # built (or refused, in one line) before anything is timed
    if not kernels:
        ROW_KERNELS.pop("fp32 minillm linear_f32 AVX2")
    if not kernels or "avx512f" not in compiled.cpu_flags():
        ROW_KERNELS.pop("fp32 minillm linear_f32 AVX-512")
    if args.rows:
        report = {
            "machine": {"platform": platform.platform(), "cpu": machine_kind(), "torch": torch.__version__},
            "threads": torch.get_num_threads(),
            "layers_ms_by_rows": measure_rows([int(n) for n in args.rows.split(",")], args.repeats),
        }
        write_report(report, args.out)
        return 0
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (make, product, act_dtype, bytes_per_weight) in KERNELS.items():
            try:
                row = measure(make, product, act_dtype, bytes_per_weight, args.repeats)
            except (RuntimeError, AttributeError, NotImplementedError) as e:  # a kernel this build lacks
                row = {"unavailable": str(e).splitlines()[0][:200]}
            results[f"{name}, {threads} thread{'s' if threads > 1 else ''}"] = row
            print(f"{name:36} threads {threads}: {row}", file=sys.stderr, flush=True)
    report = {
        "machine": {"platform": platform.platform(), "cpu": machine_kind(), "torch": torch.__version__},
        "kernels": results,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
