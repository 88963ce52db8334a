#!/usr/bin/env python3
"""Two devices against one: tensor-parallel decode and data-parallel calibration, equality and timings.

Run on a host with 2 GPUs (one process sees both)::

    python scripts/gpu_sharding_check.py                 # Llama-shaped 1.3B random model
    python scripts/gpu_sharding_check.py --config tiny   # seconds; also on CPU with
        XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu

Prints one JSON object:

* ``decode``: greedy generation with mesh ``tensor=2`` over devices 0-1 against device 0 alone.
  ``float32`` (matmul precision "highest"): the generated tokens must be equal and the prefill
  logits close (the sharded matmuls sum in another order); ``bfloat16`` (``--dtype``): ms per decoded token (decode time / steps, after
  a warm-up run that compiles), prefill seconds, and weight bytes held per device.
* ``calibration``: IntactKV calibration (RTN W4 g128 student, [BOS] prefix) with mesh ``data=2``
  against one device: losses and trained prefix compared, calibration tokens per second (second run,
  compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv import sharding as sh
from jaxkv.calibrate import CalibConfig, calibrate
from jaxkv.config import ModelConfig
from jaxkv.generate import generate
from jaxkv.kvcache import init_cache
from jaxkv.model import forward
from jaxkv.params import init_params
from jaxkv.prefix import make_prefix, model_fingerprint
from jaxkv.quant import QuantRecipe, quantize_params

CONFIGS = {
    # Llama-shaped, ~1.3B parameters: big enough that decode is bound by weight reads.
    "1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                      num_kv_heads=4, head_dim=64, bos_token_id=1, eos_token_ids=(2,)),
    "tiny": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, bos_token_id=1, eos_token_ids=(2,)),
}  # fmt: skip


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: dict
    tokenizer: object = None
    recipe: object = None
    fingerprint: str | None = None


def random_model(cfg: ModelConfig, dtype) -> Model:
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    # Larger matrices: peaked next-token distributions, so greedy paths are not decided by ties.
    params = jax.tree.map(lambda x: (x * 3 if x.ndim == 3 else x).astype(dtype), params)
    return Model(cfg, params)


def bytes_per_device(tree) -> dict[str, int]:
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for s in leaf.addressable_shards:
            out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
    return out


def decode_run(model, mesh, prompts, new_tokens):
    if mesh is not None:
        model = dataclasses.replace(model, params=sh.shard_params(model.params, model.cfg, mesh))
    else:
        model = dataclasses.replace(model, params=jax.device_put(model.params, jax.devices()[0]))
    generate(model, None, prompts, max_new_tokens=new_tokens, mesh=mesh, stop_at_eos=False)  # compile
    res = generate(model, None, prompts, max_new_tokens=new_tokens, mesh=mesh, stop_at_eos=False)
    return res, {
        "ms_per_token": 1e3 * res.decode_seconds / max(res.decode_steps, 1),
        "prefill_seconds": res.prefill_seconds,
        "weight_bytes_per_device": bytes_per_device(model.params),
    }


def prefill_logits(model, mesh, prompts):
    T = max(len(p) for p in prompts)
    tokens = np.array([p + [0] * (T - len(p)) for p in prompts], np.int32)
    positions = np.array([list(range(len(p))) + [-1] * (T - len(p)) for p in prompts], np.int32)
    cache = init_cache(model.cfg, len(prompts), T, model.params["embed"].dtype)
    params = model.params
    if mesh is not None:
        params, cache = sh.shard_params(params, model.cfg, mesh), sh.shard_cache(cache, model.cfg, mesh)
        tokens, positions = sh.global_batch(tokens, mesh), sh.global_batch(positions, mesh)
    else:
        params, cache = jax.device_put((params, cache), jax.devices()[0])
    with sh.activate(mesh):
        logits, _ = jax.jit(forward, static_argnames="cfg")(params, tokens, positions, cache, model.cfg)
    return np.asarray(logits)


def check_decode(cfg, args, devices) -> dict:
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    mesh2 = sh.make_mesh("tensor=2", devices[:2])
    out: dict = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch}
    fp32 = random_model(cfg, jnp.float32)
    # "highest": float32 matmuls in float32 (GPUs default to TF32, whose rounding would swamp the
    # difference that sharding makes).
    with jax.default_matmul_precision("highest"):
        one, _ = decode_run(fp32, None, prompts, args.new_tokens)
        two, _ = decode_run(fp32, mesh2, prompts, args.new_tokens)
        a, b = prefill_logits(fp32, None, prompts), prefill_logits(fp32, mesh2, prompts)
    out["float32_tokens_equal"] = one.tokens == two.tokens
    out["float32_prefill_logits_max_abs_diff"] = float(np.max(np.abs(a - b)))
    out["float32_prefill_logits_max_abs"] = float(np.max(np.abs(a)))
    del fp32
    timed = random_model(cfg, jnp.dtype(args.dtype))
    _, out[f"{args.dtype}_1_device"] = decode_run(timed, None, prompts, args.new_tokens)
    _, out[f"{args.dtype}_tensor_2"] = decode_run(timed, mesh2, prompts, args.new_tokens)
    out["speedup"] = (
        out[f"{args.dtype}_1_device"]["ms_per_token"] / out[f"{args.dtype}_tensor_2"]["ms_per_token"]
    )
    return out


def check_calibration(cfg, args, devices) -> dict:
    fp = random_model(cfg, jnp.float32)
    q = Model(cfg, quantize_params(fp.params, cfg, QuantRecipe(bits=4, group=128 if cfg.hidden_size % 128 == 0 else 32)),
              recipe={"bits": 4}, fingerprint=model_fingerprint(fp))  # fmt: skip
    prefix = make_prefix(fp, [cfg.bos_token_id])
    windows = np.random.RandomState(1).randint(3, cfg.vocab_size, (args.calib_samples, args.seqlen - 1))
    calib = CalibConfig(samples=args.calib_samples, seqlen=args.seqlen, epochs=1, batch_size=args.calib_batch,
                        micro_batch=args.calib_micro)  # fmt: skip
    out: dict = {"samples": args.calib_samples, "seqlen": args.seqlen, "batch": args.calib_batch,
                 "micro_batch": args.calib_micro, "steps": calib.total_steps}  # fmt: skip
    results = {}
    for name, mesh in (("1_device", None), ("data_2", sh.make_mesh("data=2", devices[:2]))):
        if mesh is None:
            fp_m = dataclasses.replace(fp, params=jax.device_put(fp.params, devices[0]))
            q_m = dataclasses.replace(q, params=jax.device_put(q.params, devices[0]))
        else:
            fp_m, q_m = fp, q
        # Warm-up of two steps: on one device, step 0 (uncommitted fresh prefix) and step 1 (committed
        # output of step 0) compile apart.
        calibrate(fp_m, q_m, prefix, windows, calib, progress=False, mesh=mesh, stop_after=2)
        t0 = time.perf_counter()
        res = calibrate(fp_m, q_m, prefix, windows, calib, progress=False, mesh=mesh)
        wall = time.perf_counter() - t0
        results[name] = res
        out[name] = {"tokens_per_second": res.tokens_per_second, "seconds": res.seconds, "wall_seconds": wall}
    a, b = results["1_device"], results["data_2"]
    out["loss_max_rel_diff"] = float(np.max(np.abs(np.array(a.losses) - b.losses) / np.abs(a.losses)))
    out["prefix_max_abs_diff"] = float(
        max(
            np.max(np.abs(np.asarray(x) - sh.to_host(y)))
            for x, y in ((a.prefix.k, b.prefix.k), (a.prefix.v, b.prefix.v))
        )
    )
    out["speedup"] = out["data_2"]["tokens_per_second"] / out["1_device"]["tokens_per_second"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="1b")
    p.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="dtype of the timed decode"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-batch", type=int, default=16)
    p.add_argument("--calib-micro", type=int, default=4)
    p.add_argument("--skip", default="", help="comma-separated: decode, calibration")
    args = p.parse_args(argv)
    devices = jax.devices()
    if len(devices) < 2:
        print(json.dumps({"error": f"needs 2 devices, found {len(devices)}"}))
        return 2
    cfg = CONFIGS[args.config]
    report: dict = {
        "devices": [str(d) for d in devices[:2]],
        "device_kind": devices[0].device_kind,
        "jax": jax.__version__,
        "config": args.config,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))))),
    }  # fmt: skip
    skip = set(args.skip.split(","))
    if "decode" not in skip:
        report["decode"] = check_decode(cfg, args, devices)
    if "calibration" not in skip:
        report["calibration"] = check_calibration(cfg, args, devices)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
