"""``jaxkv bench``: decode and prefill speed of a model shape with random weights, side by side with
peers on the same device.

Conventions
-----------
* A *case* is (weights, batch, prompt length, KV cache): weights ``bf16`` (the baseline), ``int4`` or
  ``int8`` (group-wise RTN layout with random codes: speed does not depend on the values), KV
  ``bf16`` or a quantized spec such as ``K4V2`` (``jaxkv.kvcache``, per-channel keys, group 32).
  Every case runs in its own Python process, so peak device memory is the case's own and the
  matmul path (``JAXKV_QMATMUL``) is fixed per process.
* Weights are in :func:`jaxkv.model.decode_layout` for the case's batch (fused projections unless
  ``--no-fuse``, one buffer per layer, 4-bit codes in the packing of the batch's GPU kernel), as
  ``jaxkv generate`` uses them.
* Timing: the jitted prefill and the jitted decode loop of ``jaxkv.generate`` (one ``while_loop``,
  cache donated, no host round trip per token) are each timed between device synchronisations,
  after a warm-up run that compiles them (the prompt is prefilled in chunks of ``prefill_chunk``
  tokens: the prefill attention materialises its scores, 68 GB for 8 x 4096 tokens at once); the median of ``repeats`` runs is reported. Decode
  time excludes the prefill: ``ms_per_token`` is one decode step (all sequences of the batch),
  ``decode_tokens_per_s`` counts every sequence's tokens.
* Achieved bandwidth = bytes one decode step must read (every weight once: packed codes, scales
  and zeros for quantized ones, one embedding row per sequence; plus the KV cache at the mean
  context length of the decode) / step time. ``copy_gbps`` is this device's measured copy
  bandwidth (a large device-to-device copy, bytes read + written), the ceiling to compare with.
* Peers run in the same invocation on the same device: ``hf`` = Hugging Face transformers
  (PyTorch) ``generate`` with a static cache, eager (``disable_compile``) and with its automatic
  ``torch.compile``; bf16 random weights of the same shape, greedy, no EOS.

    jaxkv bench --shape llama2-7b --weights bf16,int4 --batch 1 --prompt 128 --peers hf \\
        --out results/bench_h100
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from jaxkv.errors import JaxkvError

WEIGHTS = ("bf16", "int8", "int4")
WEIGHT_BITS = {"int8": 8, "int4": 4}  # code bits of the quantized --weights
# JAXKV_QMATMUL: the decode kernels where they apply, or the portable XLA matmul
QMATMULS = ("auto", "xla")
# JAXKV_KV_DECODE for quantized caches (the keys of jaxkv.kvattention.DECODE_IMPLS): XLA over the
# packed body, or the tensor-core decode kernel (unset: the library's default, the kernel on a GPU)
KV_DECODES = ("xla", "kernel")
# --peers: (weights, mode) runs of jaxkv.bench_hf. torchao's int4 is compiled only: its eager
# tensor-subclass dispatch is not what anyone serves.
PEERS = {"hf": (("bf16", "eager"), ("bf16", "compile")), "torchao": (("int4", "compile"),)}


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    weights: str = "bf16"
    batch: int = 1
    prompt: int = 128
    new_tokens: int = 256
    kv: str = "bf16"
    group: int = 128
    fuse: bool = True
    repeats: int = 3
    qmatmul: str = "auto"  # JAXKV_QMATMUL, one of QMATMULS
    prefill_chunk: int = 1024  # prompt tokens per prefill call (the prefill's attention is not flash)
    kv_decode: str | None = None  # JAXKV_KV_DECODE, one of KV_DECODES; None: the library's default

    def label(self) -> str:
        tail = "" if self.qmatmul == "auto" else f" [{self.qmatmul}]"
        tail += "" if self.kv_decode is None else f" [kv {self.kv_decode}]"
        return f"{self.weights} b{self.batch} p{self.prompt} kv={self.kv}{tail}"


def copy_bandwidth(nbytes: int = 1 << 31, repeats: int = 20, warmup_s: float = 0.5) -> float:
    """GB/s of a device-to-device copy (bytes read + written): the fastest of ``repeats`` after
    ``warmup_s`` seconds of the same copy. The warm-up lets an idle GPU raise its clocks (the first
    call of a fresh process starts from idle), and the fastest run is the ceiling a benchmark is
    compared with: medians of 10 runs without warm-up moved between 2.7 and 3.4 TB/s across
    invocations on one kind of H200 (results/bench/h200_run*)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.bits(jax.random.key(0), (nbytes // 4,), jnp.uint32)
    f = jax.jit(lambda a: a ^ jnp.uint32(1))  # an elementwise op: one read, one write, never elided
    f(x).block_until_ready()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times) / 1e9


def random_model(cfg, weights: str, group: int, seed: int = 0):
    """bf16 random parameters; for int4/int8 the linear layers become QArrays with random codes,
    scales and zero points (built on the device: no host quantization of billions of weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.params import init_params
    from jaxkv.quant.qarray import QArray, check_group, pack
    from jaxkv.quant.recipe import LINEARS

    params = jax.jit(lambda k: init_params(cfg, k, jnp.bfloat16))(jax.random.key(seed))
    if weights == "bf16":
        return params
    bits = WEIGHT_BITS[weights]

    @functools.partial(jax.jit, static_argnums=2)
    def rand_q(w, key, group):
        *lead, I, O = w.shape
        k1, k2, k3 = jax.random.split(key, 3)
        codes = jax.random.randint(k1, w.shape, 0, 2**bits, jnp.int32)
        scale = (
            jax.random.uniform(k2, (*lead, I // group, O), jnp.float32, 0.5, 1.5) * 0.02 / 2**bits
        ).astype(jnp.float16)
        zero = jax.random.randint(k3, scale.shape, 0, 2**bits, jnp.int32).astype(jnp.uint8)
        return pack(codes, bits), scale, zero

    layers = dict(params["layers"])
    for i, name in enumerate(LINEARS):
        g = check_group(layers[name].shape, bits, group, name)  # -1: one group per column
        packed, scale, zero = rand_q(layers[name], jax.random.key(seed + 1 + i), g)
        layers[name] = QArray(packed, scale, zero, bits=bits, group=g, dtype=np.dtype(jnp.bfloat16))
    return {**params, "layers": layers}


def step_bytes(params, cfg, kv, batch: int, context: float) -> float:
    """Bytes a decode step reads: every weight once (one embedding row per sequence unless tied)
    plus the KV cache at ``context`` positions per sequence."""
    import jax.numpy as jnp

    from jaxkv.kvcache import kv_bytes_per_token
    from jaxkv.quant.qarray import weight_bytes

    w = weight_bytes(params)
    if not cfg.tie_word_embeddings:
        w -= weight_bytes({"e": params["embed"]}) - batch * cfg.hidden_size * 2
    return w + kv_bytes_per_token(cfg, kv, jnp.bfloat16) * batch * context


def parse_kv(spec: str):
    """``bf16`` -> None; ``K4V2`` (optionally ``K4V2-g64``) -> KVQuantConfig with per-channel keys."""
    from jaxkv.kvcache import KVQuantConfig

    s = spec.strip().upper()
    if s in ("BF16", "FP16", "16"):
        return None
    group = 32
    if "-G" in s:
        s, g = s.split("-G")
        group = int(g)
    if not s.startswith("K") or "V" not in s:
        raise JaxkvError(f"bad KV spec {spec!r}: expected bf16 or e.g. K4V2 / K4V2-g64")
    k, v = s[1:].split("V")
    return KVQuantConfig(kbits=int(k), vbits=int(v), group=group)


def run_case(case: Case) -> dict:
    """Measure one case in this process (``JAXKV_QMATMUL`` must already be set)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.config import shape_config
    from jaxkv.generate import DecodeState, _decode, _prefill
    from jaxkv.kvcache import cache_bytes, init_cache
    from jaxkv.model import decode_layout

    cfg = shape_config(case.shape)
    kv = parse_kv(case.kv)
    params = random_model(cfg, case.weights, case.group)
    params = decode_layout(params, fuse=case.fuse, batch=case.batch)
    B, T, N = case.batch, case.prompt, case.new_tokens
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    key = jax.random.key(0)
    temp, top_p = None, jnp.float32(1.0)  # greedy decided at trace time, as generate does
    eos, pad = jnp.asarray([-1], jnp.int32), 0

    def prefill():
        cache = init_cache(cfg, B, T + N, jnp.bfloat16, kv=kv, per_layer=True)  # as generate does
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        C = min(T, case.prefill_chunk)
        for s in range(0, T, C):  # chunks continue the cache; the last one yields the first token
            e = min(T, s + C)
            last = jnp.full((B,), e - s - 1, jnp.int32)
            first, cache = _prefill(
                params, tokens[:, s:e], positions[:, s:e], cache, last, key, temp, top_p, cfg, 0
            )
        first.block_until_ready()
        return time.perf_counter() - t0, first, cache

    def decode():
        _, first, cache = prefill()
        out = jnp.zeros((B, N), jnp.int32).at[:, 0].set(first)
        state = DecodeState(cache, out, jnp.int32(1), jnp.zeros((B,), bool), jax.random.key(1))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = _decode(params, state, jnp.int32(N), temp, top_p, eos, pad, cfg, 0)
        state.out.block_until_ready()
        dt = time.perf_counter() - t0
        return dt, int(state.step), cache_bytes(state.cache)

    decode()  # compile both
    prefill_s = statistics.median(prefill()[0] for _ in range(case.repeats))
    runs = [decode() for _ in range(case.repeats)]
    decode_s = statistics.median(r[0] for r in runs)
    steps = runs[0][1] - 1
    step_s = decode_s / steps
    nbytes = step_bytes(params, cfg, kv, B, T + N / 2)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "case": dataclasses.asdict(case),
        "label": case.label(),
        "device": jax.devices()[0].device_kind,
        "ms_per_token": step_s * 1e3,
        "decode_tokens_per_s": B / step_s,
        "prefill_tokens_per_s": B * T / prefill_s,
        "prefill_ms": prefill_s * 1e3,
        "step_bytes": nbytes,
        "achieved_gbps": nbytes / step_s / 1e9,
        "kv_cache_bytes": runs[0][2],
        "peak_bytes": stats.get("peak_bytes_in_use"),
    }


def _subprocess_json(argv: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {
            "error": (proc.stderr or proc.stdout).strip().splitlines()[-12:],
            "returncode": proc.returncode,
        }
    return json.loads(lines[-1])


def markdown(results: dict) -> str:
    lines = [
        f"# jaxkv bench: {results['shape']} on {results.get('device', '?')}",
        "",
        f"Copy bandwidth {results['copy_gbps']:.0f} GB/s (read + write). {results['new_tokens']} new tokens, "
        "medians of repeats, prefill excluded from decode.",
        "",
        "| case | ms/token | decode tok/s | vs bf16 | prefill tok/s | achieved GB/s | % of copy | KV cache MB | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for r in results["cases"]:
        if "error" in r:
            continue
        c = r["case"]
        if c["weights"] == "bf16" and c["kv"] == "bf16":
            base[(c["batch"], c["prompt"])] = r["decode_tokens_per_s"]
    for r in results["cases"]:
        if "error" in r:
            lines.append(f"| {r.get('label', '?')} | failed: {r['error'][-1] if r['error'] else ''} |||||||")
            continue
        c = r["case"]
        b = base.get((c["batch"], c["prompt"]))
        ratio = f"{r['decode_tokens_per_s'] / b:.2f}x" if b else "-"
        peak = f"{r['peak_bytes'] / 1e9:.1f}" if r.get("peak_bytes") else "-"
        lines.append(
            f"| {r['label']} | {r['ms_per_token']:.3f} | {r['decode_tokens_per_s']:.1f} | {ratio} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['achieved_gbps']:.0f} | "
            f"{100 * r['achieved_gbps'] / results['copy_gbps']:.0f}% | {r['kv_cache_bytes'] / 1e6:.1f} | {peak} |"
        )
    for p in results.get("peers", []):
        if "error" in p:
            lines.append(
                f"| {p.get('label', 'peer')} | failed: {p['error'][-1] if p['error'] else ''} |||||||"
            )
            continue
        b = base.get((p["batch"], p["prompt"]))
        ratio = f"{p['decode_tokens_per_s'] / b:.2f}x" if b else "-"
        lines.append(
            f"| {p['label']} | {p['ms_per_token']:.3f} | {p['decode_tokens_per_s']:.1f} | {ratio} | "
            f"{p['prefill_tokens_per_s']:.0f} | - | - | - | - |"
        )
    return "\n".join(lines) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama2-7b", help="shape preset (jaxkv.config.SHAPES)")
    p.add_argument("--weights", default="bf16,int4", help="comma list of bf16, int8, int4")
    p.add_argument("--group", type=int, default=128, help="quantization group of int4/int8 weights")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--prompt", default="128", help="comma list of prompt lengths")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--kv", default="bf16", help="comma list of KV caches: bf16, K4V2, K4V4-g64, ...")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill call")
    p.add_argument(
        "--peers",
        default="",
        help="comma list of peers to run in the same invocation: hf (transformers bf16, eager and "
        "compiled), torchao (transformers with torchao int4 weights, compiled; needs torchao installed)",
    )
    p.add_argument(
        "--qmatmul",
        default="auto",
        help="comma list for quantized weights: auto (the decode kernels), xla (the portable matmul)",
    )
    p.add_argument("--no-fuse", action="store_true", help="keep Q/K/V and gate/up as separate matmuls")
    p.add_argument(
        "--kv-decode", default="",
        help="comma list of decode attentions: xla (XLA ops over the cache), kernel (the decode "
        "kernels, for bf16 and quantized caches); default: the library's (the kernel on a GPU)",
    )  # fmt: skip
    p.add_argument("--out", default="results/bench", help="writes OUT.json and OUT.md")


def _check_weight_group(cfg, weights: str, group: int) -> None:
    """--group must divide the input dimension of every linear layer, before any case runs."""
    import jax
    import jax.numpy as jnp

    from jaxkv.params import init_params
    from jaxkv.quant.qarray import check_group
    from jaxkv.quant.recipe import LINEARS

    layers = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.bfloat16))["layers"]
    for name in LINEARS:
        try:
            check_group(layers[name].shape, WEIGHT_BITS[weights], group, name)
        except ValueError as e:
            raise JaxkvError(f"--group: {e}") from None


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def run(args) -> dict:
    """The whole benchmark: copy bandwidth, every case, every peer; writes OUT.json and OUT.md."""
    from jaxkv.config import shape_config

    cfg = shape_config(args.shape)  # fail early on an unknown shape
    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    for w in weights:
        if w not in WEIGHTS:
            raise JaxkvError(f"--weights: {w!r} is not one of {WEIGHTS}")
        if w != "bf16":
            _check_weight_group(cfg, w, args.group)
    for spec in args.kv.split(","):
        parse_kv(spec)
    kv_decodes = [d.strip() for d in args.kv_decode.split(",") if d.strip()] or [None]
    for d in kv_decodes:
        if d is not None and d not in KV_DECODES:
            raise JaxkvError(f"--kv-decode: {d!r} is not one of {KV_DECODES}")
    qmatmuls = [m.strip() for m in args.qmatmul.split(",") if m.strip()]
    for m in qmatmuls:
        if m not in QMATMULS:
            raise JaxkvError(f"--qmatmul: {m!r} is not one of {QMATMULS}")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in PEERS:
            raise JaxkvError(f"--peers: unknown peer {p!r} (known: {', '.join(PEERS)})")
    cases = []
    for w in weights:
        for b in _ints(args.batch):
            for t in _ints(args.prompt):
                for kv in args.kv.split(","):
                    modes = qmatmuls if w != "bf16" else ["auto"]
                    for m in modes:
                        for d in kv_decodes:
                            cases.append(
                                Case(
                                    args.shape, w, b, t, args.new_tokens, kv.strip(), args.group,
                                    not args.no_fuse, args.repeats, m, args.prefill_chunk, d,
                                )
                            )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "shape": args.shape,
        "new_tokens": args.new_tokens,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": "jaxkv bench " + " ".join(sys.argv[2:]),
        "cases": [],
        "peers": [],
    }
    # Peers first: PyTorch must find the GPU memory free (JAX preallocates in its own processes).
    from tqdm import tqdm

    jobs = [("peer", p, b, t) for p in peers for b in _ints(args.batch) for t in _ints(args.prompt)]
    jobs = [("copy",)] + jobs + [("case", c) for c in cases]
    for job in tqdm(jobs, desc="bench", unit="run"):
        if job[0] == "copy":
            r = _subprocess_json(["-m", "jaxkv.bench", "--copy"])
            results["copy_gbps"], results["device"] = r.get("copy_gbps", float("nan")), r.get("device")
        elif job[0] == "peer":
            _, p, b, t = job
            argv = ["-m", "jaxkv.bench_hf", "--shape", args.shape, "--batch", str(b), "--prompt", str(t)]
            argv += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
            for weights, mode in PEERS[p]:
                r = _subprocess_json([*argv, "--mode", mode, "--weights", weights])
                r.setdefault("label", f"{p} {mode} {weights} b{b} p{t}")
                results["peers"].append(r)
        else:
            c = job[1]
            r = _subprocess_json(
                ["-m", "jaxkv.bench", "--case", json.dumps(dataclasses.asdict(c))],
                {"JAXKV_QMATMUL": c.qmatmul, **({"JAXKV_KV_DECODE": c.kv_decode} if c.kv_decode else {})},
            )
            r.setdefault("label", c.label())
            results["cases"].append(r)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    return results


def main(argv=None) -> int:
    """Worker entry (``python -m jaxkv.bench --case JSON`` / ``--copy``): prints one JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("--case")
    p.add_argument("--copy", action="store_true")
    args = p.parse_args(argv)
    if args.copy:
        import jax

        print(json.dumps({"copy_gbps": copy_bandwidth(), "device": jax.devices()[0].device_kind}))
    else:
        print(json.dumps(run_case(Case(**json.loads(args.case)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
