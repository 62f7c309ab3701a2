"""Prepacked weights: CPU matrix products at the speed of memory.

Decoding one token multiplies a single row of activations by every weight matrix. That matrix-vector
product does two flops per weight it reads, so its speed is set by memory bandwidth (bytes read per
second), not arithmetic. Two things make it stream well, and both are done once, at load time:

- **Stacking**: q, k and v read the same input, as do gate and up; each group becomes one matrix. One
  larger product streams memory better than several small ones, and makes fewer calls.
- **The kernel that streams best for the dtype**, measured on the 2-core machines this engine is developed
  on (a decode step's matrices, one row, read from memory, not cache; tools/bench_kernels.py):
  - bfloat16: F.linear's BLAS path reads 11-17 GB/s; oneDNN (PyTorch's "mkldnn" backend) reads 17-25 GB/s
    once each weight is reordered into the blocked layout its kernels stream through. So bf16 weights are
    reordered: mkldnn._reorder_linear_weight packs, mkldnn._linear_pointwise multiplies (torch.compile's
    CPU weight prepacking uses the same pair).
  - float32: the other way round. MKL's gemv behind F.linear reads 20-27 GB/s on the plain layout, oneDNN's
    packed one 17-25 (decode 10-15% slower in three separate runs; prefill the same). So float32 weights
    are only stacked (not reordered), and multiplied by F.linear where the compiled kernels are not
    available. Except in exact mode (exact.py), which needs a row's
    result to depend only on that row and the shapes: MKL's float32 products broke that (the exact-mode
    property test found a lone tile and a batched one differing in the last bits; MKL makes no such promise
    unless its reproducibility mode is set), oneDNN's keep it, so exact mode packs float32 for oneDNN too.
    Once minillm had its own compiled kernels, MKL ran below both: on an AVX2-only CPU (AMD Zen 3) its one-row
    product read 11-12 GB/s of an 18-21 GB/s machine, and oneDNN took 0.5-0.6x its time for 32-512 rows of
    the 9,728 x 896 matrix (the same time at 512 rows of the 896 x 4,864 one); on an AVX-512 one (2026-12-07)
    MKL took 2.2 ms for one row of that matrix, oneDNN 0.78 and the compiled kernel 0.56. The kernel now takes
    several rows in tiles that read W once for all of them (matmul.cpp): over a 0.5B model's 24 layers' matrices
    streamed from memory (2026-12-07, AVX-512 machine, bench/kernels_rows_fp32.json) it took 44.6 ms for one
    row, 61.2 for 8, 85.8 for 16, 145.5 for 24 and 158.5 for 28, where oneDNN took 54.2, 86.8, 111.4, 148.3
    and 170.9, and 175.9 against 181.6 at 32 (two more runs at 28 and 32 rows: 160.7 / 159.7, 156.9 / 158.0,
    170.1 / 164.5, 182.6 / 186.1: even). So wherever the kernels run the float32
    matrix keeps its plain layout, products of fewer than KERNEL_ROWS rows take the compiled kernel
    (kernels/compiled.py), more rows (prefill) oneDNN's kernel on that layout.

A packed weight is a copy (stacked, reordered or converted). The loader hands each original to `release`
once it is replaced, so resident memory stays about one copy of the weights.

Packed products add up each dot product in another order than F.linear on the separate matrices, so
results differ in the last bits from transformers' (whose fp32 results F.linear reproduces exactly).
LLM.load(prepack=False) keeps plain, separate F.linear products for bit-for-bit comparisons.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import compiled
from ..model.model import CausalLM

KERNEL_ROWS = 32  # float32 products of fewer rows take the compiled kernel where it is faster (PackedLinear)


def available(dtype: torch.dtype, device: str) -> bool:
    """Packing helps on CPU, in float32 and (where the CPU has bf16 instructions) bfloat16."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T + b, like nn.Linear, with W held in the layout the dtype's fastest kernel reads (above).

    Built from one nn.Linear, or from several that read the same input (q, k and v; gate and up), stacked
    into one matrix. Its output is then the outputs of the parts side by side, to be split by the caller."""

    def __init__(self, *linears: nn.Linear, dtype: torch.dtype, onednn: bool, scratch: torch.Tensor | None = None):
        """dtype: the compute dtype (weights are converted as they are packed). onednn: reorder for oneDNN
        (else keep the stacked matrix for F.linear). scratch: reusable memory for stacking the parts of a
        matrix that is then reordered (packing many layers then frees nothing that it allocated, which would
        leave the heap fragmented)."""
        super().__init__()
        parts = [linear.weight.detach() for linear in linears]
        self.onednn = onednn
        if len(parts) > 1:
            shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
            out = scratch[: shape[0] * shape[1]].view(shape) if self.onednn and scratch is not None else None
            weight = torch.cat([p.to(dtype) for p in parts], out=out)  # [sum of outs, in]
        else:
            # [out, in]; kept for F.linear it must be a copy, so that the original can be released (a reorder
            # below copies anyway: a copy here too would hold the largest matrix three times at the peak)
            weight = parts[0].to(dtype, copy=not self.onednn)
        if self.onednn:
            # Packed for one-row inputs (decode, where bandwidth matters most); it serves any number of rows.
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # opaque [out, in]
        self.weight = weight
        biases = [linear.bias for linear in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach().to(dtype) for b in biases])
        self.out_features, self.in_features = self.weight.shape
        # float32: MKL is the slowest of the three (above), so the compiled kernel for few rows, oneDNN for many.
        self.kernel = not self.onednn and dtype == torch.float32 and compiled.f32_beats_blas()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.kernel:  # the plain layout, read by the compiled kernel (few rows) or oneDNN (many)
            rows = x.reshape(-1, self.in_features)
            if rows.shape[0] < KERNEL_ROWS:
                y = compiled.linear_f32(rows, self.weight)
                y = y if self.bias is None else y + self.bias
            else:
                y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    @property
    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def replace_linears(
    model: CausalLM, build: Callable[..., nn.Module], release: Callable[[torch.Tensor], None] = lambda t: None
) -> None:
    """Replace the model's nn.Linear modules by build(*linears), in place, handing each old weight to
    release once replaced. Attention's q, k, v and the MLP's gate, up become one stacked matrix each.
    (Prepacking here and quantize.py both use it.)

    The largest matrix (lm_head, vocab x hidden) goes first: while it is being converted both its forms are
    resident, and nothing else has been converted yet, so peak memory stays near one copy of the weights
    (as long as lm_head is under half of them, as in real models)."""

    def swap(owner: nn.Module, target: str, parts: list[str]) -> None:
        linears = [getattr(owner, part) for part in parts]
        replacement = build(*linears)
        for part, linear in zip(parts, linears):
            setattr(owner, part, None)
            release(linear.weight)
        setattr(owner, target, replacement)

    swap(model, "lm_head", ["lm_head"])
    for layer in model.model.layers:
        swap(layer.self_attn, "qkv_proj", ["q_proj", "k_proj", "v_proj"])
        swap(layer.self_attn, "o_proj", ["o_proj"])
        swap(layer.mlp, "gate_up_proj", ["gate_proj", "up_proj"])
        swap(layer.mlp, "down_proj", ["down_proj"])


def prepack_linears(model: CausalLM, dtype: torch.dtype, release: Callable[[torch.Tensor], None], exact: bool) -> None:
    """Replace the model's nn.Linear modules by PackedLinear ones (replace_linears), reordered for oneDNN in
    bfloat16 and, for exact mode, in float32 too (above); parts to reorder are stacked in one scratch buffer."""
    onednn = dtype == torch.bfloat16 or exact
    c = model.rank_config  # this rank's shapes (the whole model's on one rank)
    stacked_rows = max((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, 2 * c.intermediate_size)
    scratch = torch.empty(stacked_rows * c.hidden_size, dtype=dtype) if onednn else None
    replace_linears(
        model, lambda *linears: PackedLinear(*linears, dtype=dtype, onednn=onednn, scratch=scratch), release
    )
