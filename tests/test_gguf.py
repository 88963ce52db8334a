"""GGUF loading and the GGUF tokenizer, checked against transformers' own GGUF loader.

The real SmolLM2-135M GGUF is loaded once per session by us and once by transformers (the slow part,
~15 s). Tiny GGUF files written here from the tiny Hugging Face models check the name map and the
q/k un-permutation exactly, for GQA/MQA and for Qwen2 (biases, no permutation).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from reference import assert_tree_equal, expected_params

from jaxkv.errors import CheckpointError, TokenizerError
from jaxkv.load import load, load_gguf
from jaxkv.load.gguf import unpermute_rows
from jaxkv.load.tokenizer import tokenizer_from_gguf_metadata

TEXTS = [
    "Hello world",
    "The State of the Union is strong. It's 1,234.56 dollars in 2024!",
    "  leading spaces,  double  spaces\n\nnew lines\ttabs and trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Unicode: café, naïve, Zürich, 東京, emoji 🤖 -- done.",
    "a . b , c ! ? don't won't I'm we'll they've",
    "def f(x):\n    return x**2  # 0123456789",
    "",
]


# ---- the real model --------------------------------------------------------------------------------


def test_config_matches_transformers(smol, hf_gguf_model):
    c, h = smol.cfg, hf_gguf_model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (
        h.vocab_size,
        h.hidden_size,
        h.intermediate_size,
    )
    assert (c.num_layers, c.num_heads, c.num_kv_heads) == (30, 9, 3)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        h.num_hidden_layers,
        h.num_attention_heads,
        h.num_key_value_heads,
        h.head_dim,
    )
    assert c.rope_theta == h.rope_parameters["rope_theta"] == 1e5
    assert c.rms_norm_eps == pytest.approx(h.rms_norm_eps)
    assert c.tie_word_embeddings and h.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert smol.kind == "gguf" and smol.dtype == "float32"


def test_tensors_match_transformers(smol, hf_gguf_model):
    """Dequantized + un-permuted tensors equal transformers' GGUF state dict (to 1e-6; in fact exactly)."""
    state = {k: v.detach().numpy() for k, v in hf_gguf_model.state_dict().items()}
    want = expected_params(state, smol.cfg)
    flat = dict(jax.tree_util.tree_leaves_with_path(smol.params))
    assert set(flat) == set(dict(jax.tree_util.tree_leaves_with_path(want)))
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        np.testing.assert_allclose(
            np.asarray(flat[path]), w, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_bfloat16_load_is_the_float32_load_cast(smollm2_gguf, smol):
    cfg, params, _ = load_gguf(smollm2_gguf, jnp.bfloat16)
    assert cfg == smol.cfg
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["wq"][3]),
        np.asarray(smol.params["layers"]["wq"][3]).astype(ml_dtypes.bfloat16),
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


def test_preset_name_resolves_to_the_fetched_file(smollm2_gguf, smol, monkeypatch):
    from jaxkv.fetch import preset_path

    monkeypatch.setenv("JAXKV_CACHE", str(smollm2_gguf.parent.parent))
    assert preset_path("smollm2-135m") == smollm2_gguf
    assert smollm2_gguf.stat().st_size == 98_362_432
    # The same file named two ways has one fingerprint (the jaxkv load is ~3 s, so only resolve here).
    from jaxkv.load import resolve

    assert resolve("smollm2-135m") == ("gguf", smollm2_gguf)


# ---- permutation and tiny GGUF files -------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(
    "shape, n_head", [((9 * 64, 576), 9), ((3 * 64, 576), 3), ((4 * 16,), 4), ((16, 8), 1)]
)
def test_unpermute_inverts_llama_cpp_permute(shape, n_head):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rows(permuted, n_head), w)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(tm, path: Path, arch: str, extra_tensors: dict | None = None) -> Path:
    """Write a tiny HF model as an F32 GGUF the way llama.cpp's converter does (q/k permuted for llama)."""
    hf = tm.hf_config
    n_head, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_vocab_size(hf["vocab_size"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, arr in tm.state.items():
        if name == "lm_head.weight" and hf["tie_word_embeddings"]:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_GGUF_NAMES[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                arr = llama_cpp_permute(arr, n_head)
            elif arch == "llama" and module == "self_attn.k_proj":
                arr = llama_cpp_permute(arr, n_kv)
        else:
            gname = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
            }.get(name, "output.weight")
        w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "variant, arch", [("llama_mqa", "llama"), ("mistral_gqa", "llama"), ("qwen2_bias_tied", "qwen2")]
)
def test_tiny_gguf_round_trip(tiny_model_factory, tmp_path, variant, arch):
    tm = tiny_model_factory(variant)
    path = write_tiny_gguf(tm, tmp_path / "tiny.gguf", arch)
    cfg, params, meta = load_gguf(path)
    assert meta["general.architecture"] == arch
    assert cfg.tie_word_embeddings == tm.hf_config["tie_word_embeddings"]
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.num_kv_heads == tm.hf_config["num_key_value_heads"]
    assert_tree_equal(params, expected_params(tm.state, cfg))
    m = load(str(path))  # no embedded vocabulary -> no tokenizer, like a bare HF directory
    assert m.tokenizer is None and m.kind == "gguf"


def test_tiny_gguf_unmapped_tensor(tiny_model_factory, tmp_path):
    tm = tiny_model_factory("llama_mqa")
    path = write_tiny_gguf(tm, tmp_path / "tiny.gguf", "llama", {"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        load_gguf(path)


def test_tiny_gguf_missing_tensor_names_hf_key(tiny_model_factory, tmp_path):
    tm = tiny_model_factory("llama_mqa")
    tm_missing = type(tm)(
        tm.name, tm.path, {k: v for k, v in tm.state.items() if "layers.1.mlp.up" not in k}, tm.hf_config
    )
    path = write_tiny_gguf(tm_missing, tmp_path / "tiny.gguf", "llama")
    with pytest.raises(
        CheckpointError, match=r"tiny\.gguf: checkpoint is missing tensors: model\.layers\.1\.mlp\.up_proj"
    ):
        load_gguf(path)


# ---- tokenizer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(smol, hf_gguf_tokenizer, text):
    ours, ref = smol.tokenizer, hf_gguf_tokenizer
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids) == text  # byte-level BPE round-trips exactly
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(smol, hf_gguf_tokenizer):
    ours, ref = smol.tokenizer, hf_gguf_tokenizer
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Thanks!"},
    ]
    for gen in (False, True):
        text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        ids = ours.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ids == ref.apply_chat_template(
            msgs, tokenize=True, add_generation_prompt=gen, return_dict=False
        )
        assert ids[0] == 1  # <|im_start|>, a single special token


def test_tokenizer_special_tokens(smol, hf_gguf_tokenizer):
    tok = smol.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
    )
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert len(tok) == 49152 == len(hf_gguf_tokenizer)
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=True)  # add_bos_token is False
    # Every control token (type 3) encodes whole.
    assert tok.encode("<repo_name><file_sep><jupyter_output>") == [3, 5, 14]


def test_tokenizer_splits_digits_like_llama_cpp(smol):
    """tokenizer.ggml.pre = smollm: llama.cpp splits \\p{N} one by one before the GPT-2 regex.

    transformers' converter only applies the GPT-2 regex; it agrees on ASCII digits (the vocabulary has
    no digit merges) but not on other numerals: " ½" is "Ġ" + "Â½" here, "ĠÂ" + "½" there.
    """
    tok = smol.tokenizer
    assert tok.convert_ids_to_tokens(tok.encode(" ½")) == ["Ġ", "Â½"]
    assert tok.convert_ids_to_tokens(tok.encode("2024")) == ["2", "0", "2", "4"]


def test_tokenizer_adds_bos_when_the_file_says_so(smol_meta):
    tok = tokenizer_from_gguf_metadata({**smol_meta, "tokenizer.ggml.add_bos_token": True})
    assert tok.encode("Hello world") == [1, 19556, 905]
    assert tok.encode("Hello world", add_special_tokens=False) == [19556, 905]


def test_unsupported_gguf_tokenizers(smol_meta):
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model='llama' is not supported"):
        tokenizer_from_gguf_metadata({**smol_meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre='deepseek-coder' is not supported"):
        tokenizer_from_gguf_metadata({**smol_meta, "tokenizer.ggml.pre": "deepseek-coder"})
    no_vocab = {k: v for k, v in smol_meta.items() if not k.startswith("tokenizer.")}
    with pytest.raises(TokenizerError, match="no embedded tokenizer"):
        tokenizer_from_gguf_metadata(no_vocab)
