"""Decode speed of ``jaxkv.generate`` on a device mesh: ms per decode step for a shape preset with
random weights, on fake CPU devices (``--devices``) or the real ones.

    python scripts/mesh_decode_speed.py --mesh data=2 --devices 2 --out results/bench/cpu_mesh_decode

Medians of ``--repeats`` generate calls after a compiling one (prefill excluded). Writes ``OUT.json``
and ``OUT.md`` (one row per mesh).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--mesh", default="data=2", help="mesh specs separated by ';'")
    p.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: the real devices)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=480)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--label", default="", help="a note for the rows (e.g. the commit)")
    p.add_argument("--out", default="results/bench/mesh_decode")
    args = p.parse_args(argv)
    if args.devices and "XLA_FLAGS" not in os.environ:  # fake devices: set before jax starts
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
        return subprocess.run([sys.executable, *sys.argv], env=env).returncode

    import dataclasses

    import jax
    import numpy as np

    from jaxkv import sharding
    from jaxkv.bench import random_model
    from jaxkv.config import shape_config
    from jaxkv.generate import generate

    @dataclasses.dataclass
    class Model:
        cfg: object
        params: dict
        tokenizer: object = None

    cfg = shape_config(args.shape)
    model = Model(cfg, random_model(cfg, "bf16", 128))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt)).tolist()
    rows = []
    for spec in args.mesh.split(";"):
        mesh = sharding.make_mesh(spec)
        times = []
        for _ in range(args.repeats + 1):
            r = generate(model, None, prompts, max_new_tokens=args.new_tokens, stop_at_eos=False, mesh=mesh)
            times.append(r.decode_seconds / r.decode_steps * 1e3)
        row = {"mesh": spec, "ms_per_step": statistics.median(times[1:]), "runs_ms": times[1:]}
        rows.append(row)
        print(f"{spec}: {row['ms_per_step']:.1f} ms per decode step", flush=True)
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    meta["device"] = f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [
        f"{args.shape}, bf16 random weights, batch {args.batch}, {args.prompt}-token prompts, "
        f"{args.new_tokens} new tokens, {meta['device']} {args.label}",
        "",
        "| mesh | ms per decode step |",
        "|---|---|",
        *(f"| {r['mesh']} | {r['ms_per_step']:.1f} |" for r in rows),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
