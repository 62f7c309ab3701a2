"""minillm: a small, readable inference engine for Llama- and Qwen-family checkpoints."""

from .engine.request import Completion
from .errors import MinillmError
from .llm import LLM

__all__ = ["LLM", "Completion", "MinillmError"]
