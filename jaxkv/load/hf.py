"""Hugging Face checkpoints (a local directory of safetensors) -> ``(ModelConfig, params)``.

Conventions
-----------
* One explicit key map, :data:`LAYER_KEYS` and :data:`TOP_KEYS`, from Hugging Face tensor names to the
  layout of :mod:`jaxkv.params`: ``nn.Linear`` weights, stored ``[out, in]``, are transposed to
  ``(in, out)``; the per-layer tensors ``model.layers.{i}.*`` are stacked on a leading L axis.
* Every tensor is checked against the shape the config implies, and the error names the tensor.
  A key the map does not know is an error (a silently dropped tensor means a silently wrong model),
  except the buffers listed in :data:`IGNORED_KEYS` and a redundant ``lm_head.weight`` when the
  embeddings are tied. A missing key is an error too.
* Tensors are read one at a time, straight into a preallocated host array of the target dtype, so
  peak host memory is about one copy of the model in that dtype (plus one tensor).
* :func:`params_from_hf_state_dict` is shared with the GGUF loader, which renames GGUF tensors to
  these Hugging Face names first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxkv.config import ModelConfig, load_hf_config
from jaxkv.errors import CheckpointError, LoadError
from jaxkv.params import ArrayInfo, param_infos

# HF suffix under ``model.layers.{i}.`` -> (jaxkv name under params["layers"], transpose [out,in]->(in,out)).
LAYER_KEYS: dict[str, tuple[str, bool]] = {
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
    "input_layernorm.weight": ("attn_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
}

# Top-level HF name -> (jaxkv top-level name, transpose).
TOP_KEYS: dict[str, tuple[str, bool]] = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}

# Non-parameter buffers that some (older) checkpoints serialise; they are recomputed from the config.
IGNORED_KEYS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias)$")

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")

# Safetensors dtype names that numpy cannot represent natively -> the ml_dtypes type to view the bytes as.
_ML_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}

HF_WEIGHT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",  # model.safetensors or model-0000i-of-0000n.safetensors, not consolidated.*
    "model.safetensors.index.json",
)
HF_TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _hf_shape(info: ArrayInfo, stacked: bool, transpose: bool) -> tuple[int, ...]:
    """The shape a Hugging Face tensor must have to fill (one layer of) ``info``."""
    shape = info.shape[1:] if stacked else info.shape
    return tuple(reversed(shape)) if transpose else tuple(shape)


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def params_from_hf_state_dict(
    cfg: ModelConfig, tensors: Mapping[str, np.ndarray], dtype=jnp.float32, mesh=None
) -> dict:
    """Map a Hugging Face state dict (name -> array, ``[out, in]`` linears) to jaxkv params.

    ``tensors`` may be lazy (a Mapping that reads on ``__getitem__``); each tensor is read once.
    Returns the nested params dict of :mod:`jaxkv.params` with ``jax.Array`` leaves of ``dtype``.
    Raises :class:`~jaxkv.errors.CheckpointError` naming any unmapped, missing or misshapen tensor.
    With ``mesh`` (a ``jaxkv.sharding`` mesh) every tensor goes straight into its sharding
    (:func:`jaxkv.sharding.assemble_params`): no host or device ever holds the whole model.
    """
    infos = param_infos(cfg)
    layer_infos: dict[str, ArrayInfo] = infos["layers"]
    np_dtype = np.dtype(dtype)

    # Plan: every HF name this config needs -> (jaxkv path, layer index or None, transpose).
    plan: dict[str, tuple[tuple[str, ...], int | None, bool]] = {}
    for hf_name, (name, transpose) in TOP_KEYS.items():
        if name in infos:
            plan[hf_name] = ((name,), None, transpose)
    for i in range(cfg.num_layers):
        for suffix, (name, transpose) in LAYER_KEYS.items():
            if name in layer_infos:
                plan[f"model.layers.{i}.{suffix}"] = (("layers", name), i, transpose)

    unmapped = []
    for key in tensors:
        if key in plan or IGNORED_KEYS.search(key):
            continue
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied checkpoints may still serialise the (identical) output projection
        unmapped.append(key)
    if unmapped:
        hint = ""
        if any(k.endswith("_proj.bias") for k in unmapped) and not cfg.attention_bias:
            hint = " (the config has attention_bias=False)"
        elif any((m := _LAYER_RE.match(k)) and int(m.group(1)) >= cfg.num_layers for k in unmapped):
            hint = f" (the config has num_layers={cfg.num_layers})"
        elif "lm_head.weight" in unmapped:
            hint = " (the config has tie_word_embeddings=True)"
        raise CheckpointError(
            f"checkpoint has tensors jaxkv does not map: {_describe(sorted(unmapped))}{hint}"
        )
    missing = sorted(k for k in plan if k not in tensors)
    if missing:
        hint = " (the config has tie_word_embeddings=False)" if "lm_head.weight" in missing else ""
        raise CheckpointError(f"checkpoint is missing tensors: {_describe(missing)}{hint}")

    def checked(hf_name: str, path: tuple[str, ...], layer: int | None, transpose: bool) -> np.ndarray:
        info = layer_infos[path[1]] if layer is not None else infos[path[0]]
        arr = tensors[hf_name]
        want = _hf_shape(info, layer is not None, transpose)
        if tuple(arr.shape) != want:
            raise CheckpointError(
                f"tensor {hf_name} has shape {tuple(arr.shape)}, the config implies {want} "
                f"(jaxkv param {'/'.join(path)} {info.shape})"
            )
        return arr.T if transpose else arr

    if mesh is not None:
        from jaxkv.sharding import assemble_params

        where = {(path, layer): (hf_name, transpose) for hf_name, (path, layer, transpose) in plan.items()}

        def read(path: tuple[str, ...], layer: int | None) -> np.ndarray:
            hf_name, transpose = where[path, layer]
            return checked(hf_name, path, layer, transpose)

        return assemble_params(cfg, read, dtype, mesh)

    out: dict = {"layers": {}}
    for name, info in infos.items():
        if name != "layers":
            out[name] = np.empty(info.shape, np_dtype)
    for name, info in layer_infos.items():
        out["layers"][name] = np.empty(info.shape, np_dtype)

    for hf_name, (path, layer, transpose) in plan.items():
        dest = out[path[0]] if layer is None else out["layers"][path[1]][layer]
        np.copyto(dest, checked(hf_name, path, layer, transpose), casting="unsafe")
    # One host->device transfer per (stacked) leaf.
    return {
        k: ({n: jnp.asarray(a) for n, a in v.items()} if k == "layers" else jnp.asarray(v))
        for k, v in out.items()
    }


class LazyTensors(Mapping):
    """A read-on-access ``name -> np.ndarray`` mapping over a reader function (keeps host memory flat)."""

    def __init__(self, names: list[str], read: Callable[[str], np.ndarray]):
        self._names = {n: None for n in names}  # ordered, O(1) membership
        self._read = read

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data begins."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, 8 + n


def _shard_reader(path: Path) -> tuple[list[str], Callable[[str], np.ndarray]]:
    """Names in one safetensors file, and a function reading one of them as a numpy array."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="np")
        names = list(handle.keys())
        dtypes = {n: handle.get_slice(n).get_dtype() for n in names}
    except Exception as e:  # safetensors raises its own SafetensorError / OSError flavours
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None
    special = {n for n, d in dtypes.items() if d in _ML_DTYPES}
    header, data_start = _safetensors_header(path) if special else ({}, 0)

    def read(name: str) -> np.ndarray:
        if name not in special:
            return handle.get_tensor(name)
        # numpy has no bfloat16/float8: view the raw little-endian bytes through ml_dtypes instead.
        entry = header[name]
        begin, end = entry["data_offsets"]
        raw = np.fromfile(path, dtype=np.uint8, count=end - begin, offset=data_start + begin)
        return raw.view(_ML_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    return names, read


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a Hugging Face directory: the shards its index lists, else ``model.safetensors``.

    Only when neither exists are all ``*.safetensors`` taken: some repos (Mistral's) also ship a
    ``consolidated.safetensors`` with the same weights under other names, which must not be mixed in.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise LoadError(f"{f}: shard listed in the index is missing")
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{model_dir}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    return files


def read_safetensors_dir(model_dir: str | Path) -> LazyTensors:
    """A lazy ``name -> np.ndarray`` mapping over the files of :func:`safetensors_files`."""
    model_dir = Path(model_dir)
    files = safetensors_files(model_dir)
    readers: dict[str, Callable[[str], np.ndarray]] = {}
    for path in files:
        names, read = _shard_reader(path)
        for n in names:
            if n in readers:
                raise LoadError(f"{model_dir}: tensor {n} appears in more than one safetensors file")
            readers[n] = read
    return LazyTensors(list(readers), lambda n: readers[n](n))


def load_hf_dir(path: str | Path, dtype=jnp.float32, mesh=None) -> tuple[ModelConfig, dict]:
    """Load ``(cfg, params)`` from a local Hugging Face directory (config.json + safetensors).

    With ``mesh``, each tensor goes straight into its ``jaxkv.sharding`` sharding.
    """
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path}: no such directory")
    cfg = load_hf_config(path)
    try:
        params = params_from_hf_state_dict(cfg, read_safetensors_dir(path), dtype, mesh=mesh)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, params


def download_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download a hub model's config, safetensors and tokenizer files; returns the local snapshot dir.

    Uses ``huggingface_hub.snapshot_download`` (its cache, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply).
    Only the files jaxkv reads are fetched: no ``*.bin``, ``*.gguf`` or ONNX exports.
    """
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(HF_WEIGHT_PATTERNS + HF_TOKENIZER_PATTERNS)
        )
    except Exception as e:  # network, auth and not-found errors all come from huggingface_hub
        raise LoadError(
            f"{repo_id}: could not download from the Hugging Face hub ({type(e).__name__}: {e})"
        ) from None
    return Path(local)
