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
    packed one 17-25 (decode 10-15% slower in three separate runs; prefill the same). And both fall short of
    minillm's own compiled kernel (kernels/matmul.cpp): on an AVX2-only CPU (AMD Zen 3) MKL's one-row product
    read 11-12 GB/s of an 18-21 GB/s machine and fp32 decode ran 3.9 against 5.8 tok/s; on an AVX-512 one
    (2026-12-07) one row of the 9,728 x 896 matrix took 2.2 ms through MKL, 0.78 through oneDNN, 0.56 through
    the kernel. So wherever the kernels run, float32 weights are packed for it (compiled.pack_f32: blocks of
    16 output channels, input channel by input channel) and every float32 product takes it, a decode row or
    a prompt chunk of hundreds of rows: on that layout it is a matrix-multiply micro-kernel, and over a 0.5B model's
    layer matrices (2026-12-07, AMD AVX-512 machine, tools/bench_kernels.py; Intel CPUs with AVX-512 take its
    AVX-512 variant) it ran as fast as oneDNN's for
    prompt rows and faster for decode rows (numbers in README). Where the kernels do not run, float32 weights
    are only stacked and multiplied by F.linear. Exact mode (exact.py) needs a row's result to depend only on
    that row and the shapes: the kernel keeps that (each output one chain of multiply-adds in input order);
    MKL's products broke it (the exact-mode property test found a lone tile and a batched one differing in the
    last bits; MKL makes no such promise unless its reproducibility mode is set), oneDNN's keep it, so exact
    mode without the kernels packs float32 for oneDNN.

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
        (else float32 is packed for the compiled kernel where it runs, F.linear's stacked matrix elsewhere).
        scratch: reusable memory for stacking the parts of a matrix that is then reordered or packed (packing
        many layers then frees nothing that it allocated, which would leave the heap fragmented)."""
        super().__init__()
        parts = [linear.weight.detach() for linear in linears]
        self.onednn = onednn
        self.kernel = not onednn and dtype == torch.float32 and compiled.available()
        repacked = self.onednn or self.kernel  # the stacked matrix is a step to another copy
        self.out_features, self.in_features = sum(p.shape[0] for p in parts), parts[0].shape[1]
        if len(parts) > 1:
            shape = (self.out_features, self.in_features)
            out = scratch[: shape[0] * shape[1]].view(shape) if repacked and scratch is not None else None
            weight = torch.cat([p.to(dtype) for p in parts], out=out)  # [sum of outs, in]
        else:
            # [out, in]; kept for F.linear it must be a copy, so that the original can be released (a reorder
            # or packing below copies anyway: a copy here too would hold the largest matrix three times)
            weight = parts[0].to(dtype, copy=not repacked)
        if self.onednn:
            # Packed for one-row inputs (decode, where bandwidth matters most); it serves any number of rows.
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # opaque [out, in]
        elif self.kernel:
            weight = compiled.pack_f32(weight)  # [out / 16, in, 16]
        self.weight = weight
        biases = [linear.bias for linear in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach().to(dtype) for b in biases])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.kernel:
            y = compiled.linear_f32(x.reshape(-1, self.in_features), self.weight, self.out_features)
            y = y if self.bias is None else y + self.bias
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
    bfloat16 and, for exact mode where the compiled kernels do not run, in float32 too; float32 otherwise
    packed for the kernel where it runs (above). Parts to repack are stacked in one scratch buffer."""
    onednn = dtype == torch.bfloat16 or (exact and not compiled.available())
    c = model.rank_config  # this rank's shapes (the whole model's on one rank)
    stacked_rows = max((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, 2 * c.intermediate_size)
    repacked = onednn or (dtype == torch.float32 and compiled.available())
    scratch = torch.empty(stacked_rows * c.hidden_size, dtype=dtype) if repacked else None
    replace_linears(
        model, lambda *linears: PackedLinear(*linears, dtype=dtype, onednn=onednn, scratch=scratch), release
    )
