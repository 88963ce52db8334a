"""Persistence of quantized models: Orbax checkpoints, and the Hugging Face GPTQ/AWQ safetensors layouts.

jaxkv layout (:func:`save_quantized` / :func:`restore_quantized`)::

    DIR/arrays/         Orbax PyTree checkpoint of the params, each QArray as a dict
                        {"packed" uint8, "scale", "zero" uint8 (asymmetric only)}: packing preserved,
                        so restoring reads back the very bytes (bitwise identical logits)
    DIR/quant.json      format, jaxkv version, recipe, model config, the model it came from (name,
                        source, fingerprint), static metadata of every QArray (bits, group, dtype),
                        weight bytes, and a sha256 of all array bytes
    DIR/tokenizer/      the tokenizer (save_pretrained), when the model has one

Hugging Face layouts (:func:`export_hf`, :func:`import_hf`), ``nn.Linear`` weights ``[out, in]``:

* GPTQ (AutoGPTQ / GPTQModel, ``quant_method: gptq``): ``qweight`` int32 ``[in*bits/32, out]``, the codes
  as a little-endian bitstream along ``in`` (3-bit codes cross word boundaries) -- byte for byte the
  ``QArray.packed`` layout, so import is a reinterpretation; ``qzeros`` int32 ``[in/g, out*bits/32]``,
  the zero points packed the same way along ``out``, minus 1 in ``checkpoint_format`` "gptq" (v1,
  what AutoGPTQ writes; its kernels add the 1 back) and as is in "gptq_v2"; ``scales`` fp16
  ``[in/g, out]``; ``g_idx`` int32 ``[in]`` (``i // g``). Bits 2, 3, 4, 8.
* AWQ (AutoAWQ GEMM, ``quant_method: awq``, 4 bits, zero point): ``qweight`` int32 ``[in, out/8]`` packed
  along ``out`` in the interleaved order (0, 2, 4, 6, 1, 3, 5, 7); ``qzeros`` int32 ``[in/g, out/8]``
  likewise (no offset); ``scales`` fp16 ``[in/g, out]``.

Supported on import: every block linear and lm_head in either layout, plain tensors for the rest.
Not supported (clear error): act-order checkpoints whose ``g_idx`` is not ``i // g`` (GPTQ
``desc_act`` without static groups; storing them would need a row permutation), AWQ GEMV/Marlin
variants, Exllama-v2 / Marlin repacked ``qweight``, and a v1 8-bit zero point of 256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import __version__, checkpoint
from jaxkv.config import ModelConfig, from_hf_config
from jaxkv.errors import CheckpointError, JaxkvError
from jaxkv.params import param_infos
from jaxkv.quant.qarray import QArray, quantized_bytes, to_layout, weight_bytes, weight_bytes_fp16
from jaxkv.quant.recipe import LINEARS, QuantRecipe

FORMAT = "jaxkv-quantized/1"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# --------------------------------------------------------------------------- jaxkv (Orbax) layout


def _flatten(params, prefix="") -> tuple[dict, dict]:
    """Params -> (nested dict of plain arrays for Orbax, {path: QArray static metadata})."""
    arrays, meta = {}, {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, QArray):
            v = to_layout(v, "io")  # checkpoints hold the canonical packing
            d = {"packed": v.packed, "scale": v.scale}
            if v.zero is not None:
                d["zero"] = v.zero
            arrays[k] = d
            meta[name] = {
                "bits": v.bits,
                "group": v.group,
                "dtype": np.dtype(v.dtype).name,
                "sym": v.sym,
                "shape": list(v.shape),
                "scale_dtype": np.dtype(v.scale.dtype).name,
            }
        elif isinstance(v, dict):
            arrays[k], sub = _flatten(v, name + "/")
            meta.update(sub)
        else:
            arrays[k] = v
    return arrays, meta


def _unflatten(arrays, meta, prefix="") -> dict:
    out = {}
    for k, v in arrays.items():
        name = f"{prefix}{k}"
        if name in meta:
            m = meta[name]
            out[k] = QArray(
                packed=jnp.asarray(v["packed"]),
                scale=jnp.asarray(v["scale"]),
                zero=None if m["sym"] else jnp.asarray(v["zero"]),
                bits=int(m["bits"]),
                group=int(m["group"]),
                dtype=np.dtype(m["dtype"]),
            )
            if list(out[k].shape) != list(m["shape"]):
                raise CheckpointError(f"{name}: restored shape {out[k].shape} != recorded {m['shape']}")
        elif isinstance(v, dict):
            out[k] = _unflatten(v, meta, name + "/")
        else:
            out[k] = jnp.asarray(v)
    return out


def _sha256(arrays) -> str:
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(arrays)
    for path, a in sorted(leaves, key=lambda pa: jax.tree_util.keystr(pa[0])):
        a = np.asarray(jax.device_get(a))
        h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _model_info(model) -> dict:
    return {k: getattr(model, k, None) for k in ("name", "source", "kind", "fingerprint", "dtype")}


def save_quantized(
    path: str | Path, model, recipe: QuantRecipe | None = None, extra: dict | None = None
) -> Path:
    """Save a quantized ``model`` (``.cfg``, ``.params``, optional ``.tokenizer``) to directory ``path``.

    ``recipe`` defaults to ``model.recipe`` when the model carries one.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    recipe = recipe if recipe is not None else getattr(model, "recipe", None)
    arrays, qmeta = _flatten(model.params)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path / "arrays", arrays, force=True)
    qb, qfp = quantized_bytes(model.params)
    meta = {
        "format": FORMAT,
        "jaxkv_version": __version__,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "model_config": model.cfg.to_dict(),
        "model": _model_info(model),
        "qarrays": qmeta,
        "weight_bytes": weight_bytes(model.params),
        "weight_bytes_fp16": weight_bytes_fp16(model.params),
        "quantized_bytes": qb,
        "quantized_bytes_fp16": qfp,
        "sha256": _sha256(arrays),
        **(extra or {}),
    }
    (path / "quant.json").write_text(json.dumps(meta, indent=2, default=str))
    tok = getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(path / "tokenizer"))
    return path


def read_metadata(path: str | Path) -> dict:
    """``quant.json`` of a saved quantized model, checked (missing, corrupt, unknown format)."""
    return checkpoint.read_metadata(path, "quant.json", FORMAT, "a jaxkv quantized checkpoint")


def saved_recipe(path: str | Path) -> QuantRecipe | None:
    """The recipe recorded in a jaxkv quantized checkpoint (None for other directories or none recorded)."""
    if not (Path(path) / "quant.json").is_file():
        return None
    d = read_metadata(path).get("recipe")
    return QuantRecipe.from_dict(d) if d else None


@dataclasses.dataclass(frozen=True)
class QuantizedCheckpoint:
    cfg: ModelConfig
    params: Any = dataclasses.field(repr=False)
    recipe: QuantRecipe | None
    meta: dict = dataclasses.field(repr=False)


def restore_quantized(path: str | Path) -> QuantizedCheckpoint:
    """Read back what :func:`save_quantized` wrote (checksum verified); no recalibration."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_metadata(path)
    try:
        with ocp.PyTreeCheckpointer() as ckptr, warnings.catch_warnings():
            # Single-host restore onto the default device: the sharding notice does not apply.
            warnings.filterwarnings("ignore", message="Sharding info not provided")
            arrays = ckptr.restore(path / "arrays")
    except Exception as e:  # orbax / tensorstore raise many types for missing or damaged files
        raise CheckpointError(f"{path}: cannot read the arrays ({type(e).__name__}: {e})") from None
    if _sha256(arrays) != meta["sha256"]:
        raise CheckpointError(f"{path}: the arrays do not match their recorded checksum (corrupt?)")
    cfg = ModelConfig.from_dict(meta["model_config"])
    recipe = QuantRecipe.from_dict(meta["recipe"]) if meta.get("recipe") else None
    return QuantizedCheckpoint(cfg, _unflatten(arrays, meta["qarrays"]), recipe, meta)


def load_quantized(path: str | Path):
    """A :class:`jaxkv.load.LoadedModel` from a jaxkv quantized checkpoint or a HF GPTQ/AWQ directory.

    The model's ``fingerprint`` is that of the full-precision model it was quantized from (jaxkv
    checkpoints), so prefixes made from that model match it.
    """
    from jaxkv.load import LoadedModel
    from jaxkv.load.tokenizer import load_hf_tokenizer

    path = Path(path)
    if (path / "quant.json").is_file():
        ck = restore_quantized(path)
        info = ck.meta.get("model") or {}
        tok_dir = path / "tokenizer"
        tokenizer = load_hf_tokenizer(tok_dir) if tok_dir.is_dir() else None
        values = {
            "cfg": ck.cfg,
            "params": ck.params,
            "tokenizer": tokenizer,
            "name": str(path),
            "source": info.get("source") or str(path),
            "kind": info.get("kind") or "jaxkv-quantized",
            "fingerprint": info.get("fingerprint") or ck.meta["sha256"][:16],
            "dtype": info.get("dtype") or "float32",
            "recipe": ck.recipe,
        }
    elif is_hf_quantized(path):
        cfg, params, qc = import_hf(path)
        values = {
            "cfg": cfg,
            "params": params,
            "tokenizer": load_hf_tokenizer(path),
            "name": str(path),
            "source": str(path),
            "kind": f"hf-{qc['quant_method']}",
            "fingerprint": hashlib.sha256(json.dumps(qc, sort_keys=True).encode()).hexdigest()[:16],
            "dtype": "float32",
            "recipe": None,
        }
    else:
        raise JaxkvError(
            f"{path}: neither a jaxkv quantized checkpoint (quant.json) nor a Hugging Face GPTQ/AWQ "
            "directory (config.json with a quantization_config)"
        )
    return LoadedModel(**values)


# --------------------------------------------------------------------------- bit packing helpers (numpy)


def _bytes_to_words(b: np.ndarray) -> np.ndarray:
    """uint8 ``[4R, C]`` (little-endian byte stream along axis 0) -> int32 words ``[R, C]``."""
    R4, C = b.shape
    w = b.reshape(R4 // 4, 4, C).astype(np.uint32)
    words = w[:, 0] | (w[:, 1] << 8) | (w[:, 2] << 16) | (w[:, 3] << 24)
    return words.view(np.int32)


def _words_to_bytes(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_bytes_to_words`."""
    u = np.ascontiguousarray(w).view(np.uint32)
    R, C = u.shape
    out = np.stack([(u >> (8 * m)) & 0xFF for m in range(4)], axis=1).astype(np.uint8)
    return out.reshape(R * 4, C)


def _pack_np(codes: np.ndarray, bits: int) -> np.ndarray:
    from jaxkv.quant.qarray import pack

    return np.asarray(pack(jnp.asarray(codes.astype(np.uint32)), bits))


def _unpack_np(packed: np.ndarray, bits: int) -> np.ndarray:
    from jaxkv.quant.qarray import unpack

    return np.asarray(unpack(jnp.asarray(packed), bits))


def gptq_pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[R, C]`` -> int32 ``[R*bits/32, C]``: the GPTQ bitstream along rows (R*bits % 32 == 0)."""
    if (codes.shape[0] * bits) % 32:
        raise JaxkvError(f"GPTQ packing needs rows*bits to be a multiple of 32, got {codes.shape[0]}x{bits}")
    return _bytes_to_words(_pack_np(codes, bits))


def gptq_unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    return _unpack_np(_words_to_bytes(words), bits)


def awq_pack_cols(codes: np.ndarray) -> np.ndarray:
    """4-bit codes ``[R, C]`` -> int32 ``[R, C/8]`` in AutoAWQ's interleaved order."""
    R, C = codes.shape
    c = codes.astype(np.uint32).reshape(R, C // 8, 8)
    out = np.zeros((R, C // 8), np.uint32)
    for k, col in enumerate(AWQ_ORDER):
        out |= (c[:, :, col] & 0xF) << (4 * k)
    return out.view(np.int32)


def awq_unpack_cols(words: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(words).view(np.uint32)
    R, C8 = u.shape
    out = np.zeros((R, C8, 8), np.uint8)
    for k, col in enumerate(AWQ_ORDER):
        out[:, :, col] = (u >> (4 * k)) & 0xF
    return out.reshape(R, C8 * 8)


# --------------------------------------------------------------------------- Hugging Face export / import

_HF_LINEAR = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}
_HF_LAYER_PLAIN = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
}


def _hf_config_dict(cfg: ModelConfig, torch_dtype: str) -> dict:
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    d = {
        "architectures": [arch[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "torch_dtype": torch_dtype,
    }
    if cfg.sliding_window is not None:
        d["sliding_window"] = cfg.sliding_window
        if cfg.model_type == "qwen2":
            d["use_sliding_window"] = True
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = dataclasses.asdict(cfg.rope_scaling)
    return d


def _export_linear(q: QArray, fmt: str, prefix: str, tensors: dict, checkpoint_format: str) -> None:
    q = to_layout(q, "io")
    codes = _unpack_np(np.asarray(q.packed), q.bits)  # [I, O]
    zero = (
        np.asarray(jax.device_get(q.zero))
        if q.zero is not None
        else np.full(q.scale.shape, 2 ** (q.bits - 1))
    )
    scales = np.asarray(jax.device_get(q.scale)).astype(np.float16)
    if np.dtype(q.scale.dtype) != np.float16:
        warnings.warn(f"{prefix}: scales cast from {np.dtype(q.scale.dtype).name} to float16", stacklevel=3)
    I, O = q.shape
    if fmt == "gptq":
        tensors[f"{prefix}.qweight"] = _bytes_to_words(np.asarray(q.packed))
        z = zero.astype(np.int64) - (1 if checkpoint_format == "gptq" else 0)
        if checkpoint_format == "gptq" and (zero == 0).any():
            warnings.warn(
                f"{prefix}: a zero point of 0 is stored as {2**q.bits - 1} in GPTQ v1 (AutoGPTQ kernels then "
                "read 2^bits); use checkpoint_format='gptq_v2' for an exact file",
                stacklevel=3,
            )
        zq = (z & (2**q.bits - 1)).astype(np.uint32)
        tensors[f"{prefix}.qzeros"] = gptq_pack_rows(zq.T, q.bits).T.copy()
        tensors[f"{prefix}.scales"] = scales
        tensors[f"{prefix}.g_idx"] = (np.arange(I) // q.group).astype(np.int32)
    else:
        tensors[f"{prefix}.qweight"] = awq_pack_cols(codes)
        tensors[f"{prefix}.qzeros"] = awq_pack_cols(zero.astype(np.uint8))
        tensors[f"{prefix}.scales"] = scales


def export_hf(
    path: str | Path,
    params: dict,
    cfg: ModelConfig,
    fmt: str = "gptq",
    checkpoint_format: str = "gptq",
    tokenizer=None,
    fp_dtype=None,
) -> Path:
    """Write quantized ``params`` as a Hugging Face GPTQ (``fmt="gptq"``) or AWQ (``fmt="awq"``) directory.

    Every block linear must be a QArray with one common (bits, group, sym); lm_head may be one too.
    Plain tensors are written in ``fp_dtype`` (default: their own dtype); scales in float16.
    """
    from safetensors.numpy import save_file

    if fmt not in ("gptq", "awq"):
        raise JaxkvError(f"export format must be 'gptq' or 'awq', got {fmt!r}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise JaxkvError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    layers = params["layers"]
    qs = [layers[n] for n in LINEARS]
    if not all(isinstance(q, QArray) for q in qs):
        missing = [n for n in LINEARS if not isinstance(layers[n], QArray)]
        raise JaxkvError(f"the {fmt} layout needs every block linear quantized; not quantized: {missing}")
    # Per-channel (one group over the input) is one setting across layers of different input sizes.
    kinds = {(q.bits, -1 if q.group == q.shape[-2] else q.group, q.sym) for q in qs}
    if len(kinds) != 1:
        raise JaxkvError(
            f"the {fmt} layout needs one (bits, group, sym) for all linears, found {sorted(kinds)}"
        )
    bits, group, sym = kinds.pop()
    if fmt == "awq" and bits != 4:
        raise JaxkvError(f"the AWQ GEMM layout holds 4-bit weights only, these are {bits}-bit")
    for n, q in zip(LINEARS, qs):
        I, O = q.shape[-2:]
        if fmt == "gptq" and ((I * bits) % 32 or (O * bits) % 32):
            raise JaxkvError(
                f"layers/{n}: GPTQ packing needs in*bits and out*bits to be multiples of 32 ({I}, {O})"
            )
        if fmt == "awq" and O % 8:
            raise JaxkvError(
                f"layers/{n}: AWQ packing needs the output dimension ({O}) to be a multiple of 8"
            )
    tensors: dict[str, np.ndarray] = {}

    def plain(a):
        a = np.asarray(jax.device_get(a))
        return a.astype(fp_dtype) if fp_dtype is not None else a

    def put_linear(w, prefix):
        if isinstance(w, QArray):
            _export_linear(w, fmt, prefix, tensors, checkpoint_format)
        else:
            tensors[f"{prefix}.weight"] = np.ascontiguousarray(plain(w).T)

    for l in range(cfg.num_layers):
        pre = f"model.layers.{l}"
        for n in LINEARS:
            put_linear(layers[n][l], f"{pre}.{_HF_LINEAR[n]}")
        for n, key in _HF_LAYER_PLAIN.items():
            if n in layers:
                tensors[f"{pre}.{key}"] = plain(layers[n][l])
    tensors["model.embed_tokens.weight"] = plain(params["embed"])
    tensors["model.norm.weight"] = plain(params["final_norm"])
    if "lm_head" in params:
        put_linear(params["lm_head"], "lm_head")
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    fp_name = np.dtype(fp_dtype if fp_dtype is not None else params["embed"].dtype).name
    hf = _hf_config_dict(cfg, fp_name)
    g = group
    if fmt == "gptq":
        qc = {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": g,
            "desc_act": False,
            "sym": sym,
            "static_groups": False,
            "true_sequential": True,
            "lm_head": isinstance(params.get("lm_head"), QArray),
            "checkpoint_format": checkpoint_format,
        }
    else:
        if sym:
            warnings.warn(
                "AWQ layout has zero points: symmetric weights are written with zero 8", stacklevel=2
            )
        qc = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm"}
    hf["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    if fmt == "gptq":
        (path / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _quant_config(path: Path) -> dict | None:
    cj = path / "config.json"
    if not cj.is_file():
        return None
    try:
        hf = json.loads(cj.read_text())
    except json.JSONDecodeError:
        return None
    qc = hf.get("quantization_config")
    if qc is None and (path / "quantize_config.json").is_file():
        qc = json.loads((path / "quantize_config.json").read_text())
        qc.setdefault("quant_method", "gptq")
    return qc


def is_hf_quantized(path: str | Path) -> bool:
    """True for a Hugging Face directory whose config declares GPTQ or AWQ quantization."""
    qc = _quant_config(Path(path))
    return bool(qc) and str(qc.get("quant_method", "")).lower() in ("gptq", "awq")


def _import_linear(t, prefix: str, qc: dict, I: int, O: int, dtype) -> QArray:
    method = qc["quant_method"].lower()
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    g = int(qc.get("group_size", qc.get("q_group_size", 128)))
    group = I if g in (-1, 0) else g
    if I % group:
        raise CheckpointError(f"{prefix}: group_size {group} does not divide the input dimension {I}")
    ng = I // group
    qweight, qzeros = np.asarray(t[f"{prefix}.qweight"]), np.asarray(t[f"{prefix}.qzeros"])
    scales = np.asarray(t[f"{prefix}.scales"])
    if scales.shape != (ng, O):
        raise CheckpointError(f"{prefix}.scales has shape {scales.shape}, expected {(ng, O)}")
    if method == "gptq":
        if bits not in (2, 3, 4, 8):
            raise CheckpointError(f"{prefix}: {bits}-bit GPTQ is not supported (2, 3, 4, 8)")
        if qweight.shape != (I * bits // 32, O):
            raise CheckpointError(
                f"{prefix}.qweight has shape {qweight.shape}, expected {(I * bits // 32, O)}"
            )
        if f"{prefix}.g_idx" in t:
            g_idx = np.asarray(t[f"{prefix}.g_idx"])
            if not np.array_equal(g_idx, np.arange(I) // group):
                raise CheckpointError(
                    f"{prefix}: g_idx is not i // group_size (an act-order checkpoint without static "
                    "groups); jaxkv stores groups in input order and cannot load it"
                )
        packed = _words_to_bytes(qweight)
        zeros = gptq_unpack_rows(np.ascontiguousarray(qzeros.T), bits).T.astype(np.int64)[:ng, :O]
        if qc.get("checkpoint_format", "gptq") != "gptq_v2":
            zeros = zeros + 1  # v1 stores zero - 1 (AutoGPTQ kernels add it back, without wrapping)
        if zeros.max() > 255:
            raise CheckpointError(f"{prefix}: a v1 zero point of 256 does not fit jaxkv's uint8 zeros")
    elif method == "awq":
        if bits != 4:
            raise CheckpointError(f"{prefix}: AWQ {bits}-bit is not supported (the GEMM layout is 4-bit)")
        if qweight.shape != (I, O // 8):
            raise CheckpointError(f"{prefix}.qweight has shape {qweight.shape}, expected {(I, O // 8)}")
        packed = _pack_np(awq_unpack_cols(qweight), 4)
        zeros = awq_unpack_cols(qzeros).astype(np.int64)
    else:
        raise CheckpointError(f"quant_method {method!r} is not supported (gptq, awq)")
    # A symmetric checkpoint (every zero 2^(b-1)) becomes a symmetric QArray: no zero array stored.
    sym = bool(qc.get("sym", False)) and bool((zeros == 2 ** (bits - 1)).all())
    return QArray(
        packed=jnp.asarray(packed),
        scale=jnp.asarray(scales.astype(np.float16)),
        zero=None if sym else jnp.asarray(zeros.astype(np.uint8)),
        bits=bits,
        group=group,
        dtype=np.dtype(dtype),
    )


def import_hf(path: str | Path, dtype=jnp.float32) -> tuple[ModelConfig, dict, dict]:
    """``(cfg, params, quantization_config)`` from a Hugging Face GPTQ/AWQ safetensors directory.

    Quantized linears become QArrays (bits/group from the config); plain tensors are cast to ``dtype``.
    Every tensor is shape-checked, and a tensor the map does not know is an error.
    """
    from jaxkv.load.hf import read_safetensors_dir

    path = Path(path)
    qc = _quant_config(path)
    if not qc:
        raise CheckpointError(f"{path}: config.json has no quantization_config (not a GPTQ/AWQ checkpoint)")
    hf = json.loads((path / "config.json").read_text())
    cfg = from_hf_config(hf, source=str(path / "config.json"))
    t = read_safetensors_dir(path)
    names = set(t)
    used: set[str] = set()
    infos = param_infos(cfg)

    def plain(key, shape):
        if key not in names:
            raise CheckpointError(f"{path}: missing tensor {key}")
        a = np.asarray(t[key])
        if a.shape != tuple(shape):
            raise CheckpointError(f"{path}: tensor {key} has shape {a.shape}, expected {tuple(shape)}")
        used.add(key)
        return a.astype(np.dtype(dtype))

    def linear(prefix, I, O):
        if f"{prefix}.qweight" in names:
            used.update(
                k for k in (f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")) if k in names
            )
            return _import_linear(t, prefix, qc, I, O, dtype)
        return jnp.asarray(plain(f"{prefix}.weight", (O, I)).T)

    L = cfg.num_layers
    layers: dict[str, Any] = {}
    per: dict[str, list] = {}
    for l in range(L):
        pre = f"model.layers.{l}"
        for n, hname in _HF_LINEAR.items():
            I, O = infos["layers"][n].shape[1:]
            per.setdefault(n, []).append(linear(f"{pre}.{hname}", I, O))
        for n, key in _HF_LAYER_PLAIN.items():
            if n in infos["layers"]:
                per.setdefault(n, []).append(jnp.asarray(plain(f"{pre}.{key}", infos["layers"][n].shape[1:])))
    for n, items in per.items():
        layers[n] = jax.tree.map(lambda *a: jnp.stack(a), *items)
    params = {
        "embed": jnp.asarray(plain("model.embed_tokens.weight", infos["embed"].shape)),
        "layers": layers,
        "final_norm": jnp.asarray(plain("model.norm.weight", infos["final_norm"].shape)),
    }
    if "lm_head" in infos:
        D, V = infos["lm_head"].shape
        params["lm_head"] = linear("lm_head", D, V)
    elif "lm_head.weight" in names:
        used.add("lm_head.weight")  # redundant copy of tied embeddings
    from jaxkv.load.hf import IGNORED_KEYS

    unmapped = sorted(k for k in names - used if not IGNORED_KEYS.search(k))
    if unmapped:
        more = f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else ""
        raise CheckpointError(
            f"{path}: tensors not mapped to jaxkv parameters: {', '.join(unmapped[:5])}{more}"
        )
    return cfg, params, qc
