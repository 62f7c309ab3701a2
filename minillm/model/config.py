"""config.json -> ModelConfig: the handful of numbers that fix a model's shape and math.

Hugging Face configs come in two layouts. transformers 4 writes `rope_theta` and `rope_scaling` (whose type
key is `type` or `rope_type`) and `torch_dtype`; transformers 5 writes `rope_parameters` (theta included) and
`dtype`. A key that is missing takes the default of that model family's config class in transformers, since
that is what the checkpoint was trained and published against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MinillmError

# architecture name in config.json -> family. All four are the same decoder; they differ in the details below.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# Defaults of each family's config class in transformers, used when config.json leaves a key out.
FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, head_dim=None, sliding_window=None),
    "mistral": dict(max_position_embeddings=4096 * 32, head_dim=None, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, head_dim=None, sliding_window=4096),
    "qwen3": dict(max_position_embeddings=32768, head_dim=128, sliding_window=4096),
}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RopeConfig:
    """Rotary position embedding settings: the base `theta`, and how (if at all) the frequencies are rescaled
    for contexts longer than the model was pretrained on."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3: frequencies between these wavelengths are blended; yarn: ramp limits, attention factor.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q_proj, k_proj, v_proj
    o_bias: bool  # bias on o_proj
    mlp_bias: bool  # bias on gate/up/down
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    rope: RopeConfig
    # Per layer: None (full causal attention) or W, the number of keys a query sees (itself included).
    sliding_windows: list[int | None] = field(default_factory=list)
    dtype: torch.dtype | None = None  # the checkpoint's declared dtype
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + generated) the model is meant to see. Dynamic NTK scaling exists to
        stretch the pretrained length by its factor; every other type already states the extended length."""
        if self.rope.type == "dynamic":
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _parse_rope(raw: dict) -> RopeConfig:
    # transformers 5: everything in rope_parameters. transformers 4: rope_theta beside rope_scaling.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if "rope_theta" in params:
        theta = params["rope_theta"]
    else:
        theta = raw.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise MinillmError(
            f"unsupported RoPE scaling type {rope_type!r} in config.json; supported: {', '.join(ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise MinillmError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    rope = RopeConfig(type=rope_type, theta=float(theta))
    if rope_type == "default":
        return rope
    # yarn may leave `factor` out and let it follow from the two lengths; the others need it.
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    if rope_type in ("llama3", "yarn"):
        rope.original_max_position_embeddings = int(original or raw.get("max_position_embeddings"))
    if factor is None:
        if rope_type != "yarn":
            raise MinillmError(f"config.json: RoPE type {rope_type!r} needs a 'factor'")
        factor = raw["max_position_embeddings"] / rope.original_max_position_embeddings
    rope.factor = float(factor)
    for key in ("low_freq_factor", "high_freq_factor", "attention_factor", "mscale", "mscale_all_dim"):
        if params.get(key) is not None:
            setattr(rope, key, float(params[key]))
    # transformers treats a missing or zero beta as the paper's default (32 and 1).
    rope.beta_fast = float(params.get("beta_fast") or 32)
    rope.beta_slow = float(params.get("beta_slow") or 1)
    rope.truncate = bool(params.get("truncate", True))
    return rope


def _sliding_windows(raw: dict, family: str, num_layers: int) -> list[int | None]:
    """Which layers use sliding-window attention, and how wide. Mistral: every layer when `sliding_window` is
    set. Qwen2/Qwen3: only if `use_sliding_window`, and then only layers >= `max_window_layers` (or as
    `layer_types` lists them)."""
    window = raw.get("sliding_window", FAMILY_DEFAULTS[family]["sliding_window"])
    if family == "llama" or window is None:
        return [None] * num_layers
    if family == "mistral":
        return [int(window)] * num_layers
    if not raw.get("use_sliding_window", False):
        return [None] * num_layers
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention" for i in range(num_layers)
    ]
    return [int(window) if t == "sliding_attention" else None for t in layer_types]


def parse_config(raw: dict) -> ModelConfig:
    """Build a ModelConfig from the dict in config.json, refusing what this engine cannot run correctly."""
    architectures = raw.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    arch = next((a for a in architectures if a in ARCHITECTURES), None)
    if arch is None:
        named = ", ".join(architectures) or f"model_type {raw.get('model_type')!r}"
        raise MinillmError(f"unsupported architecture {named}; supported: {supported}")
    family = ARCHITECTURES[arch]
    defaults = FAMILY_DEFAULTS[family]
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        num_layers = int(raw["num_hidden_layers"])
        vocab_size = int(raw["vocab_size"])
        intermediate = int(raw["intermediate_size"])
    except KeyError as e:
        raise MinillmError(f"config.json lacks the required key {e.args[0]!r}") from None
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise MinillmError(f"unsupported hidden_act {act!r} in config.json; only 'silu' (SwiGLU) is supported")
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = raw.get("head_dim", defaults["head_dim"]) or hidden // heads
    if heads % kv_heads:
        raise MinillmError(
            f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    attention_bias = bool(raw.get("attention_bias", False))
    dtype_name = raw.get("dtype", raw.get("torch_dtype"))
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", defaults["max_position_embeddings"])),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else attention_bias and family != "mistral",
        o_bias=attention_bias and family in ("llama", "qwen3"),
        mlp_bias=bool(raw.get("mlp_bias", False)) and family == "llama",
        qk_norm=family == "qwen3",
        rope=_parse_rope(raw),
        sliding_windows=_sliding_windows(raw, family, num_layers),
        dtype=DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_id_list(raw.get("eos_token_id")),
    )


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config, generation or tokenizer settings), or one line saying it is broken."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinillmError(f"{path} is not valid JSON ({e})") from None


def load_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise MinillmError(f"{folder} has no config.json; point --model at a Hugging Face checkpoint folder")
    return parse_config(read_json(path))
