"""What a checkpoint's generation_config.json asks for: the sampling settings, token budget and end-of-sequence
tokens that a request leaving them out gets (LLM.request)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .engine.sampling import SamplingParams
from .model.config import ModelConfig, read_json

DEFAULT_MAX_NEW_TOKENS = 128  # where generation_config.json names none


@dataclass
class GenerationDefaults:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_folder(cls, folder: Path, config: ModelConfig) -> GenerationDefaults:
        path = folder / "generation_config.json"
        raw = read_json(path) if path.is_file() else {}
        eos = raw.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        sampling = SamplingParams()
        if raw.get("do_sample"):  # as in transformers, sampling settings apply only when do_sample is set
            sampling.temperature = float(raw.get("temperature", 1.0))
            sampling.top_k = int(raw.get("top_k") or 0)
            sampling.top_p = float(raw.get("top_p", 1.0))
            sampling.min_p = float(raw.get("min_p") or 0.0)
        sampling.repetition_penalty = float(raw.get("repetition_penalty", 1.0))
        return cls(
            sampling=sampling,
            max_new_tokens=int(raw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            eos_token_ids=sorted(set(eos_ids) | set(config.eos_token_ids)),
        )
