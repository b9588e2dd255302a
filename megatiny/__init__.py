"""megatiny: a small Megatron-style model-parallel LLM training codebase."""

__version__ = "0.1.0"
