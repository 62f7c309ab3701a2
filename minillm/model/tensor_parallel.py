"""Tensor parallelism, the math: which slice of every weight a rank holds, and the three collectives.

N ranks (processes, on one machine or several) each hold 1/N of every weight matrix and run the same
forward on the same rows. A decoder layer splits with two all-reduces (Megatron-LM's scheme):

    column-parallel (output rows split)   q_proj, k_proj, v_proj: a rank computes its own heads
                                          gate_proj, up_proj: its own share of the MLP's units
    (in between: attention over the rank's heads, SwiGLU over its units: no communication)
    row-parallel (input columns split)    o_proj, down_proj: each rank's product is a partial sum over its
                                          heads / units; an all-reduce adds the N partial sums

A query head only ever reads its own kv head, so attention and the KV cache split with no communication:
each rank's KV pool holds only its kv heads (1/N of the KV bytes). When ranks outnumber kv heads, N / kv
ranks hold the same kv head (replicated, as vLLM does); N must divide the heads, the kv heads (or be a
multiple of them) and the MLP size, and anything else is refused.

The embedding and the output head are vocab-parallel: a rank holds rows [start, start + V/N) of the
vocabulary (the last one padded with zero rows when N does not divide V). A lookup gives zeros for tokens
outside the rank's rows, and an all-reduce fills them in; each rank's logits cover its rows, and an
all-gather puts the vocabulary back together. Why not replicate them: in small models they are the largest
matrices (in Qwen2.5-0.5B the tied embedding is 27% of the weights), and the output head is the most
expensive product of a decode step; replicated, every rank would read all of it every step.

Norm weights (and Qwen3's q/k norms, per head) are replicated: they are tiny. A row-parallel bias is added
once, by rank 0 (the others hold zeros), not N times.

With one rank (TensorParallel(config), what a model gets by default) every collective is the identity and
every slice the whole tensor: one code path.
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import torch
import torch.distributed as dist
from torch import nn

from ..errors import MinillmError
from .config import ModelConfig

ROW = ("o_proj", "down_proj")  # split along dim 1 (input columns); the bias on rank 0
VOCAB = ("embed_tokens", "lm_head")  # split along dim 0 (rows of the vocabulary)


class RankFailure(MinillmError):
    """Another rank died, hung past the timeout, or broke the connection: this one cannot go on."""


class TensorParallel:
    """This process's place among the ranks: rank, size, and what its slices of the model are."""

    def __init__(self, config: ModelConfig, rank: int = 0, size: int = 1):
        check(config, size)
        self.rank, self.size = rank, size
        self.heads = config.num_heads // size
        self.kv_heads = max(1, config.num_kv_heads // size)
        self.first_kv_head = rank * config.num_kv_heads // size  # with replication, N / kv ranks share one
        self.intermediate = config.intermediate_size // size
        self.vocab = math.ceil(config.vocab_size / size)  # rows per rank; the last may be partly padding
        self.vocab_start = rank * self.vocab
        self.full_vocab = config.vocab_size

    def rank_config(self, config: ModelConfig) -> ModelConfig:
        """The config of this rank's shard: the model's modules are built from it with no other change."""
        return dataclasses.replace(
            config,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
        )

    # -- slicing the checkpoint -------------------------------------------------------------------------

    def slice(self, name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (its full shape already checked). Slices along dim 0
        are views of the memory-mapped file (only their pages are ever read); along dim 1 a copy of the slice."""
        if self.size == 1:
            return tensor
        module = name.split(".")[-2]
        hd = config.head_dim
        if module == "q_proj":  # column-parallel (q, k, v, gate, up): split along dim 0, weight and bias
            return tensor.narrow(0, self.rank * self.heads * hd, self.heads * hd)
        if module in ("k_proj", "v_proj"):
            return tensor.narrow(0, self.first_kv_head * hd, self.kv_heads * hd)
        if module in ("gate_proj", "up_proj"):
            return tensor.narrow(0, self.rank * self.intermediate, self.intermediate)
        if module in ROW and name.endswith(".bias"):
            return tensor if self.rank == 0 else torch.zeros_like(tensor)
        if module == "o_proj":
            return tensor.narrow(1, self.rank * self.heads * hd, self.heads * hd).contiguous()
        if module == "down_proj":
            return tensor.narrow(1, self.rank * self.intermediate, self.intermediate).contiguous()
        if module in VOCAB:
            rows = tensor[self.vocab_start : self.vocab_start + self.vocab]  # [<= vocab, hidden]
            if rows.shape[0] < self.vocab:  # the last rank: pad to the common size with zero rows
                rows = torch.cat([rows, rows.new_zeros(self.vocab - rows.shape[0], rows.shape[1])])
            return rows
        return tensor  # norms: replicated

    # -- the collectives --------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x (row-parallel partial sums), in place."""
        if self.size > 1:
            _collective(dist.all_reduce, x)
        return x

    def embed(self, table: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of tokens [N]: each rank looks up the tokens in its part of the vocabulary (zeros for
        the others), and the all-reduce adds the one non-zero row per token: exactly the full lookup."""
        if self.size == 1:
            return table(tokens)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.vocab)
        rows = table(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0)  # [N, hidden]
        return self.all_reduce(rows)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Each rank's logits [R, vocab / N] -> every rank gets the whole [R, vocab] (padding dropped)."""
        if self.size == 1 or logits.shape[0] == 0:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        _collective(dist.all_gather, parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[:, : self.full_vocab]

    def broadcast(self, message=None):
        """Rank 0 sends message (any picklable object, CPU tensors inside) to every rank; every rank returns
        it. Two broadcasts: the length, then the bytes (on the GPU under NCCL, which moves only GPU tensors)."""
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8).to(device)
            length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        else:
            length = torch.zeros(1, dtype=torch.int64, device=device)
        _collective(dist.broadcast, length, 0)
        if self.rank != 0:
            data = torch.empty(int(length), dtype=torch.uint8, device=device)
        _collective(dist.broadcast, data, 0)
        return message if self.rank == 0 else pickle.loads(data.cpu().numpy().tobytes())


def check(config: ModelConfig, size: int) -> None:
    """Refuse, in one line, a split the model's shapes do not allow."""
    if size < 1:
        raise MinillmError(f"tensor parallel size must be at least 1, got {size}")
    kv = config.num_kv_heads
    problems = [
        (config.num_heads % size, f"{config.num_heads} attention heads"),
        (config.intermediate_size % size, f"MLP size {config.intermediate_size}"),
        (kv % size if size <= kv else size % kv, f"{kv} kv heads (or be a multiple of them)"),
    ]
    for bad, what in problems:
        if bad:
            raise MinillmError(f"tensor parallel size {size} must divide the model's {what}; choose another --tp")


def _collective(op, *args) -> None:
    """Run a torch.distributed collective; a broken or timed-out connection becomes one RankFailure line."""
    try:
        op(*args)
    except RuntimeError as e:
        text = str(e)
        if "timed out" in text.lower():
            reason = "no answer within the timeout: a rank hung, or is far slower than the others"
        elif any(word in text for word in ("by peer", "Broken pipe", "Connection refused", "Connection closed")):
            reason = "the connection to another rank broke: it exited or crashed"
        else:
            reason = (text.strip().splitlines() or [type(e).__name__])[0][:160]
        raise RankFailure(f"tensor parallel: lost another rank ({reason}); every rank stops") from None
