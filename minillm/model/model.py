"""The decoder shared by Llama, Mistral, Qwen2 and Qwen3, written out layer by layer.

    tokens -> embed -> N x [ x + Attention(RMSNorm(x)) ; x + MLP(RMSNorm(x)) ] -> RMSNorm -> lm_head -> logits

Module and parameter names mirror the Hugging Face checkpoints (model.layers.3.self_attn.q_proj.weight...),
so a checkpoint's tensors load with no renaming. Activations are [N, hidden]: the N rows of this forward,
which may belong to many sequences (each row carries its own position); only attention needs to know
which rows belong together, and that is the `kv` object's job.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rotary
from .tensor_parallel import TensorParallel


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight. Statistics in float32 whatever the model dtype; the result is cast
    back before the multiply by weight (the order transformers uses, which matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """Grouped-query attention: num_heads query heads share num_kv_heads key/value heads (num_heads /
    num_kv_heads queries per kv head), which shrinks the KV cache by that ratio."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.q_proj_size, self.kv_proj_size = q_dim, kv_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_bias)
        # Qwen3 normalises each head of q and k (over head_dim) before RoPE, which keeps attention logits tame.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.qkv_proj = None  # prepack.py / quantize.py may stack q/k/v_proj into one matrix: one product, not three

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv, layer: int, window: int | None):
        """x [N, hidden]: the rows of this forward (of one or many sequences). kv stores the new keys/values
        and runs attention over each sequence's own (forward_batch.ForwardBatch, or SequenceKV below)."""
        N = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.q_proj_size, self.kv_proj_size, self.kv_proj_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(N, self.num_heads, self.head_dim)
        k = k.view(N, self.num_kv_heads, self.head_dim)
        v = v.view(N, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(0, 1), cos, sin)  # [heads, N, head_dim]
        k = apply_rotary(k.transpose(0, 1), cos, sin)  # [kv_heads, N, head_dim]
        out = kv.attend(layer, window, q, k, v.transpose(0, 1))  # [N, heads * head_dim]
        return self.o_proj(out)


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for one sequence, each query head reading kv head (head // group).

    q: [heads, T, head_dim], the sequence's T newest tokens; keys, values: [kv_heads, L, head_dim], all of its
    tokens so far (the T new ones last). Returns [T, heads * head_dim]."""
    heads, T, head_dim = q.shape
    kv_heads = keys.shape[0]
    if T == 1:
        # Decode: the group of query heads that share a kv head (consecutive heads) become that many query
        # rows against its keys. The same attention (up to rounding), as one dense product per kv head
        # instead of a kernel built for long query blocks: measured on CPU at 200-1,600 cached tokens, 2-3x
        # faster in fp32 and 8-12x in bf16.
        out = F.scaled_dot_product_attention(
            q.view(1, kv_heads, heads // kv_heads, head_dim),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,  # [1, keys]: the one query's mask serves every row
        )  # [1, kv_heads, group, head_dim]
        return out.view(1, heads * head_dim)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0),
        keys.unsqueeze(0),
        values.unsqueeze(0),
        attn_mask=mask,
        is_causal=is_causal,
        enable_gqa=heads != kv_heads,
    )  # [1, heads, T, head_dim]
    return out[0].transpose(0, 1).reshape(T, heads * head_dim)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate decides, per hidden unit, how much of up(x) passes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.gate_up_proj = None  # prepack.py / quantize.py may stack gate_proj and up_proj into one matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.sliding_window = config.sliding_windows[layer]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv, tp: TensorParallel):
        # Under tensor parallelism o_proj and down_proj give each rank a partial sum: all_reduce adds them.
        x = x + tp.all_reduce(self.self_attn(self.input_layernorm(x), cos, sin, kv, self.layer, self.sliding_window))
        return x + tp.all_reduce(self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def attention_mask(start: int, T: int, window: int | None, device) -> tuple[torch.Tensor | None, bool]:
    """Which keys each of the T new queries may see, as (mask, is_causal) for scaled_dot_product_attention.

    Query i sits at position start + i; key j at position j. Causal: j <= start + i. A sliding window of W
    also drops keys W or more positions back: j > start + i - W. Plain causal attention over a fresh sequence
    is SDPA's is_causal; one decode query over a short enough past needs no mask at all.
    """
    length = start + T
    if window is None or length <= window:
        if T == 1:
            return None, False
        if start == 0:
            return None, True
    query_pos = torch.arange(start, length, device=device)[:, None]  # [T, 1]
    key_pos = torch.arange(length, device=device)[None, :]  # [1, start + T]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed, False  # [T, start + T] bool


class KV(Protocol):
    """What a forward attends through (the `kv` argument of CausalLM.forward): it knows which rows belong to
    which sequence and where their keys and values are kept. SequenceKV below keeps nothing;
    forward_batch.ForwardBatch stores them in the shared KV pool, for many sequences at once."""

    lengths: torch.Tensor | None  # [N] each row's sequence length (for dynamic RoPE), or None: one sequence

    def attend(
        self, layer: int, window: int | None, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """q [heads, N, head_dim], this layer's new keys/values [kv_heads, N, head_dim]: store them if it keeps
        KV, and attend each row over its own sequence's keys: [N, heads * head_dim]."""
        ...


class SequenceKV:
    """Attention for a forward over one whole sequence that keeps nothing: LLM.logits() and training (whose
    gradients cannot flow through the in-place writes of the KV pool). The generation engine uses
    forward_batch.ForwardBatch instead, which stores KV in the pool and serves many sequences at once."""

    lengths = None  # one sequence: its length is its last position + 1

    def attend(self, layer: int, window: int | None, q, keys, values) -> torch.Tensor:
        mask, is_causal = attention_mask(0, q.shape[1], window, q.device)
        return attend(q, keys, values, mask, is_causal)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None):
        """tp: this process's rank in a tensor-parallel group (tensor_parallel.py): the modules are then built
        with this rank's share of the heads, MLP units and vocabulary. None: one rank, the whole model."""
        super().__init__()
        self.config = config
        self.tp = tp or TensorParallel(config)
        self.rank_config = self.tp.rank_config(config)  # == config on one rank
        self.model = Decoder(self.rank_config)
        self.lm_head = nn.Linear(config.hidden_size, self.rank_config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        # what the loader made of the matrices ("plain", "prepacked", "q8_0", "q4_1-g32-head-q8_0", "bf16-kept"):
        # the disk tier keeps KV computed by each form apart
        self.weight_form = "plain"

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KV, logit_rows=slice(None)) -> torch.Tensor:
        """Run the rows tokens [N] (int64) at positions [N]: one sequence's tokens, or the rows of many
        sequences side by side. Every matrix product takes all N rows at once (the weights are read once for
        all of them); kv.attend stores each row's keys/values and lets it attend within its own sequence.

        Returns the logits [rows, vocab] of the rows picked by logit_rows (a slice or index tensor): those that
        choose a next token. Skipping the others spares rows of the largest matrix product. Differentiable:
        training calls it too; the engine runs it under torch.inference_mode().
        """
        x = self.tp.embed(self.model.embed_tokens, tokens)  # [N, hidden]
        cos, sin = self.rotary.cos_sin(positions, x.dtype, kv.lengths)  # [N, head_dim]
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv, self.tp)
        return self.tp.gather_logits(self.lm_head(self.model.norm(x[logit_rows])))
