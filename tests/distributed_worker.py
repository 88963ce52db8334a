"""One process of a multi-host run on localhost (CPU backend); run by ``tests/test_distributed.py``.

``python tests/distributed_worker.py --num-processes N --process-id I --port PORT --out DIR``: joins
the JAX distributed runtime at 127.0.0.1:PORT (N > 1), builds the tiny models of
``tests/sharding_worker.py`` (every process builds the same ones from the same seed), runs two IntactKV
calibration steps with Orbax checkpoints, resumes from the checkpoint (a multi-host restore), evaluates
perplexity with and without the calibrated prefix, generates, and writes ``DIR/result-I.json``. With N = 1 it runs the single-process, unsharded reference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxkv import distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mesh", default="data=2,tensor=2")
    distributed.add_distributed_args(parser)
    args = parser.parse_args()
    t0 = time.perf_counter()
    multi = (args.num_processes or 1) > 1
    if multi:
        args.coordinator = f"127.0.0.1:{args.port}"
    else:
        args.distributed = "off"
    info = distributed.initialize_from_args(args)

    import numpy as np
    from sharding_worker import CFG, make_models

    from jaxkv import sharding as sh
    from jaxkv.calibrate import CalibConfig, calibrate
    from jaxkv.checkpoint import restore_prefix, save_prefix
    from jaxkv.evaluate import make_windows, perplexity
    from jaxkv.generate import generate
    from jaxkv.model import KVForward
    from jaxkv.prefix import make_prefix

    fp, q = make_models(CFG)
    cfg = fp.cfg
    prefix = make_prefix(fp, [1])
    mesh = sh.make_mesh(args.mesh) if multi else None
    distributed.log(f"[process 0 of {info.num_processes}] mesh {sh.describe_mesh(mesh)}")

    rng = np.random.RandomState(1)
    windows = rng.randint(3, cfg.vocab_size, (8, 9)).astype(np.int32)
    calib = CalibConfig(samples=8, seqlen=10, epochs=1, batch_size=4, micro_batch=2, checkpoint_every=1)
    ckpt = Path(args.out) / "calib"
    res = calibrate(fp, q, prefix, windows, calib, progress=False, mesh=mesh, checkpoint_dir=ckpt)
    resumed = calibrate(
        fp, q, prefix, windows, calib, progress=False, mesh=mesh, checkpoint_dir=ckpt, resume=True
    )
    k, v = sh.to_host(res.prefix.k), sh.to_host(res.prefix.v)
    # the prefix checkpoint: every process saves its shards, process 0 the metadata; all read it back
    save_prefix(Path(args.out) / "prefix", res.prefix, q)
    restored = restore_prefix(Path(args.out) / "prefix", q)

    text = rng.randint(3, cfg.vocab_size, 200)
    ppl_windows = make_windows(text, cfg.bos_token_id, 10, 6)
    plain = perplexity(fp.params, cfg, ppl_windows, batch_size=2, progress=False, mesh=mesh)
    placed = (
        sh.shard_params(q.params, cfg, mesh),
        res.prefix.k,
        res.prefix.v,
    )  # the prefix is already global
    prefixed = perplexity(placed, None, ppl_windows, batch_size=2, forward_fn=KVForward(cfg, intact=True), progress=False, mesh=mesh)  # fmt: skip

    # generate: batch over data (across the processes), heads over tensor; tokens gathered to every process
    gen = generate(q, res.prefix, [[5, 9, 11], [7, 3]], max_new_tokens=5, stop_at_eos=False, mesh=mesh)

    out = {
        "generated": gen.tokens,
        "process_id": info.process_id,
        "num_processes": info.num_processes,
        "global_devices": info.global_devices,
        "mesh": sh.describe_mesh(mesh),
        "losses": res.losses,
        "initial_loss": res.initial_loss,
        "k": k.tolist(),
        "v": v.tolist(),
        "k_change": float(np.max(np.abs(k - np.asarray(prefix.k)))),
        "restored_prefix_equal": bool(
            np.array_equal(np.asarray(restored.k), k) and np.array_equal(np.asarray(restored.v), v)
        ),
        "resumed_steps": len(resumed.losses),
        "resumed_k_equal": bool(np.array_equal(sh.to_host(resumed.prefix.k), k)),
        "ppl": plain.ppl,
        "nll_sum": plain.nll_sum,
        "ppl_prefixed": prefixed.ppl,
        "tokens": plain.tokens,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (Path(args.out) / f"result-{info.process_id}.json").write_text(json.dumps(out))
    distributed.barrier("done")
    distributed.shutdown()


if __name__ == "__main__":
    main()
