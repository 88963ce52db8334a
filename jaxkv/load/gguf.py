"""GGUF files (llama.cpp) -> ``(ModelConfig, params, metadata)``.

Conventions
-----------
* Tensors are dequantized with ``gguf.quants.dequantize`` to float32 (exact for Q4_0/Q4_1/Q8_0/K-quants:
  the dequantized values are what llama.cpp computes with), renamed to Hugging Face names with
  :data:`LAYER_NAMES` / :data:`TOP_NAMES`, and handed to :func:`jaxkv.load.hf.params_from_hf_state_dict`,
  so GGUF and safetensors checkpoints share one key map, one shape check and one cast to ``dtype``.
* A GGUF tensor's dims are listed fastest-first (``ne0, ne1``): numpy shape ``(ne1, ne0)``, which for a
  linear is Hugging Face's ``[out, in]``.
* llama.cpp's converter permutes the rows of q/k (weights and biases) of ``llama``-architecture models
  from Hugging Face's rotate-half RoPE layout to its interleaved one; :func:`unpermute_rows` undoes it.
  ``qwen2`` files use llama.cpp's NEOX RoPE and are stored unpermuted.
* The embedding is tied when the file has no ``output.weight``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxkv.config import ModelConfig, from_gguf_metadata
from jaxkv.errors import CheckpointError, LoadError
from jaxkv.load.hf import LazyTensors, params_from_hf_state_dict

# GGUF per-block tensor stem (``blk.{i}.<stem>.weight|bias``) -> Hugging Face module under model.layers.{i}.
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Architectures whose q/k rows llama.cpp's convert_hf_to_gguf.py permutes (LlamaModel.permute).
PERMUTED_ARCHS = {"llama"}

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when jaxkv has no mapping for it."""
    if m := _BLOCK_RE.fullmatch(name):
        module = LAYER_NAMES.get(m.group(2))
        return None if module is None else f"model.layers.{m.group(1)}.{module}.{m.group(3)}"
    if (m := _TOP_RE.fullmatch(name)) and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (``n_head`` = query heads for q, KV heads for k).

    llama.cpp stores each head's rows as ``reshape(n_head, 2, H/2).swapaxes(1, 2)`` of the Hugging Face
    rows (halves interleaved, for its GPT-J style RoPE); this is the inverse. Works for a 1-D bias too.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot un-permute {rows} rows into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path``; :class:`~jaxkv.errors.LoadError` when it is not a GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # GGUFReader raises ValueError on a bad magic, others on truncation
        raise LoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(reader) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def load_gguf(
    path: str | Path, dtype=jnp.float32, *, reader=None, mesh=None
) -> tuple[ModelConfig, dict, dict[str, Any]]:
    """Load ``(cfg, params, metadata)`` from a GGUF file, dequantized to float32 then cast to ``dtype``.

    ``metadata`` is the file's key/value metadata (tokenizer included). Pass an already-open
    ``reader`` (from :func:`open_gguf`) to avoid parsing the file twice. With ``mesh``, each tensor
    goes straight into its ``jaxkv.sharding`` sharding.
    """
    from gguf import quants

    reader = reader if reader is not None else open_gguf(path)
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    by_hf: dict[str, Any] = {}
    unmapped = []
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            unmapped.append(t.name)
        else:
            by_hf[hf_name] = t
    if unmapped:
        hint = ""
        if "rope_freqs.weight" in unmapped:
            hint = (
                " (rope_freqs holds LLaMA 3.1 RoPE scaling factors; load the Hugging Face checkpoint instead)"
            )
        raise CheckpointError(
            f"{path}: GGUF tensors jaxkv does not map: {', '.join(sorted(unmapped)[:5])}{hint}"
        )

    tied = "lm_head.weight" not in by_hf
    cfg = from_gguf_metadata({**meta, "_tied": tied}, source=str(path))
    permute = arch in PERMUTED_ARCHS

    def read(hf_name: str) -> np.ndarray:
        t = by_hf[hf_name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        # A plain ndarray, not the reader's memmap: numpy's memmap bookkeeping on every row slice
        # inside gguf.quants makes dequantization several times slower.
        try:
            w = (
                quants.dequantize(np.asarray(t.data), t.tensor_type)
                .astype(np.float32, copy=False)
                .reshape(shape)
            )
        except NotImplementedError as e:
            raise CheckpointError(
                f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name} ({e})"
            ) from None
        if permute and ".self_attn.q_proj." in hf_name:
            w = unpermute_rows(w, cfg.num_heads)
        elif permute and ".self_attn.k_proj." in hf_name:
            w = unpermute_rows(w, cfg.num_kv_heads)
        return w

    try:
        params = params_from_hf_state_dict(cfg, LazyTensors(list(by_hf), read), dtype, mesh=mesh)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, params, meta
