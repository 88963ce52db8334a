"""The residual add after a decode projection and the RMSNorm after it, in one Pallas (Triton) GPU kernel.

Conventions
-----------
* ``x [M, D]`` is the residual stream (16-bit), ``parts [S, M, D]`` a projection's output as ``S``
  partial sums: the float32 split-K partials of ``jaxkv.kernels.qmatmul`` (``sum_splits=False``), or
  ``S = 1`` and any float dtype (a plain matmul's output). ``parts`` may hold more rows than ``x``
  (the tensor-core kernel's padding to 16): the rows past ``M`` are not read, so no slice of them is
  copied first. ``weight [D]`` is the norm's gain.
* :func:`add_rms_norm` returns ``(x + y, rms_norm(x + y) * weight)`` in ``x.dtype``, with
  ``y = sum(parts)`` rounded to ``x.dtype`` first: the roundings of ``jaxkv.model.rms_norm`` applied to
  ``x + dense(...)`` (the sum of squares is float32 either way; its order of addition differs).
* Why: in a decode step XLA runs that sequence as three launches (the split-K sum with the
  residual add; the sum of squares; the scaling), each a microsecond or two of launch and latency on
  a few kilobytes. One program per row does all three here.
* One program per row of ``x``; the row must fit one block (``D`` a power of two, at most
  :data:`MAX_D`): :func:`supported` says when; ``jaxkv.model`` keeps XLA's ops everywhere else.
  ``interpret=True`` runs the same kernel body on any backend (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_ROWS = 64  # decode batches; prefill keeps XLA's fusions
MAX_D = 16384


def supported(rows: int, D: int, dtype) -> bool:
    """True when the kernel handles a residual of ``rows`` rows of width ``D`` in ``dtype``."""
    return (
        rows <= MAX_ROWS
        and D <= MAX_D
        and D & (D - 1) == 0
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    )


def _kernel(x_ref, p_ref, w_ref, x_out, h_out, *, eps: float):
    y = jnp.sum(p_ref[...].astype(jnp.float32), axis=0).astype(x_ref.dtype)  # [1, D] as dense returns it
    x = (x_ref[...].astype(jnp.float32) + y.astype(jnp.float32)).astype(x_ref.dtype)  # the bf16 add
    x_out[...] = x
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    h = w_ref[...].astype(jnp.float32) * normed.astype(x_ref.dtype).astype(jnp.float32)
    h_out[...] = h.astype(h_out.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(
    x: jax.Array,
    parts: jax.Array,
    weight: jax.Array,
    *,
    eps: float,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(x + sum(parts), rms_norm(x + sum(parts)) * weight)`` for ``x [M, D]``, ``parts [S, M, D]``
    and ``weight [D]`` (module docstring); both outputs in ``x.dtype``."""
    M, D = x.shape
    S = parts.shape[0]
    if parts.ndim != 3 or parts.shape[1] < M or parts.shape[2] != D or weight.shape != (D,):
        raise ValueError(f"parts {parts.shape} and weight {weight.shape} do not fit x {x.shape}")
    if S & (S - 1):  # Triton blocks are powers of two: an odd split count is added up by XLA first
        parts, S = jnp.sum(parts.astype(jnp.float32), axis=0, keepdims=True), 1
    # The norm's output takes the weight's dtype promotion (weight * normed.astype(x.dtype)).
    h_dtype = jnp.promote_types(weight.dtype, x.dtype)
    row = pl.BlockSpec((None, D), lambda m: (m, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(M,),
        in_specs=[row, pl.BlockSpec((S, None, D), lambda m: (0, m, 0)), pl.BlockSpec((D,), lambda m: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((M, D), x.dtype), jax.ShapeDtypeStruct((M, D), h_dtype)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(x, parts, weight)
