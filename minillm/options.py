"""Every setting of a loaded model and of its engine, in one place, each field with its default.

    LoadOptions    how a checkpoint becomes a model in memory (LLM.load's keyword arguments)
    EngineOptions  how the engine runs it (LLM.load's and LLM.configure's other keyword arguments)
    ServerOptions  what `python -m minillm serve` adds (serving/server.py)
    ExactShape     what exact mode changes elsewhere, derived once from the options

The CLI builds its flags' defaults and choices from these (cli.py), so a default is written once. Sampling
settings are engine/sampling.SamplingParams' fields; their legal ranges are in limits.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .cache import disk_cache
from .engine import exact as exact_mode
from .errors import MinillmError
from .loading import quantize as quantization
from .model import config

DTYPES = tuple(config.DTYPES)  # "float32", "bfloat16", "float16"
QUANTIZE = ("int8", "int4")
POLICIES = ("lpm", "fcfs")
SPECULATE = ("off", "lookup", "radix", "draft")  # none; prompt lookup; radix-tree lookup; a draft model


@dataclass
class LoadOptions:
    dtype: str | None = None  # one of DTYPES converts the weights as they load; None keeps the checkpoint's own
    device: str = "cpu"  # torch device
    exact: bool = False  # exact mode (engine/exact.py): the same bits cached or not, alone or batched
    prepack: bool | None = None  # repack matrices for the fastest kernel (None: where available; False: F.linear)
    quantize: str | None = None  # one of QUANTIZE: weight-only quantization at load (loading/quantize.py)
    group_size: int = quantization.DEFAULT_GROUP_SIZE  # int4: input channels per scale and zero
    tp: int | None = None  # tensor parallelism over this many ranks (ranks.py); under torchrun: its group


@dataclass
class EngineOptions:
    kv_mb: float = 1024  # memory for the KV pool that running requests and the prefix cache share
    kv_tokens: int | None = None  # the pool's size in tokens instead of kv_mb
    max_batch: int = 32  # requests running at once (a step of 32 decode rows costs 1.6x one of 8)
    # prompt tokens per step (longer prompts are prefilled over several steps): a step this size is still bound by
    # arithmetic (two of 264 rows cost 0.98x one of 520), and a request arriving during it waits less than for 512
    max_prefill_tokens: int = 256
    schedule_policy: str = "lpm"  # one of POLICIES: longest cached prefix first, or first come first served
    prefix_cache: bool = True  # False computes every prompt whole
    exact_chunk: int = exact_mode.DEFAULT_CHUNK  # exact mode's prefill tile (rows)
    exact_decode_rows: int = exact_mode.DEFAULT_DECODE_ROWS  # exact mode's decode tile (rows)
    poison_freed: bool = False  # debug: fill freed KV with NaN, so a read after free shows
    cache_dir: str | Path | None = None  # the disk tier (cache/disk_cache.py); default $MINILLM_CACHE_DIR
    disk_cache_mb: float = disk_cache.DEFAULT_BUDGET_MB  # its budget; least recently used files go beyond it
    speculate: str = "off"  # one of SPECULATE: who guesses the next tokens for verification (speculation.py)
    num_draft_tokens: int = 8  # the most guessed tokens per request and step
    draft_model: str | None = None  # speculate="draft": its checkpoint; None: this model's own weights in int4

    def check(self) -> None:
        """One line naming the first bad setting."""
        if self.schedule_policy not in POLICIES:
            raise MinillmError(f"unknown schedule policy {self.schedule_policy!r}; choose one of {', '.join(POLICIES)}")
        if self.speculate not in SPECULATE:
            raise MinillmError(f"unknown speculation {self.speculate!r}; choose one of {', '.join(SPECULATE)}")
        if self.draft_model is not None and self.speculate != "draft":
            raise MinillmError("a draft model is used only with speculate 'draft' (--speculate draft)")
        for name in ("max_batch", "max_prefill_tokens", "exact_chunk", "exact_decode_rows", "num_draft_tokens"):
            if getattr(self, name) < 1:
                raise MinillmError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.disk_cache_mb <= 0:
            raise MinillmError(f"disk_cache_mb must be positive, got {self.disk_cache_mb}")


@dataclass
class ServerOptions:
    model_name: str  # the id clients send as "model"
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 8000
    api_key: str | None = None  # then /v1 wants "Authorization: Bearer <key>"
    max_waiting: int | None = None  # 429 beyond this many waiting requests
    max_body_bytes: int = 4 * 2**20  # 413 beyond this (a 128k-token prompt: 0.5 MB of text, 1 MB of JSON ids)


@dataclass(frozen=True)
class ExactShape:
    """What exact mode (engine/exact.py) changes elsewhere, in one place."""

    align: int  # prefill chunks start, and cache hits end, on multiples of this (the scheduler, the KV manager)
    cache_decode_kv: bool  # decode-step KV may go into the tree (only prefill-shaped KV is reusable bit for bit)
    views: bool  # attention may read a run of consecutive slots as a view (bits must not depend on slots)
    disk_page: int  # the disk tier's page: exact mode's chunk, so pages are whole chunks

    @classmethod
    def of(cls, exact: bool, options: EngineOptions) -> ExactShape:
        if exact:
            return cls(align=options.exact_chunk, cache_decode_kv=False, views=False, disk_page=options.exact_chunk)
        return cls(align=1, cache_decode_kv=True, views=True, disk_page=disk_cache.DEFAULT_PAGE)
