"""The weight-quantization recipe and the path rules that select which parameters it quantizes.

Conventions
-----------
* A parameter's path is its ``/``-joined key path in the params pytree of :mod:`jaxkv.params`:
  ``layers/wq``, ``layers/w_down``, ``lm_head``, ``embed``. Rules are regular expressions matched with
  ``re.fullmatch``; a leaf is quantized when it matches an ``include`` rule and no ``exclude`` rule.
* Default: every attention and MLP linear (``layers/(wq|wk|wv|wo|w_gate|w_up|w_down)``); embeddings,
  lm_head, norms and biases stay in full precision. ``lm_head`` can be included. ``embed`` cannot: the
  model reads it with a gather (and, when tied, as the output matrix), which needs dense storage.
* ``group`` counts input rows per scale; -1 means per-channel (one group over the whole input dim).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxkv.errors import JaxkvError
from jaxkv.quant.qarray import SUPPORTED_BITS, QArray, chunk_shape

METHODS = ("rtn", "gptq", "awq")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
DEFAULT_INCLUDE = (r"layers/(wq|wk|wv|wo|w_gate|w_up|w_down)",)


class QuantError(JaxkvError, ValueError):
    """A quantization recipe does not fit the model (bad bits/group, a rule that selects nothing...)."""


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """How to quantize weights. Hashable and JSON-able (:meth:`to_dict` / :meth:`from_dict`).

    Calibration fields are used by GPTQ and AWQ only; GPTQ and AWQ fields by their method only.
    """

    bits: int = 4
    group: int = 64
    method: str = "rtn"
    sym: bool = False
    scale_dtype: str = "float16"
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    # calibration data (GPTQ, AWQ): calib_samples windows of calib_seqlen tokens from calib_data
    calib_data: str = "sotu-calib"
    calib_samples: int = 128
    calib_seqlen: int = 512
    calib_seed: int = 0
    calib_batch: int = 8  # windows per forward pass while collecting statistics
    # GPTQ
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    block_size: int = 128  # columns per lazy-update block
    act_order: bool = False  # process input channels by decreasing Hessian diagonal (implies static groups)
    static_groups: bool = False  # group scales from the original weights rather than at each group's start
    # AWQ (llm-awq auto_scale / auto_clip)
    awq_grid: int = 20
    awq_scale: bool = True
    awq_clip: bool = True
    awq_max_shrink: float = 0.5
    awq_clip_tokens: int = 512

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise QuantError(
                f"bits={self.bits} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))})"
            )
        if self.method not in METHODS:
            raise QuantError(f"method={self.method!r} is not supported (supported: {', '.join(METHODS)})")
        if not isinstance(self.group, int) or (self.group <= 0 and self.group != -1):
            raise QuantError(f"group must be a positive integer or -1 (per-channel), got {self.group!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise QuantError(f"scale_dtype={self.scale_dtype!r} is not supported (supported: {SCALE_DTYPES})")
        for name in ("include", "exclude"):
            rules = getattr(self, name)
            if isinstance(rules, str) or not isinstance(rules, tuple):
                raise QuantError(f"{name} must be a tuple of regular expressions, got {rules!r}")
            for r in rules:
                try:
                    re.compile(r)
                except re.error as e:
                    raise QuantError(f"{name} rule {r!r} is not a valid regular expression ({e})") from None
        for name in (
            "calib_samples",
            "calib_seqlen",
            "calib_batch",
            "block_size",
            "awq_grid",
            "awq_clip_tokens",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise QuantError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= self.damp < 1:
            raise QuantError(f"damp must be in [0, 1), got {self.damp}")
        if not 0 <= self.awq_max_shrink < 1:
            raise QuantError(f"awq_max_shrink must be in [0, 1), got {self.awq_max_shrink}")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")

    @property
    def jnp_scale_dtype(self):
        return jnp.dtype(self.scale_dtype)

    def group_for(self, in_dim: int) -> int:
        return in_dim if self.group == -1 else self.group

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantRecipe:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QuantError(f"unknown quantization recipe fields: {sorted(unknown)}")
        for name in ("include", "exclude"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)

    def describe(self) -> str:
        g = "per-channel" if self.group == -1 else f"g{self.group}"
        return f"W{self.bits} {g} {self.method}{' sym' if self.sym else ''}"


def path_str(path) -> str:
    """``('layers', 'wq')`` key path -> ``'layers/wq'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def select(params, recipe: QuantRecipe) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the leaves ``recipe`` quantizes; validates them (QuantError naming the leaf).

    Checks, before any work: the leaf is a matrix ``[(L,) in, out]`` and not the embedding, the group
    divides its input dimension, and the packing chunk divides it too.
    """
    chosen = {}
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: not isinstance(x, dict))
    for path, leaf in leaves:
        name = path_str(path)
        if not any(re.fullmatch(r, name) for r in recipe.include):
            continue
        if any(re.fullmatch(r, name) for r in recipe.exclude):
            continue
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            continue
        if name == "embed":
            raise QuantError(
                "embed cannot be quantized: the model reads it with a gather (and as the output "
                "matrix when tied); remove it from the include rules"
            )
        if isinstance(leaf, QArray) or not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise QuantError(f"{name} is already quantized or not floating point (dtype {leaf.dtype})")
        expected_ndim = 3 if name.startswith("layers/") else 2
        if len(leaf.shape) != expected_ndim:
            raise QuantError(
                f"{name} has shape {tuple(leaf.shape)}, not a matrix; only linear weights can be quantized"
            )
        in_dim = leaf.shape[-2]
        g = recipe.group_for(in_dim)
        if in_dim % g:
            ds = [d for d in (256, 128, 64, 32, 16) if in_dim % d == 0][:3]
            raise QuantError(
                f"group size {g} does not divide the input dimension {in_dim} of {name} (shape "
                f"{tuple(leaf.shape)}); use a group that divides {in_dim} "
                f"({', '.join(map(str, ds)) or 'a divisor'}) or -1 for per-channel"
            )
        c, _ = chunk_shape(recipe.bits)
        if in_dim % c:
            raise QuantError(
                f"{recipe.bits}-bit packing needs the input dimension of {name} ({in_dim}) to be a multiple of {c}"
            )
        chosen[name] = tuple(leaf.shape)
    if not chosen:
        raise QuantError(
            f"the recipe's rules select no parameter (include={recipe.include}, exclude={recipe.exclude})"
        )
    return chosen


def get_path(params, name: str):
    node = params
    for k in name.split("/"):
        node = node[k]
    return node


def set_paths(params, updates: dict[str, Any]):
    """A copy of the nested dict ``params`` with the leaves at ``updates``' paths replaced."""

    def rec(node, prefix):
        out = {}
        for k, v in node.items():
            name = f"{prefix}{k}"
            if name in updates:
                out[k] = updates[name]
            elif isinstance(v, dict):
                out[k] = rec(v, name + "/")
            else:
                out[k] = v
        return out

    return rec(params, "")
