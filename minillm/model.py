"""The decoder shared by Llama, Mistral, Qwen2 and Qwen3, written out layer by layer.

    tokens -> embed -> N x [ x + Attention(RMSNorm(x)) ; x + MLP(RMSNorm(x)) ] -> RMSNorm -> lm_head -> logits

Module and parameter names mirror the Hugging Face checkpoints (model.layers.3.self_attn.q_proj.weight...),
so a checkpoint's tensors load with no renaming. One sequence at a time: activations are [T, hidden] for
the T tokens of this call, which follow the `cache.length` tokens already in the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .rope import RotaryEmbedding, apply_rotary


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
        hidden, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj_size, self.kv_proj_size = q_dim, kv_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_bias)
        # Qwen3 normalises each head of q and k (over head_dim) before RoPE, which keeps attention logits tame.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.qkv_proj = None  # prepack.py may replace q/k/v_proj by one stacked matrix: one product, not three

    def forward(self, x, cos, sin, cache: KVCache, layer: int, mask: torch.Tensor | None, is_causal: bool):
        T = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.q_proj_size, self.kv_proj_size, self.kv_proj_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(0, 1), cos, sin)  # [heads, T, head_dim]
        k = apply_rotary(k.transpose(0, 1), cos, sin)  # [kv_heads, T, head_dim]
        keys, values = cache.write(layer, k, v.transpose(0, 1))  # [kv_heads, cached + T, head_dim]
        # softmax(q k^T / sqrt(head_dim)) v, each query head reading kv head (head // group size).
        if T == 1:
            # Decode: the group of query heads that share a kv head (consecutive heads) become that many
            # query rows against its keys. The same attention (up to rounding), as one dense product per kv
            # head instead of a kernel built for long query blocks: measured on CPU at 200-1,600 cached
            # tokens, 2-3x faster in fp32 and 8-12x in bf16.
            group = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(
                q.view(1, self.num_kv_heads, group, self.head_dim), keys.unsqueeze(0), values.unsqueeze(0),
                attn_mask=mask,  # [1, keys]: the one query's mask serves every row
            )  # [1, kv_heads, group, head_dim]
            return self.o_proj(out.view(1, self.num_heads * self.head_dim))
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [1, heads, T, head_dim]
        return self.o_proj(out[0].transpose(0, 1).reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate decides, per hidden unit, how much of up(x) passes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.gate_up_proj = None  # prepack.py may stack gate_proj and up_proj into one matrix

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

    def forward(self, x, cos, sin, cache: KVCache, masks: dict):
        mask, is_causal = masks[self.sliding_window]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


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


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)

    def forward(self, tokens: torch.Tensor, cache: KVCache, logit_rows: slice = slice(-1, None)) -> torch.Tensor:
        """Run tokens [T] (int64) that follow the cache's contents; append their keys/values to the cache.

        Returns the logits [rows, vocab] of the rows picked by logit_rows: by default only the last token's
        (all that generation needs, and it spares T-1 rows of the largest matrix product); slice(None) for
        every row. Differentiable: training calls it too; the engine runs it under torch.inference_mode().
        """
        start, T = cache.length, tokens.shape[0]
        cache.reserve(start + T)
        positions = torch.arange(start, start + T, device=tokens.device)
        x = self.model.embed_tokens(tokens)  # [T, hidden]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)  # [T, head_dim]
        masks = {w: attention_mask(start, T, w, tokens.device) for w in set(self.config.sliding_windows)}
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, masks)
        cache.advance(T)
        return self.lm_head(self.model.norm(x[logit_rows]))
