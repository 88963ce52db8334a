"""WKVQuant (Yue et al. 2024, arXiv 2402.12065): two-dimensional KV quantization and cross-block
reconstruction regularization, on top of the quantized KV cache of ``jaxkv.kvcache``.

Past-only quantization (the paper's first part) is ``KVQuantConfig.mode = "past-only"``. This module
adds the other two, selected by ``KVQuantConfig(method="wkvquant", k_granularity="per-token")``.

Two-dimensional quantization
----------------------------
Per layer, KV head and channel, keys and values (after RoPE, as cached) are smoothed by a static
scale ``s`` and shift ``δ``, then quantized per token by the min-max quantizer of ``jaxkv.kvcache``
(groups of ``kv.group`` channels, int8 zero point, scale rounded up to ``kv.scale_dtype``) whose
range is clipped by learnable factors::

    x~ = (x - δ) / s                       per channel                     static, full precision
    [lo, hi] = [σ(β) min(x~_g), σ(γ) max(x~_g)]   per token and channel group g      dynamic
    x~^ = min-max quantization of x~_g over [lo, hi] (values outside saturate)
    x^  = x~^ * s + δ

Parameters, a flat dict of float32 arrays (the ``wkv`` argument of ``forward_kv``, ``KVForward``,
``init_cache``, ``generate`` and ``calibrate``): ``k_scale``, ``k_shift``, ``v_scale``, ``v_shift``
``[L, K, H]`` and the clipping logits ``k_clip``, ``v_clip`` ``[L, K, C, 2]`` (``[..., 0] = γ`` for the
maximum, ``[..., 1] = β`` for the minimum): clipping is learned per layer, KV head and channel group
(C = H / group), i.e. one pair of factors for every quantization group position. Logits of +inf give
factors of exactly 1 (no clipping).

* Initialisation (:func:`smoothing_init`), from the statistics of the model that will run (the
  quantized-weight student, full-precision attention) over calibration windows, pivot positions
  excluded (their massive activations would set the ranges; IntactKV keeps them unquantized anyway):
  ``δ = (max + min) / 2`` and ``s = r / gmean(r)`` with ``r = (max - min) / 2`` per channel and the
  geometric mean over the channels of a (layer, head). Every channel then spans about the same range,
  centred on 0, so one token's quantization step is no longer set by a few outlier channels (for
  each channel the step after smoothing is at most what it was before, up to rounding), and the
  channel offsets of keys (why KIVI quantizes keys per channel) are removed. The normalisation by
  the geometric mean keeps the smoothed values near their original magnitude, where one-byte
  scales are accurate; the per-token quantizer itself is invariant to a common factor. No clipping
  (logits +inf).
* Storage: the cache holds the codes of ``x~`` (packed, as for min-max), their per-token scales and
  zeros, and ``s``, ``δ``, clip logits per layer (``QuantSide.wkv``, full precision, not per token).
* Folding (``jaxkv.kvattention.attend_smoothed``): ``q·k^ = (q ⊙ s)·k~^ + q·δ``, and ``q·δ`` is the
  same for every key of a query (pivot and full-precision window keys are smoothed too), so the
  softmax drops it; ``Σ p_j v^_j = (Σ p_j v~^_j) ⊙ s + δ`` since the probabilities sum to 1. The
  cached attention and the cache-free perplexity forward run unchanged on smoothed K/V; no
  dequantized-and-unsmoothed copy is formed. Pivot slots stay full precision (only re-expressed in
  the smoothed basis, exactly up to float rounding).
* With ``s = 1``, ``δ = 0`` and logits +inf every extra operation is exact (``x * 1``, ``x - 0``,
  ``x / 1``, ``min * 1``; the straight-through terms add ``+0.0``): the path equals the plain
  per-token min-max quantizer bit for bit (tested).

Cross-block reconstruction regularization (CRR, :func:`crr_calibrate`)
----------------------------------------------------------------------
Block by block, ``l = 0 .. L-1``, layer ``l``'s ``s``, ``δ``, γ, β (keys and values) are trained with
AdamW (``CRRConfig``: lr, no weight decay, ``epochs`` passes over ``samples`` windows, ``batch_size``
windows a step; ``s`` is trained as ``log s``). The loss is the mean absolute error between

* the student: the quantized model (its weights as given, e.g. W4 RTN; KV read through this
  quantizer, past-only etc. as ``kv`` says, pivot positions full precision) run from block ``l``'s
  input, as produced by the already-calibrated student blocks ``0..l-1``, through blocks
  ``l .. e-1`` with ``e = min(l + k, L)``; blocks ``l+1 .. e-1`` run with their quantized weights and
  their KV quantizers at their current values (the smoothing initialisation, no clipping), frozen;
* the teacher: the full-precision model's output of block ``e - 1`` on the same window (from the
  embeddings, full-precision KV),

over the window's non-pivot positions (``k = 5`` by default, the paper's). Only layer ``l``'s
parameters receive gradients; rounding is straight-through, the clipping factors are sigmoids
(OmniQuant's learnable weight clipping), initialised at ``clip_init`` logits (4.0: factors 0.982,
OmniQuant's) when their block starts training. This is our reading of the paper: it defines the loss
``k`` blocks downstream with MAE; whether its downstream blocks run quantized (as here) or in full
precision is not certain to us.

Checkpoints: after every block, the whole parameter dict and the per-block losses go to an Orbax
checkpoint (``CHECKPOINT_DIR/checkpoints``, ``jaxkv.checkpoint.CalibCheckpointer``) whose metadata
holds the CRR settings, the KV config, the model fingerprint, the weight recipe, the pivot and a
checksum of the initial parameters: ``resume=True`` restarts after the last finished block (the
student's input is recomputed from the saved parameters) and gives the uninterrupted result; other
settings are refused. Finished parameters are saved by :func:`save_wkv` (``DIR/arrays`` +
``DIR/wkvquant.json``, checksummed, refused for another model, weight recipe or KV quantizer by
:func:`restore_wkv`), beside an IntactKV prefix when ``jaxkv calibrate --kv-method wkvquant`` runs both.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxkv import __version__
from jaxkv.checkpoint import (
    CalibCheckpointer,
    CheckpointError,
    _arrays_sha256,
    _recipe_dict,
    read_metadata,
    restore_arrays,
)
from jaxkv.config import ConfigError, ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.kvcache import WKV_NAMES, KVQuantConfig, SideSpec, clip_factors, fake_quantize
from jaxkv.prefix import model_fingerprint

WKV_FORMAT = "jaxkv-wkvquant/1"
SIDES = ("k", "v")


def _check_kv(kv: KVQuantConfig, cfg: ModelConfig) -> None:
    if kv.method != "wkvquant":
        raise ConfigError(f"WKVQuant needs KVQuantConfig(method='wkvquant'), got method {kv.method!r}")
    kv.check(cfg)


def identity_params(cfg: ModelConfig, kv: KVQuantConfig) -> dict:
    """``s = 1``, ``δ = 0``, no clipping: the plain per-token min-max quantizer, bit for bit."""
    _check_kv(kv, cfg)
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    out = {}
    for side in SIDES:
        out[f"{side}_scale"] = jnp.ones((L, K, H), jnp.float32)
        out[f"{side}_shift"] = jnp.zeros((L, K, H), jnp.float32)
        out[f"{side}_clip"] = jnp.full((L, K, H // kv.group, 2), jnp.inf, jnp.float32)
    return out


def fake_quantize_2d(x: jax.Array, side: dict, spec: SideSpec) -> jax.Array:
    """The module docstring's ``x^`` for ``x [..., K, H]`` (float32), with ``side`` one layer's
    ``{"scale", "shift", "clip"}``. The definition, spelled out (tests); the model folds it instead."""
    *lead, K, H = x.shape
    g = spec.group
    xs = (x.astype(jnp.float32) - side["shift"]) / side["scale"]
    clip = tuple(f[..., None] for f in clip_factors(side["clip"]))
    deq = fake_quantize(xs.reshape(*lead, K, H // g, g), spec.bits, -1, spec.scale_dtype, clip)
    return deq.reshape(*lead, K, H) * side["scale"] + side["shift"]


# ----------------------------------------------------------------------------------------------
# Initialisation from calibration statistics


@functools.partial(jax.jit, static_argnames=("cfg", "P"))
def _kv_ranges(params, tokens, pivot_kv, cfg: ModelConfig, P: int):
    """Per layer, KV head and channel: min and max over batch and positions >= P of K (after RoPE)
    and V, full-precision attention (pivot K/V replaced by ``pivot_kv`` when given). [4, L, K, H]."""
    from jaxkv import model

    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = model.causal_mask(positions, positions, cfg)
    inv_freq = model.rope_inv_freq(cfg)

    def body(x, xs):
        lp, pk, pv = xs

        def attend(q, k, v):
            if pk is not None:
                k, v = model._intact(k, v, pk, pv)
            ranges = jnp.stack([f(a[:, P:], axis=(0, 1)) for a in (k, v) for f in (jnp.min, jnp.max)])
            return model._attend(q, k, v, mask, cfg), ranges.astype(jnp.float32)

        return model._layer(x, lp, positions, inv_freq, None, cfg, attend=attend)

    x = jnp.take(params["embed"], tokens, axis=0)
    pk, pv = (None, None) if pivot_kv is None else pivot_kv
    _, ranges = jax.lax.scan(body, x, (params["layers"], pk, pv))
    return jnp.moveaxis(ranges, 1, 0)


def kv_statistics(model, windows, prefix=None, batch_size: int = 4) -> dict[str, np.ndarray]:
    """``{"k_min", "k_max", "v_min", "v_max"}`` ``[L, K, H]`` of ``model`` over ``windows [N, T]``
    (positions of the prefix's pivot tokens excluded; with ``prefix`` its K/V replace theirs)."""
    windows = np.asarray(windows, np.int32)
    P, pivot_kv = _pivot(windows, prefix)
    acc = None
    for start in range(0, len(windows), batch_size):
        r = np.asarray(_kv_ranges(model.params, jnp.asarray(windows[start : start + batch_size]), pivot_kv,
                                  model.cfg, P))  # fmt: skip
        acc = r if acc is None else np.stack([np.minimum(acc[0], r[0]), np.maximum(acc[1], r[1]),
                                              np.minimum(acc[2], r[2]), np.maximum(acc[3], r[3])])  # fmt: skip
    return dict(zip(("k_min", "k_max", "v_min", "v_max"), acc, strict=True))


def smoothing_init(model, kv: KVQuantConfig, windows, prefix=None, batch_size: int = 4) -> dict:
    """Parameters initialised from :func:`kv_statistics` (module docstring): ``δ`` the channel centre,
    ``s`` the channel half-range over its geometric mean in the (layer, head); no clipping."""
    _check_kv(kv, model.cfg)
    stats = kv_statistics(model, windows, prefix, batch_size)
    out = identity_params(model.cfg, kv)
    for side in SIDES:
        mn, mx = stats[f"{side}_min"].astype(np.float64), stats[f"{side}_max"].astype(np.float64)
        r = (mx - mn) / 2
        r = np.maximum(r, 1e-6 * r.max(axis=-1, keepdims=True) + 1e-30)  # constant channels
        gmean = np.exp(np.mean(np.log(r), axis=-1, keepdims=True))
        out[f"{side}_scale"] = jnp.asarray(r / gmean, jnp.float32)
        out[f"{side}_shift"] = jnp.asarray((mx + mn) / 2, jnp.float32)
    return out


def pivot_windows(ids, pivot, n: int, seqlen: int, seed: int) -> np.ndarray:
    """Calibration windows ``[n, seqlen]``: the pivot tokens, then random runs of text from ``ids``
    (:func:`jaxkv.corpus.calibration_windows`)."""
    from jaxkv.corpus import calibration_windows

    text = calibration_windows(ids, n, seqlen - len(pivot), seed, bos_id=None)
    return np.concatenate([np.broadcast_to(np.asarray(pivot, np.int32), (n, len(pivot))), text], axis=1)


def _pivot(windows, prefix):
    """(P, pivot_kv) for windows that start with the prefix's pivot tokens (P = 0 without a prefix)."""
    if prefix is None:
        return 0, None
    from jaxkv.prefix import check_pivot

    check_pivot(windows, prefix)
    return prefix.length, (prefix.k, prefix.v)


# ----------------------------------------------------------------------------------------------
# Cross-block reconstruction regularization


@dataclasses.dataclass(frozen=True)
class CRRConfig:
    """CRR recipe: ``k`` blocks in the loss (the paper's 5), AdamW ``lr`` (no weight decay),
    ``epochs`` passes over ``samples`` windows per block, ``batch_size`` windows per step."""

    samples: int = 128
    epochs: int = 2
    batch_size: int = 1
    lr: float = 5e-3
    k: int = 5
    clip_init: float = 4.0
    seed: int = 0

    def __post_init__(self):
        for name in ("samples", "epochs", "batch_size", "k"):
            if getattr(self, name) < 1:
                raise JaxkvError(f"CRR {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise JaxkvError(f"CRR lr must be > 0, got {self.lr}")

    @property
    def steps_per_block(self) -> int:
        return self.epochs * -(-self.samples // self.batch_size)


@dataclasses.dataclass
class CRRResult:
    params: dict
    initial_losses: list[float]  # per block: loss on the first batch before training (NaN: resumed)
    final_losses: list[float]  # per block: loss on that batch after training
    losses: list[list[float]]  # per block trained in this run: every step's loss
    seconds: float


@dataclasses.dataclass(frozen=True)
class _RunKey:
    """What a CRR checkpoint must match to be resumed."""

    crr: CRRConfig
    kv: KVQuantConfig
    fingerprint: str
    recipe: str
    pivot: tuple[int, ...]
    windows_sha256: str
    init_sha256: str


def _sub_kv(kv: KVQuantConfig, start: int, stop: int) -> KVQuantConfig:
    """``kv`` for layers ``[start, stop)`` run as a model of their own."""
    return dataclasses.replace(
        kv,
        layer_kbits=kv.layer_kbits[start:stop] if kv.layer_kbits else None,
        layer_vbits=kv.layer_vbits[start:stop] if kv.layer_vbits else None,
    )


def _slice(tree, start: int, stop: int):
    return None if tree is None else jax.tree.map(lambda a: a[start:stop], tree)


@functools.partial(jax.jit, static_argnames=("cfg", "kv", "P"))
def _run_blocks(layers, wkv, pivot_kv, x, cfg: ModelConfig, kv: KVQuantConfig, P: int):
    """Blocks ``layers`` (``cfg.num_layers`` of them) from hidden states ``x [B, T, D]`` at positions
    0..T-1, attention reading K/V as ``kv`` (and ``wkv``) quantize them: [B, T, D]."""
    from jaxkv import model

    B, T, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out, _, _ = model._decoder_fake_quant(
        {"layers": layers}, x, positions, cfg, False, kv, P, model.rope_inv_freq(cfg), pivot_kv, wkv
    )
    return out


def _to_params(trainable: dict) -> dict:
    """One layer's parameters from its trainable form (``s`` as ``log s``)."""
    return {n: (jnp.exp(a) if n.endswith("_scale") else a) for n, a in trainable.items()}


def _crr_loss(trainable, layers, wkv, pivot_kv, x, target, cfg, kv, P):
    wkv = {n: a.at[0].set(_to_params(trainable)[n]) for n, a in wkv.items()}
    out = _run_blocks(layers, wkv, pivot_kv, x, cfg, kv, P)
    return jnp.mean(jnp.abs(out[:, P:].astype(jnp.float32) - target[:, P:].astype(jnp.float32)))


@functools.partial(
    jax.jit, static_argnames=("cfg", "kv", "P", "tx"), donate_argnames=("trainable", "opt_state")
)
def _crr_step(trainable, opt_state, layers, wkv, pivot_kv, x, target, cfg, kv, P, tx):
    loss, grads = jax.value_and_grad(_crr_loss)(trainable, layers, wkv, pivot_kv, x, target, cfg, kv, P)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


# Cached: the optimiser is a static argument of the jitted step; one object per lr compiles it once.
@functools.lru_cache(maxsize=8)
def _optimizer(lr: float) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=0.0)


_crr_loss_jit = jax.jit(_crr_loss, static_argnames=("cfg", "kv", "P"))


def _embed(params, windows):
    return np.asarray(jnp.take(params["embed"], jnp.asarray(windows), axis=0))


def _advance(layers, wkv, pivot_kv, xs: np.ndarray, cfg, kv, P, batch_size) -> np.ndarray:
    """Run every row of ``xs [N, T, D]`` through ``layers`` (host arrays in, host arrays out)."""
    out = [
        np.asarray(_run_blocks(layers, wkv, pivot_kv, jnp.asarray(xs[i : i + batch_size]), cfg, kv, P))
        for i in range(0, len(xs), batch_size)
    ]
    return np.concatenate(out)


def crr_calibrate(
    fp_model,
    q_model,
    kv: KVQuantConfig,
    windows,
    init: dict,
    cfg: CRRConfig = CRRConfig(),
    *,
    prefix=None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after_blocks: int | None = None,
) -> CRRResult:
    """Learn ``s``, ``δ``, γ, β of every layer by cross-block reconstruction (module docstring).

    ``windows [N, T]`` start with the pivot tokens (``[BOS]`` + text, as perplexity and
    :func:`jaxkv.corpus.calibration_windows` build them); the first ``cfg.samples`` are used. With
    ``prefix`` (IntactKV), the student's pivot positions hold the prefix's K/V, unquantized, and
    are left out of the loss; without, every position is quantized and scored. ``init``: the
    starting parameters (:func:`smoothing_init`). ``checkpoint_dir``: a checkpoint after every block;
    ``resume`` continues from the last one. ``stop_after_blocks`` ends the run after that many blocks
    in total (to test resumption): the returned parameters then hold later layers' initial values.
    """
    model_cfg = fp_model.cfg
    if q_model.cfg != model_cfg:
        raise JaxkvError("the quantized and full-precision models have different configurations")
    _check_kv(kv, model_cfg)
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[0] < cfg.samples:
        raise JaxkvError(f"CRR needs at least {cfg.samples} windows [N, T], got shape {windows.shape}")
    windows = windows[: cfg.samples]
    P, pivot_kv = _pivot(windows, prefix)
    L, b = model_cfg.num_layers, cfg.batch_size
    params = {n: jnp.asarray(a, jnp.float32) for n, a in init.items()}
    key = _RunKey(
        crr=cfg, kv=kv, fingerprint=model_fingerprint(q_model),
        recipe=json.dumps(_recipe_dict(getattr(q_model, "recipe", None)), sort_keys=True),
        pivot=tuple(prefix.tokens) if prefix is not None else (),
        windows_sha256=_arrays_sha256({"windows": windows}), init_sha256=_arrays_sha256(params),
    )  # fmt: skip
    initial, final = [float("nan")] * L, [float("nan")] * L
    done = 0
    manager = None
    if checkpoint_dir is not None:
        manager = CalibCheckpointer(checkpoint_dir, key)
        if resume:
            restored = manager.restore_latest(params, {"initial": np.zeros(L), "final": np.zeros(L)})
            if restored is not None:
                done, params, losses = restored
                params = {n: jnp.asarray(a) for n, a in params.items()}
                initial, final = list(map(float, losses["initial"])), list(map(float, losses["final"]))
    elif resume:
        raise JaxkvError("resume needs a checkpoint directory")

    kv16 = KVQuantConfig()
    fp_layers, q_layers = fp_model.params["layers"], q_model.params["layers"]

    def one(n):
        return dataclasses.replace(model_cfg, num_layers=n)

    # Student input of block `done` (blocks before it already calibrated), teacher output of block e-1.
    xq = _embed(q_model.params, windows)
    if done:
        xq = _advance(_slice(q_layers, 0, done), _slice(params, 0, done), _slice(pivot_kv, 0, done), xq,
                      one(done), _sub_kv(kv, 0, done), P, b)  # fmt: skip
    e = min(done + cfg.k, L)
    xf = _advance(_slice(fp_layers, 0, e), None, None, _embed(fp_model.params, windows), one(e),
                  kv16, 0, b)  # fmt: skip
    tx = _optimizer(cfg.lr)
    stop = L if stop_after_blocks is None else min(L, stop_after_blocks)
    bar = tqdm(
        total=(stop - done) * cfg.steps_per_block, desc="wkvquant CRR", unit="step", disable=not progress
    )
    step_losses: list[list[float]] = []
    t0 = time.perf_counter()
    try:
        for layer in range(done, stop):
            e = min(layer + cfg.k, L)
            n = e - layer
            sub_cfg, sub_kv = one(n), _sub_kv(kv, layer, e)
            layers, pkv = _slice(q_layers, layer, e), _slice(pivot_kv, layer, e)
            trainable = {name: a[layer] for name, a in params.items()}
            trainable = {
                name: (jnp.log(a) if name.endswith("_scale") else
                       jnp.minimum(a, cfg.clip_init) if name.endswith("_clip") else a)
                for name, a in trainable.items()
            }  # fmt: skip
            opt_state = tx.init(trainable)
            frozen = _slice(params, layer, e)
            first = np.random.default_rng([cfg.seed, layer, 0]).permutation(cfg.samples)[:b]
            fx, ft = jnp.asarray(xq[first]), jnp.asarray(xf[first])
            initial[layer] = float(_crr_loss_jit(trainable, layers, frozen, pkv, fx, ft, sub_cfg, sub_kv, P))
            losses = []
            for epoch in range(cfg.epochs):
                order = np.random.default_rng([cfg.seed, layer, epoch]).permutation(cfg.samples)
                for i in range(0, cfg.samples, b):
                    idx = order[i : i + b]
                    if len(idx) < b:  # last, partial batch: wrap around
                        idx = np.concatenate([idx, order[: b - len(idx)]])
                    trainable, opt_state, loss = _crr_step(
                        trainable, opt_state, layers, frozen, pkv, jnp.asarray(xq[idx]), jnp.asarray(xf[idx]),
                        sub_cfg, sub_kv, P, tx,
                    )  # fmt: skip
                    losses.append(float(loss))
                    bar.update(1)
                    bar.set_postfix(block=layer, loss=f"{losses[-1]:.4g}", refresh=False)
            final[layer] = float(_crr_loss_jit(trainable, layers, frozen, pkv, fx, ft, sub_cfg, sub_kv, P))
            learned = _to_params(trainable)
            params = {name: a.at[layer].set(learned[name]) for name, a in params.items()}
            step_losses.append(losses)
            # Next block's student input: this block with its learned parameters; teacher one block on.
            xq = _advance(_slice(q_layers, layer, layer + 1), _slice(params, layer, layer + 1),
                          _slice(pivot_kv, layer, layer + 1), xq, one(1), _sub_kv(kv, layer, layer + 1), P, b)  # fmt: skip
            if e < L:
                xf = _advance(_slice(fp_layers, e, e + 1), None, None, xf, one(1), kv16, 0, b)
            if manager is not None:
                manager.save(layer + 1, params, {"initial": np.asarray(initial), "final": np.asarray(final)})
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    return CRRResult(params, initial, final, step_losses, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Saved parameters


def _kv_key(kv: KVQuantConfig, num_layers: int) -> dict:
    """The fields learned parameters depend on (mode and residual may differ at use)."""
    return {
        "method": kv.method,
        "layer_bits": [list(b) for b in kv.layer_bits(num_layers)],
        "k_granularity": kv.k_granularity,
        "group": kv.group,
        "scale_dtype": kv.scale_dtype,
    }


def save_wkv(path: str | Path, params: dict, kv: KVQuantConfig, model, extra: dict | None = None) -> Path:
    """Save WKVQuant parameters learned for ``model`` (its config, weight recipe and FP fingerprint)
    and ``kv`` to directory ``path`` (``arrays/`` Orbax + ``wkvquant.json``)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    arrays = {n: np.asarray(a, np.float32) for n, a in params.items()}
    meta = {
        "format": WKV_FORMAT,
        "jaxkv_version": __version__,
        "fingerprint": model_fingerprint(model),
        "model_config": model.cfg.to_dict(),
        "recipe": _recipe_dict(getattr(model, "recipe", None)),
        "kv": kv.to_dict(),
        "kv_label": kv.label(),
        "shapes": {n: list(a.shape) for n, a in arrays.items()},
        "sha256": _arrays_sha256(arrays),
        **(extra or {}),
    }
    if jax.process_index() == 0:
        (path / "wkvquant.json").write_text(json.dumps(meta, indent=2, default=str))
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path / "arrays", arrays, force=True)
    return path


def read_wkv_metadata(path: str | Path) -> dict:
    return read_metadata(path, "wkvquant.json", WKV_FORMAT, "saved WKVQuant parameters")


def restore_wkv(path: str | Path, model=None, kv: KVQuantConfig | None = None) -> dict:
    """Load parameters saved by :func:`save_wkv`. With ``model``, refuse those learned for another model
    or weight recipe; with ``kv``, for another quantizer (method, bits, key granularity, group, scale
    dtype; mode and residual may differ)."""
    path = Path(path).absolute()
    meta = read_wkv_metadata(path)
    if model is not None:
        fp = model_fingerprint(model)
        if meta["fingerprint"] != fp:
            raise CheckpointError(
                f"{path}: these WKVQuant parameters were learned on model {meta['fingerprint']}, not this one ({fp})"
            )
        have = _recipe_dict(getattr(model, "recipe", None))
        if meta.get("recipe") != have:
            raise CheckpointError(
                f"{path}: these WKVQuant parameters were learned for weight recipe {meta.get('recipe')}, "
                f"but the model has {have}"
            )
    if kv is not None:
        saved = KVQuantConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["kv"].items()})
        L = meta["shapes"]["k_scale"][0]
        if _kv_key(saved, L) != _kv_key(kv, L):
            raise CheckpointError(
                f"{path}: these WKVQuant parameters were learned for the KV cache {meta['kv_label']}, "
                f"not {kv.label()} ({_kv_key(saved, L)} vs {_kv_key(kv, L)})"
            )
    arrays = restore_arrays(path, [f"{s}_{n}" for s in SIDES for n in WKV_NAMES], meta["sha256"], "WKVQuant")
    return {n: jnp.asarray(a) for n, a in arrays.items()}
