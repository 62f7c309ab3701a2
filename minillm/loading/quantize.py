"""Weights in compact forms: int8 and int4 in blocks of 32 (GGUF's Q8_0 and Q4_1), and bf16 kept as stored.

Decoding one token reads every weight once, so its speed is bytes per token: int8 halves bf16's bytes and
int4 quarters them. Only the matrices are quantized (the embedding table is read from the quantized head when
tied, else kept as an int8 table); the KV cache, norms and every sum stay in the model's dtype. int4 keeps the
output head in int8, as llama.cpp's 4-bit files do.

- int8 (Q8_0): w = d * q per block of 32 input channels, q in -127..127, d = max |w| of the block / 127.
- int4 (Q4_1): w = d * q + m per group of `group_size` input channels (32 by default, as Q4_1), q in 0..15,
  the group's minimum mapped to 0 and its maximum to 15 (asymmetric: a group need not be centred on zero);
  two values to a byte, value i of each 32 in the low nibble of byte i and value i + 16 in the high one.
- bf16: the checkpoint's bf16 matrices kept as they are, for a model computing in float32 (or bf16) on a CPU
  with no native bf16 arithmetic, where PyTorch's bf16 products are slow (loader.py decides).
Scales d and minimums m are float16, as in GGUF files, so those load without re-quantizing.

Products of few rows (decode) run the compiled kernels (kernels/matmul.cpp), which stream the weights at
memory speed and, for int8 and int4, quantize the activations to int8 per block of 32 as llama.cpp does (the
held-out loss moves by less than 0.01 nats: README). Products of DENSE_FROM_ROWS rows or more (prefill)
dequantize W a block of rows at a time and run the dense kernel of the model's dtype. Without the compiled
kernels (kernels/compiled.py says when) few rows take the dense path too, their activations quantized the
same way first, so both paths compute the same thing and differ only in summation order.

Quantization happens at load time, from the checkpoint's own weights (loader.py), replacing each nn.Linear the
way prepack.py does: q, k and v stacked into one matrix, gate and up into another. A row's result depends only
on that row and the number of rows (which picks the path), so exact mode's guarantees hold for these forms too.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MinillmError
from ..kernels import compiled
from ..model.model import CausalLM
from . import prepack
from .prepack import replace_linears

MODES = ("int8", "int4")  # what --quantize offers; "bf16" is chosen by the loader, never asked for
BLOCK = 32  # input channels per int8 block, and per block of quantized activations
GROUP_SIZES = (32, 64, 128, 256)  # int4 groups: whole blocks of 32, a power of two of them
DEFAULT_GROUP_SIZE = 32  # Q4_1's group: the best quality of the sizes offered
ROWS_AT_ONCE = 4096  # quantize this many rows at a time
DENSE_FROM_ROWS = 32  # products of this many input rows or more take the dense path (forward)
DENSE_BLOCK = 1024  # weight rows the dense path dequantizes at a time


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q [out, in] int8, d [out, in / 32] float16): Q8_0."""
    blocks = weight.float().reshape(weight.shape[0], -1, BLOCK)  # [out, in / 32, 32]
    d = (blocks.abs().amax(dim=2) / 127).half()
    q = torch.round(blocks / d.float().clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), d


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q [out, in / 2] uint8, two values a byte; d, m [out, in / group] float16): Q4_1."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, -1, group_size)  # [out, in / group, group]
    m = groups.amin(dim=2).half()
    d = ((groups.amax(dim=2) - m.float()) / 15).half()
    q = torch.round((groups - m.float()[..., None]) / d.float().clamp(min=1e-30)[..., None]).clamp(0, 15)
    return pack_nibbles(q.to(torch.uint8).reshape(out_features, in_features)), d, m


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [rows, in] (0..15) -> [rows, in / 2]: in each 32 values, value i low in byte i, value i + 16 high."""
    blocks = q.reshape(q.shape[0], -1, 2, BLOCK // 2)  # [rows, in / 32, halves, 16]
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """pack_nibbles undone: [rows, in / 2] -> [rows, in] uint8."""
    blocks = packed.reshape(packed.shape[0], -1, 1, BLOCK // 2)  # [rows, in / 32, 1, 16]
    return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(packed.shape[0], -1)


def dequantize(
    q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The matrix a quantized one stands for, [rows, in] in dtype: int8 (q, d), or int4 (packed q, d, m)."""
    rows = q.shape[0]
    if m is None:
        return (q.to(dtype).view(rows, d.shape[1], -1) * d.to(dtype)[..., None]).view(rows, -1)
    values = unpack_nibbles(q).to(dtype).view(rows, d.shape[1], -1)  # [rows, groups, group]
    return (values * d.to(dtype)[..., None] + m.to(dtype)[..., None]).view(rows, -1)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [rows, in] rounded as the compiled int8 and int4 kernels round it: int8 per block of 32, scale max |x|
    / 127 (returned dequantized, in x's dtype; the fallback path's stand-in for what the kernels compute)."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(dim=2, keepdim=True) / 127
    return (torch.round(blocks / scale.clamp(min=1e-30)) * scale).reshape(x.shape).to(x.dtype)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held in a compact form (int8, int4 or bf16, above); built from one nn.Linear or
    several stacked (their outputs side by side, as in prepack.PackedLinear)."""

    def __init__(
        self,
        *linears: nn.Module,
        mode: str,
        dtype: torch.dtype,
        group_size: int = DEFAULT_GROUP_SIZE,
        scratch: torch.Tensor | None = None,
    ):
        """linears: modules with a weight [out, in] (an nn.Embedding's table too) and perhaps a bias. dtype: the
        model's (activations and outputs). scratch: memory the dense path dequantizes into, at least DENSE_BLOCK x
        in_features of dtype, shared by a model's layers (quantize_linears); None allocates this layer's own."""
        super().__init__()
        weights = [linear.weight.detach() for linear in linears]  # detached: autograd would keep temporaries
        self.out_features = sum(w.shape[0] for w in weights)
        self.in_features = weights[0].shape[1]
        self.mode, self.group_size, self.dtype = mode, group_size, dtype
        if mode == "bf16":
            self.register_buffer("q", torch.cat([w.to(torch.bfloat16) for w in weights]))  # [out, in] bf16
        else:
            # Quantized ROWS_AT_ONCE rows at a time, into outputs allocated first: no float32 copy of a whole
            # matrix (the output head's), and no hole left in the heap below them.
            size = BLOCK if mode == "int8" else group_size
            qshape = (self.out_features, self.in_features if mode == "int8" else self.in_features // 2)
            self.register_buffer("q", torch.empty(qshape, dtype=torch.int8 if mode == "int8" else torch.uint8))
            self.register_buffer("d", torch.empty(self.out_features, self.in_features // size, dtype=torch.float16))
            if mode == "int4":
                self.register_buffer("m", torch.empty_like(self.d))
            first = 0
            for w in weights:
                for i in range(0, w.shape[0], ROWS_AT_ONCE):
                    part = w[i : i + ROWS_AT_ONCE]
                    rows = slice(first + i, first + i + len(part))
                    if mode == "int8":
                        self.q[rows], self.d[rows] = quantize_int8(part)
                    else:
                        self.q[rows], self.d[rows], self.m[rows] = quantize_int4(part, group_size)
                first += w.shape[0]
        biases = [getattr(linear, "bias", None) for linear in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach().to(dtype) for b in biases])
        if scratch is None:
            scratch = torch.empty(min(self.out_features, DENSE_BLOCK) * self.in_features, dtype=dtype)
        self.scratch = scratch  # not a buffer: no weight, and not this layer's alone
        self.kernel = compiled.available()  # few rows: the compiled kernel (else the dense path)
        self.onednn = prepack.available(dtype, "cpu")  # the dense path: oneDNN where it has this dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # the kernels take 2-D inputs
        few = x.shape[0] < DENSE_FROM_ROWS
        if few and self.kernel:
            if self.mode == "int8":
                y = compiled.linear_q8_0(x, self.q, self.d)
            elif self.mode == "int4":
                y = compiled.linear_q4_1(x, self.q, self.d, self.m)
            else:
                y = compiled.linear_bf16(x, self.q)
        else:
            y = self._dense_product(quantize_activations(x) if few and self.mode != "bf16" else x)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _dense_product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T for many rows (prefill): the compiled kernels are written for few rows (they compute each
        output from scratch), so dequantize DENSE_BLOCK rows of W at a time into scratch (one read of the
        compact bytes, amortised over the rows) and multiply with the dense kernel of the dtype, whose result
        rows do not depend on each other (exact mode needs that: with DENSE_FROM_ROWS fixed, the path is a
        function of the shape)."""
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)  # [rows, out]
        for i in range(0, self.out_features, DENSE_BLOCK):
            rows = min(DENSE_BLOCK, self.out_features - i)
            w = self.scratch[: rows * self.in_features].view(rows, self.in_features)
            part = slice(i, i + rows)
            w.copy_(self.q[part] if self.mode == "bf16" else self.rows(part))  # bf16: converted by the copy itself
            if self.onednn:
                y[:, i : i + rows] = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            else:
                y[:, i : i + rows] = F.linear(x, w)
        return y

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Rows `index` of W (token ids, or a slice), dequantized to the model's dtype: [rows, in]."""
        if self.mode == "bf16":
            return self.q[index].to(self.dtype)
        return dequantize(self.q[index], self.d[index], self.m[index] if self.mode == "int4" else None, self.dtype)

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def check(mode: str, group_size: int, model: CausalLM, dtype: torch.dtype, device: str) -> None:
    """Refuse, in one line each, what the quantized forms cannot hold."""
    if mode not in MODES:
        raise MinillmError(f"unknown quantize mode {mode!r}; choose int8 or int4")
    if torch.device(device).type != "cpu":
        raise MinillmError(f"quantized weights run on CPU kernels; load on cpu, not {device}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise MinillmError(f"quantized products compute in float32 or bfloat16, not {dtype}; pass --dtype")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise MinillmError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    size = group_size if mode == "int4" else BLOCK
    c = model.rank_config  # this rank's shapes under tensor parallelism
    sizes = {
        "hidden size": c.hidden_size,
        "MLP size": c.intermediate_size,
        "attention output size": c.num_heads * c.head_dim,
    }
    for what, n in sizes.items():
        if n % size:
            if mode == "int8":
                raise MinillmError(f"int8 quantizes blocks of 32 input channels, and the model's {what} is {n}")
            fits = [g for g in GROUP_SIZES if all(k % g == 0 for k in sizes.values())]
            advice = f"choose {' or '.join(map(str, fits))}" if fits else "use int8"
            raise MinillmError(f"int4 group size {group_size} does not divide the model's {what} ({n}); {advice}")


class QuantizedEmbedding(nn.Module):
    """Token embeddings looked up in a compact table (a QuantizedLinear's W: one row per token); a lookup
    dequantizes only the rows it reads. Tied to the output head, the table is the head itself, so the model
    holds that matrix once, in the head's form; untied, it is a table of its own (int8, or bf16 kept)."""

    def __init__(self, table: QuantizedLinear):
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)  # [N, hidden]


def quantize_linears(
    model: CausalLM,
    mode: str,
    dtype: torch.dtype,
    group_size: int = DEFAULT_GROUP_SIZE,
    release: Callable[[torch.Tensor], None] = lambda t: None,
) -> None:
    """Replace the model's nn.Linear modules by QuantizedLinear ones of `mode` (int8, int4 or bf16), in place
    (prepack.replace_linears: stacked q/k/v and gate/up), the output head included. The embedding table is read
    a row per token, so its size costs memory, not decode speed: tied to the head, its rows are read from the
    head; otherwise it becomes a table of its own, int8 (bf16 when the matrices are kept in bf16)."""
    embed = model.model.embed_tokens
    tied = model.lm_head.weight is embed.weight
    c = model.rank_config
    scratch = torch.empty(DENSE_BLOCK * max(c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim), dtype=dtype)
    head = id(model.lm_head)  # an id, not a reference: the float head must be freed once replaced

    def build(*linears: nn.Linear) -> QuantizedLinear:
        # int4 keeps the output head in int8, as llama.cpp's 4-bit files keep theirs (Q6_K or Q8_0): the head
        # picks the token itself, and 4 bits there cost most of int4's KL divergence on SmolLM2 (README).
        own = "int8" if mode == "int4" and id(linears[0]) == head else mode
        return QuantizedLinear(*linears, mode=own, dtype=dtype, group_size=group_size, scratch=scratch)

    replace_linears(model, build, release)
    if tied:
        table = model.lm_head
    else:
        table = QuantizedLinear(embed, mode="bf16" if mode == "bf16" else "int8", dtype=dtype, scratch=scratch)
    model.model.embed_tokens = QuantizedEmbedding(table)
    release(embed.weight)
    del embed  # the last reference to the float table: it is freed before the heap is trimmed
    return_freed_memory()


def return_freed_memory() -> None:
    """Quantizing leaves the heap full of freed float32 temporaries that glibc keeps for reuse (resident
    memory measured at 7x the quantized weights without this); malloc_trim hands them back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
