"""A Mosaic GPU (Hopper) kernel for decode's int4 weight-only matmul: a candidate, timed and not wired in.

Why: the one-row Triton kernel (``jaxkv.kernels.qmatmul``) spends about 3.2 instructions a weight
on FMAs and byte permutes and waits on its own loads; it reads 1.4-2.0 TB/s where bf16 reads 2.9
(README, issue 7). This kernel moves the weights with the TMA engine through a pipeline of
``stages`` shared-memory buffers (no registers held by loads in flight) and lets the tensor cores do
the products, with the weight on the left so one row of ``x`` fills a 16-column operand:

    y^T [O, N] = sum over groups g of (w_g^T * scale_g + offset_g) @ x_g^T

Conventions
-----------
* ``wt [O, I]`` ``jnp.int4``: the codes minus 8 (:func:`pack_weight`), two per byte along the
  inputs as XLA packs int4. ``xt [I, N]`` bf16, ``x`` transposed and padded to ``N = 16`` columns.
  ``scale_t``, ``offset_t`` ``[I/group, O]`` bf16, ``offset = (8 - zero) * scale``, so
  ``(c - zero) * scale = (c - 8) * scale + offset``.
* Each step converts a ``[block_o, group]`` tile of codes to bf16 in registers, applies its scale
  and offset there (one multiply-add per weight, rounded to bf16 as XLA's dequantize-then-matmul
  rounds) and feeds it to wgmma as the left operand. A grid of ``O/block_o x split`` programs; each
  sums ``I/group/split`` groups into a float32 accumulator and writes ``[split, O, N]`` partial sums.
* Not wired into ``jaxkv.quant.qarray.einsum``: on an H100 its one-row step was slower than the
  Triton kernel's (README, issue 7: 3.225 against 2.47 ms/token for Llama-2-7B, run 62).
  ``scripts/qmatmul_candidates.py --mosaic-own`` times it beside the Triton kernel. On a CPU it
  lowers for CUDA, and Mosaic GPU's interpreter runs it with the left operand staged through shared
  memory (``a_in_smem``; the interpreter's wgmma reads that operand from shared memory only): the
  tests check both.
* Every tile the TMA engine writes to shared memory is 128 bytes or more (16-bit scales and offsets
  of at least 64 outputs): a 64-byte tile (uint8 zero points of 64 outputs) misaligned the pipeline's
  buffers on the H100 (``CUDA_ERROR_MISALIGNED_ADDRESS``, run 62).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_O = 64  # outputs per program by default: one wgmma M tile (``block_o``: 64, 128 or 256)
COLS = 16  # columns of x^T: rows of x padded (one warpgroup's N)


def pack_weight(codes: jax.Array, scale: jax.Array, zero: jax.Array):
    """``(wt, scale_t, offset_t)`` for :func:`gemv` from uint8 ``codes [I, O]`` (0-15),
    ``scale``/``zero`` ``[I/group, O]`` (module docstring)."""
    wt = (codes.T.astype(jnp.int8) - 8).astype(jnp.int4)
    s = scale.astype(jnp.float32)
    return wt, s.astype(jnp.bfloat16), ((8.0 - zero.astype(jnp.float32)) * s).astype(jnp.bfloat16)


def gemv(
    wt: jax.Array,
    xt: jax.Array,
    scale_t: jax.Array,
    offset_t: jax.Array,
    *,
    split: int,
    stages: int = 4,
    block_o: int = BLOCK_O,
    interpret=None,
    a_in_smem: bool = False,
) -> jax.Array:
    """``[split, O, N]`` float32 partial sums of ``y^T`` (module docstring); their sum over the first
    axis is ``(x @ w)^T``."""
    O, I = wt.shape
    N = xt.shape[1]
    groups = scale_t.shape[0]
    group = I // groups
    if block_o not in (64, 128, 256) or O % block_o or groups % split or xt.shape[0] != I or N != COLS:
        raise ValueError(
            f"mgpu_gemv: w^T {wt.shape}, x^T {xt.shape}, {groups} groups, split {split}, block_o {block_o}"
        )
    steps = groups // split
    wsw = plgpu.find_swizzle(group * 4, "lhs")
    xsw = plgpu.find_swizzle(N * 16, "rhs")
    w_tiles = (plgpu.TilingTransform((8, wsw * 8 // 4)), plgpu.SwizzleTransform(wsw))
    x_tiles = (plgpu.TilingTransform((8, xsw * 8 // 16)), plgpu.SwizzleTransform(xsw))

    def body(w_gmem, x_gmem, s_gmem, b_gmem, o_gmem):
        mi, ki = lax.axis_index("o"), lax.axis_index("k")

        def accumulate(acc_ref, a_smem):
            def step(_, w_smem, x_smem, s_smem, b_smem):
                w = w_smem[...].astype(jnp.bfloat16)
                w = w * lax.broadcast_in_dim(s_smem[0], w.shape, [0]) + lax.broadcast_in_dim(
                    b_smem[0], w.shape, [0]
                )
                if a_smem is None:
                    plgpu.wgmma(acc_ref, w, x_smem)
                else:
                    a_smem[...] = w
                    plgpu.commit_smem()
                    plgpu.wgmma(acc_ref, a_smem, x_smem)
                plgpu.wgmma_wait(0)

            first = ki * steps
            plgpu.emit_pipeline(
                step,
                grid=(steps,),
                in_specs=[
                    plgpu.BlockSpec((block_o, group), lambda k: (mi, first + k), transforms=w_tiles),
                    plgpu.BlockSpec((group, N), lambda k: (first + k, 0), transforms=x_tiles),
                    plgpu.BlockSpec((1, block_o), lambda k: (first + k, mi)),
                    plgpu.BlockSpec((1, block_o), lambda k: (first + k, mi)),
                ],
                max_concurrent_steps=stages,
            )(w_gmem, x_gmem, s_gmem, b_gmem)
            return acc_ref[...]

        acc_type = plgpu.ACC((block_o, N))
        if a_in_smem:
            asw = plgpu.find_swizzle(group * 16, "lhs")
            a_type = plgpu.SMEM(
                (block_o, group),
                jnp.bfloat16,
                transforms=(plgpu.TilingTransform((8, asw * 8 // 16)), plgpu.SwizzleTransform(asw)),
            )
            # registers (the accumulator) and shared memory are scoped separately
            acc = pl.run_scoped(lambda a: pl.run_scoped(lambda r: accumulate(r, a), acc_type), a_type)
        else:
            acc = pl.run_scoped(lambda r: accumulate(r, None), acc_type)

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_o, N), jnp.float32))
        def store(o_smem):
            o_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[ki, pl.ds(mi * block_o, block_o)])
            plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split, O, N), jnp.float32),
        grid=(O // block_o, split),
        grid_names=("o", "k"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )(wt, xt, scale_t, offset_t)


def matmul(x: jax.Array, wt, scale_t, offset_t, *, split: int, **kw) -> jax.Array:
    """``x [M, I] @ w`` (``M <= 16``) in ``x.dtype`` through :func:`gemv`."""
    M, I = x.shape
    if M > COLS:
        raise ValueError(f"mgpu_gemv takes at most {COLS} rows, got {M}")
    xt = jnp.zeros((I, COLS), jnp.bfloat16).at[:, :M].set(x.T.astype(jnp.bfloat16))
    parts = gemv(wt, xt, scale_t, offset_t, split=split, **kw)
    return jnp.sum(parts[:, :, :M], axis=0).T.astype(x.dtype)
