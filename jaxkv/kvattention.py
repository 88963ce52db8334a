"""Attention over a quantized KV cache (decode, prefill), and the cache-free forward that equals it.

Conventions: the dimension alphabet of ``jaxkv.config`` (B T S P K G H), plus, for quantized sides,
C = H / group channel groups, J = S / group token groups and E = an index inside a group. The cache
layout and the rule of which copy (quantized or full precision) a query reads are in
``jaxkv.kvcache``; ``i``/``j`` below are body slots (position - P) of the query/key.

Two implementations of the cached attention, chosen by ``impl``:

* ``"folded"`` (used by the model): for few queries (decode) the body is read as packed integer
  codes; per-channel key scales are folded into the query (``q * scale`` per token group, O(T·J·H)
  work) and per-token value scales into the probabilities (``p * scale`` per channel group), zero
  points enter as one bias term per group. No full-precision copy of the body is formed (only the
  unpacked integer codes of one layer, which a fused kernel would not materialise either). Past one
  group's worth of query rows per KV head (prefill chunks) those folded operands outgrow the body,
  and the body is dequantized to the query's dtype once instead (:func:`_dequantize_first`). Scores
  of the pivot segment, the quantized body and the full-precision key window (ring + new tokens) go
  through one softmax in which each visible slot appears once; values are then read from the body
  or the value window with gathers of window size only (never over S). A long call attends in
  blocks of :data:`QUERY_BLOCK` queries, each with only its band of the windows. K4V2 prefill on a
  2-core CPU (SmolLM2-135M shape, batch 4, 1,024 tokens): 79 tokens/s folded, 123 dequantizing
  first, 259 with the query blocks, against 270-278 with a bf16 cache (results/bench/cpu_run4_*,
  cpu_run5_*).
* ``"kernel"``: decode through the kernels of ``jaxkv.kernels.kvdecode`` (one query per sequence,
  per-channel keys, 2/4/8-bit keys and values; other calls take ``"folded"``): the tensor-core
  kernel returns each chunk's maximum, exponential sum and weighted value sum over the body slots
  read quantized on both sides, and a second one attends to the full-precision key window and the
  pivot segment, combines it all in one softmax exactly and writes the new token into the body
  and the rings (:func:`_decode_with_kernels`). An unquantized cache takes one kernel of
  ``jaxkv.kernels.fpdecode`` instead (:func:`decode_full_precision`). The model's default on a GPU
  (:func:`decode_impl`, ``JAXKV_KV_DECODE``); GPU (Triton), or Pallas' interpreter elsewhere.
* ``"reference"``: dequantize the body, build every query's keys/values explicitly
  ``[B, T, S, K, H]`` and attend; simple and slow, for tests.

Compute: products run in the query's dtype with float32 accumulation; scales, zero points, the
softmax and the output sums are float32.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ModelConfig
from jaxkv.kvcache import (
    KVQuantConfig,
    QuantSide,
    SideSpec,
    clip_factors,
    dequantize,
    fake_quantize_sequence,
    frontier,
    pack_codes,
    quantize_channels,
    quantize_tokens,
    unpack_codes,
)

# Added to masked scores; finite so that a fully-masked (padding) row gives a uniform softmax, not NaN.
_MASKED = -1e30
_F32 = jnp.float32


def causal_mask(q_pos, k_pos, cfg: ModelConfig) -> jax.Array:
    """[B,T,S] True where key position k may be seen from query position q (both >= 0)."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if cfg.sliding_window is not None:
        mask &= k > q - cfg.sliding_window
    return mask


# ----------------------------------------------------------------------------------------------
# Writing new tokens


def window_view(side: QuantSide, x: jax.Array, n_old: jax.Array):
    """Full-precision copies of slots ``[n_old - W, n_old + T)``: the ring in slot order, then ``x``.

    Returns ``(view [B, W + T, K, H], base [B])``: view index w holds slot ``base + w`` (the new
    tokens are contiguous from slot n_old; entries of negative slots are meaningless).
    """
    W = side.spec.window
    base = n_old - W
    if not W:
        return x, base
    idx = jnp.mod(base[:, None] + jnp.arange(W), W)
    old = jnp.take_along_axis(side.window, idx[:, :, None, None], axis=1)
    return jnp.concatenate([old.astype(x.dtype), x], axis=1), base


def write_side(side: QuantSide, x, slot, n_old, n_new, view, base) -> QuantSide:
    """Store the new tokens ``x [B, T, K, H]`` (body slots ``slot [B, T]``, S = padding) in one layer.

    Per-token sides quantize every new token; per-channel keys quantize each group of ``group``
    slots completed by this call, reading its older tokens from the window (``view``/``base``).
    The ring keeps the full-precision copies of the last W slots.
    """
    spec = side.spec
    B, T, K, H = x.shape
    S = side.data.shape[2]
    b_idx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    # The body is head-major [B, K, S, ...]: ``.at[b, :, slot]`` takes rows [B, T, K, ...] (numpy
    # puts the indexed dimensions first), the layout of ``x``.
    if not spec.quantized:
        return side.replace(data=side.data.at[b_idx, :, slot].set(x.astype(side.data.dtype), mode="drop"))
    if spec.per_channel:
        g = spec.group
        nb = (g - 1 + T) // g  # groups one call can complete
        blk = n_old[:, None] // g + jnp.arange(nb)  # [B, nb] the first is the group n_old falls in
        ok = (blk + 1) * g <= n_new[:, None]
        slots = blk[..., None] * g + jnp.arange(g)  # [B, nb, E]
        vidx = jnp.clip(slots - base[:, None, None], 0, view.shape[1] - 1).reshape(B, nb * g)
        vals = jnp.take_along_axis(view, vidx[:, :, None, None], axis=1).reshape(B, nb, g, K, H)
        codes, scale, zero = quantize_channels(vals, spec)
        wslot = jnp.where(ok[..., None], slots, S).reshape(B, nb * g)
        bi = jnp.broadcast_to(jnp.arange(B)[:, None], (B, nb * g))
        packed = pack_codes(codes.reshape(B, nb * g, K, H), spec.bits)
        data = side.data.at[bi, :, wslot].set(packed, mode="drop")
        wblk = jnp.where(ok, blk, S // g)
        bj = jnp.broadcast_to(jnp.arange(B)[:, None], (B, nb))
        new_scale = side.scale.at[bj, :, wblk].set(scale, mode="drop")
        new_zero = side.zero.at[bj, :, wblk].set(zero, mode="drop")
    else:
        clip = clip_factors(side.wkv["clip"]) if side.wkv is not None else None  # jaxkv.wkvquant
        codes, scale, zero = quantize_tokens(x, spec, clip)
        data = side.data.at[b_idx, :, slot].set(pack_codes(codes, spec.bits), mode="drop")
        new_scale = side.scale.at[b_idx, :, slot].set(scale, mode="drop")
        new_zero = side.zero.at[b_idx, :, slot].set(zero, mode="drop")
    window = side.window
    if spec.window:
        W = spec.window
        # Only the last W slots of the call: earlier ones would collide in the ring.
        keep = (slot < S) & (slot >= n_new[:, None] - W)
        window = window.at[b_idx, jnp.where(keep, jnp.mod(slot, W), W)].set(
            x.astype(window.dtype), mode="drop"
        )
    return side.replace(data=data, scale=new_scale, zero=new_zero, window=window)


# ----------------------------------------------------------------------------------------------
# Reading the quantized body


def _dequantize_first(queries: int, spec) -> bool:
    """Whether ``queries`` query rows per KV head (tokens x query heads) read the body dequantized to
    the model's dtype once rather than with the scales folded into them. Folding (decode) keeps the
    codes exact and never forms the float body, but its folded operand (``q * scale`` per key group,
    ``p * scale`` per value group) has ``queries / group`` times the elements of the body: past one
    group's worth of queries (prefill) dequantizing first is the smaller computation."""
    return queries > spec.group


def body_scores(qg: jax.Array, side: QuantSide) -> jax.Array:
    """q·k for every body slot, float32 [B, T, K, G, S], from the stored codes (scales folded into q)."""
    spec = side.spec
    cd = qg.dtype
    if not spec.quantized or _dequantize_first(qg.shape[1] * qg.shape[3], spec):
        body = dequantize_body(side, cd)
        return jnp.einsum("BTKGH,BKSH->BTKGS", qg, body, preferred_element_type=_F32)
    B, K, S, _ = side.data.shape
    H, g = qg.shape[-1], spec.group
    codes = unpack_codes(side.data, spec.bits).astype(cd)  # exact: codes < 256
    scale, zero = side.scale.astype(_F32), side.zero.astype(_F32)
    if spec.per_channel:
        # k[j, h] = (c[j, h] - z[J, h]) * s[J, h] for j in group J: q·k = sum_h (q s)[J, h] c[j, h] - (q s)[J]·z[J].
        qs = jnp.einsum("BTKGH,BKJH->BTKGJH", qg.astype(_F32), scale)
        dot = jnp.einsum(
            "BTKGJH,BKJEH->BTKGJE",
            qs.astype(cd),
            codes.reshape(B, K, S // g, g, H),
            preferred_element_type=_F32,
        )
        bias = jnp.einsum("BTKGJH,BKJH->BTKGJ", qs, zero)
        return (dot - bias[..., None]).reshape(*dot.shape[:4], S)
    # Per token: k[j, C, E] = (c - z[j, C]) s[j, C]: q·k = sum_C s[j, C] (q_C·c[j, C] - z[j, C] sum(q_C)).
    qc = qg.reshape(*qg.shape[:4], H // g, g)
    part = jnp.einsum(
        "BTKGCE,BKSCE->BTKGSC", qc, codes.reshape(B, K, S, H // g, g), preferred_element_type=_F32
    )
    qsum = jnp.sum(qc.astype(_F32), axis=-1)
    return jnp.einsum("BTKGSC,BKSC->BTKGS", part, scale) - jnp.einsum("BTKGC,BKSC->BTKGS", qsum, scale * zero)


def body_values(p: jax.Array, side: QuantSide, cd) -> jax.Array:
    """sum_j p[j] v[j], float32 [B, T, K, G, H], for probabilities p [B, T, K, G, S] (float32)."""
    spec = side.spec
    if spec.quantized and spec.per_channel:
        raise NotImplementedError("values are quantized per token")
    if not spec.quantized or _dequantize_first(p.shape[1] * p.shape[3], spec):
        body = dequantize_body(side, cd)
        # body first: XLA:CPU's dot runtime has no bf16 x bf16 -> f32 for the other operand order of
        # this product ("UNIMPLEMENTED ... DotThunk"); this order it rewrites into a supported one
        return jnp.einsum("BKSH,BTKGS->BTKGH", body, p.astype(cd), preferred_element_type=_F32)
    B, K, S, _ = side.data.shape
    g = spec.group
    codes = unpack_codes(side.data, spec.bits).astype(cd)
    H = codes.shape[-1]
    # v[j, C, E] = (c - z[j, C]) s[j, C]: fold s into p per channel group, z as one bias per group.
    ps = jnp.einsum("BTKGS,BKSC->BTKGSC", p, side.scale.astype(_F32))
    out = jnp.einsum(
        "BTKGSC,BKSCE->BTKGCE", ps.astype(cd), codes.reshape(B, K, S, H // g, g), preferred_element_type=_F32
    )
    bias = jnp.einsum("BTKGSC,BKSC->BTKGC", ps, side.zero.astype(_F32))
    return (out - bias[..., None]).reshape(*out.shape[:4], H)


def dequantize_body(side: QuantSide, dtype=_F32) -> jax.Array:
    """The whole body as ``dtype``, head-major [B, K, S, H] as stored (float32 for the reference
    path; the query's dtype where a prefill reads it dequantized, :func:`_dequantize_first`)."""
    spec = side.spec
    if not spec.quantized:
        return side.data.astype(dtype)
    B, K, S, _ = side.data.shape
    codes = unpack_codes(side.data, spec.bits)
    H, g = codes.shape[-1], spec.group
    if spec.per_channel:
        c = codes.reshape(B, K, S // g, g, H)
        x = dequantize(c, side.scale[:, :, :, None], side.zero[:, :, :, None])
    else:
        c = codes.reshape(B, K, S, H // g, g)
        x = dequantize(c, side.scale[..., None], side.zero[..., None])
    return x.reshape(B, K, S, H).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Cached attention (prefill and decode)


# JAXKV_KV_DECODE -> attend_cached's impl
DECODE_IMPLS = {"xla": "folded", "kernel": "kernel"}


def decode_impl() -> str:
    """The cached-attention implementation the model uses, from ``JAXKV_KV_DECODE``
    (:data:`DECODE_IMPLS`): by default ``kernel`` on a GPU (the tensor-core decode kernel, for the
    caches it supports; other calls take ``"folded"``) and ``xla`` (``"folded"``) elsewhere, where
    the kernel would only run in Pallas' interpreter. On an H100 (Llama-2-7B, batch 8, 4096
    context, K4V2, int4 weights) the kernel took the step from 11.572 to 10.330 ms
    (results/bench/h100_run20_b8_p4096_kv_xla_kernel.md) and one layer's attention from 452 to 126
    us (results/bench/h100_run21_kv_decode_sweep_chunks.md). Both compute the same attention
    (tests); the kernel's products take bf16 operands as the folded path's do. The same choice
    covers unquantized caches (:func:`decode_full_precision`, ``jaxkv.kernels.fpdecode``)."""
    default = "kernel" if jax.default_backend() == "gpu" else "xla"
    name = os.environ.get("JAXKV_KV_DECODE", default)
    if name not in DECODE_IMPLS:
        raise ValueError(f"JAXKV_KV_DECODE={name!r} is not one of {sorted(DECODE_IMPLS)}")
    return DECODE_IMPLS[name]


def _kernel_applies(T: int, G: int, H: int, kspec, vspec, cfg: ModelConfig) -> bool:
    from jaxkv.kernels import kvdecode

    return (
        T == 1
        and jax.sharding.get_abstract_mesh().empty  # a Pallas call is not partitioned over a mesh
        and kspec.quantized
        and vspec.quantized
        and cfg.sliding_window is None
        and kvdecode.supported(kspec.bits, vspec.bits, kspec.per_channel, kspec.group, H, G)
    )


# Query rows per block of a long call (prefill chunk): each block reads only its band of the
# full-precision windows (see attend_cached). 128 keeps the products tensor-core sized on a GPU; not
# yet tuned there.
QUERY_BLOCK = 128


def attend_cached(
    q, k, v, pivot_k, pivot_v, kside: QuantSide, vside: QuantSide, positions, n_old, n_new, slot,
    cfg: ModelConfig, kv: KVQuantConfig, impl: str = "folded", query_block: int = QUERY_BLOCK,
):  # fmt: skip
    """Write the new K/V of one layer into a quantized cache, then attend.

    q [B,T,N,H], k/v [B,T,K,H] (after RoPE); pivot_k/v [P,K,H]; ``kside``/``vside`` this layer's cache
    (leaves without the L axis); positions [B,T] (-1 = padding); n_old/n_new [B] body lengths before
    and after this call; slot [B,T] body slots (S for padding). Returns ``(out [B,T,N*H], kside, vside)``.

    A call of more than ``query_block`` tokens (prefill) attends in blocks of that many queries: a
    query reads at most the last ``window`` slots before it at full precision, so block ``b`` needs
    only entries ``[b*Q, b*Q + Q + window)`` of a window view, not all ``window + T`` of them (the
    window products shrink from ``T (T + W)`` to ``T (Q + W)``; the body is read whole by each block,
    as it is by the whole call).
    """
    n_tokens = q.shape[1]
    kspec, vspec = kside.spec, vside.spec
    if impl == "kernel" and _kernel_applies(
        q.shape[1], q.shape[2] // k.shape[2], q.shape[3], kspec, vspec, cfg
    ):
        return _decode_with_kernels(q, k, v, pivot_k, pivot_v, kside, vside, positions, n_old, n_new, kv)
    kview, kbase = window_view(kside, k, n_old) if kspec.quantized else (None, None)
    vview, vbase = window_view(vside, v, n_old) if vspec.quantized else (None, None)
    kside = write_side(kside, k, slot, n_old, n_new, kview, kbase)
    vside = write_side(vside, v, slot, n_old, n_new, vview, vbase)
    read = functools.partial(
        _read_cached, pivot_k=pivot_k, pivot_v=pivot_v, kside=kside, vside=vside, n_new=n_new, cfg=cfg,
        kv=kv, impl=impl,
    )  # fmt: skip
    if n_tokens > query_block and impl != "reference":
        out = _read_in_blocks(read, q, positions, kview, kbase, vview, vbase, query_block)
    else:
        out = read(q, positions, kview, kbase, vview, vbase)
    return out, kside, vside


def _read_in_blocks(read, q, positions, kview, kbase, vview, vbase, Q: int):
    """``read`` (:func:`_read_cached`) for blocks of ``Q`` queries at once (vmapped), each with its
    band of the window views; the last block is padded with padding queries (position -1)."""
    B, T, N, H = q.shape
    nb = -(-T // Q)
    pad = nb * Q - T
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    positions = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    offset = jnp.arange(nb) * Q  # [nb] first new token of each block

    def band(view, base):
        """Entries [b*Q, b*Q + Q + W) of ``view`` [B, W+T, ...] per block -> [nb, B, Q+W, ...], and
        their bases [nb, B]. Entries past the view's end (clipped) sit at slots >= n_new: masked."""
        if view is None:
            return None, None
        idx = jnp.clip(offset[:, None] + jnp.arange(Q + view.shape[1] - T), 0, view.shape[1] - 1)
        return jnp.swapaxes(view[:, idx], 0, 1), base[None, :] + offset[:, None]

    blocks = (
        jnp.swapaxes(q.reshape(B, nb, Q, N, H), 0, 1),
        jnp.swapaxes(positions.reshape(B, nb, Q), 0, 1),
        *band(kview, kbase),
        *band(vview, vbase),
    )
    out = jax.vmap(read, in_axes=tuple(None if a is None else 0 for a in blocks))(*blocks)  # [nb, B, Q, N*H]
    return jnp.swapaxes(out, 0, 1).reshape(B, nb * Q, N * H)[:, :T]


def _read_cached(
    q, positions, kview, kbase, vview, vbase, *, pivot_k, pivot_v, kside: QuantSide, vside: QuantSide,
    n_new, cfg: ModelConfig, kv: KVQuantConfig, impl: str,
):  # fmt: skip
    """The attention of :func:`attend_cached` after the writes: queries ``q [B,T,N,H]`` at
    ``positions``, the window views (``window_view``: entry ``w`` holds slot ``base + w``) or any
    band of them that holds every slot these queries read at full precision. Returns [B,T,N*H]."""
    B, T, N, H = q.shape
    K, G = cfg.num_kv_heads, cfg.group_size
    P = pivot_k.shape[0]
    kspec, vspec = kside.spec, vside.spec
    S = kside.data.shape[2]
    if impl not in ("folded", "kernel", "reference"):
        raise ValueError(f"impl must be 'folded', 'kernel' or 'reference', got {impl!r}")
    i = positions - P  # query body slots
    piv_mask = causal_mask(positions, jnp.broadcast_to(jnp.arange(P), (B, P)), cfg)
    cd = q.dtype
    qg = q.reshape(B, T, K, G, H)
    s_piv = jnp.einsum("BTKGH,PKH->BTKGP", qg, pivot_k.astype(cd), preferred_element_type=_F32)
    j = jnp.arange(S)
    body_pos = jnp.where(j[None, :] < n_new[:, None], P + j[None, :], -1)
    mask = jnp.concatenate([piv_mask, causal_mask(positions, body_pos, cfg)], axis=-1)
    use_k = j[None, None, :] < frontier(i, kspec, kv)[..., None]  # [B,T,S] read the quantized copy
    use_v = j[None, None, :] < frontier(i, vspec, kv)[..., None]
    if impl == "reference":
        out = _reference(qg, pivot_k, pivot_v, kside, vside, kview, kbase, vview, vbase, use_k, use_v, mask)
        return out.astype(cd).reshape(B, T, N * H)

    # One softmax over [pivot P | body S | key window W+T]: every visible slot appears exactly once,
    # in the body when the query reads its quantized key, in the window otherwise. Only
    # window-sized gathers follow, never one over S.
    parts, masks = [s_piv, body_scores(qg, kside)], [piv_mask]
    masks.append(mask[..., P:] & use_k if kspec.quantized else mask[..., P:])
    if kspec.quantized:
        qk = frontier(i, kspec, kv)
        kslot = kbase[:, None] + jnp.arange(kview.shape[1])  # [B, Wk+T] slot of each window entry
        kwin_pos = jnp.where((kslot >= 0) & (kslot < n_new[:, None]), P + kslot, -1)
        parts.append(jnp.einsum("BTKGH,BWKH->BTKGW", qg, kview.astype(cd), preferred_element_type=_F32))
        masks.append(causal_mask(positions, kwin_pos, cfg) & (kslot[:, None, :] >= qk[..., None]))
    scores = jnp.concatenate(parts, axis=-1) * (1.0 / np.sqrt(H))
    scores = jnp.where(jnp.concatenate(masks, axis=-1)[:, :, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    p_piv, p_body, p_kwin = probs[..., :P], probs[..., P : P + S], probs[..., P + S :]

    def win_rows(side: QuantSide, slots):
        """Body rows of ``side`` at window slots [B, W] (clipped), dequantized float32 [B, W, K, H]."""
        idx = jnp.clip(slots, 0, S - 1)[:, None, :, None]

        def rows(a):  # [B, K, S, X] -> [B, W, K, X]
            return jnp.swapaxes(jnp.take_along_axis(a, idx, axis=2), 1, 2)

        if not side.spec.quantized:
            return rows(side.data).astype(_F32)
        codes = unpack_codes(rows(side.data), side.spec.bits)
        g = side.spec.group
        c = codes.reshape(*codes.shape[:-1], H // g, g)
        return dequantize(c, rows(side.scale)[..., None], rows(side.zero)[..., None]).reshape(codes.shape)

    def gather_last(x, idx, valid):
        """x[..., idx] for idx [B, W] (masked where not valid) -> [B, T, K, G, W]."""
        g = jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[-1] - 1)[:, None, None, None, :], axis=-1)
        return jnp.where(valid[:, None, None, None, :], g, 0.0)

    out = jnp.einsum("BTKGP,PKH->BTKGH", p_piv.astype(cd), pivot_v.astype(cd), preferred_element_type=_F32)
    if not vspec.quantized:
        out += body_values(p_body, vside, cd)
        if kspec.quantized:  # keys read from the window: their values from the full-precision body
            out += jnp.einsum("BTKGW,BWKH->BTKGH", p_kwin, win_rows(vside, kslot))
    else:
        qv = frontier(i, vspec, kv)
        # Quantized values (slot < qv): body slots, and key-window slots the value rule quantizes.
        out += body_values(jnp.where(use_v[:, :, None, None, :], p_body, 0.0), vside, cd)
        if kspec.quantized:
            p_kq = jnp.where((kslot[:, None, :] < qv[..., None])[:, :, None, None, :], p_kwin, 0.0)
            out += jnp.einsum("BTKGW,BWKH->BTKGH", p_kq, win_rows(vside, kslot))
        # Full-precision values (slot >= qv) from the value window, whichever part holds their probability.
        vslot = vbase[:, None] + jnp.arange(vview.shape[1])  # [B, Wv+T]
        p_vwin = gather_last(p_body, vslot, (vslot >= 0) & (vslot < S))
        if kspec.quantized:
            w = vslot - kbase[:, None]
            p_vwin += gather_last(p_kwin, w, (w >= 0) & (w < kview.shape[1]))
        fp = (vslot[:, None, :] >= qv[..., None]) & (vslot[:, None, :] < n_new[:, None, None])
        p_vwin = jnp.where(fp[:, :, None, None, :], p_vwin, 0.0)
        out += jnp.einsum(
            "BTKGW,BWKH->BTKGH", p_vwin.astype(cd), vview.astype(cd), preferred_element_type=_F32
        )
    return out.astype(cd).reshape(B, T, N * H)


def _decode_with_kernels(q, k, v, pivot_k, pivot_v, kside, vside, positions, n_old, n_new, kv):
    """:func:`attend_cached` for one decode token per sequence, through the Pallas kernels of
    ``jaxkv.kernels.kvdecode``: ``body_partials``' programs return the softmax partials (maximum,
    exponential sum, weighted values) of the body slots read quantized on both sides (``j < qk``);
    ``merge`` attends to the full-precision key window (``qk <= j < n_new``: the key ring and the
    new token, values quantized below ``qv``) and the pivot segment, combines all of it in one
    softmax, and writes the new token into the body (its value, and the key group it completes) and
    into the rings. (``qk <= qv`` always: the key frontier is the value frontier rounded down to a
    group.) Returns ``(out [B, 1, N*H], kside, vside)``."""
    from jaxkv.kernels import kvdecode

    B, T, N, H = q.shape
    P = pivot_k.shape[0]
    kspec, vspec = kside.spec, vside.spec
    cd = q.dtype
    i = positions - P
    qk, qv = frontier(i, kspec, kv)[:, 0], frontier(i, vspec, kv)[:, 0]  # [B]
    meta = jnp.stack([n_old, qk, qv, n_new], axis=1)
    heads = kvdecode.step_heads(q, k, v)
    interpret = jax.default_backend() != "gpu"
    bits = dict(kbits=kspec.bits, vbits=vspec.bits, group=kspec.group)
    sm_scale = float(np.float32(1.0 / np.sqrt(H)))
    dtype = jnp.float32 if cd == jnp.float32 else jnp.bfloat16  # the products' operands
    body = (kside.data, kside.scale, kside.zero, vside.data, vside.scale, vside.zero)
    chunks = kvdecode.chunks(B, kside.data.shape[1], kside.data.shape[2], kvdecode.gpu_cores())
    m, l, o = kvdecode.body_partials(
        heads, qk, *body, **bits, sm_scale=sm_scale, dtype=dtype, chunks=chunks, interpret=interpret
    )
    out, kring, vring, (kd, ks, kz, vd, vs, vz) = kvdecode.merge(
        heads, positions[:, 0], pivot_k, pivot_v, m, l, o, (kside.window, vside.window, meta, *body), **bits,
        sm_scale=sm_scale, out_dtype=cd, dtype=dtype, interpret=interpret,
    )  # fmt: skip
    kside = kside.replace(data=kd, scale=ks, zero=kz, window=kring)
    vside = vside.replace(data=vd, scale=vs, zero=vz, window=vring)
    return out.reshape(B, T, N * H), kside, vside


def full_precision_kernel_applies(q, cache_k, cfg: ModelConfig) -> bool:
    """True when one decode token per sequence over an unquantized cache layer takes
    ``jaxkv.kernels.fpdecode`` (:func:`decode_impl` is ``"kernel"``, no mesh, no sliding window,
    heads the kernel tiles, the cache in the model's dtype)."""
    from jaxkv.kernels import fpdecode

    B, T, N, H = q.shape
    return (
        T == 1
        and decode_impl() == "kernel"
        and jax.sharding.get_abstract_mesh().empty  # a Pallas call is not partitioned over a mesh
        and cfg.sliding_window is None
        and cache_k.dtype == q.dtype
        and fpdecode.supported(H, N // cache_k.shape[2])
    )


def decode_full_precision(q, k, v, pivot_k, pivot_v, cache_k, cache_v, positions, heads=None):
    """One decode token per sequence over an unquantized cache layer through
    ``jaxkv.kernels.fpdecode.attend`` (:func:`full_precision_kernel_applies`): q ``[B, 1, N, H]``,
    k/v ``[B, 1, K, H]`` after RoPE, pivot ``[P, K, H]``, the layer's body ``[B, S, K, H]``,
    positions ``[B, 1]``; ``heads``, when the caller has them, the same q, k and v as the one array
    ``[B, N+2K, H]`` the kernel reads (saves the launch that concatenates them). The slots are split
    over programs when the sequences' KV heads are fewer than the GPU's cores and the cache is long
    (``fpdecode.chunks``). Returns ``(out [B, 1, N*H], cache_k, cache_v)``, the token written at slot
    ``position - P``."""
    from jaxkv.kernels import fpdecode, kvdecode

    B, T, N, H = q.shape
    S, K = cache_k.shape[1], cache_k.shape[2]
    out, cache_k, cache_v = fpdecode.attend(
        kvdecode.step_heads(q, k, v) if heads is None else heads, positions[:, 0], pivot_k, pivot_v, cache_k, cache_v,
        sm_scale=float(np.float32(1.0 / np.sqrt(H))), dtype=q.dtype, chunks=fpdecode.chunks(B, K, S, kvdecode.gpu_cores()),
        interpret=jax.default_backend() != "gpu",
    )  # fmt: skip
    return out.reshape(B, T, N * H), cache_k, cache_v


def _slots_fp(view, base, S):
    """Window [B, W+T, K, H] -> slot-indexed [B, S, K, H] float32 (junk outside the window)."""
    idx = jnp.clip(jnp.arange(S)[None, :] - base[:, None], 0, view.shape[1] - 1)
    return jnp.take_along_axis(view, idx[:, :, None, None], axis=1).astype(_F32)


def _reference(qg, pivot_k, pivot_v, kside, vside, kview, kbase, vview, vbase, use_k, use_v, mask):
    """Dequantize-then-attend: every query's keys and values built explicitly, all in float32."""
    B, T, K, G, H = qg.shape
    P = pivot_k.shape[0]
    S = kside.data.shape[2]

    def per_query(side, view, base, use):
        deq = jnp.swapaxes(dequantize_body(side), 1, 2)  # [B, S, K, H]
        if not side.spec.quantized:
            return jnp.broadcast_to(deq[:, None], (B, T, S, K, H))
        return jnp.where(use[..., None, None], deq[:, None], _slots_fp(view, base, S)[:, None])

    keys = jnp.concatenate(
        [jnp.broadcast_to(pivot_k.astype(_F32), (B, T, P, K, H)), per_query(kside, kview, kbase, use_k)],
        axis=2,
    )
    values = jnp.concatenate(
        [jnp.broadcast_to(pivot_v.astype(_F32), (B, T, P, K, H)), per_query(vside, vview, vbase, use_v)],
        axis=2,
    )
    scores = jnp.einsum("BTKGH,BTSKH->BTKGS", qg.astype(_F32), keys) * (1.0 / np.sqrt(H))
    scores = jnp.where(mask[:, :, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("BTKGS,BTSKH->BTKGH", probs, values)


# ----------------------------------------------------------------------------------------------
# Cache-free attention with the same quantization (perplexity)


def attend_fake_quant(
    q, k, v, positions, cfg: ModelConfig, kv: KVQuantConfig, kspec: SideSpec, vspec: SideSpec, pivot_len: int,
    kclip=None, vclip=None,
) -> jax.Array:  # fmt: skip
    """Causal attention over the T tokens themselves where each (query i, key j) pair reads the copy
    a cache would hand it: quantized iff ``j < frontier(i)`` (``jaxkv.kvcache``), else full precision.

    ``positions`` must be ``0..T-1`` in every row (the perplexity protocol); the first ``pivot_len``
    positions play the pivot segment and are never quantized. Since quantized values depend only on
    the token (per-token groups) or on its complete group of slots (per-channel keys), and the rule
    only on (i, j), this equals decoding the sequence through a quantized cache whose pivot holds
    the first ``pivot_len`` tokens' full-precision K/V, however the tokens are fed (up to float
    rounding). ``kclip``/``vclip``: clip logits ``[K, C, 2]`` of ``jaxkv.wkvquant`` (per-token sides).
    Returns [B, T, N*H].
    """
    B, T, N, H = q.shape
    K, G = cfg.num_kv_heads, cfg.group_size
    cd = q.dtype
    qg = q.reshape(B, T, K, G, H)
    body = positions - pivot_len  # body slot of every token, negative in the pivot

    def quantized_pairs(spec):
        read_q = body[:, None, :] < frontier(body, spec, kv)[..., None]
        return read_q & (body[:, None, :] >= 0) & (body[:, :, None] >= 0)  # [B, T(query), T(key)]

    scores = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k, preferred_element_type=_F32)
    if kspec.quantized:
        kq = fake_quantize_sequence(k, kspec, pivot_len, clip_factors(kclip)).astype(cd)
        s_q = jnp.einsum("BTKGH,BSKH->BTKGS", qg, kq, preferred_element_type=_F32)
        scores = jnp.where(quantized_pairs(kspec)[:, :, None, None, :], s_q, scores)
    scores = scores * (1.0 / np.sqrt(H))
    scores = jnp.where(causal_mask(positions, positions, cfg)[:, :, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    if vspec.quantized:
        use_v = quantized_pairs(vspec)[:, :, None, None, :]
        vq = fake_quantize_sequence(v, vspec, pivot_len, clip_factors(vclip)).astype(cd)
        out = jnp.einsum(
            "BTKGS,BSKH->BTKGH", jnp.where(use_v, 0.0, probs).astype(cd), v, preferred_element_type=_F32
        ) + jnp.einsum(
            "BTKGS,BSKH->BTKGH", jnp.where(use_v, probs, 0.0).astype(cd), vq, preferred_element_type=_F32
        )
    else:
        out = jnp.einsum("BTKGS,BSKH->BTKGH", probs.astype(cd), v, preferred_element_type=_F32)
    return out.astype(cd).reshape(B, T, N * H)


# ----------------------------------------------------------------------------------------------
# Channel smoothing (jaxkv.wkvquant), folded into the attention


def attend_smoothed(attend, q, k, v, pivot, kw: dict | None, vw: dict | None):
    """``attend(q, k, v, pivot)`` over smoothed K/V ``x~ = (x - shift) / scale`` (per KV head and channel)
    such that the result is attention over the unsmoothed (dequantized) K/V, without forming them.

    Keys: ``q·k = (q * scale)·k~ + q·shift``; the last term is the same for every key of a query
    (pivot, quantized body and full-precision window alike, all smoothed here), so the softmax drops
    it. Values: ``sum_j p_j v_j = (sum_j p_j v~_j) * scale + shift`` since the probabilities sum to 1.
    ``pivot`` is ``(pivot_k, pivot_v)`` ``[P, K, H]`` or None; ``kw``/``vw`` ``{"scale", "shift", ...}``
    ``[K, H]`` or None (that side unsmoothed). ``attend`` returns ``(out [B, T, N*H], extra)``; so does
    this. With scale 1 and shift 0 every operation is exact: the result equals ``attend`` bit for bit.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    pk, pv = pivot if pivot is not None else (None, None)
    if kw is not None:
        s, d = kw["scale"].astype(_F32), kw["shift"].astype(_F32)
        q = (q.reshape(B, T, K, N // K, H) * s[:, None]).astype(q.dtype).reshape(B, T, N, H)
        k = ((k - d) / s).astype(k.dtype)
        pk = None if pk is None else ((pk - d) / s).astype(pk.dtype)
    if vw is not None:
        s, d = vw["scale"].astype(_F32), vw["shift"].astype(_F32)
        v = ((v - d) / s).astype(v.dtype)
        pv = None if pv is None else ((pv - d) / s).astype(pv.dtype)
    out, extra = attend(q, k, v, None if pivot is None else (pk, pv))
    if vw is not None:
        o = (
            out.reshape(B, T, K, N // K, H) * vw["scale"].astype(_F32)[:, None]
            + vw["shift"].astype(_F32)[:, None]
        )
        out = o.astype(out.dtype).reshape(B, T, N * H)
    return out, extra
