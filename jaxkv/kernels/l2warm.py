"""Warming the GPU's L2 with the next launch's weights from inside a launch that leaves memory idle.

Why: a batch-1 decode step alternates matmuls that stream weights from HBM with launches that barely
touch it (attention over a short cache, norms, the split-K sums). A launch of ours that runs anyway
can give extra programs the job of reading the next matmul's weights, so that the matmul finds them
in the L2 (50 MB on an H100) instead of HBM. The first user is the decode attention kernel
(``jaxkv.kernels.fpdecode``), which warms the output projection that reads its result.

Conventions
-----------
* :func:`flat_bytes` views each array as rows of ``ROW`` bytes, uint32 ``[R, ROW/4]`` (a bitcast and a
  reshape: no copy; words, so that using what was read costs one bitwise or per 4 bytes).
  Arrays whose size is not a multiple of ``ROW * TILE_ROWS`` bytes are left out (warming is only a
  speed-up).
* :func:`weight_views` gives a weight's views (a QArray's codes, scales and zero points, or an
  array) when the whole weight fits :data:`MAX_BYTES`, and none otherwise: the matmuls that read
  them run as one wave of programs, so a partly warm weight would leave the cold programs as slow
  as before.
* :func:`warm` runs inside a kernel: program ``index`` of ``count`` reads its contiguous share of
  every view in tiles of ``TILE_ROWS x ROW`` bytes, ``UNROLL`` loads issued before any is used, with
  the L2 eviction hint ``evict_last``. It returns one int32 that the caller stores (in a scratch
  output it then discards) so that the loads are not removed as dead code.
* GPU only in effect: the interpreter (tests off the GPU) performs the same reads without the hint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

ROW = 512  # bytes per row of a view: 4 warps x 32 threads x 4 bytes
TILE_ROWS = 8  # rows per load (4 KB)
UNROLL = 4  # loads issued per loop step before any is used (16 KB in flight per program)
MAX_BYTES = 40 << 20  # the largest weight warmed (an H100's L2 holds 50 MB)


def flat_bytes(arrays) -> tuple[jax.Array, ...]:
    """``arrays``' bytes as uint32 ``[R, ROW/4]`` views (module docstring); None entries are skipped."""
    views = []
    for a in arrays:
        if a is None or (a.size * a.dtype.itemsize) % (ROW * TILE_ROWS):
            continue
        if a.dtype.itemsize != 4:  # bytes first, then four at a time into words
            a = jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(-1, 4)
        views.append(jax.lax.bitcast_convert_type(a, jnp.uint32).reshape(-1, ROW // 4))
    return tuple(views)


def weight_views(w) -> tuple[jax.Array, ...]:
    """The :func:`flat_bytes` views of weight ``w`` (a QArray, an array, or anything else: none)
    when all of it fits :data:`MAX_BYTES` (module docstring)."""
    from jaxkv.quant.qarray import QArray

    if isinstance(w, QArray):
        arrays = (w.packed, w.scale, w.zero)
    elif isinstance(w, jax.Array):
        arrays = (w,)
    else:  # None, or a stacked weight's layer view (jaxkv.quant.qarray.LayerOf)
        return ()
    if sum(a.size * a.dtype.itemsize for a in arrays if a is not None) > MAX_BYTES:
        return ()
    return flat_bytes(arrays)


def warm(refs, index, count: int, interpret: bool = False) -> jax.Array:
    """Read program ``index``'s share (of ``count`` programs) of every :func:`flat_bytes` view; returns the bitwise or of what it read, a uint32 scalar for the caller
    to store (module docstring)."""
    acc = jnp.zeros((TILE_ROWS, ROW // 4), jnp.uint32)
    for ref in refs:
        tiles = ref.shape[0] // TILE_ROWS
        per = -(-tiles // count)  # contiguous tiles per program
        first = index * per
        mine = jnp.clip(tiles - first, 0, per)

        def body(j, acc, ref=ref, first=first, mine=mine, tiles=tiles):
            loads = []
            for u in range(UNROLL):
                # past this program's share: re-read its last tile (a cache hit), so no masks
                t = jnp.minimum(first + jnp.minimum(j * UNROLL + u, mine - 1), tiles - 1)
                rows = pl.ds(pl.multiple_of(t * TILE_ROWS, TILE_ROWS), TILE_ROWS)
                hint = None if interpret else "evict_last"
                loads.append(pltriton.load(ref.at[rows, :], eviction_policy=hint))
            for v in loads:
                acc = acc | v
            return acc

        acc = jax.lax.fori_loop(0, (mine + UNROLL - 1) // UNROLL, body, acc)
    return jnp.max(acc)
