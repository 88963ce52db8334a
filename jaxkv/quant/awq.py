"""AWQ (Lin et al. 2023) in JAX: activation-aware scale search and clipping, then RTN with real packing.

Follows llm-awq ``run_awq`` / ``auto_scale_block`` / ``auto_clip_block`` for LLaMA blocks:

* Block by block, the inputs of every linear are captured from the full-precision model (llm-awq
  feeds block l+1 with the FP output of block l; scaling is an exact transform, so this is the FP
  model's activations).
* Scale search, per group of linears sharing an input, over ``ratio = r / n_grid`` (r = 0..n_grid-1)::

      s = clip(mean|x| ** ratio, 1e-4);  s = s / sqrt(max(s) * min(s))
      loss(ratio) = mean((module(x; Q(W * s) / s) - module(x; W))^2)

  with ``module`` = the whole attention (q/k/v, RoPE, softmax, wo) for wq/wk/wv; wo alone for v->o
  (only when ``wv`` and ``wo`` are square, i.e. without GQA, as llm-awq); the whole MLP for
  w_gate/w_up; w_down alone for up->down. The best ``s`` is folded exactly: the previous op (RMSNorm
  weight, wv's columns and bias, w_up's columns) is divided by ``s`` and the linears' input rows
  multiplied by it; the captured inputs are divided by it.
* Clip search (not for wq/wk: "due to qk bmm, it is hard to clip precisely"), per (output column,
  group): ``max_val = amax|w| * (1 - i / n_grid)`` for ``i < max_shrink * n_grid``, minimizing the
  mean squared error of the group's partial products on ``awq_clip_tokens`` evenly strided tokens;
  the weight is clamped to ``[-max_val, max_val]``.
* Finally every selected linear is RTN-quantized (:mod:`jaxkv.quant.rtn`). ``lm_head``, if selected,
  gets plain RTN (llm-awq does not quantize it).

Searches run in float32 (the weights' dtype if wider); scaled weights are cast back to the model dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import ModelConfig
from jaxkv.quant import calib
from jaxkv.quant.qarray import quant_params, quantize_codes, quantize_tensor
from jaxkv.quant.recipe import QuantRecipe, get_path


def fake_quantize(w, bits: int, group: int, sym: bool, scale_dtype):
    """``dequantize(quantize_tensor(w))`` without packing (the search's ``w_quantize_func``)."""
    scale, zero = quant_params(w, bits, group, sym, scale_dtype)
    codes = quantize_codes(w, scale, zero, bits, group)
    cd = codes.dtype
    *lead, I, O = w.shape
    z = 2 ** (bits - 1) if zero is None else zero[..., None, :]
    wq = (codes.reshape(*lead, I // group, group, O) - z) * scale.astype(cd)[..., None, :]
    return wq.reshape(w.shape)


def _act_scale(x) -> jax.Array:
    """llm-awq ``get_act_scale``: mean |x| per input channel over all tokens (float32)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return jnp.mean(jnp.abs(x), axis=0)


def _ratio_scales(x_max, ratio):
    s = jnp.maximum(x_max**ratio, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("names", "module", "cfg", "qargs"))
def _scaled_loss_batch(lp, s, x, ref, names, module, cfg, qargs):
    """Sum of squared errors of ``module`` on batch ``x`` with ``names`` replaced by Q(W*s)/s."""
    bits, group, sym, sdt = qargs
    lp = dict(lp)
    for n in names:
        w = lp[n].astype(jnp.float32)
        g = w.shape[0] if group == -1 else group
        lp[n] = (fake_quantize(w * s[:, None], bits, g, sym, sdt) / s[:, None]).astype(lp[n].dtype)
    out = _module(module, lp, x, cfg)
    return jnp.sum(jnp.square(out.astype(jnp.float32) - ref.astype(jnp.float32)))


def _module(module: str, lp, x, cfg: ModelConfig):
    if module == "attn":
        return calib.attention_out(lp, x, cfg)
    if module == "wo":
        return calib.dense(x, lp["wo"])
    if module == "mlp":
        return calib.mlp_out(lp, x)
    if module == "w_down":
        return calib.dense(x, lp["w_down"])
    raise ValueError(module)


_module_jit = jax.jit(_module, static_argnames=("module", "cfg"))


def _search_scale(lp, x, names, module, cfg, recipe: QuantRecipe):
    """The best scales ``[in]`` for ``names`` (input ``x [N, T, in]``), llm-awq ``_search_module_scale``."""
    B = recipe.calib_batch
    refs = [_module_jit(module, lp, x[s], cfg) for s in calib.batches(x.shape[0], B)]
    count = sum(r.size for r in refs)
    x_max = _act_scale(x)
    qargs = (recipe.bits, recipe.group, recipe.sym, recipe.jnp_scale_dtype)
    best, best_s = float("inf"), None
    for r in range(recipe.awq_grid):
        s = _ratio_scales(x_max, r / recipe.awq_grid)
        sse = 0.0
        for sl, ref in zip(calib.batches(x.shape[0], B), refs):
            sse += float(_scaled_loss_batch(lp, s, x[sl], ref, tuple(names), module, cfg, qargs))
        loss = sse / count
        if loss < best:
            best, best_s = loss, s
    if best_s is None:  # every loss NaN: keep the weights as they are
        best_s = jnp.ones_like(x_max)
    return best_s


@functools.partial(jax.jit, static_argnames=("qargs", "n_grid", "n_shrink"))
def _clip_max(w, x, qargs, n_grid, n_shrink):
    """llm-awq ``auto_clip_layer``: best clamp ``max_val [ng, O]`` for ``w [I, O]`` given tokens ``x [n, I]``."""
    bits, group, sym, sdt = qargs
    I, O = w.shape
    g = I if group == -1 else group
    ng = I // g
    w = w.astype(jnp.float32)
    wg = w.reshape(ng, g, O)
    xg = x.astype(jnp.float32).reshape(-1, ng, g)
    org_out = jnp.einsum("nki,kio->nko", xg, wg)
    org_max = jnp.max(jnp.abs(wg), axis=1)  # [ng, O]

    def step(carry, i):
        best_err, best_max = carry
        mv = org_max * (1 - i / n_grid)
        cur = jnp.clip(wg, -mv[:, None, :], mv[:, None, :]).reshape(I, O)
        qw = fake_quantize(cur, bits, g, sym, sdt).reshape(ng, g, O)
        err = jnp.mean(jnp.square(jnp.einsum("nki,kio->nko", xg, qw) - org_out), axis=0)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, mv, best_max)), None

    init = (jnp.full(org_max.shape, 1e9, jnp.float32), org_max)
    (_, best_max), _ = jax.lax.scan(step, init, jnp.arange(n_shrink, dtype=jnp.float32))
    return best_max


def _apply_clip(w, max_val, group):
    I, O = w.shape
    g = I if group == -1 else group
    wg = w.reshape(I // g, g, O)
    mv = max_val.astype(w.dtype)[:, None, :]
    return jnp.clip(wg, -mv, mv).reshape(I, O)


def awq_transform_block(lp: dict, X: jax.Array, cfg: ModelConfig, recipe: QuantRecipe, sel: set[str]) -> dict:
    """Scale-search and clip one block (``X [N,T,D]``: its FP input); returns the transformed FP block."""
    B = recipe.calib_batch
    lp = dict(lp)
    attn_in, ctx, mlp_in, act = calib.run_block(lp, X, cfg, ("attn_in", "ctx", "mlp_in", "act"), B)
    feats = {"attn_in": attn_in, "ctx": ctx, "mlp_in": mlp_in, "act": act}
    f32 = jnp.float32

    def fold_prev_norm(norm_name, names, s):
        lp[norm_name] = (lp[norm_name].astype(f32) / s).astype(lp[norm_name].dtype)
        for n in names:
            lp[n] = (lp[n].astype(f32) * s[:, None]).astype(lp[n].dtype)

    if recipe.awq_scale:
        qkv = [n for n in ("wq", "wk", "wv") if n in sel]
        if qkv:
            s = _search_scale(lp, feats["attn_in"], qkv, "attn", cfg, recipe)
            fold_prev_norm("attn_norm", ("wq", "wk", "wv"), s)
            feats["attn_in"] = (feats["attn_in"].astype(f32) / s).astype(attn_in.dtype)
        if "wo" in sel and lp["wv"].shape == lp["wo"].shape[::-1] and cfg.num_heads == cfg.num_kv_heads:
            s = _search_scale(lp, feats["ctx"], ["wo"], "wo", cfg, recipe)
            lp["wv"] = (lp["wv"].astype(f32) / s[None, :]).astype(lp["wv"].dtype)
            if cfg.attention_bias:
                lp["bv"] = (lp["bv"].astype(f32) / s).astype(lp["bv"].dtype)
            lp["wo"] = (lp["wo"].astype(f32) * s[:, None]).astype(lp["wo"].dtype)
            feats["ctx"] = (feats["ctx"].astype(f32) / s).astype(ctx.dtype)
        gu = [n for n in ("w_gate", "w_up") if n in sel]
        if gu:
            s = _search_scale(lp, feats["mlp_in"], gu, "mlp", cfg, recipe)
            fold_prev_norm("mlp_norm", ("w_gate", "w_up"), s)
            feats["mlp_in"] = (feats["mlp_in"].astype(f32) / s).astype(mlp_in.dtype)
        if "w_down" in sel:
            s = _search_scale(lp, feats["act"], ["w_down"], "w_down", cfg, recipe)
            lp["w_up"] = (lp["w_up"].astype(f32) / s[None, :]).astype(lp["w_up"].dtype)
            lp["w_down"] = (lp["w_down"].astype(f32) * s[:, None]).astype(lp["w_down"].dtype)
            feats["act"] = (feats["act"].astype(f32) / s).astype(act.dtype)

    if recipe.awq_clip:
        qargs = (recipe.bits, recipe.group, recipe.sym, recipe.jnp_scale_dtype)
        n_shrink = int(recipe.awq_max_shrink * recipe.awq_grid)
        for n in ("wv", "wo", "w_gate", "w_up", "w_down"):
            if n not in sel or n_shrink == 0:
                continue
            x = feats[calib.INPUT_OF[n]]
            x = x.reshape(-1, x.shape[-1])
            x = x[:: max(1, x.shape[0] // recipe.awq_clip_tokens)]
            mv = _clip_max(lp[n], x, qargs, recipe.awq_grid, n_shrink)
            lp[n] = _apply_clip(lp[n], mv, recipe.group)
    return lp


def awq_quantize_params(
    params, cfg: ModelConfig, recipe: QuantRecipe, tokens: np.ndarray, selected: dict, progress: bool = True
) -> tuple[dict, dict]:
    """``({path: QArray}, {path: new FP array})``: quantized linears and the rescaled norms/biases/linears.

    The second dict holds the full-precision leaves AWQ changed (``layers/attn_norm``,
    ``layers/mlp_norm``, ``layers/bv``, and any unselected linear that absorbed a scale).
    """
    layer_sel = {n.split("/", 1)[1] for n in selected if n.startswith("layers/")}
    other = set(selected) - {f"layers/{n}" for n in layer_sel}
    if other - {"lm_head"}:
        raise ValueError(f"AWQ can quantize the block linears and lm_head, not {sorted(other - {'lm_head'})}")
    layers = params["layers"]
    X = calib.embed_windows(params, tokens)
    B = recipe.calib_batch
    new_layers = []
    for l in calib.progress_bar(range(cfg.num_layers), "AWQ blocks", progress):
        lp = calib.layer_params(layers, l)
        # The next block's input: the FP block output (llm-awq computes it before scaling).
        (X_next,) = calib.run_block(lp, X, cfg, ("out",), B)
        new_layers.append(awq_transform_block(lp, X, cfg, recipe, layer_sel))
        X = X_next
    stacked = {k: jnp.stack([lp[k] for lp in new_layers]) for k in new_layers[0]}
    quantized = {}
    for n in layer_sel:
        quantized[f"layers/{n}"] = quantize_tensor(
            stacked[n], recipe.bits, recipe.group_for(stacked[n].shape[-2]), recipe.sym, recipe.jnp_scale_dtype,
            name=f"layers/{n}",
        )  # fmt: skip
    if "lm_head" in selected:
        w = get_path(params, "lm_head")
        quantized["lm_head"] = quantize_tensor(
            w, recipe.bits, recipe.group_for(w.shape[-2]), recipe.sym, recipe.jnp_scale_dtype, name="lm_head"
        )
    changed = {f"layers/{k}": v for k, v in stacked.items() if k not in layer_sel}
    return quantized, changed
