"""RMSNorm of a decode step's few rows in one Pallas (Triton) GPU launch that also warms the L2 with
the weights of the matmul that reads its output.

Conventions
-----------
* ``rms_norm(x [M, D], weight [D], eps, warm)`` returns ``weight * (x * rsqrt(mean(x^2) + eps))``,
  the statistics in float32 and the normalised row rounded to ``x.dtype`` before the gain, in the
  promotion of ``weight``'s and ``x``'s dtypes: the roundings of ``jaxkv.model.rms_norm``.
* Programs ``0..M-1`` normalise a row each; the rest read ``warm`` (the next matmul's weights, as
  ``jaxkv.kernels.l2warm`` views) into the L2, so that the matmul reads them from there.
* Why only with weights to warm: XLA runs the norm as two launches, and one program per row doing
  both alone did not make the decode step measurably faster (H100, run 61: int4 batch 1 2.471
  against 2.473 ms/token); the norm's launch is worth having as a carrier for the warming.
* The row must fit one block: ``D`` a power of two up to :data:`MAX_D`, at most :data:`MAX_ROWS`
  rows, a 16-bit ``x`` (:func:`supported`). ``interpret=True`` runs the same kernel body on any
  backend (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxkv.kernels import l2warm

MAX_ROWS = 64  # decode batches; prefill keeps XLA's fusions, which use the whole GPU
MAX_D = 16384
WARM_PROGRAMS = 264  # two per SM of an H100


def supported(rows: int, D: int, dtype) -> bool:
    """True when the kernel handles ``rows`` rows of width ``D`` in ``dtype``."""
    return (
        0 < rows <= MAX_ROWS
        and D <= MAX_D
        and D & (D - 1) == 0
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    )


def _kernel(x_ref, w_ref, *refs, M, eps, n_warm, interpret):
    warm_refs, (o_ref, warm_out) = refs[:n_warm], refs[n_warm:]
    m = pl.program_id(0)

    @pl.when(m < M)
    def _():
        x = x_ref[pl.ds(m, 1), :].astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, keepdims=True) + eps)
        o_ref[pl.ds(m, 1), :] = (w_ref[...][None, :] * normed.astype(x_ref.dtype)).astype(o_ref.dtype)

    @pl.when(m >= M)
    def _():
        programs = warm_out.shape[0]
        out = l2warm.warm(warm_refs, m - M, programs, interpret)
        warm_out[pl.ds(m - M, 1)] = out.reshape(1)


@functools.partial(jax.jit, static_argnames=("eps", "warm_programs", "interpret"))
def rms_norm(
    x: jax.Array, weight: jax.Array, warm=(), *, eps: float, warm_programs: int = WARM_PROGRAMS,
    interpret: bool = False,
) -> jax.Array:  # fmt: skip
    """RMSNorm of each row of ``x [M, D]`` with gain ``weight [D]``; ``warm``: ``jaxkv.kernels.l2warm``
    views that ``warm_programs`` extra programs read into the L2."""
    M, D = x.shape
    if weight.shape != (D,) or not supported(M, D, x.dtype):
        raise ValueError(f"rms_norm kernel: x {x.shape} {x.dtype} and weight {weight.shape} not supported")
    views = tuple(warm)
    programs = warm_programs if views else 1  # the scratch output needs an entry
    full = pl.BlockSpec(memory_space=None)
    out, _ = pl.pallas_call(
        functools.partial(_kernel, M=M, eps=eps, n_warm=len(views), interpret=interpret),
        grid=(M + (programs if views else 0),),
        in_specs=[full] * (2 + len(views)),
        out_specs=[full, full],
        out_shape=[
            jax.ShapeDtypeStruct((M, D), jnp.promote_types(weight.dtype, x.dtype)),
            jax.ShapeDtypeStruct((programs,), jnp.uint32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rms_norm_warm",
    )(x, weight, *views)
    return out
