"""Quantized KV cache, model tier: 16-bit is the plain path bit for bit; greedy generation through a
quantized cache equals a teacher-forced forward with the same quantization; decoding in any chunks
equals the cache-free perplexity forward (``KVForward``)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.config import ModelConfig
from jaxkv.evaluate import perplexity
from jaxkv.generate import generate
from jaxkv.kvcache import KVQuantConfig, init_cache
from jaxkv.model import KVForward, forward
from jaxkv.params import init_params
from jaxkv.prefix import make_prefix


@dataclasses.dataclass
class TinyModel:
    cfg: ModelConfig
    params: dict
    tokenizer: object = None


def _tiny(head_dim: int) -> TinyModel:
    cfg = ModelConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=head_dim, bos_token_id=1, eos_token_ids=(5,),
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    # Larger weights give peaked, input-dependent distributions, so greedy paths differ per prompt.
    params = jax.tree.map(lambda x: x * 5 if x.ndim == 3 else x, params)
    return TinyModel(cfg, params)


@pytest.fixture(scope="module")
def model():
    return _tiny(16)


@pytest.fixture(scope="module")
def wide_model():
    """64-channel heads: the decode kernel needs 16 bytes of codes per row."""
    return _tiny(64)


_forward = jax.jit(forward, static_argnames="cfg")
PROMPTS = [[3, 9, 11, 40], [7, 8, 1, 2, 3, 4, 60, 61, 62, 70, 71], [12]]


def _teacher_forced(model, kv, seqs, starts, pivot_len):
    """Argmax of the quantized cache-free forward, row r from position starts[r] - 1 on."""
    T = max(len(s) for s in seqs)
    # Right padding cannot change earlier positions (causal; a per-channel group is read only
    # once all its tokens precede the query).
    tokens = np.array([s + [0] * (T - len(s)) for s in seqs], np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    logits = jax.jit(KVForward(model.cfg, kv, pivot_len))(model.params, tokens, positions)
    am = np.asarray(jnp.argmax(logits, axis=-1))
    return [am[r, starts[r] - 1 : len(s) - 1].tolist() for r, s in enumerate(seqs)]


def test_16bit_is_the_plain_path_bitwise(model):
    cfg, params = model.cfg, model.params
    kv16 = KVQuantConfig(16, 16, group=4, residual=3, mode="all")
    toks = jnp.asarray([PROMPTS[1]], jnp.int32)
    pos = jnp.arange(toks.shape[1], dtype=jnp.int32)[None]
    plain = forward(params, toks, pos, None, cfg)[0]
    np.testing.assert_array_equal(np.asarray(KVForward(cfg, kv16)(params, toks, pos)), np.asarray(plain))
    a, ca = _forward(params, toks, pos, init_cache(cfg, 1, 16), cfg)
    b, cb = _forward(params, toks, pos, init_cache(cfg, 1, 16, kv=kv16), cfg)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ca.k), np.asarray(cb.k))
    assert (
        generate(model, None, PROMPTS, max_new_tokens=8, kv=kv16).tokens
        == generate(model, None, PROMPTS, max_new_tokens=8).tokens
    )


GEN_CONFIGS = [
    # (kv, pivot)
    (KVQuantConfig(4, 2, group=4), None),
    (KVQuantConfig(2, 4, group=8, k_granularity="per-token", mode="all", residual=2), [1, 17, 33]),
    (KVQuantConfig(3, 3, group=4, residual=3, layer_kbits=(2, 8), layer_vbits=(4, 2)), "bos"),
]


@pytest.mark.parametrize("kv,pivot", GEN_CONFIGS, ids=lambda x: x.label() if hasattr(x, "label") else str(x))
def test_greedy_generation_equals_teacher_forced(model, kv, pivot):
    prefix = make_prefix(model, pivot) if pivot is not None else None
    res = generate(model, prefix, PROMPTS, max_new_tokens=16, kv=kv, stop_at_eos=False)
    assert all(len(t) == 16 for t in res.tokens)
    pivot_ids = list(prefix.tokens) if prefix else []
    seqs = [pivot_ids + p + t for p, t in zip(PROMPTS, res.tokens)]
    starts = [len(pivot_ids) + len(p) for p in PROMPTS]
    assert _teacher_forced(model, kv, seqs, starts, len(pivot_ids)) == res.tokens


KERNEL_CONFIGS = [
    (KVQuantConfig(4, 2, group=4), None),
    (KVQuantConfig(2, 4, group=4, residual=3, mode="all"), "bos"),
    (KVQuantConfig(4, 4, group=4, residual=1, layer_kbits=(4, 8), layer_vbits=(2, 4)), [1, 17, 33]),
]


@pytest.mark.parametrize(
    "kv,pivot", KERNEL_CONFIGS, ids=lambda x: x.label() if hasattr(x, "label") else str(x)
)
def test_greedy_generation_with_decode_kernel(wide_model, kv, pivot, monkeypatch):
    """JAXKV_KV_DECODE=kernel: decode steps read the body through the split-K kernel (Pallas'
    interpreter off a GPU) and still equal the teacher-forced cache-free forward."""
    from jaxkv.kernels import kvdecode

    model = wide_model

    calls = []
    real = kvdecode.body_partials
    monkeypatch.setattr(kvdecode, "body_partials", lambda *a, **k: calls.append(k["kbits"]) or real(*a, **k))
    monkeypatch.setenv("JAXKV_KV_DECODE", "kernel")
    jax.clear_caches()  # the implementation is chosen at trace time
    try:
        prefix = make_prefix(model, pivot) if pivot is not None else None
        res = generate(model, prefix, PROMPTS, max_new_tokens=16, kv=kv, stop_at_eos=False)
    finally:
        jax.clear_caches()
    assert calls, "the kernel was not used"
    pivot_ids = list(prefix.tokens) if prefix else []
    seqs = [pivot_ids + p + t for p, t in zip(PROMPTS, res.tokens)]
    starts = [len(pivot_ids) + len(p) for p in PROMPTS]
    assert _teacher_forced(model, kv, seqs, starts, len(pivot_ids)) == res.tokens


@pytest.mark.parametrize(
    "kv",
    [
        KVQuantConfig(4, 2, group=4, residual=2),
        KVQuantConfig(2, 3, group=8, k_granularity="per-token", mode="all"),
    ],
    ids=lambda kv: kv.label(),
)
def test_decoding_in_chunks_equals_perplexity_forward(model, kv):
    """The perplexity forward (``KVForward``, [BOS] as a full-precision pivot) gives the logits of
    decoding the same window through the quantized cache, whatever the chunking."""
    cfg, params = model.cfg, model.params
    rng = np.random.default_rng(0)
    window = [1] + rng.integers(3, cfg.vocab_size, 22).tolist()  # [BOS] + text, as make_windows builds
    T = len(window)
    tokens = jnp.asarray([window], jnp.int32)
    ref = np.asarray(KVForward(cfg, kv, pivot_len=1)(params, tokens, jnp.arange(T, dtype=jnp.int32)[None]))
    prefix = make_prefix(model, "bos")
    # Two chunk shapes (1 and 7 tokens) keep compilation short; the splits cross group boundaries.
    for chunks in ([7, 1, 7, 7], [1, 7, 7, 7], [1] * 22):
        cache = init_cache(cfg, 1, 24, pivot_k=prefix.k, pivot_v=prefix.v, kv=kv)
        got, start = [], 1
        for c in chunks:
            pos = jnp.arange(start, start + c, dtype=jnp.int32)[None]
            logits, cache = _forward(params, tokens[:, start : start + c], pos, cache, cfg)
            got.append(np.asarray(logits))
            start += c
        np.testing.assert_allclose(np.concatenate(got, axis=1)[0], ref[0, 1:], atol=2e-5, rtol=0)
    # IntactKV[B]: the pivot's own logits are the full-precision ones.
    np.testing.assert_allclose(ref[0, 0], np.asarray(prefix.logits), atol=1e-5)


@pytest.mark.parametrize("kv", [None, KVQuantConfig(4, 2, group=4, residual=2)], ids=["fp", "K4V2"])
def test_intact_forward_equals_decoding_from_the_prefix(model, kv):
    """``KVForward(intact=True)`` with a prefix whose K/V the model would not compute itself (a
    calibrated one, here a perturbed one) gives the logits of decoding through a cache whose pivot
    holds that prefix; the prefix really matters (the logits move with it)."""
    cfg, params = model.cfg, model.params
    window = [1] + np.random.default_rng(1).integers(3, cfg.vocab_size, 17).tolist()
    T = len(window)
    tokens = jnp.asarray([window], jnp.int32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    prefix = make_prefix(model, "bos")
    noise = jax.random.normal(jax.random.key(3), prefix.k.shape)
    pk, pv = prefix.k + 0.5 * noise, prefix.v - 0.5 * noise
    got = np.asarray(KVForward(cfg, kv, intact=True)((params, pk, pv), tokens, positions))
    cache = init_cache(cfg, 1, T, pivot_k=pk, pivot_v=pv, kv=kv)
    ref = []
    for t in range(1, T):
        logits, cache = _forward(params, tokens[:, t : t + 1], positions[:, t : t + 1], cache, cfg)
        ref.append(np.asarray(logits)[0, 0])
    np.testing.assert_allclose(got[0, 1:], np.stack(ref), atol=2e-5, rtol=0)
    exact = np.asarray(KVForward(cfg, kv, intact=True)((params, prefix.k, prefix.v), tokens, positions))
    assert np.abs(exact[0, 1:] - got[0, 1:]).max() > 1e-2


def test_perplexity_with_quantized_kv(model):
    cfg, params = model.cfg, model.params
    windows = np.random.default_rng(1).integers(3, cfg.vocab_size, (3, 24)).astype(np.int32)
    windows[:, 0] = 1
    fp = perplexity(params, cfg, windows, batch_size=3, progress=False).ppl
    same = perplexity(
        params, cfg, windows, batch_size=3, forward_fn=KVForward(cfg, KVQuantConfig()), progress=False
    )
    assert same.ppl == fp
    errs = []
    for bits in (8, 4, 2):
        kv = KVQuantConfig(bits, bits, group=8, k_granularity="per-token")
        errs.append(abs(perplexity(params, cfg, windows, 3, KVForward(cfg, kv), progress=False).ppl - fp))
    assert errs[0] < errs[2] and errs[0] < 0.01 * fp
