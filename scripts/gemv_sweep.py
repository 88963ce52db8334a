"""Tiles of the int4 decode kernels (``jaxkv.kernels.qmatmul``), timed by GPU time per launch.

For each decode weight shape [I, O] (Llama-2-7B: fused Q/K/V, O, fused gate/up, down; ``--shapes``),
``--rows`` rows of bf16 ``x`` (the decode batch), group ``--group``: the bf16 matmul (what bf16 decode
reads) and the int4 kernel's default tile; at one row also a sweep of the one-row kernel's tiles
(block_n, sub_rows, split_k, warps), at several rows of the tensor-core kernel's (stages, split_k,
warps); and the default tile over the decode layout (``"oi"``: codes packed along the inputs,
``jaxkv.quant.qarray.to_layout``), labelled ``default oi``. Eight weight copies rotate (the L2
cannot hold them); everything runs once to compile, then ``--repeats`` times under a JAX profiler trace, and the time of each kernel launch is read off the
trace (device time, no launch gaps or host loop), so a row reports the kernel's own memory
efficiency. ``sum_us`` adds XLA's kernels around ours (the float32 partial-sum reduction of split
tiles, the tensor-core kernel's row padding). GB/s = bytes read (codes + scales + zeros, or bf16) /
time, beside the device's measured copy bandwidth. Each tile's output is checked against the float32
product of the dequantized weight. Writes ``OUT.json`` and ``OUT.md``.

    python scripts/gemv_sweep.py --out results/bench/gemv_sweep     # GPU, about two minutes
    python scripts/gemv_sweep.py --rows 8 --out results/bench/gemv_sweep_b8
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

from profile_decode import gpu_kernels, trace_file
from qmatmul_candidates import COPIES, SHAPES  # the decode weight shapes; weight copies that defeat the L2


def configs(
    I: int,
    O: int,
    group: int,
    rows: int = 1,
    sweep: bool = True,
    warps=(1, 4),
    per_thread=(16,),
    block_n=(128,),
):
    """(label, KernelConfig): the default tile, then (at one row) a sweep of the one-row kernel's
    tiles: ``block_n`` columns and ``warps`` per program, ``per_thread`` packed bytes per thread and
    sub-tile, splits of powers of two and one group per program."""
    from jaxkv.kernels import qmatmul as qk

    default = qk.default_config(I, O, group, rows, 4)
    yield "default", default
    if not sweep:
        return
    groups = I // group
    if rows != 1:  # the tensor-core kernel: stages, split, warps
        for ns, mult, nw in itertools.product((1, 3), (1, 2), (4, 8)):
            sk = default.split_k * mult
            if sk <= groups:
                yield "sweep", dataclasses.replace(default, num_stages=ns, split_k=sk, num_warps=nw)
        return
    for bn, pt, nw in itertools.product(block_n, per_thread, warps):
        sub_rows = 32 * nw * pt // bn  # packed bytes per thread and sub-tile: pt
        if O % bn or sub_rows < 1 or (group // 2) % sub_rows:
            continue
        for sk in sorted({2, 4, 8, 16, 32, 64, groups}):
            programs = O // bn * sk
            if sk > groups or not 512 <= programs <= 16384:  # run 63: fewer were all >= 1.2x the best
                continue
            yield "sweep", qk.KernelConfig(bn, sk, nw, 1, sub_rows)


def measure(
    I: int, O: int, group: int, repeats: int, rows: int = 1, sweep: bool = True, **tiles
) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.kernels import qmatmul as qk
    from jaxkv.quant.qarray import QArray, dequantize, pack, to_layout

    k1, k2, k3, k4 = jax.random.split(jax.random.key(I * 7 + O), 4)
    x = jax.random.normal(k1, (rows, I), jnp.bfloat16)
    codes = jax.random.randint(k2, (COPIES, I, O), 0, 16, jnp.int32)
    scale = (jax.random.uniform(k3, (COPIES, I // group, O), jnp.float32, 0.5, 1.5) * 0.02).astype(
        jnp.float16
    )
    zero = jax.random.randint(k4, (COPIES, I // group, O), 0, 16, jnp.int32).astype(jnp.uint8)
    stacked = QArray(pack(codes, 4), scale, zero, bits=4, group=group, dtype=np.dtype(jnp.bfloat16))
    del codes
    singles = [jax.tree.map(lambda a, i=i: a[i : i + 1], stacked) for i in range(COPIES)]
    qbytes = stacked.nbytes_storage() / COPIES
    ref = np.asarray(x.astype(jnp.float32) @ dequantize(stacked[0], jnp.float32), np.float64)

    def over_copies(fn):
        return jax.jit(lambda x, ws: [fn(x, w) for w in ws])

    cases = []  # (label, config, jitted fn, weights, bytes)
    wb = [dequantize(stacked[i], jnp.bfloat16) for i in range(COPIES)]
    cases.append(("bf16", None, over_copies(lambda x, w: x @ w), wb, I * O * 2))
    for label, cfg in configs(I, O, group, rows, sweep, **tiles):
        f = over_copies(
            lambda x, w, cfg=cfg: qk.qmatmul(
                x, w.packed, w.scale, w.zero, None, bits=4, group=group, config=cfg
            )
        )
        cases.append((label, cfg, f, singles, qbytes))
    oi = [to_layout(w, "oi") for w in singles]
    d = qk.default_config(I, O, group, rows, 4, "oi")
    f = over_copies(
        lambda x, w: qk.qmatmul(x, w.packed, w.scale, w.zero, None, bits=4, group=group, layout="oi")
    )
    cases.append(("default oi", d, f, oi, qbytes))
    ok = []
    for label, cfg, f, ws, nbytes in cases:  # compile and check outside the traces
        try:
            y = f(x, ws)[0]
        except Exception as e:  # a tile Triton cannot compile: skip it, say so
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
            continue
        err = float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))
        ok.append((label, cfg, f, ws, nbytes, err))

    def traced(group_cases):
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp):
                for _, _, f, ws, *_ in group_cases:
                    for _ in range(repeats):
                        jax.block_until_ready(f(x, ws))
            return gpu_kernels(trace_file(tmp))

    # bf16 alone in its trace (every launch is its own); the int4 tiles together, told apart by
    # counting their kernels (named qmatmul_*) in launch order.
    bf16 = [c for c in ok if c[0] == "bf16"]
    int4 = [c for c in ok if c[0] != "bf16"]
    launches = traced(bf16)
    names = collections.Counter(n for _, n, _ in launches)
    print(f"  bf16 kernels: {dict(names.most_common(4))}", file=sys.stderr)
    timings = [(sum(d for _, _, d in launches) / repeats / COPIES, 0.0)]
    launches = traced(int4)
    if not any("qmatmul" in n for _, n, _ in launches):
        raise RuntimeError(
            f"no qmatmul kernel in the trace: {collections.Counter(n for _, n, _ in launches)}"
        )
    timings += _split_by_case(launches, len(int4), repeats)
    table = []
    for (label, cfg, _, _, nbytes, err), (main_us, extra_us) in zip(bf16 + int4, timings, strict=True):
        table.append(
            {
                "I": I, "O": O, "rows": rows, "group": group, "candidate": label,
                "config": None if cfg is None else vars(cfg),
                "us": main_us, "sum_us": main_us + extra_us, "gbps": nbytes / main_us / 1e3,
                "gbps_with_sum": nbytes / (main_us + extra_us) / 1e3, "rel_err": err,
            }
        )  # fmt: skip
    return table


def _split_by_case(launches, n_cases: int, repeats: int) -> list[tuple[float, float]]:
    """Median microseconds per weight of each case's qmatmul kernel, and of the kernels that run
    after it (the split-K reduction): the trace lists the cases in order, ``repeats * COPIES``
    qmatmul launches each."""
    out = []
    i = 0
    for _ in range(n_cases):
        main, extra = [], collections.defaultdict(float)
        while i < len(launches) and (len(main) < repeats * COPIES or "qmatmul" not in launches[i][1]):
            _, name, dur = launches[i]
            i += 1
            if "qmatmul" in name:
                main.append(dur)
            else:
                extra[(len(main) - 1) // COPIES] += dur
        per_weight = [sum(main[r * COPIES : (r + 1) * COPIES]) / COPIES for r in range(repeats)]
        extras = [extra[r] / COPIES for r in range(repeats)]
        out.append((statistics.median(per_weight), statistics.median(extras)))
    return out


def markdown(table: list[dict], copy_gbps: float) -> str:
    lines = [
        f"Copy bandwidth {copy_gbps:.0f} GB/s (read + write). {table[0]['rows']} row(s) of x, int4 group "
        f"{table[0]['group']}.",
        "",
        "| I x O | candidate | us | GB/s (% of copy) | us with split sum | rel err | block_n | sub_rows | split_k | warps | kernel |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        c = r["config"] or {}
        one_row = r["rows"] == 1 and not r["candidate"].endswith(" oi")
        kind = "" if not c else "one-row (FMA)" if one_row else "tensor cores"
        kind += f", {c['num_stages']} stages" if c and not one_row else ""
        lines.append(
            f"| {r['I']}x{r['O']} | {r['candidate']} | {r['us']:.1f} | {r['gbps']:.0f} "
            f"({100 * r['gbps'] / copy_gbps:.0f}%) | {r['sum_us']:.1f} | {r['rel_err']:.1e} | "
            f"{c.get('block_n', '')} | {c.get('sub_rows', '')} | {c.get('split_k', '')} | {c.get('num_warps', '')} | "
            f"{kind} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama2-7b")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--default-only", action="store_true", help="the default tiles only (no sweep)")
    p.add_argument("--rows", type=int, default=1, help="rows of x (the decode batch)")
    p.add_argument("--warps", default="1,4", help="one-row sweep: warps per program")
    p.add_argument("--per-thread", default="16", help="one-row sweep: packed bytes per thread and sub-tile")
    p.add_argument("--block-n", default="128", help="one-row sweep: output columns per program")
    p.add_argument("--out", default="results/bench/gemv_sweep")
    args = p.parse_args(argv)

    from jaxkv.bench import copy_bandwidth

    copy_gbps = copy_bandwidth()
    tiles = {k: tuple(map(int, getattr(args, k).split(","))) for k in ("warps", "per_thread", "block_n")}
    table, every = [], []
    for name in args.shapes.split(","):
        for I, O in SHAPES[name]:
            shape_rows = measure(I, O, args.group, args.repeats, args.rows, not args.default_only, **tiles)
            every += shape_rows
            best = min((r for r in shape_rows if r["candidate"] != "bf16"), key=lambda r: r["sum_us"])
            shown = [r for r in shape_rows if r["candidate"] != "sweep"] + [{**best, "candidate": "best"}]
            table += shown
            print(markdown(shown, copy_gbps), flush=True)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(
                json.dumps({"copy_gbps": copy_gbps, "rows": table, "all": every}, indent=1)
            )
    Path(args.out).with_suffix(".md").write_text(markdown(table, copy_gbps))
    print(markdown(table, copy_gbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
