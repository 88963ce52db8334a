"""generate(): greedy decoding equals a teacher-forced forward; sampling settings; bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.generate import generate, generate_iter, teacher_forced_greedy
from jaxkv.kvcache import KVQuantConfig
from jaxkv.params import init_params
from jaxkv.sampling import filter_logits


@dataclasses.dataclass
class TinyModel:
    cfg: ModelConfig
    params: dict
    tokenizer: object = None


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, eos_token_ids=(5,),
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    # Larger weights give peaked, input-dependent distributions, so greedy paths differ per prompt.
    params = jax.tree.map(lambda x: x * 5 if x.ndim == 3 else x, params)
    return TinyModel(cfg, params)


PROMPTS = [[3, 9, 11, 40], [7, 8, 1, 2, 3, 4, 60, 61, 62, 70, 71], [12]]


def test_greedy_equals_teacher_forced_batch(model):
    res = generate(model, None, PROMPTS, max_new_tokens=24)
    assert res.decode_steps == 23
    assert len({tuple(t) for t in res.tokens}) == 3  # the prompts really lead to different outputs
    for prompt, new in zip(PROMPTS, res.tokens):
        assert len(new) >= 1
        assert teacher_forced_greedy(model, prompt, new) == new


def test_batched_equals_single(model):
    batched = generate(model, None, PROMPTS, max_new_tokens=12).tokens
    single = [generate(model, None, [p], max_new_tokens=12).tokens[0] for p in PROMPTS]
    assert batched == single


def test_streaming_chunks_equal_one_shot(model):
    one_shot = generate(model, None, PROMPTS, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=3).tokens
    pieces = [p for p, _ in generate_iter(model, None, PROMPTS, max_new_tokens=16, temperature=0.7,
                                           top_p=0.9, seed=3, chunk=3)]  # fmt: skip
    assert [p.shape[1] for p in pieces] == [1, 3, 3, 3, 3, 3]
    streamed = np.concatenate(pieces, axis=1)
    for row, ref in zip(streamed.tolist(), one_shot):
        assert row[: len(ref)] == ref


@pytest.mark.parametrize("kv", [None, KVQuantConfig(4, 2, group=4, residual=2)], ids=["fp", "K4V2"])
def test_prefill_in_chunks_equals_one_call(model, kv):
    """Prompts of 1-21 tokens prefilled 4 tokens per call (a row's last token in different chunks,
    one chunk of padding only) give the one-call tokens, greedy and sampled."""
    prompts = [*PROMPTS, list(range(20, 41))]
    for settings in ({}, {"temperature": 0.8, "seed": 4}):
        one = generate(model, None, prompts, max_new_tokens=8, kv=kv, prefill_chunk=None, **settings)
        chunked = generate(model, None, prompts, max_new_tokens=8, kv=kv, prefill_chunk=4, **settings)
        assert chunked.tokens == one.tokens
        assert len({tuple(t) for t in one.tokens}) == len(prompts)
    with pytest.raises(JaxkvError, match="prefill_chunk"):
        generate(model, None, PROMPTS, prefill_chunk=0)


def test_eos_stops_sequence(model):
    # A zero output head gives all-equal logits; greedy argmax then picks id 0, made the EOS here.
    params = {**model.params, "lm_head": model.params["lm_head"] * 0}
    cfg = dataclasses.replace(model.cfg, eos_token_ids=(0,))
    res = generate(TinyModel(cfg, params), None, PROMPTS, max_new_tokens=10)
    assert res.tokens == [[], [], []]
    assert res.finished == [True, True, True]
    assert res.decode_steps == 0


def test_sampling_seed_reproducible_and_varies(model):
    a = generate(model, None, PROMPTS, max_new_tokens=16, temperature=1.0, seed=1).tokens
    b = generate(model, None, PROMPTS, max_new_tokens=16, temperature=1.0, seed=1).tokens
    c = generate(model, None, PROMPTS, max_new_tokens=16, temperature=1.0, seed=2).tokens
    assert a == b
    assert a != c


def test_filter_logits_top_k_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 2, 1.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, 0, 0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, 0, 0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, 0, 0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, 0, 1.0)) == [True, True, True, True]


def test_greedy_at_trace_time_has_no_sort():
    """temperature=None traces the argmax alone; a traced temperature of 0 gives the same tokens
    through the sampling graph (sort, softmax, cumsum, categorical)."""
    from jaxkv.sampling import sample

    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)), jnp.float32)
    key = jax.random.key(0)
    greedy = jax.jit(sample, static_argnums=3)
    assert "sort" not in greedy.lower(logits, key, None, 0, jnp.float32(0.9)).as_text()
    assert "sort" in greedy.lower(logits, key, jnp.float32(0.0), 0, jnp.float32(0.9)).as_text()
    a = greedy(logits, key, None, 0, jnp.float32(0.9))
    b = greedy(logits, key, jnp.float32(0.0), 0, jnp.float32(0.9))
    np.testing.assert_array_equal(np.asarray(a), np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prompt_longer_than_cache(model):
    with pytest.raises(JaxkvError, match="exceeds the cache length 8"):
        generate(model, None, [list(range(10))], max_new_tokens=4, max_len=8)


def test_bad_prompt_ids(model):
    with pytest.raises(JaxkvError, match="must lie in"):
        generate(model, None, [[1, 2, 500]], max_new_tokens=2)
    with pytest.raises(JaxkvError, match="needs a tokenizer"):
        generate(model, None, "hello", max_new_tokens=2)
