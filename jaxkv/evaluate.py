"""Perplexity under the IntactKV protocol, fixed here once for all of jaxkv.

Protocol
--------
* The whole text is tokenized without special tokens (:func:`jaxkv.corpus.tokenize`): ids ``[M]``.
* For sequence length ``L``, window ``i`` (0-based) is ``[BOS] + ids[i*(L-1) : (i+1)*(L-1)]``: consecutive,
  non-overlapping runs of ``L-1`` text tokens, each preceded by BOS; an incomplete tail is dropped.
  The first ``N`` windows are used (an error if fewer exist; ``N=None`` means all of them).
* Positions are ``0..L-1``. The loss covers every prediction except the one made right after BOS:
  logits at positions ``1..L-2`` predict targets ``window[2:L]``, so each window scores ``L-2`` tokens,
  ``window[2]`` first and ``window[L-1]`` last. ``ppl = exp(nll_sum / (N * (L-2)))``.
* Why this shape: IntactKV's reference (``eval_utils/ppl.py``) overwrites the first token of each
  ``L``-token slice with BOS and skips the prediction after BOS, because that prediction is about
  the pivot token, not the text. Prepending BOS with stride ``L-1`` keeps the same scored positions
  without discarding a text token per window.

Numerics: the forward runs jitted in fixed-shape batches ``[B, L]`` (the last batch is padded with
copies of its last row, whose results are dropped on the host). The log-softmax runs on device in
float32 (float64 if the logits are float64); per-token NLLs come back to the host and are summed in
float64.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxkv import sharding
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError

# forward_fn(params, tokens [B, T] int32, positions [B, T] int32) -> logits [B, T, V]
ForwardFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PplResult:
    """Perplexity ``ppl = exp(nll_sum / tokens)``; ``seconds`` is wall time including compilation."""

    ppl: float
    nll_sum: float
    tokens: int
    seconds: float


def make_windows(token_ids, bos_id: int, seqlen: int, n: int | None = None) -> np.ndarray:
    """The first ``n`` (all if None) perplexity windows [N, seqlen] (int32) of ``token_ids``.

    Window ``i`` is ``[bos_id] + token_ids[i*(seqlen-1) : (i+1)*(seqlen-1)]``; see the module docstring.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise JaxkvError(f"token_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if not isinstance(seqlen, int) or seqlen < 3:
        # L=2 would leave nothing to score once the prediction after BOS is excluded.
        raise JaxkvError(f"seqlen must be an integer >= 3, got {seqlen!r}")
    if bos_id is None or not 0 <= int(bos_id) <= np.iinfo(np.int32).max:
        raise JaxkvError(f"bos_id must be a non-negative token id, got {bos_id!r}")
    body = seqlen - 1
    available = ids.shape[0] // body
    if n is None:
        n = available
    elif not isinstance(n, int) or n < 1:
        raise JaxkvError(f"n must be a positive integer or None, got {n!r}")
    if available == 0 or n > available:
        raise JaxkvError(
            f"{ids.shape[0]} tokens give {available} windows of {body} text tokens (seqlen {seqlen}), "
            f"{n} requested"
        )
    windows = np.empty((n, seqlen), dtype=np.int32)
    windows[:, 0] = bos_id
    windows[:, 1:] = ids[: n * body].reshape(n, body)
    return windows


@dataclasses.dataclass(frozen=True)
class _ModelForward:
    """The default forward. A value-hashed object, so repeated calls with one cfg reuse one compilation."""

    cfg: ModelConfig

    def __call__(self, params, tokens, positions):
        from jaxkv import model  # deferred: model.py is large and not needed to build windows

        return model.forward(params, tokens, positions, None, self.cfg)[0]


def _token_nll(forward_fn: ForwardFn, params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Per-token NLL [B, L-2] of targets tokens[:, 2:] under logits[:, 1:-1]."""
    logits = forward_fn(params, tokens, positions)
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise JaxkvError(
            f"forward_fn returned logits of shape {logits.shape}; expected {tokens.shape} + (V,)"
        )
    # bf16 logits are upcast; float64 ones (tests under jax_enable_x64) keep their precision.
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    scored = logits[:, 1:-1].astype(dtype)
    targets = tokens[:, 2:]
    target_logit = jnp.take_along_axis(scored, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(scored, axis=-1) - target_logit


def _exp(x: float) -> float:
    # A diverged model must report inf, not raise OverflowError.
    return math.inf if x > 709.0 else math.exp(x)


# forward_fn is static: jax caches one compilation per (forward_fn, shapes), so pass the same
# forward_fn object across calls to avoid recompiling (JAX's cache keeps it alive).
_nll_step = jax.jit(_token_nll, static_argnums=0)


@functools.lru_cache(maxsize=8)
def _nll_step_on(mesh):
    # Replicated per-token NLLs: every process can read them (they are [B, L-2], small).
    return jax.jit(_token_nll, static_argnums=0, out_shardings=sharding.replicated(mesh))


def perplexity(
    params,
    cfg: ModelConfig | None,
    windows,
    batch_size: int = 8,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
    mesh=None,
) -> PplResult:
    """Perplexity of the model over ``windows`` [N, L] (from :func:`make_windows`).

    ``forward_fn(params, tokens [B, L] int32, positions [B, L] int32) -> logits [B, L, V]`` replaces
    the default ``jaxkv.model.forward(params, tokens, positions, None, cfg)[0]`` (e.g. a quantized or
    prefixed forward); ``cfg`` may then be None, otherwise it is used to check token ids against
    the vocabulary.

    With ``mesh`` (a ``jaxkv.sharding`` mesh) each batch of windows is split over the batch axes, every
    process building only its rows; a params dict is placed in its shardings when ``cfg`` is given
    (other params, e.g. a prefixed forward's tuple, must already be placed). Every process returns
    the same result.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
        raise JaxkvError(f"windows must be a 2-D integer array [N, L], got shape {windows.shape}")
    n, seqlen = windows.shape
    if n < 1 or seqlen < 3:
        raise JaxkvError(f"windows must have N >= 1 rows of L >= 3 tokens, got shape {windows.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise JaxkvError(f"batch_size must be a positive integer, got {batch_size!r}")
    if forward_fn is None:
        if cfg is None:
            raise JaxkvError("perplexity needs cfg when no forward_fn is given")
        forward_fn = _ModelForward(cfg)
    try:
        hash(forward_fn)
    except TypeError:
        raise JaxkvError("forward_fn must be hashable (it is a static argument of the jitted step)") from None
    if windows.min() < 0 or (cfg is not None and windows.max() >= cfg.vocab_size):
        raise JaxkvError(
            f"windows hold token ids in [{windows.min()}, {windows.max()}], outside the vocabulary "
            f"[0, {cfg.vocab_size if cfg is not None else '?'})"
        )

    windows = windows.astype(np.int32, copy=False)
    batch = min(batch_size, n)  # one small batch is not padded up to batch_size
    step, place_rows = _nll_step, jnp.asarray
    if mesh is not None:
        if cfg is not None and isinstance(params, dict):
            params = sharding.shard_params(params, cfg, mesh)
        step, place_rows = _nll_step_on(mesh), functools.partial(sharding.global_batch, mesh=mesh)
    positions = place_rows(np.broadcast_to(np.arange(seqlen, dtype=np.int32), (batch, seqlen)))
    progress = progress and jax.process_index() == 0  # multi-host: one bar, from process 0
    starts = range(0, n, batch)
    bar = tqdm(total=n, desc=f"ppl L={seqlen}", unit="win", disable=not progress)
    t0 = time.perf_counter()
    nll_sum, scored = 0.0, 0

    def collect(nll_dev, real: int) -> None:
        nonlocal nll_sum, scored
        nll = np.asarray(nll_dev)[:real].astype(np.float64)  # padding rows dropped here
        nll_sum += float(nll.sum())
        scored += nll.size
        bar.update(real)
        bar.set_postfix(ppl=f"{_exp(nll_sum / scored):.4f}", refresh=False)

    try:
        pending = None
        for start in starts:
            rows = windows[start : start + batch]
            real = rows.shape[0]
            if real < batch:
                rows = np.concatenate([rows, np.repeat(rows[-1:], batch - real, axis=0)])
            with sharding.activate(mesh):
                out = step(forward_fn, params, place_rows(rows), positions)
            # Collect the previous batch only after dispatching this one, so the host-side sum
            # overlaps the device's work on the next batch.
            if pending is not None:
                collect(*pending)
            pending = (out, real)
        collect(*pending)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return PplResult(ppl=_exp(nll_sum / scored), nll_sum=nll_sum, tokens=scored, seconds=seconds)
