"""Weight-only quantized matmul for decode: a Pallas (Triton) GPU kernel over packed QArray storage.

Conventions
-----------
* ``y [M, O] = x [M, I] @ w`` for a 4- or 8-bit :class:`~jaxkv.quant.qarray.QArray` ``w`` stored as
  in ``jaxkv.quant.qarray``: codes bit-packed along I (two 4-bit codes per byte, low nibble = even
  row), one scale and one uint8 zero point per (group of ``group`` input rows, output column).
* The weight may carry a leading stacked-layer axis ``[L, ...]`` with ``layer`` the (traced) index
  of the layer to use: the kernel reads that layer's bytes in place. Slicing the stacked weight
  first (what ``lax.scan`` over layers does) would make XLA copy the slice before the custom call,
  tripling the bytes a memory-bound decode step moves.
* Order of evaluation, per group ``g`` of input rows and block of output columns::

      acc += (x_g @ codes_g - sum(x_g) * zero_g) * scale_g

  The codes enter the tensor-core product exactly (integers < 256 are exact in bf16/f16) with
  float32 accumulation; the dequantization ``(q - zero) * scale`` is never formed per weight, so the
  kernel does a shift, a mask and a convert per weight and a few operations per group.
* Rows are padded to 16 (the smallest tensor-core tile); the input is split into even and odd rows
  for 4-bit codes so each nibble plane multiplies its own rows. ``split_k`` programs share the input
  dimension of one column block and write float32 partial sums that XLA adds (a small [split_k, 16,
  O] array next to the weight's I*O/2 bytes).
* GPU only (Triton lowering); :func:`supported` says when the kernel applies, and
  ``jaxkv.quant.qarray.einsum`` keeps the portable XLA path everywhere else (CPU, TPU, many rows).
  ``interpret=True`` runs the same kernel body on any backend (tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_ROWS = 64  # decode batches; prefill and perplexity keep XLA's dequantize-then-matmul


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile choice: ``block_n`` output columns per program, ``split_k`` programs along I."""

    block_n: int = 128
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 4


def default_config(I: int, O: int, group: int) -> KernelConfig:
    """A tile for ``[I, O]``: enough programs to cover an H100's 132 SMs about twice."""
    block_n = 128 if O % 128 == 0 else 64
    groups = I // group
    split_k = 1
    while O // block_n * split_k < 256 and groups % (split_k * 2) == 0 and split_k < 16:
        split_k *= 2
    return KernelConfig(block_n=block_n, split_k=split_k)


def supported(x_rows: int, I: int, O: int, bits: int, group: int) -> bool:
    """True when the kernel handles this product (else the XLA path runs)."""
    return (
        bits in (4, 8)
        and x_rows <= MAX_ROWS
        and group in (32, 64, 128, 256)
        and I % group == 0
        and O % 64 == 0
    )


def _row_pad(m: int) -> int:
    return max(16, 1 << (m - 1).bit_length())


def _kernel(
    layer_ref, xe_ref, xo_ref, xs_ref, p_ref, s_ref, z_ref, o_ref, *, bits, group, groups_per_prog, block_n
):
    n, k = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    cols = pl.ds(n * block_n, block_n)
    rows_per_group = group // 2 if bits == 4 else group
    cdt = xe_ref.dtype

    def body(j, acc):
        g = k * groups_per_prog + j
        rows = pl.ds(g * rows_per_group, rows_per_group)
        p = p_ref[layer, rows, cols]  # uint8 [rows_per_group, block_n]
        xe = xe_ref[:, rows]
        if bits == 4:
            lo = (p & 0xF).astype(jnp.float32).astype(cdt)
            hi = (p >> 4).astype(jnp.float32).astype(cdt)
            a = pltriton.dot(xe, lo) + pltriton.dot(xo_ref[:, rows], hi)
        else:
            a = pltriton.dot(xe, p.astype(jnp.float32).astype(cdt))
        scale = s_ref[layer, pl.ds(g, 1), cols].astype(jnp.float32)  # [1, block_n]
        zero = z_ref[layer, pl.ds(g, 1), cols].astype(jnp.float32)
        xsum = xs_ref[:, pl.ds(g, 1)]  # [Mp, 1] float32
        return acc + (a - xsum * zero) * scale

    acc = jnp.zeros((xe_ref.shape[0], block_n), jnp.float32)
    acc = jax.lax.fori_loop(0, groups_per_prog, body, acc)
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("bits", "group", "config", "interpret"))
def qmatmul(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    layer: jax.Array,
    *,
    bits: int,
    group: int,
    config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x [M, I] @ dequantize(w[layer])`` -> ``[M, O]`` in ``x.dtype`` (float32 accumulation).

    ``packed [L, I*bits/8, O]`` uint8, ``scale``/``zero`` ``[L, I/group, O]`` (zero uint8; symmetric
    weights pass their implicit zero point as an array), ``layer`` an int32 scalar.
    """
    M, I = x.shape
    L, _, O = packed.shape
    cfg = config or default_config(I, O, group)
    groups = I // group
    if groups % cfg.split_k or O % cfg.block_n:
        raise ValueError(f"tile {cfg} does not divide the weight [{I}, {O}] with group {group}")
    Mp = _row_pad(M)
    xp = jnp.zeros((Mp, I), x.dtype).at[:M].set(x)
    xs = jnp.sum(xp.astype(jnp.float32).reshape(Mp, groups, group), axis=-1)  # [Mp, groups]
    if bits == 4:
        xe, xo = xp[:, 0::2], xp[:, 1::2]
    else:
        xe, xo = xp, xp[:, :16]  # xo unused for 8 bits
    kernel = functools.partial(
        _kernel, bits=bits, group=group, groups_per_prog=groups // cfg.split_k, block_n=cfg.block_n
    )
    full = pl.BlockSpec(memory_space=None)
    out = pl.pallas_call(
        kernel,
        grid=(O // cfg.block_n, cfg.split_k),
        in_specs=[full] * 7,
        out_specs=pl.BlockSpec((None, Mp, cfg.block_n), lambda n, k: (k, 0, n)),
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, Mp, O), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"qmatmul_int{bits}",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), xe, xo, xs, packed, scale, zero)
    return jnp.sum(out, axis=0)[:M].astype(x.dtype)


def zero_points(w) -> jax.Array:
    """The uint8 zero points of a QArray, the implicit ``2**(bits-1)`` when symmetric."""
    if w.zero is not None:
        return w.zero
    return jnp.full(w.scale.shape, 2 ** (w.bits - 1), jnp.uint8)


def reference(
    x: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int
) -> np.ndarray:
    """float64 numpy ``x @ ((codes - zero) * scale)`` for one ``[I, O]`` layer (tests)."""
    I, O = codes.shape
    w = (
        codes.astype(np.float64).reshape(I // group, group, O) - zero.astype(np.float64)[:, None]
    ) * scale.astype(np.float64)[:, None]
    return x.astype(np.float64) @ w.reshape(I, O)
