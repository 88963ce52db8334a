"""Round-to-nearest weight quantization: llm-awq's ``pseudo_quantize_tensor`` with real packing.

For each group of ``group`` input rows and each output column (``w`` stored (in, out))::

    asymmetric (zero_point=True):  scale = max(max - min, 1e-5) / (2^b - 1)
                                   zero  = clip(-round(min / scale), 0, 2^b - 1)
                                   q     = clip(round(w / scale) + zero, 0, 2^b - 1)
    symmetric:                     scale = max(|w|max, 1e-5) / (2^(b-1) - 1),  zero = 2^(b-1)

``round`` is round-half-to-even, as in torch. ``scale`` is rounded to the recipe's scale dtype
before the zero point and the codes are derived from it (what llm-awq does in fp16, for any dtype).
"""

from __future__ import annotations

import jax

from jaxkv.quant.qarray import QArray, quantize_tensor
from jaxkv.quant.recipe import QuantRecipe


def rtn_quantize(w: jax.Array, recipe: QuantRecipe, name: str = "weight") -> QArray:
    """Quantize one (possibly stacked ``[L, in, out]``) weight with round-to-nearest."""
    return quantize_tensor(
        w, recipe.bits, recipe.group_for(w.shape[-2]), recipe.sym, recipe.jnp_scale_dtype, name=name
    )


def rtn_quantize_params(params, selected: dict, recipe: QuantRecipe) -> dict:
    """``{path: QArray}`` for every selected path of ``params``."""
    from jaxkv.quant.recipe import get_path

    return {name: rtn_quantize(get_path(params, name), recipe, name) for name in selected}
