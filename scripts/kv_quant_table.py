"""KV-cache quantization table: perplexity of a full-precision model with a quantized KV cache.

Rows: K/V bits (K8V8, K4V4, K4V2, K2V4, K2V2) x mode (past-only, all) x residual (0, 32, 128) x
full-precision pivot slots for [BOS] (0 = BOS quantized like any token, 1 = IntactKV[B]: the [BOS]
K/V of the full-precision model, i.e. with full-precision weights position 0 left unquantized);
optional per-layer bit budgets ("Quantize What Counts"). Also the per-layer Frobenius and spectral
norms of W_k and W_v, the argument for key-favoured bits.

Perplexity follows ``jaxkv.evaluate`` (windows of ``seqlen`` tokens starting with BOS); the forward
is ``jaxkv.model.KVForward``, which equals decoding each window through the quantized cache.

    python scripts/kv_quant_table.py                                  # the full table (GPU: minutes)
    python scripts/kv_quant_table.py --seqlen 64 --windows 2 --bits K4V2,K2V4 --residuals 0 \
        --out /tmp/kvq                                                # a tiny smoke run (CPU)

Writes ``OUT.json`` (every row, settings, norms) after each row, so a partial run keeps its rows,
and ``OUT.md`` (tables) at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.corpus import load_text, tokenize
from jaxkv.evaluate import make_windows, perplexity
from jaxkv.kvcache import KVQuantConfig, kv_report, kv_weight_norms, make_kv_config
from jaxkv.load import load
from jaxkv.model import KVForward


def parse_bits(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        item = item.strip().upper()
        if not item.startswith("K") or "V" not in item:
            raise SystemExit(f"bad bits spec {item!r}: expected e.g. K4V2")
        k, v = item[1:].split("V")
        out.append((int(k), int(v)))
    return out


def ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def run_ppl(model, windows, kv: KVQuantConfig | None, pivot: int, batch_size: int) -> dict:
    fwd = KVForward(model.cfg, kv, pivot)
    res = perplexity(model.params, model.cfg, windows, batch_size=batch_size, forward_fn=fwd, progress=False)
    return {"ppl": res.ppl, "nll_sum": res.nll_sum, "tokens": res.tokens, "seconds": res.seconds}


def markdown(doc: dict) -> str:
    s = doc["settings"]
    rows = doc["rows"]
    fp = doc["fp"]["ppl"]
    lines = [
        f"# KV-cache quantization: {s['model']} on {s['data']}",
        "",
        f"seqlen {s['seqlen']}, {s['windows']} windows ({doc['fp']['tokens']} scored tokens), weights "
        f"{s['dtype']}, group {s['group']} (keys per channel in groups of {s['group']} tokens, values "
        f"per token in groups of {s['group']} channels), scales {s['scale_dtype']} + int8 zeros. "
        f"Full-precision KV cache: **ppl {fp:.4f}**. Device: {doc['device']}.",
        "",
        '"pivot": [BOS] K/V kept at full precision (IntactKV[B]); "past-only": a token sees its own '
        'K/V at full precision (WKVQuant); "all": quantized before attending (IntactKV\'s fake quant); '
        "R: most recent tokens kept at full precision.",
        "",
    ]
    by_key = {
        (r["kbits"], r["vbits"], r["mode"], r["residual"], r["pivot"]): r for r in rows if "budget" not in r
    }
    bits = sorted(
        {(r["kbits"], r["vbits"]) for r in rows if "budget" not in r}, key=lambda b: (-b[0] - b[1], -b[0])
    )
    modes = [m for m in ("past-only", "all") if any(r["mode"] == m for r in rows)]
    pivots = sorted({r["pivot"] for r in rows})
    for R in sorted({r["residual"] for r in rows}):
        cols = [(m, p) for m in modes for p in pivots]
        head = " | ".join(f"{m}{' + pivot' if p else ''}" for m, p in cols)
        lines += [f"## Residual R = {R}", "", f"| K/V | bytes/token (x fp16) | {head} |"]
        lines.append("|---|---|" + "---|" * len(cols))
        for kb, vb in bits:
            cells = []
            ratio = None
            for m, p in cols:
                r = by_key.get((kb, vb, m, R, p))
                cells.append("" if r is None else f"{r['ppl']:.4f}")
                if r is not None:
                    ratio = f"{r['kv_bytes_per_token']:.0f} ({r['kv_ratio_fp16']:.3f})"
            lines.append(f"| K{kb}V{vb} | {ratio} | " + " | ".join(cells) + " |")
        lines.append("")
    budget_rows = [r for r in rows if "budget" in r]
    if budget_rows:
        lines += [
            "## Per-layer bit budgets (W_k/W_v norms)",
            "",
            "| budget | mode | R | pivot | ppl | K bits | V bits |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        for r in budget_rows:
            lines.append(
                f"| {r['budget']} | {r['mode']} | {r['residual']} | {r['pivot']} | {r['ppl']:.4f} | "
                f"{' '.join(map(str, r['kv_layer_kbits']))} | {' '.join(map(str, r['kv_layer_vbits']))} |"
            )
        lines.append("")
    # K4V2 vs K2V4: same memory, which wins, reported as measured.
    pairs = [
        (by_key[(4, 2, m, R, p)]["ppl"], by_key[(2, 4, m, R, p)]["ppl"], (m, R, p))
        for (kb, vb, m, R, p) in by_key
        if (kb, vb) == (4, 2) and (2, 4, m, R, p) in by_key
    ]
    if pairs:
        wins = sum(a < b for a, b, _ in pairs)
        lines += [
            "## K4V2 vs K2V4 (same bytes per token)",
            "",
            f"K4V2 has the lower perplexity in {wins} of {len(pairs)} settings (mode x R x pivot).",
            "",
            "| mode | R | pivot | K4V2 | K2V4 |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {R} | {p} | {a:.4f} | {b:.4f} |"
            for a, b, (m, R, p) in sorted(pairs, key=lambda x: x[2])
        ]
        lines.append("")
    n = doc["norms"]
    lines += [
        "## Per-layer weight norms",
        "",
        "| layer | ‖W_k‖_F | ‖W_v‖_F | F ratio k/v | ‖W_k‖_2 | ‖W_v‖_2 | spectral ratio k/v |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (kf, vf, ks, vs) in enumerate(zip(n["wk_fro"], n["wv_fro"], n["wk_spec"], n["wv_spec"])):
        lines.append(f"| {i} | {kf:.3f} | {vf:.3f} | {kf / vf:.2f} | {ks:.3f} | {vs:.3f} | {ks / vs:.2f} |")
    kf, vf = np.asarray(n["wk_fro"]), np.asarray(n["wv_fro"])
    lines += ["", f"‖W_k‖_F > ‖W_v‖_F in {int((kf > vf).sum())} of {len(kf)} layers.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--data", default="sotu-eval")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bits", default="K8V8,K4V4,K4V2,K2V4,K2V2")
    ap.add_argument("--modes", default="past-only,all")
    ap.add_argument("--residuals", default="0,32,128")
    ap.add_argument("--pivots", default="0,1", help="leading positions kept full precision (1 = [BOS])")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--k-granularity", default="per-channel", choices=("per-channel", "per-token"))
    ap.add_argument("--scale-dtype", default="float8_e4m3fn")
    ap.add_argument("--budgets", default="", help="e.g. 3,4: per-layer bits from W_k/W_v norms (past-only)")
    ap.add_argument("--out", default="results/kv_quant", help="output path without extension")
    args = ap.parse_args(argv)

    model = load(args.model, dtype=getattr(jnp, args.dtype))
    ids = tokenize(model.tokenizer, load_text(args.data))
    windows = make_windows(ids, model.cfg.bos_token_id, args.seqlen, args.windows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    doc = {
        "settings": {
            "model": args.model,
            "dtype": args.dtype,
            "data": args.data,
            "seqlen": args.seqlen,
            "windows": int(windows.shape[0]),
            "group": args.group,
            "k_granularity": args.k_granularity,
            "scale_dtype": args.scale_dtype,
        },
        "device": f"{dev.platform}:{dev.device_kind}",
        "host": platform.node(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "norms": kv_weight_norms(model.params, model.cfg),
        "fp": None,
        "rows": [],
    }

    def save():
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    doc["fp"] = {**run_ppl(model, windows, None, 0, args.batch_size), **kv_report(model.cfg, None)}
    log(f"fp: ppl {doc['fp']['ppl']:.4f}")
    save()
    common = dict(group=args.group, k_granularity=args.k_granularity, scale_dtype=args.scale_dtype)
    settings = [
        (kb, vb, mode, R, pivot)
        for kb, vb in parse_bits(args.bits)
        for mode in args.modes.split(",")
        for R in ints(args.residuals)
        for pivot in ints(args.pivots)
    ]
    for kb, vb, mode, R, pivot in settings:
        kv = make_kv_config(model.params, model.cfg, kbits=kb, vbits=vb, residual=R, mode=mode, **common)
        row = {"kbits": kb, "vbits": vb, "mode": mode, "residual": R, "pivot": pivot}
        row.update(run_ppl(model, windows, kv, pivot, args.batch_size), **kv_report(model.cfg, kv))
        doc["rows"].append(row)
        log(f"K{kb}V{vb} {mode} R={R} pivot={pivot}: ppl {row['ppl']:.4f} ({row['seconds']:.1f} s)")
        save()
    for budget in [float(b) for b in args.budgets.split(",") if b.strip()]:
        for pivot in ints(args.pivots):
            kv = make_kv_config(model.params, model.cfg, budget=budget, mode="past-only", **common)
            row = {"budget": budget, "kbits": None, "vbits": None, "mode": "past-only", "residual": 0}
            row.update(
                pivot=pivot, **run_ppl(model, windows, kv, pivot, args.batch_size), **kv_report(model.cfg, kv)
            )
            doc["rows"].append(row)
            log(f"budget {budget} pivot={pivot}: ppl {row['ppl']:.4f}")
            save()
    doc["seconds"] = time.perf_counter() - t0
    save()
    out.with_suffix(".md").write_text(markdown(doc))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
