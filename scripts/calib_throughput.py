"""IntactKV calibration throughput: tokens/s of :func:`jaxkv.calibrate` steps for a model shape.

A model of ``--shape`` (``jaxkv.config.SHAPES``) with random weights (bf16 by default), its RTN W4
g128 copy quantized on the device, a [BOS] prefix, random text windows; ``--steps`` optimiser steps
after one warm-up step (compilation excluded). Tokens/s counts the student's forward+backward tokens
(``batch_size x seqlen`` per step). Writes one JSON line to stdout (and ``--out`` if given).

    python scripts/calib_throughput.py --shape llama2-7b --seqlen 512 --batch-size 4 --micro-batch 1
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


@dataclasses.dataclass
class RandomModel:
    cfg: object
    params: dict
    tokenizer: object = None
    recipe: object = None
    fingerprint: str = "random"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from jaxkv.calibrate import CalibConfig, calibrate
    from jaxkv.config import shape_config
    from jaxkv.params import init_params
    from jaxkv.prefix import make_prefix
    from jaxkv.quant.qarray import quantize_tensor
    from jaxkv.quant.recipe import LINEARS

    cfg = shape_config(args.shape)
    dtype = getattr(jnp, args.dtype)
    params = jax.jit(lambda k: init_params(cfg, k, dtype))(jax.random.key(0))
    qfn = jax.jit(quantize_tensor, static_argnums=(1, 2))
    qlayers = {
        k: (qfn(v, args.wbits, args.group) if k in LINEARS else v) for k, v in params["layers"].items()
    }
    fp = RandomModel(cfg, params)
    q = RandomModel(cfg, {**params, "layers": qlayers})
    prefix = make_prefix(fp, "bos")
    n = args.batch_size * (args.steps + 1)
    windows = np.random.default_rng(0).integers(3, cfg.vocab_size, (n, args.seqlen - 1)).astype(np.int32)
    ccfg = CalibConfig(samples=n, seqlen=args.seqlen, epochs=1, batch_size=args.batch_size,
                       micro_batch=args.micro_batch, checkpoint_every=10**9)  # fmt: skip
    calibrate(fp, q, prefix, windows, ccfg, progress=False, stop_after=1)  # compile
    t0 = time.perf_counter()
    res = calibrate(fp, q, prefix, windows, ccfg, progress=False, stop_after=args.steps + 1)
    jax.block_until_ready(res.prefix.k)
    wall = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    out = {
        "shape": args.shape, "dtype": args.dtype, "wbits": args.wbits, "group": args.group,
        "seqlen": args.seqlen, "batch_size": args.batch_size, "micro_batch": args.micro_batch,
        "steps": len(res.losses), "tokens_per_second": res.tokens_per_second, "seconds": res.seconds,
        "wall_seconds_incl_first_step": wall,
        "peak_bytes": stats.get("peak_bytes_in_use"), "device": jax.devices()[0].device_kind,
    }  # fmt: skip
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
