"""Rotary position embeddings (RoPE) and the ways published checkpoints rescale them.

RoPE encodes position p by rotating each pair of channels (i, i + head_dim/2) of q and k by the angle
p * inv_freq[i]. A dot product q.k then depends only on the distance between the two positions.
inv_freq[i] = theta^(-2i/head_dim): fast rotations in the first channels, slow ones in the last.

Scaling variants stretch a model's context beyond its pretraining length by changing inv_freq:
  linear   divide every frequency by `factor` (positions are squeezed together);
  dynamic  NTK-aware: raise theta as the sequence grows past the pretrained length, recomputed per call;
  llama3   keep high frequencies, divide low ones by `factor`, blend smoothly in between;
  yarn     like llama3 but ramped over channel index, and cos/sin are scaled by an attention factor.
The formulas follow transformers' ROPE_INIT_FUNCTIONS so that logits agree bit for bit.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, RopeConfig


def _default_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    # [dim/2] float32: theta^(-2i/dim)
    return 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))


def _yarn_attention_factor(rope: RopeConfig) -> float:
    """YaRN scales cos/sin by 0.1 ln(factor) + 1 (softmax temperature), unless the config states it."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs  # the pretrained frequencies
    interpolation = 1.0 / (rope.factor * pos_freqs)  # linearly scaled ones

    # Channel index at which a frequency makes `rotations` full turns over the pretrained length.
    def channel(rotations: float) -> float:
        original = rope.original_max_position_embeddings
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = channel(rope.beta_fast), channel(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2) - low) / (high - low), 0, 1)  # float32, as transformers'
    keep = 1 - ramp  # 1: channel keeps its pretrained frequency; 0: channel is interpolated
    return interpolation * (1 - keep) + extrapolation * keep


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(rope.theta, dim)
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Computes cos/sin for the positions of one forward's rows; applied to q and k by `apply_rotary`."""

    def __init__(self, config: ModelConfig):
        self.rope = config.rope
        self.dim = config.head_dim
        self.max_position_embeddings = config.max_position_embeddings
        self.attention_scaling = 1.0
        kind = self.rope.type
        with torch.device("cpu"):  # real numbers even while the model is built on the meta device
            if kind == "linear":
                self.inv_freq = _default_inv_freq(self.rope.theta, self.dim) / self.rope.factor
            elif kind == "llama3":
                self.inv_freq = _llama3_inv_freq(self.rope, self.dim)
            elif kind == "yarn":
                self.inv_freq = _yarn_inv_freq(self.rope, self.dim)
                self.attention_scaling = _yarn_attention_factor(self.rope)
            else:  # default, and dynamic while the sequence fits the pretrained length
                self.inv_freq = _default_inv_freq(self.rope.theta, self.dim)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        """NTK-aware scaling: theta grows with the length actually used, so short sequences are untouched."""
        if seq_len <= self.max_position_embeddings:
            return self.inv_freq
        factor = self.rope.factor
        # Computed in float32 tensors, as transformers does, so the frequencies agree to the last bit.
        length = torch.tensor(seq_len)
        theta = self.rope.theta * ((factor * length / self.max_position_embeddings) - (factor - 1)) ** (
            self.dim / (self.dim - 2)
        )
        return _default_inv_freq(theta, self.dim)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [N] int64 -> cos, sin: [N, head_dim] in `dtype` (computed in float32, then cast).
        lengths: [N], the length of each row's sequence after this forward; only dynamic NTK scaling reads it
        (its frequencies depend on that length). None: one sequence, positions.max() + 1 long."""
        if self.rope.type == "dynamic":
            if lengths is None:
                lengths = positions.max().expand(positions.shape) + 1
            angles = torch.empty(positions.shape[0], self.dim // 2, device=positions.device)
            for length in lengths.unique().tolist():  # the rows of each sequence length share frequencies
                rows = lengths == length
                angles[rows] = torch.outer(positions[rows].float(), self._dynamic_inv_freq(length).to(positions.device))
        else:
            angles = torch.outer(positions.float(), self.inv_freq.to(positions.device))  # [N, head_dim/2]
        angles = torch.cat((angles, angles), dim=1)  # [N, head_dim]: the same angle for channel i and i+dim/2
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x: [heads, T, head_dim] by the angles in cos/sin: [T, head_dim].

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as x*cos + rotate_half(x)*sin where
    rotate_half(x) = (-x2, x1). This "half split" pairing is the Hugging Face layout (not interleaved pairs).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
