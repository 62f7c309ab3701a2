"""Weight-only quantization: int8 with a scale per output channel, int4 with a scale and zero per group.

Decoding one token reads every weight once, so its speed is bytes per token: int8 halves bf16's bytes
and int4 quarters them. Only the weight matrices are quantized; activations, the KV cache, norms, the
embedding table and every sum stay in the model's dtype, and the products dequantize on the fly inside
PyTorch's own CPU kernels (the ones gpt-fast uses):

- int8: w ~= q * scale[row], q in -127..127, scale = max |w| of the row / 127 (symmetric).
  aten._weight_int8pack_mm(x, q [out, in] int8, scale [out]).
- int4: w ~= (q - 8) * scale[row, g] + zero[row, g] for each group g of `group_size` input channels,
  q in 0..15, the group's minimum mapped to 0 and its maximum to 15 (asymmetric: a group need not be
  centred on zero). aten._convert_weight_to_int4pack_for_cpu packs q two to a byte once, at load;
  aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros [in / group, out, 2]).

Quantization happens at load time, from the checkpoint's own weights (loader.py), replacing each
nn.Linear the way prepack.py does: q, k and v stacked into one matrix, gate and up into another, so
each layer makes four products. The same kernels run the same shapes whatever the cache holds, so exact
mode's guarantee (cached == uncached, bitwise) holds for quantized models too.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import torch
from torch import nn

from .errors import MinillmError
from .model import CausalLM
from .prepack import replace_linears

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
DEFAULT_GROUP_SIZE = 32           # llama.cpp's Q4_0 block: the best quality of the sizes the kernel takes
ROWS_AT_ONCE = 4096               # quantize this many rows at a time, so lm_head never exists in float32 whole


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q [out, in] int8, scale [out] float32)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q [out, in] int32 in 0..15, scale [out, in / group], zero [out, in / group])."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    zero = low + 8 * scale  # so that (q - 8) * scale + zero = q * scale + low
    return q.reshape(out_features, in_features), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
               group_size: int | None = None) -> torch.Tensor:
    """The float32 matrix a quantized one stands for (the reference the tests compare products with)."""
    if zero is None:
        return q.float() * scale.float()[:, None]
    out_features, in_features = q.shape
    groups = (q.float().reshape(out_features, -1, group_size) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return groups.reshape(out_features, in_features)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as int8 or packed int4; built from one nn.Linear or several stacked
    (their outputs side by side, as in prepack.PackedLinear)."""

    def __init__(self, *linears: nn.Linear, mode: str, dtype: torch.dtype, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears]) if len(linears) > 1 else linears[0].weight
        self.out_features, self.in_features = weight.shape
        self.mode, self.group_size = mode, group_size
        blocks = [weight[i : i + ROWS_AT_ONCE] for i in range(0, self.out_features, ROWS_AT_ONCE)]
        if mode == "int8":
            parts = [quantize_int8(block) for block in blocks]
            self.register_buffer("q", torch.cat([q for q, _ in parts]))                          # [out, in] int8
            self.register_buffer("scale", torch.cat([s for _, s in parts]).to(dtype))             # [out]
        else:
            parts = [quantize_int4(block, group_size) for block in blocks]
            q = torch.cat([q for q, _, _ in parts])
            self.register_buffer("q", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # [out, in / 2] uint8
            scale, zero = torch.cat([s for _, s, _ in parts]), torch.cat([z for _, _, z in parts])
            self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=2).to(dtype).contiguous())
        biases = [linear.bias for linear in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach().to(dtype) for b in biases])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # the kernels take 2-D inputs
        if self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def check(mode: str, group_size: int, model: CausalLM, dtype: torch.dtype, device: str) -> None:
    """Refuse, in one line each, what the kernels cannot do."""
    if mode not in MODES:
        raise MinillmError(f"unknown quantize mode {mode!r}; choose int8 or int4")
    if torch.device(device).type != "cpu":
        raise MinillmError(f"weight-only quantization uses PyTorch's CPU kernels; load on cpu, not {device}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise MinillmError(f"quantized products compute in float32 or bfloat16, not {dtype}; pass --dtype")
    if mode == "int4":
        if group_size not in GROUP_SIZES:
            raise MinillmError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
        c = model.rank_config  # this rank's shapes under tensor parallelism
        sizes = {"hidden size": c.hidden_size, "MLP size": c.intermediate_size,
                 "attention output size": c.num_heads * c.head_dim}
        for what, size in sizes.items():
            if size % group_size:
                fits = [g for g in GROUP_SIZES if all(n % g == 0 for n in sizes.values())]
                advice = f"choose {' or '.join(map(str, fits))}" if fits else "use int8"
                raise MinillmError(f"int4 group size {group_size} does not divide the model's {what} ({size}); {advice}")


def quantize_linears(model: CausalLM, mode: str, dtype: torch.dtype, group_size: int = DEFAULT_GROUP_SIZE,
                     release: Callable[[torch.Tensor], None] = lambda t: None) -> None:
    """Replace the model's nn.Linear modules by QuantizedLinear ones, in place (prepack.replace_linears:
    stacked q/k/v and gate/up). The output head is quantized too (with tied embeddings it becomes a
    quantized copy; the embedding table stays as stored, and a lookup reads only its rows)."""
    replace_linears(model, lambda *linears: QuantizedLinear(*linears, mode=mode, dtype=dtype, group_size=group_size),
                    release)
    return_freed_memory()


def return_freed_memory() -> None:
    """Quantizing leaves the heap full of freed float32 temporaries that glibc keeps for reuse (resident
    memory measured at 7x the quantized weights without this); malloc_trim hands them back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
