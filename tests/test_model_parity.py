"""Logit parity with Hugging Face transformers (PyTorch, float32), through jaxkv's own loaders.

* Tiny random models (MHA, GQA, MQA, tied/untied, Qwen2 biases, llama3 RoPE scaling, Mistral's sliding
  window shorter than the text): within 1e-4.
* The real SmolLM2-135M GGUF, loaded by jaxkv and by transformers' GGUF loader, on a 64-token text:
  within 1e-3.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.load import load
from jaxkv.model import forward


def jax_logits(model, tokens: np.ndarray) -> np.ndarray:
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, _ = forward(model.params, jnp.asarray(tokens, jnp.int32), positions, None, model.cfg)
    return np.asarray(logits)


def torch_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens)).logits.float().numpy()


def test_tiny_model_logits_match_transformers(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(
        tiny_model.path, dtype=torch.float32, attn_implementation="eager"
    )
    hf_model.eval()
    # 40 tokens: longer than the Mistral variant's sliding window (16), so the window is exercised.
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 40))
    ours = jax_logits(load(str(tiny_model.path)), tokens)
    ref = torch_logits(hf_model, tokens)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def text_tokens(smol) -> np.ndarray:
    """64 tokens of a chat-formatted prompt: BOS (<|im_start|>) first, where the massive activation sits."""
    msgs = [
        {
            "role": "user",
            "content": "Mr. Speaker, Mr. Vice President, Members of Congress, my fellow Americans: tonight "
            "I come to report on the state of our Union, and to ask what kind of country we want to leave "
            "to our children and grandchildren in the years ahead.",
        }
    ]
    text = smol.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = smol.tokenizer.encode(text)
    assert len(ids) >= 64 and ids[0] == smol.cfg.bos_token_id
    return np.asarray([ids[:64]])


def test_smollm2_gguf_logits_match_transformers(smol, hf_gguf_model, text_tokens):
    ours = jax_logits(smol, text_tokens)
    ref = torch_logits(hf_gguf_model, text_tokens)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
