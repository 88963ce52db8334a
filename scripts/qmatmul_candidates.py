"""Candidates for the decode-time weight-only int4/int8 matmul, timed on one GPU side by side.

For each weight shape [I, O] (Llama-2-7B and Llama-3-8B with Q/K/V and gate/up fused) and rows M:

* ``bf16``          x @ w, eight separate bf16 weights (the baseline: what bf16 decode reads)
* ``bf16-stacked``  x @ w[i] with w stacked [8, I, O] and i traced (what a scan over layers does)
* ``xla-pergroup``  jaxkv's portable path: per-group product, scales after (``JAXKV_QMATMUL=xla``)
* ``xla-dequant``   dequantize to bf16, then one matmul
* ``xla-*-subchannel``  the two XLA paths with ``--xla_gpu_experimental_enable_subchannel_dequantisation_fusion``
* ``pallas-2d``     ``jaxkv.kernels.qmatmul`` on eight separate 2-D weights (no layer offset)
* ``pallas``        ``jaxkv.kernels.qmatmul`` reading layer i of a stacked [8, ...] QArray in place,
                    swept over tiles (block_n, split_k, warps, stages); the best tile is reported
* ``tokamax-<impl>`` (``--tokamax mosaic``) tokamax's quantized ``ragged_dot`` with one group (a dense
                    matmul): on an H100 its Mosaic GPU kernel (warp-specialised wgmma, the weight
                    dequantized in shared memory). tokamax's kernels take symmetric codes only (a
                    scale, no zero point), so it gets its own qwix quantization of the same bf16
                    weight, ``[1, I, O]`` int4/int8 with one scale per ``group`` inputs and column;
                    its error is against that quantization. Not a jaxkv dependency: ``pip install
                    tokamax`` (pulls qwix), or on the device machine carried wheels (tokamax, qwix,
                    einshape, immutabledict, tensorboardx, typeguard==2.13.3, jaxtyping,
                    wadler_lindig). ``--tokamax xla`` runs the same candidate through tokamax's XLA
                    reference (any backend: checks the wiring, times nothing of interest).
                    tokamax 0.0.12 (the newest on PyPI) uses Mosaic GPU names that JAX 0.11.2 no
                    longer has (``out_shape``, ``scratch_shapes``, ``untile_ref``; H100 runs 62-67),
                    so its Mosaic GPU kernel runs only with an older JAX.

* ``mosaic-own``     (``--mosaic-own``, 4-bit rows up to 16) ``jaxkv.kernels.mgpu_gemv``, a Mosaic GPU
                    kernel of our own (TMA pipeline into wgmma, the weight on the left), best split
* ``mosaic-mixed-int8-noscale`` (``--mosaic-mixed``, 8-bit rows) JAX's own Mosaic GPU mixed-type
                    matmul with the weight on the left (TMA pipeline, warp-specialised wgmma), int8
                    codes without scales: an upper bound on such a kernel's read rate at decode
                    shapes, for deciding whether a Mosaic GPU kernel of jaxkv's own is worth it.

Eight weight copies rotate so the 50 MB L2 cannot hold them; each timing is the median of repeats
of ten calls queued back to back of a jitted loop over all eight, after a warm-up, divided by the
calls and copies. That wall-clock time is about twice the kernels' own (H100, run 61: bf16 gate/up
82 us a copy here, 60 us per layer in the model's profile), so ``--gpu-time`` reports instead the
GPU kernels' time in a profiler trace of ten calls (every kernel of the call: the matmul and the
ops around it, no launch gaps), what ``scripts/profile_decode.py`` measures in the model. GB/s =
weight bytes read (codes + scales + zeros for quantized) / time. Each kernel's output is checked against the dequantized bf16 product
(relative Frobenius error). Writes ``OUT.json`` and ``OUT.md``.

    python scripts/qmatmul_candidates.py --out results/qmatmul_h100          # GPU, a few minutes
    python scripts/qmatmul_candidates.py --shapes llama2-7b --rows 1,8 --bits 4 --sweep-rows "" \
        --no-xla --tokamax mosaic --mosaic-own --out results/bench/tokamax  # + tokamax, Mosaic GPU
    python scripts/qmatmul_candidates.py --shapes llama2-7b --rows 1,8 --bits 8 --sweep-rows "" \
        --no-xla --mosaic-mixed --out results/bench/mosaic_mixed            # + Mosaic GPU, int8
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "llama2-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "llama3-8b": [(4096, 6144), (4096, 28672), (14336, 4096)],
}
COPIES = 8


GPU_TIME = False  # --gpu-time: _time reports the GPU kernels' time from a profiler trace


def _time(f, *args, repeats=5, calls=10) -> float:
    """Median over ``repeats`` of the time per call of ``calls`` calls queued back to back, so the
    host's dispatch and the final synchronisation are spread over many calls; with ``GPU_TIME`` the
    GPU kernels' time per call instead (:func:`_gpu_time`)."""
    import jax

    if GPU_TIME:
        return _gpu_time(f, args, calls)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / calls)
    return statistics.median(ts)


def _gpu_time(f, args, calls: int) -> float:
    """Seconds per call that the GPU spends in kernels over ``calls`` calls of ``f`` under the JAX
    profiler (after a warm-up call)."""
    import jax
    from profile_decode import gpu_kernels, trace_file

    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
        kernels = gpu_kernels(trace_file(d))
    if not kernels:
        raise RuntimeError("no GPU kernels in the profiler trace: --gpu-time needs a GPU")
    return sum(dur for _, _, dur in kernels) / calls * 1e-6


def measure(
    I: int,
    O: int,
    M: int,
    bits: int,
    group: int,
    sweep: bool,
    xla_only: bool,
    tokamax: str | None = None,
    xla: bool = True,
    mosaic_mixed: bool = False,
    mosaic_own: bool = False,
) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.kernels import qmatmul as qk
    from jaxkv.quant.qarray import QArray, dequantize, matmul, pack

    key = jax.random.key(I * 7 + O)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (M, I), jnp.bfloat16)
    codes = jax.random.randint(k2, (COPIES, I, O), 0, 2**bits, jnp.int32)
    scale = (jax.random.uniform(k3, (COPIES, I // group, O), jnp.float32, 0.5, 1.5) * 0.02).astype(
        jnp.float16
    )
    zero = jax.random.randint(k4, (COPIES, I // group, O), 0, 2**bits, jnp.int32).astype(jnp.uint8)
    stacked = QArray(pack(codes, bits), scale, zero, bits=bits, group=group, dtype=np.dtype(jnp.bfloat16))
    own = None
    if mosaic_own and bits == 4 and M <= 16 and not xla_only:
        from jaxkv.kernels import mgpu_gemv

        own = [mgpu_gemv.pack_weight(codes[i].astype(jnp.uint8), scale[i], zero[i]) for i in range(COPIES)]
    del codes
    qbytes = stacked.nbytes_storage() / COPIES
    singles = [stacked[i] for i in range(COPIES)]
    ref = jnp.einsum("mi,io->mo", x.astype(jnp.float32), dequantize(singles[0], jnp.float32))
    rows = []

    def record(name, t, nbytes, out=None, ref=ref, **extra):
        err = None
        if out is not None:
            err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        rows.append(
            {
                "I": I,
                "O": O,
                "M": M,
                "bits": bits,
                "group": group,
                "candidate": name,
                "us": t * 1e6,
                "timing": "gpu kernels" if GPU_TIME else "wall clock",
                "gbps": nbytes / t / 1e9,
                "rel_err": err,
                **extra,
            }  # fmt: skip
        )

    def over_singles(fn, ws):
        @jax.jit
        def f(x, ws):
            return sum(fn(x, w).astype(jnp.float32) for w in ws)

        return f

    if not xla_only:
        wb = [dequantize(w, jnp.bfloat16) for w in singles]
        f = over_singles(lambda x, w: x @ w, wb)
        record("bf16", _time(f, x, wb) / COPIES, I * O * 2)
        wst = jnp.stack(wb)
        del wb

        @jax.jit
        def g(x, wst):
            return jax.lax.fori_loop(
                0, COPIES, lambda i, acc: acc + (x @ wst[i]).astype(jnp.float32), jnp.zeros((M, O))
            )

        record("bf16-stacked", _time(g, x, wst) / COPIES, I * O * 2)
        if tokamax:
            tokamax_candidate(x, wst, bits, group, tokamax, record)
        del wst
        if mosaic_mixed and bits == 8:
            mosaic_mixed_candidate(x, O, record)

    if xla:
        sub = "-subchannel" if "subchannel" in os.environ.get("XLA_FLAGS", "") else ""
        before = os.environ.get("JAXKV_QMATMUL")
        os.environ["JAXKV_QMATMUL"] = "xla"
        f = over_singles(matmul, singles)
        record("xla-pergroup" + sub, _time(f, x, singles) / COPIES, qbytes, matmul(x, singles[0]))
        f = over_singles(lambda x, w: x @ dequantize(w, jnp.bfloat16), singles)
        record(
            "xla-dequant" + sub,
            _time(f, x, singles) / COPIES,
            qbytes,
            x @ dequantize(singles[0], jnp.bfloat16),
        )
        if before is None:
            os.environ.pop("JAXKV_QMATMUL")
        else:
            os.environ["JAXKV_QMATMUL"] = before
    if xla_only:
        return rows
    if own is not None:
        mosaic_own_candidate(x, own, group, record)
        del own

    zeros = qk.zero_points(stacked)

    def kernel_time(cfg):
        @jax.jit
        def h(x, packed, scale, zero):
            def body(i, acc):
                y = qk.qmatmul(x, packed, scale, zero, i, bits=bits, group=group, config=cfg)
                return acc + y.astype(jnp.float32)

            return jax.lax.fori_loop(0, COPIES, body, jnp.zeros((M, O)))

        t = _time(h, x, stacked.packed, stacked.scale, zeros) / COPIES
        out = qk.qmatmul(
            x, stacked.packed, stacked.scale, zeros, jnp.int32(0), bits=bits, group=group, config=cfg
        )
        return t, out

    def kernel_2d(x, w):  # one layer, no layer offset: what decode_layout's weights take
        return qk.qmatmul(
            x, w.packed[None], w.scale[None], qk.zero_points(w)[None], None, bits=bits, group=group
        )

    f = over_singles(kernel_2d, singles)
    record("pallas-2d", _time(f, x, singles) / COPIES, qbytes, kernel_2d(x, singles[0]))
    default = qk.default_config(I, O, group, M, bits)
    t, out = kernel_time(default)
    record("pallas-default", t, qbytes, out, config=str(default))
    if sweep:
        best = None

        def attempt(cfg):
            nonlocal best
            try:
                t, out = kernel_time(cfg)
            except Exception as e:  # a tile Triton cannot compile: skip it, say so
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                return
            if best is None or t < best[0]:
                best = (t, cfg, out)

        # Tiles first (4 warps, 4 stages), then warps and pipeline depth around the best tile.
        for bn, sk in itertools.product((64, 128, 256), (1, 2, 4, 8)):
            if O % bn == 0 and (I // group) % sk == 0:
                attempt(qk.KernelConfig(bn, sk, 4, 4))
        if best:
            for nw, ns in ((8, 4), (4, 3), (4, 6)):
                attempt(qk.KernelConfig(best[1].block_n, best[1].split_k, nw, ns))
        if best:
            record("pallas-best", best[0], qbytes, best[2], config=str(best[1]))
    return rows


def tokamax_candidate(x, wst, bits: int, group: int, impl: str, record) -> None:
    """Time ``tokamax.ragged_dot`` over symmetric qwix copies of the bf16 weights ``wst [COPIES, I,
    O]`` (see the module docstring) and ``record`` it, or say why it could not run."""
    import jax
    import jax.numpy as jnp
    import qwix
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # tokamax reads its absl flags on first use and would parse this script's argv as its own
        flags.FLAGS(sys.argv[:1])
    M = x.shape[0]
    qtype = {4: jnp.int4, 8: jnp.int8}[bits]
    tiles = {0: 1, 1: group, 2: 1}  # one scale per group of inputs and column, as jaxkv's
    qs = [qwix.quantize(wst[i][None], qtype, tiled_axes=tiles) for i in range(COPIES)]
    sizes = jnp.array([M], jnp.int32)

    def dot(x, q):
        return tokamax.ragged_dot(x, q, sizes, implementation=impl)

    @jax.jit
    def f(x, qs):
        return sum(dot(x, q).astype(jnp.float32) for q in qs)

    name = f"tokamax-{impl}"
    try:
        t = _time(f, x, qs) / COPIES
    except Exception as e:  # an unsupported shape or GPU: a row that says so
        print(f"  {name} {tuple(wst.shape[1:])} M={M}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return
    # codes and scales of one copy (XLA stores int4 two to a byte; numpy's itemsize says 1)
    nbytes = sum(
        a.size * jnp.iinfo(a.dtype).bits / 8 if a.dtype == jnp.int4 else a.nbytes
        for a in jax.tree.leaves(qs[0])
    )
    ref = jnp.einsum("mi,io->mo", x.astype(jnp.float32), qwix.dequantize(qs[0])[0].astype(jnp.float32))
    record(name, t, nbytes, dot(x, qs[0]), ref=ref, config="symmetric, qwix")


def mosaic_mixed_candidate(x, O: int, record) -> None:
    """Time JAX's Mosaic GPU mixed-type matmul (``jax.experimental.pallas.ops.gpu.
    hopper_mixed_type_matmul_mgpu``: a persistent, warp-specialised kernel whose TMA pipeline feeds
    wgmma, int8 codes converted in registers) as a one-row product with the weight on the left,
    ``y^T [O, 32] = w^T [O, I] @ x^T [I, 32]`` (``x``'s rows padded to 32 columns, 16 a warpgroup).
    No scales or zero points, and int8 (its only benchmarked code width): an upper bound on what such
    a kernel reads per second at decode shapes, not a jaxkv path. Its error is against its own
    product of the same int8 codes."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    M, I = x.shape
    if M > 32 or O % 64:
        return
    cfg = mixed.TuningConfig(
        tile_m=64, tile_n=16, tile_k=128, max_concurrent_steps=4, epi_tile_m=None, epi_tile_n=None
    )
    keys = jax.random.split(jax.random.key(O), COPIES)
    wts = [jax.random.randint(k, (O, I), -128, 128, jnp.int32).astype(jnp.int8) for k in keys]
    xt = jnp.zeros((I, 32), x.dtype).at[:, :M].set(x.T)

    def dot(w, xt):
        return mixed.mixed_matmul_kernel(w, xt, out_dtype=jnp.float32, config=cfg)

    @jax.jit
    def f(xt, ws):
        return sum(dot(w, xt) for w in ws)

    try:
        t = _time(f, xt, wts) / COPIES
    except Exception as e:  # an unsupported shape or GPU: say so
        print(f"  mosaic-mixed ({I}, {O}) M={M}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return
    ref = mixed.reference(wts[0], xt, out_dtype=jnp.float32)[:, :M].T
    record("mosaic-mixed-int8-noscale", t, I * O, dot(wts[0], xt)[:, :M].T, ref=ref, config=str(cfg))


def mosaic_own_candidate(x, weights, group: int, record) -> None:
    """Time ``jaxkv.kernels.mgpu_gemv`` (a Mosaic GPU kernel of our own) over the ``COPIES`` packed
    weights ``(wt, scale_t, offset_t)``: each split of the inputs that leaves 2 to 16 groups per
    program (64 outputs, 4 pipeline stages), then 128 and 256 outputs per program at the best split
    (fewer reads of ``x`` per weight), then 2 and 8 stages at the best of those; record the fastest.
    Bytes: int4 codes, bf16 scales and offsets."""
    import jax
    import jax.numpy as jnp

    from jaxkv.kernels import mgpu_gemv

    M, I = x.shape
    O = weights[0][0].shape[0]
    groups = I // group
    nbytes = I * O // 2 + 2 * 2 * groups * O
    best = None

    def attempt(split, block_o, stages):
        nonlocal best
        if O % block_o:
            return

        def one(x, w):
            return mgpu_gemv.matmul(x, *w, split=split, block_o=block_o, stages=stages)

        f = jax.jit(lambda x, ws: sum(one(x, w).astype(jnp.float32) for w in ws))
        try:
            t = _time(f, x, weights) / COPIES
        except Exception as e:  # a tile Mosaic GPU cannot compile: say so
            print(
                f"  mosaic-own ({I}, {O}) M={M} split {split} block_o {block_o} stages {stages}: "
                f"{type(e).__name__}: {str(e)[:300]}",
                file=sys.stderr,
            )
            return
        if best is None or t < best[0]:
            best = (t, split, block_o, stages)

    for split in (d for d in range(1, groups + 1) if groups % d == 0 and 2 <= groups // d <= 16):
        attempt(split, 64, 4)
    if best:
        for block_o in (128, 256):
            attempt(best[1], block_o, 4)
        for stages in (2, 8):
            attempt(best[1], best[2], stages)
        _, split, block_o, stages = best
        out = mgpu_gemv.matmul(x, *weights[0], split=split, block_o=block_o, stages=stages)
        record(
            "mosaic-own", best[0], nbytes, out, config=f"split {split}, {block_o} outputs, {stages} stages"
        )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| I x O | M | bits | candidate | us | GB/s | rel err | tile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
        lines.append(
            f"| {r['I']}x{r['O']} | {r['M']} | {r['bits']} | {r['candidate']} | {r['us']:.1f} | {r['gbps']:.0f} | "
            f"{err} | {r.get('config', '')} |"
        )
    return "\n".join(lines) + "\n"


def subchannel_rows(args) -> list[dict]:
    """The XLA candidates again with the subchannel dequantisation fusion on (a child process: XLA
    reads its flags once)."""
    flags = "--xla_gpu_experimental_enable_subchannel_dequantisation_fusion=true"
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
    proc = subprocess.run(
        [sys.executable, __file__, "--xla-only", "--shapes", args.shapes, "--rows", args.rows, "--bits", args.bits,
         "--group", str(args.group)] + (["--gpu-time"] if args.gpu_time else []),
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if proc.returncode:
        print("subchannel run failed:", proc.stderr[-2000:], file=sys.stderr)
        return []
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama2-7b,llama3-8b")
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--bits", default="4,8")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--sweep-rows", default="1", help="rows at which the tile sweep runs")
    p.add_argument("--xla-only", action="store_true", help="(internal) only the XLA candidates, as JSON")
    p.add_argument(
        "--tokamax",
        choices=("mosaic", "triton", "xla"),
        help="also time tokamax's quantized ragged_dot through this implementation (needs tokamax)",
    )
    p.add_argument(
        "--no-xla",
        action="store_true",
        help="skip the XLA candidates (and their subchannel run): bf16, the Pallas kernel and --tokamax only",
    )
    p.add_argument(
        "--mosaic-mixed",
        action="store_true",
        help="also time JAX's Mosaic GPU mixed-type matmul (int8, no scales: an upper bound; 8-bit rows)",
    )
    p.add_argument(
        "--mosaic-own",
        action="store_true",
        help="also time jaxkv.kernels.mgpu_gemv (our Mosaic GPU int4 kernel; 4-bit rows up to 16)",
    )
    p.add_argument(
        "--gpu-time",
        action="store_true",
        help="report the GPU kernels' time from a profiler trace instead of wall-clock time",
    )
    p.add_argument("--out", default="results/qmatmul")
    args = p.parse_args(argv)
    global GPU_TIME
    GPU_TIME = args.gpu_time
    shapes = [s for name in args.shapes.split(",") for s in SHAPES[name]]
    rows_list = [int(m) for m in args.rows.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    sweep_rows = {int(m) for m in args.sweep_rows.split(",") if m}
    if args.xla_only:
        rows = []
        for (I, O), M, b in itertools.product(shapes, rows_list, bits_list):
            rows += measure(I, O, M, b, args.group, False, True)
        print(json.dumps(rows))
        return 0

    rows = []
    for (I, O), M, b in itertools.product(shapes, rows_list, bits_list):
        sweep = M in sweep_rows and b == 4 and (I, O) in SHAPES["llama2-7b"]
        new = measure(
            I,
            O,
            M,
            b,
            args.group,
            sweep,
            False,
            args.tokamax,
            xla=not args.no_xla,
            mosaic_mixed=args.mosaic_mixed,
            mosaic_own=args.mosaic_own,
        )
        rows += new
        print(markdown(new), flush=True)
        write(rows, args.out)  # after each shape: a run cut short keeps what it measured
    if not args.no_xla:
        rows += subchannel_rows(args)
    write(rows, args.out)
    print(markdown(sorted(rows, key=_order)))
    return 0


def _order(r: dict):
    return (r["I"], r["O"], r["M"], r["bits"])


def write(rows: list[dict], out: str) -> None:
    rows = sorted(rows, key=_order)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
