"""IntactKV prefixes: the pivot tokens' K/V computed by the full-precision model, kept intact.

Conventions
-----------
* A :class:`Prefix` holds ``k``/``v`` ``[L, P, K, H]`` (after RoPE, exactly what the cache stores for
  positions 0..P-1), the pivot token ids, the full-precision logits at the last pivot position
  ``[V]``, and the fingerprint of the full-precision model it came from.
* Pivots: ``"bos"`` is IntactKV[B] (the BOS token alone); ``"system"`` is IntactKV[P]: every token
  the chat template puts before the user's message (BOS, the system prompt, the user turn header),
  i.e. the longest prefix shared by all chat prompts; a string is tokenized without special tokens;
  a list of ints is taken as is.
* A prefix is used by placing it in the cache's pivot segment (``jaxkv.kvcache.init_cache``); the
  prompt then starts at position P. It is shared by the whole batch.
"""

from __future__ import annotations

import hashlib
import json

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.kvcache import init_cache
from jaxkv.model import forward


@flax.struct.dataclass
class Prefix:
    k: jax.Array  # [L, P, K, H]
    v: jax.Array  # [L, P, K, H]
    logits: jax.Array  # [V] full-precision logits at the last pivot position
    tokens: tuple[int, ...] = flax.struct.field(pytree_node=False)
    fingerprint: str = flax.struct.field(pytree_node=False)

    @property
    def length(self) -> int:
        return len(self.tokens)


def params_fingerprint(params, cfg: ModelConfig) -> str:
    """A short hash identifying a full-precision model: its config and samples of its weights.

    Sampling (first rows of a few tensors) keeps this cheap for 70B models while still telling
    different checkpoints of the same shape apart.
    """
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    layers = params["layers"]
    for leaf in (params["embed"], layers["wq"], layers["w_down"], params["final_norm"]):
        sample = np.asarray(jax.device_get(leaf[:2] if leaf.ndim > 1 else leaf), np.float32)
        h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """The fingerprint of ``model``'s full-precision origin (quantized models carry it along)."""
    fp = getattr(model, "fingerprint", None)
    return fp if fp else params_fingerprint(model.params, model.cfg)


def pivot_tokens(model, pivot) -> list[int]:
    """Token ids of a pivot spec: "bos", "system", a string, or a list of ids."""
    cfg, tok = model.cfg, getattr(model, "tokenizer", None)
    if isinstance(pivot, str) and pivot == "bos":
        if cfg.bos_token_id is None:
            raise JaxkvError("this model has no BOS token; give the pivot tokens explicitly")
        return [cfg.bos_token_id]
    if isinstance(pivot, str) and pivot == "system":
        if tok is None or not getattr(tok, "chat_template", None):
            raise JaxkvError("pivot 'system' needs a tokenizer with a chat template")
        # Everything before the user's message is shared by every chat prompt: render two
        # conversations that differ only in the message and keep their common token prefix.
        a, b = (
            tok.apply_chat_template(
                [{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True
            )
            for m in ("Alpha", "Zulu")
        )
        common = a[: next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]
        ids = tok.encode(common, add_special_tokens=False)
        # Keep only tokens that both full prompts also start with: the last one could merge with the
        # message when the whole prompt is encoded as one text.
        full = [tok.encode(t, add_special_tokens=False) for t in (a, b)]
        while ids and not all(f[: len(ids)] == ids for f in full):
            ids.pop()
        if not ids:
            raise JaxkvError("the chat template puts nothing before the user's message")
        return ids
    if isinstance(pivot, str):
        if tok is None:
            raise JaxkvError("a text pivot needs a tokenizer")
        ids = tok.encode(pivot, add_special_tokens=False)
    else:
        ids = [int(t) for t in pivot]
    if not ids:
        raise JaxkvError("the pivot is empty")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
        raise JaxkvError(f"pivot token ids must lie in [0, {cfg.vocab_size})")
    return ids


def make_prefix(model, pivot="bos") -> Prefix:
    """Run the full-precision ``model`` on the pivot tokens and keep their K/V (IntactKV).

    ``model`` must be the full-precision model: the point of IntactKV is that these K/V are exact.
    """
    if _is_quantized(model.params):
        raise JaxkvError("make_prefix needs the full-precision model; pass the unquantized one")
    ids = pivot_tokens(model, pivot)
    P = len(ids)
    cfg = model.cfg
    dtype = model.params["embed"].dtype
    cache = init_cache(cfg, 1, P, dtype)
    logits, cache = jax.jit(forward, static_argnames="cfg")(
        model.params, jnp.asarray([ids], jnp.int32), jnp.arange(P, dtype=jnp.int32)[None], cache, cfg
    )
    return Prefix(
        k=cache.k[:, 0],
        v=cache.v[:, 0],
        logits=logits[0, -1],
        tokens=tuple(ids),
        fingerprint=model_fingerprint(model),
    )


def _is_quantized(params) -> bool:
    return any(not isinstance(x, jax.Array | np.ndarray) for x in jax.tree.leaves(params, is_leaf=_not_array))


def _not_array(x) -> bool:
    return not isinstance(x, dict | list | tuple)


def check_pivot(windows, prefix: Prefix) -> None:
    """Raise unless every window starts with the prefix's pivot tokens."""
    P = prefix.length
    if windows.shape[1] <= P or not np.all(np.asarray(windows)[:, :P] == np.asarray(prefix.tokens)):
        raise JaxkvError(f"the windows do not start with the prefix's pivot tokens {list(prefix.tokens)}")
