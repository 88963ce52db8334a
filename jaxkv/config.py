"""Model configuration: one frozen dataclass, built from a Hugging Face ``config.json`` or GGUF metadata.

Conventions
-----------
* Every supported checkpoint (LLaMA 2/3, Mistral, Qwen2, SmolLM) is described by one
  :class:`ModelConfig`. Architecture differences are fields, not subclasses:
  ``attention_bias`` (Qwen2's q/k/v biases), ``tie_word_embeddings``, ``sliding_window``
  (Mistral v0.1), ``rope_scaling`` (LLaMA 3.1 "llama3", "linear").
* Validation happens in ``__post_init__``; every error names the offending field, so a config
  that does not fit a checkpoint fails before any weight is read.
* The dimension alphabet used across jaxkv: B batch, T query length, S key length, P pivot
  length, D model (``hidden_size``), N query heads, K KV heads, G = N/K, H head dim,
  F FFN (``intermediate_size``), V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxkv.errors import JaxkvError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}
SUPPORTED_ROPE_TYPES = {"default", "llama3", "linear"}


class ConfigError(JaxkvError, ValueError):
    """A configuration value is missing, unsupported or inconsistent (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is "llama3" (LLaMA 3.1+) or "linear"."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES - {"default"}:
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported "
                f"(supported: {sorted(SUPPORTED_ROPE_TYPES - {'default'})})"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-family decoder. Hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    model_type: str = "llama"

    def __post_init__(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported "
                f"(supported: {sorted(SUPPORTED_MODEL_TYPES)})"
            )
        for tok in self.eos_token_ids:
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"eos_token_ids has {tok}, outside the vocabulary of {self.vocab_size}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ConfigError(
                f"bos_token_id={self.bos_token_id} is outside the vocabulary of {self.vocab_size}"
            )

    @property
    def group_size(self) -> int:
        """G = N / K: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def _required(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf:
        raise ConfigError(f"{source}: missing required field {key!r}")
    return hf[key]


def _rope_scaling_from_hf(hf: dict[str, Any], source: str) -> RopeScaling | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope_scaling.rope_type={rope_type!r} is not supported "
            f"(supported: {sorted(SUPPORTED_ROPE_TYPES)})"
        )
    return RopeScaling(
        rope_type=rope_type,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face ``config.json`` dictionary."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: architectures={archs} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not supported "
            f"(supported: {sorted(SUPPORTED_MODEL_TYPES)})"
        )
    num_heads = _required(hf, "num_attention_heads", source)
    hidden = _required(hf, "hidden_size", source)
    head_dim = hf.get("head_dim") or hidden // num_heads
    eos = hf.get("eos_token_id", 2)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    rope_params = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    sliding = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        sliding = None
    return ModelConfig(
        vocab_size=_required(hf, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_required(hf, "intermediate_size", source),
        num_layers=_required(hf, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling_from_hf(hf, source),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        sliding_window=sliding,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        model_type=model_type,
    )


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` from a Hugging Face model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json in this directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_config(hf, source=str(path))


def from_gguf_metadata(meta: dict[str, Any], source: str = "gguf") -> ModelConfig:
    """Build a ModelConfig from GGUF key/value metadata (``general.architecture`` = llama | qwen2)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ConfigError(f"{source}: general.architecture={arch!r} is not supported (llama, qwen2)")

    def get(key, default=dataclasses.MISSING):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required field {full!r}")
        return default

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ConfigError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens present")
        vocab = len(tokens)
    # attention.key_length is the head dimension; rope.dimension_count is only the rotated part of it
    # (equal for every LLaMA/Qwen2 file, but not in general).
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // num_heads)))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    rope_scaling = None
    scaling_type = get("rope.scaling.type", None)
    if scaling_type == "linear":
        rope_scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
    elif scaling_type not in (None, "none"):
        raise ConfigError(
            f"{source}: {arch}.rope.scaling.type={scaling_type!r} is not supported (none, linear)"
        )
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        # Set by the loader once it knows whether an output.weight tensor exists.
        tie_word_embeddings=bool(meta.get("_tied", False)),
        attention_bias=arch == "qwen2",
        max_position_embeddings=int(get("context_length", 4096)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        model_type=arch,
    )


# Architecture shapes of well-known checkpoints, for benchmarks and throughput runs with random
# weights (``jaxkv.params.init_params``); real runs load the config from the checkpoint instead.
SHAPES: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096,
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,),
    ),
}  # fmt: skip


def shape_config(name: str) -> ModelConfig:
    """The :data:`SHAPES` entry ``name``, or an error listing the known shapes."""
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}")
    return SHAPES[name]
