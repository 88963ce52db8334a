"""Pivot-token analysis: massive activations, attention sinks, outlier-token detection, and the quantization
error as a function of how many pivot tokens keep their full-precision K/V (IntactKV, arXiv 2403.01241).

Conventions
-----------
* Input: text windows ``[B, T]`` (int32) in the perplexity layout of :func:`jaxkv.evaluate.make_windows`
  (column 0 is BOS), at positions ``0..T-1``. Dimension letters follow ``jaxkv.config``
  (B T S P D N K G H L).
* Hidden states ``xs [L+1, B, T, D]``: ``xs[0]`` is the embedding (the input of block 0), ``xs[l+1]`` the
  output of block ``l``; the input of block ``l`` is ``xs[l]``. This is Hugging Face's
  ``output_hidden_states`` except its last entry, which Hugging Face takes after the final norm.
  Statistics "of layer l" are of block l's output ``xs[l+1]``.
* Attention is recomputed outside the model (:func:`attention`) from each block's input with the model's
  own ``rms_norm``/``dense``/``apply_rope``/``rope_inv_freq``, so ``jaxkv.model`` stays untouched and
  probabilities can be read out. ``probs [B, N, T, S]``: query head ``n`` reads KV head ``n // G`` (Hugging
  Face's ``repeat_kv``); keys are ordered pivot segment first (positions ``0..P-1``), then the queries' own
  tokens.
* Attention share of early position ``p < E`` (E = ``early``, default 8): the probability query tokens put
  on key position ``p``, averaged over heads, windows and the query positions ``E..T-1``. Queries before
  ``E`` are left out because they cannot see every early position (and position 0 would trivially score 1
  for itself), so the E shares of one layer are comparable and sum to at most 1.
* Massive activations (Sun et al. 2024): per token the largest ``|h|`` over channels ("absmax") of a block
  output.
* Pivot detection (as PrefixQuant and KVSink do): ``ratio[l, b, t] = ||xs[l+1, b, t]|| / median_t ||xs[l+1,
  b, t]||`` (median over the window's positions). *Outlier layers* are those where some token's ratio
  exceeds ``threshold``; a token is a pivot when its ratio exceeds ``threshold`` in at least ``min_frac`` of
  the outlier layers. The fraction rule keeps tokens that are large in one early layer only (on SmolLM2,
  " the" reaches 10x the median at block 2 and never again) out, while BOS (35x to 190x over blocks 11 to
  27) is in.
* Error curve: the quantized model runs with its first ``n`` tokens' K/V taken from the full-precision
  model (``jaxkv.prefix.make_prefix`` per window, in the cache's pivot segment, exactly as calibration does)
  and the rest of the window as the body at positions ``n..T-1``. For each block ``l`` the squared
  difference to the full-precision model (attention output after ``wo``, before the residual add; block
  output) is averaged over windows, channels and positions. ``block_mse``/``attn_mse`` average over the
  positions ``N..T-1`` that no ``n <= N`` keeps intact, so every ``n`` is measured on the same tokens;
  ``*_remaining`` average over ``n..T-1`` (everything the quantized model computes itself). The pivot
  positions themselves have zero error by construction.
* Weights: ``jaxkv.quant.quantize(model, recipe)`` when that package exposes it, else RTN from
  ``jaxkv.quant.rtn`` directly (``summary["quantizer"]`` says which); default W3, group 64, asymmetric.
  The error curve runs on the dequantized weights (fake quantization, as the IntactKV paper measures):
  the same model up to float rounding of the matmul order.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model import attention_inputs, decoder, dense, rope_inv_freq

# Added to masked scores, as jaxkv.model does: finite, so a fully masked row gives a uniform softmax.
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    """Settings of one analysis run (the CLI flags)."""

    windows: int = 4
    seqlen: int = 128
    early: int = 8  # E: early positions whose attention share is reported
    max_intact: int = 8  # N: the error curve covers n = 0..N intact pivot tokens
    threshold: float = 16.0  # pivot: norm > threshold x the window's median norm ...
    min_frac: float = 0.5  # ... in at least this fraction of the outlier layers
    top: int = 3  # largest activations listed per layer
    profile: int = 32  # positions shown in the massive-activation heatmap
    bits: int = 3
    group: int = 64

    def __post_init__(self):
        for name in ("windows", "seqlen", "early", "top", "profile", "bits", "group"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise JaxkvError(f"analyze {name} must be a positive integer, got {v!r}")
        if not isinstance(self.max_intact, int) or self.max_intact < 0:
            raise JaxkvError(f"analyze max_intact must be a non-negative integer, got {self.max_intact!r}")
        if self.early >= self.seqlen or self.max_intact >= self.seqlen:
            raise JaxkvError(
                f"early={self.early} and max_intact={self.max_intact} must be below seqlen={self.seqlen}"
            )
        if self.threshold <= 1 or not 0 < self.min_frac <= 1:
            raise JaxkvError("analyze threshold must be > 1 and min_frac in (0, 1]")


# ---- recomputing the model's internals ----------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="cfg")
def hidden_states(params, tokens, positions, cfg: ModelConfig) -> jax.Array:
    """``xs [L+1, B, T, D]``: the embedding, then every block's output (module docstring)."""
    emb = jnp.take(params["embed"], tokens, axis=0)
    _, _, outs = decoder(params, tokens, positions, None, cfg, collect=True)
    return jnp.concatenate([emb[None], outs], axis=0)


def attention(lp, x, positions, cfg: ModelConfig, pivot_k=None, pivot_v=None, pivot_positions=None):
    """One block's attention, recomputed from its input ``x [B, T, D]`` at ``positions [B, T]``.

    ``lp`` holds one layer's parameters (dense or quantized). ``pivot_k``/``pivot_v`` ``[B, P, K, H]`` (after
    RoPE, as a cache stores them) come before ``x``'s tokens, at ``pivot_positions [B, P]`` (default
    ``0..P-1``). A position of -1 is padding, as in ``jaxkv.model``: such a key is never attended and such a
    query attends to nothing useful. Returns ``probs [B, N, T, P+T]`` (float32) and the attention output
    ``[B, T, D]`` (after ``wo``, before the residual add).
    """
    B, T, _ = x.shape
    N, K, H, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.group_size
    q, k, v = attention_inputs(x, lp, positions, rope_inv_freq(cfg), cfg)
    k_pos = positions
    if pivot_k is not None:
        P = pivot_k.shape[1]
        k = jnp.concatenate([pivot_k.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([pivot_v.astype(v.dtype), v], axis=1)
        k_pos = jnp.arange(P, dtype=positions.dtype)
        k_pos = jnp.broadcast_to(k_pos, (B, P)) if pivot_positions is None else pivot_positions
        k_pos = jnp.concatenate([k_pos.astype(positions.dtype), positions], axis=1)
    scores = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q.reshape(B, T, K, G, H), k, preferred_element_type=jnp.float32
    ) * (1.0 / np.sqrt(H))
    qp, kp = positions[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if cfg.sliding_window is not None:
        mask &= kp > qp - cfg.sliding_window
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S]
    ctx = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v).reshape(B, T, N * H)
    return probs.reshape(B, N, T, -1), dense(ctx, lp["wo"])


def attention_probs(params, xs, positions, cfg: ModelConfig) -> jax.Array:
    """Attention probabilities of every block, ``[L, B, N, T, T]``, from hidden states ``xs`` (module
    docstring; ``xs[:L]`` are the blocks' inputs). Holds all of them: for tests and short windows."""

    def body(_, layer):
        lp, x = layer
        return None, attention(lp, x, positions, cfg)[0]

    return jax.lax.scan(body, None, (params["layers"], xs[: cfg.num_layers]))[1]


@functools.partial(jax.jit, static_argnames=("cfg", "early"))
def _attention_stats(params, xs, positions, cfg: ModelConfig, early: int):
    """Per layer: the early-position shares ``[L, N, E]`` and the attention outputs ``[L, B, T, D]``."""

    def body(_, layer):
        lp, x = layer
        probs, out = attention(lp, x, positions, cfg)
        # Queries early..T-1 see every early position (module docstring).
        share = jnp.mean(probs[:, :, early:, :early], axis=(0, 2))
        return None, (share, out)

    return jax.lax.scan(body, None, (params["layers"], xs[: cfg.num_layers]))[1]


def quantized_outputs(q_params, fp_k, fp_v, windows, n, cfg: ModelConfig):
    """Block outputs and attention outputs ``[L, B, T, D]`` (float32) of the model ``q_params`` on ``windows
    [B, T]`` when the K/V of positions ``0..n-1`` are the full-precision ``fp_k``/``fp_v [B, L, M, K, H]``
    (``M >= n``; window ``b``'s own, from :func:`jaxkv.prefix.make_prefix`). Entries at positions ``< n``
    are meaningless (those tokens are not computed).

    ``n`` may be traced, so one compilation serves every ``n``: instead of a pivot segment of ``n`` slots
    (a shape), the FP K/V fill the first ``n`` body slots of an ordinary full-precision cache, and the
    tokens before ``n`` enter as padding (position -1: not written, not attended). Queries then see
    exactly what they see after an ``n``-token pivot segment, which the tests check against
    ``jaxkv.calibrate.block_outputs`` with a real one.
    """
    from jaxkv.kvcache import init_cache

    B, T = windows.shape
    M = fp_k.shape[2]
    dtype = q_params["embed"].dtype
    j = jnp.arange(T, dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.where(j < n, -1, j), (B, T))
    keep = (jnp.arange(M) < n)[None, None, :, None, None]
    fk = jnp.moveaxis(jnp.where(keep, fp_k, 0), 0, 1).astype(dtype)  # [L, B, M, K, H]
    fv = jnp.moveaxis(jnp.where(keep, fp_v, 0), 0, 1).astype(dtype)
    cache = init_cache(cfg, B, T, dtype)
    cache = cache.replace(
        k=cache.k.at[:, :, :M].set(fk),
        v=cache.v.at[:, :, :M].set(fv),
        lengths=jnp.full((B,), n, jnp.int32),
    )
    _, _, outs = decoder(q_params, windows, positions, cache, cfg, collect=True)
    emb = jnp.take(q_params["embed"], windows, axis=0)
    inputs = jnp.concatenate([emb[None], outs[:-1].astype(emb.dtype)], axis=0)
    pivot_pos = jnp.broadcast_to(jnp.where(jnp.arange(M) < n, jnp.arange(M), -1), (B, M))

    def layer(_, xs):
        lp, x, pk, pv = xs
        return None, attention(lp, x, positions, cfg, pk, pv, pivot_pos)[1]

    attn = jax.lax.scan(layer, None, (q_params["layers"], inputs, fk, fv))[1]
    return outs.astype(jnp.float32), attn.astype(jnp.float32)


_quantized_outputs = jax.jit(quantized_outputs, static_argnames="cfg")


@jax.jit
def _squared_errors(outs, attn, ref_xs, ref_attn):
    """``[L, B, T]`` squared errors (mean over channels) of block and attention outputs."""
    return jnp.mean(jnp.square(outs - ref_xs), axis=-1), jnp.mean(jnp.square(attn - ref_attn), axis=-1)


# ---- quantization -------------------------------------------------------------------------------------


def quantize_params(model, bits: int = 3, group: int = 64):
    """``(quantized params, source)``: RTN weights through ``jaxkv.quant.quantize`` when it exists, else
    through ``jaxkv.quant.rtn`` directly; ``source`` names the path taken."""
    from jaxkv.quant.recipe import QuantRecipe

    recipe = QuantRecipe(bits=bits, group=group, method="rtn")
    try:
        from jaxkv.quant import quantize
    except ImportError:
        quantize = None
    if quantize is not None:
        q = quantize(model, recipe)
        return getattr(q, "params", q), "jaxkv.quant.quantize"
    from jaxkv.quant.recipe import select, set_paths
    from jaxkv.quant.rtn import rtn_quantize_params

    selected = select(model.params, recipe)
    return set_paths(model.params, rtn_quantize_params(model.params, selected, recipe)), "jaxkv.quant.rtn"


# ---- statistics ---------------------------------------------------------------------------------------


def _decode(tokenizer, tok: int) -> str:
    return tokenizer.decode([int(tok)]) if tokenizer is not None else str(int(tok))


def massive_activations(xs: np.ndarray, windows: np.ndarray, tokenizer=None, top: int = 3, profile: int = 32):
    """Per block output: the absmax at position 0, the largest elsewhere, the median, and the ``top``
    largest tokens (with window, position, token and channel); plus ``profile [L, min(T, profile)]``, the
    absmax by position averaged over windows. ``xs`` are hidden states ``[L+1, B, T, D]``."""
    outs = np.abs(np.asarray(xs[1:], np.float32))  # [L, B, T, D]
    absmax, channel = outs.max(-1), outs.argmax(-1)  # [L, B, T]
    L, B, T = absmax.shape
    layers = []
    for layer in range(L):
        a = absmax[layer]
        order = np.argsort(-a, axis=None)[:top]
        rest = np.unravel_index(np.argmax(a[:, 1:]), (B, T - 1))
        layers.append(
            {
                "layer": layer,
                "pos0_absmax": float(a[:, 0].mean()),
                "pos0_channel": int(np.bincount(channel[layer, :, 0]).argmax()),
                "other_absmax": float(a[:, 1:].max()),
                "other_at": _token_ref(windows, tokenizer, rest[0], rest[1] + 1),
                "median_absmax": float(np.median(a)),
                "top": [
                    {"value": float(a.flat[i]), "channel": int(channel[layer].flat[i])}
                    | _token_ref(windows, tokenizer, *np.unravel_index(i, (B, T)))
                    for i in order
                ],
            }
        )
    peak = max(layers, key=lambda r: r["pos0_absmax"])
    return {
        "per_layer": layers,
        "peak_layer": peak["layer"],
        "peak_pos0_absmax": peak["pos0_absmax"],
        "peak_ratio_to_median": peak["pos0_absmax"] / peak["median_absmax"],
        "profile": absmax[:, :, :profile].mean(1).tolist(),
    }


def _token_ref(windows, tokenizer, b, t) -> dict:
    tok = int(windows[b, t])
    return {"window": int(b), "position": int(t), "token_id": tok, "token": _decode(tokenizer, tok)}


def norm_ratios(xs) -> np.ndarray:
    """``[L, B, T]``: each token's hidden-state norm over its window's median norm, per block output."""
    norms = np.linalg.norm(np.asarray(xs[1:], np.float32), axis=-1)
    return norms / np.median(norms, axis=-1, keepdims=True)


def detect_pivots(ratios, threshold: float = 16.0, min_frac: float = 0.5) -> dict:
    """Pivot tokens from norm ratios ``[L, B, T]`` (module docstring's rule).

    Returns ``outlier_layers`` (list of layer indices), ``pivots`` (a list of ``(window, position,
    layers_over, max_ratio)``, by window then position), ``counts [L]`` (tokens over the threshold per
    layer) and ``runners_up`` (the five non-pivot tokens of largest ratio, in the same form).
    """
    ratios = np.asarray(ratios)
    over = ratios > threshold  # [L, B, T]
    outlier_layers = np.flatnonzero(over.any(axis=(1, 2)))
    pivots = []
    hits = np.zeros(ratios.shape[1:], np.int64)
    if outlier_layers.size:
        hits = over[outlier_layers].sum(0)  # [B, T]
        need = max(1, int(np.ceil(min_frac * outlier_layers.size)))
        for b, t in zip(*np.nonzero(hits >= need)):
            pivots.append((int(b), int(t), int(hits[b, t]), float(ratios[:, b, t].max())))
    # The strongest tokens that are not pivots, to judge how clear-cut the threshold is.
    peak = ratios.max(0)
    taken = {(b, t) for b, t, *_ in pivots}
    order = [divmod(int(i), ratios.shape[2]) for i in np.argsort(-peak, axis=None)]
    runners = [(b, t, int(hits[b, t]), float(peak[b, t])) for b, t in order if (b, t) not in taken][:5]
    return {
        "outlier_layers": outlier_layers.tolist(),
        "pivots": pivots,
        "counts": over.sum((1, 2)).tolist(),
        "runners_up": runners,
    }


@dataclasses.dataclass(frozen=True)
class ErrorCurve:
    """Per-layer quantization error against the number ``n`` of intact pivot tokens (module docstring).

    Arrays are ``[N+1, L]``; row ``n`` is with the first ``n`` tokens' K/V from the full-precision model.
    """

    n: list[int]
    block_mse: np.ndarray  # positions N..T-1 (the same for every n)
    attn_mse: np.ndarray
    block_mse_remaining: np.ndarray  # positions n..T-1
    attn_mse_remaining: np.ndarray

    def to_dict(self) -> dict:
        mean = self.block_mse.mean(1)
        return {
            "n": self.n,
            "block_mse": self.block_mse.tolist(),
            "attn_mse": self.attn_mse.tolist(),
            "block_mse_remaining": self.block_mse_remaining.tolist(),
            "attn_mse_remaining": self.attn_mse_remaining.tolist(),
            "block_mse_mean": self.block_mse.mean(1).tolist(),
            "attn_mse_mean": self.attn_mse.mean(1).tolist(),
            "block_mse_last": self.block_mse[:, -1].tolist(),
            # Largest rise of the layer-mean block MSE from one n to the next, relative (<= 0: monotone).
            "max_relative_increase": float(np.max(np.diff(mean) / mean[:-1])) if len(mean) > 1 else 0.0,
            "monotone": bool(np.all(np.diff(mean) <= 0)),
        }


def error_curve(fp_model, q_params, windows, max_intact: int, fp=None, progress: bool = True) -> ErrorCurve:
    """The quantization error of ``q_params`` per layer for ``n = 0..max_intact`` intact pivot tokens.

    ``fp_model`` (``cfg``, ``params``, optionally ``tokenizer``/``fingerprint``) is the full-precision
    model; ``windows [B, T]``; ``fp`` may pass its ``(xs, attention outputs)`` when already computed.
    """
    from jaxkv.prefix import make_prefix

    cfg = fp_model.cfg
    windows = np.asarray(windows, np.int32)
    B, T = windows.shape
    N = max_intact
    if not 0 <= N < T:
        raise JaxkvError(f"max_intact={N} must be in [0, {T}) for windows of {T} tokens")
    if fp is None:
        fp = _fp_pass(fp_model, windows, early=1)[:2]
    xs, attn = fp
    # Dense copies of the quantized weights: the same model up to float rounding, unpacked once rather than
    # in every run, and one compilation for dense and quantized models alike.
    from jaxkv.quant.qarray import dequantize, is_qarray

    q_params = jax.tree.map(lambda a: dequantize(a) if is_qarray(a) else a, q_params, is_leaf=is_qarray)
    if N:
        # The model is causal, so the first n of a window's N-token prefix are its n-token prefix.
        prefixes = [make_prefix(fp_model, windows[b, :N].tolist()) for b in range(B)]
        fp_k, fp_v = jnp.stack([p.k for p in prefixes]), jnp.stack([p.v for p in prefixes])
    else:
        shape = (B, cfg.num_layers, 0, cfg.num_kv_heads, cfg.head_dim)
        fp_k = fp_v = jnp.zeros(shape, fp_model.params["embed"].dtype)
    rows = {k: [] for k in ("block", "attn", "block_rem", "attn_rem")}
    w = jnp.asarray(windows)
    for n in tqdm(range(N + 1), desc="error vs intact pivots", unit="n", disable=not progress):
        outs, q_attn = _quantized_outputs(q_params, fp_k, fp_v, w, n, cfg)
        block_err, attn_err = _squared_errors(outs, q_attn, xs[1:], attn)
        block_err, attn_err = np.asarray(block_err, np.float64), np.asarray(attn_err, np.float64)
        rows["block"].append(block_err[:, :, N:].mean((1, 2)))
        rows["attn"].append(attn_err[:, :, N:].mean((1, 2)))
        rows["block_rem"].append(block_err[:, :, n:].mean((1, 2)))
        rows["attn_rem"].append(attn_err[:, :, n:].mean((1, 2)))
    r = {k: np.stack(v) for k, v in rows.items()}
    return ErrorCurve(list(range(N + 1)), r["block"], r["attn"], r["block_rem"], r["attn_rem"])


def _fp_pass(model, windows, early: int):
    """``(xs, attention outputs [L, B, T, D], shares [L, N, E])`` of the full-precision model."""
    B, T = windows.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    xs = hidden_states(model.params, jnp.asarray(windows), positions, model.cfg)
    share, attn = _attention_stats(model.params, xs, positions, model.cfg, early)
    return xs.astype(jnp.float32), attn.astype(jnp.float32), np.asarray(share, np.float64)


# ---- the whole analysis -------------------------------------------------------------------------------


def analyze(model, windows, settings: AnalyzeConfig = AnalyzeConfig(), q_params=None, progress: bool = True):
    """Run every analysis of the module docstring on ``windows [B, T]``; returns the summary dict.

    ``model`` is the full-precision model (``cfg``, ``params``, ``tokenizer``, ...); ``q_params`` the
    quantized weights to measure (default: RTN with ``settings.bits``/``settings.group``).
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] <= max(settings.early, settings.max_intact):
        raise JaxkvError(f"windows must be [B, T] with T > early and max_intact, got shape {windows.shape}")
    tok = getattr(model, "tokenizer", None)
    t0 = time.perf_counter()
    with tqdm(total=3, desc="analyze", unit="stage", disable=not progress) as bar:
        bar.set_postfix_str("full-precision pass")
        xs, attn, share = _fp_pass(model, windows, settings.early)
        xs_np = np.asarray(xs)
        bar.update()
        bar.set_postfix_str("statistics")
        massive = massive_activations(xs_np, windows, tok, settings.top, settings.profile)
        detected = detect_pivots(norm_ratios(xs_np), settings.threshold, settings.min_frac)
        bar.update()
        bar.set_postfix_str("quantizing")
        if q_params is None:
            q_params, quantizer = quantize_params(model, settings.bits, settings.group)
        else:
            quantizer = "given"
        bar.update()
    curve = error_curve(model, q_params, windows, settings.max_intact, fp=(xs, attn), progress=progress)
    pivots = [
        _token_ref(windows, tok, b, t) | {"layers_over": k, "max_ratio": r}
        for b, t, k, r in detected["pivots"]
    ]
    by_token: dict[str, int] = {}
    by_position: dict[str, int] = {}
    for p in pivots:
        by_token[p["token"]] = by_token.get(p["token"], 0) + 1
        by_position[str(p["position"])] = by_position.get(str(p["position"]), 0) + 1
    per_layer_share = share.mean(1)  # [L, E]
    return {
        "model": getattr(model, "name", None),
        "fingerprint": getattr(model, "fingerprint", None),
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "settings": dataclasses.asdict(settings),
        "quantizer": quantizer,
        "recipe": f"W{settings.bits} g{settings.group} rtn",
        "massive": massive,
        "attention_share": {
            "early": settings.early,
            "query_positions": [settings.early, int(windows.shape[1]) - 1],
            "per_layer": per_layer_share.tolist(),
            "mean_over_layers": per_layer_share.mean(0).tolist(),
            "pos0_per_head": share[:, :, 0].tolist(),
        },
        "pivots": {
            "threshold": settings.threshold,
            "min_frac": settings.min_frac,
            "outlier_layers": detected["outlier_layers"],
            "tokens_over_threshold_per_layer": detected["counts"],
            "tokens": pivots,
            "by_token": by_token,
            "by_position": by_position,
            "non_initial": [p for p in pivots if p["position"] != 0],
            "runners_up": [
                _token_ref(windows, tok, b, t) | {"layers_over": k, "max_ratio": r}
                for b, t, k, r in detected["runners_up"]
            ],
        },
        "error": curve.to_dict(),
        "seconds": time.perf_counter() - t0,
    }


# ---- plots --------------------------------------------------------------------------------------------


def plot_summary(summary: dict, out_dir: str | Path) -> list[Path]:
    """Write the PNG plots of ``summary`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    out = Path(out_dir)
    paths = []
    title = summary.get("model") or "model"

    m = summary["massive"]
    layers = np.arange(len(m["per_layer"]))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
    prof = np.maximum(np.asarray(m["profile"]), 1e-3)
    im = ax0.imshow(prof, aspect="auto", norm=LogNorm(), cmap="magma", origin="lower")
    fig.colorbar(im, ax=ax0, label="max |h| over channels (mean over windows)")
    ax0.set(xlabel="position", ylabel="layer (block output)", title="Largest activation by position")
    width = 0.28
    for i, (key, label) in enumerate(
        [("pos0_absmax", "position 0"), ("other_absmax", "largest other token"), ("median_absmax", "median")]
    ):
        ax1.bar(layers + (i - 1) * width, [r[key] for r in m["per_layer"]], width, label=label)
    ax1.set(yscale="log", xlabel="layer", ylabel="max |h|", title="Massive activations per layer")
    ax1.legend()
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out / "massive_activations.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    a = summary["attention_share"]
    share = np.asarray(a["per_layer"])  # [L, E]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bottom = np.zeros(share.shape[0])
    colors = plt.cm.viridis(np.linspace(0, 0.9, share.shape[1]))
    for p in range(share.shape[1]):
        ax.bar(np.arange(share.shape[0]), share[:, p], bottom=bottom, color=colors[p], label=f"pos {p}")
        bottom += share[:, p]
    ax.bar(np.arange(share.shape[0]), 1 - bottom, bottom=bottom, color="lightgrey", label="rest")
    q0, q1 = a["query_positions"]
    ax.set(
        xlabel="layer",
        ylabel="attention share",
        ylim=(0, 1),
        title=f"{title}: attention on early positions (mean over heads, queries {q0}..{q1})",
    )
    ax.legend(ncol=5, fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(out / "attention_share.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    e = summary["error"]
    block, attn = np.asarray(e["block_mse"]), np.asarray(e["attn_mse"])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax0.plot(e["n"], block.mean(1), "o-", label="block output (mean over layers)")
    ax0.plot(e["n"], attn.mean(1), "s-", label="attention output (mean over layers)")
    ax0.plot(e["n"], block[:, -1], "^--", label="last block output")
    ax0.set(
        yscale="log",
        xlabel="intact pivot tokens n",
        ylabel="MSE vs full precision",
        title=f"{summary.get('recipe', '')} error vs intact pivots (positions {e['n'][-1]}..)",
    )
    ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8)  # below: no overlap
    # Per layer the MSE spans orders of magnitude but moves by percents with n: show the relative change.
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(e["n"])))
    base = np.maximum(block[0], 1e-30)
    for i, n in enumerate(e["n"][1:], start=1):
        ax1.plot(np.arange(block.shape[1]), 100 * (block[i] / base - 1), color=colors[i], label=f"n={n}")
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(xlabel="layer", ylabel="block output MSE change vs n=0 (%)", title="Per layer")
    ax1.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    paths.append(out / "error_vs_intact.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    pv = summary["pivots"]
    counts = pv["tokens_over_threshold_per_layer"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.bar(np.arange(len(counts)), counts)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(
        xlabel="layer",
        ylabel="tokens",
        title=f"Tokens with norm > {pv['threshold']:g} x median; pivots: "
        + ", ".join(f"{k!r} x{v}" for k, v in pv["by_token"].items()),
    )
    fig.tight_layout()
    paths.append(out / "pivot_counts.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---- command line -------------------------------------------------------------------------------------


def load_windows(model, source: str, seqlen: int, n: int | None) -> np.ndarray:
    """Perplexity-layout windows ``[n, seqlen]`` of the text ``source`` (BOS first)."""
    from jaxkv.corpus import load_text, tokenize
    from jaxkv.evaluate import make_windows

    if model.tokenizer is None:
        raise JaxkvError(f"{model.name}: the model has no tokenizer, so text data cannot be tokenized")
    if model.cfg.bos_token_id is None:
        raise JaxkvError(f"{model.name}: the model has no BOS token; the windows need one")
    text = load_text(source)
    if n is not None:
        # Tokenizing a long corpus takes seconds; a generous head of it gives the same first tokens
        # (only the tokens at the cut can differ, and they lie far beyond the windows).
        head = text[: 16 * n * seqlen]
        ids = tokenize(model.tokenizer, head)
        if ids.shape[0] >= n * (seqlen - 1) + 64 or len(head) == len(text):
            return make_windows(ids, model.cfg.bos_token_id, seqlen, n)
    return make_windows(tokenize(model.tokenizer, text), model.cfg.bos_token_id, seqlen, n)


def add_analyze_parser(sub) -> argparse.ArgumentParser:
    """Add the ``analyze`` command to the ``jaxkv`` subparsers ``sub``."""
    d = AnalyzeConfig()
    p = sub.add_parser(
        "analyze",
        help="pivot-token analysis: massive activations, attention sinks, error vs intact pivots",
        description=__doc__.split("\n")[0],
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="a preset name (smollm2-135m), a .gguf file, a local Hugging Face directory, or a hub id",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--data", default="sotu-eval", help="sotu-eval, sotu-calib, a text file, wikitext2 or c4")
    p.add_argument("--out", required=True, help="output directory (summary.json and PNG plots)")
    p.add_argument("--windows", type=int, default=d.windows, help="number of windows (0 = all)")
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument(
        "--early", type=int, default=d.early, help="early positions whose attention share is shown"
    )
    p.add_argument("--max-intact", type=int, default=d.max_intact, help="error curve for n = 0..this")
    p.add_argument("--threshold", type=float, default=d.threshold, help="pivot: norm > this x median norm")
    p.add_argument(
        "--min-frac", type=float, default=d.min_frac, help="... in this fraction of outlier layers"
    )
    p.add_argument("--bits", type=int, default=d.bits, help="RTN weight bits (default 3)")
    p.add_argument("--group", type=int, default=d.group, help="RTN group size (default 64)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)
    return p


def cmd_analyze(args) -> int:
    """``jaxkv analyze``: writes ``summary.json`` and the plots into ``--out``."""
    import sys

    from jaxkv.load import load

    windows = args.windows or None
    settings = AnalyzeConfig(
        windows=windows or 1,
        seqlen=args.seqlen,
        early=args.early,
        max_intact=args.max_intact,
        threshold=args.threshold,
        min_frac=args.min_frac,
        bits=args.bits,
        group=args.group,
    )
    model = load(args.model, dtype=getattr(jnp, args.dtype))
    data = load_windows(model, args.data, args.seqlen, windows)
    summary = analyze(model, data, settings, progress=not args.no_progress)
    summary["data"] = args.data
    summary["settings"]["windows"] = int(data.shape[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = plot_summary(summary, out)
    if args.json:
        print(json.dumps(summary))
    else:
        print(_report(summary), file=sys.stdout)
        print(f"wrote {out / 'summary.json'} and {', '.join(p.name for p in plots)}")
    return 0


def _report(s: dict) -> str:
    m, a, e, pv = s["massive"], s["attention_share"], s["error"], s["pivots"]
    peak = m["per_layer"][m["peak_layer"]]
    share0 = np.asarray(a["per_layer"])[:, 0]
    lines = [
        f"massive activation: position 0 reaches {m['peak_pos0_absmax']:.0f} at layer {m['peak_layer']} "
        f"(channel {peak['pos0_channel']}; largest other token {peak['other_absmax']:.1f}, "
        f"median {peak['median_absmax']:.1f})",
        f"attention on position 0: mean {share0.mean():.3f} over layers, max {share0.max():.3f} "
        f"(layer {int(share0.argmax())}); positions 0..{a['early'] - 1} together "
        f"{np.asarray(a['per_layer']).sum(1).mean():.3f}",
        f"pivots (norm > {pv['threshold']:g}x median in >= {pv['min_frac']:g} of outlier layers "
        f"{pv['outlier_layers']}): "
        + ", ".join(f"{k!r} x{v}" for k, v in pv["by_token"].items())
        + "; strongest others: "
        + ", ".join(f"{r['token']!r}@{r['position']} {r['max_ratio']:.1f}x" for r in pv["runners_up"][:3]),
        f"{s['recipe']} block-output MSE (mean over layers) for n = {e['n']} intact pivots: "
        + " ".join(f"{v:.4g}" for v in e["block_mse_mean"]),
    ]
    return "\n".join(lines)
