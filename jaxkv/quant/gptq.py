"""GPTQ (Frantar et al. 2022) in JAX: Hessian-aware rounding, layer by layer, with real packing.

Conventions
-----------
* Weights are (in, out): GPTQ's "columns" (input channels, the order in which it quantizes) are our
  rows. ``H = X^T X / n`` over the calibration tokens' inputs ``X [n, in]`` of that linear.
* Algorithm (IST-DASLab ``gptq.py`` ``fasterquant``): dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a
  zero weight row; optional act-order (decreasing ``H_ii``); ``H += damp * mean(diag H) * I``;
  ``U = chol(H^-1)`` upper; rows are quantized one by one inside blocks of ``block_size``, each error
  ``(w - q) / U_ii`` propagated to the later rows of the block at once and to the rest of the matrix
  once per block (lazy batch updates).
* Group statistics use the llm-awq RTN formula (:mod:`jaxkv.quant.rtn`), so every method shares one
  storage format. Dynamic groups (default, as the reference): a group's scale/zero come from the
  partially updated weights at the start of the block that contains the group's first row (the
  reference reads ``W``, which lags in-block updates; we match it). Static groups: from the original
  weights, before any update. Act-order requires static groups (the packed format keeps groups in the
  original input order, with no ``g_idx``), so ``act_order`` implies ``static_groups``.
* Model-level (:func:`gptq_quantize_params`): blocks are processed in order; the calibration
  activations entering block l come from the *already quantized* blocks 0..l-1, and inside a block the
  linears are quantized in the order qkv -> wo -> gate/up -> down, each Hessian taken with the earlier
  linears of that block already quantized ("true sequential").
* Linear algebra runs in float32 at ``Precision.HIGHEST`` (no TF32 on GPUs), float64 under x64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ModelConfig
from jaxkv.model import rms_norm
from jaxkv.quant import calib
from jaxkv.quant.qarray import QArray, from_codes, quant_params
from jaxkv.quant.recipe import QuantRecipe, get_path

HIGHEST = jax.lax.Precision.HIGHEST

# Quantization stages of one block (true sequential): the linears of a stage share an input.
STAGES = (("wq", "wk", "wv"), ("wo",), ("w_gate", "w_up"), ("w_down",))


@functools.partial(jax.jit, donate_argnums=(0,))
def hessian_add(H: jax.Array, x: jax.Array) -> jax.Array:
    """``H + x^T x`` over all leading axes of ``x [..., in]`` (float32 or wider)."""
    x = x.reshape(-1, x.shape[-1]).astype(H.dtype)
    return H + jnp.einsum("ni,nj->ij", x, x, precision=HIGHEST)


def _row_params(scale_g, zero_g, gidx):
    """Per-row (scale, zero) from per-group arrays and each row's group index."""
    s = scale_g[gidx]
    z = None if zero_g is None else zero_g[gidx]
    return s, z


def _quant_rows(w, s, z, maxq, zsym):
    """Codes and dequantized values of rows ``w [r, O]`` with row scales/zeros ``[r, O]``."""
    zz = zsym if z is None else z
    q = jnp.clip(jnp.round(w / s) + zz, 0, maxq)
    return q, (q - zz) * s


def _gptq_block(W1, U1, S1, Z1, maxq, zsym):
    """Quantize the rows of one block in order; returns (codes, errors) ``[count, O]``."""
    count = W1.shape[0]

    def body(i, carry):
        W1, Q1, E1 = carry
        w = W1[i]
        s = S1[i]
        z = None if Z1 is None else Z1[i]
        q, deq = _quant_rows(w, s, z, maxq, zsym)
        err = (w - deq) / U1[i, i]
        # U1 is upper triangular, so rows before i are untouched; row i becomes its dequantized value.
        W1 = W1 - U1[i][:, None] * err[None, :]
        return W1, Q1.at[i].set(q), E1.at[i].set(err)

    Q1 = jnp.zeros_like(W1)
    E1 = jnp.zeros_like(W1)
    _, Q1, E1 = jax.lax.fori_loop(0, count, body, (W1, Q1, E1))
    return Q1, E1


@functools.partial(
    jax.jit,
    static_argnames=("bits", "group", "sym", "scale_dtype", "block_size", "act_order", "static_groups"),
)
def _gptq(w, H, damp, *, bits, group, sym, scale_dtype, block_size, act_order, static_groups):
    I, O = w.shape
    cd = jnp.promote_types(w.dtype, jnp.float32)
    W = w.astype(cd)
    H = H.astype(cd)
    maxq = 2**bits - 1
    zsym = 2 ** (bits - 1)
    ng = I // group

    diag = jnp.diagonal(H)
    dead = diag == 0
    H = H + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(cd))
    W = jnp.where(dead[:, None], 0.0, W)

    if static_groups:
        scale_g, zero_g = quant_params(W, bits, group, sym, scale_dtype)
        scale_g = scale_g.astype(cd)
    else:
        scale_g = jnp.zeros((ng, O), cd)
        zero_g = None if sym else jnp.zeros((ng, O), cd)

    if act_order:
        perm = jnp.argsort(-jnp.diagonal(H), stable=True)
        W = W[perm]
        H = H[perm][:, perm]
        gidx = perm // group
    else:
        perm = None
        gidx = jnp.arange(I) // group

    H = H + damp * jnp.mean(jnp.diagonal(H)) * jnp.eye(I, dtype=cd)
    L = jnp.linalg.cholesky(H)
    Hinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(I, dtype=cd))
    U = jnp.linalg.cholesky(Hinv).T  # upper: Hinv = U^T U

    codes = []
    for i1 in range(0, I, block_size):
        i2 = min(i1 + block_size, I)
        if not static_groups:
            for c in range(((i1 + group - 1) // group) * group, i2, group):
                s, z = quant_params(W[c : c + group], bits, group, sym, scale_dtype)
                scale_g = scale_g.at[c // group].set(s[0].astype(cd))
                if zero_g is not None:
                    zero_g = zero_g.at[c // group].set(z[0])
        S1, Z1 = _row_params(scale_g, zero_g, gidx[i1:i2])
        Q1, E1 = _gptq_block(W[i1:i2], U[i1:i2, i1:i2], S1, Z1, maxq, zsym)
        codes.append(Q1)
        if i2 < I:
            W = W.at[i2:].add(-jnp.einsum("ki,ko->io", U[i1:i2, i2:], E1, precision=HIGHEST))
    Q = jnp.concatenate(codes, axis=0)
    if act_order:
        Q = Q[jnp.argsort(perm)]
    return Q, scale_g.astype(scale_dtype), zero_g


def gptq_quantize_weight(
    w: jax.Array,
    H: jax.Array,
    bits: int,
    group: int,
    sym: bool = False,
    scale_dtype=jnp.float16,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    dtype=None,
) -> QArray:
    """GPTQ-quantize one weight ``w [in, out]`` given its input Hessian ``H [in, in]`` -> a 2-D QArray.

    ``group`` -1 means per-channel. ``act_order`` implies static groups (see the module docstring).
    """
    I = w.shape[0]
    group = I if group in (-1, 0, None) else group
    if I % group:
        raise ValueError(f"group {group} does not divide the input dimension {I}")
    codes, scale, zero = _gptq(
        w,
        H,
        jnp.asarray(damp, jnp.promote_types(w.dtype, jnp.float32)),
        bits=bits,
        group=group,
        sym=sym,
        scale_dtype=jnp.dtype(scale_dtype),
        block_size=block_size,
        act_order=act_order,
        static_groups=static_groups or act_order,
    )
    return from_codes(codes, scale, zero, bits, group, w.dtype if dtype is None else dtype)


def _quantize_one(w, H, recipe: QuantRecipe) -> QArray:
    return gptq_quantize_weight(
        w,
        H,
        recipe.bits,
        recipe.group_for(w.shape[0]),
        recipe.sym,
        recipe.jnp_scale_dtype,
        recipe.damp,
        recipe.block_size,
        recipe.act_order,
        recipe.static_groups,
    )


def _stack(qs: list) -> QArray | jax.Array:
    return jax.tree.map(lambda *a: jnp.stack(a), *qs)


def gptq_quantize_params(
    params, cfg: ModelConfig, recipe: QuantRecipe, tokens: np.ndarray, selected: dict, progress: bool = True
) -> dict:
    """``{path: QArray}`` for the selected paths (``layers/<linear>`` and optionally ``lm_head``).

    ``tokens [N, T]`` are the calibration windows.
    """
    layer_sel = {n.split("/", 1)[1] for n in selected if n.startswith("layers/")}
    other = set(selected) - {f"layers/{n}" for n in layer_sel}
    if other - {"lm_head"}:
        raise ValueError(
            f"GPTQ can quantize the block linears and lm_head, not {sorted(other - {'lm_head'})}"
        )
    layers = params["layers"]
    X = calib.embed_windows(params, tokens)
    B = recipe.calib_batch
    per_layer: dict[str, list] = {n: [] for n in layer_sel}
    for l in calib.progress_bar(range(cfg.num_layers), "GPTQ blocks", progress):
        lp = dict(calib.layer_params(layers, l))
        for stage in STAGES:
            names = [n for n in stage if n in layer_sel]
            if not names:
                continue
            inp = calib.INPUT_OF[names[0]]
            dim = lp[names[0]].shape[0]
            H = jnp.zeros((dim, dim), jnp.promote_types(X.dtype, jnp.float32))
            for s in calib.batches(X.shape[0], B):
                (a,) = calib.block_outputs(lp, X[s], cfg, (inp,))
                H = hessian_add(H, a)
            H = H / (X.shape[0] * X.shape[1])
            for n in names:
                lp[n] = _quantize_one(lp[n], H, recipe)
                per_layer[n].append(lp[n])
        # The next block sees this block's output with its linears quantized.
        (X,) = calib.run_block(lp, X, cfg, ("out",), B)
    out = {f"layers/{n}": _stack(qs) for n, qs in per_layer.items()}
    if "lm_head" in selected:
        w = get_path(params, "lm_head")
        H = jnp.zeros((w.shape[0], w.shape[0]), jnp.promote_types(X.dtype, jnp.float32))
        for s in calib.batches(X.shape[0], B):
            H = hessian_add(H, rms_norm(X[s], params["final_norm"], cfg.rms_norm_eps))
        out["lm_head"] = _quantize_one(w, H / (X.shape[0] * X.shape[1]), recipe)
    return out
