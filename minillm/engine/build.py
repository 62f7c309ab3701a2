"""Assemble an engine from its options: the KV pool (made by the runner, so under tensor parallelism every rank
makes its own), the disk tier, the KV manager, the scheduler, speculation's drafter and the engine, each told
what exact mode and the model's RoPE require of it. LLM.configure (llm.py) calls this; a reader sees here every
part an engine has."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..cache import disk_cache
from ..cache.kv_pool import kv_bytes_per_token
from ..errors import MinillmError
from ..model.model import CausalLM
from ..options import EngineOptions, ExactShape
from .drafters import DraftModel, PromptLookup, TreeLookup
from .engine import Engine
from .kv_manager import KVManager
from .runner import Runner
from .scheduler import Scheduler
from .speculation import Speculation


def build_engine(
    runner: Runner,
    model: CausalLM,
    dtype: torch.dtype,
    device: str,
    exact: bool,
    model_dir: Path | None,
    settings: EngineOptions,
    draft: CausalLM | None = None,
) -> Engine:
    """A fresh engine: an empty KV pool and prefix cache (the disk tier, if any, keeps what earlier runs
    wrote). model_dir: what the disk tier's fingerprint hashes (None: no disk tier). draft: the draft model,
    for speculate="draft" (its KV gets a pool of its own, as many tokens as the model's)."""
    settings.check()
    shape = ExactShape.of(exact, settings)
    kv_tokens = settings.kv_tokens
    if kv_tokens is None:  # per rank under tensor parallelism: a rank holds only its kv heads
        kv_tokens = int(settings.kv_mb * 2**20) // kv_bytes_per_token(model.rank_config, dtype)
    if kv_tokens < 2:
        raise MinillmError(
            f"the KV pool must hold at least 2 tokens, got {kv_tokens} (kv_mb {settings.kv_mb}); raise --kv-mb"
        )
    cache_dir = settings.cache_dir or os.environ.get(disk_cache.ENV_DIR)
    if cache_dir and runner.ranks > 1:  # refused before any rank builds a new pool
        raise MinillmError(
            "the prefix cache's disk tier does not work with tensor parallelism yet "
            f"(each rank holds other kv heads); drop --cache-dir and unset {disk_cache.ENV_DIR}"
        )
    pool = runner.make_pool(kv_tokens + 1, dtype, device, settings.poison_freed)
    # Dynamic NTK RoPE rotates keys with frequencies that depend on the sequence length at the time, so KV
    # computed for a prefix is not what a longer request would compute: never reuse it, never chunk.
    dynamic = model.config.rope.type == "dynamic"
    prefix_cache = settings.prefix_cache and not dynamic
    disk = None
    if cache_dir and model_dir is not None and prefix_cache:
        facts = disk_cache.fingerprint(model_dir, dtype, exact, model.weight_form, shape.disk_page)
        budget = int(settings.disk_cache_mb * 2**20)
        disk = disk_cache.DiskCache(Path(cache_dir), facts, budget, shape.disk_page)
    kv = KVManager(pool, prefix_cache=prefix_cache, align=shape.align, cache_decode_kv=shape.cache_decode_kv, disk=disk)
    scheduler = Scheduler(
        kv,
        max_batch=settings.max_batch,
        max_prefill_tokens=settings.max_prefill_tokens,
        policy=settings.schedule_policy,
        chunk_prefill=not dynamic,
    )
    tiles = (settings.exact_chunk, settings.exact_decode_rows) if exact else None
    speculation = None
    if settings.speculate != "off":
        if settings.speculate == "lookup":
            drafter = PromptLookup()
        elif settings.speculate == "radix":
            drafter = TreeLookup(kv.tree)
        else:
            drafter = DraftModel(draft, pool.num_slots, draft.model.norm.weight.dtype, device)
        speculation = Speculation(drafter, kv, settings.num_draft_tokens)
    return Engine(runner, scheduler, tiles, shape.views, speculation)
