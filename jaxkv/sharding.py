"""Device meshes, logical-axis rules and shardings: the only module that writes ``PartitionSpec``.

Conventions
-----------
* Mesh axes, outermost first: ``data`` (batch; weights replicated), ``fsdp`` (batch too, and weights
  split along the model dim D, which XLA all-gathers layer by layer), ``tensor`` (Megatron-style
  tensor parallelism: attention heads, FFN columns, vocabulary). A mesh spec reads
  ``data=2,fsdp=1,tensor=4``; one axis may be ``-1`` (the devices left over); ``auto`` (the default)
  puts every device on ``data``. ``tensor`` is innermost so that its collectives, the most frequent
  ones (two all-reduces per block), stay on the fastest links: inside a host, inside a TPU ring.
* Every array dimension carries a *logical* name: the names of :class:`jaxkv.params.ArrayInfo`
  (``layers embed q_heads kv_heads mlp vocab``) and, for activations and caches, ``batch seq
  act_embed pivot cache_seq head_dim``. :class:`ShardingRules` maps each name to a tuple of mesh axes;
  a name without a rule is an error naming it. Defaults::

      batch -> (data, fsdp)      embed -> fsdp      q_heads, kv_heads, mlp, vocab -> tensor
      layers, seq, act_embed, pivot, cache_seq, head_dim -> replicated

* Dimensions split on whole units only: a ``q_heads`` dim of N*H columns splits on head boundaries
  (N must divide), ``kv_heads`` likewise (K); the input dim of a :class:`~jaxkv.quant.qarray.QArray`
  keeps whole quantization groups and whole packing chunks on each device. When a dim cannot be split
  over its mesh axes the policy ``indivisible`` decides: ``"replicate"`` drops mesh axes from the end
  of the dim's tuple until the units divide (down to full replication: what serving stacks do with
  KV heads on wide tensor-parallel meshes); ``"error"`` raises :class:`ShardingError` naming the
  array, the dimension and the sizes.
* A QArray's ``packed``, ``scale`` and ``zero`` share one spec (the dense weight's, unless whole groups
  or packing chunks forbid splitting the input dim): their dims are (leading axes, input rows /
  packed rows / groups, output columns), so shard ``i`` of each holds the codes, scales and zero
  points of the same rows and columns.
* KV cache (``jaxkv.kvcache``): the pivot segment ``[L, P, K, H]`` shards K only; every body leaf,
  full precision or quantized (``data``, ``scale``, ``zero``, ``window``, all ``[L, B, *, K, *]``)
  shards B over the batch axes and K over ``tensor``. A prefix shards like the pivot segment.
* Activations: :func:`constrain` pins ``[B, T, D]`` block outputs to (batch, replicated, replicated);
  ``jaxkv.model`` calls it at every block boundary. It is a no-op unless a mesh is active
  (:func:`activate`, which also makes ``jax.jit`` trace anew for that mesh).
* Multi-host: arrays are global. Host data enters through :func:`global_batch` / :func:`place`
  (each process materialises only the rows its devices hold) and leaves through :func:`to_host`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.params import ArrayInfo, param_infos

MESH_AXES = ("data", "fsdp", "tensor")
POLICIES = ("replicate", "error")

DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", ()),
    ("embed", ("fsdp",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("seq", ()),
    ("act_embed", ()),
    ("pivot", ()),
    ("cache_seq", ()),
    ("head_dim", ()),
)

# Block-boundary activations [B, T, D].
ACT_BTD = ("batch", "seq", "act_embed")


class ShardingError(JaxkvError, ValueError):
    """A mesh spec is malformed, or an array cannot be sharded as the rules ask (the message names it)."""


# ----------------------------------------------------------------------------------------------
# Meshes


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Axis sizes of a ``data x fsdp x tensor`` mesh (one may be -1: the rest) and the indivisible policy."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    indivisible: str = "replicate"

    def __post_init__(self):
        sizes = [getattr(self, a) for a in MESH_AXES]
        for a, n in zip(MESH_AXES, sizes):
            if not isinstance(n, int) or isinstance(n, bool) or (n < 1 and n != -1):
                raise ShardingError(f"mesh axis {a} must be a positive integer or -1, got {n!r}")
        if sizes.count(-1) > 1:
            raise ShardingError("at most one mesh axis may be -1 (the devices left over)")
        if self.indivisible not in POLICIES:
            raise ShardingError(f"indivisible must be one of {POLICIES}, got {self.indivisible!r}")

    @classmethod
    def parse(cls, spec: str | Mapping | MeshSpec | None) -> MeshSpec:
        """``auto`` | ``data=2,fsdp=1,tensor=4[,indivisible=error]`` | a YAML file of those keys | a dict."""
        if isinstance(spec, MeshSpec):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, Mapping):
            return cls._from_dict(dict(spec), "mesh spec")
        text = spec.strip()
        if text in ("", "auto"):
            return cls()
        if text.endswith((".yaml", ".yml")) or (os.sep in text and Path(text).is_file()):
            return cls._from_yaml(Path(text))
        d: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ShardingError(
                    f"mesh spec {spec!r}: expected comma-separated key=value pairs such as "
                    f"'data=2,fsdp=1,tensor=4', or 'auto'"
                )
            d[key] = value.strip()
        return cls._from_dict(d, f"mesh spec {spec!r}")

    @classmethod
    def _from_yaml(cls, path: Path) -> MeshSpec:
        import yaml

        if not path.is_file():
            raise ShardingError(f"{path}: no such mesh config file")
        d = yaml.safe_load(path.read_text()) or {}
        if not isinstance(d, dict):
            raise ShardingError(f"{path}: a mesh config is a mapping of data/fsdp/tensor/indivisible")
        return cls._from_dict(d, str(path))

    @classmethod
    def _from_dict(cls, d: dict, where: str) -> MeshSpec:
        known = {*MESH_AXES, "indivisible"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ShardingError(f"{where}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
        kw: dict[str, Any] = {}
        for a in MESH_AXES:
            if a in d:
                try:
                    kw[a] = int(d[a])
                except (TypeError, ValueError):
                    raise ShardingError(f"{where}: {a}={d[a]!r} is not an integer") from None
        if "indivisible" in d:
            kw["indivisible"] = str(d["indivisible"])
        if "data" not in kw:
            # An unnamed data axis takes the devices the other axes leave, unless one of them does.
            kw["data"] = 1 if -1 in kw.values() else -1
        return cls(**kw)

    def sizes(self, n_devices: int) -> dict[str, int]:
        """Concrete axis sizes for ``n_devices`` devices."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        known = math.prod(n for n in sizes.values() if n != -1)
        for a, n in sizes.items():
            if n == -1:
                if n_devices % known:
                    raise ShardingError(
                        f"mesh {self.describe()}: {n_devices} devices are not a multiple of the {known} "
                        f"that the fixed axes take"
                    )
                sizes[a] = n_devices // known
        if math.prod(sizes.values()) != n_devices:
            raise ShardingError(
                f"mesh {self.describe()} needs {math.prod(sizes.values())} devices, but {n_devices} are "
                f"given (use -1 for one axis to take the rest)"
            )
        return sizes

    @property
    def rules(self) -> ShardingRules:
        return ShardingRules(indivisible=self.indivisible)

    def describe(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in MESH_AXES)


def make_mesh(spec: str | Mapping | MeshSpec | None = "auto", devices: Sequence | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: every device of every process).

    Axes are ``AxisType.Auto``: XLA propagates shardings from the inputs and the constraints of
    :func:`constrain`, which the model code relies on (no sharding-in-types).
    """
    spec = MeshSpec.parse(spec)
    devices = list(jax.devices() if devices is None else devices)
    sizes = spec.sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # jax.make_mesh orders devices for the physical topology (TPU torus, GPU NVLink islands); on
    # multi-process runs its order keeps each process's devices contiguous along the outer axes.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def describe_mesh(mesh: Mesh | None) -> str:
    if mesh is None:
        return "none"
    return ",".join(f"{a}={n}" for a, n in mesh.shape.items())


# ----------------------------------------------------------------------------------------------
# Rules and the spec of one array


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axes, and what to do with a dimension that cannot be split."""

    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES
    indivisible: str = "replicate"

    def __post_init__(self):
        if self.indivisible not in POLICIES:
            raise ShardingError(f"indivisible must be one of {POLICIES}, got {self.indivisible!r}")

    def mesh_axes(self, logical: str, where: str = "") -> tuple[str, ...]:
        for name, axes in self.rules:
            if name == logical:
                return tuple(axes)
        known = ", ".join(n for n, _ in self.rules)
        raise ShardingError(
            f"{where or 'array'}: no sharding rule for logical axis {logical!r} (rules: {known})"
        )

    def replace(self, **overrides: tuple[str, ...] | str | None) -> ShardingRules:
        """These rules with some logical axes remapped, e.g. ``replace(embed=None, mlp=("tensor",))``."""
        table = dict(self.rules)
        for name, axes in overrides.items():
            table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        return dataclasses.replace(self, rules=tuple(table.items()))


_RULES = ShardingRules()  # the process-wide default; activate() swaps it for its block


def current_rules() -> ShardingRules:
    """The rules set by :func:`set_rules` or the innermost :func:`activate` (default: ``ShardingRules()``)."""
    return _RULES


def set_rules(rules: ShardingRules) -> None:
    """Make ``rules`` the process-wide default (what the CLI's ``--mesh ...,indivisible=error`` does)."""
    global _RULES
    _RULES = rules


def _mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    return dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)


# A constraint on one dim: (count, what) -- the shard count must divide ``count`` (heads, groups...).
Unit = tuple[int, str]


def spec_for(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | Mapping[str, int],
    rules: ShardingRules | None = None,
    units: Mapping[int, Sequence[Unit]] | None = None,
    name: str = "array",
) -> P:
    """The PartitionSpec of one array with logical ``axes`` (None: never sharded) and ``shape``.

    ``units[d]`` lists extra divisibility constraints of dim ``d`` (e.g. ``(9, "query heads")``). A
    mesh axis is used at most once per array (a later dim asking for it again goes without).
    """
    rules = current_rules() if rules is None else rules
    sizes = _mesh_sizes(mesh)
    if len(axes) != len(shape):
        raise ShardingError(
            f"{name}: {len(axes)} logical axes {tuple(axes)} for a {len(shape)}-d shape {tuple(shape)}"
        )
    used: set[str] = set()
    out = []
    for d, (logical, size) in enumerate(zip(axes, shape)):
        if logical is None:
            out.append(None)
            continue
        cand = [a for a in rules.mesh_axes(logical, name) if sizes.get(a, 1) > 1 and a not in used]
        need = [(size, f"{size} elements")] + list((units or {}).get(d, ()))
        while cand:
            n = math.prod(sizes[a] for a in cand)
            bad = [(c, what) for c, what in need if c % n]
            if not bad:
                break
            if rules.indivisible == "error":
                c, what = bad[-1]
                raise ShardingError(
                    f"{name}: dimension {d} ({logical}, size {size}) cannot be split over mesh axes "
                    f"{'x'.join(cand)} ({n} devices): {what} cannot be split {n} ways; use a mesh whose "
                    f"{'x'.join(cand)} size divides {c}, or indivisible=replicate"
                )
            cand = cand[:-1]
        used.update(cand)
        out.append(None if not cand else (cand[0] if len(cand) == 1 else tuple(cand)))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _head_units(cfg: ModelConfig) -> dict[str, Unit]:
    return {
        "q_heads": (cfg.num_heads, f"{cfg.num_heads} query heads"),
        "kv_heads": (cfg.num_kv_heads, f"{cfg.num_kv_heads} KV heads"),
    }


def _units_for(axes: Sequence[str | None], cfg: ModelConfig) -> dict[int, list[Unit]]:
    heads = _head_units(cfg)
    return {d: [heads[a]] for d, a in enumerate(axes) if a in heads}


# ----------------------------------------------------------------------------------------------
# Parameters


def _is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path) -> str:
    return "/".join(_key_name(k) for k in path)


def _is_qarray(x) -> bool:
    from jaxkv.quant.qarray import is_qarray  # deferred: jaxkv.model imports this module at start-up

    return is_qarray(x)


def _dense_spec(info: ArrayInfo, cfg: ModelConfig, mesh, rules, name: str) -> P:
    return spec_for(info.axes, info.shape, mesh, rules, _units_for(info.axes, cfg), name)


def param_specs(cfg: ModelConfig, mesh: Mesh | Mapping[str, int], rules: ShardingRules | None = None) -> dict:
    """PartitionSpecs of every dense parameter, derived from :func:`jaxkv.params.param_infos`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, info: _dense_spec(info, cfg, mesh, rules, f"param {_path_str(path)}"),
        param_infos(cfg),
        is_leaf=_is_info,
    )


def qarray_spec(q, info: ArrayInfo, cfg: ModelConfig, mesh, rules=None, name: str = "weight") -> P:
    """The one spec of a QArray's ``packed``, ``scale`` and ``zero`` (see the module docstring).

    The input dim (second to last) splits only where every device gets whole groups and whole
    packing chunks: the shard count must divide I/group and I/chunk as well as the head count.
    """
    from jaxkv.quant.qarray import chunk_shape

    I = info.shape[-2]
    codes_per_chunk, _ = chunk_shape(q.bits)
    units = _units_for(info.axes, cfg)
    units.setdefault(len(info.shape) - 2, []).extend(
        [
            (I // q.group, f"{I // q.group} quantization groups of {q.group} rows"),
            (
                I // codes_per_chunk,
                f"{I // codes_per_chunk} {q.bits}-bit packing chunks of {codes_per_chunk} rows",
            ),
        ]
    )
    return spec_for(info.axes, info.shape, mesh, rules, units, name)


def param_shardings(cfg: ModelConfig, mesh: Mesh, params=None, rules: ShardingRules | None = None) -> dict:
    """NamedShardings of the parameters: a tree like ``params`` (default: the dense layout).

    A QArray leaf gets a QArray whose ``packed``/``scale``/``zero`` are NamedShardings (so the result
    feeds ``jax.device_put(params, shardings)`` directly). A leaf that ``param_infos(cfg)`` does not
    describe, or whose shape differs, is a :class:`ShardingError` naming it.
    """
    infos = param_infos(cfg)
    if params is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh, rules))
    flat_infos = {_path_str(p): i for p, i in jax.tree_util.tree_leaves_with_path(infos, is_leaf=_is_info)}

    def one(path, leaf):
        name = _path_str(path)
        info = flat_infos.get(name)
        if info is None:
            raise ShardingError(
                f"param {name}: no sharding rule (it is not a parameter of this model configuration)"
            )
        if tuple(leaf.shape) != info.shape:
            raise ShardingError(f"param {name}: shape {tuple(leaf.shape)}, the config implies {info.shape}")
        if _is_qarray(leaf):
            if leaf.layout != "io":
                raise ShardingError(
                    f"param {name}: shard the canonical QArray packing, not decode_layout's {leaf.layout!r}"
                )
            sh = NamedSharding(mesh, qarray_spec(leaf, info, cfg, mesh, rules, f"param {name}"))
            return leaf.replace(packed=sh, scale=sh, zero=None if leaf.zero is None else sh)
        return NamedSharding(mesh, _dense_spec(info, cfg, mesh, rules, f"param {name}"))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_qarray)


def without_layer_axis(shardings):
    """Stacked shardings (``[L, ...]`` leaves, NamedShardings or QArrays of them) -> those of one
    layer's slice: the spec less its leading (layer) entry."""
    return jax.tree.map(lambda sh: NamedSharding(sh.mesh, P(*sh.spec[1:])), shardings)


def shard_decode_params(params, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None) -> dict:
    """Stacked ``params`` placed in their shardings, then split into one buffer per layer (as
    :func:`jaxkv.model.decode_layout` with ``fuse=False``: fused Q/K/V columns would not follow the
    head sharding), each layer's slice in the stacked sharding less the layer axis. Decode then
    loops over layers in Python as on one device, instead of a ``lax.scan`` that slices the
    stacked weights and writes every layer's cache back into a stacked output at each step."""
    from jaxkv.model import decode_layout  # jaxkv.model imports this module

    if isinstance(params["layers"], (list, tuple)):
        raise ShardingError(
            "decode on a mesh needs the stacked parameters (as loaded), not jaxkv.decode_layout's: "
            "it splits them itself after sharding"
        )
    stacked = shard_params(params, cfg, mesh, rules)
    layer = without_layer_axis(param_shardings(cfg, mesh, stacked, rules)["layers"])
    split = decode_layout(stacked, fuse=False)
    return {**split, "layers": tuple(place(lp, layer) for lp in split["layers"])}


def shard_params(params, cfg: ModelConfig, mesh: Mesh | None, rules: ShardingRules | None = None):
    """``params`` placed in their shardings (a no-op for leaves already there; ``mesh=None``: unchanged)."""
    if mesh is None:
        return params
    return place(params, param_shardings(cfg, mesh, params, rules))


def abstract_params(
    cfg: ModelConfig, mesh: Mesh, dtype=jnp.float32, rules: ShardingRules | None = None
) -> dict:
    """``ShapeDtypeStruct`` with sharding per dense parameter: an Orbax restore target, from param_infos."""
    shardings = param_shardings(cfg, mesh, rules=rules)
    return jax.tree.map(
        lambda info, sh: jax.ShapeDtypeStruct(info.shape, dtype, sharding=sh),
        param_infos(cfg),
        shardings,
        is_leaf=_is_info,
    )


def abstract_like(tree, shardings) -> Any:
    """``ShapeDtypeStruct`` leaves with the shapes/dtypes of ``tree`` and the given shardings.

    Restoring an Orbax checkpoint onto another mesh shape is ``restore(path, abstract_like(saved_tree,
    shardings_on_the_new_mesh))``: Orbax reads only the slices each device needs.
    """
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


# ----------------------------------------------------------------------------------------------
# KV cache and prefix

_CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "pivot_k": ("layers", "pivot", "kv_heads", "head_dim"),
    "pivot_v": ("layers", "pivot", "kv_heads", "head_dim"),
    "k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "lengths": ("batch",),
}
# Leaves of a quantized body segment (jaxkv.kvcache): the body head-major [Lc, B, K, S | J, packed H
# | C | H], the window [Lc, B, W, K, H]. The last dim mixes packed bytes, channel groups and
# channels, so it is never split.
_SEGMENT_AXES = {
    "data": ("layers", "batch", "kv_heads", "cache_seq", None),
    "scale": ("layers", "batch", "kv_heads", "cache_seq", None),
    "zero": ("layers", "batch", "kv_heads", "cache_seq", None),
    "window": ("layers", "batch", "cache_seq", "kv_heads", None),
}
# jaxkv.wkvquant parameters of a side: scale/shift [Lc, K, H], clip logits [Lc, K, C, 2].
_SEGMENT_WKV_AXES = {"scale": ("layers", "kv_heads", None), "shift": ("layers", "kv_heads", None),
                     "clip": ("layers", "kv_heads", None, None)}  # fmt: skip


def _cache_axes(names: list[str], where: str) -> tuple[str | None, ...]:
    if len(names) == 1 and names[0] in _CACHE_AXES:
        return _CACHE_AXES[names[0]]
    if len(names) == 4 and names[0] == "segments" and names[2] in ("k", "v") and names[3] in _SEGMENT_AXES:
        return _SEGMENT_AXES[names[3]]
    if len(names) == 5 and names[0] == "segments" and names[3] == "wkv" and names[4] in _SEGMENT_WKV_AXES:
        return _SEGMENT_WKV_AXES[names[4]]
    raise ShardingError(f"{where}: no sharding rule for cache leaf {'/'.join(names)}")


def cache_shardings(cache, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None):
    """NamedShardings for every leaf of a :class:`~jaxkv.kvcache.KVCache` (full precision or quantized)."""

    def one(path, leaf):
        names = [_key_name(k) for k in path]
        # per-layer layout (init_cache(..., per_layer=True)): a tuple of layers (an index in the path
        # other than a segment's) whose leaves have no layer axis
        layer_index = [i for i, n in enumerate(names) if n.isdigit() and (i, names[0]) != (1, "segments")]
        core = [n for i, n in enumerate(names) if i not in layer_index]
        axes = _cache_axes(core, "KV cache")
        axes = axes[1:] if layer_index else axes
        spec = spec_for(axes, leaf.shape, mesh, rules, _units_for(axes, cfg), f"cache {'/'.join(names)}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, cache)


def shard_cache(cache, cfg: ModelConfig, mesh: Mesh | None, rules: ShardingRules | None = None):
    return cache if mesh is None else place(cache, cache_shardings(cache, cfg, mesh, rules))


def kv_sharding(shape, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None) -> NamedSharding:
    """Sharding of prefix / pivot K/V ``[L, P, K, H]`` (also the calibration's trainable K/V)."""
    axes = _CACHE_AXES["pivot_k"]
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules, _units_for(axes, cfg), "prefix k/v"))


def prefix_shardings(prefix, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None):
    """Shardings of a :class:`~jaxkv.prefix.Prefix`: k/v like the pivot segment, logits [V] by vocab."""
    kv = kv_sharding(prefix.k.shape, cfg, mesh, rules)
    logits = NamedSharding(mesh, spec_for(("vocab",), prefix.logits.shape, mesh, rules, name="prefix logits"))
    return prefix.replace(k=kv, v=kv, logits=logits)


def shard_prefix(prefix, cfg: ModelConfig, mesh: Mesh | None, rules: ShardingRules | None = None):
    return prefix if mesh is None else place(prefix, prefix_shardings(prefix, cfg, mesh, rules))


# ----------------------------------------------------------------------------------------------
# Batches and host <-> device


def batch_sharding(
    mesh: Mesh, shape: Sequence[int], batch_dim: int = 0, rules: ShardingRules | None = None
) -> NamedSharding:
    """Sharding of host data ``shape`` split along ``batch_dim`` over the batch axes, else replicated."""
    axes = [None] * len(shape)
    axes[batch_dim] = "batch"
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules, name=f"batch of shape {tuple(shape)}"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(
    rows: np.ndarray | Callable[[tuple[slice, ...]], np.ndarray],
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    dtype=None,
    batch_dim: int = 0,
    rules: ShardingRules | None = None,
) -> jax.Array:
    """A global array split along ``batch_dim``, built on each process from the rows it holds only.

    ``rows`` is the host array, or ``read(index) -> np.ndarray`` returning ``global[index]`` (then
    ``shape`` and ``dtype`` are required): a data loader that reads only what it is asked for.
    """
    if callable(rows):
        if shape is None or dtype is None:
            raise ShardingError("global_batch with a reader needs shape and dtype")
        read = rows
    else:
        arr = np.asarray(rows)
        shape, dtype = arr.shape, arr.dtype
        read = arr.__getitem__
    sharding = batch_sharding(mesh, shape, batch_dim, rules)
    return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: np.asarray(read(idx), dtype))


def place(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works when the target spans several processes.

    A host value (numpy, or a jax.Array on this process's devices) cannot be ``device_put`` onto
    devices of other processes; each process then fills its own shards from its copy (every process
    must hold the same value, as in any multi-controller JAX program).
    """

    def one(x, sh):
        if x is None:
            return None
        if sh.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sh)  # within this process, or global -> global (a reshard)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)


@functools.lru_cache(maxsize=64)
def _replicate_fn(sharding: NamedSharding):
    return jax.jit(lambda x: x, out_shardings=sharding)


def to_host(x) -> np.ndarray:
    """A numpy copy of the global array ``x`` on every process (gathers shards held by other hosts)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    full = _replicate_fn(replicated(x.sharding.mesh))(x)
    return np.asarray(full.addressable_data(0))


# ----------------------------------------------------------------------------------------------
# Loading straight into shardings


@functools.lru_cache(maxsize=256)
def _zeros_fn(shape: tuple[int, ...], dtype, sharding: NamedSharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=256)
def _set_layer_fn(sharding: NamedSharding):
    # Donated: the leaf is updated in place, so device memory holds it once plus one layer.
    return jax.jit(
        lambda a, x, i: jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), i, 0),
        out_shardings=sharding,
        donate_argnums=0,
    )


def assemble(
    shape: Sequence[int],
    dtype,
    sharding: NamedSharding,
    read: Callable[[int | None], np.ndarray],
    stacked: bool,
) -> jax.Array:
    """One global array built from host tensors straight into ``sharding``.

    ``read(layer)`` returns layer ``layer`` ``[*shape[1:]]`` of a stacked leaf, or the whole tensor
    (``read(None)``) of an unstacked one. A stacked leaf whose layer axis is not split is written one
    layer at a time into a donated, already-sharded buffer: host memory holds one tensor, no device
    more than its shards plus one layer's, and each tensor is read once (reading per device, as a
    plain ``make_array_from_callback`` over the stack would, multiplies GGUF dequantization work).
    """
    shape = tuple(shape)
    np_dtype = np.dtype(dtype)
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    if not stacked:
        host = np.asarray(read(None), np_dtype)
        return jax.make_array_from_callback(shape, sharding, lambda idx: host[idx])
    if spec[0] is None:
        out = _zeros_fn(shape, np_dtype, sharding)()
        layer_sharding = NamedSharding(sharding.mesh, P(*spec[1:]))
        set_layer = _set_layer_fn(sharding)
        for i in range(shape[0]):
            host = np.asarray(read(i), np_dtype)
            piece = jax.make_array_from_callback(shape[1:], layer_sharding, lambda idx, h=host: h[idx])
            out = set_layer(out, piece, jnp.int32(i))
        return out

    # Layers split over devices (a pipeline-style rule): each device reads its own layers.
    def fill(idx):
        layers = range(shape[0])[idx[0]]
        return np.stack([np.asarray(read(i), np_dtype)[idx[1:]] for i in layers])

    return jax.make_array_from_callback(shape, sharding, fill)


def assemble_params(
    cfg: ModelConfig,
    read: Callable[[tuple[str, ...], int | None], np.ndarray],
    dtype,
    mesh: Mesh,
    rules: ShardingRules | None = None,
) -> dict:
    """The dense params of ``cfg`` built straight into their shardings (:func:`assemble` per leaf).

    ``read(path, layer)`` returns parameter ``path`` (e.g. ``("layers", "wq")``) in jaxkv's
    orientation, for ``layer`` (None for unstacked ones); loaders supply it.
    """
    shardings = param_shardings(cfg, mesh, rules=rules)

    def one(path, info: ArrayInfo, sh):
        names = tuple(_key_name(k) for k in path)
        stacked = names[0] == "layers"
        return assemble(info.shape, dtype, sh, functools.partial(read, names), stacked)

    return jax.tree_util.tree_map_with_path(one, param_infos(cfg), shardings, is_leaf=_is_info)


# ----------------------------------------------------------------------------------------------
# Activations


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules: ShardingRules | None = None) -> Iterator[None]:
    """Within: ``jax.jit`` traces for ``mesh`` and :func:`constrain` pins activations (``None``: no-op).

    ``jax.set_mesh`` puts the mesh in JAX's trace context, so a function first traced outside is
    traced again inside (with its constraints) rather than reused from the cache.
    """
    if mesh is None:
        yield
        return
    saved = current_rules()
    set_rules(saved if rules is None else rules)
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        set_rules(saved)


def constrain(x: jax.Array, axes: Sequence[str | None] = ACT_BTD) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical ``axes`` under the active mesh, else ``x``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = spec_for(axes, x.shape, dict(mesh.shape), current_rules(), name=f"activation {tuple(axes)}")
    return jax.lax.with_sharding_constraint(x, spec)


# ----------------------------------------------------------------------------------------------
# Command line


def add_mesh_arg(parser) -> None:
    """Add ``--mesh SPEC`` (a spec string, ``auto``, ``none`` or a YAML file of configs/mesh)."""
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="SPEC",
        help="device mesh: 'data=2,fsdp=1,tensor=4[,indivisible=replicate|error]', a configs/mesh/*.yaml "
        "file, 'auto' (every device on the data axis) or 'none' (one device, no sharding). Default: "
        "auto when several devices are visible, else none",
    )


def mesh_from_args(args) -> Mesh | None:
    """The mesh ``--mesh`` asks for (None on a single device by default); also sets the rules' policy."""
    spec = getattr(args, "mesh", None)
    if spec is not None and spec.strip().lower() == "none":
        return None
    if spec is None and jax.device_count() == 1:
        return None
    parsed = MeshSpec.parse(spec)
    set_rules(parsed.rules)
    return make_mesh(parsed)
