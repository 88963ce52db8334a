"""RMSNorm of a few rows (decode) in one Pallas (Triton) GPU kernel.

Conventions
-----------
* ``rms_norm(x [M, D], weight [D], eps)`` returns ``weight * (x * rsqrt(mean(x^2) + eps))``, the
  statistics in float32 and the normalised row rounded to ``x.dtype`` before the gain, in the
  promotion of ``weight``'s and ``x``'s dtypes: the roundings of ``jaxkv.model.rms_norm``.
* Why: XLA runs a row normalisation as two launches (the sum of squares, then the scaling, which
  reads the row again), each a microsecond or two of launch and latency on a few kilobytes in a
  decode step, 65 norms a Llama-2-7B step. One program per row does both here.
* The row must fit one block: ``D`` a power of two up to :data:`MAX_D`, at most :data:`MAX_ROWS`
  rows, a 16-bit ``x`` (:func:`supported`); ``jaxkv.model.rms_norm`` keeps XLA's ops everywhere else.
* Opt-in for now (``JAXKV_RMSNORM=kernel``, :func:`enabled`): it has run in the interpreter only, not
  yet compiled or timed on a GPU. ``interpret=True`` runs the same kernel body on any backend (tests).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_ROWS = 64  # decode batches; prefill keeps XLA's fusions, which use the whole GPU
MAX_D = 16384


def enabled() -> bool:
    """Whether the kernel may run: on a GPU with ``JAXKV_RMSNORM=kernel`` (module docstring)."""
    return os.environ.get("JAXKV_RMSNORM", "xla") == "kernel" and jax.default_backend() == "gpu"


def supported(rows: int, D: int, dtype) -> bool:
    """True when the kernel handles ``rows`` rows of width ``D`` in ``dtype``."""
    return (
        0 < rows <= MAX_ROWS
        and D <= MAX_D
        and D & (D - 1) == 0
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    )


def _kernel(x_ref, w_ref, o_ref, *, eps: float):
    x = x_ref[...].astype(jnp.float32)
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, keepdims=True) + eps)
    o_ref[...] = (w_ref[...] * normed.astype(x_ref.dtype)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def rms_norm(
    x: jax.Array, weight: jax.Array, *, eps: float, num_warps: int = 4, interpret: bool = False
) -> jax.Array:
    """RMSNorm of each row of ``x [M, D]`` with gain ``weight [D]`` (module docstring)."""
    M, D = x.shape
    if weight.shape != (D,) or not supported(M, D, x.dtype):
        raise ValueError(f"rms_norm kernel: x {x.shape} {x.dtype} and weight {weight.shape} not supported")
    row = pl.BlockSpec((None, D), lambda m: (m, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(M,),
        in_specs=[row, pl.BlockSpec((D,), lambda m: (0,))],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct((M, D), jnp.promote_types(weight.dtype, x.dtype)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rms_norm",
    )(x, weight)
