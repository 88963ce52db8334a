"""Model internals: cached decoding equals the cache-free forward; padding; RoPE scaling; sliding window."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.config import ModelConfig, RopeScaling
from jaxkv.kvcache import init_cache
from jaxkv.model import forward, rope_inv_freq
from jaxkv.params import check_params, init_params

CFG = ModelConfig(
    vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
    num_kv_heads=2, head_dim=8, attention_bias=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(1))
    return jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x + 0.1, p)


def _full(params, toks, cfg=CFG):
    B, T = toks.shape
    return np.asarray(
        forward(params, jnp.asarray(toks), jnp.broadcast_to(jnp.arange(T), (B, T)), None, cfg)[0]
    )


def test_prefill_then_decode_equals_full_forward(params):
    toks = np.random.RandomState(0).randint(0, 101, (2, 20))
    ref = _full(params, toks)
    cache = init_cache(CFG, 2, 32)
    pos = np.broadcast_to(np.arange(20), (2, 20))
    out, cache = forward(params, toks[:, :12], pos[:, :12], cache, CFG)
    outs = [np.asarray(out)]
    for t in range(12, 20):
        out, cache = forward(params, toks[:, t : t + 1], pos[:, t : t + 1], cache, CFG)
        outs.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(outs, 1), ref, atol=1e-5)
    assert np.asarray(cache.lengths).tolist() == [20, 20]


def test_padded_batch_equals_unpadded(params):
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, 101, 7), rng.randint(0, 101, 13)
    toks = np.zeros((2, 16), np.int32)
    pos = np.full((2, 16), -1, np.int32)
    for i, t in enumerate((a, b)):
        toks[i, : len(t)] = t
        pos[i, : len(t)] = np.arange(len(t))
    cache = init_cache(CFG, 2, 20)
    out, cache = forward(params, toks, pos, cache, CFG)
    assert np.asarray(cache.lengths).tolist() == [7, 13]
    np.testing.assert_allclose(np.asarray(out)[0, :7], _full(params, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[1, :13], _full(params, b[None])[0], atol=1e-5)
    # The next token of each sequence lands right after its own prompt.
    nxt = np.array([[5], [6]])
    out2, cache = forward(params, nxt, np.array([[7], [13]]), cache, CFG)
    np.testing.assert_allclose(np.asarray(out2)[0, 0], _full(params, np.append(a, 5)[None])[0, -1], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out2)[1, 0], _full(params, np.append(b, 6)[None])[0, -1], atol=1e-5)


def test_pivot_segment_equals_prefix_tokens(params):
    """K/V of the first P tokens held in the pivot segment give the same logits as recomputing them."""
    toks = np.random.RandomState(2).randint(0, 101, (1, 15))
    ref = _full(params, toks)
    P = 4
    c0 = init_cache(CFG, 1, 16)
    _, c0 = forward(params, toks[:, :P], np.arange(P)[None], c0, CFG)
    pk, pv = c0.k[:, 0, :P], c0.v[:, 0, :P]
    cache = init_cache(CFG, 1, 16, pivot_k=pk, pivot_v=pv)
    out, cache = forward(params, toks[:, P:], np.arange(P, 15)[None], cache, CFG)
    np.testing.assert_allclose(np.asarray(out), ref[:, P:], atol=1e-5)
    assert int(cache.lengths[0]) == 15 - P


def test_sliding_window_masks_old_keys(params):
    cfg = dataclasses.replace(CFG, sliding_window=3)
    toks = np.random.RandomState(3).randint(0, 101, (1, 12))
    full = _full(params, toks, cfg)
    # With window 3 and 3 layers, information travels at most 6 positions: token 0 cannot reach 11.
    toks2 = toks.copy()
    toks2[0, 0] = (toks2[0, 0] + 1) % 101
    assert np.array_equal(_full(params, toks2, cfg)[0, -1], full[0, -1])
    assert not np.array_equal(_full(params, toks2)[0, -1], _full(params, toks)[0, -1])


def test_llama3_rope_frequencies_match_reference():
    cfg = dataclasses.replace(CFG, head_dim=64, num_heads=2, num_kv_heads=2, rope_theta=500000.0,
                              rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))  # fmt: skip
    got = rope_inv_freq(cfg)
    # float64 restatement of Meta's apply_scaling (llama3.1 reference code).
    base = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
    want = []
    for f in base:
        wavelen = 2 * np.pi / f
        if wavelen < 8192 / 4.0:
            want.append(f)
        elif wavelen > 8192 / 1.0:
            want.append(f / 8.0)
        else:
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - s) * f / 8.0 + s * f)
    np.testing.assert_allclose(got, np.array(want), rtol=1e-6)


def test_check_params_names_bad_leaf(params):
    check_params(params, CFG)
    bad = {**params, "layers": {**params["layers"], "wk": params["layers"]["wk"][:, :, :-1]}}
    with pytest.raises(ValueError, match=r"\['layers'\]\['wk'\] has shape"):
        check_params(bad, CFG)
    with pytest.raises(ValueError, match="lm_head.*missing"):
        check_params({k: v for k, v in params.items() if k != "lm_head"}, CFG)


def test_bfloat16_forward_close_to_float32(params):
    toks = np.random.RandomState(4).randint(0, 101, (1, 10))
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out16 = _full(p16, toks)
    assert out16.dtype == np.float32
    ref = _full(params, toks)
    # bf16 keeps 8 mantissa bits: a few percent of the logit range, through 3 layers.
    assert np.abs(out16 - ref).max() < 0.1 * np.abs(ref).max()
    assert np.corrcoef(out16.ravel(), ref.ravel())[0, 1] > 0.99
