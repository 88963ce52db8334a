"""One decode token per sequence through a quantized KV cache in two Pallas (Triton) GPU kernels:
:func:`body_partials` is the split-K (flash-decoding) attention over the quantized body on the
tensor cores, reading the codes, scales and zero points in place, and :func:`merge` attends to the
full-precision window and the pivot segment, combines everything in one softmax, and writes the new
token, quantized into the packed body and as it is into the window rings.
``jaxkv.kvattention._decode_with_kernels`` runs the two on the token's heads (:func:`step_heads`);
one layer of XLA launches before them was a dozen (K4V2 decode 7.733 -> 6.832 ms per Llama-2-7B
token at batch 8 and 4096 context, H100, run 37, in three kernels then).

Conventions
-----------
* The head-major cache layout of ``jaxkv.kvcache``, one layer: keys quantized per channel with groups
  of ``g`` consecutive slots (KIVI), ``data [B, K, S, H*kb/8]``, ``scale``/``zero [B, K, S/g, H]``;
  values per token with groups of ``g`` channels, ``data [B, K, S, H*vb/8]``, ``scale``/``zero [B, K,
  S, H/g]``: a program's tiles of codes and scales are contiguous runs of memory;
  ``x = (code - zero) * scale``; codes a little-endian bitstream along H, so with ``b`` bits byte ``m``
  holds channels ``(8/b) m + k`` for ``k < 8/b`` ("plane" ``k``).
* :func:`body_partials` covers the body slots a query reads quantized on both sides, ``j < n_read[b]``
  (a multiple of ``g``: per-channel key groups are quantized whole). :func:`merge`, a program per
  sequence and KV head, covers the full-precision key window (its values quantized from the body or
  full precision from the value ring, as the read rule says) and the pivot segment, and takes the
  partial results through their maxima: one softmax over all of it, exactly. The window in a kernel
  took its scores, masks, body-row gathers and value products out of XLA's small launches: K4V2
  decode 8.130 -> 7.796 ms per Llama-2-7B token at batch 8 and 4096 context (H100, runs 32 and 34).
* Grid ``(B, K, chunks)``; a program covers ``ceil(S / (chunks * sub)) * sub`` slots in a loop of
  tiles of ``sub`` slots (at most ``NT = ROWS / G`` key groups) with a running maximum (online
  softmax: the running sums rescaled when it grows), and writes per query head the chunk's maximum
  score ``m``, ``l = sum exp(s - m)`` and ``o = sum exp(s - m) v`` (float32). The loop is what lets
  Triton pipeline the loads (``num_stages``: the next tiles' codes stream into shared memory while
  this one is computed). :func:`chunks` splits the slots only until the GPU's cores have
  :data:`PROGRAMS_PER_CORE` programs each.
* Every product over channels or slots is one tensor-core matrix product of ``ROWS = 16`` rows (the
  smallest such product), with the codes entering exactly as bf16 ``128 + c`` (``c`` for 8-bit
  codes): one byte permute makes two of them (:func:`code_plane`).

  - Keys: ``A[(t, gi, u), h] = q[gi, h] scale[t, h]`` (``u = 0``; rows ``u > 0`` are zero and pad
    the tile to ``ROWS``) for the tile's ``NT`` key groups ``t``, so that one product ``S = A @
    codes^T`` ``[ROWS, sub]`` carries every group's own per-channel scales; slot ``j`` takes the row
    of its group, ``s_j = S[(t(j), gi, 0), j] - sum_h A[(t(j), gi, 0), h] (128 + zero[t(j), h])``.
  - Values: ``W[j, (C, gi)] = p[gi, j] scale[j, C]`` (zero rows up to ``ROWS``), ``D = W^T @ codes``
    per plane ``[ROWS, H*vb/8]``; byte column ``m`` of plane ``k`` is channel ``c = (8/vb) m + k`` of
    group ``C = c // g``: ``o[gi, c] = D[(C, gi), m] - sum_j W[j, (C, gi)] (128 + zero[j, C])``.

  That is the precision of the XLA path (``jaxkv.kvattention.body_scores``/``body_values``, which cast
  ``q * scale`` and ``p * scale`` to the query's dtype): products of bf16 operands accumulated in
  float32; scales, zero points and the softmax in float32.
* Why tensor cores for a memory-bound product: the float32 multiply-add version of this kernel (until
  2026-12-05) was bound by instruction issue, not memory (H100, Nsight Compute, run 18: 119M warp
  instructions per Llama-2-7B layer at batch 8 and 4352 slots, 2 per cycle per SM, 230 us, 0.56 TB/s of
  DRAM; 50M float32 multiplies and adds that the Triton pipeline under Pallas does not fuse, 15M
  shuffles of per-group reductions). Here the multiply-adds are in the matrix units and each code
  costs about one instruction to decode: 41M warp instructions (run 20), and 125.7 us per layer at
  256 slots per program, tiles of 128 and 2 warps, against 224.6 for the previous kernel, 253.6 for
  XLA over a bf16 cache of the same shape (4.5x the bytes) and 452.1 for XLA over the packed one
  (``scripts/kv_decode_sweep.py``, results/bench/h100_run19_kv_decode_sweep_previous_kernel.md and
  h100_run21_kv_decode_sweep_chunks.md):
  0.99 TB/s of cache read, 35% of the copy bandwidth. What bounds it now is latency: at 512 slots per
  program 168 registers let 3 programs (12 warps) share an SM and 65% of the issue cycles found no
  warp ready (run 20); fewer slots per program was the fastest change the sweep found. Codes by
  plain shift/mask/bit-or instead of byte permutes were slower (159.6 against 125.6 us, run 24).
  The head-major cache (contiguous tiles; before, each slot's 64 bytes of key codes lay a row of
  all heads apart and its value scales were 4-byte reads) took a layer from 121.2 to 90.5 us at 2
  warps, and one warp per program to 85.9 (1.45 TB/s; H100, results/bench/h100_run29_kv_layout.txt;
  1 and 2 warps trade places within 3% between calls, runs 30-31). Issuing the value loads beside
  the key loads, or every load of the program first, was no faster at any tile and much slower at
  most (best 97.4 us against 90.4; run 31, results/bench/h100_run31_kv_prefetch_rejected.txt):
  registers, not latency.
* The loop (runs 55-57, H100): the program per 256 slots before it unrolled its two tiles, computed
  all scores first and loaded the scales of 16 key groups whatever the tile needed. As a loop with 2
  warps and 2 chunks at batch 8 (merge combines 2 partials per head instead of 17), K4V2 decode took
  5.781 against 6.057 ms per Llama-2-7B token at batch 8 and 4096 context (run 57, one call), though
  the layer's kernel alone was not faster (87.8 us, run 55, against 83.7 for the unrolled one, run
  56). Triton's pipeline stages (2-4) changed nothing (results/bench/h100_run5{5,6,7}_loopkernel_*):
  compiled off the GPU (``scripts/kernel_sass.py kv``), the loop copied the codes and the value scales
  a tile ahead, but loaded the strided key scales and zero points and the value zero points (which
  fed no tensor-core product) synchronously in every iteration.
* Every load of the loop asynchronous (runs 58-60, H100): the key scales and zero points load as
  one contiguous ``[NT, H]`` tile each and split into code planes in registers (:func:`_planes`),
  and the value zero points enter a product, ``sum_j W[j, (C, gi)] (128 + zero[j, C])`` as ``W^T @
  Z`` with ``Z[j, (C', v)] = 128 + zero[j, C']`` (``V = ROWS / C`` copies to fill 16 columns; its
  ``C == C'``, ``v = 0`` diagonal is the sum, exact as the float32 sum it replaces). 225 registers
  against 188. One layer 81.3 against 92.8 us (run 60, both in one call), K4V2 decode 5.478 against
  5.793 ms per Llama-2-7B token at batch 8 and 4096 context, 1.59x the bf16 cache's 8.711 (run 58).
* GPU only (Triton lowering); ``interpret=True`` runs the same kernel body on any backend with plain
  operations in place of the inline PTX (tests). :func:`supported` says which caches it handles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxkv.kernels.qmatmul import code_plane_16

BITS = (2, 4, 8)
ROWS = 16  # rows of every tensor-core product (Triton's smallest)
SUB_SLOTS = 128  # slots per loop step (at most ROWS / G key groups)
MIN_CHUNK_SLOTS = 1024  # the fewest slots per program when the slots are split (:func:`chunks`)
PROGRAMS_PER_CORE = 2  # programs per GPU core (SM) that :func:`chunks` aims for
# H100, one Llama-2-7B layer at batch 8 and 4352 slots (scripts/kv_decode_sweep.py): 2 chunks, tiles of
# 128, 2 warps 87.8 us against 139.1 with 4 warps and 296.9 with 8 (run 55); 4 chunks 92.4, 8 chunks
# 101.3, tiles of 256 103.7-134.1 at 2 warps (run 56). Pipeline stages 2, 3 or 4 made no difference.
# With every loop load asynchronous (run 60): 2 chunks, 128, 2 warps 81.3 us; 4 chunks 85.5, 1 chunk
# 97.6, tiles of 64 95.9, 1 warp 129.0, 4 warps 114.2.
NUM_WARPS = 2
NUM_STAGES = 3
# Warps per merge program. In one layer's step (H100, run 43) merge took 8.0 us with 1, 7.7 with 2 and
# 7.8 with 4; 1 stays until the GPU tests have run through at 2 (that call ran out of time).
MERGE_WARPS = 1
_MASKED = -1e30  # the maximum of an empty chunk: exp(_MASKED - m) is 0 against any real score
_F32, _BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(kbits: int, vbits: int, k_per_channel: bool, group: int, head_dim: int, q_per_kv: int) -> bool:
    """True when the kernels handle this cache: power-of-two tiles, at least 16 bytes of codes per
    row on either side (the contraction and output widths of a tensor-core product), and for
    :func:`_write_token` whole bytes of value codes in every channel group."""
    return (
        k_per_channel
        and kbits in BITS
        and vbits in BITS
        and _pow2(group)
        and _pow2(head_dim)
        and _pow2(q_per_kv)
        and q_per_kv <= ROWS
        and ROWS // q_per_kv * group >= ROWS  # a tile of ROWS slots fits the rows
        and head_dim % group == 0
        and group % (8 // vbits) == 0
        and head_dim * kbits // 8 >= 16
        and head_dim * vbits // 8 >= 16
    )


def code_offset(bits: int) -> float:
    """What :func:`code_plane` adds to every code."""
    return 0.0 if bits == 8 else 128.0


def code_plane(packed: jax.Array, bits: int, k: int, dtype, interpret: bool) -> jax.Array:
    """Plane ``k`` of uint8 ``packed`` ``bits``-bit codes as ``code_offset(bits) + c`` (exact) in
    ``dtype`` (bf16 or float32): 128 + c for 2- and 4-bit codes (on the GPU two bf16 per byte permute,
    no convert), c for 8-bit codes (converted). The interpreter (tests off the GPU) computes the same
    values with ordinary operations."""
    if bits == 8:
        return packed.astype(_F32).astype(dtype)
    return code_plane_16(packed, bits, k, _BF16, interpret)[0].astype(dtype)


def _dot(dtype) -> dict:
    """Tensor-core product arguments: float32 accumulation; float32 operands multiplied in full
    precision (not TF32), for float32 models."""
    f32_dot = jax.lax.DotAlgorithmPreset.F32_F32_F32
    return dict(preferred_element_type=_F32, precision=f32_dot if dtype == _F32 else None)


def _value_products(p, vs, vz, vd, D, zsum, *, vbits, group, H, dtype, interpret):
    """Add quantized values to the value products: ``W[j, (C, gi)] = p[gi, j] scale[j, C]`` (zero
    rows pad it to ``Mv`` rows), one product per code plane ``D[k] [Mv, H*vb/8]``, and the zero points'
    product ``zsum [Mv, C*V] += W^T @ Z``, ``Z[j, (C', v)] = 128 + zero[j, C']`` (``V = ROWS / C``
    copies fill the 16 columns of a tensor-core tile: a product is what Triton pipelines the loads
    of; :func:`_plane_values` takes its diagonal). ``p [G, n]`` the slots' weights, ``vs``/``vz [n,
    C]`` their scales and zero points, ``vd [n, H*vb/8]`` their packed codes."""
    G, n_slots = p.shape
    C = H // group
    Mv = max(ROWS, C * G)  # rows of the value products (C * G real ones)
    pad = (jnp.arange(Mv // (C * G), dtype=jnp.int32) == 0)[None, None, :].astype(_F32)  # [1, 1, U]
    vs, vz = vs.astype(_F32), vz.astype(_F32)  # [n_slots, C]
    w = (vs[:, :, None] * p.T[:, None, :]).astype(dtype).astype(_F32)  # [n_slots, C, G], as multiplied
    wt = (w.reshape(n_slots, C * G)[:, :, None] * pad).reshape(n_slots, Mv).astype(dtype)
    V = _zero_copies(C)
    zb = jnp.broadcast_to((vz + code_offset(vbits))[:, :, None], (n_slots, C, V)).reshape(n_slots, C * V)
    zsum = zsum + jax.lax.dot_general(wt, zb.astype(dtype), (((0,), (0,)), ((), ())), **_dot(dtype))
    for k in range(8 // vbits):
        codes = code_plane(vd, vbits, k, dtype, interpret)  # [n_slots, Wv]
        D[k] = D[k] + jax.lax.dot_general(wt, codes, (((0,), (0,)), ((), ())), **_dot(dtype))
    return D, zsum


def _zero_copies(C: int) -> int:
    """Copies of each value group's zero point in the zero-point product, so that its ``C * V``
    columns fill at least one 16-column tensor-core tile."""
    return max(1, ROWS // C)


def _value_zeros(G: int, *, vbits, group, H):
    """Empty value products and zero-point sums for :func:`_value_products`."""
    C, vp = H // group, 8 // vbits
    Mv = max(ROWS, C * G)
    return [jnp.zeros((Mv, H // vp), _F32) for _ in range(vp)], jnp.zeros((Mv, C * _zero_copies(C)), _F32)


def _plane_values(D, zsum, G, *, vbits, group, H) -> list:
    """The weighted values of the products per code plane: plane ``k`` ``[G, H*vb/8]`` holds channels
    ``(8/vb) m + k``."""
    vp = 8 // vbits
    Wv, C = H // vp, H // group
    Mv = D[0].shape[0]
    V, U = _zero_copies(C), Mv // (C * G)
    # zsum [Mv, C * V]: row (C1, gi, u), column (C2, v) sums W[j, (C1, gi)] (128 + zero[j, C2]); its
    # diagonal C1 == C2, v = 0 is the zero-point term
    z5 = zsum.reshape(C, G, U, C, V).sum(axis=2)  # rows u > 0 are zero padding
    diag = (jnp.arange(C)[:, None, None, None] == jnp.arange(C)[None, None, :, None]) & (
        jnp.arange(V)[None, None, None, :] == 0
    )
    zsum = jnp.sum(jnp.where(diag, z5, 0.0), axis=(2, 3))  # [C, G]
    log2g = group.bit_length() - 1
    row_c = jnp.arange(C, dtype=jnp.int32)[:, None, None]
    planes = []
    for k in range(vp):
        # byte column m of plane k is channel vp*m + k, of group (vp*m + k) // group
        col_c = ((vp * jnp.arange(Wv, dtype=jnp.int32) + k) >> log2g)[None, None, :]  # [1, 1, Wv]
        dk = D[k].reshape(C, G, Mv // (C * G), Wv).sum(axis=2)  # [C, G, Wv]
        planes.append(jnp.sum(jnp.where(row_c == col_c, dk - zsum[:, :, None], 0.0), axis=0))  # [G, Wv]
    return planes


def _interleave(planes: list) -> jax.Array:
    """``[..., W]`` planes -> ``[..., W * len(planes)]`` with plane ``k``'s column ``m`` at ``len * m + k``
    (channel order), in registers: pairs of interleaved halves joined (Triton joins two at a time)."""
    if len(planes) == 1:
        return planes[0]
    even, odd = _interleave(planes[0::2]), _interleave(planes[1::2])
    return jnp.stack([even, odd], axis=-1).reshape(*even.shape[:-1], 2 * even.shape[-1])


def _planes(x: jax.Array, n: int) -> list:
    """``[..., W * n]`` -> ``n`` planes ``[..., W]``, plane ``k`` holding columns ``n m + k``, in
    registers (the inverse of :func:`_interleave`): a contiguous load split instead of ``n`` strided
    ones, which Triton cannot copy asynchronously and so does not pipeline."""
    if n == 1:
        return [x]
    even, odd = jnp.unstack(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), axis=-1)
    evens, odds = _planes(even, n // 2), _planes(odd, n // 2)
    return [p for pair in zip(evens, odds) for p in pair]


def _kernel(
    heads_ref, n_ref, kd_ref, ks_ref, kz_ref, vd_ref, vs_ref, vz_ref, m_ref, l_ref, o_ref, *,
    kbits, vbits, group, G, H, S, chunk, sub, sm_scale, dtype, interpret,
):  # fmt: skip
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kp = 8 // kbits  # planes per byte
    Wk = H // kp
    log2g = group.bit_length() - 1
    NT = max(1, sub // group)  # key groups per tile
    U = ROWS // (NT * G)  # rows per key group and query head: one real, U - 1 zero
    C = H // group
    Uv = max(ROWS, C * G) // (C * G)  # the same for the value products' rows (C, gi, u)
    dot = _dot(dtype)
    values = dict(vbits=vbits, group=group, H=H)
    lo = c * chunk  # this program's slots [lo, hi)
    hi = jnp.minimum(lo + chunk, n_ref[b])
    # the query heads per key plane (strided channels kp*m + k), loaded once
    qk = [heads_ref[b, pl.ds(h * G, G), pl.ds(k, Wk, kp)].astype(_F32) * sm_scale for k in range(kp)]
    pad = (jnp.arange(U, dtype=jnp.int32) == 0)[None, :, None].astype(_F32)  # [1, U, 1]
    row_group = jnp.arange(NT, dtype=jnp.int32)[:, None, None]

    def tile(i, carry):
        m, l, D, zsum = carry
        # A tile starting past the cache's end is moved back in bounds (to a group boundary: S and sub
        # are multiples of the group, or the tile lies in one group); the slots it re-reads are masked.
        s0 = lo + i * sub
        start = jnp.minimum(s0, S - sub)
        g0 = start >> log2g  # the tile's first key group
        slot = start + jnp.arange(sub, dtype=jnp.int32)[None, :]  # [1, sub]
        valid = (slot >= s0) & (slot < hi)
        kd = kd_ref[b, h, pl.ds(start, sub), :]  # [sub, Wk] packed bytes
        # Key rows (t, gi, u): q[gi] times group g0 + t's scales in bf16 (u = 0; zero rows pad the
        # tile to ROWS); the zero points (and the codes' offset) as one float32 bias per row, from the
        # same rounded rows, so that the offset cancels exactly.
        prod, bias = None, 0.0
        ks_planes = _planes(ks_ref[b, h, pl.ds(g0, NT), :].astype(_F32), kp)  # kp x [NT, Wk]
        kz_planes = _planes(kz_ref[b, h, pl.ds(g0, NT), :].astype(_F32), kp)
        for k, (ks, kz) in enumerate(zip(ks_planes, kz_planes)):
            a3 = (ks[:, None, :] * qk[k][None, :, :]).astype(dtype).astype(_F32)  # [NT, G, Wk]
            bias = bias + jnp.sum(a3 * (kz[:, None, :] + code_offset(kbits)), axis=2, keepdims=True)
            a = (a3.reshape(NT * G, 1, Wk) * pad).reshape(ROWS, Wk).astype(dtype)
            codes = code_plane(kd, kbits, k, dtype, interpret)  # [sub, Wk]
            d = jax.lax.dot_general(a, codes, (((1,), (1,)), ((), ())), **dot)  # [ROWS, sub]
            prod = d if prod is None else prod + d
        prod = prod.reshape(NT, G, U, sub).sum(axis=2)  # the zero rows add exact zeros
        own = row_group == ((slot >> log2g) - g0)[None]  # [NT, 1, sub]: the row of each slot's group
        s = jnp.sum(jnp.where(own, prod - bias, 0.0), axis=0)  # [G, sub]
        s = jnp.where(valid, s, _MASKED)
        # online softmax: rescale the running sums to the new maximum
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))  # [G, 1]
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)  # [G, sub]
        l = l * alpha + jnp.sum(p, axis=1, keepdims=True)
        alpha_rows = jnp.broadcast_to(alpha.reshape(1, G, 1), (C, G, Uv)).reshape(C * G * Uv, 1)
        D = [d * alpha_rows for d in D]
        zsum = zsum * alpha_rows
        rows = pl.ds(start, sub)
        D, zsum = _value_products(
            p, vs_ref[b, h, rows, :], vz_ref[b, h, rows, :], vd_ref[b, h, rows, :], D, zsum, dtype=dtype,
            interpret=interpret, **values,
        )  # fmt: skip
        return m_new, l, D, zsum

    init = (jnp.full((G, 1), _MASKED, _F32), jnp.zeros((G, 1), _F32), *_value_zeros(G, **values))
    m, l, D, zsum = jax.lax.fori_loop(0, (jnp.maximum(hi - lo, 0) + sub - 1) // sub, tile, init)
    m_ref[...] = m
    l_ref[...] = l
    for k, o_k in enumerate(_plane_values(D, zsum, G, **values)):
        o_ref[:, pl.ds(k, H * vbits // 8, 8 // vbits)] = o_k  # channels (8/vb) m + k (strided)


def step_heads(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The decode token's query, key and value heads ``[B, 1, N | K, H]`` as the one array ``[B, N + 2K,
    H]`` the kernels read (queries first, then keys, then values). One array, so that XLA computes
    it (RoPE on queries and keys, the split of the fused projection) in one launch: three arrays were
    three launches per layer."""
    return jnp.concatenate([q[:, 0], k[:, 0], v[:, 0]], axis=1)


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def gpu_cores() -> int:
    """The first device's cores (SMs on a GPU) for :func:`chunks`; 0 where JAX reports none (CPU)."""
    return getattr(jax.devices()[0], "core_count", 0) or 0


def chunks(
    batch: int,
    kv_heads: int,
    slots: int,
    cores: int,
    min_slots: int = MIN_CHUNK_SLOTS,
    per_core: int = PROGRAMS_PER_CORE,
) -> int:
    """Programs per sequence and KV head along the slots of a decode kernel: enough for ``per_core``
    programs on each of the GPU's ``cores`` (one when the sequences' heads already fill them), each at
    least ``min_slots`` long (one for a short cache). The defaults are :func:`body_partials`'."""
    return max(1, min(-(-slots // min_slots), -(-per_core * cores // (batch * kv_heads))))


@functools.partial(
    jax.jit,
    static_argnames=(
        "kbits",
        "vbits",
        "group",
        "sm_scale",
        "dtype",
        "chunks",
        "sub_slots",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def body_partials(
    heads, n_read, kdata, kscale, kzero, vdata, vscale, vzero, *, kbits, vbits, group, sm_scale, dtype=_BF16,
    chunks=1, sub_slots=None, num_warps=None, num_stages=None, interpret=False,
):  # fmt: skip
    """Flash-decoding partials of one query per sequence over the quantized body slots ``j < n_read``.

    ``heads [B, N + 2K, H]`` the decode token's heads (:func:`step_heads`): its queries are
    multiplied by ``sm_scale`` (the softmax scale) in float32; ``n_read [B]`` int32 (multiples of
    ``group``), the key and value sides as in the module docstring; ``dtype`` the operands of the
    products (the model's, bf16, or float32); ``chunks`` programs per sequence and KV head along the
    slots (:func:`chunks`); ``sub_slots``/``num_warps``/``num_stages`` slots per loop step, warps per
    program and Triton's pipeline stages (default :data:`SUB_SLOTS`, :data:`NUM_WARPS`,
    :data:`NUM_STAGES`). Program ``c`` covers slots ``[c * cs, (c + 1) * cs)``, ``cs = ceil(S /
    (chunks * sub)) * sub`` (``sub`` the tile after clamping to the cache and to ``ROWS / G`` key
    groups).

    Returns ``m [B, K, NC, G]``, ``l [B, K, NC, G]`` and ``o [B, K, NC, G, H]`` (float32), ``NC =
    ceil(S / cs)`` the number of chunks.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in (_BF16, _F32):
        raise ValueError(f"body_partials: operands must be bfloat16 or float32, got {dtype}")
    B, X, H = heads.shape
    K, S = kdata.shape[1:3]
    G = X // K - 2
    sub = tile_slots(S, group, G, sub_slots)
    NT = max(1, sub // group)  # key groups per tile
    J = S // group
    if J < NT:  # a cache shorter than one key group (J = 0: nothing is read): the refs need rows
        kscale, kzero = (jnp.pad(a, ((0, 0), (0, 0), (0, NT - J), (0, 0))) for a in (kscale, kzero))
    chunk = -(-S // (chunks * sub)) * sub
    NC = -(-S // chunk)
    kernel = functools.partial(
        _kernel, kbits=kbits, vbits=vbits, group=group, G=G, H=H, S=S, chunk=chunk, sub=sub, sm_scale=sm_scale,
        dtype=dtype, interpret=interpret,
    )  # fmt: skip
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
            jax.ShapeDtypeStruct((B, K, NC, G, 1), _F32),
            jax.ShapeDtypeStruct((B, K, NC, G, 1), _F32),
            jax.ShapeDtypeStruct((B, K, NC, G, H), _F32),
        ],
        compiler_params=pltriton.CompilerParams(
            num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES
        ),
        interpret=interpret,
        name=f"kv_decode_k{kbits}v{vbits}",
    )(heads, n_read.astype(jnp.int32), kdata, kscale, kzero, vdata, vscale, vzero)
    return m[..., 0], l[..., 0], o


def tile_slots(slots: int, group: int, q_per_kv: int, sub_slots: int | None = None) -> int:
    """Slots per loop step of :func:`body_partials`: ``sub_slots`` (default :data:`SUB_SLOTS`) at most
    ``ROWS / q_per_kv`` key groups (one row per group and query head) and at most the cache."""
    return min(sub_slots or SUB_SLOTS, ROWS // q_per_kv * group, _pow2_floor(slots))


# ----------------------------------------------------------------------------------------------
# Writing one decode token into the quantized body


def _rint(a, interpret: bool):
    """float32 round half to even (``jnp.round``), which Pallas' Triton lowering lacks."""
    if interpret:
        return jnp.round(a)
    return pltriton.elementwise_inline_asm(
        "cvt.rni.f32.f32 $0, $1;", args=[a], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, _F32)],
    )[0]  # fmt: skip


def round_up_scale(s, dtype):
    """Positive float32 scales rounded *up* to ``dtype`` as ``jaxkv.kvcache`` stores them (clipped to
    its range, then to nearest, then one step up where that fell below ``s``), with operations the
    Triton lowering has. The step up from a stored value ``v``: below ``dtype``'s smallest normal
    ``2^emin`` (subnormals) add ``2^(emin - m)``; above it add one to the lowest of the ``m`` mantissa
    bits ``dtype`` keeps of float32's 23 (the carry moves the exponent). Returns ``dtype`` values."""
    from jaxkv.kvcache import scale_range

    dtype = jnp.dtype(dtype)
    s = jnp.clip(s, *scale_range(dtype))
    if dtype == _F32:
        return s
    info = jnp.finfo(dtype)
    mbits, emin = info.nmant, info.minexp
    stored = s.astype(dtype)
    v = stored.astype(_F32)
    up = jnp.where(
        v < 2.0**emin,
        v + 2.0 ** (emin - mbits),
        jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(v, jnp.int32) + (1 << (jnp.finfo(_F32).nmant - mbits)), _F32
        ),
    )
    return jnp.where(v < s, up.astype(dtype), stored)


def _grid(mn, mx, bits: int, sdt, interpret: bool):
    """Stored scale, float32 scale and float32 zero point of ``jaxkv.kvcache.quantize`` from a group's
    float32 minimum and maximum."""
    from jaxkv.kvcache import ZERO_MAX, ZERO_MIN, _store_scale, scale_step

    s = scale_step(mn, mx, bits)
    # The interpreter runs on XLA, whose converts round trip only behind kvcache's barriers.
    stored = _store_scale(s, sdt) if interpret else round_up_scale(s, sdt)
    sf = stored.astype(_F32)
    return stored, sf, jnp.clip(_rint(-mn / sf, interpret), ZERO_MIN, ZERO_MAX)


def _codes(x, sf, zero, bits: int, interpret: bool):
    """int32 codes of float32 ``x`` on the grid ``(sf, zero)`` (``jaxkv.kvcache.quantize``). The
    division is Triton's (``div.full.f32``, not IEEE), as XLA's on the GPU: of 4.2M random float32
    quotients XLA rounded 1.2M otherwise than IEEE division, and with ``div.rn`` here 4 of 24,576 key
    codes came out one step off XLA's (H100, run 36); with the same division every code agrees."""
    c = jnp.clip(_rint(x / sf, interpret) + zero, 0, 2**bits - 1)
    return c.astype(jnp.int32)


def _write_token(b, h, n_old, n_new, knew_planes, vnew, vnew_planes, kring_ref, body_refs, *, kbits, vbits, group, H, Rk, sdt, interpret):  # fmt: skip
    """Quantize the new token of sequence ``b``, KV head ``h`` into the body ``body_refs`` (kdata,
    kscale, kzero, vdata, vscale, vzero), in place: its value at slot ``n_old`` (per token), and the key
    group it completes (per channel, when ``n_new`` is a multiple of ``group``; the older slots from the
    key ring, slot ``s`` at entry ``s % Rk``, read before the new token takes its entry). The new token
    as float32, loaded before anything was stored: ``vnew [H]`` its value, ``knew_planes[k]`` and
    ``vnew_planes[k]`` its key's and value's channels ``(8/b) m + k`` (code plane ``k``). The codes,
    scales and zero points of ``jaxkv.kvattention.write_side``, bit for bit (tests)."""
    kd_ref, ks_ref, kz_ref, vd_ref, vs_ref, vz_ref = body_refs

    @pl.when(n_new > n_old)
    def _():
        # The value at slot n_old, per token in groups of `group` channels; plane k (channels vp*m + k)
        # viewed [C, group / vp] has group C's channels in row C.
        vp = 8 // vbits
        Wv, C = H // vp, H // group
        x = vnew.reshape(C, group)
        stored, sf, zero = _grid(
            x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True), vbits, sdt, interpret
        )
        packed = 0
        for k in range(vp):
            xk = vnew_planes[k].reshape(C, group // vp)
            packed = packed | (_codes(xk, sf, zero, vbits, interpret).reshape(Wv) << (vbits * k))
        vd_ref[b, h, n_old, :] = packed.astype(jnp.uint8)
        vs_ref[b, h, n_old, :] = stored.reshape(C)
        vz_ref[b, h, n_old, :] = zero.reshape(C).astype(jnp.int8)

    @pl.when((n_new > n_old) & (n_new % group == 0))
    def _():
        # The key group this token completes, per channel: slots [n_new - group, n_new).
        kp = 8 // kbits
        Wk = H // kp
        first = n_new - group
        e = jnp.arange(group, dtype=jnp.int32)
        last = (e == group - 1)[:, None]
        packed = 0
        for k in range(kp):
            cols = pl.ds(k, Wk, kp)  # channels kp*m + k
            x = knew_planes[k][None, :]  # [1, Wk]
            if Rk:
                x = jnp.where(last, x, kring_ref[b, (first + e) % Rk, h, cols].astype(_F32))  # [group, Wk]
            stored, sf, zero = _grid(
                x.min(axis=0, keepdims=True), x.max(axis=0, keepdims=True), kbits, sdt, interpret
            )
            packed = packed | (_codes(x, sf, zero, kbits, interpret) << (kbits * k))
            ks_ref[b, h, first // group, cols] = stored[0]
            kz_ref[b, h, first // group, cols] = zero[0].astype(jnp.int8)
        kd_ref[b, h, pl.ds(first, group), :] = packed.astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------
# The full-precision window, the pivot segment and the merge of all partials


def _merge_kernel(
    heads_ref, pos_ref, pk_ref, pv_ref, m_ref, l_ref, o_ref, *refs, P, Pp, NC, G, H, sm_scale, dtype, window,
    kbits, vbits, group, S, Rk, Rv, W1p, sdt, interpret,
):  # fmt: skip
    # refs with a window: kring, vring (those of ring length Rk, Rv > 0), meta and the six body arrays
    # (inputs), the output, then the rings and the body again (outputs aliased to the inputs); without:
    # the output
    refs = list(refs)
    if window:
        kring_ref = refs.pop(0) if Rk else None
        vring_ref = refs.pop(0) if Rv else None
        meta_ref = refs.pop(0)
        vd_ref, vs_ref, vz_ref = refs[3:6]
        out_ref = refs[6]
        kring_out = refs[7] if Rk else None
        vring_out = refs[7 + bool(Rk)] if Rv else None
        body_out = refs[-6:]
    else:
        (out_ref,) = refs
    b, h = pl.program_id(0), pl.program_id(1)
    K = m_ref.shape[1]
    kh, vh = K * G + h, (G + 1) * K + h  # the rows of this KV head's new key and value in heads
    dot = _dot(dtype)
    # Every load comes before the first store: the compiler cannot move a load above a store to memory
    # it does not know apart, so a load issued after one waits its own round trip.
    # ROWS query rows for the tensor cores: the G query heads repeated
    q16 = heads_ref[b, h * G + (jnp.arange(ROWS, dtype=jnp.int32) & (G - 1)), :].astype(_F32) * sm_scale
    q16 = q16.astype(dtype)  # [ROWS, H]
    # The chunks' partials as one load each (a power of two of chunks, the last one re-read and masked):
    # a load per chunk waited for the layout change of the one before it.
    NCp = max(2, _pow2_ceil(NC))
    live = (jnp.arange(NCp, dtype=jnp.int32) < NC)[:, None]  # [NCp, 1]
    chunk = jnp.minimum(jnp.arange(NCp, dtype=jnp.int32), NC - 1)
    m_parts = jnp.where(live, m_ref[b, h, chunk, :], _MASKED)  # [NCp, G]
    l_parts = jnp.where(live, l_ref[b, h, chunk, :], 0.0)
    m_all = m_parts.max(axis=0)[:, None]  # [G, 1]
    if P:
        p_ = jnp.arange(Pp, dtype=jnp.int32)
        prow = jnp.minimum(p_, P - 1)
        pk = pk_ref[prow, h, :].astype(dtype)  # [Pp, H]
        pv = pv_ref[prow, h, :].astype(dtype)
        pos = pos_ref[b]

    if window:
        # The window: slots [n_old - Rk, n_old] are the Rk ring entries (slot s at index s % Rk) and the
        # new token; it reads those with qk <= slot < n_new, their values quantized below qv (body rows)
        # and full precision from qv on (the value ring, or the new token).
        n_old, qk, qv, n_new = (meta_ref[b, t] for t in range(4))
        kp, vp = 8 // kbits, 8 // vbits
        Wk, Wv = H // kp, H // vp
        vnew_f32 = heads_ref[b, vh, :].astype(_F32)  # [H]
        knew_planes = [heads_ref[b, kh, pl.ds(k, Wk, kp)].astype(_F32) for k in range(kp)]
        vnew_planes = [heads_ref[b, vh, pl.ds(k, Wv, vp)].astype(_F32) for k in range(vp)]
        w = jnp.arange(W1p, dtype=jnp.int32)
        slot = n_old - Rk + w  # entry w; w == Rk is the new token
        valid = (w <= Rk) & (slot >= jnp.maximum(qk, 0)) & (slot < n_new)  # [W1p]
        new_row = (w == Rk)[:, None]
        knew = heads_ref[b, kh, :].astype(dtype)[None, :]  # [1, H]
        if Rk:
            kw = jnp.where(new_row, knew, kring_ref[b, (slot + Rk) % Rk, h, :].astype(dtype))  # [W1p, H]
        else:
            kw = jnp.broadcast_to(knew, (W1p, H))
        vf = vnew_f32.astype(dtype)[None, :]  # [1, H]
        if Rv:  # slots [n_old - Rv, n_old) in the value ring
            vrow = (jnp.maximum(slot, n_old - Rv) + Rv) % Rv  # >= 0 (slots below the ring: masked)
            vf = jnp.where(new_row, vf, vring_ref[b, vrow, h, :].astype(dtype))  # [W1p, H]
        else:  # no value ring: only the new token is read at full precision
            vf = jnp.broadcast_to(vf, (W1p, H))
        rows = jnp.clip(slot, 0, S - 1)  # the body rows of the window's slots (masked outside)
        vs_w, vz_w, vd_w = (r[b, h, rows, :] for r in (vs_ref, vz_ref, vd_ref))  # [W1p, C | Wv]

        s16 = jax.lax.dot_general(q16, kw, (((1,), (1,)), ((), ())), **dot)  # [ROWS, W1p]
        s = jnp.where(valid[None, :], s16.reshape(ROWS // G, G, W1p).max(axis=0), _MASKED)  # [G, W1p]
        m_win = s.max(axis=1, keepdims=True)
        p = jnp.where(valid[None, :], jnp.exp(s - m_win), 0.0)
        l_win = jnp.sum(p, axis=1, keepdims=True)
        quant = (slot < qv)[None, :]
        # Quantized values as the body kernel weighs them, their code planes interleaved into channel
        # order in registers
        values = dict(vbits=vbits, group=group, H=H)
        D, zsum = _value_products(
            jnp.where(quant, p, 0.0), vs_w, vz_w, vd_w, *_value_zeros(G, **values), dtype=dtype,
            interpret=interpret, **values,
        )  # fmt: skip
        o_win = _interleave(_plane_values(D, zsum, G, **values))  # [G, H]
        # full-precision values: rows (gi, u) of a ROWS-row product, u = 0 the real one
        padf = (jnp.arange(ROWS // G, dtype=jnp.int32) == 0)[None, None, :].astype(_F32)
        wf = (jnp.where(quant, 0.0, p).T[:, :, None] * padf).reshape(W1p, ROWS).astype(dtype)
        f = jax.lax.dot_general(wf, vf, (((0,), (0,)), ((), ())), **dot)  # [ROWS, H]
        o_win = o_win + f.reshape(G, ROWS // G, H).sum(axis=1)
        m_all = jnp.maximum(m_all, m_win)

    if P:
        s16 = jax.lax.dot_general(q16, pk, (((1,), (1,)), ((), ())), **dot)  # [ROWS, Pp]
        visible = ((p_ < P) & (p_ <= pos))[None, :]  # causal: a padding query (-1) sees none
        s = jnp.where(visible, s16.reshape(ROWS // G, G, Pp).max(axis=0), _MASKED)  # [G, Pp]
        m_all = jnp.maximum(m_all, s.max(axis=1, keepdims=True))
        e = jnp.where(visible, jnp.exp(s - m_all), 0.0)
        denom = jnp.sum(e, axis=1, keepdims=True)
    else:
        denom = jnp.zeros((G, 1), _F32)
    o_parts = o_ref[b, h, chunk, :, :]  # [NCp, G, H] (loaded here: registers)
    wc = jnp.where(live, jnp.exp(m_parts - m_all[:, 0][None, :]), 0.0)  # [NCp, G]
    denom = denom + jnp.sum(l_parts * wc, axis=0)[:, None]
    body = jnp.sum(wc[:, :, None] * o_parts, axis=0)  # [G, H]
    if window:
        wc = jnp.exp(m_win - m_all)
        denom = denom + l_win * wc
        body = body + wc * o_win
    denom = jnp.where(denom > 0, denom, 1.0)  # a padding query without a pivot sees nothing
    out = body / denom
    if P:
        # (e / denom) @ pivot_v as a ROWS-row product: rows (gi, u), u = 0 the real one
        pad = (jnp.arange(ROWS // G, dtype=jnp.int32) == 0)[None, :, None].astype(_F32)
        a = ((e / denom)[:, None, :] * pad).reshape(ROWS, Pp).astype(dtype)
        piv = jax.lax.dot_general(a, pv, (((1,), (0,)), ((), ())), **dot)  # [ROWS, H]
        out = out + piv.reshape(G, ROWS // G, H).sum(axis=1)
    out_ref[b, h, :, :] = out.astype(out_ref.dtype)

    if window:
        # The new token into the body: above, its slot's value row was read only under a zero weight,
        # its key group not at all.
        _write_token(
            b, h, n_old, n_new, knew_planes, vnew_f32, vnew_planes, kring_ref, body_out, kbits=kbits, vbits=vbits,
            group=group, H=H, Rk=Rk, sdt=sdt, interpret=interpret,
        )  # fmt: skip

        # Then the rings take the new token (entry n_old % Rk), after every lane has read the old one.
        @pl.when(n_new > n_old)
        def _():
            if not interpret:
                pltriton.debug_barrier()
            if Rk:
                kring_out[b, n_old % Rk, h, :] = knew[0].astype(kring_out.dtype)
            if Rv:
                vring_out[b, n_old % Rv, h, :] = vnew_f32.astype(vring_out.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("kbits", "vbits", "group", "sm_scale", "out_dtype", "dtype", "num_warps", "interpret"),
)
def merge(
    heads, positions, pivot_k, pivot_v, m, l, o, window=None, *, kbits=None, vbits=None, group=None, sm_scale,
    out_dtype, dtype=_BF16, num_warps=None, interpret=False,
):  # fmt: skip
    """The attention output of one decode query per sequence from :func:`body_partials`' partials
    ``m``/``l``/``o``, the pivot segment ``pivot_k``/``pivot_v [P, K, H]`` and, with ``window``, the
    full-precision key window: one softmax over all of them, exactly (each part's partials rescaled
    by ``exp(m - max)``), in one launch of a program per sequence and KV head. ``heads [B, N + 2K,
    H]`` and ``sm_scale`` as ``body_partials`` takes them; ``positions [B]`` the queries' positions
    (a pivot slot ``p`` is visible from ``p`` on; -1, padding, sees none); ``dtype`` the products'
    operands as in ``body_partials``; ``num_warps`` per program (default :data:`MERGE_WARPS`).

    ``window = (kring, vring, meta [B, 4] int32, kdata, kscale, kzero, vdata, vscale, vzero)``, the
    decode step's full-precision side and the body (``kbits``, ``vbits``, ``group`` its codes):
    ``meta[b] = (n_old, qk, qv, n_new)``; the rings ``[B, Rk | Rv, K, H]`` (slot ``s`` at entry
    ``s % R``; None for a ring of length 0) hold slots ``[n_old - R, n_old)``, and the key and value
    heads of ``heads`` are the new token at slot ``n_old`` (a padding row has ``n_new == n_old``). The
    query attends to the key slots ``qk <= slot < n_new`` there, their values read quantized from the
    body below ``qv`` and at full precision from ``qv`` on (``jaxkv.kvattention``'s decode: the keys a
    query reads at full precision, each slot once). Then the program writes the new token in place:
    quantized into the body (:func:`_write_token`; the codes, scales and zero points of
    ``jaxkv.kvattention.write_side`` bit for bit) and as it is into the rings.

    The window was first one more program per sequence and KV head in :func:`body_partials`' grid
    (with the token write, a kernel of its own before it). Here, the body kernel compiles without it;
    in one layer's decode step (H100, batch 8, 4352 slots, ``scripts/kv_decode_sweep.py``) the body
    kernel took 95.7 us against 97.0 with the window program and the merge 9.0 against 5.0
    (results/bench/h100_run40_sweep_merge.md, h100_run39_sweep_fold.md), and the model's K4V2 step
    6.600-6.624 ms against 6.688 (runs 39-41, separate calls: within their noise).

    Every load of a program comes first (the compiler cannot move a load above a store it cannot tell
    apart from it), the chunks' partials are one load each instead of a load, a layout change and a
    barrier per chunk, and the window's value planes are interleaved into channel order in registers
    (no scratch output through memory, no barrier): merge 8.9 -> 8.0 us per layer at 1 warp (H100, run
    43, ``kv_decode_sweep.py --candidates step-kernel``; 7,856 -> 7,224 SASS instructions,
    ``scripts/kernel_sass.py merge``). The model's K4V2 step did not move beyond its noise (6.621
    against 6.603 ms, run 43, with 2 warps).

    Returns ``[B, K, G, H]`` in ``out_dtype``, and with ``window`` also the updated ``kring``, ``vring``
    and body ``(kdata, kscale, kzero, vdata, vscale, vzero)``.
    """
    B, K, NC, G = m.shape
    H = heads.shape[2]
    P = pivot_k.shape[0]
    Pp = max(ROWS, _pow2_ceil(P))  # a power of two, at least one tensor-core tile
    if not P:  # the refs need an entry; never read
        pivot_k = pivot_v = jnp.zeros((1, K, H), heads.dtype)
    Rk = Rv = W1p = S = 0
    sdt = None
    extra, rings, body = (), (), ()
    if window is not None:
        kring, vring, meta, *body = window
        rings = tuple(r for r in (kring, vring) if r is not None)
        Rk, Rv = (0 if r is None else r.shape[1] for r in (kring, vring))
        W1p = max(ROWS, _pow2_ceil(Rk + 1))  # Rk + 1 entries: a power of two, at least one tensor-core tile
        S, sdt = body[0].shape[2], jnp.dtype(body[1].dtype)
        extra = (*rings, meta.astype(jnp.int32), *body)
    kernel = functools.partial(
        _merge_kernel, P=P, Pp=Pp, NC=NC, G=G, H=H, sm_scale=sm_scale, dtype=jnp.dtype(dtype),
        window=window is not None, kbits=kbits, vbits=vbits, group=group, S=S, Rk=Rk, Rv=Rv, W1p=W1p, sdt=sdt,
        interpret=interpret,
    )  # fmt: skip
    full = pl.BlockSpec(memory_space=None)
    n_in = 7 + len(extra)
    updated = (*rings, *body)
    # in place: the rings (inputs 7, 8) and the body (the last six inputs), outputs 1 on
    aliased = (*range(7, 7 + len(rings)), *range(n_in - len(body), n_in))
    out = pl.pallas_call(
        kernel,
        grid=(B, K),
        in_specs=[full] * n_in,
        out_specs=[full] * (1 + len(updated)),
        out_shape=[
            jax.ShapeDtypeStruct((B, K, G, H), out_dtype),
            *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in updated],
        ],
        input_output_aliases={i: 1 + j for j, i in enumerate(aliased)},
        # one warp: with 4, K4V2 decode took 6.650 against 6.600 ms per Llama-2-7B token at batch 8 and
        # 4096 context (H100, run 41, results/bench/h100_run41_*)
        compiler_params=pltriton.CompilerParams(num_warps=num_warps or MERGE_WARPS, num_stages=1),
        interpret=interpret,
        name="kv_decode_merge",
    )(heads, positions.astype(jnp.int32), pivot_k, pivot_v, m, l, o, *extra)
    if window is None:
        return out[0]
    new_rings = iter(out[1 : 1 + len(rings)])
    return out[0], *(None if r is None else next(new_rings) for r in window[:2]), tuple(out[1 + len(rings) :])
