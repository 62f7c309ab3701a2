"""minillm: a small, readable inference engine for Llama- and Qwen-family checkpoints."""

from .engine import LLM, Completion
from .errors import MinillmError

__all__ = ["LLM", "Completion", "MinillmError"]
