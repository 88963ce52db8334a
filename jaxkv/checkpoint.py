"""Orbax checkpoints of IntactKV prefixes and of calibration state, with JSON metadata.

Layout of a saved prefix directory::

    DIR/arrays/          Orbax PyTree checkpoint of {"k", "v", "logits"}
    DIR/prefix.json      metadata: format, jaxkv version, model fingerprint and config, pivot tokens,
                         the quantization recipe it was calibrated for (None: an exact FP prefix,
                         valid for any quantization of that model), calibration details, and the
                         sha256 of the array bytes (a corrupt or altered checkpoint is detected)

A calibration run's checkpoints live in ``OUT/checkpoints/<step>/`` (Orbax CheckpointManager), each
holding the trainable K/V, the optimiser state and the calibration config they belong to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxkv import __version__, sharding
from jaxkv.errors import CheckpointError
from jaxkv.prefix import Prefix, model_fingerprint

PREFIX_FORMAT = "jaxkv-prefix/1"


def _arrays_sha256(tree: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(tree):
        a = sharding.to_host(tree[name])  # also a global array spread over several hosts
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save_prefix(path: str | Path, prefix: Prefix, model=None, extra: dict | None = None) -> Path:
    """Save ``prefix`` (and, from ``model``, its config and quantization recipe) to directory ``path``."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    arrays = {"k": prefix.k, "v": prefix.v, "logits": prefix.logits}
    if jax.process_count() > 1:
        # Orbax refuses process-local jax.Arrays in a multi-host save (e.g. the logits of make_prefix);
        # numpy values are taken as identical on every process and written once.
        arrays = {
            n: np.asarray(a) if getattr(a, "is_fully_addressable", True) else a for n, a in arrays.items()
        }
    recipe = getattr(model, "recipe", None) if model is not None else None
    meta = {
        "format": PREFIX_FORMAT,
        "jaxkv_version": __version__,
        "fingerprint": prefix.fingerprint,
        "tokens": list(prefix.tokens),
        "shape": list(prefix.k.shape),
        "dtype": str(prefix.k.dtype),
        "model_config": model.cfg.to_dict() if model is not None else None,
        "recipe": _recipe_dict(recipe),
        "sha256": _arrays_sha256(arrays),
        **(extra or {}),
    }
    # Multi-host: process 0 writes the metadata, every process saves its shards; Orbax's save ends with
    # a barrier, so the whole checkpoint exists on return on every process.
    if jax.process_index() == 0:
        (path / "prefix.json").write_text(json.dumps(meta, indent=2, default=str))
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path / "arrays", arrays, force=True)
    return path


def _recipe_dict(recipe) -> dict | None:
    if recipe is None:
        return None
    if dataclasses.is_dataclass(recipe):
        return json.loads(json.dumps(dataclasses.asdict(recipe), default=str))
    return recipe


def read_metadata(path: str | Path, filename: str, fmt: str, what: str) -> dict:
    """The JSON metadata ``path/filename`` of a saved ``what``, checked to be of format ``fmt``."""
    meta_path = Path(path) / filename
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not {what} (no {filename})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: corrupt metadata ({e})") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r} (expected {fmt})")
    return meta


def restore_arrays(path: str | Path, names, sha256: str, what: str) -> dict:
    """The Orbax arrays ``path/arrays`` (exactly ``names``), checked against their recorded ``sha256``."""
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            arrays = ckptr.restore(Path(path) / "arrays")
    except Exception as e:  # tensorstore / orbax raise many types for missing or damaged files
        raise CheckpointError(f"{path}: cannot read the {what} arrays ({type(e).__name__}: {e})") from None
    if set(arrays) != set(names) or _arrays_sha256(arrays) != sha256:
        raise CheckpointError(f"{path}: the {what} arrays do not match their recorded checksum (corrupt?)")
    return arrays


def read_prefix_metadata(path: str | Path) -> dict:
    return read_metadata(path, "prefix.json", PREFIX_FORMAT, "a jaxkv prefix")


def restore_prefix(path: str | Path, model=None) -> Prefix:
    """Load a prefix saved by :func:`save_prefix`; with ``model``, refuse one made for another model or recipe.

    A prefix calibrated for a quantization recipe only fits a model quantized with that recipe; an
    exact (uncalibrated) prefix fits every quantization of the model it was computed from.
    """
    path = Path(path).absolute()
    meta = read_prefix_metadata(path)
    if model is not None:
        fp = model_fingerprint(model)
        if meta["fingerprint"] != fp:
            raise CheckpointError(
                f"{path}: this prefix was made from model {meta['fingerprint']}, not this one ({fp})"
            )
        want = meta.get("recipe")
        have = _recipe_dict(getattr(model, "recipe", None))
        if want is not None and want != have:
            raise CheckpointError(
                f"{path}: this prefix was calibrated for quantization recipe {want}, but the model has {have}"
            )
    arrays = restore_arrays(path, ("k", "v", "logits"), meta["sha256"], "prefix")
    return Prefix(
        k=jnp.asarray(arrays["k"]),
        v=jnp.asarray(arrays["v"]),
        logits=jnp.asarray(arrays["logits"]),
        tokens=tuple(meta["tokens"]),
        fingerprint=meta["fingerprint"],
    )


class CalibCheckpointer:
    """Periodic checkpoints of a calibration run: trainable K/V, optimiser state, step."""

    def __init__(self, directory: str | Path, calib_cfg):
        self.directory = Path(directory).absolute() / "checkpoints"
        self.calib = json.loads(json.dumps(dataclasses.asdict(calib_cfg)))
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2)
        )

    def save(self, step: int, trainable, opt_state) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
                meta=ocp.args.JsonSave({"step": step, "calib": self.calib}),
            ),
        )

    def restore_latest(self, trainable, opt_state):
        """(step, trainable, opt_state) of the latest checkpoint, or None when there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"trainable": trainable, "opt_state": opt_state}
        )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
            )
        except Exception as e:
            raise CheckpointError(
                f"{self.directory}/{step}: cannot restore the calibration checkpoint ({type(e).__name__}: {e})"
            ) from None
        if restored.meta.get("calib") != self.calib:
            raise CheckpointError(
                f"{self.directory}: the checkpoint was written with calibration settings "
                f"{restored.meta.get('calib')}, not {self.calib}; use another output directory"
            )
        state = restored.state
        return step, state["trainable"], state["opt_state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
