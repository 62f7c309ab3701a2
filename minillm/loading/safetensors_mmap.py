"""Reading a .safetensors file without copying it: its tensors are views of the file's memory-mapped pages.

The format: 8 bytes (little-endian u64) giving the header's length N, N bytes of JSON header
{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}, then the raw
tensor bytes, offsets counted from the end of the header. Nothing is executed (unlike a pickle).

Mapping the file instead of reading it means loading costs no second copy: the operating system pages
weights in from its page cache as they are first touched, and shares those pages between processes. A
private (copy-on-write) mapping lets torch see ordinary writable memory while the file stays untouched.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import torch

from ..errors import MinillmError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """One memory-mapped .safetensors file: `tensors` maps each name to a view of the file's bytes."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._map, header, data_start = self._open(path)
            self.tensors = {
                name: self._view(name, entry, data_start) for name, entry in header.items() if name != "__metadata__"
            }
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise MinillmError(f"{path} is not a valid safetensors file ({e}); download it again") from None
        self._base = torch.frombuffer(self._map, dtype=torch.uint8).data_ptr()  # where the file starts in memory

    @staticmethod
    def _open(path: Path):
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (header_len,) = struct.unpack("<Q", mapped[:8])
        if 8 + header_len > size:
            raise ValueError(f"the header claims {header_len} bytes but the file has {size}; is it truncated?")
        header = json.loads(mapped[8 : 8 + header_len])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return mapped, header, 8 + header_len

    def _view(self, name: str, entry: dict, data_start: int) -> torch.Tensor:
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name} has unsupported dtype {entry['dtype']}")
        shape = [int(n) for n in entry["shape"]]
        begin, end = (int(n) for n in entry["data_offsets"])
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize or begin < 0 or data_start + end > len(self._map):
            raise ValueError(f"tensor {name} does not fit its byte range {begin}..{end}; is the file truncated?")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=data_start + begin).view(shape)

    def release(self, tensor: torch.Tensor) -> None:
        """Drop this process's resident copy of the pages under `tensor`, if it is a view of this file.

        The view stays valid: a later read pages the bytes back in from the file. The loader calls this
        once a weight has been repacked (prepack.py) or converted to another dtype, so the original stops
        counting as resident memory beside its copy."""
        offset = tensor.data_ptr() - self._base
        if tensor.numel() == 0 or not 0 <= offset < len(self._map) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, offset + tensor.nbytes - start)
