"""Tiles of the decode step's split-K epilogues (``jaxkv.kernels.epilogue``) against the XLA ops
they replace, timed by GPU time per call.

Llama-2-7B at batch 1 (one row): the fused Q/K/V matmul's 32 splits of 12288 columns (``qkv_rope``),
the O projection's 32 and the down projection's 86 splits of 4096 (``residual_norm``), the fused
gate/up's 32 splits of 22016 (``silu_mul``), float32 partials as the one-row kernel leaves them.
Each tile (output columns per program, warps) and the XLA version of the same step (what the model
ran before the epilogues: the split sum with the norm's ``1/rms``, then RoPE and the concatenation
of the heads; the residual add, then the next norm's sum of squares with ``norm_weight * x``; the
split sum, then SiLU(gate) * up) is checked against float32 numpy and run ``--repeats`` times under
one JAX profiler trace, the cases apart by host pauses; a row is the median GPU time of one call
(all of its kernels), so launch gaps and the host loop do not count. Writes ``OUT.json`` and
``OUT.md``.

    python scripts/epilogue_sweep.py --out results/bench/epilogue_sweep    # GPU, under a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from profile_decode import gpu_kernels, trace_file

N, K, H, D, F, EPS = 32, 32, 128, 4096, 11008, 1e-5  # Llama-2-7B
PAUSE_S = 0.02  # between cases: a gap in the GPU timeline that no call has


def cases(columns, warps):
    """(name, tile, jitted fn, args, float32 numpy reference of its first output)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.config import ModelConfig
    from jaxkv.kernels import epilogue
    from jaxkv.model import apply_rope, rope_inv_freq

    rng = np.random.default_rng(0)
    cfg = ModelConfig(vocab_size=8, hidden_size=D, intermediate_size=F, num_layers=1, num_heads=N,
                      num_kv_heads=K, head_dim=H)  # fmt: skip
    inv_freq = rope_inv_freq(cfg)
    x = rng.standard_normal((1, D)).astype(np.float32)
    sumsq = jnp.asarray((x**2).sum(axis=1)[None])  # [1, 1]
    r = 1 / np.sqrt((x**2).mean() + EPS)
    pos = jnp.asarray([700], jnp.int32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.bfloat16)
    xb = jnp.asarray(x, jnp.bfloat16)
    out = []

    # Q/K/V: 32 splits of (N + 2K) H columns
    p = rng.standard_normal((32, 1, (N + 2 * K) * H)).astype(np.float32)
    y = (p.sum(0) * r).reshape(N + 2 * K, H)
    ang = 700.0 * inv_freq
    y1, y2 = y[:, : H // 2], y[:, H // 2 :]
    rot = np.concatenate([y1 * np.cos(ang) - y2 * np.sin(ang), y2 * np.cos(ang) + y1 * np.sin(ang)], -1)
    ref = np.concatenate([rot[: N + K], y[N + K :]])[None]

    def xla_qkv(p, sumsq, pos):
        qkv = (jnp.sum(p, 0) * jax.lax.rsqrt(sumsq[0] / D + EPS)[:, None]).astype(jnp.bfloat16)
        q, k, v = jnp.split(qkv.reshape(1, 1, N + 2 * K, H), [N, N + K], axis=2)
        q, k = apply_rope(q, pos[None], inv_freq), apply_rope(k, pos[None], inv_freq)
        return jnp.concatenate([q[:, 0], k[:, 0], v[:, 0]], axis=1)

    args = (jnp.asarray(p), sumsq, pos)
    out.append(("qkv_rope", "xla", jax.jit(xla_qkv), args, ref))
    for wp in warps:
        fn = jax.jit(lambda p, s, pos, wp=wp: epilogue.qkv_rope(
            p, s, pos, jnp.asarray(inv_freq), None, heads=N, kv_heads=K, head_dim=H, hidden=D, eps=EPS,
            dtype=jnp.bfloat16, warps=wp))  # fmt: skip
        out.append(("qkv_rope", f"{wp} warps", fn, args, ref))

    # residual add + the next norm's inputs: O (32 splits) and down (86 splits)
    def xla_residual(x, p, w):
        x = x + jnp.sum(p[:, 0], 0).astype(x.dtype)[None]
        x32 = x.astype(jnp.float32)
        return x, w * x, jnp.sum(x32 * x32, axis=-1)[None]

    for name, splits in (("residual_norm O", 32), ("residual_norm down", 86)):
        p = rng.standard_normal((splits, 1, D)).astype(np.float32)
        ref = np.asarray(xb, np.float32) + p.sum(0)
        args = (xb, jnp.asarray(p), w)
        out.append((name, "xla", jax.jit(xla_residual), args, ref))
        for c in columns:
            for wp in warps:
                fn = jax.jit(lambda x, p, w, c=c, wp=wp: epilogue.residual_norm(x, p, w, columns=c, warps=wp))
                out.append((name, f"{c} columns, {wp} warps", fn, args, ref))

    # gate/up: 32 splits of 2F columns
    p = rng.standard_normal((32, 1, 2 * F)).astype(np.float32)
    g = p.sum(0) * r
    ref = g[:, :F] / (1 + np.exp(-g[:, :F])) * g[:, F:]

    def xla_silu(p, sumsq):
        gu = (jnp.sum(p[:, 0], 0)[None] * jax.lax.rsqrt(sumsq[0] / D + EPS)[:, None]).astype(jnp.bfloat16)
        gate, up = jnp.split(gu, 2, axis=-1)
        return jax.nn.silu(gate) * up

    args = (jnp.asarray(p), sumsq)
    out.append(("silu_mul", "xla", jax.jit(xla_silu), args, ref))
    for c in columns:
        for wp in warps:
            fn = jax.jit(lambda p, s, c=c, wp=wp: epilogue.silu_mul(
                p, s, hidden=D, eps=EPS, dtype=jnp.bfloat16, columns=c, warps=wp))  # fmt: skip
            out.append(("silu_mul", f"{c} columns, {wp} warps", fn, args, ref))
    return out


def per_call(kernels, n_cases: int, repeats: int) -> list[tuple[float, int]]:
    """(median GPU microseconds of one call, launches per call) of each case, from the trace's
    ``(start, name, us)`` kernels: cases lie apart by the host's pauses (gaps over half of
    ``PAUSE_S``), a case's calls follow one another ``repeats`` times. Groups before the cases
    (the profiler's own launches) are dropped."""
    groups, last = [], None
    for start, _, dur in kernels:
        if last is None or start - last > PAUSE_S * 1e6 / 2:
            groups.append([])
        groups[-1].append(dur)
        last = start + dur
    groups = [g for g in groups if len(g) >= repeats][-n_cases:]
    if len(groups) != n_cases or any(len(g) % repeats for g in groups):
        raise RuntimeError(f"{[len(g) for g in groups]} kernels in the trace's groups for {n_cases} cases")
    out = []
    for g in groups:
        n = len(g) // repeats
        out.append((statistics.median(sum(g[i * n : (i + 1) * n]) for i in range(repeats)), n))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--columns", default="32,64,128", help="output columns per program to sweep")
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="results/bench/epilogue_sweep")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    table = cases([int(c) for c in args.columns.split(",")], [int(w) for w in args.warps.split(",")])
    checked = []
    for name, tile, fn, fargs, ref in table:  # compile and check outside the trace
        try:
            first = jax.tree.leaves(fn(*fargs))[0]
        except Exception as e:  # a tile Triton cannot compile: skip it, say so
            print(f"  {name} {tile}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
            continue
        got = np.asarray(first, np.float64).reshape(ref.shape)
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        checked.append((name, tile, fn, fargs, err))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _, _, fn, fargs, _ in checked:
                time.sleep(PAUSE_S)
                for _ in range(args.repeats):
                    jax.block_until_ready(fn(*fargs))
        kernels = gpu_kernels(trace_file(tmp))
    rows = []
    for (name, tile, _, _, err), (us, launches) in zip(
        checked, per_call(kernels, len(checked), args.repeats), strict=True
    ):
        rows.append({"step": name, "tile": tile, "us": us, "launches": launches, "rel_err": err})
    dev = jax.devices()[0].device_kind
    lines = [
        f"# Split-K epilogues at Llama-2-7B batch 1 on {dev}",
        "",
        f"GPU time per call (all its launches), median of {args.repeats}; rel err against float32 numpy.",
        "",
        "| step | tile | us | launches | rel err |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['step']} | {r['tile']} | {r['us']:.2f} | {r['launches']} | {r['rel_err']:.1e} |" for r in rows
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"device": dev, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
