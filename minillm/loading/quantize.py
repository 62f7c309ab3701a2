"""Weight-only quantization: int8 with a scale per output channel, int4 with a scale and zero per group.

Decoding one token reads every weight once, so its speed is bytes per token: int8 halves bf16's bytes
and int4 quarters them. Only the weights are quantized (the matrices; the embedding table is read from the
quantized head when tied, else kept as int8 rows); activations, the KV cache, norms and every sum stay in
the model's dtype, and the
products dequantize on the fly inside PyTorch's own CPU kernels (the ones gpt-fast uses):

- int8: w ~= q * scale[row], q in -127..127, scale = max |w| of the row / 127 (symmetric).
  aten._weight_int8pack_mm(x, q [out, in] int8, scale [out]).
- int4: w ~= (q - 8) * scale[row, g] + zero[row, g] for each group g of `group_size` input channels,
  q in 0..15, the group's minimum mapped to 0 and its maximum to 15 (asymmetric: a group need not be
  centred on zero). aten._convert_weight_to_int4pack_for_cpu packs q two to a byte once, at load;
  aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros [in / group, out, 2]).

Those kernels are written for a few rows (decode). A product of DENSE_FROM_ROWS rows or more (prefill)
dequantizes W a block of rows at a time and runs oneDNN's dense kernel instead (QuantizedLinear._dense_product).

Quantization happens at load time, from the checkpoint's own weights (loader.py), replacing each
nn.Linear the way prepack.py does: q, k and v stacked into one matrix, gate and up into another, so
each layer makes four products. The same kernels run the same shapes whatever the cache holds, so exact
mode's guarantee (cached == uncached, bitwise) holds for quantized models too.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
from torch import nn

from ..errors import MinillmError
from ..model.model import CausalLM
from . import prepack
from .prepack import replace_linears

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
DEFAULT_GROUP_SIZE = 32  # llama.cpp's Q4_0 block: the best quality of the sizes the kernel takes
ROWS_AT_ONCE = 4096  # quantize this many rows at a time
DENSE_FROM_ROWS = 32  # products of this many input rows or more take the dense path (forward)
DENSE_BLOCK = 1024  # weight rows the dense path dequantizes at a time (a multiple of 64)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q [out, in] int8, scale [out] float32)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int8_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8 of a large matrix, ROWS_AT_ONCE rows at a time (lm_head never exists in float32 whole),
    into outputs allocated first (freeing the temporaries then leaves no hole below them in the heap)."""
    q = torch.empty(weight.shape, dtype=torch.int8)  # [out, in]
    scale = torch.empty(weight.shape[0], dtype=dtype)  # [out]
    for i in range(0, weight.shape[0], ROWS_AT_ONCE):
        q[i : i + ROWS_AT_ONCE], scale[i : i + ROWS_AT_ONCE] = quantize_int8(weight[i : i + ROWS_AT_ONCE])
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


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """q [rows, in] (uint8, 0..15) from rows of aten._convert_weight_to_int4pack_for_cpu's layout, rows a
    multiple of 64. The layout is the kernel's, undocumented, as read off PyTorch 2.13 on AVX-512: each block of
    64 rows is [in, 32] bytes, byte (k, j) holding row j's channel k in its low nibble and row 32 + j's in its
    high one. int4_layout_is_known() checks that against the packing op before anything relies on it."""
    blocks = packed.view(-1, in_features, 32)  # [rows / 64, in, 32]
    low, high = blocks & 15, blocks >> 4
    return torch.cat([low.transpose(1, 2), high.transpose(1, 2)], dim=1).reshape(-1, in_features)


def int4_rows(packed: torch.Tensor, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """q [len(rows), in] (uint8, 0..15): the given rows of a packed matrix (unpack_int4's layout), gathered
    one by one: row r is byte lane r % 32 of block r // 64, in the high nibbles if r % 64 >= 32."""
    bytes_ = packed.view(-1, in_features, 32)[rows // 64, :, rows % 32]  # [len(rows), in]
    return torch.where((rows % 64 >= 32)[:, None], bytes_ >> 4, bytes_ & 15)


@functools.cache
def int4_layout_is_known() -> bool:
    """Whether unpack_int4 reads this build's packing (it may differ with the CPU's vector width or the torch
    version); where it does not, int4 products take the kernel whatever their number of rows."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    rows = torch.tensor([0, 31, 32, 63, 64, 100, 127])
    return (
        packed.shape == (128, 32)
        and torch.equal(unpack_int4(packed, 64).to(torch.int32), q)
        and torch.equal(int4_rows(packed, rows, 64).to(torch.int32), q[rows])
    )


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, group_size: int | None = None
) -> torch.Tensor:
    """The float32 matrix a quantized one stands for (the reference the tests compare products with)."""
    if zero is None:
        return q.float() * scale.float()[:, None]
    out_features, in_features = q.shape
    groups = (q.float().reshape(out_features, -1, group_size) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return groups.reshape(out_features, in_features)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as int8 or packed int4; built from one nn.Linear or several stacked
    (their outputs side by side, as in prepack.PackedLinear)."""

    def __init__(
        self,
        *linears: nn.Linear,
        mode: str,
        dtype: torch.dtype,
        group_size: int = DEFAULT_GROUP_SIZE,
        scratch: torch.Tensor | None = None,
    ):
        """scratch: memory the dense path dequantizes into, at least DENSE_BLOCK x in_features of dtype, shared
        by a model's layers (quantize_linears); None allocates this layer's own."""
        super().__init__()
        # detach(): the checkpoint's parameters require grad, and autograd would keep every temporary of quantizing.
        weight = (
            torch.cat([linear.weight.detach() for linear in linears])
            if len(linears) > 1
            else linears[0].weight.detach()
        )
        self.out_features, self.in_features = weight.shape
        self.mode, self.group_size = mode, group_size
        if mode == "int8":
            q, scale = quantize_int8_rows(weight, dtype)
            self.register_buffer("q", q)  # [out, in] int8
            self.register_buffer("scale", scale)  # [out]
        else:
            # Packed ROWS_AT_ONCE rows at a time (the op packs blocks of 64 rows, so the pieces stack exactly),
            # into outputs allocated first: no int32 copy of a whole matrix, no hole left in the heap.
            self.register_buffer("q", torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8))
            self.register_buffer(
                "scales_and_zeros", torch.empty(self.in_features // group_size, self.out_features, 2, dtype=dtype)
            )  # [in / group, out, 2]
            for i in range(0, self.out_features, ROWS_AT_ONCE):
                q, scale, zero = quantize_int4(weight[i : i + ROWS_AT_ONCE], group_size)
                self.q[i : i + len(q)] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [rows, in / 2]
                self.scales_and_zeros[:, i : i + len(q)] = torch.stack([scale.t(), zero.t()], dim=2)
        biases = [linear.bias for linear in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach().to(dtype) for b in biases])
        if scratch is None:
            scratch = torch.empty(min(self.out_features, DENSE_BLOCK) * self.in_features, dtype=dtype)
        self.scratch = scratch  # not a buffer: no weight, and not this layer's alone
        # Rows of W can be read back: int8 always; int4 in whole 64-row blocks of a layout unpack_int4 reads.
        self.rows_readable = mode == "int8" or (self.out_features % 64 == 0 and int4_layout_is_known())
        # The dense path needs them, and oneDNN for this dtype; elsewhere every product takes the kernel.
        self.dense = self.rows_readable and prepack.available(dtype, "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # the kernels take 2-D inputs
        if self.dense and x.shape[0] >= DENSE_FROM_ROWS:
            y = self._dense_product(x)
        elif self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _dense_product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T for many rows (prefill). PyTorch's weight-only kernels are written for few rows: at 512 the
        int8 one runs 5x slower than the dense product of the model's dtype (measured on a 9728 x 896
        matrix). So dequantize DENSE_BLOCK rows of W at a time into scratch (one read of the quantized bytes,
        amortised over the rows) and multiply with oneDNN's dense kernel, whose result rows do not depend on
        each other (exact mode needs that: with DENSE_FROM_ROWS fixed, the path is a function of the shape)."""
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)  # [rows, out]
        for i in range(0, self.out_features, DENSE_BLOCK):
            rows = min(DENSE_BLOCK, self.out_features - i)
            w = self._dequantize(i, rows, self.scratch[: rows * self.in_features].view(rows, self.in_features))
            y[:, i : i + rows] = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return y

    def _dequantize(self, first: int, rows: int, out: torch.Tensor) -> torch.Tensor:
        """Rows first .. first + rows - 1 of W, in the model's dtype, written into out [rows, in]."""
        if self.mode == "int8":
            return torch.mul(self.q[first : first + rows], self.scale[first : first + rows, None], out=out)
        groups = out.view(rows, -1, self.group_size)  # [rows, in / group, group]
        groups.copy_(unpack_int4(self.q[first : first + rows], self.in_features).view(groups.shape))
        scale, zero = self.scales_and_zeros[:, first : first + rows].permute(2, 1, 0)  # each [rows, in / group]
        return groups.sub_(8).mul_(scale[..., None]).add_(zero[..., None]).view(rows, self.in_features)

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
        sizes = {
            "hidden size": c.hidden_size,
            "MLP size": c.intermediate_size,
            "attention output size": c.num_heads * c.head_dim,
        }
        for what, size in sizes.items():
            if size % group_size:
                fits = [g for g in GROUP_SIZES if all(n % g == 0 for n in sizes.values())]
                advice = f"choose {' or '.join(map(str, fits))}" if fits else "use int8"
                raise MinillmError(
                    f"int4 group size {group_size} does not divide the model's {what} ({size}); {advice}"
                )
        if c.vocab_size % 16:  # the other output sizes are multiples of the group size, checked above
            raise MinillmError(
                f"int4 packs output rows 16 at a time, and the vocabulary ({c.vocab_size} rows here) "
                "is not a multiple of 16; use int8"
            )


class QuantizedEmbedding(nn.Module):
    """Token embeddings looked up in an int8 table with a scale per row (quantize_int8: one row per token);
    a lookup dequantizes only the rows it reads. With tied embeddings and int8 weights the table is the
    quantized output projection itself (the same rows), so the model holds one int8 copy of that matrix
    rather than a full-precision table beside a quantized head."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)  # [vocab, hidden] int8
        self.register_buffer("scale", scale)  # [vocab], the model's dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.q[tokens].to(self.scale.dtype) * self.scale[tokens, None]  # [N, hidden]


class Int4HeadEmbedding(nn.Module):
    """Token embeddings read from a tied int4 output head: each token's row gathered from the packed layout
    (int4_rows) and dequantized with its groups' scales and zeros, so an int4 model holds that matrix once."""

    def __init__(self, head: QuantizedLinear):
        super().__init__()
        self.register_buffer("q", head.q)  # the head's, shared
        self.register_buffer("scales_and_zeros", head.scales_and_zeros)  # [in / group, vocab, 2]
        self.in_features, self.group_size = head.in_features, head.group_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = int4_rows(self.q, tokens, self.in_features).view(len(tokens), -1, self.group_size)  # [N, groups, group]
        scale, zero = self.scales_and_zeros[:, tokens].permute(2, 1, 0)  # each [N, groups]
        rows = (q.to(scale.dtype) - 8) * scale[..., None] + zero[..., None]
        return rows.view(len(tokens), self.in_features)  # [N, hidden]


def quantize_linears(
    model: CausalLM,
    mode: str,
    dtype: torch.dtype,
    group_size: int = DEFAULT_GROUP_SIZE,
    release: Callable[[torch.Tensor], None] = lambda t: None,
) -> None:
    """Replace the model's nn.Linear modules by QuantizedLinear ones, in place (prepack.replace_linears:
    stacked q/k/v and gate/up), the output head included. The embedding table is read a row per token, so its
    size costs memory, not decode speed: tied to the head, its rows are read from the head's quantized matrix
    (int8: QuantizedEmbedding on the head's own tensors; int4: Int4HeadEmbedding, where unpack_int4 reads the
    layout); otherwise it becomes a table of its own, int8 (QuantizedEmbedding)."""
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    c = model.rank_config
    scratch = torch.empty(DENSE_BLOCK * max(c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim), dtype=dtype)
    replace_linears(
        model,
        lambda *linears: QuantizedLinear(*linears, mode=mode, dtype=dtype, group_size=group_size, scratch=scratch),
        release,
    )
    head = model.lm_head
    if tied and mode == "int8":
        model.model.embed_tokens = QuantizedEmbedding(head.q, head.scale)
    elif tied and head.rows_readable:
        model.model.embed_tokens = Int4HeadEmbedding(head)
    else:
        model.model.embed_tokens = QuantizedEmbedding(*quantize_int8_rows(embed.detach(), dtype))
    release(embed)
    del embed  # the last reference to the float table: it is freed before the heap is trimmed
    return_freed_memory()


def return_freed_memory() -> None:
    """Quantizing leaves the heap full of freed float32 temporaries that glibc keeps for reuse (resident
    memory measured at 7x the quantized weights without this); malloc_trim hands them back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
