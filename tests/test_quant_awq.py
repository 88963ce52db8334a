"""AWQ: scale folding is exact in full precision, the searches never lose to plain RTN, clip = llm-awq."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.config import ModelConfig
from jaxkv.params import init_params
from jaxkv.quant import QuantRecipe, calib
from jaxkv.quant import qarray as qa
from jaxkv.quant.awq import _clip_max, _scaled_loss_batch, _search_scale, awq_transform_block, fake_quantize

LINEARS = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}


def setup(num_kv_heads, seed=0):
    cfg = ModelConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                      num_kv_heads=num_kv_heads, head_dim=16, attention_bias=True)  # fmt: skip
    params = init_params(cfg, jax.random.key(seed))
    params["layers"]["bv"] = params["layers"]["bv"] + 0.05
    toks = np.random.default_rng(seed).integers(0, 50, (6, 16))
    X = calib.embed_windows(params, toks)
    X = X.at[..., :3].multiply(10.0)  # outlier channels
    return cfg, calib.layer_params(params["layers"], 0), X


def test_fake_quantize_equals_dequantized_qarray():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)) * 0.05, jnp.float32)
    fq = fake_quantize(w, 3, 16, False, jnp.float16)
    np.testing.assert_allclose(fq, qa.dequantize(qa.quantize_tensor(w, 3, 16)), atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA (v->o scaled too) and GQA (v->o skipped, as llm-awq)
def test_scale_folding_is_exact_in_full_precision(kv_heads):
    cfg, lp, X = setup(kv_heads)
    r = QuantRecipe(bits=3, group=16, method="awq", awq_clip=False, calib_batch=3)
    new = awq_transform_block(lp, X, cfg, r, LINEARS)
    assert not np.allclose(new["attn_norm"], lp["attn_norm"]) and not np.allclose(new["w_up"], lp["w_up"])
    assert np.allclose(new["wo"], lp["wo"]) == (kv_heads != 4)  # wo only absorbs the v->o scales
    (a,) = calib.run_block(lp, X, cfg, ("out",), 3)
    (b,) = calib.run_block(new, X, cfg, ("out",), 3)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_search_never_loses_to_rtn():
    cfg, lp, X = setup(2, seed=1)
    r = QuantRecipe(bits=3, group=16, method="awq", calib_batch=6)
    h = calib.run_block(lp, X, cfg, ("mlp_in",), 6)[0]
    s = _search_scale(lp, h, ["w_gate", "w_up"], "mlp", cfg, r)
    ref = calib.mlp_out(lp, h)
    qargs = (3, 16, False, jnp.dtype(jnp.float16))
    loss = lambda s: float(_scaled_loss_batch(lp, s, h, ref, ("w_gate", "w_up"), "mlp", cfg, qargs))  # noqa: E731
    assert loss(s) <= loss(jnp.ones_like(s))
    assert not np.allclose(s, 1.0)  # the outlier channels pull the search away from plain RTN


def np_auto_clip(w_oi, x, n_bit, group, n_grid=20, max_shrink=0.5):
    """llm-awq ``auto_clip_layer`` in float64 numpy (one output batch). w [co, ci], x [n, ci] -> [co, ng]."""
    co, ci = w_oi.shape
    xg = x.reshape(1, x.shape[0], -1, group)
    w = w_oi.reshape(co, 1, -1, group)
    org_max = np.abs(w).max(axis=-1, keepdims=True)
    best, min_errs = org_max.copy(), np.full_like(org_max, 1e9)
    org_out = (xg * w).sum(axis=-1)
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i_s / n_grid)
        cur = np.clip(w, -max_val, max_val)
        g = cur.reshape(-1, group)
        scales = np.maximum(g.max(1, keepdims=True) - g.min(1, keepdims=True), 1e-5) / (2**n_bit - 1)
        zeros = np.clip(-np.round(g.min(1, keepdims=True) / scales), 0, 2**n_bit - 1)
        q = ((np.clip(np.round(g / scales) + zeros, 0, 2**n_bit - 1) - zeros) * scales).reshape(cur.shape)
        err = ((xg * q).sum(axis=-1) - org_out) ** 2
        err = err.mean(axis=1).reshape(min_errs.shape)
        better = err < min_errs
        min_errs[better], best[better] = err[better], max_val[better]
    return best[:, 0, :, 0]


def test_clip_search_matches_llm_awq_reference():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 24)) * 0.05
    w[::7] *= 4  # heavy-tailed rows make clipping pay off
    x = rng.standard_normal((200, 64)) * (1 + 3 * (rng.random(64) > 0.9))
    got = np.asarray(_clip_max(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32),
                               (3, 16, False, jnp.dtype(jnp.float32)), 20, 10))  # fmt: skip
    want = np_auto_clip(w.T, x, 3, 16).T  # [ng, O]
    assert got.shape == want.shape == (4, 24)
    org = np.abs(w.reshape(4, 16, 24)).max(axis=1)
    assert (got <= org + 1e-7).all() and (got >= 0.55 * org - 1e-7).all() and (got < org).any()
    assert np.mean(np.isclose(got, want, rtol=1e-5)) > 0.95  # float32 vs float64 near-ties aside
