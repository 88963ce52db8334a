"""``load(model)``: one entry point for every checkpoint source -> :class:`LoadedModel`.

``model`` is resolved, in this order, as

1. a preset name (``smollm2-135m``): the GGUF fetched into the cache by ``jaxkv fetch NAME``;
2. an existing path: a ``.gguf`` file, or a Hugging Face directory (``config.json`` + safetensors);
3. a hub id ``org/name`` (only when no such path exists): downloaded with ``huggingface_hub``.

Every failure is a :class:`~jaxkv.errors.JaxkvError` with a one-line message (missing file, directory
without config.json, unknown architecture, unreadable GGUF, unmapped/missing/misshapen tensor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxkv.config import ModelConfig
from jaxkv.errors import LoadError
from jaxkv.fetch import PRESETS, is_fetched, preset_path
from jaxkv.load.gguf import load_gguf, open_gguf
from jaxkv.load.hf import download_hub, load_hf_dir, params_from_hf_state_dict, safetensors_files
from jaxkv.load.tokenizer import load_hf_tokenizer, tokenizer_from_gguf_metadata

__all__ = [
    "LoadedModel",
    "download_hub",
    "load",
    "load_gguf",
    "load_hf_dir",
    "params_from_hf_state_dict",
    "resolve",
]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A loaded checkpoint.

    ``name`` is what the user asked for (preset, path or hub id); ``source`` the resolved local file
    or directory; ``kind`` "gguf" or "hf". ``fingerprint`` is a short stable hash of the config, the
    dtype and the weight files (names and sampled contents, see :func:`_file_digest`): equal
    fingerprints mean the same weights however they were named, so it can key derived artefacts
    (quantized params, prefixes) across machines. ``tokenizer`` is a
    ``PreTrainedTokenizerFast``, or None when the checkpoint carries no tokenizer. ``recipe`` is set
    by :func:`jaxkv.quantize` and the quantized-checkpoint loader.
    """

    cfg: ModelConfig
    # Compared and hashed through the fingerprint, not leaf by leaf.
    params: Any = dataclasses.field(repr=False, compare=False)
    tokenizer: Any = dataclasses.field(repr=False, compare=False)
    name: str
    source: str
    kind: str
    fingerprint: str
    dtype: str
    # The weight-quantization recipe (a QuantRecipe) once quantized; None for full precision.
    recipe: Any = None


_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's size and 16 evenly spaced 64 KiB samples (first and last included).

    Hashing a 15 GB checkpoint in full would take longer than loading it; two different checkpoints of
    one architecture (e.g. two fine-tunes) have the same names and sizes but differ in every sample.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(max(0, size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _fingerprint(kind: str, cfg: ModelConfig, files: list[Path], dtype: str) -> str:
    ident = {
        "kind": kind,
        "cfg": cfg.to_dict(),
        "dtype": dtype,  # a prefix computed in float32 is not the one a bfloat16 model would compute
        "files": sorted((f.name, _file_digest(f)) for f in files),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve(model: str) -> tuple[str, Path]:
    """``(kind, local path)`` for a preset / path / hub id, without loading any weights.

    ``kind`` is "gguf" or "hf". Hub ids are downloaded here.
    """
    if model in PRESETS:
        if not is_fetched(model):
            raise LoadError(
                f"preset {model!r} is not fetched yet: run `jaxkv fetch {model}` "
                f"(or `python -m jaxkv.fetch {model}`); expected at {preset_path(model)}"
            )
        return "gguf", preset_path(model)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LoadError(f"{path}: not a .gguf file; pass a .gguf file or a Hugging Face model directory")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
            raise LoadError(f"{path}: directory has no config.json, so it is not a Hugging Face model{hint}")
        return "hf", path
    if path.suffix.lower() == ".gguf" or model.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(model):
        presets = ", ".join(sorted(PRESETS))
        raise LoadError(f"{model}: no such file or directory (and not a preset: {presets})")
    return "hf", download_hub(model)


def load(model: str, dtype=jnp.float32, mesh=None) -> LoadedModel:
    """Load config, params (``jax.Array`` leaves of ``dtype``) and tokenizer from a preset/path/hub id.

    With ``mesh`` (``jaxkv.sharding.make_mesh``), every tensor is read once and placed straight into
    its sharding: no host or device holds the whole model.
    """
    kind, path = resolve(model)
    if kind == "gguf":
        reader = open_gguf(path)
        cfg, params, meta = load_gguf(path, dtype, reader=reader, mesh=mesh)
        # Like a Hugging Face directory without tokenizer files, a GGUF without a vocabulary has no tokenizer.
        has_vocab = "tokenizer.ggml.model" in meta
        tokenizer = tokenizer_from_gguf_metadata(meta, source=str(path)) if has_vocab else None
        files = [path]
    else:
        cfg, params = load_hf_dir(path, dtype, mesh=mesh)
        tokenizer = load_hf_tokenizer(path)
        files = safetensors_files(path)
    return LoadedModel(
        cfg=cfg,
        params=params,
        tokenizer=tokenizer,
        name=model,
        source=str(path),
        kind=kind,
        fingerprint=_fingerprint(kind, cfg, files, jnp.dtype(dtype).name),
        dtype=jnp.dtype(dtype).name,
    )
