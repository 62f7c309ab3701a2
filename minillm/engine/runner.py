"""The runner: what runs a step's forward. One seam, so a single process and rank 0 of a tensor-parallel group
take the same lines in the engine and in LLM:

    make_pool(num_slots, dtype, device, poison_freed)  the KV pool (on every rank, with the same slots)
    forward(pool, segments, views)                     one forward over the step's rows: logits [R, vocab]
    logits(ids)                                        LLM.logits: one forward, nothing cached
    check()                                            raise if it can no longer run (a lost rank)
    close()

LocalRunner runs them in this process; ranks.Leader sends each one to the tensor-parallel followers first
and then runs it too, the collectives inside the forward keeping the ranks in step.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..cache.kv_pool import KVPool
from ..model.model import CausalLM, SequenceKV
from . import forward_batch
from .plan import Segment


class Runner(Protocol):
    ranks: int  # processes that hold a share of the model

    def make_pool(self, num_slots: int, dtype: torch.dtype, device: str, poison_freed: bool) -> KVPool: ...

    def forward(self, pool: KVPool, segments: list[Segment], views: bool) -> torch.Tensor: ...

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...

    def check(self) -> None: ...

    def close(self) -> None: ...


class LocalRunner:
    """The whole model in this process."""

    ranks = 1

    def __init__(self, model: CausalLM):
        self.model = model

    def make_pool(self, num_slots: int, dtype: torch.dtype, device: str, poison_freed: bool) -> KVPool:
        return KVPool(self.model.rank_config, num_slots, dtype, device, poison_freed)

    def forward(self, pool: KVPool, segments: list[Segment], views: bool) -> torch.Tensor:
        return forward_batch.run(self.model, pool, segments, views)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, torch.arange(len(ids), device=ids.device), SequenceKV())

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass
