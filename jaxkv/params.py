"""The parameter pytree: every array described once (shape, logical axes), init derived from it.

Layout (a plain nested dict; layers are stacked on a leading L axis and scanned over)::

    embed        [V, D]
    layers/
      attn_norm  [L, D]
      wq         [L, D, N*H]      matrices are stored (in, out): y = x @ w
      wk, wv     [L, D, K*H]
      bq         [L, N*H]         only when cfg.attention_bias (Qwen2)
      bk, bv     [L, K*H]
      wo         [L, N*H, D]
      mlp_norm   [L, D]
      w_gate     [L, D, F]
      w_up       [L, D, F]
      w_down     [L, F, D]
    final_norm   [D]
    lm_head      [D, V]           absent when cfg.tie_word_embeddings (logits = h @ embed.T)

Query/key columns of wq/wk are in the Hugging Face order (head-major, rotate-half RoPE).
Logical axis names are the ones sharding rules refer to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """Shape and logical axis names of one parameter."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # "normal" (std 0.02) | "ones" | "zeros"


def param_infos(cfg: ModelConfig) -> dict:
    """The nested dict of :class:`ArrayInfo` describing every parameter of ``cfg``."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    QH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = {
        "attn_norm": ArrayInfo((L, D), ("layers", "embed"), "ones"),
        "wq": ArrayInfo((L, D, QH), ("layers", "embed", "q_heads")),
        "wk": ArrayInfo((L, D, KH), ("layers", "embed", "kv_heads")),
        "wv": ArrayInfo((L, D, KH), ("layers", "embed", "kv_heads")),
        "wo": ArrayInfo((L, QH, D), ("layers", "q_heads", "embed")),
        "mlp_norm": ArrayInfo((L, D), ("layers", "embed"), "ones"),
        "w_gate": ArrayInfo((L, D, F), ("layers", "embed", "mlp")),
        "w_up": ArrayInfo((L, D, F), ("layers", "embed", "mlp")),
        "w_down": ArrayInfo((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.attention_bias:
        layers["bq"] = ArrayInfo((L, QH), ("layers", "q_heads"), "zeros")
        layers["bk"] = ArrayInfo((L, KH), ("layers", "kv_heads"), "zeros")
        layers["bv"] = ArrayInfo((L, KH), ("layers", "kv_heads"), "zeros")
    infos = {
        "embed": ArrayInfo((V, D), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ArrayInfo((D,), ("embed",), "ones"),
    }
    if not cfg.tie_word_embeddings:
        infos["lm_head"] = ArrayInfo((D, V), ("embed", "vocab"))
    return infos


def _is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters (std 0.02 normals, unit norms): for tests and shape-only benchmarks."""
    infos = param_infos(cfg)
    leaves, treedef = jax.tree.flatten(infos, is_leaf=_is_info)
    keys = jax.random.split(key, len(leaves))

    def make(info: ArrayInfo, k):
        if info.init == "ones":
            return jnp.ones(info.shape, dtype)
        if info.init == "zeros":
            return jnp.zeros(info.shape, dtype)
        return (0.02 * jax.random.normal(k, info.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(i, k) for i, k in zip(leaves, keys)])


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Raise ValueError naming the first leaf whose presence or shape does not match ``cfg``."""
    infos = param_infos(cfg)
    want = {
        jax.tree_util.keystr(p): i for p, i in jax.tree_util.tree_leaves_with_path(infos, is_leaf=_is_info)
    }
    have = {
        jax.tree_util.keystr(p): x
        for p, x in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: hasattr(x, "shape"))
    }
    for name in sorted(set(want) - set(have)):
        raise ValueError(f"parameter {name} is missing (expected shape {want[name].shape})")
    for name in sorted(set(have) - set(want)):
        raise ValueError(f"parameter {name} is not part of this model configuration")
    for name, info in want.items():
        shape = tuple(have[name].shape)
        if shape != info.shape:
            raise ValueError(f"parameter {name} has shape {shape}, the config implies {info.shape}")


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
