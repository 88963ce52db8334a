"""The perplexity protocol: window layout, scored positions, padding, against a float64 numpy reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.errors import JaxkvError
from jaxkv.evaluate import PplResult, make_windows, perplexity

BOS = 1


# ---------------------------------------------------------------- make_windows


def test_make_windows_layout_and_boundaries():
    ids = np.arange(100) + 10
    w = make_windows(ids, BOS, seqlen=5)
    assert w.shape == (25, 5) and w.dtype == np.int32  # 100 // (5 - 1)
    assert (w[:, 0] == BOS).all()
    for i in (0, 1, 24):
        np.testing.assert_array_equal(w[i, 1:], ids[i * 4 : (i + 1) * 4])
    assert w[0, 1] == ids[0] and w[-1, -1] == ids[99]  # starts at the first token, ends at the last
    np.testing.assert_array_equal(w[:, 1:].ravel(), ids)  # every token once, in order, no overlap
    np.testing.assert_array_equal(make_windows(ids, BOS, 5, 3), w[:3])


def test_make_windows_drops_incomplete_tail():
    ids = np.arange(103)
    w = make_windows(ids, BOS, seqlen=5)
    assert w.shape == (25, 5) and w[-1, -1] == 99
    assert make_windows(np.arange(4), BOS, 5).shape == (1, 5)  # exactly one window


@pytest.mark.parametrize(
    ("n_tokens", "seqlen", "n"),
    [(100, 5, 26), (3, 5, None), (3, 5, 1), (100, 2, None), (100, 5, 0)],
)
def test_make_windows_errors(n_tokens, seqlen, n):
    with pytest.raises(JaxkvError):
        make_windows(np.arange(n_tokens), BOS, seqlen, n)


def test_make_windows_rejects_non_1d():
    with pytest.raises(JaxkvError):
        make_windows(np.zeros((2, 10), np.int32), BOS, 5)


# ---------------------------------------------------------------- perplexity vs numpy


def _numpy_nll(logits: np.ndarray, windows: np.ndarray) -> tuple[float, int]:
    """Reference, written out position by position: logits[b, p] predicts windows[b, p + 1], p = 1..L-2."""
    logits = logits.astype(np.float64)
    n, seqlen = windows.shape
    total, count = 0.0, 0
    for b in range(n):
        for p in range(1, seqlen - 1):
            row = logits[b, p]
            m = row.max()
            log_softmax = row - (m + np.log(np.exp(row - m).sum()))
            total -= log_softmax[windows[b, p + 1]]
            count += 1
    return total, count


@dataclasses.dataclass(frozen=True)
class TableForward:
    """Fake model: logits are a fixed random function of (token, position), so numpy can recompute them."""

    vocab: int
    seqlen: int
    dtype: str = "float32"
    seed: int = 0

    def tables(self):
        rng = np.random.default_rng(self.seed)
        return (
            3.0 * rng.standard_normal((self.vocab, self.vocab)).astype(self.dtype),
            rng.standard_normal((self.seqlen, self.vocab)).astype(self.dtype),
        )

    def numpy_logits(self, windows):
        tok, pos = self.tables()
        return tok[windows] + pos[np.arange(windows.shape[1])][None]

    def __call__(self, params, tokens, positions):
        tok, pos = self.tables()
        return jnp.asarray(tok)[tokens] + jnp.asarray(pos)[positions]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_perplexity_equals_numpy_float64(x64, batch_size):
    vocab, seqlen, n = 37, 9, 5
    windows = make_windows(np.random.default_rng(1).integers(0, vocab, 200), BOS, seqlen, n)
    fwd = TableForward(vocab, seqlen, dtype="float64")
    res = perplexity(None, None, windows, batch_size=batch_size, forward_fn=fwd, progress=False)
    want_sum, want_count = _numpy_nll(fwd.numpy_logits(windows), windows)
    assert isinstance(res, PplResult)
    assert res.tokens == want_count == n * (seqlen - 2)
    np.testing.assert_allclose(res.nll_sum, want_sum, rtol=1e-13)
    np.testing.assert_allclose(res.ppl, np.exp(want_sum / want_count), rtol=1e-13)
    assert res.seconds > 0


def test_perplexity_float32_logits(capsys):
    vocab, seqlen = 50, 16
    windows = make_windows(np.random.default_rng(2).integers(0, vocab, 300), BOS, seqlen)
    fwd = TableForward(vocab, seqlen)
    res = perplexity({}, None, windows, batch_size=4, forward_fn=fwd, progress=False)
    want_sum, want_count = _numpy_nll(fwd.numpy_logits(windows), windows)
    assert res.tokens == want_count
    np.testing.assert_allclose(res.nll_sum, want_sum, rtol=1e-5)
    assert capsys.readouterr().err == ""  # progress=False prints nothing


def test_scored_positions_exactly_1_to_L_minus_2():
    """First target is window[2], last is window[L-1]; positions 0 and L-1 are never read."""
    vocab, seqlen = 11, 6
    windows = make_windows(np.arange(100) % vocab, BOS, seqlen, 7)

    def oracle(params, tokens, positions):
        # Near-certain prediction of the next token at positions 1..L-2, NaN at 0 and L-1:
        # any off-by-one in the scored positions or targets makes the result NaN or large.
        nxt = jnp.roll(tokens, -1, axis=1)
        logits = 50.0 * jax.nn.one_hot(nxt, vocab)
        pos = positions[..., None]
        return jnp.where((pos == 0) | (pos == seqlen - 1), jnp.nan, logits)

    res = perplexity(None, None, windows, batch_size=3, forward_fn=oracle, progress=False)
    assert res.tokens == 7 * (seqlen - 2)
    assert np.isfinite(res.nll_sum)
    assert res.ppl == pytest.approx(1.0, abs=1e-6)


def test_first_and_last_targets_each_counted_once(x64):
    """Uniform logits everywhere except one position: its NLL change shows it is scored exactly once."""
    vocab, seqlen = 8, 5
    windows = make_windows(np.arange(40) % vocab, BOS, seqlen, 2)
    uniform = np.log(vocab)

    for p, counted in [(0, False), (1, True), (seqlen - 2, True), (seqlen - 1, False)]:

        def fwd(params, tokens, positions, p=p):
            logits = jnp.zeros(tokens.shape + (vocab,), jnp.float64)
            # At position p, the token p+1 gets logit +5 (only meaningful when p+1 < L).
            target = jnp.roll(tokens, -1, axis=1)
            bump = 5.0 * jax.nn.one_hot(target, vocab, dtype=jnp.float64)
            return jnp.where(positions[..., None] == p, logits + bump, logits)

        res = perplexity(None, None, windows, batch_size=2, forward_fn=fwd, progress=False)
        nll_p = -(5.0 - np.log(vocab - 1 + np.exp(5.0)))
        base = windows.shape[0] * (seqlen - 2) * uniform
        want = base - windows.shape[0] * (uniform - nll_p) if counted else base
        np.testing.assert_allclose(res.nll_sum, want, rtol=1e-13)


def test_padding_rows_do_not_leak():
    vocab, seqlen = 20, 7
    windows = make_windows(np.random.default_rng(3).integers(0, vocab, 6 * 7), BOS, seqlen, 7)
    fwd = TableForward(vocab, seqlen)
    per_window = [perplexity(None, None, w[None], forward_fn=fwd, progress=False).nll_sum for w in windows]
    for bs in (3, 7, 16):  # 16 > N: a single unpadded batch
        res = perplexity(None, None, windows, batch_size=bs, forward_fn=fwd, progress=False)
        np.testing.assert_allclose(res.nll_sum, sum(per_window), rtol=1e-6)
        assert res.tokens == 7 * (seqlen - 2)


# ---------------------------------------------------------------- errors and the default forward


def test_perplexity_errors():
    fwd = TableForward(10, 5)
    good = make_windows(np.arange(40) % 10, BOS, 5)
    with pytest.raises(JaxkvError, match="needs cfg"):
        perplexity(None, None, good, progress=False)
    with pytest.raises(JaxkvError, match="2-D"):
        perplexity(None, None, good[0], forward_fn=fwd, progress=False)
    with pytest.raises(JaxkvError, match="L >= 3"):
        perplexity(None, None, good[:, :2], forward_fn=fwd, progress=False)
    with pytest.raises(JaxkvError, match="batch_size"):
        perplexity(None, None, good, batch_size=0, forward_fn=fwd, progress=False)
    with pytest.raises(JaxkvError, match="logits of shape"):
        perplexity(None, None, good, forward_fn=lambda p, t, pos: jnp.zeros((1, 10)), progress=False)


def _small_params(cfg):
    # numpy init instead of params.init_params: its eager jax.random calls cost seconds on CPU.
    from jaxkv.params import ArrayInfo, param_infos

    rng = np.random.default_rng(0)
    fill = {"ones": np.ones, "zeros": np.zeros, "normal": lambda s: 0.02 * rng.standard_normal(s)}
    return jax.tree.map(
        lambda i: jnp.asarray(fill[i.init](i.shape), jnp.float32),
        param_infos(cfg),
        is_leaf=lambda x: isinstance(x, ArrayInfo),
    )


def test_default_forward_uses_model_and_checks_vocab():
    from jaxkv import evaluate, model
    from jaxkv.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    params = _small_params(cfg)
    windows = make_windows(np.random.default_rng(4).integers(0, 64, 60), BOS, 8, 3)
    res = perplexity(params, cfg, windows, batch_size=2, progress=False)
    positions = jnp.broadcast_to(jnp.arange(8), windows.shape)
    logits = np.asarray(model.forward_jit(params, jnp.asarray(windows), positions, cfg))
    want_sum, want_count = _numpy_nll(logits, windows)
    assert res.tokens == want_count
    np.testing.assert_allclose(res.nll_sum, want_sum, rtol=1e-5)
    # A second call with an equal cfg reuses the compiled step.
    compiled = evaluate._nll_step._cache_size()
    again = perplexity(params, dataclasses.replace(cfg), windows, batch_size=2, progress=False)
    assert evaluate._nll_step._cache_size() == compiled and again.nll_sum == res.nll_sum
    with pytest.raises(JaxkvError, match="outside the vocabulary"):
        perplexity(params, cfg, np.full((1, 8), 64), progress=False)
