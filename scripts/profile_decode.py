"""Where a decode step's time goes: a JAX profiler trace of a few decode steps of a ``jaxkv bench``
case, summarised per GPU kernel (name, launches per step, microseconds per step), largest first.

    python scripts/profile_decode.py --shape llama2-7b --weights int4 --out results/bench/profile_int4_b1

Writes ``OUT.json`` (the summary), ``OUT.sequence.tsv`` (every kernel of the traced steps in launch
order: start, microseconds, idle gap before it, name) and prints the top kernels; the raw trace stays
under ``OUT.trace/``
(open it in Perfetto), and ``--hlo`` writes the compiled decode loop as ``OUT.hlo.txt`` (XLA's fusion
names in the trace are its instruction names there).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import sys
from pathlib import Path


def gpu_kernels(path: str) -> list[tuple[float, str, float]]:
    """(start, kernel name, microseconds) of every GPU kernel in a Perfetto trace, in launch order."""
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {}  # (pid, tid) -> thread name: device streams are the GPU's
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[(e["pid"], e["tid"])] = e["args"]["name"]
    pids = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    return sorted(
        (e["ts"], e["name"], e["dur"])
        for e in events
        if e.get("ph") == "X"
        and "dur" in e
        and "/device:GPU" in pids.get(e["pid"], "")
        and "Stream" in names.get((e["pid"], e["tid"]), "")
    )


def trace_file(trace_dir) -> str:
    """The newest Perfetto trace ``jax.profiler.trace`` wrote under ``trace_dir``."""
    return sorted(glob.glob(str(Path(trace_dir) / "**" / "*.trace.json.gz"), recursive=True))[-1]


def write_sequence(kernels: list[tuple[float, str, float]], dest: Path) -> None:
    """:func:`gpu_kernels`' list in launch order, with the idle time before each (launch gaps)."""
    lines, end = ["start_us\tus\tgap_us\tkernel"], None
    for start, name, dur in kernels:
        gap = 0.0 if end is None else start - end
        lines.append(f"{start:.1f}\t{dur:.2f}\t{gap:.2f}\t{name}")
        end = start + dur
    dest.write_text("\n".join(lines) + "\n")


def summarise(kernels: list[tuple[float, str, float]], steps: int) -> list[dict]:
    """Per kernel name: launches and microseconds per decode step, from :func:`gpu_kernels`' list."""
    total = collections.defaultdict(float)
    count = collections.Counter()
    for _, name, dur in kernels:
        total[name] += dur
        count[name] += 1
    rows = [
        {"kernel": k, "launches_per_step": count[k] / steps, "us_per_step": total[k] / steps} for k in total
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])


# Kernel-name fragments -> what the kernel does, first match wins (XLA names fusions by their root).
CATEGORIES = (
    ("qmatmul", "quantized matmul (Pallas)"),
    ("kv_decode", "decode attention (Pallas)"),
    ("gemm", "bf16 GEMM (XLA)"),
    ("reduce", "reductions (RMSNorm, split-K sums, softmax)"),
    ("dynamic_update_slice", "cache writes"),
    ("sort", "sort"),
)


def categorise(rows: list[dict]) -> dict[str, dict]:
    """Microseconds and launches per decode step by category (:data:`CATEGORIES`, else "other")."""
    out = collections.defaultdict(lambda: {"us_per_step": 0.0, "launches_per_step": 0.0})
    for r in rows:
        name = r["kernel"].lower()
        cat = next((c for frag, c in CATEGORIES if frag in name), "other (elementwise, copies)")
        out[cat]["us_per_step"] += r["us_per_step"]
        out[cat]["launches_per_step"] += r["launches_per_step"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us_per_step"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--weights", default="int4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument(
        "--new-tokens", type=int, default=256, help="the cache holds prompt + this many (as jaxkv bench's)"
    )
    p.add_argument("--kv", default="bf16")
    p.add_argument("--out", default="results/bench/profile")
    p.add_argument("--hlo", action="store_true", help="also write the optimised HLO of the decode loop")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxkv.bench import parse_kv, random_model
    from jaxkv.config import shape_config
    from jaxkv.generate import DecodeState, _decode, _prefill
    from jaxkv.kvcache import init_cache
    from jaxkv.model import decode_layout

    cfg = shape_config(args.shape)
    params = decode_layout(random_model(cfg, args.weights, 128))
    B, T, N = args.batch, args.prompt, args.steps + 1
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    consts = (None, jnp.float32(1.0))  # greedy, as generate

    def state():
        cache = init_cache(
            cfg, B, T + max(N, args.new_tokens), jnp.bfloat16, kv=parse_kv(args.kv), per_layer=True
        )
        C = min(T, 1024)  # prefill chunks, as jaxkv bench's
        for s in range(0, T, C):
            e = min(T, s + C)
            last = jnp.full((B,), e - s - 1, jnp.int32)
            first, cache = _prefill(
                params, tokens[:, s:e], positions[:, s:e], cache, last, jax.random.key(0), *consts, cfg, 0
            )
        out = jnp.zeros((B, N), jnp.int32).at[:, 0].set(first)
        return DecodeState(cache, out, jnp.int32(1), jnp.zeros((B,), bool), jax.random.key(1))

    def decode(s):
        return _decode(params, s, jnp.int32(N), *consts, jnp.asarray([-1]), 0, cfg, 0).out.block_until_ready()

    decode(state())  # compile
    s = state()
    jax.block_until_ready(s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.hlo:
        lowered = _decode.lower(params, s, jnp.int32(N), *consts, jnp.asarray([-1]), 0, cfg, 0)
        out.with_suffix(".hlo.txt").write_text(lowered.compile().as_text())
    trace_dir = out.with_suffix(".trace")
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        decode(s)
    kernels = gpu_kernels(trace_file(trace_dir))  # the trace is read once
    if not kernels:
        raise SystemExit(f"no GPU kernels in {trace_dir}: the profile needs a GPU")
    write_sequence(kernels, out.with_suffix(".sequence.tsv"))
    rows = summarise(kernels, args.steps)
    cats = categorise(rows)
    busy = sum(r["us_per_step"] for r in rows)
    span = (kernels[-1][0] + kernels[-1][2] - kernels[0][0]) / args.steps  # first launch to last end
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "busy_us_per_step": busy,
                "span_us_per_step": span,
                "categories": cats,
                "kernels": rows,
            },
            indent=1,
        )
    )
    print(
        f"GPU busy {busy:.0f} us per decode step over {len(rows)} kernel names; "
        f"{span:.0f} us from the first launch to the last end per step ({span - busy:.0f} us idle)"
    )
    for cat, v in cats.items():
        print(f"{v['us_per_step']:9.1f} us {v['launches_per_step']:6.1f}x  {cat}")
    for r in rows[:25]:
        print(f"{r['us_per_step']:9.1f} us {r['launches_per_step']:6.1f}x  {r['kernel'][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
