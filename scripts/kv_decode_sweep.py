"""Decode attention of one layer over a long quantized KV cache, timed by GPU time per call.

One Llama-2-7B-shaped layer (``--batch`` sequences, ``--slots`` cache slots, 32 KV heads of 128
channels, one query head per KV head) with per-channel keys and per-token values (``--kv``, e.g.
K4V2 at group 32): the attention of one query per sequence over the whole body, by

* ``bf16``        XLA over a bf16 cache of the same shape (what a bf16-KV decode step reads),
* ``xla``         XLA over the packed body (``kvattention.body_scores`` / ``body_values``,
                  ``JAXKV_KV_DECODE=xla``, the model's default off a GPU),
* ``kernel``      the tensor-core Pallas kernel (``jaxkv.kernels.kvdecode``) and the softmax merge of its
                  per-chunk partials, swept over programs per sequence and KV head, slots per loop
                  step, warps and pipeline stages;
* ``step-xla``    one whole decode step of the layer's attention as the model runs it
  ``step-kernel`` (``kvattention.attend_cached``, cache donated): the new token written into the body
                  and the window rings, then read with the body, the key window and a pivot token;
                  through XLA (``impl="folded"``) and through the kernels (``impl="kernel"``: append,
                  the decode kernel with its window program, merge). The token does not complete a key
                  group (31 steps in 32 do not). ``step-kernel`` is checked against ``step-xla``.
* ``fp``          the unquantized-cache decode kernel (``jaxkv.kernels.fpdecode``) over the bf16 cache
                  with one pivot token, the token written at the last slot (cache donated), swept over
                  chunks per sequence and KV head, slots per tile and warps (``--fp-tiles``); checked
                  against float32 XLA of the same attention.

Each candidate runs once to compile, then ``--repeats`` times under its own JAX profiler trace; the
time of a call is the GPU time of all its kernels (no launch gaps). GB/s = cache bytes read / time,
beside the device's copy bandwidth. Outputs are checked against the ``xla`` candidate (relative
error). Writes ``OUT.json`` (with each candidate's GPU time per kernel) and ``OUT.md``.

    python scripts/kv_decode_sweep.py --out results/bench/kv_decode_sweep      # GPU, about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

from kernel_profile import body_attention, random_side
from profile_decode import gpu_kernels, trace_file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--slots", type=int, default=4352)
    p.add_argument("--kv", default="K4V2")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--tiles",
        default="2:128:2:3,1:128:2:3,4:128:2:3,8:128:2:3,2:64:2:3,2:256:2:3,2:128:1:3,2:128:4:3,2:128:2:2,2:128:2:4",
        help="kernel tiles to time, chunks:sub_slots:num_warps:num_stages, comma-separated",
    )
    p.add_argument(
        "--fp-tiles",
        default="1:64:4,1:32:4,1:128:4,1:64:2,1:64:8,2:64:4,4:64:4,8:64:4",
        help="unquantized-cache kernel tiles to time, chunks:tile:num_warps, comma-separated",
    )
    p.add_argument(
        "--candidates",
        default="bf16,xla,step-xla,step-kernel,kernel,fp",
        help="which candidates to time, comma-separated (step-kernel is checked against step-xla, which runs regardless)",
    )
    p.add_argument("--out", default="results/bench/kv_decode_sweep")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.bench import copy_bandwidth, parse_kv
    from jaxkv.config import ModelConfig
    from jaxkv.kernels import fpdecode, kvdecode
    from jaxkv.kvattention import attend_cached, body_scores, body_values
    from jaxkv.kvcache import side_specs

    kv = parse_kv(args.kv)
    kspec, vspec = side_specs(kv, kv.kbits, kv.vbits)
    B, S, K, G, H, g = args.batch, args.slots, 32, 1, 128, kv.group
    J, C = S // g, H // g
    keys = jax.random.split(jax.random.key(0), 8)
    q = jax.random.normal(keys[0], (B, 1, K, G, H), jnp.bfloat16)

    kside = random_side(keys[1], kspec, (B, K, S, H), (B, K, J, H))
    vside = random_side(keys[2], vspec, (B, K, S, H), (B, K, S, C))
    kb = jax.random.normal(keys[3], (B, S, K, H), jnp.bfloat16)
    vb = jax.random.normal(keys[4], (B, S, K, H), jnp.bfloat16)
    scale = 1.0 / np.sqrt(H)

    def bf16(q, kb, vb):
        s = jnp.einsum("BTKGH,BSKH->BTKGS", q, kb, preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("BTKGS,BSKH->BTKGH", p.astype(q.dtype), vb, preferred_element_type=jnp.float32)

    def xla(q, ks, vs):
        p = jax.nn.softmax(body_scores(q, ks) * scale, axis=-1)
        return body_values(p, vs, q.dtype)

    # The whole step: the cache with its rings, state carried from call to call (donated, updated in place)
    cfg = ModelConfig(vocab_size=8, hidden_size=K * H, intermediate_size=8, num_layers=1, num_heads=K * G,
                      num_kv_heads=K, head_dim=H)  # fmt: skip

    def ring(key, spec):
        return jax.random.normal(key, (B, spec.window, K, H), jnp.bfloat16) if spec.window else None

    n_old = jnp.full((B,), S - g + 3, jnp.int32)  # a slot inside a key group (none completes)
    pivot = jax.random.normal(keys[6], (2, 1, K, H), jnp.bfloat16)  # one pivot token
    knew, vnew = jax.random.normal(keys[7], (2, B, 1, K, H), jnp.bfloat16)

    def step(impl):
        state = [kside.replace(window=ring(keys[5], kspec)), vside.replace(window=ring(keys[4], vspec))]
        state = jax.tree.map(jnp.copy, state)  # this candidate's own buffers
        fn = jax.jit(partial(attend_cached, cfg=cfg, kv=kv, impl=impl), donate_argnums=(5, 6))

        def f(q):
            out, state[0], state[1] = fn(
                q.reshape(B, 1, K * G, H), knew, vnew, pivot[0], pivot[1], *state, 1 + n_old[:, None], n_old, n_old + 1,
                n_old[:, None],
            )  # fmt: skip
            return out.reshape(q.shape)

        return f

    # The unquantized-cache kernel: one pivot token, the new token at the last slot (every slot read)
    heads = kvdecode.step_heads(q.reshape(B, 1, K * G, H), knew, vnew)
    fp_positions = jnp.full((B,), S, jnp.int32)  # pivot length 1: body slot S - 1

    def fp_reference(heads):
        keys = jnp.concatenate([jnp.broadcast_to(pivot[0][None], (B, 1, K, H)), kb[:, :-1], knew], axis=1)
        values = jnp.concatenate([jnp.broadcast_to(pivot[1][None], (B, 1, K, H)), vb[:, :-1], vnew], axis=1)
        qh = heads[:, : K * G].reshape(B, K, G, H).astype(jnp.float32)
        s = jnp.einsum("BKGH,BSKH->BKGS", qh, keys.astype(jnp.float32)) * scale
        return jnp.einsum("BKGS,BSKH->BKGH", jax.nn.softmax(s, axis=-1), values.astype(jnp.float32))

    def fp_step(chunks, tile, warps):
        state = [jnp.copy(kb), jnp.copy(vb)]  # this candidate's own buffers, updated in place
        fn = jax.jit(
            partial(
                fpdecode.attend, sm_scale=float(scale), dtype=jnp.bfloat16, chunks=chunks, tile=tile,
                num_warps=warps, interpret=jax.default_backend() != "gpu",
            ),
            donate_argnums=(4, 5),
        )  # fmt: skip

        def f(heads):
            out, state[0], state[1] = fn(heads, fp_positions, pivot[0], pivot[1], *state)
            return out

        return f

    qbytes = sum(a.nbytes for a in jax.tree.leaves((kside, vside)))
    cases = [("bf16", None, jax.jit(bf16), (q, kb, vb), kb.nbytes + vb.nbytes)]
    cases.append(("xla", None, jax.jit(xla), (q, kside, vside), qbytes))
    steps = {impl: step(impl) for impl in ("folded", "kernel")}
    cases.append(("step-xla", None, steps["folded"], (q,), qbytes))
    cases.append(("step-kernel", None, steps["kernel"], (q,), qbytes))
    tiles = [tuple(int(v) for v in t.split(":")) for t in args.tiles.split(",")]
    for chunks, sub, nw, ns in tiles:
        f = jax.jit(
            lambda q, ks, vs, c=chunks, s=sub, w=nw, n=ns: body_attention(
                q, ks, vs, S, g, scale, chunks=c, sub_slots=s, num_warps=w, num_stages=n
            )
        )
        cfg = {"chunks": chunks, "sub_slots": sub, "num_warps": nw, "num_stages": ns}
        cases.append(("kernel", cfg, f, (q, kside, vside), qbytes))

    for t in args.fp_tiles.split(","):
        chunks, tile, nw = (int(v) for v in t.split(":"))
        cfg = {"chunks": chunks, "tile": tile, "num_warps": nw}
        cases.append(("fp", cfg, fp_step(chunks, tile, nw), (heads,), kb.nbytes + vb.nbytes))

    wanted = set(args.candidates.split(","))
    cases = [case for case in cases if case[0] in wanted]
    ref = np.asarray(jax.jit(xla)(q, kside, vside), np.float64)
    step_ref = np.asarray(steps["folded"](q), np.float64)  # rewrites the same token: calls stay equal
    fp_ref = np.asarray(jax.jit(fp_reference)(heads), np.float64)
    copy_gbps = copy_bandwidth()
    table = []
    for name, cfg, f, fargs, nbytes in cases:
        try:
            y = np.asarray(f(*fargs), np.float64)
        except Exception as e:  # a tile Triton cannot compile: skip it, say so
            print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        want = step_ref if name.startswith("step") else fp_ref if name == "fp" else ref
        err = None if name == "bf16" else float(np.linalg.norm(y - want) / np.linalg.norm(want))
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp):
                for _ in range(args.repeats):
                    jax.block_until_ready(f(*fargs))
            launches = gpu_kernels(trace_file(tmp))
        kernels = {}  # GPU time per call of each kernel name
        for _, kname, d in launches:
            kernels[kname] = kernels.get(kname, 0.0) + d / args.repeats
        us = sum(kernels.values())
        gbps = nbytes / us / 1e3 if us else 0.0  # no GPU kernels off the GPU
        row = {"candidate": name, "config": cfg, "us": us, "gbps": gbps, "rel_err": err, "kernels": kernels}
        table.append(row)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in kernels.items())
        print(f"  {name} {cfg or ''}: {us:.1f} us ({parts}), {gbps:.0f} GB/s, err {err}", file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"batch": B, "slots": S, "kv": args.kv, "kv_heads": K, "head_dim": H, "copy_gbps": copy_gbps}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": table}, indent=1))
    best = min((r for r in table if r["candidate"] == "kernel"), key=lambda r: r["us"], default=None)
    best_fp = min((r for r in table if r["candidate"] == "fp"), key=lambda r: r["us"], default=None)
    lines = [
        f"One layer, batch {B}, {S} slots, 32 KV heads x 128, {args.kv}; copy bandwidth {copy_gbps:.0f} GB/s.",
        "",
        "| candidate | config | us | GB/s (% of copy) | rel err vs xla (step-kernel: vs step-xla; fp: vs float32) |",
        "|---|---|---|---|---|",
    ]
    default = {
        "chunks": kvdecode.chunks(B, K, S, kvdecode.gpu_cores()),
        "sub_slots": kvdecode.SUB_SLOTS,
        "num_warps": kvdecode.NUM_WARPS,
        "num_stages": kvdecode.NUM_STAGES,
    }
    fp_default = {"chunks": 1, "tile": fpdecode.TILE, "num_warps": fpdecode.NUM_WARPS}
    for r in table:
        if (
            r["candidate"] not in ("kernel", "fp")
            or r is best
            or r["config"] in (default, fp_default)
            or r is best_fp
        ):
            err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
            lines.append(
                f"| {r['candidate']} | {r['config'] or ''} | {r['us']:.1f} | {r['gbps']:.0f} "
                f"({100 * r['gbps'] / copy_gbps:.0f}%) | {err} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
