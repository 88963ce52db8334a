"""WKVQuant: the two-dimensional quantizer against float64 numpy, identity parameters = the plain
per-token quantizer bit for bit, decoding through the cache = the fake-quant forward with smoothing
on, CRR lowers its loss and resumes exactly, save/restore refusals and corruption, CLI end to end."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_calibrate import TinyModel

from jaxkv.checkpoint import CheckpointError
from jaxkv.config import ConfigError, ModelConfig
from jaxkv.kvcache import KVQuantConfig, init_cache, side_specs
from jaxkv.model import KVForward, forward
from jaxkv.params import init_params
from jaxkv.prefix import make_prefix, model_fingerprint
from jaxkv.wkvquant import (
    CRRConfig,
    crr_calibrate,
    fake_quantize_2d,
    identity_params,
    restore_wkv,
    save_wkv,
    smoothing_init,
)

CFG = ModelConfig(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=16, bos_token_id=1, eos_token_ids=(5,),
)  # fmt: skip
WKV = KVQuantConfig(4, 2, group=8, k_granularity="per-token", method="wkvquant")


@pytest.fixture(scope="module")
def models():
    fp = init_params(CFG, jax.random.key(0))
    fp = jax.tree.map(lambda x: x * 5 if x.ndim == 3 else x, fp)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    q = jax.tree.map(
        lambda x: x * (1 + 0.1 * jax.random.normal(next(keys), x.shape)) if x.ndim == 3 else x, fp
    )
    fp_model = TinyModel(CFG, fp)
    return fp_model, TinyModel(CFG, q, recipe={"bits": 4}, fingerprint=model_fingerprint(fp_model))


def random_params(cfg, kv, seed=0):
    """Smoothing far from the identity and finite clipping: every part of the path is exercised."""
    rng = np.random.default_rng(seed)
    p = identity_params(cfg, kv)
    out = {}
    for name, a in p.items():
        if name.endswith("_scale"):
            out[name] = jnp.asarray(np.exp(rng.normal(size=a.shape) * 0.7), jnp.float32)
        elif name.endswith("_shift"):
            out[name] = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
        else:
            out[name] = jnp.asarray(rng.uniform(0.5, 4.0, size=a.shape), jnp.float32)
    return out


def np_fake_quant_2d(x, s, d, clip, bits, g):
    """float64 reference of the module docstring; x [..., K, H], s/d [K, H], clip logits [K, C, 2]."""
    *lead, K, H = x.shape
    xs = (
        ((x.astype(np.float32) - d) / s).astype(np.float64).reshape(*lead, K, H // g, g)
    )  # x~ as float32 holds it
    f = 1 / (1 + np.exp(-clip.astype(np.float64)))
    mx = xs.max(-1, keepdims=True) * f[..., 0:1]
    mn = xs.min(-1, keepdims=True) * f[..., 1:2]
    levels = 2**bits - 1
    scale = np.maximum((mx - mn) / levels, np.abs(mn) / 127)
    e4m3 = ml_dtypes.float8_e4m3fn
    tiny = float(ml_dtypes.finfo(e4m3).smallest_subnormal)
    scale = np.clip(scale, tiny, 448.0)
    stored = scale.astype(e4m3)
    up = (stored.view(np.uint8) + 1).view(e4m3)
    scale = np.where(stored.astype(np.float64) < scale, up, stored).astype(np.float64)
    zero = np.clip(np.round(-mn / scale), -128, 127)
    codes = np.clip(np.round(xs / scale) + zero, 0, levels)
    deq = ((codes - zero) * scale).reshape(*lead, K, H)
    return deq * s + d


@pytest.mark.parametrize("bits", [2, 4])
def test_2d_quantizer_matches_numpy_float64(bits):
    rng = np.random.default_rng(bits)
    K, H, g = 2, 16, 8
    x = (
        rng.normal(size=(5, 7, K, H)) * rng.uniform(0.1, 5, size=(K, H)) + rng.normal(size=(K, H)) * 4
    ).astype(np.float32)
    s = np.exp(rng.normal(size=(K, H))).astype(np.float32)
    d = rng.normal(size=(K, H)).astype(np.float32)
    clip = rng.uniform(0.5, 4, size=(K, H // g, 2)).astype(np.float32)
    clip[0, 0] = np.inf  # no clipping in one group
    spec = side_specs(KVQuantConfig(bits, bits, group=g, k_granularity="per-token"), bits, bits)[1]
    got = fake_quantize_2d(jnp.asarray(x), {"scale": s, "shift": d, "clip": clip}, spec)
    ref = np_fake_quant_2d(x, s, d, clip, bits, g)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.abs(ref - x).max() > 1e-3  # it did quantize


def test_identity_parameters_give_the_plain_per_token_quantizer_bitwise(models):
    fp, _ = models
    plain = dataclasses.replace(WKV, method="minmax")
    ident = identity_params(CFG, WKV)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, 21)), jnp.int32).at[:, 0].set(1)
    pos = jnp.broadcast_to(jnp.arange(21, dtype=jnp.int32), (2, 21))
    for pivot in (0, 1):
        a = KVForward(CFG, plain, pivot)(fp.params, tokens, pos)
        b = KVForward(CFG, WKV, pivot)((fp.params, ident), tokens, pos)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Through the cache: prefill then decode.
    fwd = jax.jit(forward, static_argnames="cfg")
    outs = []
    for kv, wkv in ((plain, None), (WKV, ident)):
        cache = init_cache(CFG, 2, 24, kv=kv, wkv=wkv)
        la, cache = fwd(fp.params, tokens[:, :13], pos[:, :13], cache, CFG)
        lb, cache = fwd(fp.params, tokens[:, 13:14], pos[:, 13:14], cache, CFG)
        outs.append((np.asarray(la), np.asarray(lb)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    with pytest.raises(ConfigError, match="needs its learned parameters"):
        KVForward(CFG, WKV)(fp.params, tokens, pos)
    with pytest.raises(ConfigError, match="k_granularity"):
        KVQuantConfig(4, 4, method="wkvquant")


@pytest.mark.parametrize("kv", [WKV, dataclasses.replace(WKV, kbits=2, vbits=4, mode="all", residual=2)],
                         ids=lambda kv: kv.label())  # fmt: skip
def test_decoding_equals_fake_quant_forward_with_smoothing(models, kv):
    """Chunked decoding through the cache (smoothed codes + per-layer s, δ, clip) gives the logits of
    the cache-free perplexity forward with the same parameters, [BOS] a full-precision pivot."""
    fp, _ = models
    wkv = random_params(CFG, kv)
    window = [1] + np.random.default_rng(2).integers(3, 97, 19).tolist()
    T = len(window)
    tokens = jnp.asarray([window], jnp.int32)
    ref = np.asarray(KVForward(CFG, kv, 1)((fp.params, wkv), tokens, jnp.arange(T, dtype=jnp.int32)[None]))
    plain = np.asarray(KVForward(CFG, kv, 1)((fp.params, identity_params(CFG, kv)), tokens,
                                              jnp.arange(T, dtype=jnp.int32)[None]))  # fmt: skip
    assert np.abs(plain - ref).max() > 1e-2  # the parameters matter
    prefix = make_prefix(fp, "bos")
    fwd = jax.jit(forward, static_argnames="cfg")
    cache = init_cache(CFG, 1, 24, pivot_k=prefix.k, pivot_v=prefix.v, kv=kv, wkv=wkv)
    got, start = [], 1
    for c in [5, 1, 5, 1, 1, 5, 1]:
        pos = jnp.arange(start, start + c, dtype=jnp.int32)[None]
        logits, cache = fwd(fp.params, tokens[:, start : start + c], pos, cache, CFG)
        got.append(np.asarray(logits))
        start += c
    assert start == T
    np.testing.assert_allclose(np.concatenate(got, axis=1)[0], ref[0, 1:], atol=5e-5, rtol=0)
    np.testing.assert_allclose(ref[0, 0], np.asarray(prefix.logits), atol=1e-5)


CRR = CRRConfig(samples=6, epochs=8, batch_size=6, lr=3e-2, k=2)


@pytest.fixture(scope="module")
def crr_setup(models):
    fp, _ = models
    # Full-precision weights for the student: the KV quantizer is the only error source, so its
    # parameters visibly matter (with quantized weights their share of the loss is small here).
    q = dataclasses.replace(fp, recipe={"bits": 16}, fingerprint=model_fingerprint(fp))
    kv = KVQuantConfig(2, 2, group=8, k_granularity="per-token", method="wkvquant")
    windows = np.random.default_rng(3).integers(3, 97, (6, 16)).astype(np.int32)
    windows[:, 0] = 1
    init = smoothing_init(q, kv, windows, make_prefix(fp, "bos"))
    return fp, q, kv, windows, init


def test_smoothing_init_and_crr_lower_the_loss(crr_setup):
    fp, q, kv, windows, init = crr_setup
    assert np.all(np.asarray(init["k_scale"]) > 0) and np.all(np.isinf(np.asarray(init["k_clip"])))
    res = crr_calibrate(fp, q, kv, windows, init, CRR, prefix=make_prefix(fp, "bos"), progress=False)
    assert len(res.losses) == CFG.num_layers and all(len(x) == CRR.steps_per_block for x in res.losses)
    # Block 0 sees the exact input; later blocks' losses are dominated by the error of the quantized
    # K/V upstream, which their own parameters cannot undo.
    assert res.final_losses[0] < 0.95 * res.initial_losses[0], res
    assert np.mean(res.final_losses) < np.mean(res.initial_losses), res
    assert np.all(np.isfinite(np.asarray(res.params["v_clip"])))
    for name in ("k_scale", "k_shift", "v_clip"):
        assert not np.allclose(np.asarray(res.params[name]), np.asarray(init[name]))


def test_crr_resume_gives_the_uninterrupted_result(crr_setup, tmp_path):
    fp, q, kv, windows, init = crr_setup
    crr = dataclasses.replace(CRR, epochs=2)
    full = crr_calibrate(fp, q, kv, windows, init, crr, progress=False)
    part = crr_calibrate(
        fp, q, kv, windows, init, crr, checkpoint_dir=tmp_path, progress=False, stop_after_blocks=1
    )
    assert len(part.losses) == 1
    rest = crr_calibrate(fp, q, kv, windows, init, crr, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert len(rest.losses) == CFG.num_layers - 1
    for name in full.params:
        np.testing.assert_allclose(np.asarray(rest.params[name]), np.asarray(full.params[name]), rtol=1e-6)
    np.testing.assert_allclose(rest.final_losses, full.final_losses, rtol=1e-5)
    with pytest.raises(CheckpointError, match="settings"):
        crr_calibrate(fp, q, kv, windows, init, dataclasses.replace(crr, lr=1e-3), checkpoint_dir=tmp_path,
                      resume=True, progress=False)  # fmt: skip


def test_save_restore_refusals_and_corruption(models, tmp_path):
    fp, q = models
    params = random_params(CFG, WKV, seed=4)
    save_wkv(tmp_path / "w", params, WKV, q)
    back = restore_wkv(
        tmp_path / "w", q, dataclasses.replace(WKV, mode="all", residual=4)
    )  # mode/R may differ
    for name in params:
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(params[name]))
    with pytest.raises(CheckpointError, match="KV cache"):
        restore_wkv(tmp_path / "w", q, dataclasses.replace(WKV, vbits=4))
    with pytest.raises(CheckpointError, match="weight recipe"):
        restore_wkv(tmp_path / "w", dataclasses.replace(q, recipe={"bits": 3}), WKV)
    with pytest.raises(CheckpointError, match="learned on model"):
        restore_wkv(tmp_path / "w", TinyModel(CFG, jax.tree.map(lambda x: x + 0.01, fp.params)), WKV)
    files = sorted(
        (p for p in (tmp_path / "w" / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[-1].write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        restore_wkv(tmp_path / "w", q, WKV)
    with pytest.raises(CheckpointError, match="no wkvquant.json"):
        restore_wkv(tmp_path / "nothing")


def test_cli_calibrate_eval_generate(model_dir, tmp_path, capsys):
    from jaxkv.cli import main

    def run_json(argv):
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    model = ["--model", str(model_dir), "--wbits", "4", "--group", "32"]
    kv = ["--kbits", "4", "--vbits", "4", "--kv-group", "8"]
    ppl = ["eval", "ppl", *model, *kv, "--data", str(model_dir / "text.txt"), "--seqlen", "16", "--windows", "3",
           "--json", "--no-progress"]  # fmt: skip
    cal = ["calibrate", *model, *kv, "--kv-method", "wkvquant", "--data", str(model_dir / "text.txt"),
           "--samples", "4", "--seqlen", "12", "--epochs", "1", "--batch-size", "2", "--crr-epochs", "1",
           "--crr-k", "2", "--crr-batch-size", "2", "--no-progress", "--json", "--out", str(tmp_path / "c")]  # fmt: skip
    rep = run_json(cal)
    assert rep["wkvquant"]["crr"]["k"] == 2 and rep["wkvquant"]["pivot_full_precision"]
    assert (tmp_path / "c" / "kvquant" / "wkvquant.json").is_file() and (tmp_path / "c" / "prefix").is_dir()
    both = run_json([*ppl, "--kv-method", "wkvquant", "--prefix", str(tmp_path / "c")])
    only = run_json([*ppl, "--kv-method", "wkvquant", "--kv-params", str(tmp_path / "c"), "--kv-pivot", "1"])
    plain = run_json([*ppl, "--kv-key-granularity", "per-token", "--kv-pivot", "1"])
    assert both["kv"]["method"] == "wkvquant" and len({both["ppl"], only["ppl"], plain["ppl"]}) == 3
    # Resumed: the finished parameters and prefix are reused, the same numbers come out.
    run_json([*cal, "--resume"])
    again = run_json([*ppl, "--kv-method", "wkvquant", "--prefix", str(tmp_path / "c")])
    np.testing.assert_allclose(again["ppl"], both["ppl"], rtol=1e-6)
    assert main(["generate", *model, *kv, "--kv-method", "wkvquant", "--prefix", str(tmp_path / "c"), "--prompt",
                 "we the", "--max-new-tokens", "4"]) == 0  # fmt: skip
    capsys.readouterr()
    # Refusals: other KV bits, other weights, no parameters at all.
    assert main([*ppl, "--kbits", "2", "--kv-method", "wkvquant", "--prefix", str(tmp_path / "c")]) == 2
    assert "KV cache" in capsys.readouterr().err
    assert main([*ppl, "--wbits", "3", "--kv-method", "wkvquant", "--kv-params", str(tmp_path / "c")]) == 2
    assert "recipe" in capsys.readouterr().err
    assert main([*ppl, "--kv-method", "wkvquant"]) == 2
    assert "needs its learned parameters" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "c")
