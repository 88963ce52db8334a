"""jaxkv: low-bit LLM inference in JAX that keeps the pivot tokens' KV cache intact (IntactKV).

The public API (everything else lives in submodules):

    load(model, dtype)                        -> LoadedModel (cfg, params, tokenizer)
    quantize(model, recipe)                   -> the model with packed low-bit weights
    make_prefix(fp_model, pivot)              -> Prefix (the FP model's K/V of the pivot tokens)
    calibrate(fp_model, q_model, prefix, windows, cfg) -> CalibResult (a calibrated prefix)
    save_prefix(path, prefix, model) / restore_prefix(path, model)
    generate(model, prefix, prompt, ...)      -> GenerationResult
    perplexity(params, cfg, windows, ...)     -> PplResult
"""

__version__ = "0.1.0"

from jaxkv.calibrate import CalibConfig, calibrate  # noqa: E402
from jaxkv.checkpoint import restore_prefix, save_prefix  # noqa: E402
from jaxkv.config import ModelConfig  # noqa: E402
from jaxkv.evaluate import make_windows, perplexity  # noqa: E402
from jaxkv.generate import generate, generate_iter  # noqa: E402
from jaxkv.load import LoadedModel, load  # noqa: E402
from jaxkv.model import decode_layout  # noqa: E402
from jaxkv.prefix import Prefix, make_prefix  # noqa: E402
from jaxkv.quant import QuantRecipe, quantize  # noqa: E402

__all__ = [
    "CalibConfig",
    "LoadedModel",
    "ModelConfig",
    "Prefix",
    "QuantRecipe",
    "calibrate",
    "decode_layout",
    "generate",
    "generate_iter",
    "load",
    "make_prefix",
    "make_windows",
    "perplexity",
    "quantize",
    "restore_prefix",
    "save_prefix",
]
