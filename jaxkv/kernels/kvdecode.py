"""Split-K (flash-decoding) attention of one decode query over the packed, quantized KV-cache body: a
Pallas (Triton) GPU kernel that reads the codes, scales and zero points in place.

Conventions
-----------
* The cache layout of ``jaxkv.kvcache``, one layer: keys quantized per channel with groups of
  ``g`` consecutive slots (KIVI), ``data [B, S, K, H*kb/8]``, ``scale``/``zero [B, S/g, K, H]``;
  values per token with groups of ``g`` channels, ``data [B, S, K, H*vb/8]``, ``scale``/``zero
  [B, S, K, H/g]``; ``x = (code - zero) * scale``; codes a little-endian bitstream along H, so with
  ``b`` bits byte ``m`` holds channels ``(8/b) m + k`` for ``k < 8/b`` ("planes" below).
* The kernel covers the body slots a query reads quantized on both sides, ``j < n_read[b]`` (a
  multiple of ``g``: per-channel key groups are quantized whole). Everything else a decode query
  sees (pivot segment, full-precision key and value windows) stays in XLA
  (``jaxkv.kvattention.attend_cached``), which merges its scores with the kernel's partial results
  through their maxima: one softmax over all of it, exactly.
* Grid ``(B, K, chunks)``: each program reads ``chunk_groups`` key groups of one sequence and KV
  head (:data:`CHUNK_SLOTS` slots), every load issued before any arithmetic, and writes per query
  head ``G`` of that KV head the chunk's maximum score ``m``, ``l = sum exp(s - m)`` and ``o = sum
  exp(s - m) v`` (float32, ``o``'s channels in plane order ``[plane, byte]``, put back by
  :func:`body_partials`). All scores of the chunk come first, so the values are weighted with the
  chunk's own maximum (no rescaled running sums). A chunk past ``n_read`` writes ``m = -1e30, l =
  0, o = 0``; the last chunk re-reads the last key group in place of groups past the cache's end.
* Codes are decoded as ``c/256`` by a byte permute and a subtraction each
  (``qmatmul.code_planes_f32``, exact). Scores: ``s_j = 256 sum_h (q_h scale_h) (c_jh/256) - sum_h
  q_h scale_h zero_h`` per key group (scales folded into ``q``), one reduction over the channels
  per group. Values: ``sum_j p_j scale_j (c_j - zero_j) = 256 sum_j (p_j scale_j) (c_j/256) -
  sum_j p_j scale_j zero_j``; every plane of a value row is one ``[g, H*vb/8]`` tile (byte ``m`` of
  every plane is in channel group ``m // (g/planes)``), each slot's scales are spread over its
  columns by one-hot FMAs, the weighted codes accumulate elementwise over the chunk and the
  zero-point terms per channel group; the reductions over the slots happen once per chunk. All
  arithmetic is float32.
* Measured on an H200 (``scripts/kv_decode_sweep.py``, one Llama-2-7B layer, batch 8, 4352 slots,
  K4V2 at group 32): 215 us per layer at 256 slots and 4 warps (without the subtraction of 0.5) against 214 us for XLA over a bf16
  cache of the same shape (2.3x the bytes) and 465 us for XLA's folded products over the same
  packed cache, i.e. 0.58 TB/s of cache read, 16% of the copy bandwidth
  (results/bench/h200_run17_kv_decode_sweep.md). The first version of this chunked, loop-free
  form decoded codes by shift, mask and convert and spread scales by selects: 231-239 us (run 16);
  earlier ones walked the key groups in a loop with an online softmax (13.5 against XLA's 11.6 ms
  per model step, run 13). Neither the decoding nor the loads in flight moved it much: what
  bounds it is not known (no instruction-level profile yet), so it stays opt-in
  (``JAXKV_KV_DECODE=kernel``).
* GPU only (Triton lowering); ``interpret=True`` runs the same kernel body on any backend (tests).
  :func:`supported` says which caches it handles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxkv.kernels.qmatmul import code_planes_f32

BITS = (2, 4, 8)
_MASKED = -1e30  # the maximum of an empty chunk: exp(_MASKED - m) is 0 against any real score
CHUNK_SLOTS = 256  # body slots per program (rounded to whole key groups); swept on an H200
NUM_WARPS = 4


def supported(kbits: int, vbits: int, k_per_channel: bool, group: int, head_dim: int, q_per_kv: int) -> bool:
    """True when :func:`body_partials` handles this cache (tile sizes must be powers of two)."""

    def pow2(n):
        return n > 0 and n & (n - 1) == 0

    return (
        k_per_channel
        and kbits in BITS
        and vbits in BITS
        and pow2(group)
        and pow2(head_dim)
        and group % (8 // vbits) == 0
        and head_dim % group == 0
        and q_per_kv <= 8
    )


def _codes_over_256(packed: jax.Array, bits: int, interpret: bool) -> list[jax.Array]:
    """The planes of packed codes as float32 ``c/256``: ``code_planes_f32``'s ``0.5 + c/256`` less
    0.5, exact (both in [0.5, 1)). Subtracting it here, not through the zero point, keeps the sums
    free of the cancellation of ``256 sum(x c') - 128 sum(x)`` (20x the error in tests)."""
    return [c - 0.5 for c in code_planes_f32(packed, bits, interpret)]


def _kernel(
    q_ref, n_ref, kd_ref, ks_ref, kz_ref, vd_ref, vs_ref, vz_ref, m_ref, l_ref, o_ref,
    *, kbits, vbits, group, chunk_groups, G, H, J, interpret,
):  # fmt: skip
    # Shapes stay 2-D ([rows, 1] columns, [1, n] rows) so that broadcasts need no reshapes.
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kp, vp = 8 // kbits, 8 // vbits  # planes per byte
    C, W = H // group, H // vp  # value channel groups; bytes of a value row
    n = n_ref[b]
    first = c * chunk_groups
    # one-hot rows of the value channel groups over the byte columns of a value plane (byte m holds
    # channels vp*m + k: its group is m // (group/vp), a shift of a 1-D range widened)
    column_group = jnp.arange(W, dtype=jnp.int32)[None, :] >> ((group // vp).bit_length() - 1)
    onehot = [(column_group == cc).astype(jnp.float32) for cc in range(C)]  # C x [1, W]

    def plane_cols(k):  # the channels of key plane k (strided)
        return pl.ds(k, H // kp, kp)

    @pl.when(first * group < n)
    def _():
        # Every load of the chunk is issued before any arithmetic, so that all of them are in
        # flight at once. The last chunk re-reads the cache's last group in place of groups past
        # its end (masked).
        tiles = []
        for t in range(chunk_groups):
            j = jnp.minimum(first + t, J - 1)
            rows, krow = pl.ds(pl.multiple_of(j * group, group), group), pl.ds(j, 1)
            tiles.append(
                (
                    kd_ref[b, rows, h, :],
                    [ks_ref[b, krow, h, plane_cols(k)] for k in range(kp)],  # [1, H/kp]
                    [kz_ref[b, krow, h, plane_cols(k)] for k in range(kp)],
                    vd_ref[b, rows, h, :],
                    [vs_ref[b, rows, h, pl.ds(cc, 1)] for cc in range(C)],  # [group, 1]
                    [vz_ref[b, rows, h, pl.ds(cc, 1)] for cc in range(C)],
                )
            )
        q = [[q_ref[b, h, pl.ds(gi, 1), plane_cols(k)] for k in range(kp)] for gi in range(G)]
        # Scores of every slot of the chunk first, so that the chunk's maximum is known before the
        # values are weighted (no rescaling of running sums). Codes arrive as c/256, so
        # q.(c - z) = 256 q.(c/256) - q.z.
        scores = [[] for _ in range(G)]  # [gi][t] -> [group, 1]
        valid = []
        for t, (kd, ks, kz, *_) in enumerate(tiles):
            kplanes = _codes_over_256(kd, kbits, interpret)  # kp x [group, H/kp]
            slot = (first + t) * group + jnp.arange(group, dtype=jnp.int32)[:, None]
            valid.append(slot < n)
            for gi in range(G):
                qs = [q[gi][k] * ks[k].astype(jnp.float32) for k in range(kp)]
                prod = kplanes[0] * qs[0]
                for k in range(1, kp):
                    prod = prod + kplanes[k] * qs[k]
                bias = sum(jnp.sum(qs[k] * kz[k].astype(jnp.float32)) for k in range(kp))
                s = 256.0 * jnp.sum(prod, axis=1, keepdims=True) - bias
                scores[gi].append(jnp.where(valid[t], s, _MASKED))
        ms, ps = [], []
        for gi in range(G):
            m = jnp.max(scores[gi][0], axis=0, keepdims=True)
            for s in scores[gi][1:]:
                m = jnp.maximum(m, jnp.max(s, axis=0, keepdims=True))
            ms.append(m)  # [1, 1]
            ps.append([jnp.where(v, jnp.exp(s - m), 0.0) for s, v in zip(scores[gi], valid)])
        # Values: sum_j p_j s_j (c_j - z_j) = 256 sum_j (p_j s_j) (c_j/256) - sum_j p_j s_j z_j.
        # Each slot's scales are spread over the byte columns of their channel groups (one FMA per
        # group and byte); the first sum accumulates elementwise over the chunk, the second per
        # channel group as a column, both reduced over the slots once at the end.
        accs = [[jnp.zeros((group, W), jnp.float32) for _ in range(vp)] for _ in range(G)]
        zsum = [[jnp.zeros((group, 1), jnp.float32) for _ in range(C)] for _ in range(G)]
        for t, (_, _, _, vd, vs, vz) in enumerate(tiles):
            vsf = [x.astype(jnp.float32) for x in vs]
            vzs = [sf * z.astype(jnp.float32) for sf, z in zip(vsf, vz)]  # scale * zero
            spread = onehot[0] * vsf[0]
            for cc in range(1, C):
                spread = spread + onehot[cc] * vsf[cc]  # [group, W]
            vplanes = _codes_over_256(vd, vbits, interpret)
            for gi in range(G):
                p = ps[gi][t]
                weight = p * spread
                accs[gi] = [a + weight * v for a, v in zip(accs[gi], vplanes)]
                zsum[gi] = [z + p * zs for z, zs in zip(zsum[gi], vzs)]
        for gi in range(G):
            m_ref[pl.ds(gi, 1), :] = ms[gi]
            l_ref[pl.ds(gi, 1), :] = sum(jnp.sum(p, axis=0, keepdims=True) for p in ps[gi])
            zrow = sum(onehot[cc] * jnp.sum(z, axis=0, keepdims=True) for cc, z in enumerate(zsum[gi]))
            for k, acc in enumerate(accs[gi]):
                o_ref[pl.ds(gi, 1), pl.ds(k * W, W)] = 256.0 * jnp.sum(acc, axis=0, keepdims=True) - zrow

    @pl.when(first * group >= n)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)


@functools.partial(
    jax.jit, static_argnames=("kbits", "vbits", "group", "chunk_groups", "num_warps", "interpret")
)
def body_partials(
    q, n_read, kdata, kscale, kzero, vdata, vscale, vzero, *, kbits, vbits, group, chunk_groups=None,
    num_warps=None, interpret=False,
):  # fmt: skip
    """Flash-decoding partials of one query per sequence over the quantized body slots ``j < n_read``.

    ``q [B, K, G, H]`` (already multiplied by the softmax scale), ``n_read [B]`` int32 (multiples
    of ``group``), the key and value sides as in the module docstring. Returns ``m [B, K, NC, G]``,
    ``l [B, K, NC, G]`` and ``o [B, K, NC, G, H]`` (float32), ``NC`` the number of chunks.
    """
    B, K, G, H = q.shape
    S = kdata.shape[1]
    J = S // group
    chunk_groups = chunk_groups or max(1, CHUNK_SLOTS // group)
    num_warps = num_warps or NUM_WARPS
    NC = -(-J // chunk_groups)
    kernel = functools.partial(
        _kernel,
        kbits=kbits,
        vbits=vbits,
        group=group,
        chunk_groups=chunk_groups,
        G=G,
        H=H,
        J=J,
        interpret=interpret,
    )
    full = pl.BlockSpec(memory_space=None)
    m, l, o = pl.pallas_call(
        kernel,
        grid=(B, K, NC),
        in_specs=[full] * 8,
        out_specs=[
            pl.BlockSpec((None, None, None, G, 1), lambda b, h, c: (b, h, c, 0, 0)),
            pl.BlockSpec((None, None, None, G, 1), lambda b, h, c: (b, h, c, 0, 0)),
            pl.BlockSpec((None, None, None, G, H), lambda b, h, c: (b, h, c, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, NC, G, 1), jnp.float32),
            jax.ShapeDtypeStruct((B, K, NC, G, 1), jnp.float32),
            jax.ShapeDtypeStruct((B, K, NC, G, H), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"kv_decode_k{kbits}v{vbits}",
    )(q.astype(jnp.float32), n_read.astype(jnp.int32), kdata, kscale, kzero, vdata, vscale, vzero)
    # o's channels come in plane order [planes, bytes]; channel planes*m + k is [k, m].
    vp = 8 // vbits
    o = o.reshape(B, K, NC, G, vp, H // vp).swapaxes(-1, -2).reshape(B, K, NC, G, H)
    return m[..., 0], l[..., 0], o
