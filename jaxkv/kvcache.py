"""The KV cache pytree: a full-precision pivot segment shared by the batch, then a per-sequence body
that is either full precision or quantized (:class:`KVQuantConfig`).

Dimension alphabet (``jaxkv.config``): B batch, T query length, S body slots, P pivot length, K KV
heads, H head dim, L layers; for quantization C = H / group (channel groups of a token) and
J = S / group (token groups of a channel).

Full-precision layout (``kv`` None, or 16-bit keys and values)::

    pivot_k, pivot_v   [L, P, K, H]     pivot tokens (IntactKV prefix); P may be 0
    k, v               [L, B, S, K, H]  body: slot s of sequence b holds position P + s
    lengths            [B] int32        body slots filled per sequence

Quantized layout: ``k``/``v`` are None and the body lives in ``segments``, one :class:`QuantSegment`
per run of consecutive layers that share (key bits, value bits), so per-layer bit budgets keep real
packed storage. Each segment holds a :class:`QuantSide` for keys and one for values, its body
head-major (the slots of one sequence and KV head contiguous)::

    data     uint8 [Lc, B, K, S, H*bits/8]   codes packed along H (``jaxkv.quant.qarray`` bitstream);
             or [Lc, B, K, S, H] in the cache dtype when that side has 16 bits (not quantized)
    scale    [Lc, B, K, S, C]  per token (groups of ``group`` channels)          scale dtype
             [Lc, B, K, J, H]  per channel (groups of ``group`` consecutive slots, KIVI keys)
    zero     int8, the shape of ``scale``
    window   [Lc, B, W, K, H]  full-precision copies of the W most recent tokens, a ring: slot s at
             index s % W (None when W = 0)

Head-major because decode attention reads one (sequence, KV head) at a time: its codes and scales
are then one contiguous run, not 64-byte pieces a row of all heads apart (the decode kernel of
``jaxkv.kernels.kvdecode`` took 90.5 against 121.2 us per Llama-2-7B layer at batch 8 and 4352
slots on an H100, results/bench/h100_run29_kv_layout.txt).

The quantizer is asymmetric with an integer zero point, exactly as stored::

    x ≈ (code - zero) * scale,   code in [0, 2**bits - 1],  zero in [-128, 127] (int8)

``scale`` is rounded *up* to its storage dtype (default float8 e4m3: one byte) before the codes are
computed, so the grid always covers the group's range. A signed 8-bit zero point lets the grid sit
away from 0 (a key channel with values in [8, 10] keeps its resolution), at the price of a scale of
at least |min| / 127. With one-byte scales and zeros, K4V2 at group 32 costs 0.219x of fp16.

Which copy a query reads (body slot ``i`` of the query, ``j`` of the key; R = ``residual``):

* ``past-only`` (WKVQuant): a token always sees its own K/V at full precision; the past is read
  quantized once it is older than the R most recent past tokens: quantized iff ``j < i - R``.
* ``all`` (IntactKV's fake quantization): the current token is quantized too, except the R most
  recent tokens including it: quantized iff ``j < i + 1 - R``.
* Keys per channel are quantized by complete groups of ``group`` slots only (their statistics need
  the whole group): the bound above is rounded down to a multiple of ``group``, so tokens of an
  incomplete group stay full precision (KIVI's residual). Values, and keys per token, have no such
  delay.
* Pivot slots are never quantized.

These rules depend only on (i, j), never on how the tokens were fed (one prefill, chunks, or one at
a time), which is what makes the cache-free forward of ``jaxkv.kvattention.attend_fake_quant``
(perplexity) equal to decoding through the cache. Every written token is quantized into the body as
soon as its group is complete (a prefill quantizes the prompt's K/V for later steps); the window
keeps the full-precision copies the rule still needs: W = R for per-token sides, R + group - 1 for
per-channel keys.

Per-layer layout (``init_cache(..., per_layer=True)``, what generation uses with the parameters of
``jaxkv.model.decode_layout``): ``k``/``v``, or each segment's sides, are tuples with one entry per
layer (``[B, S, K, H]`` arrays, or :class:`QuantSide` without the ``Lc`` axis), each its own buffer,
so a decode step updates every layer's cache in place and its attention reads it where it lies.
(Rows written back into one stacked buffer made XLA copy each layer's K and V at every step.)

Positions: the pivot holds positions 0..P-1 for every sequence; body slot ``s`` is position ``P + s``.
A batch of prompts of different lengths is right-padded: padding tokens carry position -1 and are
never written, so ``lengths[b]`` counts only real tokens and the next token of sequence ``b`` goes to
slot ``lengths[b]``. The maximum length ``S`` is fixed when the cache is created (rounded up to a
multiple of ``group`` when keys are quantized per channel). With a quantized cache, the real tokens
of each call must continue their sequence contiguously (slots ``lengths[b], lengths[b] + 1, ...``), as
prefill and decode in ``jaxkv.generate`` do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ConfigError, ModelConfig

KV_BITS = (16, 8, 4, 3, 2)
KV_MODES = ("past-only", "all")
KV_METHODS = ("minmax", "wkvquant")
K_GRANULARITIES = ("per-channel", "per-token")
SCALE_DTYPES = ("float8_e4m3fn", "float16", "bfloat16", "float32")
ZERO_MIN, ZERO_MAX = -128, 127  # int8 zero points


def _check_bits(name: str, value) -> None:
    if isinstance(value, bool) or value not in KV_BITS:
        raise ConfigError(
            f"KVQuantConfig.{name} must be one of {KV_BITS} (16 = not quantized), got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
class KVQuantConfig:
    """How the KV cache body is quantized. Hashable: it is static metadata of the cache pytree.

    * ``kbits``/``vbits``: bits of keys/values, 16 = not quantized. ``layer_kbits``/``layer_vbits``,
      when given, override them per layer (one entry per layer, e.g. from :func:`allocate_bits`).
    * ``k_granularity``: ``per-channel`` (one scale per channel and group of ``group`` consecutive
      tokens, KIVI) or ``per-token`` (one scale per token and group of ``group`` channels). Values are
      always per token.
    * ``group``: group size (tokens for per-channel keys, channels otherwise; must divide head_dim
      for per-token sides).
    * ``residual``: R, the most recent tokens kept at full precision (see the module docstring).
    * ``mode``: ``past-only`` or ``all``.
    * ``scale_dtype``: storage dtype of the scales; zero points are int8.
    * ``method``: ``minmax`` (the quantizer above) or ``wkvquant`` (``jaxkv.wkvquant``: per-channel
      smoothing then per-token min-max with learnable clipping; keys must be ``per-token``). A
      ``wkvquant`` cache and forward take the learned per-layer parameters as arrays (``wkv=``).
    """

    kbits: int = 16
    vbits: int = 16
    k_granularity: str = "per-channel"
    group: int = 32
    residual: int = 0
    mode: str = "past-only"
    scale_dtype: str = "float8_e4m3fn"
    layer_kbits: tuple[int, ...] | None = None
    layer_vbits: tuple[int, ...] | None = None
    method: str = "minmax"

    def __post_init__(self):
        _check_bits("kbits", self.kbits)
        _check_bits("vbits", self.vbits)
        for name in ("layer_kbits", "layer_vbits"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, tuple) or not value:
                raise ConfigError(
                    f"KVQuantConfig.{name} must be a non-empty tuple of bits or None, got {value!r}"
                )
            for b in value:
                _check_bits(name, b)
        if self.k_granularity not in K_GRANULARITIES:
            raise ConfigError(
                f"KVQuantConfig.k_granularity must be one of {K_GRANULARITIES}, got {self.k_granularity!r}"
            )
        if self.mode not in KV_MODES:
            raise ConfigError(f"KVQuantConfig.mode must be one of {KV_MODES}, got {self.mode!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ConfigError(f"KVQuantConfig.group must be a positive integer, got {self.group!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ConfigError(f"KVQuantConfig.residual must be a non-negative integer, got {self.residual!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"KVQuantConfig.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}"
            )
        if self.method not in KV_METHODS:
            raise ConfigError(f"KVQuantConfig.method must be one of {KV_METHODS}, got {self.method!r}")
        if self.method == "wkvquant" and self.k_granularity != "per-token":
            raise ConfigError(
                "KVQuantConfig.k_granularity must be 'per-token' with method 'wkvquant' (two-dimensional "
                "quantization smooths channels, then quantizes tokens)"
            )

    def layer_bits(self, num_layers: int) -> list[tuple[int, int]]:
        """(key bits, value bits) of every layer."""
        kb = self.layer_kbits or (self.kbits,) * num_layers
        vb = self.layer_vbits or (self.vbits,) * num_layers
        for name, bits in (("layer_kbits", kb), ("layer_vbits", vb)):
            if len(bits) != num_layers:
                raise ConfigError(
                    f"KVQuantConfig.{name} has {len(bits)} entries, the model has {num_layers} layers"
                )
        return list(zip(kb, vb))

    def is_identity(self, num_layers: int) -> bool:
        """True when nothing is quantized: the cache is the plain full-precision one."""
        return all(kb == 16 and vb == 16 for kb, vb in self.layer_bits(num_layers))

    def check(self, cfg: ModelConfig) -> None:
        """Raise ConfigError naming the field that does not fit the model ``cfg``."""
        H = cfg.head_dim
        for layer, (kb, vb) in enumerate(self.layer_bits(cfg.num_layers)):
            for side, bits, per_token in (("k", kb, self.k_granularity == "per-token"), ("v", vb, True)):
                if bits == 16:
                    continue
                if per_token and H % self.group:
                    raise ConfigError(
                        f"KVQuantConfig.group={self.group} must divide head_dim={H} "
                        f"({side} of layer {layer} is quantized per token, grouped along channels)"
                    )
                if bits == 3 and H % 8:
                    raise ConfigError(f"KVQuantConfig: 3-bit {side} needs head_dim={H} to be a multiple of 8")

    def label(self) -> str:
        """A short name such as ``K4V2-g32-r0-past-only``."""
        if self.layer_kbits or self.layer_vbits:
            bits = "Kmix" if self.layer_kbits else f"K{self.kbits}"
            bits += "Vmix" if self.layer_vbits else f"V{self.vbits}"
        else:
            bits = f"K{self.kbits}V{self.vbits}"
        wkv = "-wkv" if self.method == "wkvquant" else ""
        return f"{bits}-g{self.group}-r{self.residual}-{self.mode}{wkv}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SideSpec:
    """Static description of the keys or the values of one run of layers."""

    bits: int
    per_channel: bool  # groups along tokens (keys, KIVI); otherwise groups along channels
    group: int
    window: int  # W: full-precision ring length
    scale_dtype: str

    @property
    def quantized(self) -> bool:
        return self.bits < 16


def side_specs(kv: KVQuantConfig, kbits: int, vbits: int) -> tuple[SideSpec, SideSpec]:
    """Key and value specs of a layer with ``kbits``/``vbits``."""
    R, g = kv.residual, kv.group
    k_pc = kv.k_granularity == "per-channel"
    # A per-channel group is quantized when its last token arrives: its first g-1 tokens must still
    # be at full precision, and queries may read up to R + g - 1 past tokens from the window.
    kw = 0 if kbits == 16 else (R + g - 1 if k_pc else R)
    vw = 0 if vbits == 16 else R
    return (
        SideSpec(kbits, k_pc and kbits < 16, g, kw, kv.scale_dtype),
        SideSpec(vbits, False, g, vw, kv.scale_dtype),
    )


def plan_segments(cfg: ModelConfig, kv: KVQuantConfig) -> list[tuple[int, int, SideSpec, SideSpec]]:
    """Runs of consecutive layers with equal bits: ``[(start, stop, kspec, vspec), ...]``."""
    bits = kv.layer_bits(cfg.num_layers)
    runs = []
    start = 0
    for layer in range(1, cfg.num_layers + 1):
        if layer == cfg.num_layers or bits[layer] != bits[start]:
            runs.append((start, layer, *side_specs(kv, *bits[start])))
            start = layer
    return runs


def frontier(i, spec: SideSpec, kv: KVQuantConfig):
    """Number of leading body slots a query at body slot ``i`` reads quantized (module docstring)."""
    n = i - kv.residual + (1 if kv.mode == "all" else 0)
    n = jnp.maximum(n, 0)
    if spec.per_channel:
        n = n // spec.group * spec.group
    return n


# ----------------------------------------------------------------------------------------------
# The quantizer


def _scale_dtype(name: str):
    return jnp.dtype(name)


def scale_range(dtype) -> tuple[float, float]:
    """The smallest and largest scale stored in ``dtype``. One-byte floats have a narrow range: their
    subnormals count. For 16-bit ones the smallest normal is plenty small and stays clear of float32
    denormals (flushed to zero on some backends)."""
    info = jnp.finfo(dtype)
    return float(info.smallest_subnormal if info.bits == 8 else info.smallest_normal), float(info.max)


def scale_step(mn: jax.Array, mx: jax.Array, bits: int) -> jax.Array:
    """The float32 grid step of a group with minimum ``mn`` and maximum ``mx``, before storage: the
    range over the levels, and at least |min| / 127 so that the int8 zero point reaches -min/scale.
    Multiplied by reciprocals, written out: XLA turns a division by a constant into that anyway, and
    the Pallas kernel of ``jaxkv.kernels.kvdecode`` computes the same expression."""
    return jnp.maximum((mx - mn) * np.float32(1 / (2**bits - 1)), jnp.abs(mn) * np.float32(1 / ZERO_MAX))


def _store_scale(s: jax.Array, dtype) -> jax.Array:
    """Round positive float32 scales *up* to ``dtype`` (so the grid still covers the range)."""
    info = jnp.finfo(dtype)
    s = jnp.clip(s, *scale_range(dtype))
    if jnp.dtype(dtype) == jnp.float32:
        return s
    # The barriers force the value really rounded to ``dtype``: XLA may otherwise fold
    # convert(convert(s, narrow), f32) back to s (allow_excess_precision, on by default; seen on GPU),
    # and the codes would then be computed against a scale other than the one stored.
    stored = jax.lax.optimization_barrier(s.astype(dtype))
    uint = jnp.uint8 if info.bits == 8 else jnp.uint16
    # For positive finite floats the next representable value has the next bit pattern.
    bumped = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(stored, uint) + 1, dtype)
    return jax.lax.optimization_barrier(jnp.where(stored.astype(jnp.float32) < s, bumped, stored))


def _ste(value: jax.Array, like: jax.Array) -> jax.Array:
    """``value`` exactly (``like - like`` adds +0.0), with the gradient of ``like`` (straight-through)."""
    return jax.lax.stop_gradient(value) + (like - jax.lax.stop_gradient(like))


def _grid(x: jax.Array, bits: int, axis: int, scale_dtype: str, clip=None):
    """float32 codes, stored scale, float32 scale and float32 zero of :func:`quantize`.

    ``clip = (fmax, fmin)``, factors in (0, 1] broadcastable to the group statistics, shrinks the range
    to ``[fmin * min, fmax * max]`` (OmniQuant's learnable clipping; values outside saturate) and makes
    the rounding straight-through, so the result is differentiable in ``x`` and the factors. Factors of
    exactly 1 give the unclipped values bit for bit.
    """
    x = x.astype(jnp.float32)
    levels = 2**bits - 1
    mn = jnp.min(x, axis=axis, keepdims=True)
    mx = jnp.max(x, axis=axis, keepdims=True)
    rnd = jnp.round
    if clip is not None:
        mx, mn = mx * clip[0], mn * clip[1]
        rnd = lambda a: _ste(jnp.round(a), a)  # noqa: E731
    s = scale_step(mn, mx, bits)
    scale = _store_scale(s, _scale_dtype(scale_dtype))
    sf = scale.astype(jnp.float32)
    if clip is not None:
        sf = _ste(sf, s)
    zero = jnp.clip(rnd(-mn / sf), ZERO_MIN, ZERO_MAX)
    codes = jnp.clip(rnd(x / sf) + zero, 0, levels)
    return codes, scale, sf, zero


def quantize(x: jax.Array, bits: int, axis: int, scale_dtype: str, clip=None):
    """Asymmetric quantization of ``x`` with one group along ``axis`` (reduced with keepdims).

    Returns ``(codes uint8 like x, scale [scale_dtype], zero int8)`` with ``x ≈ (codes - zero) * scale``.
    ``clip``: see :func:`_grid` (``jaxkv.wkvquant``).
    """
    codes, scale, _, zero = _grid(x, bits, axis, scale_dtype, clip)
    return codes.astype(jnp.uint8), scale, zero.astype(jnp.int8)


def fake_quantize(x: jax.Array, bits: int, axis: int, scale_dtype: str, clip=None) -> jax.Array:
    """``dequantize(*quantize(x, ...))`` as float32, bit for bit, without integer casts: differentiable
    (straight-through) when ``clip`` is given."""
    codes, _, sf, zero = _grid(x, bits, axis, scale_dtype, clip)
    return (codes - zero) * sf


def clip_factors(clip_logits: jax.Array | None):
    """``(fmax, fmin) = (sigmoid(gamma), sigmoid(beta))`` from logits ``[..., C, 2]`` (+inf: no clipping)."""
    if clip_logits is None:
        return None
    f = jax.nn.sigmoid(clip_logits.astype(jnp.float32))
    return f[..., 0], f[..., 1]


def dequantize(codes, scale, zero) -> jax.Array:
    """float32 ``(codes - zero) * scale`` (broadcasting)."""
    return (codes.astype(jnp.float32) - zero.astype(jnp.float32)) * scale.astype(jnp.float32)


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes [..., H] -> packed uint8 [..., H*bits/8] (the ``jaxkv.quant.qarray`` bitstream)."""
    from jaxkv.quant import qarray

    return qarray.pack(codes[..., None], bits)[..., 0]


def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of :func:`pack_codes`."""
    from jaxkv.quant import qarray

    return qarray.unpack(packed[..., None], bits)[..., 0]


def packed_width(H: int, bits: int) -> int:
    """Bytes per packed row of H codes."""
    return H * bits // 8


def _group_clip(clip):
    """Clip factors ``[K, C]`` -> broadcastable to per-token group statistics ``[..., K, C, 1]``."""
    return None if clip is None else tuple(f[..., None] for f in clip)


def quantize_tokens(x: jax.Array, spec: SideSpec, clip=None):
    """Per-token quantization of ``x [..., K, H]`` in groups of ``spec.group`` channels.

    Returns ``(codes [..., K, H], scale [..., K, C], zero [..., K, C])``. ``clip``: factors
    ``(fmax, fmin)``, each ``[K, C]`` (:func:`clip_factors`).
    """
    *lead, K, H = x.shape
    g = spec.group
    c, s, z = quantize(x.reshape(*lead, K, H // g, g), spec.bits, -1, spec.scale_dtype, _group_clip(clip))
    return c.reshape(*lead, K, H), s[..., 0], z[..., 0]


def quantize_channels(x: jax.Array, spec: SideSpec):
    """Per-channel quantization of token groups ``x [..., J, g, K, H]`` (one group per J).

    Returns ``(codes [..., J, g, K, H], scale [..., J, K, H], zero [..., J, K, H])``.
    """
    c, s, z = quantize(x, spec.bits, -3, spec.scale_dtype)
    return c, s[..., 0, :, :], z[..., 0, :, :]


def fake_quantize_sequence(x: jax.Array, spec: SideSpec, pivot_len: int, clip=None) -> jax.Array:
    """What the cache would hold for ``x [B, T, K, H]`` (positions 0..T-1), dequantized (float32).

    Positions < ``pivot_len`` are returned unchanged. Per-channel groups are aligned to body slots
    (position - pivot_len); the trailing incomplete group is returned quantized by its partial
    statistics, which :func:`frontier` never lets a query read. ``clip``: per-token sides only, as
    :func:`quantize_tokens`.
    """
    B, T, K, H = x.shape
    P = pivot_len
    body = x[:, P:].astype(jnp.float32)
    n = T - P
    if spec.per_channel:
        g = spec.group
        J = -(-n // g)
        padded = jnp.pad(body, ((0, 0), (0, J * g - n), (0, 0), (0, 0)), mode="edge") if J * g > n else body
        c, s, z = quantize_channels(padded.reshape(B, J, g, K, H), spec)
        deq = dequantize(c, s[:, :, None], z[:, :, None]).reshape(B, J * g, K, H)[:, :n]
    else:
        g = spec.group
        deq = fake_quantize(
            body.reshape(B, n, K, H // g, g), spec.bits, -1, spec.scale_dtype, _group_clip(clip)
        ).reshape(B, n, K, H)
    return jnp.concatenate([x[:, :P].astype(jnp.float32), deq], axis=1)


# ----------------------------------------------------------------------------------------------
# The cache pytree


@flax.struct.dataclass
class QuantSide:
    """Keys or values of one run of layers (see the module docstring for shapes)."""

    data: jax.Array
    scale: jax.Array | None
    zero: jax.Array | None
    window: jax.Array | None
    spec: SideSpec = flax.struct.field(pytree_node=False)
    # ``jaxkv.wkvquant`` parameters of these layers (full precision, small): {"scale", "shift"}
    # [Lc, K, H] and clip logits {"clip"} [Lc, K, C, 2]; None for the min-max quantizer.
    wkv: dict | None = None


@flax.struct.dataclass
class QuantSegment:
    """Layers ``[start, stop)`` of a quantized body."""

    k: QuantSide
    v: QuantSide
    start: int = flax.struct.field(pytree_node=False)
    stop: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class KVCache:
    pivot_k: jax.Array
    pivot_v: jax.Array
    k: jax.Array | None
    v: jax.Array | None
    lengths: jax.Array
    segments: tuple[QuantSegment, ...] = ()
    kv: KVQuantConfig | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def quantized(self) -> bool:
        return bool(self.segments)

    @property
    def max_len(self) -> int:
        """S: body slots per sequence."""
        if self.k is not None:
            return self.k[0].shape[1] if isinstance(self.k, tuple) else self.k.shape[2]
        side = self.segments[0].k
        return side[0].data.shape[2] if isinstance(side, tuple) else side.data.shape[3]

    @property
    def pivot_len(self) -> int:
        """P: pivot positions shared by the batch."""
        return self.pivot_k.shape[1]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def _empty_side(spec: SideSpec, Lc: int, B: int, S: int, K: int, H: int, dtype) -> QuantSide:
    if not spec.quantized:
        return QuantSide(jnp.zeros((Lc, B, K, S, H), dtype), None, None, None, spec)
    sdt = _scale_dtype(spec.scale_dtype)
    meta = (Lc, B, K, S // spec.group, H) if spec.per_channel else (Lc, B, K, S, H // spec.group)
    window = jnp.zeros((Lc, B, spec.window, K, H), dtype) if spec.window else None
    return QuantSide(
        data=jnp.zeros((Lc, B, K, S, packed_width(H, spec.bits)), jnp.uint8),
        scale=jnp.zeros(meta, sdt),
        zero=jnp.zeros(meta, jnp.int8),
        window=window,
        spec=spec,
    )


def init_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    dtype=jnp.float32,
    pivot_k: jax.Array | None = None,
    pivot_v: jax.Array | None = None,
    kv: KVQuantConfig | None = None,
    wkv: dict | None = None,
    per_layer: bool = False,
) -> KVCache:
    """An empty cache of ``max_len`` body slots, optionally starting with pivot K/V ``[L, P, K, H]``.

    With ``kv`` (and anything quantized), the body is quantized as ``kv`` says; ``max_len`` is then
    rounded up to a multiple of ``kv.group`` when keys are quantized per channel. ``wkv``: the
    per-layer parameters of ``kv.method == "wkvquant"`` (``jaxkv.wkvquant``), copied into the
    quantized sides of their layers. ``per_layer``: the body in the per-layer layout (one buffer per
    layer; see the module docstring), for the layer loop of ``jaxkv.model.decode_layout``'s parameters.
    """
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    if (pivot_k is None) != (pivot_v is None):
        raise ValueError("pivot_k and pivot_v must be given together")
    if pivot_k is None:
        pivot_k, pivot_v = jnp.zeros((L, 0, K, H), dtype), jnp.zeros((L, 0, K, H), dtype)
    if pivot_k.shape != pivot_v.shape or pivot_k.shape[0] != L or pivot_k.shape[2:] != (K, H):
        raise ValueError(
            f"pivot K/V have shapes {pivot_k.shape} and {pivot_v.shape}, expected [L={L}, P, K={K}, H={H}]"
        )
    # Copies: the cache is donated to jitted steps, which must not consume the caller's prefix.
    pk = jnp.array(pivot_k, dtype=dtype, copy=True)
    pv = jnp.array(pivot_v, dtype=dtype, copy=True)
    lengths = jnp.zeros((batch,), jnp.int32)
    if kv is None or kv.is_identity(L):
        # Separate buffers for k and v (and per layer): the cache is donated, and one buffer cannot
        # be donated twice.
        if per_layer:
            k, v = (tuple(jnp.zeros((batch, max_len, K, H), dtype) for _ in range(L)) for _ in "kv")
        else:
            k, v = (jnp.zeros((L, batch, max_len, K, H), dtype) for _ in "kv")
        return KVCache(pivot_k=pk, pivot_v=pv, k=k, v=v, lengths=lengths)
    kv.check(cfg)
    check_wkv(kv, wkv, cfg)
    plan = plan_segments(cfg, kv)
    if any(ks.per_channel for _, _, ks, _ in plan):
        max_len = -(-max_len // kv.group) * kv.group

    def stacked_side(spec, name, start, stop):
        empty = _empty_side(spec, stop - start, batch, max_len, K, H, dtype)
        if wkv is None or not spec.quantized:
            return empty
        # Copies: the cache is donated to jitted steps, which must not consume the caller's parameters.
        return empty.replace(
            wkv={n: jnp.array(a[start:stop], copy=True) for n, a in wkv_side(wkv, name).items()}
        )

    def side(spec, name, start, stop):
        if not per_layer:
            return stacked_side(spec, name, start, stop)
        # one side per layer, without the layer axis
        return tuple(
            jax.tree.map(lambda a: a[0], stacked_side(spec, name, i, i + 1)) for i in range(start, stop)
        )

    segments = tuple(
        QuantSegment(k=side(ks, "k", start, stop), v=side(vs, "v", start, stop), start=start, stop=stop)
        for start, stop, ks, vs in plan
    )
    return KVCache(pivot_k=pk, pivot_v=pv, k=None, v=None, lengths=lengths, segments=segments, kv=kv)


WKV_NAMES = ("scale", "shift", "clip")


def wkv_side(wkv: dict, side: str) -> dict:
    """``{"scale", "shift", "clip"}`` of keys (``side="k"``) or values from the flat parameter dict
    ``{"k_scale", ..., "v_clip"}`` of ``jaxkv.wkvquant``."""
    return {n: wkv[f"{side}_{n}"] for n in WKV_NAMES}


def check_wkv(kv: KVQuantConfig | None, wkv: dict | None, cfg: ModelConfig) -> None:
    """Raise ConfigError unless ``wkv`` is given exactly when ``kv.method`` is ``wkvquant``, with
    the shapes of ``cfg``."""
    method = "minmax" if kv is None else kv.method
    if method != "wkvquant":
        if wkv is not None:
            raise ConfigError(f"WKVQuant parameters were given, but the KV cache method is {method!r}")
        return
    if wkv is None:
        raise ConfigError("KV cache method 'wkvquant' needs its learned parameters (wkv=...)")
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    want = {"scale": (L, K, H), "shift": (L, K, H), "clip": (L, K, H // kv.group, 2)}
    for side in ("k", "v"):
        for name, shape in want.items():
            got = getattr(wkv.get(f"{side}_{name}"), "shape", None)
            if got is None or tuple(got) != shape:
                raise ConfigError(f"WKVQuant parameter {side}_{name} has shape {got}, expected {shape}")


# ----------------------------------------------------------------------------------------------
# Storage accounting (real bytes of the leaves: packed codes count bits, not elements)


def tree_bytes(tree) -> int:
    """Bytes of every array leaf (``jax.Array`` or ``ShapeDtypeStruct``) of ``tree``."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _body_and_window_bytes(cache: KVCache) -> tuple[int, int]:
    if not cache.segments:
        return tree_bytes((cache.k, cache.v)), 0
    body = window = 0
    for seg in cache.segments:
        for side in (seg.k, seg.v):
            body += tree_bytes((side.data, side.scale, side.zero))
            window += tree_bytes(side.window)
    return body, window


def kv_storage(cfg: ModelConfig, kv: KVQuantConfig | None = None, dtype=jnp.float16) -> dict[str, float]:
    """Real storage of a cache for one sequence, from the leaves of an (abstract) cache.

    ``bytes_per_token``: body bytes per token, all layers, keys and values, codes + scales + zeros
    (per-channel key scales are amortised over their group of tokens). ``window_bytes``: the fixed
    full-precision window per sequence (R or R + group - 1 tokens). Pivot slots are shared by the
    batch and not counted, nor are the per-layer parameters of ``wkvquant``.
    """
    S = 64 * (kv.group if kv is not None else 1)
    if kv is not None and kv.method == "wkvquant":  # + per-layer smoothing and clipping: not per token
        kv = dataclasses.replace(kv, method="minmax")
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, S, dtype, kv=kv))
    body, window = _body_and_window_bytes(shapes)
    return {"bytes_per_token": body / shapes.max_len, "window_bytes": window}


def kv_bytes_per_token(cfg: ModelConfig, kv: KVQuantConfig | None = None, dtype=jnp.float16) -> float:
    """Body bytes per token of a cache (all layers, scales included); ``kv=None``: the fp16 cache."""
    return kv_storage(cfg, kv, dtype)["bytes_per_token"]


def kv_bytes_per_token_fp16(cfg: ModelConfig) -> float:
    """Bytes per token of the full-precision fp16/bf16 cache: 2 (K and V) * L * K * H * 2."""
    return kv_bytes_per_token(cfg, None, jnp.float16)


def cache_bytes(cache: KVCache) -> int:
    """Bytes that ``cache`` holds on the device (all leaves)."""
    return tree_bytes(cache)


# ----------------------------------------------------------------------------------------------
# Per-layer bit budget ("Quantize What Counts", arXiv 2502.15075)


def kv_weight_norms(params, cfg: ModelConfig) -> dict[str, list[float]]:
    """Frobenius and spectral norms of W_k and W_v per layer (float64, on the host)."""
    out: dict[str, list[float]] = {"wk_fro": [], "wv_fro": [], "wk_spec": [], "wv_spec": []}
    for name, key in (("wk", "wk"), ("wv", "wv")):
        from jaxkv.quant import qarray

        w = params["layers"][key]
        if qarray.is_qarray(w):  # norms of the weights as the quantized model holds them
            w = qarray.dequantize(w, jnp.float32)
        w = np.asarray(jax.device_get(w), np.float64)
        for layer in range(cfg.num_layers):
            out[f"{name}_fro"].append(float(np.linalg.norm(w[layer])))
            out[f"{name}_spec"].append(float(np.linalg.norm(w[layer], 2)))
    return out


def allocate_bits(
    norm_k, norm_v, budget: float, choices: tuple[int, ...] = (2, 3, 4, 8)
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-layer (key bits, value bits) with mean code bits over all 2L tensors <= ``budget``.

    Error model of a uniform b-bit quantizer of a projection output whose scale follows its weight
    norm (the argument of "Quantize What Counts"): ``err(b) ∝ ||W||^2 4^-b``. Greedy marginal
    allocation: start every tensor at the fewest bits, then repeatedly give the next bit width to
    the tensor with the largest error drop per added bit that still fits the budget. Ties favour keys.
    """
    choices = tuple(sorted(choices))
    norm_k, norm_v = np.asarray(norm_k, np.float64), np.asarray(norm_v, np.float64)
    L = len(norm_k)
    if len(norm_v) != L:
        raise ConfigError(f"allocate_bits: {L} key norms but {len(norm_v)} value norms")
    if not choices[0] <= budget <= choices[-1]:
        raise ConfigError(f"kv budget must lie in [{choices[0]}, {choices[-1]}] bits, got {budget}")
    weights = np.concatenate([norm_k, norm_v]) ** 2
    level = np.zeros(2 * L, np.int64)  # index into choices
    total, cap = 2 * L * choices[0], budget * 2 * L + 1e-9
    while True:
        best, best_gain = None, 0.0
        for t in range(2 * L):
            if level[t] + 1 >= len(choices):
                continue
            b0, b1 = choices[level[t]], choices[level[t] + 1]
            if total + b1 - b0 > cap:
                continue
            gain = weights[t] * (4.0**-b0 - 4.0**-b1) / (b1 - b0)
            if gain > best_gain * (1 + 1e-12):
                best, best_gain = t, gain
        if best is None:
            break
        total += choices[level[best] + 1] - choices[level[best]]
        level[best] += 1
    bits = [choices[i] for i in level]
    return tuple(bits[:L]), tuple(bits[L:])


# ----------------------------------------------------------------------------------------------
# Entry-point helpers (the CLI and scripts stay thin)


def make_kv_config(
    params=None,
    cfg: ModelConfig | None = None,
    *,
    kbits: int = 16,
    vbits: int = 16,
    group: int = 32,
    residual: int = 0,
    mode: str = "past-only",
    k_granularity: str = "per-channel",
    scale_dtype: str = "float8_e4m3fn",
    budget: float | None = None,
    method: str = "minmax",
) -> KVQuantConfig | None:
    """A checked :class:`KVQuantConfig`, or None when nothing is quantized.

    With ``budget`` (mean bits per cached element), per-layer key/value bits come from
    :func:`allocate_bits` on the W_k/W_v norms of ``params`` and ``kbits``/``vbits`` are ignored.
    """
    layer_kbits = layer_vbits = None
    if budget is not None:
        if params is None or cfg is None:
            raise ConfigError("a kv bit budget needs the model's parameters")
        norms = kv_weight_norms(params, cfg)
        layer_kbits, layer_vbits = allocate_bits(norms["wk_fro"], norms["wv_fro"], budget)
    kv = KVQuantConfig(
        kbits=kbits,
        vbits=vbits,
        k_granularity=k_granularity,
        group=group,
        residual=residual,
        mode=mode,
        scale_dtype=scale_dtype,
        layer_kbits=layer_kbits,
        layer_vbits=layer_vbits,
        method=method,
    )
    if cfg is not None:
        if kv.is_identity(cfg.num_layers):
            return None
        kv.check(cfg)
    return kv


def kv_report(cfg: ModelConfig, kv: KVQuantConfig | None) -> dict[str, Any]:
    """JSON fields describing the KV cache: config, bytes per token (real storage) and the fp16 baseline."""
    storage = kv_storage(cfg, kv)
    fp16 = kv_bytes_per_token_fp16(cfg)
    out: dict[str, Any] = {
        "kv": None if kv is None else {**kv.to_dict(), "label": kv.label()},
        "kv_bytes_per_token": storage["bytes_per_token"],
        "kv_bytes_per_token_fp16": fp16,
        "kv_ratio_fp16": storage["bytes_per_token"] / fp16,
        "kv_window_bytes": storage["window_bytes"],
    }
    if kv is not None and (kv.layer_kbits or kv.layer_vbits):
        bits = kv.layer_bits(cfg.num_layers)
        out["kv_layer_kbits"] = [b[0] for b in bits]
        out["kv_layer_vbits"] = [b[1] for b in bits]
    return out
