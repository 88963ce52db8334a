"""The quantized leaf type :class:`QArray`: group-wise integer weights with real packed storage.

Conventions
-----------
* A weight ``w [..., I, O]`` (stored (in, out), ``y = x @ w``; any leading axes, e.g. the stacked
  layer axis L, come first) is split into groups of ``group`` consecutive **input** rows. Each
  (group, output column) pair has one scale and, when asymmetric, one integer zero point::

      w[..., i, o] ≈ (q[..., i, o] - zero[..., i // group, o]) * scale[..., i // group, o]

  Codes ``q`` are unsigned, ``0 <= q < 2**bits``. Symmetric quantization stores no zero array: its
  zero point is the constant ``2**(bits - 1)`` (the signed code ``q - 2**(bits-1)`` of llm-awq's
  ``zero_point=False`` branch, offset to be unsigned).
* Packing: codes are a little-endian bitstream along the input axis, in bytes (uint8): code ``k`` of a
  column occupies bits ``[k*bits, (k+1)*bits)`` of that column's stream. So 8-bit codes are plain
  bytes, 4-bit codes are two per byte (low nibble first), 2-bit four per byte, and 3-bit codes eight
  per three bytes. ``packed`` has shape ``[..., I*bits/8, O]``. The same bitstream, read as int32
  words, is exactly the ``qweight`` of the Hugging Face GPTQ layout (see ``jaxkv.quant.io``).
* Why bytes and not ``jnp.int4`` for 4 bits: measured here (jax 0.10.2, CPU), both hold half a byte
  per weight in host memory (RSS grew 128 MiB per 256 Mi elements for either), but unpacking the
  uint8 nibbles ran 3x faster than converting ``jnp.int4`` in a [1,1536]x[1536,1536] group-64
  dequant-matmul (0.85 ms vs 2.5 ms; equal at 512 tokens), Orbax/tensorstore rejects ``uint4`` (so
  int4 would need a signed offset), and one byte layout serves 2, 3, 4 and 8 bits alike. ``nbytes``
  of a ``jnp.int4`` array reports a byte per element; :meth:`QArray.nbytes_storage` counts real bytes.
* A second layout, for the GPU decode kernel at 2-64 rows only (``layout="oi"``, made by
  :func:`to_layout` from ``jaxkv.model.decode_layout``): each output column's codes contiguous.
  4-bit: ``packed [..., O, I/2]``, byte ``j`` of a group holding the codes of inputs ``j`` (low
  nibble) and ``j + group/2`` (high nibble) of that group. The tensor cores then get each thread's
  operand bytes in whole words instead of one byte at a time, and each nibble plane meets a
  contiguous half of the group's inputs: the kernels of the four Llama-2-7B decode matmuls at 8 rows
  took 76.0 us instead of 92.5 on an H100 (run 44, ``results/bench/h100_run44_qmm_layouts.md``).
  One row keeps the canonical layout: a one-row kernel over this one, the best of 14 tiles per
  shape, took 1.2-1.6x as long (each thread's few bytes of a column need as many ``x`` values as
  weights), and one that reads all groups of 16 outputs per program, so no split-K sum follows it,
  1.4-1.8x (H100 run 68, ``jaxkv.kernels.qmatmul``). 8-bit: ``packed [..., O, I]``, the codes
  transposed; the kernel takes it (checked in the interpreter only), but ``decode_layout`` does not
  choose it yet: it has not been timed on a GPU.
  Checkpoints, sharding and the Hugging Face layouts use the canonical layout; :func:`codes_of` and
  :func:`dequantize` read both.
* Metadata (``bits``, ``group``, ``sym``, compute ``dtype``, ``layout``) is static (not a pytree leaf). The
  logical shape is derived from the leaves, so slicing every leaf along a leading axis (what
  ``jax.lax.scan`` over L does) yields a consistent QArray.
* ``zero`` is stored as uint8 codes (``0 <= zero < 2**bits``, integers in llm-awq's formula), scales
  in ``scale.dtype`` (bf16, fp16 or fp32). Codes are always computed against the scale *as stored*,
  so ``dequantize`` reproduces exactly what the quantizer intended.
"""

from __future__ import annotations

import math
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
LAYOUTS = ("io", "oi")  # canonical [..., I*bits/8, O]; the decode kernels' [..., O, I*bits/8] (4, 8 bits)


def chunk_shape(bits: int) -> tuple[int, int]:
    """(codes, bytes) per packing chunk: the smallest run of codes that fills whole bytes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported (supported: {SUPPORTED_BITS})")
    nbits = math.lcm(bits, 8)
    return nbits // bits, nbits // 8


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Pack integer codes ``[..., I, O]`` (``0 <= q < 2**bits``) into uint8 ``[..., I*bits/8, O]``."""
    c, nb = chunk_shape(bits)
    *lead, I, O = codes.shape
    if I % c:
        raise ValueError(f"{bits}-bit packing needs the input dimension to be a multiple of {c}, got {I}")
    q = codes.astype(jnp.uint32).reshape(*lead, I // c, c, O)
    shifts = (jnp.arange(c, dtype=jnp.uint32) * bits)[:, None]
    # A chunk is at most 24 bits (3-bit codes), so it fits one uint32 word; disjoint bits: sum == or.
    word = jnp.sum(q << shifts, axis=-2, dtype=jnp.uint32)  # [..., I/c, O]
    out = jnp.stack([(word >> (8 * m)) & 0xFF for m in range(nb)], axis=-2)  # [..., I/c, nb, O]
    return out.astype(jnp.uint8).reshape(*lead, I // c * nb, O)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of :func:`pack`: uint8 ``[..., I*bits/8, O]`` -> uint8 codes ``[..., I, O]``."""
    c, nb = chunk_shape(bits)
    if bits == 8:
        return packed
    *lead, R, O = packed.shape
    if nb == 1:
        word = packed
    else:
        b = packed.reshape(*lead, R // nb, nb, O).astype(jnp.uint32)
        word = b[..., 0, :]
        for m in range(1, nb):
            word = word | (b[..., m, :] << (8 * m))
    shifts = (jnp.arange(c, dtype=word.dtype) * bits)[:, None]
    codes = (word[..., None, :] >> shifts) & ((1 << bits) - 1)  # [..., R/nb, c, O]
    return codes.astype(jnp.uint8).reshape(*lead, R // nb * c, O)


@flax.struct.dataclass
class QArray:
    """A group-wise quantized weight ``[..., I, O]``; ``w ≈ (q - zero) * scale`` per input group.

    Leaves (all share the leading axes, so ``lax.scan`` can slice them):
      ``packed``  uint8 ``[..., I*bits/8, O]``: the codes, bit-packed along I (module docstring);
                  ``[..., O, I*bits/8]`` in the ``"oi"`` layout (4 and 8 bits).
      ``scale``   ``[..., I/group, O]`` in bf16, fp16 or fp32.
      ``zero``    uint8 ``[..., I/group, O]`` integer zero points, or None when symmetric (implicit
                  zero ``2**(bits-1)``).
    Static: ``bits`` (2, 3, 4, 8), ``group`` (rows per group; ``group == I`` is per-channel),
    ``dtype`` (the compute dtype that :func:`dequantize` and :func:`matmul` produce), ``layout``
    (``"io"``, or the decode kernels' ``"oi"``: see the module docstring and :func:`to_layout`).
    """

    packed: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    bits: int = flax.struct.field(pytree_node=False)
    group: int = flax.struct.field(pytree_node=False)
    dtype: np.dtype = flax.struct.field(pytree_node=False)
    layout: str = flax.struct.field(pytree_node=False, default="io")

    @property
    def sym(self) -> bool:
        return self.zero is None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.layout == "oi":
            *lead, O, R = self.packed.shape
        else:
            *lead, R, O = self.packed.shape
        return (*lead, R * 8 // self.bits, O)

    @property
    def ndim(self) -> int:
        return self.packed.ndim

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def nbytes_storage(self) -> int:
        """Bytes really held: packed codes, scales and zero points."""
        leaves = [self.packed, self.scale] + ([] if self.zero is None else [self.zero])
        return int(sum(x.size * np.dtype(x.dtype).itemsize for x in leaves))

    def astype(self, dtype) -> QArray:
        """The same storage with another compute dtype (no data is touched)."""
        return self.replace(dtype=np.dtype(dtype))

    def __getitem__(self, idx) -> QArray:
        """Index the leading (stacked) axes only, e.g. ``q[l]`` for layer l."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > self.ndim - 2 or any(i is Ellipsis or i is None for i in idx):
            raise IndexError(f"a QArray of shape {self.shape} can only be indexed on its leading axes")
        return jax.tree.map(lambda a: a[idx], self)

    def __repr__(self) -> str:
        kind = "sym" if self.sym else "asym"
        layout = "" if self.layout == "io" else f", layout={self.layout}"
        return (
            f"QArray(shape={self.shape}, bits={self.bits}, group={self.group}, {kind}, "
            f"scale={np.dtype(self.scale.dtype).name}, dtype={np.dtype(self.dtype).name}{layout})"
        )


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def check_group(shape: tuple[int, ...], bits: int, group: int, name: str = "weight") -> int:
    """The group of ``bits``-bit codes for a weight of ``shape`` (``-1``/``0``/``None``: the whole
    input dimension); a ValueError naming ``name`` when it does not divide the input dimension."""
    if len(shape) < 2:
        raise ValueError(
            f"{name}: a quantized weight needs at least 2 dimensions [..., in, out], got {shape}"
        )
    I = shape[-2]
    group = I if group in (None, 0, -1) else group
    if group <= 0 or I % group:
        raise ValueError(
            f"{name}: group size {group} does not divide its input dimension {I} (shape {tuple(shape)}); "
            f"use a group that divides {I} (e.g. {_divisor_hint(I)}) or -1 for per-channel"
        )
    c, _ = chunk_shape(bits)
    if I % c:
        raise ValueError(f"{name}: {bits}-bit packing needs the input dimension {I} to be a multiple of {c}")
    return group


def _divisor_hint(n: int) -> str:
    ds = [d for d in (256, 128, 64, 32, 16) if n % d == 0]
    return ", ".join(map(str, ds[:3])) or "a divisor"


def _compute_dtype(w) -> jnp.dtype:
    # float64 stays float64 (only possible under jax_enable_x64, used by the exactness tests).
    return jnp.promote_types(w.dtype, jnp.float32)


def _stored(scale: jax.Array, scale_dtype) -> jax.Array:
    """``scale`` rounded to ``scale_dtype`` for real: under jit XLA may fold convert(convert(s, fp16),
    f32) back to ``s`` (excess precision, seen on GPU), and codes would follow a scale other than the
    stored one. The barrier keeps the narrow value."""
    return jax.lax.optimization_barrier(scale.astype(scale_dtype))


def quant_params(w: jax.Array, bits: int, group: int, sym: bool = False, scale_dtype=jnp.float16):
    """llm-awq's ``pseudo_quantize_tensor`` statistics per group of input rows.

    Returns ``(scale [..., I/g, O] in scale_dtype, zero [..., I/g, O] float integer-valued or None)``.
    Asymmetric: ``scale = max(max - min, 1e-5) / (2^b - 1)``, ``zero = clip(-round(min / scale), 0, 2^b - 1)``.
    Symmetric: ``scale = max(|w|max, 1e-5) / (2^(b-1) - 1)``. The zero point is derived from the scale
    after rounding it to ``scale_dtype``, so codes and dequantization agree with storage.
    """
    group = check_group(w.shape, bits, group)
    cd = _compute_dtype(w)
    *lead, I, O = w.shape
    wg = w.astype(cd).reshape(*lead, I // group, group, O)
    if sym:
        mx = jnp.maximum(jnp.max(jnp.abs(wg), axis=-2), 1e-5)
        return _stored(mx / (2 ** (bits - 1) - 1), scale_dtype), None
    mx, mn = jnp.max(wg, axis=-2), jnp.min(wg, axis=-2)
    scale = _stored(jnp.maximum(mx - mn, 1e-5) / (2**bits - 1), scale_dtype)
    zero = jnp.clip(-jnp.round(mn / scale.astype(cd)), 0, 2**bits - 1)
    return scale, zero


def quantize_codes(
    w: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int, group: int
) -> jax.Array:
    """Codes ``clip(round(w / scale) + zero, 0, 2^b - 1)`` [..., I, O] (compute dtype, integer-valued)."""
    cd = _compute_dtype(w)
    *lead, I, O = w.shape
    group = I if group in (None, 0, -1) else group
    wg = w.astype(cd).reshape(*lead, I // group, group, O)
    z = 2 ** (bits - 1) if zero is None else zero.astype(cd)[..., None, :]
    q = jnp.clip(jnp.round(wg / scale.astype(cd)[..., None, :]) + z, 0, 2**bits - 1)
    return q.reshape(w.shape)


def _rtn_numpy(w: np.ndarray, bits: int, group: int, sym: bool, scale_dtype):
    """llm-awq's formula on the host in float64 numpy for one ``[I, O]`` matrix -> (codes, scale, zero)."""
    I, O = w.shape
    wg = w.astype(np.float64).reshape(I // group, group, O)
    if sym:
        scale = np.maximum(np.abs(wg).max(axis=1), 1e-5) / (2 ** (bits - 1) - 1)
    else:
        scale = np.maximum(wg.max(axis=1) - wg.min(axis=1), 1e-5) / (2**bits - 1)
    scale = scale.astype(scale_dtype)  # round to storage first; codes and zeros follow the stored scale
    s = scale.astype(np.float64)
    if sym:
        zero, z = None, 2 ** (bits - 1)
    else:
        zero = np.clip(-np.round(wg.min(axis=1) / s), 0, 2**bits - 1)
        z = zero[:, None, :]
    codes = np.clip(np.round(wg / s[:, None, :]) + z, 0, 2**bits - 1)
    return codes.reshape(I, O).astype(np.uint8), scale, None if zero is None else zero.astype(np.uint8)


def quantize_tensor(
    w: jax.Array, bits: int, group: int, sym: bool = False, scale_dtype=jnp.float16, name: str = "weight"
) -> QArray:
    """Round-to-nearest (llm-awq ``pseudo_quantize_tensor``) and pack ``w [..., I, O]`` into a QArray.

    ``group`` of -1 (or 0) means per-channel (one group spans all of I). The compute dtype of the result
    is ``w.dtype``. A concrete ``w`` is quantized on the host in float64 numpy, one matrix at a time:
    XLA's CPU division is not correctly rounded (measured: 1/3 of ``x / 3`` differ from IEEE by an
    ulp), and the formula is meant to be reproduced exactly, on any backend. Under a trace the same
    formula runs in JAX (:func:`quant_params`, :func:`quantize_codes`).
    """
    group = check_group(w.shape, bits, group, name)
    if isinstance(w, jax.core.Tracer):
        scale, zero = quant_params(w, bits, group, sym, scale_dtype)
        codes = quantize_codes(w, scale, zero, bits, group)
        return from_codes(codes, scale, zero, bits, group, w.dtype)
    *lead, I, O = w.shape
    w_host = np.asarray(jax.device_get(w))
    ng = I // group
    codes = np.empty((*lead, I, O), np.uint8)
    scale = np.empty((*lead, ng, O), np.dtype(scale_dtype))
    zero = None if sym else np.empty((*lead, ng, O), np.uint8)
    for idx in np.ndindex(*lead):
        c, s, z = _rtn_numpy(w_host[idx], bits, group, sym, np.dtype(scale_dtype))
        codes[idx], scale[idx] = c, s
        if zero is not None:
            zero[idx] = z
    return from_codes(codes, scale, zero, bits, group, w.dtype)


def from_codes(codes, scale, zero, bits: int, group: int, dtype) -> QArray:
    """Build a QArray from integer codes ``[..., I, O]``, scales and zero points (None = symmetric)."""
    zero = None if zero is None else jnp.asarray(zero).astype(jnp.uint8)
    return QArray(
        packed=pack(jnp.asarray(codes).astype(jnp.uint32), bits),
        scale=jnp.asarray(scale),
        zero=zero,
        bits=bits,
        group=group,
        dtype=np.dtype(dtype),
    )


def codes_of(q: QArray) -> jax.Array:
    """The unpacked uint8 codes ``[..., I, O]`` (of either layout)."""
    if q.layout == "oi":
        return jnp.swapaxes(_codes_as_stored(q), -1, -2)
    return unpack(q.packed, q.bits)


def _codes_as_stored(q: QArray) -> jax.Array:
    """A ``"oi"`` QArray's uint8 codes ``[..., O, I]``, in the order they are stored."""
    if q.bits == 8:
        return q.packed
    *lead, O, R = q.packed.shape
    b = q.packed.reshape(*lead, O, R // (q.group // 2), 1, q.group // 2)
    return jnp.concatenate([b & 0xF, b >> 4], axis=-2).reshape(*lead, O, 2 * R)  # nibbles j, j + group/2


def to_layout(q: QArray, layout: str) -> QArray:
    """``q`` with its codes in ``layout`` (``"io"`` or ``"oi"``, module docstring); scales, zero
    points and values are unchanged. The ``"oi"`` layout holds 4- and 8-bit codes."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown QArray layout {layout!r} (known: {LAYOUTS})")
    if q.layout == layout:
        return q
    if layout == "io":
        return q.replace(packed=pack(codes_of(q), q.bits), layout="io")
    if q.bits not in (4, 8):
        raise ValueError(f'the "oi" layout holds 4- and 8-bit codes, this weight has {q.bits}-bit ones')
    codes = jnp.swapaxes(codes_of(q), -1, -2)  # [..., O, I]
    if q.bits == 4:  # byte j of a group: inputs j (low nibble) and j + group/2 (high)
        *lead, O, I = codes.shape
        halves = codes.reshape(*lead, O, I // q.group, 2, q.group // 2)
        codes = (halves[..., 0, :] | (halves[..., 1, :] << 4)).reshape(*lead, O, I // 2)
    return q.replace(packed=codes, layout="oi")


def zero_of(q: QArray, dtype=jnp.float32) -> jax.Array:
    """Zero points ``[..., I/g, O]`` as ``dtype`` (the implicit ``2^(b-1)`` broadcast when symmetric)."""
    if q.zero is None:
        return jnp.full(q.scale.shape, 2 ** (q.bits - 1), dtype)
    return q.zero.astype(dtype)


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """``(q - zero) * scale`` as a dense ``[..., I, O]`` array (``dtype`` defaults to ``q.dtype``).

    Arithmetic runs in float32 (float64 for float64 scales) and is cast at the end.
    """
    dtype = q.dtype if dtype is None else dtype
    cd = jnp.promote_types(q.scale.dtype, jnp.float32)
    *lead, I, O = q.shape
    codes = codes_of(q).astype(cd).reshape(*lead, I // q.group, q.group, O)
    w = (codes - zero_of(q, cd)[..., None, :]) * q.scale.astype(cd)[..., None, :]
    return w.reshape(*lead, I, O).astype(dtype)


def _dequantize_rows(q: QArray, dtype) -> jax.Array:
    """A ``"oi"`` QArray dequantized as it is stored, ``[..., O, I]`` (no transpose of the codes; the
    matmul takes the weight transposed)."""
    cd = jnp.promote_types(q.scale.dtype, jnp.float32)
    codes = _codes_as_stored(q).astype(cd)
    *lead, O, I = codes.shape
    codes = codes.reshape(*lead, O, I // q.group, q.group)
    zero = jnp.swapaxes(zero_of(q, cd), -1, -2)[..., None]
    scale = jnp.swapaxes(q.scale.astype(cd), -1, -2)[..., None]
    return ((codes - zero) * scale).reshape(*lead, O, I).astype(dtype)


@flax.struct.dataclass
class LayerOf:
    """Layer ``index`` (traced) of a stacked weight ``[L, ...]``, not yet sliced.

    The layer loop hands these to :func:`einsum` so that the GPU kernel can read the layer's bytes
    in place; slicing first would make XLA copy the slice before a custom call.
    """

    stacked: object  # QArray or jax.Array [L, ...]
    index: jax.Array

    @property
    def shape(self) -> tuple:
        """One layer's shape."""
        return tuple(self.stacked.shape[1:])

    def get(self):
        return self.stacked[self.index]


def _use_kernel(x: jax.Array, w: QArray) -> bool:
    """Whether the Pallas decode kernel (``jaxkv.kernels.qmatmul``) computes ``x @ w``.

    On a GPU, for a few rows of a 16-bit ``x``, outside a device mesh (the kernel is not partitioned);
    ``JAXKV_QMATMUL=xla`` forces the portable path (benchmarks compare them).
    """
    from jaxkv.kernels import qmatmul as qk

    if not _kernels_enabled() or x.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if not jax.sharding.get_abstract_mesh().empty:
        return False
    I, O = w.shape[-2:]
    return qk.supported(int(np.prod(x.shape[:-1])), I, O, w.bits, w.group)


def kernel_applies(x: jax.Array, w) -> bool:
    """Whether :func:`matmul` of ``x`` by ``w`` (a QArray or :class:`LayerOf` one; anything else:
    False) runs on the GPU kernel's path."""
    q = w.stacked if isinstance(w, LayerOf) else w
    return isinstance(q, QArray) and _use_kernel(x, q)


def _kernels_enabled() -> bool:
    return os.environ.get("JAXKV_QMATMUL", "auto") != "xla" and jax.default_backend() == "gpu"


def decode_layout_for(w: QArray, rows: int) -> str:
    """The layout in which :func:`matmul` of ``rows`` rows by ``w`` is fastest: ``"oi"`` where the
    GPU kernel's tensor-core path reads 4-bit codes (2 to 64 rows of a 16-bit ``x``; module
    docstring), ``"io"`` everywhere else (one row, CPU, TPU, other bit widths). 8-bit codes stay
    ``"io"`` until their ``"oi"`` kernel is timed on a GPU (its SASS suggests it is faster)."""
    from jaxkv.kernels import qmatmul as qk

    I, O = w.shape[-2:]
    fast = (
        _kernels_enabled()
        and w.bits == 4
        and rows >= 2
        and jnp.dtype(w.dtype) in (jnp.bfloat16, jnp.float16)
        and qk.supported(rows, I, O, w.bits, w.group)
    )
    return "oi" if fast else "io"


def matmul(x: jax.Array, w, row_scale: jax.Array | None = None) -> jax.Array:
    """``x [..., I] @ w [I, O]`` for a 2-D QArray (or a :class:`LayerOf` one), dequantizing on the fly;
    returns ``x.dtype``. ``row_scale [...]`` (float32; the GPU kernel's path only,
    :func:`kernel_applies`) multiplies each output row before the rounding to ``x.dtype``.

    Evaluation orders, chosen statically, none with a lasting float copy of ``w``:
    * GPU, few rows (decode): the Pallas kernel of ``jaxkv.kernels.qmatmul`` over the packed bytes.
    * few rows elsewhere: the per-group product with scales applied after it,
      ``y = sum_g scale[g] * (x_g @ q_g - sum(x_g) * zero[g])``, so ``(q - zero) * scale`` is never
      formed; the integer codes enter the dot product exactly (as x.dtype; codes < 256 are exact in
      bf16) with float32 accumulation.
    * many rows (prefill, perplexity): dequantize this one weight to ``x.dtype`` inside the jitted
      computation and use one matmul; the temporary lives for one layer of the scan and is cheaper
      than ``rows * I/group * O`` partial sums. A ``"oi"`` weight is dequantized as stored,
      ``[O, I]``, and enters the matmul transposed (no transpose of its codes).
    """
    q = w.stacked if isinstance(w, LayerOf) else w
    if q.ndim != (3 if isinstance(w, LayerOf) else 2):
        raise ValueError(f"matmul needs a 2-D QArray (slice the stacked axis first), got shape {w.shape}")
    I, O = q.shape[-2:]
    on_kernel = _use_kernel(x, q)
    if row_scale is not None and not on_kernel:
        raise ValueError("row_scale is applied by the GPU kernel's path only (qarray.kernel_applies)")
    if on_kernel:
        rs = None if row_scale is None else row_scale.reshape(-1)
        return _on_kernel(x.reshape(-1, I), w, rs).reshape(*x.shape[:-1], O)
    if isinstance(w, LayerOf):
        w = w.get()
    ng = I // w.group
    rows = int(np.prod(x.shape[:-1]))
    if rows * ng <= I:
        # XLA's CPU dot has no bf16 x bf16 -> f32 kernel: there the product runs in float32.
        dt = jnp.float32 if jax.default_backend() == "cpu" else x.dtype
        codes = codes_of(w).astype(dt).reshape(ng, w.group, O)
        xg = x.astype(dt).reshape(*x.shape[:-1], ng, w.group)
        acc = jnp.einsum("...gi,gio->...go", xg, codes, preferred_element_type=jnp.float32)
        xsum = jnp.sum(xg.astype(jnp.float32), axis=-1)[..., None]
        scale = w.scale.astype(jnp.float32)
        acc = (acc - xsum * zero_of(w, jnp.float32)) * scale
        return jnp.sum(acc, axis=-2).astype(x.dtype)
    if w.layout == "oi":
        return jnp.einsum("...i,oi->...o", x, _dequantize_rows(w, x.dtype))
    return jnp.einsum("...i,io->...o", x, dequantize(w, x.dtype))


def _on_kernel(x2: jax.Array, w, row_scale=None, partials: bool = False) -> jax.Array:
    """``jaxkv.kernels.qmatmul.qmatmul`` of rows ``x2 [M, I]`` by ``w`` (QArray or LayerOf)."""
    from jaxkv.kernels import qmatmul as qk

    if isinstance(w, LayerOf):
        stacked, index = w.stacked, w.index
    else:
        stacked, index = jax.tree.map(lambda a: a[None], w), None
    zero = qk.zero_points(stacked)
    return qk.qmatmul(
        x2, stacked.packed, stacked.scale, zero, index, row_scale,
        bits=stacked.bits, group=stacked.group, layout=stacked.layout, partials=partials,
    )  # fmt: skip


def matmul_partials(x: jax.Array, w) -> jax.Array:
    """The GPU kernel's split-K partial products of ``x [..., I] @ w``, unsummed: ``[splits, Mp, O]``
    float32 over the ``M = prod(x.shape[:-1])`` rows of ``x`` (``Mp >= M``; rows past ``M`` are
    padding). For a launch that adds them together with the next operation
    (``jaxkv.kernels.epilogue``); the kernel's path only (:func:`kernel_applies`)."""
    if not kernel_applies(x, w):
        raise ValueError("matmul_partials runs on the GPU kernel's path only (qarray.kernel_applies)")
    return _on_kernel(x.reshape(-1, x.shape[-1]), w, partials=True)


def partials_apply(x: jax.Array, w) -> bool:
    """Whether the batch-1 epilogues (``jaxkv.kernels.epilogue``) take ``x @ w`` from
    :func:`matmul_partials`: one row of 4-bit weights in the ``"io"`` layout on the GPU kernel's
    path (:func:`kernel_applies`), the one-row kernel's case, where they were timed (H200 run 72,
    H100 runs 73-74)."""
    if not kernel_applies(x, w) or int(np.prod(x.shape[:-1])) != 1:
        return False
    q = w.stacked if isinstance(w, LayerOf) else w
    return q.bits == 4 and q.layout == "io"


def einsum(eqn: str, x: jax.Array, w) -> jax.Array:
    """``jnp.einsum(eqn, x, w)`` where ``w`` may be a QArray or a :class:`LayerOf` view.

    ``"...i,io->...o"`` with a 2-D QArray takes :func:`matmul`; any other equation dequantizes ``w``
    to ``x.dtype`` inside the computation first.
    """
    if isinstance(w, LayerOf) and not (
        isinstance(w.stacked, QArray) and eqn.replace(" ", "") == "...i,io->...o"
    ):
        w = w.get()
    if isinstance(w, LayerOf) or (
        isinstance(w, QArray) and eqn.replace(" ", "") == "...i,io->...o" and w.ndim == 2
    ):
        return matmul(x, w)
    if not isinstance(w, QArray):
        return jnp.einsum(eqn, x, w.astype(x.dtype))
    return jnp.einsum(eqn, x, dequantize(w, x.dtype))


def _leaf_is_q(x) -> bool:
    return isinstance(x, QArray)


def weight_bytes(params) -> int:
    """Real storage bytes of every leaf: packed codes, scales and zeros for QArrays, ``nbytes`` else."""
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=_leaf_is_q):
        if isinstance(leaf, QArray):
            total += leaf.nbytes_storage()
        elif hasattr(leaf, "dtype") and np.dtype(leaf.dtype).itemsize == 1 and "int4" in str(leaf.dtype):
            total += (leaf.size + 1) // 2  # jnp.int4/uint4 report a byte per element; devices store half
        else:
            total += leaf.size * np.dtype(leaf.dtype).itemsize
    return int(total)


def weight_bytes_fp16(params) -> int:
    """The same parameters at 2 bytes per (logical) element."""
    return int(sum(2 * int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params, is_leaf=_leaf_is_q)))


def quantized_bytes(params) -> tuple[int, int]:
    """``(storage bytes, fp16 bytes)`` over the QArray leaves only: the quantized layers' ratio."""
    qs = [leaf for leaf in jax.tree.leaves(params, is_leaf=_leaf_is_q) if isinstance(leaf, QArray)]
    return sum(q.nbytes_storage() for q in qs), sum(2 * q.size for q in qs)
