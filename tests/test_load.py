"""Hugging Face safetensors loading: exact key map, sharding, dtypes, errors, and ``load()`` resolution."""

from __future__ import annotations

import importlib
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from reference import assert_tree_equal, expected_params
from safetensors.numpy import load_file, save_file

from jaxkv.config import ConfigError
from jaxkv.errors import CheckpointError, JaxkvError, LoadError
from jaxkv.load import LoadedModel, load, load_hf_dir, params_from_hf_state_dict
from jaxkv.params import check_params


def test_params_equal_torch_state_dict(tiny_model):
    cfg, params = load_hf_dir(tiny_model.path)
    check_params(params, cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert_tree_equal(params, expected_params(tiny_model.state, cfg))
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    assert ("bq" in params["layers"]) == cfg.attention_bias


def test_sharded_directory(tiny_model_factory):
    whole = tiny_model_factory("llama_gqa_tied_llama3")
    sharded = tiny_model_factory("llama_gqa_tied_llama3", shard_size="40KB")
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    cfg, params = load_hf_dir(sharded.path)
    assert_tree_equal(params, expected_params(whole.state, cfg))


def test_target_dtype_bfloat16(tiny_model_factory):
    tm = tiny_model_factory("qwen2_bias_tied")
    cfg, params = load_hf_dir(tm.path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    want = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), expected_params(tm.state, cfg))
    assert_tree_equal(params, want)


def test_bfloat16_checkpoint(tiny_model_factory):
    """bf16 safetensors (numpy has no bf16) are read through ml_dtypes, bit-exactly."""
    import torch

    tm = tiny_model_factory("llama_mqa", torch_dtype=torch.bfloat16)
    assert json.loads((tm.path / "config.json").read_text())["dtype"] == "bfloat16"
    cfg, params = load_hf_dir(tm.path, dtype=jnp.float32)
    assert_tree_equal(params, expected_params(tm.state, cfg))  # bf16 -> f32 is exact


def test_params_from_state_dict_direct(tiny_model_factory):
    tm = tiny_model_factory("mistral_gqa")
    cfg, _ = load_hf_dir(tm.path)
    params = params_from_hf_state_dict(cfg, tm.state, jnp.float32)
    assert_tree_equal(params, expected_params(tm.state, cfg))


# ---- errors ------------------------------------------------------------------------------------------


@pytest.fixture
def editable_model(tiny_model_factory, tmp_path):
    """A copy of an untied llama tiny model whose single safetensors file the test may rewrite."""
    tm = tiny_model_factory("llama_mha")
    dest = tmp_path / "model"
    shutil.copytree(tm.path, dest)

    def rewrite(edit):
        f = dest / "model.safetensors"
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
        return dest

    return rewrite


def test_missing_key(editable_model):
    path = editable_model(lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_dir(path)


def test_missing_lm_head_when_untied(editable_model):
    path = editable_model(lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings=False"):
        load_hf_dir(path)


def test_unmapped_key(editable_model):
    path = editable_model(
        lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": np.zeros((4, 4), np.float32)})
    )
    with pytest.raises(CheckpointError, match=r"does not map.*model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_hf_dir(path)


def test_unexpected_bias_names_the_config_field(editable_model):
    path = editable_model(
        lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    )
    with pytest.raises(CheckpointError, match="q_proj.bias.*attention_bias=False"):
        load_hf_dir(path)


def test_extra_layer_names_num_layers(editable_model):
    path = editable_model(
        lambda t: t.update({"model.layers.2.input_layernorm.weight": np.ones(64, np.float32)})
    )
    with pytest.raises(CheckpointError, match="num_layers=2"):
        load_hf_dir(path)


def test_wrong_shape(editable_model):
    path = editable_model(
        lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 64), np.float32)})
    )
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 64\)"
    ):
        load_hf_dir(path)


def test_ignored_buffers_and_redundant_tied_lm_head(tiny_model_factory, tmp_path):
    tm = tiny_model_factory("llama_gqa_tied_llama3")
    dest = tmp_path / "model"
    shutil.copytree(tm.path, dest)
    tensors = load_file(dest / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    cfg, params = load_hf_dir(dest)
    assert "lm_head" not in params
    assert_tree_equal(params, expected_params(tm.state, cfg))


def test_no_config_json(tiny_model_factory, tmp_path):
    tm = tiny_model_factory("llama_mha")
    shutil.copy(tm.path / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="no config.json"):
        load(str(tmp_path))
    with pytest.raises(ConfigError, match="config.json"):
        load_hf_dir(tmp_path)


def test_unknown_architecture(tiny_model_factory, tmp_path):
    tm = tiny_model_factory("llama_mha")
    dest = tmp_path / "model"
    shutil.copytree(tm.path, dest)
    hf = json.loads((dest / "config.json").read_text())
    hf.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (dest / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="architectures=.*GPTNeoXForCausalLM.*not supported"):
        load(str(dest))


def test_no_safetensors(tiny_model_factory, tmp_path):
    tm = tiny_model_factory("llama_mha")
    shutil.copy(tm.path / "config.json", tmp_path / "config.json")
    with pytest.raises(LoadError, match="no .*safetensors"):
        load_hf_dir(tmp_path)


def test_every_error_is_a_one_line_jaxkv_error(editable_model):
    path = editable_model(lambda t: t.pop("model.norm.weight"))
    with pytest.raises(JaxkvError) as info:
        load(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# ---- load() resolution ---------------------------------------------------------------------------------


def test_load_hf_directory(tiny_model_factory):
    tm = tiny_model_factory("qwen2_bias_tied")
    m = load(str(tm.path))
    assert isinstance(m, LoadedModel)
    assert (m.kind, m.source, m.name, m.dtype) == ("hf", str(tm.path), str(tm.path), "float32")
    assert m.tokenizer is None  # bare checkpoint: no tokenizer files
    assert_tree_equal(m.params, expected_params(tm.state, m.cfg))
    # The fingerprint depends on the weights, not on how they were named or when loaded.
    assert load(str(tm.path)).fingerprint == m.fingerprint
    assert load(str(tiny_model_factory("llama_mha").path)).fingerprint != m.fingerprint


def test_load_hf_directory_with_tokenizer(tiny_model_factory, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tm = tiny_model_factory("llama_mha")
    dest = tmp_path / "model"
    shutil.copytree(tm.path, dest)
    tk = Tokenizer(
        models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>")
    )
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(dest)
    m = load(str(dest))
    assert isinstance(m.tokenizer, PreTrainedTokenizerFast)
    assert m.tokenizer.encode("hello world", add_special_tokens=False) == [3, 4]


def test_load_hub_id_uses_download(tiny_model_factory, monkeypatch):
    tm = tiny_model_factory("llama_mqa")
    calls = []

    def fake_download(repo_id):
        calls.append(repo_id)
        return tm.path

    monkeypatch.setattr(importlib.import_module("jaxkv.load"), "download_hub", fake_download)
    m = load("someorg/tiny-llama")
    assert calls == ["someorg/tiny-llama"] and m.kind == "hf" and m.name == "someorg/tiny-llama"


def test_preset_not_fetched(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXKV_CACHE", str(tmp_path))
    with pytest.raises(LoadError, match="jaxkv fetch smollm2-135m"):
        load("smollm2-135m")


@pytest.mark.parametrize("name", ["./missing.gguf", "/no/such/dir", "missing.gguf", "not a model"])
def test_missing_path(name, monkeypatch):
    monkeypatch.setattr(
        importlib.import_module("jaxkv.load"),
        "download_hub",
        lambda repo_id: pytest.fail("must not hit the hub"),
    )
    with pytest.raises(LoadError, match="no such file or directory"):
        load(name)


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(LoadError, match="not a readable GGUF"):
        load(str(bad))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(LoadError, match="not a .gguf file"):
        load(str(f))


def test_extra_consolidated_safetensors_is_ignored(tiny_model_factory, tmp_path):
    """Mistral repos also ship consolidated.safetensors (same weights, other names): not ours to read."""
    tm = tiny_model_factory("mistral_gqa")
    dest = tmp_path / "model"
    shutil.copytree(tm.path, dest)
    save_file(
        {"tok_embeddings.weight": tm.state["model.embed_tokens.weight"]}, dest / "consolidated.safetensors"
    )
    cfg, params = load_hf_dir(dest)
    assert_tree_equal(params, expected_params(tm.state, cfg))


def test_loaded_model_is_hashable_and_compares_by_identity_fields(tiny_model_factory):
    tm = tiny_model_factory("llama_mqa")
    a, b = load(str(tm.path)), load(str(tm.path))
    assert a == b and hash(a) == hash(b)
