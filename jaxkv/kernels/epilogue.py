"""The decode step's split-K epilogues: what follows each batch-1 int4 matmul (RoPE, the residual add
and the next norm's inputs, SiLU), run on the matmul's float32 partial sums.

Why: at batch 1 the quantized matmul splits every product along its inputs and leaves float32
partial sums. XLA added them in a launch of its own and ran the next operation in one or two more
(12 launches a layer, 7 of them such ops, 1.4-4.5 us each on an H100). Each body here (a "tail")
does the split sum and the next operation at once, in a launch of its own after the matmul
(:func:`launch`, 4 warps a tail block): 9 launches a layer. Run 72 (H200): the step 2.111 -> 2.064
ms/token; run 74 (H100): 2.214 against 2.341 before (run 70).

The tails also ran inside the matmul's launch (the last program of each column block, told by an
atomic counter, summing the block's partials): a layer was then its four matmuls and its attention,
5 launches, but the step was slower, 2.322 against 2.209 ms/token (H100, run 73): every program
waited on its stores' release and the counter's round trip before it exited, which costs a kernel
bound by its loads in flight more than the launches saved. Removed (commit 44bfb5d has it).

Conventions
-----------
* One row (batch-1 decode). ``partials [S, Mp, O]`` float32: ``S`` splits of the input dimension
  (row 0 is the product; rows past it are padding); their sum is ``x @ w`` before the norm's row
  scale. A tail block is a block of the matmul's output columns (``block_n``): a head of Q/K/V, a
  block of the O or down projection's output; for gate/up (gate columns first) block ``j`` of the
  gate and block ``j`` of the up columns together.
* A norm moved past its matmul (``jaxkv.model.norm_dense``): the matmul reads ``norm_weight * x`` and
  the row's ``1/rms = rsqrt(sum(sumsq) / D + eps)`` multiplies the summed product here, in float32.
  ``sumsq [n, 1]`` float32 are partial sums of squares of the norm's input row (``n`` any count: one
  from XLA at a block's start, one per column block from :func:`residual_norm`).
* Everything runs in float32 and rounds once to the output dtype (XLA's unfused order rounds the
  product to bf16 first, then RoPE's or SiLU's result again: the errors are of the same size).
* Splits are summed in power-of-two chunks of at most ``_CHUNK``, every chunk's loads issued
  together, so loads need neither masks nor padded copies.
* Each public function takes the matmul's input row and weight (a QArray or ``LayerOf``) and
  returns the tail's outputs. GPU only (Triton lowering); with ``interpret=True`` (:func:`launch`)
  Pallas' interpreter runs the same bodies anywhere (tests). :func:`applies` says whether a model's
  shapes fit.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_CHUNK = 32  # splits per load: [32, 128] float32 over 4 warps is 32 registers a thread
# output columns per tail block of residual_norm and silu_mul (at most); more, smaller programs were
# no faster (H100 run 75: residual_norm in blocks of 32 or 16, silu_mul in blocks of 64)
COLUMNS = 128
WARPS = 4  # warps per program (:func:`launch`)


def columns(n: int, most: int = COLUMNS) -> int | None:
    """The largest power of two <= ``most`` dividing ``n`` (at least 16), else None."""
    b = most
    while b >= 16:
        if n % b == 0:
            return b
        b //= 2
    return None


def applies(rows: int, hidden: int, intermediate: int, head_dim: int) -> bool:
    """Whether the epilogues take a block of these sizes: one row (batch-1 decode; at 8 rows the
    Llama-2-7B step with a K4V2 cache was 1.6% slower with separate epilogue launches, H200 run 72),
    power-of-two column blocks of at least 16 tiling the hidden and intermediate sizes, a power-of-two
    head of at least 32 (a tail block of Q/K/V is one head)."""
    return (
        rows == 1
        and columns(hidden) is not None
        and columns(intermediate) is not None
        and head_dim >= 32
        and head_dim & (head_dim - 1) == 0
    )


def _sum_splits(ref, index: tuple) -> jax.Array:
    """``sum(ref[:, *index], axis=0)`` in float32, in power-of-two chunks of at most ``_CHUNK``
    splits, unrolled (module docstring)."""
    n = ref.shape[0]
    total, start = None, 0
    while start < n:
        size = min(_CHUNK, 1 << ((n - start).bit_length() - 1))
        part = jnp.sum(ref[(pl.ds(start, size), *index)], axis=0)
        total = part if total is None else total + part
        start += size
    return total


def _inv_rms(sumsq_ref, hidden: int, eps: float) -> jax.Array:
    """The row's ``1/rms`` from its partial sums of squares ``sumsq [n, 1]`` (an earlier launch's),
    loaded in power-of-two chunks: Triton's blocks are powers of two, and ``n`` need not be (9 for
    SmolLM2-135M's 576 = 9 x 64)."""
    ss = _sum_splits(sumsq_ref, (pl.ds(0, 1),))  # [1]
    return jax.lax.rsqrt(ss * (1.0 / hidden) + eps)


@dataclasses.dataclass(frozen=True)
class ResidualNorm:
    """Tail of the O and down projections: ``x + y``, ``norm_weight * (x + y)`` and the block's sum
    of squares of ``x + y``."""

    name: ClassVar[str] = "residual_norm"
    block_n: int
    blocks: int

    def __call__(self, j, p_ref, x_ref, w_ref, xo_ref, gx_ref, ss_ref):
        cols = pl.ds(pl.multiple_of(j * self.block_n, self.block_n), self.block_n)
        y = _sum_splits(p_ref, (0, cols))
        x = (x_ref[0, cols].astype(jnp.float32) + y).astype(xo_ref.dtype)
        xo_ref[0, cols] = x
        x32 = x.astype(jnp.float32)  # the norm sees the stored (rounded) stream, as XLA's norm does
        gx_ref[0, cols] = (w_ref[cols].astype(jnp.float32) * x32).astype(gx_ref.dtype)
        ss_ref[pl.ds(j, 1), pl.ds(0, 1)] = jnp.sum(x32 * x32).reshape(1, 1)


@dataclasses.dataclass(frozen=True)
class QkvRope:
    """Tail of the fused Q/K/V projection, one head a block: the norm's ``1/rms``, the biases,
    rotate-half RoPE on query and key heads."""

    name: ClassVar[str] = "qkv_rope"
    block_n: int  # the head size
    blocks: int  # N + 2K heads
    heads: int
    kv_heads: int
    hidden: int
    eps: float

    def __call__(self, h, p_ref, ss_ref, cos_ref, sin_ref, *refs):
        *b_refs, o_ref = refs  # the query, key and value biases, when the model has them
        H = self.block_n
        half = H // 2
        base = pl.multiple_of(h * H, H)
        r = _inv_rms(ss_ref, self.hidden, self.eps)
        y1 = _sum_splits(p_ref, (0, pl.ds(base, half))) * r
        y2 = _sum_splits(p_ref, (0, pl.ds(base + half, half))) * r
        if b_refs:

            def bias(start):
                """This head's bias from ``start`` on: each side read at its row clamped into range
                (no branches), the head's side selected."""
                firsts = (0, self.heads, self.heads + self.kv_heads)
                bq, bk, bv = (
                    ref[pl.ds(jnp.clip(h - f, 0, ref.shape[0] // H - 1) * H + start, half)]
                    for f, ref in zip(firsts, b_refs, strict=True)
                )
                b = jnp.where(h < self.heads, bq, jnp.where(h < self.heads + self.kv_heads, bk, bv))
                return b.astype(jnp.float32)

            y1, y2 = y1 + bias(0), y2 + bias(half)
        # rotate-half RoPE (Hugging Face layout) on query and key heads; value heads pass
        cos, sin = cos_ref[...], sin_ref[...]
        rotate = h < self.heads + self.kv_heads
        o_ref[0, h, pl.ds(0, half)] = jnp.where(rotate, y1 * cos - y2 * sin, y1).astype(o_ref.dtype)
        o_ref[0, h, pl.ds(half, half)] = jnp.where(rotate, y2 * cos + y1 * sin, y2).astype(o_ref.dtype)


@dataclasses.dataclass(frozen=True)
class SiluMul:
    """Tail of the fused gate/up projection: the norm's ``1/rms`` and ``SiLU(gate) * up`` of a block
    of gate columns and the same block of up columns."""

    name: ClassVar[str] = "silu_mul"
    block_n: int
    blocks: int  # F / block_n
    hidden: int
    eps: float

    def __call__(self, j, p_ref, ss_ref, h_ref):
        start = pl.multiple_of(j * self.block_n, self.block_n)
        ffn = self.blocks * self.block_n
        r = _inv_rms(ss_ref, self.hidden, self.eps)
        gate = _sum_splits(p_ref, (0, pl.ds(start, self.block_n))) * r
        up = _sum_splits(p_ref, (0, pl.ds(ffn + start, self.block_n))) * r
        h_ref[0, pl.ds(start, self.block_n)] = (gate / (1.0 + jnp.exp(-gate)) * up).astype(h_ref.dtype)


def launch(
    tail, partials: jax.Array, inputs: tuple, out: tuple, *, warps: int = WARPS, interpret: bool = False
) -> tuple:
    """``tail`` over a matmul's float32 partial sums ``[S, Mp, O]`` (``qmatmul(..., partials=True)``)
    in a launch of its own: a program of ``warps`` warps per tail block. Returns the outputs, shaped
    as ``out``."""
    full = pl.BlockSpec(memory_space=None)
    return tuple(
        pl.pallas_call(
            lambda *refs: tail(pl.program_id(0), *refs),
            grid=(tail.blocks,),
            in_specs=[full] * (1 + len(inputs)),
            out_specs=[full] * len(out),
            out_shape=list(out),
            compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
            interpret=interpret,
            name=f"epilogue_{tail.name}",
        )(partials, *inputs)
    )


def _after(x, w, tail, inputs, out) -> tuple:
    """``tail`` over the split-K partial sums of ``x @ w`` (``qarray.matmul_partials``), in a launch
    of its own."""
    from jaxkv.quant import qarray

    return launch(tail, qarray.matmul_partials(x, w), tuple(inputs), tuple(out))


def residual_norm(h: jax.Array, w, x: jax.Array, norm_weight: jax.Array):
    """``x + h @ w`` (the residual add after the O or down projection) and the next RMSNorm's inputs,
    as one tail in a launch after the matmul's.

    ``h [1, I]`` the matmul's input row, ``x [1, D]`` the residual stream. Returns ``(x_new,
    norm_weight * x_new, sumsq)``: ``x_new`` and the product (the next matmul's input
    under ``jaxkv.model.norm_dense``) in ``x.dtype``, ``sumsq [D/block, 1]`` float32 the partial
    sums of squares of ``x_new`` (for its ``1/rms``)."""
    D = x.shape[-1]
    block = columns(D)
    tail = ResidualNorm(block_n=block, blocks=D // block)
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((D // block, 1), jnp.float32),
    )
    return _after(h, w, tail, (x, norm_weight), out)


def qkv_rope(
    gx: jax.Array,
    w,
    sumsq: jax.Array,
    position: jax.Array,
    inv_freq: jax.Array,
    biases: tuple | None,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    eps: float,
):
    """The token's query, key and value heads from the fused Q/K/V matmul of ``gx [1, D]`` (the
    attention norm's weight times its input row), as one tail in a launch after the matmul's: the split
    sum, the norm's ``1/rms`` (``sumsq [n, 1]`` of the row), the projections' biases (``(bq [N*H],
    bk [K*H], bv [K*H])`` or None) and rotate-half RoPE (Hugging Face layout) on queries and keys at ``position``
    (int32 scalar) with ``inv_freq [H/2]`` float32 (``jaxkv.model.rope_inv_freq``; its cosines and
    sines come from XLA, the same expression for every layer of a step, which XLA computes once, so
    the kernel does no trigonometry). Returns the heads ``[1, N+2K, H]`` in
    ``gx.dtype``, queries first, then keys, then values: the layout the decode attention kernels read
    (``jaxkv.kernels.kvdecode.step_heads``)."""
    N, K, H = heads, kv_heads, head_dim
    tail = QkvRope(block_n=H, blocks=N + 2 * K, heads=N, kv_heads=K, hidden=gx.shape[-1], eps=eps)
    angles = position.astype(jnp.float32) * inv_freq
    inputs = (sumsq, jnp.cos(angles), jnp.sin(angles), *(biases or ()))
    out = (jax.ShapeDtypeStruct((1, N + 2 * K, H), gx.dtype),)
    (q_k_v,) = _after(gx, w, tail, inputs, out)
    return q_k_v


def silu_mul(gx: jax.Array, w, sumsq: jax.Array, *, eps: float):
    """``SiLU(gate) * up`` from the fused gate/up matmul of ``gx [1, D]`` (the MLP norm's weight times
    its input row; gate columns first), as one tail in a launch after the matmul's: the split sum, the
    norm's ``1/rms`` (``sumsq [n, 1]`` of the row) and the product. Returns ``[1, F]`` in ``gx.dtype``."""
    ffn = w.shape[-1] // 2
    block = columns(ffn)
    tail = SiluMul(block_n=block, blocks=ffn // block, hidden=gx.shape[-1], eps=eps)
    (h,) = _after(gx, w, tail, (sumsq,), (jax.ShapeDtypeStruct((1, ffn), gx.dtype),))
    return h
