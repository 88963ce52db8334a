"""Calibration plumbing shared by GPTQ and AWQ: one decoder block, opened up, and batched passes over it.

Conventions
-----------
* :func:`block_parts` recomputes one block of :mod:`jaxkv.model` without a cache (positions
  ``0..T-1``, causal attention) and returns the input of every linear, which the model's fused
  ``_layer`` does not expose. It uses the model's own ``rms_norm``, ``apply_rope`` and ``dense`` (so a
  :class:`~jaxkv.quant.qarray.QArray` weight already quantized is used as such), and is tested to give
  the same block output as ``jaxkv.model.decoder``.
* Names of the linear inputs: ``attn_in`` (input of wq/wk/wv, after the attention RMSNorm), ``ctx``
  (input of wo: the attention context ``[B, T, N*H]``), ``mlp_in`` (input of w_gate/w_up), ``act``
  (input of w_down: ``silu(gate) * up``).
* Calibration windows are token ids ``[N, T]``; activations are processed ``batch`` windows at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ModelConfig
from jaxkv.model import apply_rope, dense, rms_norm, rope_inv_freq

INPUT_OF = {
    "wq": "attn_in",
    "wk": "attn_in",
    "wv": "attn_in",
    "wo": "ctx",
    "w_gate": "mlp_in",
    "w_up": "mlp_in",
    "w_down": "act",
}


def _causal_attention(q, k, v, cfg: ModelConfig) -> jax.Array:
    """q [B,T,N,H], k/v [B,T,K,H] -> context [B,T,N*H] (same arithmetic as jaxkv.model's attention)."""
    B, T, N, H = q.shape
    K, G = cfg.num_kv_heads, cfg.group_size
    qg = q.reshape(B, T, K, G, H)
    scores = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(H))
    pos = jnp.arange(T)
    mask = pos[None, :] <= pos[:, None]
    if cfg.sliding_window is not None:
        mask &= pos[None, :] > pos[:, None] - cfg.sliding_window
    scores = jnp.where(mask[None, :, None, None, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(B, T, N * H)


def attention_context(lp, h, cfg: ModelConfig) -> jax.Array:
    """The input of wo for normed hidden states ``h [B,T,D]``."""
    B, T, _ = h.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    inv_freq = rope_inv_freq(cfg)
    q, k, v = dense(h, lp["wq"]), dense(h, lp["wk"]), dense(h, lp["wv"])
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(q.reshape(B, T, N, H), positions, inv_freq)
    k = apply_rope(k.reshape(B, T, K, H), positions, inv_freq)
    return _causal_attention(q, k, v.reshape(B, T, K, H), cfg)


def attention_out(lp, h, cfg: ModelConfig) -> jax.Array:
    """The attention module's output (after wo) for normed hidden states ``h``."""
    return dense(attention_context(lp, h, cfg), lp["wo"])


def mlp_act(lp, h) -> jax.Array:
    return jax.nn.silu(dense(h, lp["w_gate"])) * dense(h, lp["w_up"])


def mlp_out(lp, h) -> jax.Array:
    return dense(mlp_act(lp, h), lp["w_down"])


def block_parts(lp, x, cfg: ModelConfig) -> dict[str, jax.Array]:
    """Every linear's input and the block output for block parameters ``lp`` and input ``x [B,T,D]``."""
    attn_in = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    ctx = attention_context(lp, attn_in, cfg)
    x = x + dense(ctx, lp["wo"])
    mlp_in = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    act = mlp_act(lp, mlp_in)
    out = x + dense(act, lp["w_down"])
    return {"attn_in": attn_in, "ctx": ctx, "mlp_in": mlp_in, "act": act, "out": out}


@functools.partial(jax.jit, static_argnames=("cfg", "want"))
def block_outputs(lp, x, cfg: ModelConfig, want: tuple[str, ...]) -> tuple[jax.Array, ...]:
    parts = block_parts(lp, x, cfg)
    return tuple(parts[w] for w in want)


def layer_params(layers: dict, l: int) -> dict:
    """Block ``l`` of the stacked ``params["layers"]`` (QArray leaves are sliced too)."""
    return jax.tree.map(lambda a: a[l], layers)


def embed_windows(params, tokens: np.ndarray) -> jax.Array:
    """Block-0 input ``[N, T, D]`` for calibration windows ``tokens [N, T]``."""
    return jnp.take(params["embed"], jnp.asarray(tokens, jnp.int32), axis=0)


def batches(n: int, batch: int):
    for i in range(0, n, batch):
        yield slice(i, min(i + batch, n))


def run_block(lp, X: jax.Array, cfg: ModelConfig, want: tuple[str, ...], batch: int) -> tuple[jax.Array, ...]:
    """``block_outputs`` over all windows of ``X [N, T, D]``, ``batch`` at a time, concatenated."""
    outs = [block_outputs(lp, X[s], cfg, want) for s in batches(X.shape[0], batch)]
    return tuple(jnp.concatenate([o[i] for o in outs], axis=0) for i in range(len(want)))


def progress_bar(iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
