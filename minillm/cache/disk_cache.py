"""The disk tier of the prefix cache: KV that leaves memory is kept in files, so a later process reuses it.

The radix tree (radix_cache.py) forgets everything when the process ends, and evicts under memory pressure.
Both are moments to write KV down instead of losing it. The next lookup that misses in memory continues on
disk and brings the matched KV back into the pool, where it is a tree hit like any other.

Pages: KV is stored in pages of `page` consecutive tokens from the start of a sequence (64, exact mode's
chunk). A page's key chains its tokens to everything before it:

    key(page i) = sha256(key(page i-1) + token ids of page i)      key(page -1) = the fingerprint

so a key names a whole prefix, shared prefixes share pages, and a lookup computes keys page by page until
one is missing. A partial last page is not stored (at most page - 1 tokens to recompute).

The fingerprint hashes everything KV depends on: the weights (each safetensors file's header, size and
64 samples of its data), config.json, dtype, exact mode, the weights' form (plain, prepacked or
quantized), the torch version and the page size. Each fingerprint gets its own directory; files of another
fingerprint are never read.

Safety rules:
- A file is written to a temporary name and renamed into place (atomic), so no reader sees half a file.
  Names are content addresses, so two processes writing the same page write the same bytes.
- Each file carries its key, fingerprint, token ids and a checksum of its tensors; a file that fails any
  check is skipped with one warning line and removed: never used, never a crash.
- A byte budget: after writing, the least recently used files (by modification time, which reads and
  writes set) are removed until the directory fits; a prefix's deeper pages are marked older, so they go
  first and no page outlives the page it chains from.
- An error writing (a full disk, a read-only directory) turns the tier off with one warning.
- safetensors, never pickle: reading a file runs no code from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from .kv_pool import KVPool

FORMAT = "minillm-kv-2"
DEFAULT_PAGE = 64
DEFAULT_BUDGET_MB = 4096
ENV_DIR = "MINILLM_CACHE_DIR"
SAMPLES, SAMPLE_BYTES = 64, 4096  # of each weights file, hashed with its header


def warn(message: str) -> None:
    print(f"minillm: disk cache: {message}", file=sys.stderr, flush=True)


def weights_digest(path: Path) -> str:
    """The header (names, dtypes, shapes) and 64 spread samples of the data: a fine-tune of the same model has
    the same header and size, but different bytes everywhere. Hashing whole files would cost seconds per
    GB at every start."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        digest.update(f.read(header_len))
        for i in range(SAMPLES):
            f.seek(8 + header_len + (size - 8 - header_len) * i // SAMPLES)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def fingerprint(model_dir: Path, dtype: torch.dtype, exact: bool, weight_form: str, page: int) -> dict:
    """What the KV depends on, and its hash (`id`)."""
    weights = [[path.name, weights_digest(path)] for path in sorted(model_dir.glob("*.safetensors"))]
    config = (model_dir / "config.json").read_bytes()
    facts = {
        "format": FORMAT,
        "model": str(model_dir),
        "weights": weights,
        "config": hashlib.sha256(config).hexdigest(),
        "dtype": str(dtype),
        "exact": exact,
        "weight_form": weight_form,
        "torch": torch.__version__,
        "page": page,
    }
    hashed = {k: v for k, v in facts.items() if k != "model"}  # the same files elsewhere give the same KV
    facts["id"] = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:32]
    return facts


def page_keys(fingerprint_id: str, tokens: list[int], page: int) -> list[str]:
    """The key of every whole page of tokens, in order."""
    keys, parent = [], fingerprint_id
    for start in range(0, len(tokens) - page + 1, page):
        chunk = torch.tensor(tokens[start : start + page], dtype=torch.int64).numpy().tobytes()
        parent = hashlib.sha256(parent.encode() + chunk).hexdigest()
        keys.append(parent)
    return keys


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DiskCache:
    def __init__(self, root: Path, facts: dict, budget_bytes: int, page: int):
        self.facts, self.page, self.budget_bytes = facts, page, budget_bytes
        self.dir = Path(root) / facts["id"]
        self.enabled = True
        self.known: set[str] = set()  # keys this process has seen on disk or written
        self.pages_read = self.pages_written = 0
        self.read_s = self.write_s = 0.0  # time spent reading and writing pages
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            about = self.dir / "fingerprint.json"
            if not about.exists():
                self._write_atomic(about, lambda tmp: tmp.write_text(json.dumps(facts, indent=1) + "\n"))
        except OSError as e:
            self._disable(e)

    def _disable(self, error: OSError) -> None:
        if self.enabled:
            warn(f"turned off ({error.strerror or error} in {self.dir}); continuing without it")
        self.enabled = False

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def _write_atomic(self, path: Path, write) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(self)}.tmp")
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------------------

    def read(self, tokens: list[int], first_page: int, last_page: int, shape: tuple, dtype: torch.dtype):
        """KV of pages first_page .. last_page - 1 of tokens, as far as they are on disk and sound: a list of
        (keys, values), each [layers, kv_heads, page, head_dim]; it stops at the first missing page."""
        if not self.enabled or last_page <= first_page:
            return []
        start = time.perf_counter()
        keys = page_keys(self.facts["id"], tokens[: last_page * self.page], self.page)
        pages = []
        for i in range(first_page, last_page):
            kv = self._read_page(keys[i], tokens[i * self.page : (i + 1) * self.page], shape, dtype)
            if kv is None:
                break
            pages.append(kv)
        self._touch(keys[: first_page + len(pages)])
        self.read_s += time.perf_counter() - start
        return pages

    def _read_page(self, key: str, tokens: list[int], shape: tuple, dtype: torch.dtype):
        path = self._path(key)
        try:
            with safe_open(path, framework="pt") as f:  # memory-mapped
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in ("keys", "values", "tokens")}
            problem = self._problem(meta, key, tensors, tokens, shape, dtype)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - a damaged file may fail in any way: skip it, never crash
            problem = f"unreadable ({type(e).__name__})"
        if problem:
            warn(f"skipping {path.name}: {problem}; removed")
            path.unlink(missing_ok=True)
            self.known.discard(key)
            return None
        self.known.add(key)
        self.pages_read += 1
        return tensors["keys"], tensors["values"]

    def _problem(self, meta: dict, key: str, tensors: dict, tokens: list[int], shape: tuple, dtype) -> str | None:
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.facts["id"]:
            return "written for another model or setting"
        if meta.get("key") != key or tensors["tokens"].tolist() != tokens:
            return "holds another prefix"
        if any(tensors[n].shape != shape or tensors[n].dtype != dtype for n in ("keys", "values")):
            return "wrong shape or dtype"
        if meta.get("checksum") != checksum(tensors):
            return "checksum mismatch (truncated or corrupted)"
        return None

    # -- writing --------------------------------------------------------------------------------------

    def write(self, tokens: list[int], slots: torch.Tensor, pool: KVPool, from_token: int = 0) -> None:
        """Store every whole page of tokens (whose KV sits in slots [len(tokens)] of the pool) that ends after
        from_token and is not on disk yet."""
        if not self.enabled:
            return
        start = time.perf_counter()
        keys = page_keys(self.facts["id"], tokens, self.page)
        wrote = False
        for i, key in enumerate(keys):
            first, end = i * self.page, (i + 1) * self.page
            if end <= from_token or key in self.known:
                continue
            path = self._path(key)
            if path.exists():
                self.known.add(key)
                continue
            kv_keys, kv_values = pool.read(slots[first:end])  # [layers, kv_heads, page, head_dim] each
            tensors = {
                "keys": kv_keys,
                "values": kv_values,
                "tokens": torch.tensor(tokens[first:end], dtype=torch.int64),
            }
            meta = {"format": FORMAT, "fingerprint": self.facts["id"], "key": key, "checksum": checksum(tensors)}
            try:
                self._write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
            except OSError as e:
                self._disable(e)
                return
            self.known.add(key)
            self.pages_written += 1
            wrote = True
        self._touch(keys)
        if wrote:
            self.enforce_budget()
        self.write_s += time.perf_counter() - start

    def _touch(self, keys: list[str]) -> None:
        """Mark a prefix's pages used now, each deeper page a millisecond older than the one before it: the
        budget (oldest first) then removes a prefix from its end, not a page that later pages chain from."""
        now = time.time()
        for i, key in enumerate(keys):
            try:
                os.utime(self._path(key), (now, now - i * 1e-3))
            except OSError:  # not there (removed meanwhile, or never written): nothing to mark
                pass

    def enforce_budget(self) -> None:
        """Remove least recently used page files until the directory fits the budget."""
        files = []
        for entry in os.scandir(self.dir):
            if entry.name.endswith(".safetensors"):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # removed by another process meanwhile
                    continue
                files.append((st.st_mtime, entry.name, st.st_size))
        total = sum(size for _, _, size in files)
        for _, name, size in sorted(files):
            if total <= self.budget_bytes:
                break
            (self.dir / name).unlink(missing_ok=True)
            self.known.discard(name.removesuffix(".safetensors"))
            total -= size


# -- `python -m minillm cache info|clear` -------------------------------------------------------------


def describe(root: Path) -> list[dict]:
    """One entry per fingerprint directory: what it was made from, pages, tokens and bytes."""
    found = []
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        pages = list(d.glob("*.safetensors"))
        try:
            facts = json.loads((d / "fingerprint.json").read_text())
        except (OSError, ValueError):
            facts = {}
        page = int(facts.get("page", DEFAULT_PAGE))
        found.append(
            {
                "fingerprint": d.name,
                "model": facts.get("model", "?"),
                "dtype": facts.get("dtype", "?"),
                "exact": facts.get("exact", "?"),
                "pages": len(pages),
                "tokens": len(pages) * page,
                "bytes": sum(p.stat().st_size for p in pages),
            }
        )
    return found
