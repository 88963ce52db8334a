"""Sharded-vs-unsharded checks on 8 fake CPU devices; run by ``tests/test_sharding.py`` in a subprocess.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts, which a pytest
process that already imported JAX cannot do; so the test starts ``python tests/sharding_worker.py``
with that environment and reads the one JSON object it prints last. Each check reports the largest
absolute difference from the single-device result (or a traceback), per mesh.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxkv import sharding as sh
from jaxkv.calibrate import CalibConfig, calibrate
from jaxkv.config import ModelConfig
from jaxkv.generate import generate
from jaxkv.kvcache import KVQuantConfig, init_cache
from jaxkv.model import forward
from jaxkv.params import init_params
from jaxkv.prefix import make_prefix, model_fingerprint
from jaxkv.quant import QuantRecipe, quantize_params

# GQA with 4 query / 2 KV heads: tensor=4 splits query heads and replicates KV heads.
CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,),
)  # fmt: skip
# SmolLM2's head counts (9 query, 3 KV): tensor=4 cannot split them, tensor=3 can.
SMOL = dataclasses.replace(CFG, num_heads=9, num_kv_heads=3, hidden_size=48)
MESHES = ("data=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4")
B, T = 8, 12


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: dict
    tokenizer: object = None
    recipe: object = None
    fingerprint: str | None = None


_fwd = jax.jit(forward, static_argnames="cfg")


def max_diff(a, b) -> float:
    a = jax.tree.map(lambda x: np.asarray(sh.to_host(x), np.float64), a)
    b = jax.tree.map(lambda x: np.asarray(sh.to_host(x), np.float64), b)
    return float(max(np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def make_models(cfg: ModelConfig):
    fp = init_params(cfg, jax.random.key(0))
    # Larger weights: peaked distributions, so greedy paths and calibration losses are not flat.
    fp = jax.tree.map(lambda x: x * 5 if x.ndim == 3 else x, fp)
    fp_model = Model(cfg, fp)
    q = quantize_params(fp, cfg, QuantRecipe(bits=4, group=8, method="rtn"))
    return fp_model, Model(cfg, q, recipe={"bits": 4}, fingerprint=model_fingerprint(fp_model))


def inputs():
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, CFG.vocab_size, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return tokens, positions


def run_forward(params, cfg, mesh, tokens, positions):
    if mesh is not None:
        params = sh.shard_params(params, cfg, mesh)
        tokens, positions = sh.global_batch(tokens, mesh), sh.global_batch(positions, mesh)
    with sh.activate(mesh):
        return _fwd(params, tokens, positions, None, cfg)[0]


def run_cached(params, prefix, cfg, mesh, tokens, positions):
    """Prefill of a cache holding the prefix: logits and the cache's K/V (the decode path's numerics)."""
    P = prefix.k.shape[1]
    cache = init_cache(cfg, B, 16, prefix.k.dtype, prefix.k, prefix.v)
    positions = positions + P
    if mesh is not None:
        params = sh.shard_params(params, cfg, mesh)
        cache = sh.shard_cache(cache, cfg, mesh)
        tokens, positions = sh.global_batch(tokens, mesh), sh.global_batch(positions, mesh)
    with sh.activate(mesh):
        logits, cache = _fwd(params, tokens, positions, cache, cfg)
    return {"logits": logits, "k": cache.k, "v": cache.v}, cache


def decode_params(model, mesh):
    """shard_decode_params: one buffer per layer, each in the stacked spec less the layer axis, and
    the per-layer cache's shardings the stacked cache's less that axis."""
    stacked = sh.shard_params(model.params, CFG, mesh)
    split = sh.shard_decode_params(model.params, CFG, mesh)
    pairs = [
        (stacked["layers"][name], layer[name])
        for layer in split["layers"]
        for name in ("wq", "w_down", "attn_norm")
    ]
    ok = len(split["layers"]) == CFG.num_layers and all(
        P(*getattr(s, "packed", s).sharding.spec[1:]) == getattr(w, "packed", w).sharding.spec
        and getattr(w, "packed", w).ndim == getattr(s, "packed", s).ndim - 1
        for s, w in pairs
    )
    kv = KVQuantConfig(kbits=4, vbits=2, group=8, residual=4)
    per_layer = sh.cache_shardings(init_cache(CFG, B, 16, kv=kv, per_layer=True), CFG, mesh)
    stacked_cache = sh.cache_shardings(init_cache(CFG, B, 16, kv=kv), CFG, mesh)
    cache_ok = per_layer.segments[0].k[0].data.spec == P(*stacked_cache.segments[0].k.data.spec[1:])
    try:
        sh.shard_decode_params(split, CFG, mesh)
        refused = False
    except sh.ShardingError as e:
        refused = "stacked parameters" in str(e)
    return {
        "ok": bool(ok),
        "cache_ok": bool(cache_ok),
        "refused_split": refused,
        "wq_spec": str(split["layers"][0]["wq"].packed.sharding.spec),
    }


def run_generate(model, prefix, mesh, tokens, kv=None):
    prompts = [list(map(int, row[: 3 + i])) for i, row in enumerate(tokens)]
    return generate(model, prefix, prompts, max_new_tokens=6, mesh=mesh, stop_at_eos=False, kv=kv).tokens


def run_calibration(fp, q, prefix, mesh):
    windows = np.random.RandomState(1).randint(3, CFG.vocab_size, (8, 8)).astype(np.int32)
    # The paper's learning rate: Adam's first step is lr * g / (|g| + eps), which turns the rounding
    # noise of near-zero gradients into an update of up to lr * that noise.
    cfg = CalibConfig(samples=8, seqlen=11, epochs=1, batch_size=8, micro_batch=8)
    res = calibrate(fp, q, prefix, windows, cfg, progress=False, mesh=mesh)
    return {"loss": np.asarray(res.losses), "initial": res.initial_loss, "k": res.prefix.k, "v": res.prefix.v}


def guarded(out: dict, name: str, fn, *args):
    """out[name] = fn(*args), or the traceback: one failing check must not hide the others."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out[name] = fn(*args)
    except Exception:
        out[name] = {"error": traceback.format_exc()}
    if isinstance(out[name], dict):
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        out[name]["cpu_seconds"] = round(time.process_time() - c0, 2)


def check_model_paths(results: dict) -> dict:
    fp, q = make_models(CFG)
    prefix = make_prefix(fp, [1, 5, 6])
    tokens, positions = inputs()
    ref = {
        "forward": run_forward(fp.params, CFG, None, tokens, positions),
        "quantized_forward": run_forward(q.params, CFG, None, tokens, positions),
        "cached_prefill": run_cached(q.params, prefix, CFG, None, tokens, positions)[0],
        "generate": run_generate(q, prefix, None, tokens),
        "calibration_step": run_calibration(fp, q, prefix, None),
    }
    checks = {
        "forward": lambda m: {"max_diff": max_diff(run_forward(fp.params, CFG, m, tokens, positions), ref["forward"])},
        "quantized_forward": lambda m: quantized_forward(q, m, tokens, positions, ref),
        "cached_prefill": lambda m: cached_prefill(q, prefix, m, tokens, positions, ref),
        "generate": lambda m: {"equal": run_generate(q, prefix, m, tokens) == ref["generate"]},
        "calibration_step": lambda m: {"max_diff": max_diff(run_calibration(fp, q, prefix, m), ref["calibration_step"])},
    }  # fmt: skip
    for spec in MESHES:
        mesh = sh.make_mesh(spec)
        results[spec] = {}
        for name, check in checks.items():
            guarded(results[spec], name, check, mesh)
    # The quantized KV cache (packed body, scales, zeros, full-precision window) on the 3-axis mesh.
    kv = KVQuantConfig(kbits=4, vbits=2, group=8, residual=4)
    ref_kv = run_generate(q, prefix, None, tokens, kv)
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    guarded(
        results,
        "quantized_kv_generate",
        lambda: {"equal": run_generate(q, prefix, mesh, tokens, kv) == ref_kv},
    )
    guarded(results, "decode_params", lambda: decode_params(q, mesh))
    return {}


def quantized_forward(q, mesh, tokens, positions, ref) -> dict:
    placed = sh.shard_params(q.params, CFG, mesh)
    wq = placed["layers"]["wq"]
    specs = {name: str(getattr(wq, name).sharding.spec) for name in ("packed", "scale", "zero")}
    out = run_forward(placed, CFG, mesh, tokens, positions)
    return {"max_diff": max_diff(out, ref["quantized_forward"]), "wq_specs": specs}


def cached_prefill(q, prefix, mesh, tokens, positions, ref) -> dict:
    out, cache = run_cached(q.params, prefix, CFG, mesh, tokens, positions)
    return {"max_diff": max_diff(out, ref["cached_prefill"]), "cache_k_spec": str(cache.k.sharding.spec)}


def check_indivisible_heads(results: dict) -> None:
    """SmolLM2-like 9/3 heads: replicated on tensor=4, split on tensor=3; both equal the reference."""
    fp, q = make_models(SMOL)
    tokens, positions = inputs()
    ref = run_forward(q.params, SMOL, None, tokens, positions)
    for spec, devices in (("data=2,tensor=4", jax.devices()), ("tensor=3", jax.devices()[:3])):
        mesh = sh.make_mesh(spec, devices)

        def one(mesh=mesh):
            placed = sh.shard_params(q.params, SMOL, mesh)
            out = run_forward(placed, SMOL, mesh, tokens, positions)
            return {
                "max_diff": max_diff(out, ref),
                "wq_spec": str(placed["layers"]["wq"].packed.sharding.spec),
                "w_up_spec": str(placed["layers"]["w_up"].packed.sharding.spec),
            }

        guarded(results, f"smol {spec}", one)
    return {}


def check_checkpoint_reshard(results: dict, tmp: Path) -> dict:
    """Orbax: save params sharded on one mesh, restore them onto another mesh shape."""
    import orbax.checkpoint as ocp

    fp, q = make_models(CFG)
    mesh_a, mesh_b = sh.make_mesh("fsdp=2,tensor=4"), sh.make_mesh("data=2,fsdp=4")
    tree = {
        "dense": sh.shard_params(fp.params, CFG, mesh_a),
        "quantized": sh.shard_params(q.params, CFG, mesh_a),
    }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "params", tree)
        ckptr.wait_until_finished()
        target = {
            "dense": sh.abstract_params(CFG, mesh_b),
            "quantized": sh.abstract_like(q.params, sh.param_shardings(CFG, mesh_b, q.params)),
        }
        back = ckptr.restore(tmp / "params", target)
    want = jax.tree.map(lambda s: s.sharding, target)
    same_shardings = all(a.sharding == b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)))
    return {"max_diff": max_diff(back, {"dense": fp.params, "quantized": q.params}), "shardings_ok": same_shardings,
            "wo_spec": str(back["quantized"]["layers"]["wo"].scale.sharding.spec)}  # fmt: skip


def check_loader(results: dict) -> dict:
    """The HF loader with a mesh: every tensor read once, params equal, already in their shardings."""
    from jaxkv.load.hf import params_from_hf_state_dict

    fp, _ = make_models(CFG)
    p = jax.tree.map(np.asarray, fp.params)
    names = {"self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
             "self_attn.o_proj.weight": "wo", "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
             "mlp.down_proj.weight": "w_down"}  # fmt: skip
    hf = {
        "model.embed_tokens.weight": p["embed"],
        "model.norm.weight": p["final_norm"],
        "lm_head.weight": p["lm_head"].T,
    }
    for i in range(CFG.num_layers):
        for suffix, name in names.items():
            hf[f"model.layers.{i}.{suffix}"] = p["layers"][name][i].T
        hf[f"model.layers.{i}.input_layernorm.weight"] = p["layers"]["attn_norm"][i]
        hf[f"model.layers.{i}.post_attention_layernorm.weight"] = p["layers"]["mlp_norm"][i]
    reads: dict[str, int] = {}

    class Counting(dict):
        def __getitem__(self, k):
            reads[k] = reads.get(k, 0) + 1
            return dict.__getitem__(self, k)

    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    loaded = params_from_hf_state_dict(CFG, Counting(hf), jnp.float32, mesh=mesh)
    want = sh.param_shardings(CFG, mesh)
    ok = all(a.sharding == b for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)))
    return {"max_diff": max_diff(loaded, fp.params), "shardings_ok": ok, "max_reads": max(reads.values()),
            "tensors": len(reads), "expected_tensors": len(hf)}  # fmt: skip


def main() -> None:
    t0 = time.perf_counter()
    results: dict = {"devices": jax.device_count()}
    guarded(results, "model_paths", lambda: check_model_paths(results))
    guarded(results, "indivisible", lambda: check_indivisible_heads(results))
    with tempfile.TemporaryDirectory() as tmp:
        guarded(results, "checkpoint_reshard", lambda: check_checkpoint_reshard(results, Path(tmp)))
    guarded(results, "loader", lambda: check_loader(results))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
