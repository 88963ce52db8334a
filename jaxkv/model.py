"""The LLaMA-family decoder as pure functions: ``forward(params, tokens, positions, cache, cfg)``.

Conventions
-----------
* ``params`` follows ``jaxkv.params`` (stacked layers, matrices stored (in, out)); the layer loop is
  a ``jax.lax.scan``, so compile time does not grow with depth.
* ``tokens`` and ``positions`` are ``[B, T]`` int32. A position of -1 marks padding: the token is not
  written to the cache, attends to nothing useful, and no real token attends to it.
* Without a cache (``cache=None``) the T tokens attend causally among themselves (by position).
  With a :class:`~jaxkv.kvcache.KVCache`, the new K/V are first written to body slot
  ``position - P``, then every query attends over the pivot segment and the filled body slots.
* Compute runs in the parameters' dtype; RMSNorm statistics and the softmax run in float32 and
  logits are returned in float32, as Hugging Face does.
* On a GPU at batch-1 decode with fused projections on the int4 kernel (:func:`_on_epilogues`) each
  matmul's split-K partial sums are added together with what follows them, in a launch after the
  matmul's (``jaxkv.kernels.epilogue``); over :func:`decode_layout`'s per-layer loop a
  block's last epilogue also computes the next norm's inputs, and the loop carries the stream as
  ``(x, gx, sumsq)``.
* Einsum letters follow the dimension alphabet of ``jaxkv.config`` (B T S P D N K G H F V L).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ConfigError, ModelConfig
from jaxkv.kvattention import (
    attend_cached,
    attend_fake_quant,
    attend_smoothed,
    causal_mask,
    decode_full_precision,
    decode_impl,
    full_precision_kernel_applies,
)
from jaxkv.kvcache import KVCache, KVQuantConfig, check_wkv, plan_segments, wkv_side
from jaxkv.sharding import constrain

# Added to masked scores; finite so that a fully-masked (padding) row gives a uniform softmax, not NaN.
_MASKED = -1e30


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis (statistics in float32, as Hugging Face). XLA's two launches per
    norm stay: a one-launch Pallas kernel for decode's few rows made no measurable difference to an
    H100 decode step (run 61, README issue 7) and was removed."""
    normed = x.astype(jnp.float32) * _inv_rms(x, eps)[..., None]
    return weight * normed.astype(x.dtype)


def _inv_rms(x: jax.Array, eps: float) -> jax.Array:
    """``1 / sqrt(mean(x^2) + eps)`` over the last axis, in float32 (``x.shape[:-1]``)."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + eps)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [H/2] (float32), with llama3 or linear scaling applied."""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    if rs.rope_type == "linear":
        return (inv_freq / rs.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between
    # (transformers' _compute_llama3_parameters).
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout). x [B, T, heads, H], positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def dense(x: jax.Array, w) -> jax.Array:
    """x [..., in] @ w [in, out]; ``w`` may be a packed :class:`~jaxkv.quant.qarray.QArray`."""
    # Imported here: jaxkv.quant imports this module (calibration runs the model's blocks).
    from jaxkv.quant import qarray

    return qarray.einsum("...i,io->...o", x, w)


def norm_dense(x: jax.Array, norm_weight: jax.Array, eps: float, weights: list) -> list[jax.Array]:
    """``dense(rms_norm(x, norm_weight, eps), w)`` for each ``w`` of ``weights``.

    Where every product runs on the GPU's quantized decode kernel (``jaxkv.quant.qarray.kernel_applies``)
    the norm's ``1/rms`` moves past the matmul: the kernels read ``norm_weight * x`` and each output row
    is multiplied by ``1/rms`` in float32 in the launch that already adds the kernel's split-K partial
    sums (``qmatmul``'s ``row_scale``). XLA then computes ``norm_weight * x`` beside the sum of squares,
    and the norm's separate scaling launch (about 1.4 us a norm at batch 1 on an H100) goes: the
    Llama-2-7B int4 step went from 2.386 to 2.341 ms/token (run 70, README issue 7).
    The roundings differ from :func:`rms_norm`'s (``norm_weight * x`` rounded to ``x.dtype`` instead of
    ``x * (1/rms)``), equal in size. Everywhere else, :func:`rms_norm` then :func:`dense`.
    """
    from jaxkv.quant.qarray import kernel_applies, matmul

    if not all(kernel_applies(x, w) for w in weights):
        h = rms_norm(x, norm_weight, eps)
        return [dense(h, w) for w in weights]
    gx = norm_weight * x
    return [matmul(gx, w, row_scale=_inv_rms(x, eps)) for w in weights]


def _attend(q, keys, values, mask, cfg: ModelConfig, pivot=None) -> jax.Array:
    """Grouped-query attention. q [B,T,N,H]; keys/values [B,S,K,H]; mask [B,T,P+S] -> [B,T,N*H].

    ``pivot``: the pivot segment's keys and values ``[P, K, H]`` (shared by the batch, in the dtype of
    ``values``), attended before ``keys``/``values`` in one softmax. They are kept apart rather than
    concatenated with the body: a concatenation would copy the layer's whole cache at every decode step.
    """
    B, T, N, H = q.shape
    K, G = cfg.num_kv_heads, cfg.group_size
    qg = q.reshape(B, T, K, G, H)
    scores = jnp.einsum("BTKGH,BSKH->BTKGS", qg, keys, preferred_element_type=jnp.float32)
    if pivot is not None:
        pivot_scores = jnp.einsum("BTKGH,PKH->BTKGP", qg, pivot[0], preferred_element_type=jnp.float32)
        scores = jnp.concatenate([pivot_scores, scores], axis=-1)
    scores = scores * (1.0 / np.sqrt(H))
    scores = jnp.where(mask[:, :, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    if pivot is None:
        return jnp.einsum("BTKGS,BSKH->BTKGH", probs, values).reshape(B, T, N * H)
    P = pivot[0].shape[0]
    f32 = jnp.float32
    out = jnp.einsum("BTKGS,BSKH->BTKGH", probs[..., P:], values, preferred_element_type=f32)
    out += jnp.einsum("BTKGP,PKH->BTKGH", probs[..., :P], pivot[1], preferred_element_type=f32)
    return out.astype(values.dtype).reshape(B, T, N * H)


def _on_epilogues(x, lp, cfg: ModelConfig) -> bool:
    """Whether the block runs on the GPU's one-row int4 kernel with each matmul's split sum and what
    follows it done together (``jaxkv.kernels.epilogue``): Q/K/V and gate/up fused at load time
    (:func:`fuse_projections`), one row, shapes the epilogues take, and every product on that
    kernel (``qarray.partials_apply``)."""
    from jaxkv.kernels import epilogue
    from jaxkv.quant.qarray import partials_apply

    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return (
        "wqkv" in lp
        and "w_gate_up" in lp
        and epilogue.applies(int(np.prod(x.shape[:-1])), D, F, H)
        and all(partials_apply(x, lp[name]) for name in ("wqkv", "wo", "w_gate_up", "w_down"))
    )


def _epilogue_heads(x, lp, positions, inv_freq, cfg: ModelConfig, normed=None):
    """On the epilogues' path (:func:`_on_epilogues`): the block's query, key and value heads
    ``[B*T, N+2K, H]`` (RoPE applied) from the fused Q/K/V matmul and its epilogue (the split sum,
    the norm's 1/rms, the biases, RoPE). ``normed``: ``(attn_norm * x, partial sums of
    squares [n, B*T])`` when the previous block's last launch computed them."""
    from jaxkv.kernels import epilogue

    B, T, D = x.shape
    if normed is None:
        x32 = x.astype(jnp.float32).reshape(B * T, D)
        normed = (lp["attn_norm"] * x, jnp.sum(x32 * x32, axis=-1)[None])  # sumsq [1, B*T]
    gx, sumsq = normed
    biases = (lp["bq"], lp["bk"], lp["bv"]) if cfg.attention_bias else None
    return epilogue.qkv_rope(
        gx.reshape(B * T, D), lp["wqkv"], sumsq, positions.reshape(()).astype(jnp.int32), jnp.asarray(inv_freq),
        biases, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        eps=cfg.rms_norm_eps,
    )  # fmt: skip


def _split_heads(heads: jax.Array, B: int, T: int, cfg: ModelConfig):
    """``[B*T, N+2K, H]`` -> q ``[B, T, N, H]``, k and v ``[B, T, K, H]``."""
    N, K = cfg.num_heads, cfg.num_kv_heads
    q, k, v = jnp.split(heads.reshape(B, T, N + 2 * K, cfg.head_dim), [N, N + K], axis=2)
    return q, k, v


def attention_inputs(x, lp, positions, inv_freq, cfg: ModelConfig):
    """A block's queries ``[B, T, N, H]``, keys and values ``[B, T, K, H]`` from its input ``x``:
    RMSNorm, the projections (fused or separate), their biases, RoPE on queries and keys."""
    B, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if _on_epilogues(x, lp, cfg):
        return _split_heads(_epilogue_heads(x, lp, positions, inv_freq, cfg), B, T, cfg)
    if "wqkv" in lp:  # fused at load time (fuse_projections): one matmul reads all three
        (qkv,) = norm_dense(x, lp["attn_norm"], cfg.rms_norm_eps, [lp["wqkv"]])
        q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
    else:
        q, k, v = norm_dense(x, lp["attn_norm"], cfg.rms_norm_eps, [lp["wq"], lp["wk"], lp["wv"]])
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = apply_rope(q.reshape(B, T, N, H), positions, inv_freq)
    k = apply_rope(k.reshape(B, T, K, H), positions, inv_freq)
    return q, k, v.reshape(B, T, K, H)


def _layer(x, lp, positions, inv_freq, cache_kv, cfg: ModelConfig, attend=None, next_norm=None):
    """One decoder block. cache_kv is None or (pivot_k, pivot_v, k, v, write_slot, lengths).

    ``attend(q, k, v) -> (attn [B,T,N*H], new_kv)``, when given, replaces both attention branches
    (quantized caches and the quantized cache-free forward of ``jaxkv.kvattention``).

    On the epilogues' path (``jaxkv.kernels.epilogue``) with ``next_norm`` (the next RMSNorm's
    weight: the next block's attention norm, or the final norm) the block returns the stream as
    ``(x, next_norm * x, partial sums of squares)``, computed by its down
    projection's epilogue, and a block takes ``x`` in that form too (:func:`_stream_x`). Loops that can
    carry it pass ``next_norm``: the per-layer loop of :func:`decode_layout`'s parameters.
    """
    normed = None
    if isinstance(x, tuple):
        x, *normed = x
    B, T, _ = x.shape
    fused = _on_epilogues(x, lp, cfg)
    heads = None  # the token's heads as one array, where an epilogue made them so
    if fused:
        heads = _epilogue_heads(x, lp, positions, inv_freq, cfg, normed)
        q, k, v = _split_heads(heads, B, T, cfg)
    else:
        q, k, v = attention_inputs(x, lp, positions, inv_freq, cfg)

    if attend is not None:
        attn, new_kv = attend(q, k, v)
    elif cache_kv is None:
        attn = _attend(q, k, v, causal_mask(positions, positions, cfg), cfg)
        new_kv = None
    else:
        pivot_k, pivot_v, ck, cv, slot, lengths = cache_kv
        if full_precision_kernel_applies(q, ck, cfg):
            # one decode token: one Pallas launch attends and writes it (jaxkv.kernels.fpdecode)
            attn, ck, cv = decode_full_precision(q, k, v, pivot_k, pivot_v, ck, cv, positions, heads)
        else:
            b_idx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
            ck = ck.at[b_idx, slot].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[b_idx, slot].set(v.astype(cv.dtype), mode="drop")
            P, S = pivot_k.shape[0], ck.shape[1]
            body_pos = jnp.where(jnp.arange(S)[None, :] < lengths[:, None], P + jnp.arange(S)[None, :], -1)
            k_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(P), (B, P)), body_pos], axis=1)
            mask = causal_mask(positions, k_pos, cfg)
            pivot = (pivot_k.astype(q.dtype), pivot_v.astype(q.dtype)) if P else None
            attn = _attend(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, cfg, pivot)
        new_kv = (ck, cv)

    if fused:
        # O's epilogue adds the residual and computes the MLP norm's inputs; gate/up's applies the
        # norm's 1/rms and SiLU(gate) * up (jaxkv.kernels.epilogue)
        from jaxkv.kernels import epilogue

        D = x.shape[-1]
        x2, gx, sumsq = epilogue.residual_norm(
            attn.reshape(B * T, -1), lp["wo"], x.reshape(B * T, D), lp["mlp_norm"]
        )
        h = epilogue.silu_mul(gx, lp["w_gate_up"], sumsq, eps=cfg.rms_norm_eps)
        if next_norm is None:
            return constrain(x2.reshape(B, T, D) + dense(h.reshape(B, T, -1), lp["w_down"])), new_kv
        # down's epilogue adds the residual and computes the next norm's inputs: the stream leaves
        # as a tuple
        x2, gx, sumsq = epilogue.residual_norm(h, lp["w_down"], x2, next_norm)
        return (x2.reshape(B, T, D), gx.reshape(B, T, D), sumsq), new_kv
    x = x + dense(attn, lp["wo"])
    if "w_gate_up" in lp:
        (gate_up,) = norm_dense(x, lp["mlp_norm"], cfg.rms_norm_eps, [lp["w_gate_up"]])
        gate, up = jnp.split(gate_up, 2, axis=-1)
    else:
        gate, up = norm_dense(x, lp["mlp_norm"], cfg.rms_norm_eps, [lp["w_gate"], lp["w_up"]])
    x = x + dense(jax.nn.silu(gate) * up, lp["w_down"])
    # Block boundary: pin the activation sharding under a mesh (a no-op without one; jaxkv.sharding).
    return constrain(x), new_kv


def decoder(
    params, tokens, positions, cache: KVCache | None, cfg: ModelConfig, collect: bool = False,
    kv: KVQuantConfig | None = None, pivot_len: int = 0, pivot_kv=None, wkv=None,
):  # fmt: skip
    """Embedding and all blocks, before the final norm.

    Returns ``(hidden [B,T,D], cache, layer_outputs)``; ``layer_outputs`` is ``[L,B,T,D]`` (each
    block's output) when ``collect`` else None. ``kv``/``pivot_len``/``pivot_kv`` apply to the
    cache-free forward only: attention then sees K/V as a cache quantized by ``kv`` would hold them
    (see :func:`forward_kv`); a cache carries its own quantization and pivot (and ``jaxkv.wkvquant``
    parameters); ``wkv`` are those of the cache-free forward.
    """
    x = constrain(jnp.take(params["embed"], tokens, axis=0))
    inv_freq = rope_inv_freq(cfg)
    if pivot_kv is not None:
        pivot_len = pivot_kv[0].shape[1]

    if cache is None and kv is not None and not kv.is_identity(cfg.num_layers):
        return _decoder_fake_quant(params, x, positions, cfg, collect, kv, pivot_len, inv_freq, pivot_kv, wkv)
    if cache is not None and cache.quantized:
        return _decoder_quant_cache(params, x, positions, cache, cfg, collect, inv_freq)

    if cache is None:
        mask = causal_mask(positions, positions, cfg)

        def body(x, xs):
            lp, pk, pv = xs
            attend = None
            if pk is not None:
                attend = lambda q, k, v: (_attend(q, *_intact(k, v, pk, pv), mask, cfg), None)  # noqa: E731
            x, _ = _layer(x, lp, positions, inv_freq, None, cfg, attend=attend)
            return x, (x if collect else None)

        pk, pv = (None, None) if pivot_kv is None else pivot_kv
        x, outs = jax.lax.scan(body, x, (params["layers"], pk, pv))
        return x, None, outs

    P, S = cache.pivot_len, cache.max_len
    valid = positions >= 0
    slot = jnp.where(valid, positions - P, S)  # S is out of bounds: dropped by the scatter
    lengths = jnp.maximum(cache.lengths, jnp.max(jnp.where(valid, positions - P + 1, 0), axis=1))

    def body(x, xs):
        i, pk, pv, ck, cv = xs
        lp = layer_at(params["layers"], i)
        cache_kv = (pk, pv, ck, cv, slot, lengths)
        x, (ck, cv) = _layer(x, lp, positions, inv_freq, cache_kv, cfg, next_norm=_next_norm(params, i))
        return x, ((_stream_x(x) if collect else None), ck, cv)

    xs = (jnp.arange(cfg.num_layers), cache.pivot_k, cache.pivot_v, cache.k, cache.v)
    x, (outs, new_k, new_v) = _over_layers(body, x, xs, params["layers"], 0)
    return _stream_x(x), cache.replace(k=new_k, v=new_v, lengths=lengths.astype(jnp.int32)), outs


def _next_norm(params, i):
    """The RMSNorm weight after block ``i`` (the next block's attention norm, or the final norm)
    where the layer loop can carry the stream as a tuple (:func:`_layer`): over
    :func:`decode_layout`'s per-layer parameters (``i`` a Python int); else None (a scan's carry
    keeps one form)."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return None
    return layers[i + 1]["attn_norm"] if i + 1 < len(layers) else params["final_norm"]


def _stream_x(x):
    """The residual stream ``x`` of a loop carry that may hold the next norm's inputs too."""
    return x[0] if isinstance(x, tuple) else x


def layer_at(layers: dict, i: jax.Array) -> dict:
    """Layer ``i`` (traced) of the stacked parameters: arrays sliced, QArrays as unsliced
    :class:`~jaxkv.quant.qarray.LayerOf` views that the decode kernel reads in place."""
    from jaxkv.quant.qarray import LayerOf, QArray

    if isinstance(layers, (list, tuple)):  # decode_layout: i is a Python int
        return layers[i]
    return {name: (LayerOf(w, i) if isinstance(w, QArray) else w[i]) for name, w in layers.items()}


def _over_layers(body, x, xs, layers, start: int):
    """``jax.lax.scan(body, x, xs)`` over stacked layers; over :func:`decode_layout`'s unstacked
    ones, a Python loop with static layer indices.

    ``xs = (layer indices, *per-layer inputs)`` and ``body`` returns ``(x, (output, *updated))``
    where ``updated`` are new values of the last per-layer inputs (the layer's cache). In the loop a
    per-layer input is stacked (a pytree with a leading layer axis), or a tuple of one pytree per
    layer (a cache in ``init_cache(..., per_layer=True)``'s layout), whose entries are used and
    replaced as they are. Stacked inputs are written back in place; but XLA then keeps a copy of
    the layer's updated slice for the attention that reads it (seen on an H200: the layer's K and V
    copied at every decode step), so generation keeps its cache per layer.
    """
    if not isinstance(layers, (list, tuple)):
        return jax.lax.scan(body, x, xs)
    rest = list(xs[1:])
    n = jax.tree.leaves(rest[0])[0].shape[0]
    outs, n_upd = [], 0
    for j in range(n):
        sliced = [r[j] if isinstance(r, tuple) else jax.tree.map(lambda a, j=j: a[j], r) for r in rest]
        x, (out, *new) = body(x, (start + j, *sliced))
        outs.append(out)
        n_upd = len(new)
        for r, upd in enumerate(new, start=len(rest) - n_upd):
            if isinstance(rest[r], tuple):
                rest[r] = (*rest[r][:j], upd, *rest[r][j + 1 :])
            else:
                rest[r] = jax.tree.map(lambda a, b, j=j: a.at[j].set(b), rest[r], upd)
    stacked = None if outs[0] is None else jnp.stack(outs)
    return x, (stacked, *rest[len(rest) - n_upd :])


def decode_layout(params: dict, fuse: bool = True, batch: int = 1) -> dict:
    """Parameters laid out for fast single-device generation of ``batch`` sequences: Q/K/V and
    gate/up fused (:func:`fuse_projections`), the stacked layers split into a tuple of per-layer
    dicts, and each quantized weight in the packing its decode matmul reads fastest at ``batch``
    rows (:func:`jaxkv.quant.qarray.decode_layout_for`: on a GPU, 4-bit codes packed along the inputs
    for 2-64 rows; unchanged otherwise). Any batch runs on any of these layouts; only speed differs.

    Measured on an H100 (``jaxkv bench``): under ``lax.scan`` XLA copies each layer's slice of the
    stacked weights before its matmuls, so a memory-bound decode step reads the weights about three
    times; separate per-layer buffers (a Python loop over layers) are read once, and the Pallas
    quantized matmul gets whole 2-D weights. Generation and the cached forward accept this layout
    (and the stacked one); the cache-free forward, calibration, sharding and checkpoints need the
    stacked layout (decode on a mesh splits after sharding: ``jaxkv.sharding.shard_decode_params``).
    The stacked leaves are released as they are split.
    """
    from jaxkv.quant.qarray import QArray, decode_layout_for, to_layout

    def relayout(w):
        return to_layout(w, decode_layout_for(w, batch)) if isinstance(w, QArray) else w

    if fuse:
        params = fuse_projections(params)
    stacked = dict(params["layers"])
    L = jax.tree.leaves(stacked)[0].shape[0]
    per_layer = [{} for _ in range(L)]
    for name in list(stacked):
        w = stacked.pop(name)  # drop our reference as soon as the pieces exist
        for i in range(L):
            per_layer[i][name] = relayout(w[i])
        del w
    rest = {k: relayout(v) for k, v in params.items() if k != "layers"}
    return {**rest, "layers": tuple(per_layer)}


FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_projections(params: dict) -> dict:
    """Params whose Q/K/V and gate/up matrices are concatenated along the output axis (``wqkv``,
    ``w_gate_up``): decode then runs 4 matmuls per block instead of 7, each reading more bytes per
    launch. Works for arrays and QArrays of equal bits/group (groups run along the input axis, so
    columns concatenate). For one device: the fused columns do not follow the head sharding of
    ``jaxkv.sharding``, and the fused names are not saved by the checkpoints."""
    from jaxkv.quant.qarray import QArray

    layers = dict(params["layers"])
    if any(isinstance(w, QArray) and w.layout != "io" for w in layers.values()):
        raise ValueError(
            "fuse_projections needs the canonical QArray layout (fuse before decode_layout's repacking)"
        )
    for fused, names in FUSED.items():
        ws = [layers[n] for n in names]
        if isinstance(ws[0], QArray):
            if any(
                not isinstance(w, QArray) or (w.bits, w.group, w.sym) != (ws[0].bits, ws[0].group, ws[0].sym)
                for w in ws
            ):
                continue  # mixed recipes (e.g. one projection kept in float): leave them separate
            cat = jax.tree.map(lambda *a: jnp.concatenate(a, axis=-1), *ws)
        elif any(isinstance(w, QArray) for w in ws):
            continue
        else:
            cat = jnp.concatenate(ws, axis=-1)
        for n in names:
            del layers[n]
        layers[fused] = cat
    return {**params, "layers": layers}


def _layer_slice(layers, start: int, stop: int, num_layers: int):
    """Layers [start, stop) of the stacked parameters (all of them without a copy)."""
    if (start, stop) == (0, num_layers):
        return layers
    return jax.tree.map(lambda a: a[start:stop], layers)


def _intact(k, v, pivot_k, pivot_v):
    """K/V [B,T,K,H] whose first P positions are replaced by a prefix's pivot K/V [P,K,H] (IntactKV)."""
    P = pivot_k.shape[0]
    return k.at[:, :P].set(pivot_k.astype(k.dtype)), v.at[:, :P].set(pivot_v.astype(v.dtype))


def _decoder_fake_quant(
    params, x, positions, cfg: ModelConfig, collect, kv: KVQuantConfig, pivot_len, inv_freq, pivot_kv=None,
    wkv=None,
):  # fmt: skip
    """Cache-free blocks with quantized-cache attention, one scan per run of layers with equal bits;
    ``wkv`` (``jaxkv.wkvquant``): K/V smoothed per channel and clipped (``attend_smoothed``)."""
    kv.check(cfg)
    check_wkv(kv, wkv, cfg)
    outs = []
    for start, stop, kspec, vspec in plan_segments(cfg, kv):
        attend = functools.partial(
            attend_fake_quant,
            positions=positions,
            cfg=cfg,
            kv=kv,
            kspec=kspec,
            vspec=vspec,
            pivot_len=pivot_len,
        )

        def body(x, xs, attend=attend, kspec=kspec, vspec=vspec):
            lp, pk, pv, kw, vw = xs
            kw, vw = (kw if kspec.quantized else None), (vw if vspec.quantized else None)

            def attend_intact(q, k, v):
                k, v = _intact(k, v, pk, pv) if pk is not None else (k, v)
                if kw is None and vw is None:
                    return attend(q, k, v), None
                clips = {"kclip": kw and kw["clip"], "vclip": vw and vw["clip"]}
                fake = lambda q, k, v, _: (attend(q, k, v, **clips), None)  # noqa: E731
                return attend_smoothed(fake, q, k, v, None, kw, vw)

            x, _ = _layer(x, lp, positions, inv_freq, None, cfg, attend=attend_intact)
            return x, (x if collect else None)

        pk, pv = (None, None) if pivot_kv is None else (pivot_kv[0][start:stop], pivot_kv[1][start:stop])
        kw = vw = None
        if wkv is not None:
            kw, vw = ({n: a[start:stop] for n, a in wkv_side(wkv, side).items()} for side in ("k", "v"))
        layers = _layer_slice(params["layers"], start, stop, cfg.num_layers)
        x, o = jax.lax.scan(body, x, (layers, pk, pv, kw, vw))
        outs.append(o)
    return x, None, (jnp.concatenate(outs) if collect else None)


def _decoder_quant_cache(params, x, positions, cache: KVCache, cfg: ModelConfig, collect, inv_freq):
    """Blocks over a quantized cache (``jaxkv.kvattention.attend_cached``), one scan per segment."""
    P, S = cache.pivot_len, cache.max_len
    valid = positions >= 0
    slot = jnp.where(valid, positions - P, S)  # S is out of bounds: dropped by the scatters
    n_old = cache.lengths
    n_new = jnp.maximum(n_old, jnp.max(jnp.where(valid, positions - P + 1, 0), axis=1)).astype(jnp.int32)
    segments, outs = [], []
    for seg in cache.segments:

        def body(x, xs):
            i, pk, pv, ks, vs = xs
            lp = layer_at(params["layers"], i)

            def attend(q, k, v):
                # Over K/V smoothed by jaxkv.wkvquant when the sides hold its parameters.
                def cached(q, k, v, pivot):
                    out, ks2, vs2 = attend_cached(
                        q, k, v, *pivot, ks, vs, positions, n_old, n_new, slot, cfg, cache.kv, decode_impl()
                    )
                    return out, (ks2, vs2)

                return attend_smoothed(cached, q, k, v, (pk, pv), ks.wkv, vs.wkv)

            x, (ks, vs) = _layer(x, lp, positions, inv_freq, None, cfg, attend, _next_norm(params, i))
            return x, ((_stream_x(x) if collect else None), ks, vs)

        xs = (
            jnp.arange(seg.start, seg.stop),
            cache.pivot_k[seg.start : seg.stop],
            cache.pivot_v[seg.start : seg.stop],
            seg.k,
            seg.v,
        )
        x, (o, ks, vs) = _over_layers(body, x, xs, params["layers"], seg.start)
        segments.append(seg.replace(k=ks, v=vs))
        outs.append(o)
    return (
        _stream_x(x),
        cache.replace(segments=tuple(segments), lengths=n_new),
        (jnp.concatenate(outs) if collect else None),
    )


def logits_from_hidden(params, x, cfg: ModelConfig) -> jax.Array:
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("...D,VD->...V", x, params["embed"].astype(x.dtype))
    else:
        logits = dense(x, params["lm_head"])
    return logits.astype(jnp.float32)


def forward(params, tokens, positions, cache: KVCache | None, cfg: ModelConfig):
    """Logits [B, T, V] (float32) and the updated cache (None when called without one)."""
    x, cache, _ = decoder(params, tokens, positions, cache, cfg)
    return logits_from_hidden(params, x, cfg), cache


def forward_kv(
    params, tokens, positions, cfg: ModelConfig, kv: KVQuantConfig | None, pivot_len: int = 0, pivot_kv=None,
    wkv=None,
):  # fmt: skip
    """Cache-free logits [B, T, V] with attention reading K/V as a cache quantized by ``kv`` would.

    For perplexity: ``positions`` are ``0..T-1`` in every row and the first ``pivot_len`` positions act
    as full-precision pivot slots (``pivot_len=1`` keeps [BOS]'s K/V unquantized). Query i reads key j
    quantized iff a decoding step at i would (``jaxkv.kvcache``: past-only or all, residual, complete
    per-channel groups), so these logits equal those of decoding the window token by token (or in
    any chunks) through ``init_cache(..., pivot_k/v = those pivot tokens' K/V, kv=kv)``, up to float
    rounding. With nothing quantized this is :func:`forward` bit for bit.

    ``pivot_kv = (k, v)``, each ``[L, P, K, H]`` (an IntactKV prefix), replaces the K/V the model
    computes at positions ``0..P-1`` (which must hold the prefix's pivot tokens) and sets
    ``pivot_len = P``: the windows then see the full-precision model's pivot K/V, as generation
    from that prefix does. Differentiable in ``pivot_kv``.

    ``wkv``: the learned parameters of ``kv.method == "wkvquant"`` (``jaxkv.wkvquant``: per-channel
    smoothing and clipping of K/V, arrays ``[L, ...]``); required by that method, refused by ``minmax``.
    Differentiable in ``wkv`` (straight-through rounding).
    """
    x, _, _ = decoder(
        params, tokens, positions, None, cfg, kv=kv, pivot_len=pivot_len, pivot_kv=pivot_kv, wkv=wkv
    )
    return logits_from_hidden(params, x, cfg)


@dataclasses.dataclass(frozen=True)
class KVForward:
    """``forward_fn(params, tokens, positions) -> logits`` for ``jaxkv.evaluate.perplexity``: the
    cache-free forward with quantized-KV attention (:func:`forward_kv`). With ``intact`` the params
    are ``(model_params, prefix.k, prefix.v)`` and the prefix supplies the pivot K/V (IntactKV).
    With a ``wkvquant`` ``kv``, the params end with its parameters: ``(model_params, wkv)`` or
    ``(model_params, prefix.k, prefix.v, wkv)``.
    Hashable, so repeated perplexity calls reuse one compilation."""

    cfg: ModelConfig
    kv: KVQuantConfig | None = None
    pivot_len: int = 0
    intact: bool = False

    def __call__(self, params, tokens, positions):
        wkv = None
        if self.kv is not None and self.kv.method == "wkvquant":
            if not isinstance(params, tuple) or len(params) < 2:
                raise ConfigError("KV cache method 'wkvquant' needs its learned parameters (last in params)")
            *params, wkv = params
            params = params[0] if len(params) == 1 else tuple(params)
        if self.intact:
            params, k, v = params
            return forward_kv(params, tokens, positions, self.cfg, self.kv, pivot_kv=(k, v), wkv=wkv)
        return forward_kv(params, tokens, positions, self.cfg, self.kv, self.pivot_len, wkv=wkv)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_jit(params, tokens, positions, cfg: ModelConfig):
    """Jitted cache-free forward: logits [B, T, V]."""
    return forward(params, tokens, positions, None, cfg)[0]
