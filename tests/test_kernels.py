"""The decode kernels against float64 numpy (Pallas interpret mode on CPU; compiled on a GPU), the
fused projections against the unfused model, and the bench's case runner."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.config import ModelConfig
from jaxkv.kernels import kvdecode
from jaxkv.kernels import qmatmul as qk
from jaxkv.model import decode_layout, forward, fuse_projections
from jaxkv.params import init_params
from jaxkv.quant.qarray import QArray, pack, quantize_tensor, to_layout

ON_GPU = jax.default_backend() == "gpu"


def _random_q(rng, L, I, O, bits, group, sym=False):
    codes = rng.integers(0, 2**bits, (L, I, O)).astype(np.uint8)
    scale = (rng.random((L, I // group, O)) * 0.02 + 0.001).astype(np.float16)
    zero = None if sym else rng.integers(0, 2**bits, (L, I // group, O)).astype(np.uint8)
    q = QArray(pack(jnp.asarray(codes), bits), jnp.asarray(scale), None if zero is None else jnp.asarray(zero),
               bits=bits, group=group, dtype=np.dtype(jnp.bfloat16))  # fmt: skip
    z = np.full(scale.shape, 2 ** (bits - 1), np.uint8) if sym else zero
    return q, codes, scale, z


@pytest.mark.parametrize(
    "bits,M,group,config,sym",
    [
        (4, 1, 64, qk.KernelConfig(64, 2, 4, 2), False),
        (4, 5, 32, qk.KernelConfig(128, 4, 4, 2), True),
        (8, 3, 64, qk.KernelConfig(64, 1, 4, 2), False),
        (4, 17, 128, None, False),  # default tile, rows padded to 32
        (4, 2, 32, qk.KernelConfig(64, 3, 4, 2), False),  # 8 groups over 3 splits: the last is short
        (4, 1, 128, qk.KernelConfig(128, 1, 4, 2, sub_rows=16), True),  # one-row kernel, one split
        (4, 1, 32, qk.KernelConfig(256, 3, 8, 2, sub_rows=2), False),  # 8 groups over 3 splits
        (4, 1, 32, qk.KernelConfig(64, 5, 4, 2, sub_rows=16), True),  # 8 groups, 5 splits: one empty
        (4, 1, 64, qk.KernelConfig(64, 3, 1, 1, sub_rows=8), False),  # one warp, a short split
        (4, 1, 128, None, False),  # the default one-row tile: one warp, a group per program
        (4, 8, 64, qk.KernelConfig(64, 3, 4, 2), False),  # 8 rows, short split
        (4, 8, 32, qk.KernelConfig(128, 1, 8, 3), False),  # the tile of 2-16 rows: 128 columns, 8 warps
        (8, 4, 32, qk.KernelConfig(64, 2, 4, 2), True),  # int8 at 4 rows
    ],
)
def test_qmatmul_matches_float64(bits, M, group, config, sym):
    rng = np.random.default_rng(bits * 100 + M)
    L, I, O = 3, 256, 256
    q, codes, scale, zero = _random_q(rng, L, I, O, bits, group, sym)
    x = jnp.asarray(rng.standard_normal((M, I)), jnp.bfloat16)
    y = qk.qmatmul(
        x, q.packed, q.scale, qk.zero_points(q), jnp.int32(2), bits=bits, group=group, config=config,
        interpret=not ON_GPU,
    )  # fmt: skip
    ref = qk.reference(np.asarray(x.astype(jnp.float32)), codes[2], scale[2], zero[2], group)
    assert y.shape == (M, O) and y.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 4e-3  # the bf16 rounding of the output (2^-9 relative), nothing more
    # the layer index matters: another layer gives another product
    other = qk.reference(np.asarray(x.astype(jnp.float32)), codes[1], scale[1], zero[1], group)
    assert np.linalg.norm(np.asarray(y, np.float64) - other) / np.linalg.norm(other) > 0.1


@pytest.mark.parametrize(
    "M,config",
    [(1, None), (3, qk.KernelConfig(128, 1, 4, 3)), (3, qk.KernelConfig(128, 2, 4, 3))],
)
def test_qmatmul_row_scale_matches_float64(M, config):
    """``row_scale``: each output row multiplied in float32 before the rounding to bf16 (the
    one-row kernel's split sum, the tensor-core kernel with one split and with two)."""
    rng = np.random.default_rng(M + 40)
    q, codes, scale, zero = _random_q(rng, 1, 256, 256, 4, 64, False)
    x = jnp.asarray(rng.standard_normal((M, 256)), jnp.bfloat16)
    r = rng.uniform(0.01, 10.0, M).astype(np.float32)
    y = qk.qmatmul(
        x, q.packed, q.scale, q.zero, None, jnp.asarray(r), bits=4, group=64, config=config,
        interpret=not ON_GPU,
    )  # fmt: skip
    ref = qk.reference(np.asarray(x.astype(jnp.float32)), codes[0], scale[0], zero[0], 64) * r[:, None]
    assert y.shape == (M, 256) and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=8e-3, atol=1e-3 * np.abs(ref).max())


def test_norm_dense_moves_the_norm_past_the_kernel(monkeypatch):
    """``model.norm_dense`` on the quantized kernel's path (forced, run by Pallas' interpreter):
    ``norm_weight * x`` into the kernel and ``1/rms`` per output row after it, against float64 numpy
    of ``rms_norm(x) @ w``, as close as the plain order (``rms_norm`` then ``dense``) with its own
    bf16 roundings; a massive activation in one row."""
    import functools

    import jaxkv.quant.qarray as qa
    from jaxkv.model import dense, norm_dense, rms_norm

    rng = np.random.default_rng(3)
    q, codes, scale, zero = _random_q(rng, 1, 256, 384, 4, 64, False)
    w = jax.tree.map(lambda a: a[0], q)
    x = jnp.asarray(rng.standard_normal((2, 1, 256)), jnp.bfloat16).at[0, 0, 5].set(300.0)
    g = jnp.asarray(rng.uniform(0.5, 1.5, 256), jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64).reshape(2, 256)
    h64 = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + 1e-5) * np.asarray(g.astype(jnp.float32))
    ref = qk.reference(h64, codes[0], scale[0], zero[0], 64)
    plain = np.asarray(dense(rms_norm(x, g, 1e-5), w), np.float64).reshape(2, 384)
    monkeypatch.setattr(qa, "_use_kernel", lambda x, w: True)
    monkeypatch.setattr(qk, "qmatmul", functools.partial(qk.qmatmul, interpret=not ON_GPU))
    (moved,) = norm_dense(x, g, 1e-5, [w])
    moved = np.asarray(moved, np.float64).reshape(2, 384)
    for y in (plain, moved):
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 6e-3
    assert not np.array_equal(plain, moved)  # the kernel's order was taken, not the plain one
    monkeypatch.setattr(qa, "_use_kernel", lambda x, w: False)
    with pytest.raises(ValueError, match="row_scale"):
        qa.matmul(x, w, row_scale=jnp.ones((2, 1)))


def test_gemv_keeps_precision_under_an_outlier_activation():
    """The one-row kernel offsets every code by a constant it removes through the zero point; a
    massive activation (the pivot tokens' kind, 1000x the rest) must not swamp the small terms.
    float32 ``x`` gives a float32 output, so the kernel's own rounding shows, not bf16's."""
    rng = np.random.default_rng(7)
    q, codes, scale, zero = _random_q(rng, 1, 512, 256, 4, 128, False)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    x[0, 37] = 2000.0
    y = qk.qmatmul(jnp.asarray(x), q.packed, q.scale, q.zero, None, bits=4, group=128, interpret=not ON_GPU)
    ref = qk.reference(x, codes[0], scale[0], zero[0], 128)
    # the output without the outlier row: the part the outlier must not drown
    rest = ref - x[:, 37:38] * qk.reference(np.eye(512)[37:38], codes[0], scale[0], zero[0], 128)
    err = np.linalg.norm(np.asarray(y, np.float64) - ref)
    # measured in the interpreter: 4e-6 of the output, 3e-4 of the outlier-free part (bf16 keeps 4e-3)
    assert err < 2e-5 * np.linalg.norm(ref) and err < 2e-3 * np.linalg.norm(rest)


def test_default_tiles():
    """The one-row kernel: one warp, 16-byte loads, a group of 128 inputs per program (64 byte rows
    for smaller groups); the tensor-core kernel up to 16 rows: 128 columns, 4 warps, 384 programs and
    at most 8 groups each; beyond: 64 or 128 columns, up to 8 splits for two programs per SM."""
    one = qk.default_config(4096, 4096, 128, rows=1)
    assert (one.block_n, one.sub_rows, one.split_k, one.num_warps) == (128, 4, 32, 1)
    assert qk.default_config(11008, 4096, 128, rows=1).split_k == 86  # 86 groups, one each
    assert qk.default_config(4096, 4096, 32, rows=1).split_k == 32  # 128 groups of 32, four each
    assert (
        qk.default_config(576, 1536, 64, rows=1).split_k,
        qk.default_config(1536, 576, 64, rows=1).block_n,
    ) == (5, 64)
    tiles = {
        shape: qk.default_config(*shape, 128, rows=8)
        for shape in ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))
    }
    assert {s: (t.block_n, t.split_k, t.num_warps) for s, t in tiles.items()} == {
        (4096, 12288): (128, 4, 4),  # 96 column blocks x 4 = 384 programs of 8 groups
        (4096, 4096): (128, 16, 4),  # 32 x 16 = 512
        (4096, 22016): (128, 4, 4),  # 172 x 4 = 688 programs of 8 groups (x 2 would hold 16)
        (11008, 4096): (128, 16, 4),  # 86 groups: 16 splits of at most 6
    }
    tc = qk.default_config(4096, 12288, 128, rows=32)
    assert (tc.block_n, tc.split_k) == (64, 2)


def test_qmatmul_rejects_tile_that_does_not_divide():
    rng = np.random.default_rng(0)
    q, *_ = _random_q(rng, 1, 128, 128, 4, 64)
    with pytest.raises(ValueError, match="does not divide"):
        qk.qmatmul(
            jnp.ones((1, 128), jnp.bfloat16), q.packed, q.scale, q.zero, jnp.int32(0), bits=4, group=64,
            config=qk.KernelConfig(256, 1), interpret=True,
        )  # fmt: skip


def _tiny_cfg():
    return ModelConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, max_position_embeddings=128,
    )  # fmt: skip


def test_fused_projections_equal_separate():
    cfg = _tiny_cfg()
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    ref, _ = forward(params, tokens, pos, None, cfg)
    fused = fuse_projections(params)
    assert "wqkv" in fused["layers"] and "wq" not in fused["layers"] and "w_gate_up" in fused["layers"]
    assert fused["layers"]["wqkv"].shape == (2, 64, 64 + 2 * 32)
    out, _ = forward(fused, tokens, pos, None, cfg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # QArrays fuse along the output axis too: same logits as the separate quantized matrices
    layers = {
        k: (quantize_tensor(v, 4, 32) if k in ("wq", "wk", "wv", "w_gate", "w_up") else v)
        for k, v in params["layers"].items()
    }
    qparams = {**params, "layers": layers}
    qref, _ = forward(qparams, tokens, pos, None, cfg)
    qfused = fuse_projections(qparams)
    assert isinstance(qfused["layers"]["wqkv"], QArray) and qfused["layers"]["wqkv"].shape == (2, 64, 128)
    qout, _ = forward(qfused, tokens, pos, None, cfg)
    np.testing.assert_allclose(np.asarray(qout), np.asarray(qref), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="the compiled kernel runs on a GPU only")
@pytest.mark.parametrize("layout", ["io", "oi"])
def test_decode_with_kernel_matches_xla_path(monkeypatch, layout):
    """Greedy decode logits of an int4 model: the Pallas kernel path (the tensor-core kernel for the
    prefill's 2 x 11 rows and the decode step's 2 rows) against the portable XLA one."""
    from jaxkv.kvcache import init_cache

    cfg = ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4, num_kv_heads=2,
        head_dim=64, max_position_embeddings=256,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(1), jnp.bfloat16)
    layers = {k: (quantize_tensor(v, 4, 64) if v.ndim == 3 else v) for k, v in params["layers"].items()}
    params = fuse_projections({**params, "layers": layers})
    params = jax.tree.map(lambda w: to_layout(w, layout) if isinstance(w, QArray) else w, params,
                          is_leaf=lambda w: isinstance(w, QArray))  # fmt: skip
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))

    def run():
        cache = init_cache(cfg, 2, 16, jnp.bfloat16)
        _, cache = jax.jit(forward, static_argnames="cfg")(params, tokens[:, :11], pos[:, :11], cache, cfg)
        logits, _ = jax.jit(forward, static_argnames="cfg")(params, tokens[:, 11:], pos[:, 11:], cache, cfg)
        return np.asarray(logits, np.float64)

    monkeypatch.setenv("JAXKV_QMATMUL", "auto")
    fast = run()
    jax.clear_caches()
    monkeypatch.setenv("JAXKV_QMATMUL", "xla")
    slow = run()
    assert np.linalg.norm(fast - slow) / np.linalg.norm(slow) < 2e-2


def test_bench_case_runs_and_reports(monkeypatch):
    from jaxkv import bench, config

    monkeypatch.setenv("JAXKV_QMATMUL", os.environ.get("JAXKV_QMATMUL", "auto"))
    # SmolLM2's shape with 4 of its 30 layers: the decode step unrolls its layers, so compiling 30
    # took most of this test's minute on 2 cores, and the report does not depend on the count
    full = config.shape_config
    monkeypatch.setattr(config, "shape_config", lambda name: dataclasses.replace(full(name), num_layers=4))
    case = bench.Case(
        "smollm2-135m", weights="int4", batch=2, prompt=16, new_tokens=4, kv="K4V2", group=64, repeats=1
    )
    r = bench.run_case(case)
    assert r["ms_per_token"] > 0 and r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    # bytes a step reads: the int4 linears (~0.27x of their fp16 bytes) + embeddings/norms + KV
    assert 20e6 < r["step_bytes"] < 200e6
    text = bench.markdown(
        {"shape": "smollm2-135m", "copy_gbps": 10.0, "new_tokens": 4, "cases": [r], "peers": []}
    )
    assert "int4 b2 p16 kv=K4V2" in text
    assert bench.parse_kv("bf16") is None and bench.parse_kv("K4V2-g64").group == 64
    assert 0 < bench.copy_bandwidth(1 << 20, repeats=3, warmup_s=0.01) < 1e5
    with pytest.raises(Exception, match="bad KV spec"):
        bench.parse_kv("4/2")


def test_bench_rejects_unknown_modes_before_running():
    import argparse

    from jaxkv import bench
    from jaxkv.errors import JaxkvError

    p = argparse.ArgumentParser()
    bench.add_args(p)
    cases = (
        ("--qmatmul", "auto,tensor"),
        ("--kv-decode", "flash"),
        ("--weights", "int3"),
        ("--peers", "hf,vllm"),
    )
    for flag, value in cases:
        with pytest.raises(JaxkvError, match=flag):
            bench.run(p.parse_args([flag, value, "--out", "/nonexistent/never-written"]))
    # a group that does not divide a linear's input dimension (4096), named before any case runs
    with pytest.raises(JaxkvError, match="--group: wq: group size 96 does not divide .* 4096"):
        bench.run(
            p.parse_args(["--weights", "bf16,int4", "--group", "96", "--out", "/nonexistent/never-written"])
        )
    from jaxkv.kvattention import DECODE_IMPLS

    assert set(bench.KV_DECODES) == set(DECODE_IMPLS)  # the bench offers every JAXKV_KV_DECODE


@pytest.mark.parametrize("kv,pivot", [(None, None), ("K4V2-g16", None), (None, [11, 3]), ("K4V2-g16", [11])])
def test_decode_layout_generates_the_same_tokens(kv, pivot):
    """Unstacked, fused layers (a Python loop over layers, the cache one buffer per layer, updated in
    place) decode exactly like the stacked scan over a stacked cache: same greedy tokens, with and
    without IntactKV pivot tokens (attended apart from the body, never concatenated with it)."""
    from jaxkv.bench import parse_kv
    from jaxkv.generate import generate
    from jaxkv.prefix import make_prefix

    class M:
        pass

    cfg = _tiny_cfg()
    params = init_params(cfg, jax.random.key(3), jnp.float32)
    layers = {
        k: (quantize_tensor(v, 4, 32) if k in ("wq", "wo", "w_up") else v)
        for k, v in params["layers"].items()
    }
    a, b, full = M(), M(), M()
    a.cfg = b.cfg = full.cfg = cfg
    a.params = {**params, "layers": layers}
    b.params = decode_layout(a.params)
    full.params = params
    assert isinstance(b.params["layers"], tuple) and len(b.params["layers"]) == cfg.num_layers
    prefix = None if pivot is None else make_prefix(full, pivot)
    prompts = [[1, 5, 9, 2, 7], [3, 4]]
    kw = dict(max_new_tokens=12, kv=parse_kv(kv) if kv else None, stop_at_eos=False)
    ra, rb = generate(a, prefix, prompts, **kw), generate(b, prefix, prompts, **kw)
    assert ra.tokens == rb.tokens and len(ra.tokens[0]) == 12


@pytest.mark.parametrize(
    "bits,M,group,config,sym",
    [
        (4, 8, 32, qk.KernelConfig(128, 1, 4, 3), False),  # the batch-8 tile, one split
        (4, 2, 64, qk.KernelConfig(64, 3, 4, 2), True),  # 4 groups over 3 splits: the last is short
        (4, 1, 128, None, False),  # one row in this layout takes the tensor-core kernel
        (4, 33, 32, None, False),  # rows padded to 64
        (4, 5, 256, None, True),  # one group spans the inputs
        (8, 8, 64, None, False),  # 8-bit codes, transposed
        (8, 3, 32, qk.KernelConfig(64, 3, 4, 2), True),
    ],
)
def test_qmatmul_decode_layout_matches_float64(bits, M, group, config, sym):
    """The kernel over codes packed along the inputs (``layout="oi"``) against float64 numpy, on the
    stacked weight with a layer offset."""
    rng = np.random.default_rng(M * 10 + group + bits)
    L, I, O = 3, 256, 256
    q, codes, scale, zero = _random_q(rng, L, I, O, bits, group, sym)
    oi = to_layout(q, "oi")
    x = jnp.asarray(rng.standard_normal((M, I)), jnp.bfloat16)
    y = qk.qmatmul(
        x, oi.packed, oi.scale, qk.zero_points(oi), jnp.int32(2), bits=bits, group=group, layout="oi",
        config=config, interpret=not ON_GPU,
    )  # fmt: skip
    ref = qk.reference(np.asarray(x.astype(jnp.float32)), codes[2], scale[2], zero[2], group)
    assert y.shape == (M, O) and y.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref) < 4e-3
    other = qk.reference(np.asarray(x.astype(jnp.float32)), codes[1], scale[1], zero[1], group)
    assert np.linalg.norm(np.asarray(y, np.float64) - other) / np.linalg.norm(other) > 0.1


def test_decode_layout_packs_4bit_weights_for_the_batch(monkeypatch):
    """``decode_layout(batch=8)`` repacks the 4-bit weights where the GPU kernel would take them
    (simulated here) and leaves other weights and one-row decode alone; the repacked model generates
    the same tokens (through the XLA path, which reads either packing, on any backend)."""
    from jaxkv.generate import generate
    from jaxkv.quant import qarray as qa

    class M:
        pass

    cfg = _tiny_cfg()
    params = init_params(cfg, jax.random.key(3), jnp.bfloat16)  # the kernel takes 16-bit x
    bits = {"w_down": 8, "wo": 3}
    layers = {k: (quantize_tensor(v, bits.get(k, 4), 32) if v.ndim == 3 else v)
              for k, v in params["layers"].items()}  # fmt: skip
    a, b = M(), M()
    a.cfg = b.cfg = cfg
    monkeypatch.setenv("JAXKV_QMATMUL", "xla")  # the kernels off (also on a GPU)
    jax.clear_caches()  # traces made with the kernels on
    a.params = decode_layout({**params, "layers": layers}, batch=8)
    assert {w.layout for w in a.params["layers"][0].values() if isinstance(w, QArray)} == {"io"}
    with monkeypatch.context() as m:
        m.setattr(qa, "_kernels_enabled", lambda: True)
        assert decode_layout({**params, "layers": layers}, batch=1)["layers"][0]["wqkv"].layout == "io"
        b.params = decode_layout({**params, "layers": layers}, batch=8)
    lp = b.params["layers"][1]
    assert lp["wqkv"].layout == lp["w_gate_up"].layout == "oi"
    assert lp["wo"].layout == lp["w_down"].layout == "io"  # 3-bit (no kernel) and 8-bit (not timed yet)
    prompts = [[1, 5, 9, 2, 7], [3, 4]]
    kw = dict(max_new_tokens=8, stop_at_eos=False)
    assert generate(a, None, prompts, **kw).tokens == generate(b, None, prompts, **kw).tokens


@pytest.mark.parametrize("bits,M", [(4, 8), (8, 8), (4, 1)])
def test_qmatmul_float16_rows(bits, M):
    """float16 ``x``: its codes carry the offset 1024 (the f16 exponent byte 0x64), not bf16's 128."""
    rng = np.random.default_rng(11 + bits + M)
    q, codes, scale, zero = _random_q(rng, 2, 256, 128, bits, 32)
    x = jnp.asarray(rng.standard_normal((M, 256)), jnp.float16)
    y = qk.qmatmul(x, q.packed, q.scale, q.zero, jnp.int32(1), bits=bits, group=32, interpret=not ON_GPU)
    ref = qk.reference(np.asarray(x.astype(jnp.float32)), codes[1], scale[1], zero[1], 32)
    assert y.dtype == jnp.float16
    assert np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref) < 1e-3  # f16 output rounding


@pytest.mark.parametrize("M", [1, 3])
def test_qmatmul_single_layer_without_offset(M):
    """``layer=None``: one [1, ...] weight read as 2-D refs (the path of decode_layout's weights)."""
    rng = np.random.default_rng(7 + M)
    q, codes, scale, zero = _random_q(rng, 1, 256, 128, 4, 64)
    x = jnp.asarray(rng.standard_normal((M, 256)), jnp.bfloat16)
    y = qk.qmatmul(x, q.packed, q.scale, q.zero, None, bits=4, group=64, interpret=not ON_GPU)
    ref = qk.reference(np.asarray(x.astype(jnp.float32)), codes[0], scale[0], zero[0], 64)
    assert np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref) < 4e-3


def _heads(q: np.ndarray) -> jax.Array:
    """float32 queries ``[B, K, G, H]`` as the kernels' step heads (no new key or value)."""
    B, K, G, H = q.shape
    z = jnp.zeros((B, 1, K, H), jnp.float32)
    return kvdecode.step_heads(jnp.asarray(q).reshape(B, 1, K * G, H), z, z)


@pytest.mark.parametrize(
    "kbits,vbits,group,G,H,S,dtype,chunks,sub",
    [
        (4, 2, 32, 1, 128, 32 * 12, "bfloat16", 1, None),  # one program, three tiles
        (4, 2, 32, 1, 128, 32 * 41, "bfloat16", 3, 128),  # the last tile moved back in bounds
        (4, 2, 32, 1, 128, 32 * 40, "float32", 2, 64),
        (4, 2, 64, 1, 128, 64 * 5, "bfloat16", 2, 32),  # tiles inside one key group
        (2, 4, 8, 4, 64, 8 * 11, "bfloat16", 2, None),
        (8, 8, 16, 2, 32, 16 * 5, "bfloat16", 1, None),
        (4, 4, 16, 8, 64, 16 * 9, "float32", 3, None),
        (4, 4, 16, 8, 64, 16 * 9, "bfloat16", 3, None),
    ],
)
def test_kv_decode_partials_match_float64(kbits, vbits, group, G, H, S, dtype, chunks, sub):
    """The decode kernel's per-chunk maximum, exponential sum and weighted values against float64
    numpy over a random packed cache; chunks past n_read (0, partial, all) are empty. Its products
    take operands in ``dtype`` (q * key scale, p * value scale, as the XLA path does): the
    tolerances follow from their rounding."""
    from jaxkv.kvcache import pack_codes

    rng = np.random.default_rng(kbits * 10 + vbits + G + S)
    B, K, J, C = 3, 2, S // group, H // group
    q = (rng.standard_normal((B, K, G, H)) / np.sqrt(H)).astype(np.float32)
    kcodes = rng.integers(0, 2**kbits, (B, S, K, H))
    vcodes = rng.integers(0, 2**vbits, (B, S, K, H))
    ks = (rng.random((B, J, K, H)) * 0.3 + 0.01).astype(np.float32)
    kz = rng.integers(-8, min(2**kbits + 8, 128), (B, J, K, H)).astype(np.int8)
    vs = (rng.random((B, S, K, C)) * 0.3 + 0.01).astype(np.float32)
    vz = rng.integers(-8, min(2**vbits + 8, 128), (B, S, K, C)).astype(np.int8)
    n_read = np.array([0, group * 5, S], np.int32)  # nothing, a chunk or part of one, everything

    def head_major(a):  # the cache's layout: [B, S | J, K, X] -> [B, K, S | J, X]
        return jnp.swapaxes(jnp.asarray(a), 1, 2)

    m, l, o = kvdecode.body_partials(
        _heads(q), jnp.asarray(n_read), head_major(pack_codes(jnp.asarray(kcodes, jnp.uint8), kbits)),
        head_major(ks), head_major(kz), head_major(pack_codes(jnp.asarray(vcodes, jnp.uint8), vbits)),
        head_major(vs), head_major(vz), kbits=kbits, vbits=vbits, group=group, sm_scale=1.0, dtype=dtype,
        chunks=chunks, sub_slots=sub, interpret=not ON_GPU,
    )  # fmt: skip
    eps = 2.0**-9 if dtype == "bfloat16" else 2.0**-20  # operand rounding (float32: with slack)
    tile = kvdecode.tile_slots(S, group, G, sub)
    cs = -(-S // (chunks * tile)) * tile  # slots per program
    NC = -(-S // cs)
    assert m.shape == l.shape == (B, K, NC, G) and o.shape == (B, K, NC, G, H)
    kf = (kcodes - np.repeat(kz, group, axis=1).astype(np.float64)) * np.repeat(ks, group, axis=1)
    vf = (vcodes - np.repeat(vz, group, axis=3).astype(np.float64)) * np.repeat(vs, group, axis=3)
    for b in range(B):
        for c in range(NC):
            lo, hi = c * cs, min((c + 1) * cs, int(n_read[b]))
            if hi <= lo:
                assert np.all(np.asarray(l[b, :, c]) == 0) and np.all(np.asarray(o[b, :, c]) == 0)
                assert np.all(np.asarray(m[b, :, c]) < -1e29)
                continue
            s = np.einsum("KGH,SKH->KGS", q[b].astype(np.float64), kf[b, lo:hi])
            # the rounding of each q * scale bounds the scores' error, with float32 sums of H terms
            # whose codes carry an offset of 128 (2^-24 per addition, bounded linearly)
            ks_rep = np.repeat(ks, group, axis=1)[b, lo:hi]
            sums = H * 2.0**-24 * (256 + 2**kbits) * np.einsum("KGH,SKH->KGS", np.abs(q[b]), ks_rep)
            ds = (eps * np.einsum("KGH,SKH->KGS", np.abs(q[b]), np.abs(kf[b, lo:hi])) + sums).max()
            mr = s.max(-1)
            e = np.exp(s - mr[..., None])
            np.testing.assert_allclose(np.asarray(m[b, :, c]), mr, atol=ds)
            np.testing.assert_allclose(np.asarray(l[b, :, c]), e.sum(-1), rtol=2 * ds)
            ref = np.einsum("KGS,SKH->KGH", e, vf[b, lo:hi])
            # and that of each p * scale, with float32 sums over the slots (codes offset by 128)
            vs_rep = np.repeat(vs, group, axis=3)[b, lo:hi]
            bound = (2 * ds + 2 * eps) * np.einsum("KGS,SKH->KGH", e, np.abs(vf[b, lo:hi]))
            bound += (hi - lo) * 2.0**-24 * (256 + 2**vbits) * np.einsum("KGS,SKH->KGH", e, vs_rep)
            assert np.all(np.abs(np.asarray(o[b, :, c]) - ref) <= bound + 1e-6)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_kv_decode_planes_split_columns_as_the_strided_loads_did(n):
    """The key scales and zero points load contiguously and split into code planes in registers:
    plane ``k`` must hold columns ``n m + k`` (what a strided load gave), and :func:`_interleave`
    must put them back."""
    x = jnp.arange(3 * 8 * n, dtype=jnp.float32).reshape(3, 8 * n)
    planes = kvdecode._planes(x, n)
    assert len(planes) == n
    for k, plane in enumerate(planes):
        np.testing.assert_array_equal(np.asarray(plane), np.asarray(x)[:, k::n])
    np.testing.assert_array_equal(np.asarray(kvdecode._interleave(planes)), np.asarray(x))


def test_decode_impl_defaults_to_the_kernel_on_a_gpu_only(monkeypatch):
    """Without JAXKV_KV_DECODE the model reads a quantized cache through the decode kernel on a GPU
    and through XLA elsewhere (where the kernel would run in Pallas' interpreter); the variable
    overrides both and is checked."""
    from jaxkv import kvattention

    monkeypatch.delenv("JAXKV_KV_DECODE", raising=False)
    for backend, impl in (("gpu", "kernel"), ("cpu", "folded"), ("tpu", "folded")):
        monkeypatch.setattr(kvattention.jax, "default_backend", lambda b=backend: b)
        assert kvattention.decode_impl() == impl
        monkeypatch.setenv("JAXKV_KV_DECODE", "xla")
        assert kvattention.decode_impl() == "folded"
        monkeypatch.setenv("JAXKV_KV_DECODE", "kernel")
        assert kvattention.decode_impl() == "kernel"
        monkeypatch.delenv("JAXKV_KV_DECODE")
    monkeypatch.setenv("JAXKV_KV_DECODE", "flash")
    with pytest.raises(ValueError, match="JAXKV_KV_DECODE"):
        kvattention.decode_impl()


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float16", "bfloat16"])
def test_round_up_scale_equals_kvcache(dtype):
    """The kernel's rounding of scales (next value by exponent arithmetic) against ``jaxkv.kvcache``'s
    (next bit pattern), eagerly (no compiler to fold the round trip): the same stored scales, on
    random values over the whole range, on the dtype's own values and just above and below them."""
    from jaxkv.kernels.kvdecode import round_up_scale
    from jaxkv.kvcache import _store_scale

    rng = np.random.default_rng(3)
    info = jnp.finfo(dtype)
    lo, hi = np.log2(float(info.smallest_subnormal)) - 2, np.log2(float(info.max)) + 1
    s = 2.0 ** rng.uniform(max(lo, -140), hi, 4000)
    inside = np.clip(s, float(info.smallest_subnormal), float(info.max))  # no overflow to inf or NaN
    exact = np.asarray(jnp.asarray(inside, jnp.float32).astype(dtype).astype(jnp.float32))
    s = np.concatenate([s, exact, np.nextafter(exact, 0), np.nextafter(exact, np.inf)]).astype(np.float32)
    with jax.disable_jit():
        got = round_up_scale(jnp.asarray(s), dtype)
        want = _store_scale(jnp.asarray(s), jnp.dtype(dtype))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    bad = np.asarray(got, np.float32) < np.minimum(s, float(info.max))
    assert not bad.any(), (s[bad][:5], np.asarray(got, np.float32)[bad][:5])  # rounded up: covers the range


@pytest.mark.parametrize(
    "kbits,vbits,group,residual,scale_dtype",
    [
        (4, 2, 32, 0, "float8_e4m3fn"),  # the default cache: K4V2, key ring of 31, no value ring
        (2, 4, 16, 3, "bfloat16"),  # value ring of 3
        (8, 8, 16, 0, "float16"),
        (4, 4, 8, 2, "float32"),
    ],
)
def test_kv_token_write_matches_write_side(kbits, vbits, group, residual, scale_dtype):
    """One decode token per sequence written by ``merge`` (into the body and the rings) against
    ``write_side`` (XLA), bit for bit: codes, scales, zero points and rings; rows that complete a key
    group, that do not, and a padding row that writes nothing."""
    from jaxkv.kvattention import window_view, write_side
    from jaxkv.kvcache import KVQuantConfig, frontier, init_cache

    B, K, H = 3, 2, 64
    S = 4 * group
    kv = KVQuantConfig(kbits, vbits, group=group, residual=residual, scale_dtype=scale_dtype)
    cfg = ModelConfig(vocab_size=8, hidden_size=K * H, intermediate_size=8, num_layers=1, num_heads=K,
                      num_kv_heads=K, head_dim=H)  # fmt: skip
    seg = init_cache(cfg, B, S, jnp.bfloat16, kv=kv).segments[0]
    ks, vs = (jax.tree.map(lambda a: a[0], side) for side in (seg.k, seg.v))
    rng = np.random.default_rng(kbits + vbits + group)
    lengths = np.array([group - 1, 2 * group + 5, 3])  # row 0 completes a group on the next token

    def tokens(T):
        x = rng.standard_normal((B, T, K, H)) + rng.standard_normal((1, 1, K, H)) * 3  # channel offsets
        return jnp.asarray(x, jnp.bfloat16)

    def write(ks, vs, k, v, slot, n_old, n_new):
        kview, kbase = window_view(ks, k, n_old)
        vview, vbase = window_view(vs, v, n_old)
        return write_side(ks, k, slot, n_old, n_new, kview, kbase), write_side(
            vs, v, slot, n_old, n_new, vview, vbase
        )

    # the prompts, written by XLA
    T = int(lengths.max())
    slot = np.where(np.arange(T)[None] < lengths[:, None], np.arange(T)[None], S)
    zero = jnp.zeros((B,), jnp.int32)
    ks, vs = write(ks, vs, tokens(T), tokens(T), jnp.asarray(slot), zero, jnp.asarray(lengths, jnp.int32))
    # one decode token; row 2 is padding
    k, v = tokens(1), tokens(1)
    real = np.array([1, 1, 0])
    n_old = jnp.asarray(lengths, jnp.int32)
    n_new = n_old + jnp.asarray(real, jnp.int32)
    slot = jnp.asarray(np.where(real, lengths, S)[:, None], jnp.int32)
    want_k, want_v = write(ks, vs, k, v, slot, n_old, n_new)

    i = n_old[:, None]
    meta = jnp.stack([n_old, frontier(i, ks.spec, kv)[:, 0], frontier(i, vs.spec, kv)[:, 0], n_new], axis=1)
    interpret = not ON_GPU
    bits = dict(kbits=kbits, vbits=vbits, group=group)
    q = jnp.asarray(rng.standard_normal((B, 1, K, H)), jnp.bfloat16)
    heads = kvdecode.step_heads(q, k, v)
    body = (ks.data, ks.scale, ks.zero, vs.data, vs.scale, vs.zero)
    m, l, o = kvdecode.body_partials(heads, meta[:, 1], *body, **bits, sm_scale=1.0, interpret=interpret)
    pivot = jnp.zeros((0, K, H), jnp.bfloat16)
    _, kring, vring, body = kvdecode.merge(
        heads, n_old, pivot, pivot, m, l, o, (ks.window, vs.window, meta, *body), **bits, sm_scale=1.0,
        out_dtype=jnp.float32, interpret=interpret,
    )  # fmt: skip
    got = dict(zip(["kdata", "kscale", "kzero", "vdata", "vscale", "vzero"], body), kring=kring, vring=vring)
    want = {
        "kdata": want_k.data, "kscale": want_k.scale, "kzero": want_k.zero, "vdata": want_v.data,
        "vscale": want_v.scale, "vzero": want_v.zero, "kring": want_k.window, "vring": want_v.window,
    }  # fmt: skip
    assert (vring is None) == (residual == 0)
    for name, w in want.items():
        if w is None:
            continue
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(
            np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)), err_msg=name
        )
    # the step wrote something: row 0's new key group, rows 0 and 1's values
    assert not np.array_equal(
        np.asarray(ks.scale.astype(jnp.float32)), np.asarray(want["kscale"].astype(jnp.float32))
    )
    assert not np.array_equal(np.asarray(vs.data), np.asarray(want["vdata"]))


@pytest.mark.parametrize(
    "P,G,dtype", [(0, 1, "bfloat16"), (5, 4, "bfloat16"), (20, 1, "float32"), (3, 2, "float32")]
)
def test_kv_merge_matches_float64(P, G, dtype):
    """``merge``: one softmax over the pivot slots and every chunk's partials against float64 numpy,
    with pivot counts that pad to 16 and 32 rows, a query that sees only part of the pivot
    (position 2), a padding query (-1: no pivot, an empty body) and chunks that are empty."""
    rng = np.random.default_rng(P * 10 + G)
    B, K, H, NC = 3, 2, 64, 5
    q = (rng.standard_normal((B, K, G, H)) / 8).astype(np.float32)
    pk = rng.standard_normal((P, K, H)).astype(np.float32)
    pv = rng.standard_normal((P, K, H)).astype(np.float32)
    m = rng.standard_normal((B, K, NC, G)).astype(np.float32)
    l = (rng.random((B, K, NC, G)) * 4 + 0.5).astype(np.float32)
    o = (rng.standard_normal((B, K, NC, G, H)) * l[..., None]).astype(np.float32)
    m[:, :, 3] = -1e30  # an empty chunk
    l[:, :, 3] = o[:, :, 3] = 0
    positions = np.array([100, 2, -1], np.int32)
    m[2], l[2], o[2] = -1e30, 0, 0  # the padding row: nothing in the body either
    if dtype == "bfloat16":  # the pivot operands enter the products rounded, as the kernel takes them
        pk, pv = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (pk, pv))
    out = kvdecode.merge(
        _heads(q), jnp.asarray(positions), jnp.asarray(pk), jnp.asarray(pv), jnp.asarray(m), jnp.asarray(l),
        jnp.asarray(o), sm_scale=1.0, out_dtype=jnp.float32, dtype=dtype, interpret=not ON_GPU,
    )  # fmt: skip
    assert out.shape == (B, K, G, H) and out.dtype == jnp.float32
    qd = q.astype(np.float64)
    if dtype == "bfloat16":
        qd = np.asarray(jnp.asarray(q, jnp.bfloat16), np.float64)
    s = np.einsum("BKGH,PKH->BKGP", qd, pk.astype(np.float64))
    visible = np.arange(P)[None, :] <= positions[:, None]  # [B, P]
    s = np.where(visible[:, None, None, :], s, -np.inf)
    mx = np.maximum(s.max(-1, initial=-np.inf), m.max(2).astype(np.float64))  # [B, K, G]
    e = np.exp(s - mx[..., None])
    w = np.exp(m - mx[:, :, None, :])
    denom = e.sum(-1) + (l * w).sum(2)
    denom = np.where(denom > 0, denom, 1.0)
    want = (np.einsum("BKGP,PKH->BKGH", e, pv) + np.einsum("BKCG,BKCGH->BKGH", w, o)) / denom[..., None]
    assert np.all(want[2] == 0)
    # bf16 products: e / denom rounded to bf16 (2^-9 relative) times |v| summed over the pivot; float32:
    # summation order
    tol = 4e-3 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "P,G,S,dtype,chunks",
    [
        (0, 1, 70, "float32", 1),  # tiles of 64: the second one runs past the body and is masked
        (5, 2, 70, "float32", 1),
        (3, 4, 130, "bfloat16", 1),
        (20, 1, 33, "bfloat16", 1),  # a pivot longer than one tensor-core tile
        (5, 2, 300, "float32", 3),  # chunks of 128 slots, combined by merge with the pivot
        (0, 1, 200, "bfloat16", 4),  # chunks of 64: those past a query empty
    ],
)
def test_fp_decode_matches_float64(P, G, S, dtype, chunks):
    """``fpdecode.attend``: one decode query per sequence over the pivot slots, the unquantized body
    and the new token in one softmax (with ``chunks``, the slots split over programs and combined by
    ``kvdecode.merge``), against float64 numpy; the token lands in its slot and nothing else in the
    cache moves. Rows: a query deep in the body, one inside the pivot segment (sees part
    of it, writes nothing), padding (-1: sees nothing, writes nothing), the body's last slot."""
    from jaxkv.kernels import fpdecode

    rng = np.random.default_rng(P + 10 * G + S)
    B, K, H = 4, 2, 64
    N = K * G
    dt = jnp.dtype(dtype)

    def arr(*shape):  # values as the kernel holds them (rounded to dtype)
        return np.asarray(jnp.asarray(rng.standard_normal(shape), dt).astype(jnp.float32), np.float64)

    q, kn, vn = arr(B, 1, N, H), arr(B, 1, K, H), arr(B, 1, K, H)
    ck, cv, pk, pv = arr(B, S, K, H), arr(B, S, K, H), arr(P, K, H), arr(P, K, H)
    positions = np.array([P + S // 2, min(P, 3) - 1 if P else -1, -1, P + S - 1], np.int32)
    heads = kvdecode.step_heads(*(jnp.asarray(a, dt) for a in (q, kn, vn)))
    scale = float(np.float32(1 / np.sqrt(H)))
    out, k2, v2 = fpdecode.attend(
        heads, jnp.asarray(positions), *(jnp.asarray(a, dt) for a in (pk, pv, ck, cv)), sm_scale=scale,
        dtype=dt, chunks=chunks, interpret=not ON_GPU,
    )  # fmt: skip
    assert out.shape == (B, K, G, H) and out.dtype == dt
    want_k, want_v = ck.copy(), cv.copy()
    for b in range(B):
        slot = positions[b] - P
        if 0 <= slot < S:
            want_k[b, slot], want_v[b, slot] = kn[b, 0], vn[b, 0]
    np.testing.assert_array_equal(np.asarray(k2.astype(jnp.float32)), want_k)
    np.testing.assert_array_equal(np.asarray(v2.astype(jnp.float32)), want_v)
    keys = np.concatenate([np.broadcast_to(pk, (B, P, K, H)), want_k], axis=1)  # [B, P + S, K, H]
    values = np.concatenate([np.broadcast_to(pv, (B, P, K, H)), want_v], axis=1)
    s = np.einsum("BKGH,BSKH->BKGS", q[:, 0].reshape(B, K, G, H), keys) * scale
    visible = np.arange(P + S)[None, :] <= positions[:, None]  # [B, P + S]
    s = np.where(visible[:, None, None, :], s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True, initial=-1e300))
    denom = e.sum(-1, keepdims=True)
    want = np.einsum("BKGS,BSKH->BKGH", e / np.where(denom > 0, denom, 1), values)
    assert np.all(want[2] == 0) and np.all(np.asarray(out[2], np.float64) == 0)
    # bf16: probabilities rounded to bf16 (2^-9 relative) before the value product, the output rounded
    tol = 2e-2 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32), np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("layout,split", [("stacked", False), ("decode", True)])
def test_fp_decode_kernel_generates_like_xla(monkeypatch, layout, split):
    """Greedy generation over an unquantized float32 cache: the decode kernel
    (``JAXKV_KV_DECODE=kernel``; Pallas' interpreter off the GPU) and the XLA path give the same
    tokens with IntactKV pivot tokens (none: the float64 tests), in the stacked layout with one
    chunk and in the decode layout with the slots split over programs (partials combined by
    ``kvdecode.merge``)."""
    from jaxkv.generate import generate
    from jaxkv.kernels import fpdecode
    from jaxkv.prefix import make_prefix

    if split:
        monkeypatch.setattr(fpdecode, "chunks", lambda *a: 2)

    class M:
        pass

    m = M()
    m.cfg = _tiny_cfg()
    params = init_params(m.cfg, jax.random.key(5), jnp.float32)
    m.params = params
    prefix = make_prefix(m, [11, 3])
    if layout == "decode":
        m.params = decode_layout(params)
    prompts = [[1, 5, 9, 2, 7], [3, 4]]
    runs = {}
    for impl in ("xla", "kernel"):
        monkeypatch.setenv("JAXKV_KV_DECODE", impl)
        jax.clear_caches()
        runs[impl] = generate(m, prefix, prompts, max_new_tokens=10, stop_at_eos=False).tokens
    assert runs["kernel"] == runs["xla"] and len(runs["kernel"][0]) == 10


def test_fp_decode_splits_long_caches_only_when_the_heads_do_not_fill_the_gpu():
    """``fpdecode.chunks``: one program per sequence and KV head for a short cache or enough of them;
    else the slots split until every core has a program, each chunk at least CHUNK_SLOTS long."""
    from jaxkv.kernels import fpdecode

    assert fpdecode.CHUNK_SLOTS == 1024
    assert fpdecode.chunks(1, 32, 256, 132) == 1  # batch 1, short: one launch
    assert fpdecode.chunks(8, 32, 4224, 132) == 1  # 256 programs fill an H100
    assert fpdecode.chunks(1, 32, 4224, 132) == 5  # 32 heads x 5 chunks of at least 1024 slots
    assert fpdecode.chunks(1, 8, 2048, 132) == 2  # capped by the cache's length
    assert fpdecode.chunks(1, 32, 4224, 0) == 1  # no cores known (CPU: the interpreter)


def test_kv_decode_splits_the_body_until_every_core_has_its_programs():
    """``kvdecode.chunks``: the quantized body split until each core has PROGRAMS_PER_CORE programs,
    each at least MIN_CHUNK_SLOTS long; one program per sequence and KV head when they suffice."""
    from jaxkv.kernels import kvdecode

    assert (kvdecode.PROGRAMS_PER_CORE, kvdecode.MIN_CHUNK_SLOTS) == (2, 1024)
    assert kvdecode.chunks(8, 32, 4352, 132) == 2  # 256 programs: a second chunk gives 512 >= 264
    assert kvdecode.chunks(32, 32, 4352, 132) == 1  # 1024 programs
    assert kvdecode.chunks(1, 32, 4352, 132) == 5  # capped by the cache: 5 chunks of >= 1024 slots
    assert kvdecode.chunks(1, 32, 300, 132) == 1  # short
    assert kvdecode.chunks(1, 32, 4352, 0) == 1  # no cores known (CPU)


def _sumsq_parts(x64: np.ndarray, n: int) -> np.ndarray:
    """Partial sums of squares ``[n, M]`` of rows ``x64 [M, D]`` over ``n`` column blocks."""
    return np.stack([(c**2).sum(axis=1) for c in np.array_split(x64, n, axis=1)]).astype(np.float32)


@pytest.fixture
def force_epilogues(monkeypatch):
    """The epilogues forced on: ``qmatmul(..., partials=True)`` and ``epilogue.launch`` (Pallas'
    interpreter off the GPU)."""
    import functools

    import jaxkv.quant.qarray as qa
    from jaxkv.kernels import epilogue

    monkeypatch.setattr(qa, "_use_kernel", lambda x, w: True)
    for module, name in ((qk, "qmatmul"), (epilogue, "launch")):
        monkeypatch.setattr(module, name, functools.partial(getattr(module, name), interpret=not ON_GPU))


def _tail_weight(rng, I, O, group):
    """A random asymmetric int4 weight ``[I, O]`` and its float64 dequantized values."""
    q, codes, scale, zero = _random_q(rng, 1, I, O, 4, group)
    q = jax.tree.map(lambda a: a[0], q)
    w64 = (codes[0].astype(np.float64).reshape(I // group, group, O) - zero[0][:, None]) * scale[0][:, None]
    return q, w64.reshape(I, O)


def _products(x, q, w64) -> tuple:
    """``x [1, I] @ q`` in float64 twice, each with the (rtol, atol as a fraction of the largest
    reference value) an epilogue's output must meet from it: from the dequantized weight (the matmul's
    float32 error included) and from the kernel's own split-K partial sums (the epilogue's error
    alone)."""
    import jaxkv.quant.qarray as qa

    partials = np.asarray(qa.matmul_partials(x, q), np.float64)[:, :1].sum(axis=0)
    return (np.asarray(x, np.float64) @ w64, 2**-7, 2e-3), (partials, 2**-7, 1e-3)


def test_epilogue_residual_norm_matches_float64(force_epilogues):
    """``epilogue.residual_norm``: one row of 22 groups of 64 (11 splits, summed as 8 + 2 + 1) times an
    int4 weight, added to the residual, ``norm_weight * x_new`` and per-block sums of squares (two
    blocks of 128), twice in a row."""
    from jaxkv.kernels import epilogue

    rng = np.random.default_rng(11)
    I, D = 22 * 64, 256
    q, w64 = _tail_weight(rng, I, D, 64)
    h = jnp.asarray(rng.standard_normal((1, I)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, D)) * 4, jnp.bfloat16)
    w = jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.bfloat16)
    for _ in range(2):
        xn, gx, ss = epilogue.residual_norm(h, q, x, w)
        assert xn.dtype == gx.dtype == jnp.bfloat16 and ss.shape == (2, 1)
        (y64, rtol, atol), (y_kernel, _, _) = _products(h, q, w64)
        x64 = np.asarray(x, np.float64) + y64
        np.testing.assert_allclose(np.asarray(xn, np.float64), x64, rtol=rtol, atol=atol * np.abs(x64).max())
        x_kernel = np.asarray(x, np.float64) + y_kernel  # one rounding to bf16 from the partial sums
        np.testing.assert_allclose(np.asarray(xn, np.float64), x_kernel, rtol=2**-8, atol=1e-6)
        xr = np.asarray(xn, np.float64)  # the norm sees the stored (rounded) stream, as XLA's norm does
        np.testing.assert_allclose(np.asarray(gx, np.float64), xr * np.asarray(w, np.float64), rtol=2**-8)
        np.testing.assert_allclose(np.asarray(ss, np.float64), _sumsq_parts(xr, 2), rtol=1e-5)
        x = xn


@pytest.mark.parametrize("bias", [False, True])
def test_epilogue_qkv_rope_matches_float64(force_epilogues, bias):
    """``epilogue.qkv_rope``: grouped heads (4 query, 2 key/value, 32 wide: a head per tail block),
    12 groups of 32 (3 splits), the norm's ``1/rms`` from 3 partial sums of squares, optional biases,
    RoPE at position 100, against float64."""
    from jaxkv.kernels import epilogue
    from jaxkv.model import rope_inv_freq

    rng = np.random.default_rng(12)
    N, K, H, D, eps = 4, 2, 32, 384, 1e-5
    cfg = ModelConfig(vocab_size=8, hidden_size=D, intermediate_size=64, num_layers=1, num_heads=N,
                      num_kv_heads=K, head_dim=H)  # fmt: skip
    inv_freq = rope_inv_freq(cfg)
    q, w64 = _tail_weight(rng, D, (N + 2 * K) * H, 32)
    gx = jnp.asarray(rng.standard_normal((1, D)), jnp.bfloat16)
    xrow = rng.standard_normal((1, D)) * 3  # the norm's input row, of which gx is a scaling
    b = rng.standard_normal((N + 2 * K) * H).astype(np.float32) if bias else None
    biases = None if b is None else tuple(jnp.split(jnp.asarray(b, jnp.bfloat16), [N * H, (N + K) * H]))
    heads = epilogue.qkv_rope(
        gx, q, jnp.asarray(_sumsq_parts(xrow, 3)), jnp.int32(100), jnp.asarray(inv_freq),
        biases, heads=N, kv_heads=K, head_dim=H, eps=eps,
    )  # fmt: skip
    r = 1 / np.sqrt((xrow**2).mean(axis=1, keepdims=True) + eps)
    assert heads.shape == (1, N + 2 * K, H) and heads.dtype == jnp.bfloat16
    for product, rtol, atol in _products(gx, q, w64):
        y = product * r
        if b is not None:
            y = y + np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64)
        y = y.reshape(1, N + 2 * K, H)
        ang = 100.0 * inv_freq.astype(np.float64)
        y1, y2 = y[..., : H // 2], y[..., H // 2 :]
        rot = np.concatenate([y1 * np.cos(ang) - y2 * np.sin(ang), y2 * np.cos(ang) + y1 * np.sin(ang)], -1)
        ref = np.concatenate([rot[:, : N + K], y[:, N + K :]], axis=1)  # values are not rotated
        np.testing.assert_allclose(
            np.asarray(heads, np.float64), ref, rtol=rtol, atol=atol * np.abs(ref).max()
        )


def test_epilogue_silu_mul_matches_float64(force_epilogues):
    """``epilogue.silu_mul``: 33 groups of 64 (17 splits, 16 + 1), three tail blocks of 64 gate
    and 64 up columns each (F = 192): ``SiLU(gate * r) * (up * r)`` with the norm's ``1/rms`` r."""
    from jaxkv.kernels import epilogue

    rng = np.random.default_rng(13)
    D, F, eps = 33 * 64, 192, 1e-6
    q, w64 = _tail_weight(rng, D, 2 * F, 64)
    gx = jnp.asarray(rng.standard_normal((1, D)), jnp.bfloat16)
    xrow = rng.standard_normal((1, D))
    h = epilogue.silu_mul(gx, q, jnp.asarray(_sumsq_parts(xrow, 1)), eps=eps)
    assert h.shape == (1, F) and h.dtype == jnp.bfloat16
    for product, rtol, atol in _products(gx, q, w64):
        y = product / np.sqrt((xrow**2).mean() + eps)
        gate, up = y[:, :F], y[:, F:]
        ref = gate / (1 + np.exp(-gate)) * up
        np.testing.assert_allclose(np.asarray(h, np.float64), ref, rtol=rtol, atol=atol * np.abs(ref).max())


@pytest.mark.parametrize("layers,kv", [("stacked", None), ("per_layer", None), ("per_layer", "K8V8-g16")])
def test_decode_with_epilogues_matches_xla_path(monkeypatch, request, layers, kv):
    """Prefill (5 rows: no epilogues) and a batch-1 decode step of an int4 model with fused
    projections and attention biases (grouped heads) on the kernel path with its fused split-K
    epilogues (forced; Pallas' interpreter off the GPU) against the portable XLA path. Over stacked
    layers (a scan: each block ends with the plain residual add) and over :func:`decode_layout`'s
    per-layer ones (a Python loop: each block's last launch computes the next norm's inputs too);
    a bf16 cache through the decode attention kernel (which takes the epilogue's heads as they are)
    and a K8V8 cache. The epilogues run (counted) and the logits agree as closely as on the kernel
    path without them. (Under 2-4-bit values, the bf16 roundings that differ flip value codes: with
    K8V4 the fused path measured 2.6% from XLA's, the unfused 1.5-1.6%, stacked and per-layer alike.)"""
    import functools

    from jaxkv.bench import parse_kv
    from jaxkv.kernels import epilogue
    from jaxkv.kvcache import init_cache

    cfg = ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, max_position_embeddings=256, attention_bias=True,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(1), jnp.bfloat16)
    qlayers = {k: (quantize_tensor(v, 4, 64) if v.ndim == 3 else v) for k, v in params["layers"].items()}
    qlayers.update({k: qlayers[k] + 0.1 for k in ("bq", "bk", "bv")})
    params = {**params, "layers": qlayers}
    params = fuse_projections(params) if layers == "stacked" else decode_layout(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (1, 6)), jnp.int32)
    pos = jnp.arange(6)[None]
    monkeypatch.setenv("JAXKV_KV_DECODE", "kernel")

    def run():
        jax.clear_caches()
        cache = init_cache(cfg, 1, 16, jnp.bfloat16, kv=parse_kv(kv) if kv else None)
        _, cache = jax.jit(forward, static_argnames="cfg")(params, tokens[:, :5], pos[:, :5], cache, cfg)
        logits, _ = jax.jit(forward, static_argnames="cfg")(params, tokens[:, 5:], pos[:, 5:], cache, cfg)
        return np.asarray(logits, np.float64)

    monkeypatch.setenv("JAXKV_QMATMUL", "xla")
    slow = run()
    request.getfixturevalue("force_epilogues")
    calls = []
    for name in ("qkv_rope", "residual_norm", "silu_mul"):
        fn = functools.partial(
            lambda fn, name, *a, **k: (calls.append(name), fn(*a, **k))[1], getattr(epilogue, name), name
        )
        monkeypatch.setattr(epilogue, name, fn)
    fused = run()
    # the decode step's trace only: a scan traces its block once, the loop each of the 2 blocks,
    # whose last launch is a residual_norm too
    n = 1 if layers == "stacked" else cfg.num_layers
    per_block = {"qkv_rope": 1, "silu_mul": 1, "residual_norm": 1 if layers == "stacked" else 2}
    assert {c: calls.count(c) for c in set(calls)} == {c: n * k for c, k in per_block.items()}
    monkeypatch.setattr(epilogue, "applies", lambda *a: False)
    unfused = run()
    err = np.linalg.norm(fused - slow) / np.linalg.norm(slow)
    assert err < 1.5 * np.linalg.norm(unfused - slow) / np.linalg.norm(slow) + 1e-3 and err < 2e-2
    assert not np.array_equal(fused, unfused)


def test_epilogues_apply_to_one_row_only(monkeypatch):
    """The epilogues take batch-1 decode only (``epilogue.applies``), shapes whose columns tile into
    power-of-two blocks and whose heads are powers of two, and products on the one-row int4 kernel
    (``qarray.partials_apply``: not 8-bit codes, not two rows)."""
    import jaxkv.quant.qarray as qa
    from jaxkv.kernels import epilogue

    monkeypatch.setattr(qa, "_use_kernel", lambda x, w: True)
    w = jnp.asarray(np.random.default_rng(15).standard_normal((128, 256)), jnp.bfloat16)
    row = jnp.ones((1, 1, 128), jnp.bfloat16)
    assert qa.partials_apply(row, quantize_tensor(w, 4, 64))
    assert not qa.partials_apply(row, quantize_tensor(w, 8, 64))
    assert not qa.partials_apply(jnp.ones((2, 128), jnp.bfloat16), quantize_tensor(w, 4, 64))

    assert epilogue.applies(1, 4096, 11008, 128)
    assert not epilogue.applies(8, 4096, 11008, 128)
    assert not epilogue.applies(1, 4096, 11008, 96)  # head 96
    assert not epilogue.applies(1, 4104, 11008, 128)  # 4104 = 8 x 513


def test_qmatmul_partials_sum_to_the_product(monkeypatch):
    """``qmatmul(..., partials=True)``: the one-row kernel's float32 split sums as they are (two
    groups of 64 inputs a program: 2 splits), adding up to float64 numpy's product; with ``row_scale`` it is refused, and
    ``qarray.matmul_partials`` off the kernel's path too."""
    import jaxkv.quant.qarray as qa

    rng = np.random.default_rng(21)
    q, codes, scale, zero = _random_q(rng, 1, 256, 128, 4, 64, False)
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.bfloat16)
    parts = qk.qmatmul(
        x, q.packed, q.scale, q.zero, None, bits=4, group=64, partials=True, interpret=not ON_GPU
    )
    assert parts.shape == (2, 1, 128) and parts.dtype == jnp.float32
    ref = qk.reference(np.asarray(x.astype(jnp.float32)), codes[0], scale[0], zero[0], 64)
    np.testing.assert_allclose(
        np.asarray(parts, np.float64).sum(0), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()
    )
    with pytest.raises(ValueError, match="row_scale"):
        qk.qmatmul(
            x, q.packed, q.scale, q.zero, None, jnp.ones(1), bits=4, group=64, partials=True, interpret=True
        )
    monkeypatch.setattr(qa, "_use_kernel", lambda x, w: False)
    with pytest.raises(ValueError, match="kernel's path only"):
        qa.matmul_partials(x, jax.tree.map(lambda a: a[0], q))
