"""minillm: a small, readable inference engine for Llama- and Qwen-family checkpoints."""

from .errors import MinillmError
from .llm import LLM
from .request import Completion

__all__ = ["LLM", "Completion", "MinillmError"]
