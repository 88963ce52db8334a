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
* Grid ``(B, K, chunks)``: each program walks ``chunk_groups`` key groups of one sequence and KV head
  with an online softmax and writes, per query head ``G`` of that KV head, the running maximum
  ``m``, the sum ``l = sum exp(s - m)`` and ``o = sum exp(s - m) v`` (float32, ``o``'s channels in
  plane order ``[plane, byte]``, put back by :func:`body_partials`). A chunk past ``n_read`` writes
  ``m = -1e30, l = 0, o = 0``.
* Scores: ``s_j = sum_h (q_h scale_h) code_jh - sum_h q_h scale_h zero_h`` per key group (scales
  folded into ``q``), one reduction over the channels per key group. Values: every plane of a value
  row is one ``[g, H*vb/8]`` tile (byte ``m`` of every plane is in channel group ``m // (g/planes)``,
  the same for all planes), so each slot's scale and zero point are spread over the tile's columns
  once per key group and the weighted codes accumulate elementwise, ``acc = acc * alpha +
  p_j scale_j (code - zero_j)``, as do the exponential sums; the reductions over the slots happen
  once per chunk, not per key group. (The first version sliced each value channel group into its own
  ``[g, 8]`` tile and reduced per key group: 16 narrow reductions per group, slower than XLA on an H200,
  results/bench/h200_run9_b8_p4096_kv_kernel.md. This version is still slower than XLA there: 13.5 vs
  11.6 ms per step, results/bench/h200_run13_b8_p4096.md.) All arithmetic is float32.
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
CHUNK_SLOTS = 128  # body slots per program (rounded to whole key groups)
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
        # values are weighted (no rescaling of running sums). Codes arrive as c' = 0.5 + c/256
        # (code_planes_f32), so q.(c - z) = 256 q.c' - q.(128 + z).
        scores = [[] for _ in range(G)]  # [gi][t] -> [group, 1]
        valid = []
        for t, (kd, ks, kz, *_) in enumerate(tiles):
            kplanes = code_planes_f32(kd, kbits, interpret)  # kp x [group, H/kp]
            slot = (first + t) * group + jnp.arange(group, dtype=jnp.int32)[:, None]
            valid.append(slot < n)
            for gi in range(G):
                qs = [q[gi][k] * ks[k].astype(jnp.float32) for k in range(kp)]
                prod = kplanes[0] * qs[0]
                for k in range(1, kp):
                    prod = prod + kplanes[k] * qs[k]
                bias = sum(jnp.sum(qs[k] * (kz[k].astype(jnp.float32) + 128.0)) for k in range(kp))
                s = 256.0 * jnp.sum(prod, axis=1, keepdims=True) - bias
                scores[gi].append(jnp.where(valid[t], s, _MASKED))
        ms, ps = [], []
        for gi in range(G):
            m = jnp.max(scores[gi][0], axis=0, keepdims=True)
            for s in scores[gi][1:]:
                m = jnp.maximum(m, jnp.max(s, axis=0, keepdims=True))
            ms.append(m)  # [1, 1]
            ps.append([jnp.where(v, jnp.exp(s - m), 0.0) for s, v in zip(scores[gi], valid)])
        # Values: sum_j p_j s_j (c_j - z_j) = 256 sum_j (p_j s_j) c'_j - sum_j p_j s_j (128 + z_j).
        # Each slot's scales are spread over the byte columns of their channel groups (one FMA per
        # group and byte); the first sum accumulates elementwise over the chunk, the second per
        # channel group as a column, both reduced over the slots once at the end.
        accs = [[jnp.zeros((group, W), jnp.float32) for _ in range(vp)] for _ in range(G)]
        zsum = [[jnp.zeros((group, 1), jnp.float32) for _ in range(C)] for _ in range(G)]
        for t, (_, _, _, vd, vs, vz) in enumerate(tiles):
            vsf = [x.astype(jnp.float32) for x in vs]
            vzs = [sf * (z.astype(jnp.float32) + 128.0) for sf, z in zip(vsf, vz)]  # s (128 + z)
            spread = onehot[0] * vsf[0]
            for cc in range(1, C):
                spread = spread + onehot[cc] * vsf[cc]  # [group, W]
            vplanes = code_planes_f32(vd, vbits, interpret)
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
