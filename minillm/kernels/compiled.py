"""The compiled kernels (matmul.cpp): built once per machine, used where the CPU can run them.

Why compiled code: decoding a token multiplies one row of activations by every weight matrix, so its speed is
how fast the weights stream from memory. PyTorch's own kernels fall short of that on CPUs exactly where it
matters: its weight-only int8 and int4 products are compute-bound on one row (6-7 GB/s per thread measured),
and where the CPU has no native bf16 arithmetic (AVX2 only) its bf16 products run several times slower than
float32. matmul.cpp does a block of 32 weights in a handful of AVX2 instructions, so one row streams at memory
speed on any x86 CPU of the last ten years (AVX-512 machines run the same AVX2 code: at one row the memory, not
the vector width, sets the pace). Float32 weights are packed in blocks of 16 output channels (pack_f32) for a
kernel that reads each weight once for all the rows of a product: a batched decode step's, and a prompt
chunk's, where it keeps pace with oneDNN's matrix multiply. And decode attention reads each sequence's keys
and values where they lie in the KV pool, instead of gathering a copy first (engine/forward_batch.py).

How: torch.utils.cpp_extension compiles matmul.cpp on first use (about 30 s; needs a C++ compiler and ninja)
into torch's extensions folder ($TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), and later
processes load the cached library in a fraction of a second. The ops register as torch.ops.minillm.*; they run
on torch's own thread pool (at::parallel_for), so they add no threads of their own.

When not: on a CPU without AVX2, FMA and F16C, where the build fails (no compiler), or with MINILLM_KERNELS=0,
one line on stderr says so and quantize.py's PyTorch path runs instead (slower; the same weights).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("matmul.cpp")
NEEDED_FLAGS = {"avx2", "fma", "f16c"}
NAME = "minillm_kernels"
STALE_LOCK_S = 600  # a build takes 30-60 s; a lock this old was left by a build that was killed
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # not -march=native: a cached build serves any AVX2 CPU
log = logging.getLogger("minillm.kernels")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: the kernels are then not tried)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def clear_stale_lock(lock: Path) -> None:
    """torch's builder holds a lock file while it compiles and waits, forever, for another process's lock to go.
    A build interrupted (Ctrl-C during the first load) leaves its lock behind, and every later start would
    hang: so a lock older than any build is removed first."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except OSError:  # no lock (the usual case), or removed meanwhile
        pass


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None when they can (building them if not built yet)."""
    if os.environ.get("MINILLM_KERNELS", "1") == "0":
        return "MINILLM_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"this is a {platform.machine()} CPU, and they are written for x86 AVX2"
    missing = NEEDED_FLAGS - cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    if shutil.which("ninja") is None:  # the ninja package's binary, when its venv's bin/ is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass  # the build below then says what is missing
    try:
        from torch.utils import cpp_extension

        build = Path(cpp_extension._get_build_directory(NAME, False))
        clear_stale_lock(build / "lock")
        if not any(so.stat().st_mtime >= SOURCE.stat().st_mtime for so in build.glob(f"{NAME}*.so")):
            log.warning("minillm: building the decode kernels for this machine (once; about 30 s)")
        cpp_extension.load(
            name=NAME,
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,  # the library registers its ops with torch when loaded
        )
    except Exception as e:  # no compiler, no ninja, a failed build: the PyTorch path still works
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"building them failed ({first_line[:200]})"
    return None


@functools.cache
def available() -> bool:
    """Whether torch.ops.minillm's kernels can run here; the first call builds or loads them, and says once
    (on stderr) when they cannot."""
    reason = unavailable_reason()
    if reason is not None:
        log.warning("minillm: compiled decode kernels unavailable (%s); using PyTorch's slower path", reason)
    return reason is None


def linear_q8_0(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [rows, in] (float32 or bf16) times W^T, W = d * q in blocks of 32 (q [out, in] int8, d [out, in / 32]
    float16) -> [rows, out] in x's dtype. x is quantized per block of 32 inside."""
    return torch.ops.minillm.linear_q8_0(x, q, d)


def linear_q4_1(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [rows, in] times W^T, W = d * q + m per group (q [out, in / 2] two nibbles a byte, d and m
    [out, in / group] float16) -> [rows, out] in x's dtype. x is quantized per block of 32 inside."""
    return torch.ops.minillm.linear_q4_1(x, q, d, m)


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [rows, in] times W^T, W [out, in] bf16, summed in float32 -> [rows, out] in x's dtype."""
    return torch.ops.minillm.linear_bf16(x, w)


F32_BLOCK = 16  # output channels per block of pack_f32's layout: 16 floats, one 64-byte line


def pack_f32(w: torch.Tensor) -> torch.Tensor:
    """W [out, in] float32 -> [ceil(out / 16), in, 16], the layout linear_f32 reads: packed[b, i, c] =
    W[16 b + c, i], the last block's channels past `out` zero. Each input channel's 16 weights of a block
    are one line, so a product streams W in order and needs no sums across vector lanes (matmul.cpp)."""
    out, in_features = w.shape
    whole = out // F32_BLOCK
    packed = torch.empty(-(-out // F32_BLOCK), in_features, F32_BLOCK, dtype=torch.float32)
    packed[:whole] = w[: whole * F32_BLOCK].view(whole, F32_BLOCK, in_features).transpose(1, 2)
    if whole < len(packed):
        packed[whole] = 0.0
        packed[whole, :, : out - whole * F32_BLOCK] = w[whole * F32_BLOCK :].T
    return packed


def linear_f32(x: torch.Tensor, packed: torch.Tensor, out: int, width: int = 0) -> torch.Tensor:
    """x [rows, in] float32 times W^T, W [out, in] float32 given as pack_f32(W) -> [rows, out]. width: 256 (AVX2)
    or 512 (AVX-512) bit vectors, 0 for this CPU's default (AVX-512 on Intel CPUs that have it); the same bits."""
    return torch.ops.minillm.linear_f32(x, packed, out, width)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """One decode query per sequence over its keys and values where they lie in the pool, without gathering
    them first. q [heads, rows, head_dim]; keys, values [kv_heads, pool slots, head_dim] (float32 or bf16);
    slots: the sequences' slots one after another, sequence r's from starts[r] to starts[r + 1]
    -> [rows, heads * head_dim] in q's dtype."""
    return torch.ops.minillm.decode_attention(q, keys, values, slots, starts)
