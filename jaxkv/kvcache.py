"""The KV cache pytree: a full-precision pivot segment shared by the batch, then a per-sequence body.

Layout (dimension alphabet of ``jaxkv.config``)::

    pivot_k, pivot_v   [L, P, K, H]     pivot tokens (IntactKV prefix); P may be 0
    k, v               [L, B, S, K, H]  body: slot s of sequence b holds position P + s
    lengths            [B] int32        body slots filled per sequence

Positions: the pivot holds positions 0..P-1 for every sequence; body slot ``s`` is position ``P + s``.
A batch of prompts of different lengths is right-padded: padding tokens carry position -1 and are
never written, so ``lengths[b]`` counts only real tokens and the next token of sequence ``b`` goes to
slot ``lengths[b]``. The maximum length ``S`` is fixed when the cache is created.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    pivot_k: jax.Array
    pivot_v: jax.Array
    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        """S: body slots per sequence."""
        return self.k.shape[2]

    @property
    def pivot_len(self) -> int:
        """P: pivot positions shared by the batch."""
        return self.pivot_k.shape[1]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def init_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    dtype=jnp.float32,
    pivot_k: jax.Array | None = None,
    pivot_v: jax.Array | None = None,
) -> KVCache:
    """An empty cache of ``max_len`` body slots, optionally starting with pivot K/V ``[L, P, K, H]``."""
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    if (pivot_k is None) != (pivot_v is None):
        raise ValueError("pivot_k and pivot_v must be given together")
    if pivot_k is None:
        pivot_k, pivot_v = jnp.zeros((L, 0, K, H), dtype), jnp.zeros((L, 0, K, H), dtype)
    if pivot_k.shape != pivot_v.shape or pivot_k.shape[0] != L or pivot_k.shape[2:] != (K, H):
        raise ValueError(
            f"pivot K/V have shapes {pivot_k.shape} and {pivot_v.shape}, expected [L={L}, P, K={K}, H={H}]"
        )
    # Separate buffers for k and v: the cache is donated, and one buffer cannot be donated twice.
    return KVCache(
        # Copies: the cache is donated to jitted steps, which must not consume the caller's prefix.
        pivot_k=jnp.array(pivot_k, dtype=dtype, copy=True),
        pivot_v=jnp.array(pivot_v, dtype=dtype, copy=True),
        k=jnp.zeros((L, batch, max_len, K, H), dtype),
        v=jnp.zeros((L, batch, max_len, K, H), dtype),
        lengths=jnp.zeros((batch,), jnp.int32),
    )
