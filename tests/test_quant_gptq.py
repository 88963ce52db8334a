"""GPTQ on a single random layer: equal to a float64 numpy GPTQ, and a lower output error than RTN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxkv.quant import qarray as qa
from jaxkv.quant.gptq import gptq_quantize_weight


def np_find_params(W, bits, sym):
    """Per output row of W [out, g]: llm-awq's scale and zero (the formula jaxkv uses for every method)."""
    if sym:
        scale = np.maximum(np.abs(W).max(axis=1), 1e-5) / (2 ** (bits - 1) - 1)
        return scale, np.full_like(scale, 2 ** (bits - 1))
    scale = np.maximum(W.max(axis=1) - W.min(axis=1), 1e-5) / (2**bits - 1)
    return scale, np.clip(-np.round(W.min(axis=1) / scale), 0, 2**bits - 1)


def np_gptq(W, H, bits, group, sym=False, blocksize=128, percdamp=0.01, actorder=False, static_groups=False):
    """IST-DASLab ``GPTQ.fasterquant`` in float64 numpy, torch layout W [out, in]. Returns codes [out, in]."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    cols = W.shape[1]
    maxq = 2**bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [np_find_params(W[:, i : i + group], bits, sym) for i in range(0, cols, group)]
    if actorder:
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
        invperm = np.argsort(perm)
    H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(H))
    Hinv = scipy.linalg.cho_solve((np.linalg.cholesky(H), True), np.eye(cols))
    Hinv = np.linalg.cholesky(Hinv).T  # upper
    Q = np.zeros_like(W)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if not static_groups:
                if (i1 + i) % group == 0:
                    scale, zero = np_find_params(W[:, i1 + i : i1 + i + group], bits, sym)
            else:
                idx = perm[i1 + i] if actorder else i1 + i
                scale, zero = groups[idx // group]
            q = np.clip(np.round(w / scale) + zero, 0, maxq)
            Q[:, i1 + i] = q
            err = (w - (q - zero) * scale) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, invperm] if actorder else Q


def calib_layer(seed, n=512, I=128, O=40):
    """Correlated inputs X [n, I] (plus one dead channel) and a weight w [I, O]."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, I)) @ (np.eye(I) + 0.5 * rng.standard_normal((I, I)) / np.sqrt(I))
    X[:, :3] *= 6.0  # a few large channels
    X[:, 7] = 0.0  # a dead input: H_77 = 0
    w = rng.standard_normal((I, O)) * 0.05
    return X, w, X.T @ X / n


CASES = [
    dict(bits=4, group=16, blocksize=32),  # dynamic groups, several per block
    dict(bits=3, group=64, blocksize=32),  # a group spans two blocks
    dict(bits=2, group=32, blocksize=32, sym=True),
    dict(bits=4, group=32, blocksize=32, actorder=True, static_groups=True),
    dict(bits=3, group=128, blocksize=128),  # per-channel, one block
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptq_equals_float64_numpy_reference(case):
    X, w, H = calib_layer(1)
    want = np_gptq(w.T, H, **case).T
    with jax.enable_x64(True):
        q = gptq_quantize_weight(
            jnp.asarray(w), jnp.asarray(H), case["bits"], case["group"], case.get("sym", False), jnp.float64,
            0.01, case["blocksize"], case.get("actorder", False), case.get("static_groups", False),
        )  # fmt: skip
        codes = np.asarray(qa.codes_of(q))
    np.testing.assert_array_equal(codes, want)


def out_err(X, w, w_hat):
    return float(np.mean((X @ w - X @ w_hat) ** 2))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_float32_beats_rtn_and_matches_reference_within_rounding(bits, act_order):
    X, w, H = calib_layer(2)
    X32, w32 = X.astype(np.float32), w.astype(np.float32)
    q = gptq_quantize_weight(
        jnp.asarray(w32), jnp.asarray((X32.T @ X32) / X32.shape[0]), bits, 32, scale_dtype=jnp.float32,
        block_size=32, act_order=act_order,
    )  # fmt: skip
    rtn = qa.quantize_tensor(jnp.asarray(w32), bits, 32, scale_dtype=jnp.float32)
    e_gptq = out_err(X, w, np.asarray(qa.dequantize(q), np.float64))
    e_rtn = out_err(X, w, np.asarray(qa.dequantize(rtn), np.float64))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)

    want = np_gptq(w.T, H, bits, 32, blocksize=32, actorder=act_order, static_groups=act_order).T
    codes = np.asarray(qa.codes_of(q)).astype(np.int64)
    # float32 vs float64: a code may flip at a near-tie, and its error then propagates a little.
    assert np.mean(codes == want) > 0.97 and np.abs(codes - want).max() <= 1
    w_live = np.where(np.diag(H)[:, None] == 0, 0.0, w)  # dead inputs are zeroed first
    ref_scale, ref_zero = np_find_params(w_live.T[:, :32], bits, False)  # first group: before any update
    np.testing.assert_allclose(np.asarray(q.scale[0], np.float64), ref_scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.zero[0]), ref_zero)
    w_ref = (want.reshape(-1, 32, w.shape[1]) - np.asarray(q.zero, np.float64)[:, None]) * np.asarray(
        q.scale, np.float64
    )[:, None]
    e_ref = out_err(X, w, w_ref.reshape(w.shape))
    assert abs(e_gptq - e_ref) < 0.05 * e_ref


def test_gptq_group_error():
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize_weight(jnp.zeros((96, 8)), jnp.eye(96), 4, 64)
