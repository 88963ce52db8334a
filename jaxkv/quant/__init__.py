"""Weight quantization with real packed storage: RTN, GPTQ and AWQ at 8, 4, 3 and 2 bits.

``quantize(model, recipe)`` returns the same model type (``dataclasses.replace``) whose params have
:class:`~jaxkv.quant.qarray.QArray` leaves for the selected linears; ``jaxkv.model.forward`` and
``generate`` use them directly (``jaxkv.model.dense`` dequantizes on the fly, group by group). The
params-level function is :func:`quantize_params`. Storage layout: :mod:`jaxkv.quant.qarray`; rules
and recipe: :mod:`jaxkv.quant.recipe`; persistence and the Hugging Face GPTQ/AWQ layouts:
:mod:`jaxkv.quant.io`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxkv.config import ModelConfig
from jaxkv.quant.qarray import (
    QArray,
    dequantize,
    einsum,
    matmul,
    quantize_tensor,
    quantized_bytes,
    weight_bytes,
    weight_bytes_fp16,
)
from jaxkv.quant.recipe import QuantError, QuantRecipe, select, set_paths

__all__ = [
    "QArray",
    "QuantError",
    "QuantRecipe",
    "calibration_tokens",
    "dequantize",
    "einsum",
    "matmul",
    "quantize",
    "quantize_params",
    "quantize_tensor",
    "quantized_bytes",
    "weight_bytes",
    "weight_bytes_fp16",
]


def calibration_tokens(model, recipe: QuantRecipe) -> np.ndarray:
    """``recipe.calib_samples`` windows ``[N, calib_seqlen]`` of ``recipe.calib_data``, BOS first."""
    from jaxkv.corpus import calibration_windows, load_text, tokenize

    if getattr(model, "tokenizer", None) is None:
        raise QuantError(f"{recipe.method} needs calibration text, but this model has no tokenizer")
    ids = tokenize(model.tokenizer, load_text(recipe.calib_data))
    return calibration_windows(
        ids, recipe.calib_samples, recipe.calib_seqlen, recipe.calib_seed, bos_id=model.cfg.bos_token_id
    )


def quantize_params(
    params: dict,
    cfg: ModelConfig,
    recipe: QuantRecipe,
    calib_tokens: np.ndarray | None = None,
    progress: bool = True,
) -> dict:
    """Params with the leaves selected by ``recipe`` replaced by QArrays (other leaves shared, or, for
    AWQ, rescaled). ``calib_tokens [N, T]`` (token ids) are required by GPTQ and AWQ."""
    selected = select(params, recipe)
    if recipe.method == "rtn":
        from jaxkv.quant.rtn import rtn_quantize_params

        return set_paths(params, rtn_quantize_params(params, selected, recipe))
    if calib_tokens is None:
        raise QuantError(f"{recipe.method} needs calibration windows (calib_tokens [N, T])")
    tokens = np.asarray(calib_tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1:
        raise QuantError(f"calibration windows must be a [N, T] array of token ids, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise QuantError(f"calibration token ids must lie in [0, {cfg.vocab_size})")
    # Calibration statistics at full float32 matmul precision: under XLA's GPU default (TF32) the
    # captured activations carry ~1e-3 relative error, GPTQ's error feedback amplifies it, and which
    # GEMM algorithm the autotuner picks then moved SmolLM2 W4 GPTQ perplexity between 34.0 and 35.5
    # from one process to the next (H100; reproducible with autotuning off). No effect on CPU.
    with jax.default_matmul_precision("highest"):
        if recipe.method == "gptq":
            from jaxkv.quant.gptq import gptq_quantize_params

            return set_paths(params, gptq_quantize_params(params, cfg, recipe, tokens, selected, progress))
        from jaxkv.quant.awq import awq_quantize_params

        quantized, changed = awq_quantize_params(params, cfg, recipe, tokens, selected, progress)
        return set_paths(params, {**changed, **quantized})


def quantize(model, recipe: QuantRecipe, calib_tokens: np.ndarray | None = None, progress: bool = True):
    """``model`` (a LoadedModel or any dataclass with ``cfg`` and ``params``) with quantized params.

    GPTQ/AWQ calibration windows default to :func:`calibration_tokens` (``recipe.calib_*`` of
    ``recipe.calib_data`` through the model's tokenizer). A ``recipe`` field, if the model type has
    one, is set too.
    """
    if not dataclasses.is_dataclass(model) or not hasattr(model, "params") or not hasattr(model, "cfg"):
        raise TypeError("quantize(model, recipe) needs a model with .cfg and .params; see quantize_params")
    if recipe.needs_calibration and calib_tokens is None:
        calib_tokens = calibration_tokens(model, recipe)
    params = quantize_params(model.params, model.cfg, recipe, calib_tokens, progress)
    extra = {"recipe": recipe} if "recipe" in {f.name for f in dataclasses.fields(model)} else {}
    return dataclasses.replace(model, params=params, **extra)
