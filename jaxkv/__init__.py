"""jaxkv: low-bit LLM inference in JAX that keeps the pivot tokens' KV cache intact (IntactKV)."""

__version__ = "0.1.0"
