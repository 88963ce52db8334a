"""Compile jaxkv's Pallas GPU kernels for an H100 (sm_90a) on a machine without a GPU, and count
what the compiler made of them: registers, spills and SASS instructions by opcode.

Why: GPU time is scarce, and a kernel's instruction count, register use and spills decide much of
its speed at decode (the KV decode kernel is bound by instruction issue and latency, not memory:
see ``jaxkv.kernels.kvdecode``). This lets a change be checked before a GPU call.

How: JAX lowers the kernel for CUDA on the CPU (``jit(...).lower(lowering_platforms=("cuda",))``;
Pallas builds the Triton IR then), the IR is written as ``OUT/NAME.ttir``, and a child process
compiles it with the ``triton`` pip package (TTGIR, LLVM IR and PTX beside it) and assembles the PTX
with the ``ptxas`` that package carries, then lists the SASS (``cuobjdump``). The device's jaxlib
compiles the same IR with its own build of Triton, so counts can differ a little from the GPU's:
compare versions of a kernel with each other here, not with numbers measured there.

    pip install triton                   # not a jaxkv dependency: only this script needs it
    python scripts/kernel_sass.py merge kv qmm8 qmm8oi gemv --out /tmp/sass

Kernels (Llama-2-7B shapes; decode at batch 8 and 4352 cache slots, K4V2 at group 32):
``kv`` (``kvdecode.body_partials``), ``merge`` (``kvdecode.merge`` with the key window and 4 pivot
slots), ``qmmN`` (``qmatmul`` with N rows on the 4096 x 12288 Q/K/V weight, group 128; N = 1 is the
one-row kernel), ``qmmNoi`` (the same over the decode layout, codes packed along the inputs), either
with ``-int8`` (8-bit codes, e.g. ``qmm8oi-int8``), ``gemv`` (= ``qmm1``); the split-K epilogues of
batch-1 decode (``jaxkv.kernels.epilogue``): ``epi-qkv``, ``epi-o`` (O's 32 splits and the
residual), ``epi-down`` (86 splits), ``epi-silu``. ``--warps`` overrides the kernels' warps per
program.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

_COMPILE = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
path, warps = sys.argv[1], int(sys.argv[2])
k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=int(sys.argv[3])))
base = path.rsplit(".", 1)[0]
for key, v in k.asm.items():
    if isinstance(v, str):
        open(f"{base}.{key}", "w").write(v)
print(json.dumps({"bin": str(__import__("pathlib").Path(triton.__file__).parent / "backends/nvidia/bin")}))
"""


def lower(name: str, out: Path, warps: int | None) -> dict:
    """Lower kernel ``name`` for CUDA on this machine; writes ``out/name.ttir``. Returns the launch
    options (warps, stages) Pallas would pass to Triton."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    captured = {}
    real = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = real(*a, **k)
        captured["ir"] = result.module.operation.get_asm(enable_debug_info=False)
        return result

    S = jax.ShapeDtypeStruct
    B, K, H, slots, g, P, f8 = 8, 32, 128, 4352, 32, 4, jnp.float8_e4m3fn
    body = (
        S((B, K, slots, H // 2), jnp.uint8), S((B, K, slots // g, H), f8), S((B, K, slots // g, H), jnp.int8),
        S((B, K, slots, H // 4), jnp.uint8), S((B, K, slots, H // g), f8), S((B, K, slots, H // g), jnp.int8),
    )  # fmt: skip
    heads = S((B, 3 * K, H), jnp.bfloat16)
    if name == "kv":
        from jaxkv.kernels import kvdecode

        warps = warps or kvdecode.NUM_WARPS
        stages = kvdecode.NUM_STAGES
        fn = lambda h, n, *b: kvdecode.body_partials(  # noqa: E731
            h, n, *b, kbits=4, vbits=2, group=g, sm_scale=H**-0.5, num_warps=warps, num_stages=stages
        )
        args = (heads, S((B,), jnp.int32), *body)
    elif name == "merge":
        from jaxkv.kernels import kvdecode

        warps = warps or kvdecode.MERGE_WARPS
        stages, NC = 1, kvdecode.chunks(B, K, slots, 132)  # 132: an H100's SMs
        fn = lambda h, pos, pk, pv, m, l, o, ring, meta, *b: kvdecode.merge(  # noqa: E731
            h, pos, pk, pv, m, l, o, (ring, None, meta, *b), kbits=4, vbits=2, group=g, sm_scale=H**-0.5,
            out_dtype=jnp.bfloat16, num_warps=warps,
        )  # fmt: skip
        part = S((B, K, NC, 1), jnp.float32)
        args = (heads, S((B,), jnp.int32), S((P, K, H), jnp.bfloat16), S((P, K, H), jnp.bfloat16), part, part,
                S((B, K, NC, 1, H), jnp.float32), S((B, g - 1, K, H), jnp.bfloat16), S((B, 4), jnp.int32), *body)  # fmt: skip
    elif name == "gemv" or re.fullmatch(r"qmm\d+(oi)?(-int8)?", name):
        from jaxkv.kernels import qmatmul

        m = re.fullmatch(r"qmm(\d+)(oi)?(-int8)?", name)
        layout, bits = "oi" if m and m.group(2) else "io", 8 if m and m.group(3) else 4
        rows = int(m.group(1)) if m else 1
        I, O, group = 4096, 12288, 128
        cfg = qmatmul.default_config(I, O, group, rows, bits, layout)
        if warps:
            cfg = qmatmul.KernelConfig(**{**cfg.__dict__, "num_warps": warps})
        warps, stages = cfg.num_warps, cfg.num_stages
        fn = lambda x, p, s, z, layer: qmatmul.qmatmul(  # noqa: E731
            x, p, s, z, layer, bits=bits, group=group, layout=layout, config=cfg
        )
        packed = (1, O, I * bits // 8) if layout == "oi" else (1, I * bits // 8, O)
        args = (S((rows, I), jnp.bfloat16), S(packed, jnp.uint8), S((1, I // group, O), jnp.bfloat16),
                S((1, I // group, O), jnp.uint8), S((), jnp.int32))  # fmt: skip
    elif re.fullmatch(r"epi-(qkv|o|down|silu)", name):
        fn, args, warps, stages = epilogue_case(name.split("-")[1], warps=warps)
    else:
        raise SystemExit(f"unknown kernel {name!r}: kv, merge, qmmN[oi][-int8], gemv, epi-*")
    lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = real
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.ttir").write_text(captured["ir"])
    return {"warps": warps, "stages": stages}


def epilogue_case(which: str, D=4096, F=11008, N=32, K=32, H=128, group=128, blocks=128, warps=None):
    """A batch-1 split-K epilogue (``jaxkv.kernels.epilogue``) to lower over the one-row kernel's
    partial sums: ``which`` of qkv, o, down, silu, for hidden ``D``, FFN ``F``, ``N`` query and ``K``
    key/value heads of ``H``, weight ``group``, tail blocks of at most ``blocks`` columns and
    ``warps`` per program (defaults: Llama-2-7B, ``epilogue.WARPS``). Returns ``(fn, args, warps,
    stages)``."""
    import jax
    import jax.numpy as jnp

    from jaxkv.kernels import epilogue, qmatmul

    S = jax.ShapeDtypeStruct
    I, O = {"qkv": (D, (N + 2 * K) * H), "o": (D, D), "down": (F, D), "silu": (D, 2 * F)}[which]
    d_block, f_block = epilogue.columns(D, blocks), epilogue.columns(F, blocks)
    sumsq, row = S((D // d_block, 1), jnp.float32), S((1, D), jnp.bfloat16)  # from the previous epilogue
    if which == "qkv":
        tail = epilogue.QkvRope(block_n=H, blocks=N + 2 * K, heads=N, kv_heads=K, hidden=D, eps=1e-5)
        rope = S((H // 2,), jnp.float32)
        inputs, shapes = (sumsq, rope, rope), (S((1, N + 2 * K, H), jnp.bfloat16),)
    elif which == "silu":
        tail = epilogue.SiluMul(block_n=f_block, blocks=F // f_block, hidden=D, eps=1e-5)
        inputs, shapes = (sumsq,), (S((1, F), jnp.bfloat16),)
    else:
        tail = epilogue.ResidualNorm(block_n=d_block, blocks=D // d_block)
        inputs, shapes = (row, S((D,), jnp.bfloat16)), (row, row, S((D // d_block, 1), jnp.float32))
    splits = qmatmul.default_config(I, O, group, 1, 4, "io").split_k
    warps = warps or epilogue.WARPS
    fn = lambda p, *i: epilogue.launch(tail, p, i, shapes, warps=warps)  # noqa: E731
    return fn, (S((splits, 1, O), jnp.float32), *inputs), warps, 1


def sass_counts(text: str) -> collections.Counter:
    """SASS instructions of a ``cuobjdump -sass`` listing by opcode (predicates and modifiers dropped)."""
    counts = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts[m.group(1)] += 1
    return counts


def compile_and_count(name: str, out: Path, warps: int, stages: int) -> dict:
    """Compile ``out/name.ttir`` in a child process (Triton's MLIR apart from jaxlib's) and count."""
    ttir = out / f"{name}.ttir"
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(ttir), str(warps), str(stages)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"triton could not compile {ttir} (pip install triton?):\n{done.stderr[-2000:]}")
    tools = Path(json.loads(done.stdout.strip().splitlines()[-1])["bin"])
    ptxas = next(p for p in (tools / "ptxas-blackwell", tools / "ptxas") if p.exists())  # the newest PTX ISA
    cubin = out / f"{name}.cubin"
    report = subprocess.run(
        [ptxas, "-arch=sm_90a", "-v", str(out / f"{name}.ptx"), "-o", str(cubin)],
        capture_output=True,
        text=True,
    )
    if report.returncode:
        raise SystemExit(report.stderr[-2000:])
    info = report.stdout + report.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = re.search(r"(\d+) bytes spill stores", info)
    sass = subprocess.run(
        [tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True
    ).stdout
    (out / f"{name}.sass").write_text(sass)
    counts = sass_counts(sass)
    return {
        "kernel": name, "warps": warps, "registers": regs, "spill_bytes": int(spill.group(1)) if spill else 0,
        "instructions": sum(counts.values()), "byte_shared_loads": byte_shared_loads(sass), "top": counts.most_common(12),
    }  # fmt: skip


def byte_shared_loads(sass: str) -> int:
    """Single-byte shared-memory loads (``LDS.U8``/``LDS.S8``): operand bytes gathered one at a time."""
    return len(re.findall(r"\bLDS\.[US]8\b", sass))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "kernels", nargs="+", help="kv, merge, qmmN (N rows), qmmNoi (decode layout), either + -int8, gemv"
    )
    p.add_argument("--warps", type=int, default=None, help="warps per program (default: the kernel's own)")
    p.add_argument("--out", default="/tmp/jaxkv_sass", help="folder for the IR, PTX, cubin and SASS")
    p.add_argument(
        "--lower-only", action="store_true", help="write the Triton IR only (no triton package needed)"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    for name in args.kernels:
        launch = lower(name, out, args.warps)
        if args.lower_only:
            print(f"{name}: {out / (name + '.ttir')} ({launch['warps']} warps)")
            continue
        row = compile_and_count(name, out, launch["warps"], launch["stages"])
        rows.append(row)
        top = ", ".join(f"{op} {n}" for op, n in row["top"])
        print(
            f"{name}: {row['warps']} warps, {row['registers']} registers, {row['spill_bytes']} B spilled, "
            f"{row['instructions']} SASS instructions ({row['byte_shared_loads']} one-byte shared loads): {top}"
        )
    if rows:
        (out / "counts.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
