"""Quantized KV cache, unit tier: config validation, packing, the quantizer and the cached attention
against a float64 numpy reference of the same quantizer, storage accounting, bit allocation."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxkv.config import ConfigError, ModelConfig
from jaxkv.kvattention import attend_cached
from jaxkv.kvcache import (
    KVQuantConfig,
    allocate_bits,
    cache_bytes,
    init_cache,
    kv_bytes_per_token,
    kv_bytes_per_token_fp16,
    kv_storage,
    pack_codes,
    quantize,
    unpack_codes,
)

# ------------------------------------------------------------------------------------------------
# numpy float64 reference of the quantizer and of the read rule (written from the spec, not the code)

NP_SCALE = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def np_store_scale(s, name):
    dt = NP_SCALE[name]
    info = ml_dtypes.finfo(dt)
    tiny = float(info.smallest_subnormal if info.bits == 8 else info.smallest_normal)
    s = np.clip(s, tiny, float(info.max))
    stored = s.astype(dt)
    up = stored.view(np.uint8 if info.bits == 8 else np.uint16) + 1
    return np.where(stored.astype(np.float64) < s, up.view(dt), stored).astype(np.float64)


def np_fake_quant(x, bits, axis, scale_dtype="float8_e4m3fn"):
    """x float64; one group along ``axis``; returns the dequantized float64 values (16 bits: x)."""
    if bits == 16:
        return x
    levels = 2**bits - 1
    mn, mx = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    s = np_store_scale(np.maximum((mx - mn) / levels, np.abs(mn) / 127), scale_dtype)
    z = np.clip(np.round(-mn / s), -128, 127)
    c = np.clip(np.round(x / s) + z, 0, levels)
    return (c - z) * s


def np_frontier(i, per_channel, g, R, mode):
    n = max(i - R + (mode == "all"), 0)
    return n // g * g if per_channel else n


def np_attention(q, keys, values):
    """q [N, H]; keys/values [S, K, H] float64 -> [N, H]."""
    N, H = q.shape
    K = keys.shape[1]
    G = N // K
    out = np.zeros((N, H))
    for n in range(N):
        s = keys[:, n // G] @ q[n] / np.sqrt(H)
        p = np.exp(s - s.max())
        p /= p.sum()
        out[n] = p @ values[:, n // G]
    return out


def np_reference_outputs(q, k, v, pk, pv, lengths, kv):
    """Per sequence b and body slot i < lengths[b]: attention output [N, H] of the query at i."""
    g, R, mode = kv.group, kv.residual, kv.mode
    B, _, K, H = k.shape
    out = {}
    for b in range(B):
        n = lengths[b]
        kb, vb = k[b, :n], v[b, :n]
        if kv.k_granularity == "per-channel":
            kq = kb.copy()
            for J in range(n // g):  # complete groups only
                kq[J * g : (J + 1) * g] = np_fake_quant(kb[J * g : (J + 1) * g], kv.kbits, 0)
        else:
            kq = np_fake_quant(kb.reshape(n, K, H // g, g), kv.kbits, -1).reshape(n, K, H)
        vq = np_fake_quant(vb.reshape(n, K, H // g, g), kv.vbits, -1).reshape(n, K, H)
        for i in range(n):
            qk = np_frontier(i, kv.k_granularity == "per-channel", g, R, mode)
            qv = np_frontier(i, False, g, R, mode)
            keys = np.concatenate([pk, kq[:qk], kb[qk : i + 1]])
            values = np.concatenate([pv, vq[:qv], vb[qv : i + 1]])
            out[b, i] = np_attention(q[b, i], keys, values)
    return out


# ------------------------------------------------------------------------------------------------


def test_config_validation_names_the_field():
    for kwargs, field in [
        (dict(kbits=5), "kbits"),
        (dict(vbits=1), "vbits"),
        (dict(mode="future"), "mode"),
        (dict(k_granularity="per-head"), "k_granularity"),
        (dict(group=0), "group"),
        (dict(residual=-1), "residual"),
        (dict(scale_dtype="int8"), "scale_dtype"),
        (dict(layer_kbits=(4, 6)), "layer_kbits"),
        (dict(layer_vbits=[4, 4]), "layer_vbits"),
    ]:
        with pytest.raises(ConfigError, match=f"KVQuantConfig.{field}"):
            KVQuantConfig(**kwargs)
    cfg = ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=8, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8)  # fmt: skip
    with pytest.raises(ConfigError, match="KVQuantConfig.group=3 must divide head_dim=8"):
        KVQuantConfig(4, 4, group=3).check(cfg)  # values are per token: groups of channels
    KVQuantConfig(4, 16, group=3).check(cfg)  # per-channel keys group tokens: any size
    with pytest.raises(ConfigError, match="KVQuantConfig.layer_kbits has 3 entries"):
        KVQuantConfig(layer_kbits=(4, 4, 4)).check(cfg)
    assert KVQuantConfig().is_identity(2) and not KVQuantConfig(vbits=8).is_identity(2)
    assert KVQuantConfig(4, 2).label() == "K4V2-g32-r0-past-only"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_bit_exact(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (3, 5, 24), dtype=np.uint8)
    packed = pack_codes(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 24 * bits // 8)
    np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits)), codes)


@pytest.mark.parametrize("scale_dtype", ["float8_e4m3fn", "float16", "bfloat16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantizer_matches_numpy_float64(bits, scale_dtype):
    rng = np.random.default_rng(bits)
    # Groups with offsets far from 0, tiny ranges and constant groups exercise the zero-point limits.
    x = rng.normal(size=(6, 32)) * np.array([1, 3, 0.01, 1e-4, 0, 0.2])[:, None]
    x += np.array([0, 8, -2, 0.5, 3, -40])[:, None]
    x = x.astype(np.float32)
    codes, scale, zero = quantize(jnp.asarray(x), bits, -1, scale_dtype)
    assert codes.dtype == jnp.uint8 and zero.dtype == jnp.int8 and scale.dtype == jnp.dtype(scale_dtype)
    deq = (np.asarray(codes, np.float64) - np.asarray(zero, np.float64)) * np.asarray(scale, np.float64)
    ref = np_fake_quant(x.astype(np.float64), bits, -1, scale_dtype)
    np.testing.assert_allclose(deq, ref, rtol=0, atol=1e-6)
    # Under jit too: XLA may drop a narrowing round trip (allow_excess_precision) unless prevented.
    jc, js, jz = jax.jit(lambda x: quantize(x, bits, -1, scale_dtype))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(jc), np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(js, np.float32), np.asarray(scale, np.float32))
    # The stored scale covers the range: every value within one step (half a step plus the zero rounding).
    assert np.all(np.abs(deq - x) <= np.asarray(scale, np.float64) * 1.0 + 1e-6)


def _layer_setup(kv, P, B=2, S=24, K=2, H=16, N=4):
    cfg = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1, num_heads=N,
                      num_kv_heads=K, head_dim=H)  # fmt: skip
    cache = init_cache(cfg, B, S, kv=kv)
    seg = cache.segments[0]
    ks, vs = (jax.tree.map(lambda a: a[0], side) for side in (seg.k, seg.v))
    return cfg, ks, vs


ATTN_CONFIGS = [
    KVQuantConfig(4, 2, group=4),  # per-channel keys (KIVI), past-only, no residual
    KVQuantConfig(4, 2, group=4, mode="all", residual=3),
    KVQuantConfig(2, 4, group=8, k_granularity="per-token", residual=2),
    KVQuantConfig(8, 3, group=8, k_granularity="per-token", mode="all"),
    KVQuantConfig(3, 8, group=4, residual=5),
    KVQuantConfig(4, 16, group=4, residual=2),  # full-precision values, keys from body and window
    KVQuantConfig(16, 2, group=8, mode="all"),
]


# (config, head_dim): every config at 16 channels; at 64 the decode kernel's tiles fit (at least 16
# bytes of codes per row), so "kernel" runs it (Pallas' interpreter off a GPU)
ATTN_CASES = [(kv, 16) for kv in ATTN_CONFIGS] + [(ATTN_CONFIGS[0], 64), (ATTN_CONFIGS[1], 64)]


@pytest.mark.parametrize("query_block", [128, 3], ids=["one-block", "blocks-of-3"])
@pytest.mark.parametrize(
    "kv,H", ATTN_CASES, ids=lambda c: f"{c.label()}-{c.k_granularity}" if hasattr(c, "label") else f"H{c}"
)
def test_cached_attention_matches_numpy_float64(kv, H, query_block, monkeypatch):
    """Prefill (right-padded, two lengths) then decode steps; every query's output within 1e-5 of a
    float64 numpy reference that quantizes each key/value as the read rule says; the prefill of 7
    tokens in one block of queries, or in blocks of 3 with their bands of the windows (the last one
    padded). "folded" reads the body dequantized in the prefill (7 tokens x 2 query heads > group)
    and with the scales folded in decode (1 x 2 <= group): both evaluation orders are checked.
    "kernel" decodes through the kernels (append, split-K, merge) where their tiles fit (64 channels),
    else as "folded"."""
    from jaxkv.kernels import kvdecode
    from jaxkv.kvattention import _dequantize_first

    kernel_calls = []
    real = kvdecode.body_partials
    monkeypatch.setattr(kvdecode, "body_partials", lambda *a, **k: kernel_calls.append(1) or real(*a, **k))
    assert _dequantize_first(7 * 2, kv) and not _dequantize_first(1 * 2, kv)  # (keys' and values' group)
    P, B, K, N = 2, 2, 2, 4
    cfg, ks, vs = _layer_setup(kv, P, B, K=K, H=H, N=N)
    rng = np.random.default_rng(0)
    total = 19
    q = rng.normal(size=(B, total, N, H))
    k = rng.normal(size=(B, total, K, H)) + rng.normal(size=(1, 1, K, H)) * 4  # per-channel offsets
    v = rng.normal(size=(B, total, K, H))
    pk, pv = rng.normal(size=(P, K, H)) * 3, rng.normal(size=(P, K, H))
    q, k, v, pk, pv = (a.astype(np.float32) for a in (q, k, v, pk, pv))
    prompt = np.array([7, 4])
    steps = total - prompt.max()

    outs = {}
    for impl in ("folded", "reference", "kernel"):
        fn = jax.jit(functools.partial(attend_cached, cfg=cfg, kv=kv, impl=impl, query_block=query_block))
        kside, vside, n = ks, vs, jnp.zeros((B,), jnp.int32)
        got = {}
        # Prefill: row b holds its first prompt[b] tokens, then padding (position -1).
        T = prompt.max()
        valid = np.arange(T)[None] < prompt[:, None]
        pos = np.where(valid, P + np.arange(T)[None], -1)
        slot = np.where(valid, np.arange(T)[None], kside.data.shape[2])
        n_new = jnp.asarray(prompt, jnp.int32)
        out, kside, vside = fn(q[:, :T], k[:, :T], v[:, :T], pk, pv, kside, vside, pos, n, n_new, slot)
        for b in range(B):
            for t in range(prompt[b]):
                got[b, t] = np.asarray(out[b, t]).reshape(N, H)
        n = n_new
        # Decode: one token per sequence and step, each continuing its own sequence.
        for _ in range(steps):
            idx = np.asarray(n)
            qs = q[np.arange(B), idx][:, None]
            ks_, vs_ = k[np.arange(B), idx][:, None], v[np.arange(B), idx][:, None]
            n_new = n + 1
            out, kside, vside = fn(
                qs, ks_, vs_, pk, pv, kside, vside, (P + idx)[:, None], n, n_new, idx[:, None]
            )
            for b in range(B):
                got[b, int(idx[b])] = np.asarray(out[b, 0]).reshape(N, H)
            n = n_new
        outs[impl] = got

    lengths = np.asarray(n)
    ref = np_reference_outputs(*(a.astype(np.float64) for a in (q, k, v, pk, pv)), lengths, kv)
    assert set(ref) == set(outs["folded"])
    err = max(np.abs(outs["folded"][key] - ref[key]).max() for key in ref)
    err_ref = max(np.abs(outs["reference"][key] - ref[key]).max() for key in ref)
    # "kernel": the split-K decode kernel (Pallas interpreter off a GPU) where it applies, else "folded"
    err_kernel = max(np.abs(outs["kernel"][key] - ref[key]).max() for key in ref)
    assert max(err, err_ref) < 1e-5, (err, err_ref)
    # The kernel's products carry the codes' offset (128 + c, removed through the zero points), so
    # its float32 sums cancel ~128 |q s| per channel: a few 1e-5 at 64 channels (test_kernels bounds
    # this per product against float64); a wrong slot or scale would be off by ~0.1.
    assert err_kernel < (1e-5 if H == 16 else 1e-4), err_kernel
    assert bool(kernel_calls) == (H == 64)


def test_cache_structure():
    cfg = ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=16)  # fmt: skip
    kv = KVQuantConfig(4, 2, group=8, residual=4, layer_kbits=(4, 4, 8))
    cache = init_cache(cfg, 2, 20, jnp.bfloat16, kv=kv)
    assert cache.k is None and cache.max_len == 24  # rounded up to a multiple of the group
    assert [(s.start, s.stop) for s in cache.segments] == [(0, 2), (2, 3)]
    seg = cache.segments[0]
    assert seg.k.data.shape == (2, 2, 2, 24, 8) and seg.k.data.dtype == jnp.uint8  # 16 x 4 bits = 8 bytes
    assert seg.k.scale.shape == (2, 2, 2, 3, 16) and seg.k.scale.dtype == jnp.float8_e4m3fn
    assert seg.k.zero.shape == (2, 2, 2, 3, 16) and seg.k.zero.dtype == jnp.int8
    assert seg.k.window.shape == (2, 2, 4 + 8 - 1, 2, 16) and seg.k.window.dtype == jnp.bfloat16
    assert seg.v.data.shape == (2, 2, 2, 24, 4) and seg.v.scale.shape == (2, 2, 2, 24, 2)
    assert seg.v.window.shape == (2, 2, 4, 2, 16)
    assert cache.segments[1].k.data.shape == (1, 2, 2, 24, 16)
    # 16-bit keys and values: the plain full-precision cache.
    plain = init_cache(cfg, 2, 20, kv=KVQuantConfig(16, 16))
    assert plain.k.shape == (3, 2, 20, 2, 16) and not plain.segments and plain.kv is None
    # Mixed: full-precision keys in the body, quantized values.
    mixed = init_cache(cfg, 1, 20, kv=KVQuantConfig(16, 4, group=8))
    assert mixed.segments[0].k.data.shape == (3, 1, 2, 20, 16) and mixed.segments[0].k.scale is None


def test_kv_bytes_per_token():
    smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                          num_heads=9, num_kv_heads=3, head_dim=64)  # fmt: skip
    fp16 = kv_bytes_per_token_fp16(smollm2)
    assert fp16 == 2 * 30 * 3 * 64 * 2
    k4v2 = kv_bytes_per_token(smollm2, KVQuantConfig(4, 2, group=32))
    # Per layer and KV head: K 32 B codes + (1 B scale + 1 B zero) * 64 channels / 32 tokens;
    # V 16 B codes + 2 groups * (1 + 1) B.
    assert k4v2 == 30 * 3 * (32 + 4 + 16 + 4)
    assert k4v2 <= 0.22 * fp16
    assert kv_bytes_per_token(smollm2, KVQuantConfig(4, 2, group=32, scale_dtype="float16")) > 0.22 * fp16
    assert kv_bytes_per_token(smollm2, KVQuantConfig(8, 8, group=64)) == 30 * 3 * 2 * (64 + 2)
    storage = kv_storage(smollm2, KVQuantConfig(4, 2, group=32, residual=32))
    assert storage["window_bytes"] == 30 * 3 * 64 * 2 * ((32 + 31) + 32)
    # Real storage of an actual cache: body bytes scale with the number of slots.
    tiny = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)  # fmt: skip
    kv = KVQuantConfig(4, 2, group=8)
    a, b = (cache_bytes(init_cache(tiny, 1, S, jnp.float16, kv=kv)) for S in (64, 128))
    assert b - a == 64 * kv_bytes_per_token(tiny, kv)


def test_allocate_bits_respects_budget_and_favours_large_norms():
    nk = [4.0, 3.0, 5.0, 1.0]
    nv = [1.0, 1.5, 0.5, 1.0]
    kb, vb = allocate_bits(nk, nv, 3.0)
    assert (sum(kb) + sum(vb)) / 8 <= 3.0
    assert all(k >= v for k, v in zip(kb, vb))
    assert kb[2] >= kb[3] and sum(kb) > sum(vb)
    kb, vb = allocate_bits(nk, nv, 2.0)
    assert set(kb) | set(vb) == {2}
    kb, vb = allocate_bits(nk, nv, 8.0)
    assert set(kb) | set(vb) == {8}
    with pytest.raises(ConfigError, match="kv budget"):
        allocate_bits(nk, nv, 1.0)
