"""IntactKV prefixes: with full-precision weights, a prefix changes nothing but where the work happens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.generate import generate
from jaxkv.kvcache import init_cache
from jaxkv.model import forward
from jaxkv.params import init_params
from jaxkv.prefix import make_prefix, model_fingerprint


@dataclasses.dataclass
class TinyModel:
    cfg: ModelConfig
    params: dict
    tokenizer: object = None


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        vocab_size=89, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=1, head_dim=8, bos_token_id=1, eos_token_ids=(2,),
    )  # fmt: skip
    params = jax.tree.map(lambda x: x * 5 if x.ndim == 3 else x, init_params(cfg, jax.random.key(7)))
    return TinyModel(cfg, params)


@pytest.mark.parametrize("pivot", ["bos", [1, 17, 33, 4]])
def test_forward_with_prefix_equals_plain_forward(model, pivot):
    prefix = make_prefix(model, pivot)
    ids = list(prefix.tokens)
    prompt = [5, 9, 60, 61, 3, 70]
    seq = ids + prompt
    ref, _ = forward(model.params, jnp.asarray([seq]), jnp.arange(len(seq))[None], None, model.cfg)
    P = len(ids)
    np.testing.assert_allclose(np.asarray(prefix.logits), np.asarray(ref[0, P - 1]), atol=1e-5)
    cache = init_cache(model.cfg, 1, 8, pivot_k=prefix.k, pivot_v=prefix.v)
    out, _ = forward(model.params, jnp.asarray([prompt]), jnp.arange(P, len(seq))[None], cache, model.cfg)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0, P:]), atol=1e-5)


def test_greedy_generation_with_prefix_is_identical(model):
    prefix = make_prefix(model, [1, 17, 33])
    prompts = [[5, 9, 60], [61, 3, 70, 71, 72, 8]]
    with_prefix = generate(model, prefix, prompts, max_new_tokens=12).tokens
    plain = generate(model, None, [list(prefix.tokens) + p for p in prompts], max_new_tokens=12).tokens
    assert with_prefix == plain
    # The caller's prefix survives generation (the cache, not the prefix, is donated).
    assert np.isfinite(np.asarray(prefix.k)).all()


def test_prefix_records_origin(model):
    prefix = make_prefix(model, "bos")
    assert prefix.tokens == (1,)
    assert prefix.k.shape == (2, 1, 1, 8)
    assert prefix.fingerprint == model_fingerprint(model)
    other = TinyModel(model.cfg, jax.tree.map(lambda x: x + 1, model.params))
    assert model_fingerprint(other) != prefix.fingerprint


def test_bad_pivots(model):
    with pytest.raises(JaxkvError, match="must lie in"):
        make_prefix(model, [1, 500])
    with pytest.raises(JaxkvError, match="chat template"):
        make_prefix(model, "system")
    with pytest.raises(JaxkvError, match="empty"):
        make_prefix(model, [])


def test_perplexity_with_exact_bos_prefix_equals_plain(model):
    from jaxkv.evaluate import make_windows, perplexity
    from jaxkv.model import KVForward
    from jaxkv.prefix import check_pivot

    ids = np.random.RandomState(5).randint(3, 89, 200)
    windows = make_windows(ids, 1, 20, 6)
    prefix = make_prefix(model, "bos")
    check_pivot(windows, prefix)
    plain = perplexity(model.params, model.cfg, windows, batch_size=4, progress=False)
    fn = KVForward(model.cfg, intact=True)
    pre = perplexity(
        (model.params, prefix.k, prefix.v), None, windows, batch_size=4, forward_fn=fn, progress=False
    )
    assert pre.tokens == plain.tokens == 6 * 18
    np.testing.assert_allclose(pre.ppl, plain.ppl, rtol=1e-5)
    with pytest.raises(JaxkvError, match="pivot tokens"):
        check_pivot(windows, make_prefix(model, [2]))
