"""ModelConfig: built from real transformers config.json files of each architecture, and validated."""

from __future__ import annotations

import dataclasses

import pytest

from jaxkv.config import (
    ConfigError,
    ModelConfig,
    RopeScaling,
    from_gguf_metadata,
    from_hf_config,
    load_hf_config,
)
from jaxkv.errors import JaxkvError

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


def test_from_hf_config_matches_transformers(tiny_model):
    hf = tiny_model.hf_config
    cfg = load_hf_config(tiny_model.path)
    assert cfg == from_hf_config(hf)
    assert cfg.model_type == hf["model_type"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (128, 64, 96)
    assert (cfg.num_layers, cfg.num_heads) == (2, 4)
    assert cfg.num_kv_heads == hf["num_key_value_heads"]
    assert cfg.head_dim == 16
    assert cfg.tie_word_embeddings == hf["tie_word_embeddings"]
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.attention_bias == (hf["model_type"] == "qwen2")
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    rope = hf.get("rope_parameters") or {}
    assert cfg.rope_theta == rope.get("rope_theta", 10000.0)
    if rope.get("rope_type") == "llama3":
        assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    else:
        assert cfg.rope_scaling is None
    assert cfg.sliding_window == (16 if hf["model_type"] == "mistral" else None)


def test_legacy_rope_scaling_and_theta_keys():
    """transformers 4.x wrote rope_theta / rope_scaling at the top level."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    cfg = from_hf_config(hf)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling("linear", 2.0)
    assert cfg.num_kv_heads == 4  # absent -> MHA


def test_round_trip_dict():
    cfg = ModelConfig(**BASE, rope_scaling=RopeScaling("llama3", 8.0), eos_token_ids=(2, 3))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)  # usable as a static jit argument


def _hf(**kw):
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    hf.update(kw)
    return {k: v for k, v in hf.items() if v is not None}


@pytest.mark.parametrize(
    "hf, field",
    [
        (_hf(architectures=["GPT2LMHeadModel"]), "architectures"),
        (_hf(model_type="gpt2"), "model_type"),
        (_hf(hidden_size=None), "hidden_size"),
        (_hf(num_hidden_layers=None), "num_hidden_layers"),
        (_hf(num_key_value_heads=3), "num_kv_heads"),
        (_hf(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
        (_hf(eos_token_id=500), "eos_token_ids"),
        (_hf(bos_token_id=-1), "bos_token_id"),
    ],
)
def test_from_hf_config_errors_name_the_field(hf, field):
    with pytest.raises(ConfigError, match=field):
        from_hf_config(hf)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_size=64.0), "hidden_size"),
        (dict(num_layers=True), "num_layers"),
        (dict(head_dim=15), "head_dim"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(model_type="gpt2"), "model_type"),
    ],
)
def test_model_config_validation_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**BASE, **overrides})


def test_rope_scaling_validation():
    with pytest.raises(ConfigError, match="rope_type"):
        RopeScaling("dynamic")
    with pytest.raises(ConfigError, match="factor"):
        RopeScaling("linear", factor=0.0)


def test_config_error_is_a_jaxkv_error():
    assert issubclass(ConfigError, JaxkvError) and issubclass(ConfigError, ValueError)


def test_load_hf_config_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_hf_config(tmp_path)


SMOL_META = {
    "general.architecture": "llama",
    "llama.block_count": 30,
    "llama.context_length": 8192,
    "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.rope.freq_base": 100000.0,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.vocab_size": 49152,
    "llama.rope.dimension_count": 64,
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}


def test_from_gguf_metadata():
    cfg = from_gguf_metadata({**SMOL_META, "_tied": True})
    want = ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=1e5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    assert cfg == want
    assert not from_gguf_metadata(SMOL_META).tie_word_embeddings
    # attention.key_length, when present, is the head dimension.
    assert from_gguf_metadata({**SMOL_META, "llama.attention.key_length": 32}).head_dim == 32


@pytest.mark.parametrize(
    "change, field",
    [
        ({"general.architecture": "gpt2"}, "general.architecture"),
        ({"llama.block_count": None}, "llama.block_count"),
        ({"llama.rope.scaling.type": "yarn"}, "rope.scaling.type"),
        ({"llama.attention.head_count_kv": 4}, "num_kv_heads"),
    ],
)
def test_from_gguf_metadata_errors_name_the_field(change, field):
    meta = {k: v for k, v in {**SMOL_META, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=field):
        from_gguf_metadata(meta)


def test_config_is_frozen():
    cfg = ModelConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3
