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
  plane order, put back by :func:`body_partials`). A chunk past ``n_read`` writes
  ``m = -1e30, l = 0, o = 0``.
* Scores: ``s_j = sum_h (q_h scale_h) code_jh - sum_h q_h scale_h zero_h`` per key group (scales
  folded into ``q``); values: ``sum_j p_j scale_jc (code_jh - zero_jc)`` per channel group ``c``
  (scales folded into ``p``). All arithmetic is float32.
* GPU only (Triton lowering); ``interpret=True`` runs the same kernel body on any backend (tests).
  :func:`supported` says which caches it handles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BITS = (2, 4, 8)
_MASKED = -1e30  # the maximum of an empty chunk: exp(_MASKED - m) is 0 against any real score


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


def _planes(packed: jax.Array, bits: int) -> list[jax.Array]:
    """float32 codes of each plane of a packed uint8 tile: plane k holds channels (8/bits) m + k."""
    mask = (1 << bits) - 1
    u = packed.astype(jnp.uint32)
    return [((u >> (k * bits)) & mask).astype(jnp.float32) for k in range(8 // bits)]


def _kernel(
    q_ref, n_ref, kd_ref, ks_ref, kz_ref, vd_ref, vs_ref, vz_ref, m_ref, l_ref, o_ref,
    *, kbits, vbits, group, chunk_groups, G, H,
):  # fmt: skip
    # Shapes stay 2-D ([rows, 1] columns, [1, n] rows) so that broadcasts need no reshapes.
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kp, vp = 8 // kbits, 8 // vbits  # planes per byte
    C, Vb = H // group, group // vp  # value channel groups; bytes of one group of a value row
    first = c * chunk_groups
    steps = jnp.clip(n_ref[b] // group - first, 0, chunk_groups)

    def plane_cols(k):  # the channels of key plane k (strided)
        return pl.ds(k, H // kp, kp)

    # q per query head and key plane, read once: [1, H/kp]
    q = [[q_ref[b, h, pl.ds(gi, 1), plane_cols(k)] for k in range(kp)] for gi in range(G)]

    def body(jj, carry):
        ms, ls, os_ = carry
        j = first + jj
        rows = pl.ds(pl.multiple_of(j * group, group), group)
        kplanes = _planes(kd_ref[b, rows, h, :], kbits)  # kp x [group, H/kp]
        krow = pl.ds(j, 1)
        kscale = [ks_ref[b, krow, h, plane_cols(k)].astype(jnp.float32) for k in range(kp)]  # [1, H/kp]
        kzero = [kz_ref[b, krow, h, plane_cols(k)].astype(jnp.float32) for k in range(kp)]
        vplanes = [_planes(vd_ref[b, rows, h, pl.ds(cc * Vb, Vb)], vbits) for cc in range(C)]
        vscale = [vs_ref[b, rows, h, pl.ds(cc, 1)].astype(jnp.float32) for cc in range(C)]  # [group, 1]
        vzero = [vz_ref[b, rows, h, pl.ds(cc, 1)].astype(jnp.float32) for cc in range(C)]
        new_m, new_l, new_o = [], [], []
        for gi in range(G):
            s = jnp.zeros((group, 1), jnp.float32)
            for k in range(kp):
                qs = q[gi][k] * kscale[k]
                s = s + jnp.sum(kplanes[k] * qs, axis=1, keepdims=True) - jnp.sum(qs * kzero[k])
            m = jnp.maximum(ms[gi], jnp.max(s, axis=0, keepdims=True))  # [1, 1]
            alpha = jnp.exp(ms[gi] - m)
            p = jnp.exp(s - m)  # [group, 1]
            new_m.append(m)
            new_l.append(ls[gi] * alpha + jnp.sum(p, axis=0, keepdims=True))
            outs = []
            for cc in range(C):
                ps = p * vscale[cc]
                bias = jnp.sum(ps * vzero[cc])
                for k in range(vp):
                    prev = os_[gi][cc * vp + k]
                    outs.append(prev * alpha + jnp.sum(ps * vplanes[cc][k], axis=0, keepdims=True) - bias)
            new_o.append(tuple(outs))
        return tuple(new_m), tuple(new_l), tuple(new_o)

    init = (
        tuple(jnp.full((1, 1), _MASKED, jnp.float32) for _ in range(G)),
        tuple(jnp.zeros((1, 1), jnp.float32) for _ in range(G)),
        tuple(tuple(jnp.zeros((1, Vb), jnp.float32) for _ in range(C * vp)) for _ in range(G)),
    )
    ms, ls, os_ = jax.lax.fori_loop(0, steps, body, init)
    for gi in range(G):
        m_ref[pl.ds(gi, 1), :] = ms[gi]
        l_ref[pl.ds(gi, 1), :] = ls[gi]
        for idx, o in enumerate(os_[gi]):
            o_ref[pl.ds(gi, 1), pl.ds(idx * Vb, Vb)] = o


@functools.partial(jax.jit, static_argnames=("kbits", "vbits", "group", "chunk_groups", "interpret"))
def body_partials(
    q, n_read, kdata, kscale, kzero, vdata, vscale, vzero, *, kbits, vbits, group, chunk_groups=4,
    interpret=False,
):  # fmt: skip
    """Flash-decoding partials of one query per sequence over the quantized body slots ``j < n_read``.

    ``q [B, K, G, H]`` (already multiplied by the softmax scale), ``n_read [B]`` int32 (multiples
    of ``group``), the key and value sides as in the module docstring. Returns ``m [B, K, NC, G]``,
    ``l [B, K, NC, G]`` and ``o [B, K, NC, G, H]`` (float32), ``NC`` the number of chunks.
    """
    B, K, G, H = q.shape
    S = kdata.shape[1]
    NC = -(-(S // group) // chunk_groups)
    kernel = functools.partial(
        _kernel, kbits=kbits, vbits=vbits, group=group, chunk_groups=chunk_groups, G=G, H=H
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
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"kv_decode_k{kbits}v{vbits}",
    )(q.astype(jnp.float32), n_read.astype(jnp.int32), kdata, kscale, kzero, vdata, vscale, vzero)
    # o's channels come in plane order [C, planes, bytes]; channel c*g + planes*m + k is [c, k, m].
    vp = 8 // vbits
    o = o.reshape(B, K, NC, G, H // group, vp, group // vp).swapaxes(-1, -2).reshape(B, K, NC, G, H)
    return m[..., 0], l[..., 0], o
