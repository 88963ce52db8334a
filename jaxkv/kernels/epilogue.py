"""The decode step's split-K epilogues: one Pallas (Triton) launch adds the int4 kernel's partial sums
and does what the block does next with them.

Why: at batch 1 the quantized matmul (``jaxkv.kernels.qmatmul``) splits every product along its
inputs and leaves float32 partial sums; XLA added them in a launch of its own and then ran the next
operation (RoPE, the residual add and the next norm's sum of squares, SiLU) in one or two more. Each
launch costs 1.4-4.5 us on an H100 whatever it does (README, issue 7: 12 launches a layer, 7 of them
such XLA ops). Here each matmul's sum and its consumer share one launch.

Conventions
-----------
* ``partials [S, Mp, O]`` float32 as ``qmatmul(..., partials=True)`` returns them: ``S`` splits of
  the input dimension, rows ``r < M`` used (``Mp >= M``; the others are padding). Their sum is the
  product ``x @ w`` before the norm's row scale.
* A norm moved past its matmul (``jaxkv.model.norm_dense``): the matmul read ``norm_weight * x`` and
  the row's ``1/rms = rsqrt(sum(sumsq) / D + eps)`` multiplies the summed product here, in float32.
  ``sumsq [n, M]`` float32 are partial sums of squares of the norm's input row ``x`` (``n`` any
  count: one from XLA at a block's start, one per column block from :func:`residual_norm`).
* Everything runs in float32 and rounds once to the output dtype (XLA's unfused order rounds the
  product to bf16 first, then RoPE's or SiLU's result again: the errors are of the same size).
* Splits are summed in power-of-two chunks of at most ``_CHUNK`` (86 = 32 + 32 + 16 + 4 + 2), so
  loads need neither masks nor padded copies; all chunks are independent loads, issued together.
* GPU only (Triton lowering); ``interpret=True`` runs the same kernel bodies anywhere (tests).
  :func:`applies` says whether a model's shapes fit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_CHUNK = 32  # splits per load: a [32, 128] float32 tile is 32 registers a thread at 4 warps
COLUMNS = 128  # output columns per program of residual_norm and silu_mul (at most)
WARPS = 4


def _columns(n: int, most: int = COLUMNS) -> int | None:
    """The largest power of two <= ``most`` dividing ``n`` (at least 16), else None."""
    b = most
    while b >= 16:
        if n % b == 0:
            return b
        b //= 2
    return None


def applies(rows: int, hidden: int, intermediate: int, head_dim: int) -> bool:
    """Whether the epilogues take a block of these sizes: one row (batch-1 decode; at 8 rows the
    Llama-2-7B step with a K4V2 cache was 1.6% slower with them, H200 run 72), power-of-two column
    blocks of at least 16 tiling the hidden and intermediate sizes, a power-of-two half head."""
    half = head_dim // 2
    return (
        rows == 1
        and _columns(hidden) is not None
        and _columns(intermediate) is not None
        and half >= 16
        and half & (half - 1) == 0
    )


def _sum_splits(ref, n: int, index: tuple) -> jax.Array:
    """``sum(ref[:n, *index], axis=0)`` in float32, loaded in power-of-two chunks (module docstring)."""
    total, start = None, 0
    while start < n:
        size = min(_CHUNK, 1 << ((n - start).bit_length() - 1))
        part = jnp.sum(ref[(pl.ds(start, size), *index)].astype(jnp.float32), axis=0)
        total = part if total is None else total + part
        start += size
    return total


def _inv_rms(sumsq_ref, row, hidden: int, eps: float) -> jax.Array:
    """The row's ``1/rms`` from its partial sums of squares ``sumsq [n, M]``."""
    ss = _sum_splits(sumsq_ref, sumsq_ref.shape[0], (pl.ds(row, 1),))  # [1]
    return jax.lax.rsqrt(ss * (1.0 / hidden) + eps)


def _call(kernel, grid, inputs, out_shape, warps, name, interpret):
    full = pl.BlockSpec(memory_space=None)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[full] * len(inputs),
        out_specs=[full] * len(out_shape),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*inputs)


def _residual_norm_kernel(x_ref, p_ref, w_ref, xo_ref, gx_ref, ss_ref, *, block):
    row, j = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(j * block, block), block)
    y = _sum_splits(p_ref, p_ref.shape[0], (row, cols))
    x = (x_ref[row, cols].astype(jnp.float32) + y).astype(xo_ref.dtype)
    xo_ref[row, cols] = x
    x32 = x.astype(jnp.float32)
    gx_ref[row, cols] = (w_ref[cols].astype(jnp.float32) * x32).astype(gx_ref.dtype)
    ss_ref[pl.ds(j, 1), pl.ds(row, 1)] = jnp.sum(x32 * x32).reshape(1, 1)


@functools.partial(jax.jit, static_argnames=("columns", "warps", "interpret"))
def residual_norm(
    x: jax.Array,
    partials: jax.Array,
    norm_weight: jax.Array,
    *,
    columns: int = COLUMNS,
    warps: int = WARPS,
    interpret: bool = False,
):
    """The residual add after a matmul, and the next RMSNorm's inputs, in one launch.

    ``x [M, D]`` the residual stream, ``partials [S, Mp, D]`` the matmul's; returns ``x_new = x +
    sum(partials)`` (in ``x.dtype``), ``norm_weight * x_new`` (the next matmul's input under
    ``jaxkv.model.norm_dense``) and ``x_new``'s partial sums of squares ``[D/block, M]`` float32
    (for its ``1/rms``). ``columns``: output columns per program, at most (a power of two).
    """
    M, D = x.shape
    block = _columns(D, columns)
    out_shape = [
        jax.ShapeDtypeStruct((M, D), x.dtype),
        jax.ShapeDtypeStruct((M, D), x.dtype),
        jax.ShapeDtypeStruct((D // block, M), jnp.float32),
    ]
    kernel = functools.partial(_residual_norm_kernel, block=block)
    inputs = (x, partials, norm_weight)
    return _call(kernel, (M, D // block), inputs, out_shape, warps, "epilogue_residual_norm", interpret)


def _qkv_rope_kernel(p_ref, ss_ref, pos_ref, freq_ref, *refs, heads, kv_heads, head_dim, hidden, eps):
    *b_refs, o_ref = refs  # the query, key and value biases, when the model has them
    row, h = pl.program_id(0), pl.program_id(1)
    half = head_dim // 2
    base = pl.multiple_of(h * head_dim, head_dim)
    r = _inv_rms(ss_ref, row, hidden, eps)
    y1 = _sum_splits(p_ref, p_ref.shape[0], (row, pl.ds(base, half))) * r
    y2 = _sum_splits(p_ref, p_ref.shape[0], (row, pl.ds(base + half, half))) * r
    if b_refs:

        def bias(start):
            """This head's bias from ``start`` on: each side read at its row clamped into range
            (no branches), the head's side selected."""
            firsts = (0, heads, heads + kv_heads)
            bq, bk, bv = (
                ref[pl.ds(jnp.clip(h - f, 0, ref.shape[0] // head_dim - 1) * head_dim + start, half)]
                for f, ref in zip(firsts, b_refs, strict=True)
            )
            b = jnp.where(h < heads, bq, jnp.where(h < heads + kv_heads, bk, bv))
            return b.astype(jnp.float32)

        y1, y2 = y1 + bias(0), y2 + bias(half)
    # rotate-half RoPE (Hugging Face layout) on query and key heads; value heads pass
    angles = pos_ref[row].astype(jnp.float32) * freq_ref[...]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rotate = h < heads + kv_heads
    o_ref[row, h, pl.ds(0, half)] = jnp.where(rotate, y1 * cos - y2 * sin, y1).astype(o_ref.dtype)
    o_ref[row, h, pl.ds(half, half)] = jnp.where(rotate, y2 * cos + y1 * sin, y2).astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("heads", "kv_heads", "head_dim", "hidden", "eps", "dtype", "warps", "interpret")
)  # fmt: skip
def qkv_rope(
    partials: jax.Array,
    sumsq: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    biases: tuple | None,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    eps: float,
    dtype,
    warps: int = WARPS,
    interpret: bool = False,
) -> jax.Array:
    """The token's query, key and value heads from the fused Q/K/V matmul's partials
    ``[S, Mp, (N+2K)H]``, in one launch: the split sum, the attention norm's ``1/rms``
    (``sumsq [n, M]`` of a row of width ``hidden``), the projections' biases (``(bq [N*H], bk [K*H],
    bv [K*H])`` or None) and rotate-half RoPE (Hugging Face layout) on queries and keys at ``positions [M]`` (int32)
    with ``inv_freq [H/2]`` float32 (``jaxkv.model.rope_inv_freq``). Returns ``[M, N+2K, H]`` in
    ``dtype``, queries first, then keys, then values: the layout the decode attention kernels read
    (``jaxkv.kernels.kvdecode.step_heads``). One program per row and head."""
    M = sumsq.shape[1]
    N, K, H = heads, kv_heads, head_dim
    kernel = functools.partial(_qkv_rope_kernel, heads=N, kv_heads=K, head_dim=H, hidden=hidden, eps=eps)
    inputs = (partials, sumsq, positions, inv_freq, *(biases or ()))
    out_shape = [jax.ShapeDtypeStruct((M, N + 2 * K, H), dtype)]
    (out,) = _call(kernel, (M, N + 2 * K), inputs, out_shape, warps, "epilogue_qkv_rope", interpret)
    return out


def _silu_mul_kernel(p_ref, ss_ref, h_ref, *, block, ffn, hidden, eps):
    row, j = pl.program_id(0), pl.program_id(1)
    start = pl.multiple_of(j * block, block)
    r = _inv_rms(ss_ref, row, hidden, eps)
    gate = _sum_splits(p_ref, p_ref.shape[0], (row, pl.ds(start, block))) * r
    up = _sum_splits(p_ref, p_ref.shape[0], (row, pl.ds(ffn + start, block))) * r
    h_ref[row, pl.ds(start, block)] = (gate / (1.0 + jnp.exp(-gate)) * up).astype(h_ref.dtype)


@functools.partial(jax.jit, static_argnames=("hidden", "eps", "dtype", "columns", "warps", "interpret"))
def silu_mul(
    partials: jax.Array,
    sumsq: jax.Array,
    *,
    hidden: int,
    eps: float,
    dtype,
    columns: int = COLUMNS,
    warps: int = WARPS,
    interpret: bool = False,
) -> jax.Array:
    """``SiLU(gate) * up`` from the fused gate/up matmul's partials ``[S, Mp, 2F]`` (gate columns
    first), in one launch: the split sum, the MLP norm's ``1/rms`` (``sumsq [n, M]`` of a row of
    width ``hidden``) and the product. Returns ``[M, F]`` in ``dtype``; ``columns`` as in
    :func:`residual_norm`."""
    M = sumsq.shape[1]
    ffn = partials.shape[2] // 2
    block = _columns(ffn, columns)
    kernel = functools.partial(_silu_mul_kernel, block=block, ffn=ffn, hidden=hidden, eps=eps)
    out_shape = [jax.ShapeDtypeStruct((M, ffn), dtype)]
    (h,) = _call(
        kernel, (M, ffn // block), (partials, sumsq), out_shape, warps, "epilogue_silu_mul", interpret
    )
    return h
