"""WKVQuant table: plain min-max vs past-only vs two-dimensional vs + CRR vs + IntactKV, W4 weights.

Protocol (issue 8): SmolLM2-135M-Instruct, ``sotu-eval`` at seqlen 512, 32 windows (``jaxkv.evaluate``),
weights W4 g64 RTN, KV caches K4V4 and K2V2 (group 32 channels, per-token keys and values, fp8 scales
+ int8 zeros). Rows, each adding one component:

* ``minmax all``: plain per-token min-max, the current token quantized too (IntactKV's fake quant);
* ``minmax past-only``: WKVQuant's past-only quantization;
* ``2-D init``: + per-channel smoothing initialised from statistics (``jaxkv.wkvquant.smoothing_init``
  on the calibration windows), no clipping, no training;
* ``+ CRR``: + cross-block reconstruction (``crr_calibrate``: k blocks, AdamW, learned s, δ, clipping);
* ``+ IntactKV[B]``: CRR run with the full-precision [BOS] K/V as an unquantized pivot, then the exact
  FP [BOS] prefix (``intact exact``) and that prefix calibrated with the student reading its K/V
  through the learned quantizer (``intact calibrated``), what ``jaxkv calibrate --kv-method wkvquant``
  does.

Also the FP-weight FP-KV reference, W4 with FP KV, and min-max past-only with per-channel (KIVI) keys.
In all rows but the IntactKV ones [BOS] is quantized like any other token.

Writes ``OUT.json`` after every row (``--resume`` skips rows already there) and ``OUT.md``.

    nice -n 10 python scripts/wkvquant_table.py                            # the table (GPU: minutes)
    python scripts/wkvquant_table.py --windows 2 --seqlen 64 --calib-samples 2 --crr-epochs 1 \
        --prefix-epochs 1 --bits K4V4 --out /tmp/wkvq                      # a tiny smoke run (CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax.numpy as jnp
import numpy as np
from _results import open_results

ROWS = ("minmax-all", "minmax-past-only", "2d-init", "crr", "intact-exact", "intact-calibrated")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="sotu-eval")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group", type=int, default=64, help="weight group size")
    p.add_argument("--kv-group", type=int, default=32)
    p.add_argument("--bits", default="K4V4,K2V2")
    p.add_argument(
        "--calib-samples", type=int, default=128, help="windows for statistics, CRR and the prefix"
    )
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--crr-epochs", type=int, default=2)
    p.add_argument("--crr-batch-size", type=int, default=1)
    p.add_argument("--crr-lr", type=float, default=5e-3)
    p.add_argument("--crr-k", type=int, default=5)
    p.add_argument(
        "--intact-crr", default="separate", choices=("separate", "reuse"),
        help="IntactKV rows: CRR rerun with the FP [BOS] pivot (separate, as jaxkv calibrate does) or the "
        "parameters of the + CRR row reused (reuse: half the CRR cost)",
    )  # fmt: skip
    p.add_argument("--prefix-epochs", type=int, default=20, help="IntactKV prefix calibration epochs")
    p.add_argument("--prefix-micro-batch", type=int, default=4)
    p.add_argument("--out", default="results/wkvquant", help="output path without extension")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [
        f"# WKVQuant: {s['model']} ({s['data']}, seqlen {s['seqlen']}, {s['windows']} windows)",
        "",
        f"Perplexity (lower is better). Weights W{s['wbits']} g{s['group']} RTN; KV per-token keys and values, "
        f"group {s['kv_group']}, fp8 scales + int8 zeros. FP weights + FP KV: **{doc['fp_ppl']:.3f}**; "
        f"W{s['wbits']} + FP KV: {doc['w_ppl']:.3f}.",
        "",
        f"Calibration ({s['calib_samples']} windows x {s['calib_seqlen']} tokens of sotu-calib, the same "
        f"windows for the smoothing statistics, CRR and the prefix): CRR k={s['crr_k']}, "
        f"{s['crr_epochs']} epochs per block, batch {s['crr_batch_size']}, AdamW lr {s['crr_lr']}; IntactKV "
        f"prefix {s['prefix_epochs']} epochs, AdamW 2e-4 (the paper's recipe otherwise). IntactKV rows: "
        + (
            "CRR rerun with the FP [BOS] K/V as an unquantized pivot."
            if s["intact_crr"] == "separate"
            else "the parameters of the + CRR row (learned with [BOS] quantized), reused."
        ),
        "",
    ]
    bits = [b for b in s["bits"].split(",")]
    head = {
        "kivi": "min-max past-only, per-channel keys (KIVI), for reference",
        "minmax-all": "plain min-max (`all`: current token quantized too)",
        "minmax-past-only": "+ past-only",
        "2d-init": "+ two-dimensional (smoothing init, no training)",
        "crr": "+ cross-block reconstruction (CRR)",
        "intact-exact": "+ IntactKV[B] (exact FP [BOS] prefix)",
        "intact-calibrated": "+ calibrated IntactKV[B]",
    }
    lines += ["| row | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
    for row in ("kivi", *ROWS):
        cells = []
        for b in bits:
            r = doc["rows"].get(f"{b}/{row}")
            cells.append("" if r is None else f"{r['ppl']:.3f}")
        lines.append(f"| {head[row]} | " + " | ".join(cells) + " |")
    crr = [(k, r) for k, r in doc["rows"].items() if r.get("crr_initial_losses")]
    if crr:
        lines += [
            "",
            "CRR loss (mean absolute error k blocks downstream, first batch, mean over blocks):",
            "",
        ]
        for k, r in crr:
            i, f = np.nanmean(r["crr_initial_losses"]), np.nanmean(r["crr_final_losses"])
            lines.append(f"- {k}: {i:.4f} -> {f:.4f} ({r['crr_seconds']:.0f} s)")
    lines += ["", f"Device: {doc['device']}; jax {doc['jax']}; total {doc.get('seconds', 0) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxkv.calibrate import CalibConfig
    from jaxkv.corpus import load_text, tokenize
    from jaxkv.evaluate import make_windows, perplexity
    from jaxkv.load import load
    from jaxkv.model import KVForward
    from jaxkv.prefix import make_prefix
    from jaxkv.quant import QuantRecipe, quantize
    from jaxkv.wkvquant import CRRConfig, pivot_windows

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "no_progress")}
    doc, write = open_results(
        args.out, settings, args.resume, markdown, rows={}, fp_ppl=None, w_ppl=None, seconds=0
    )
    t_start = time.perf_counter() - doc["seconds"]

    def save():
        doc["seconds"] = time.perf_counter() - t_start
        write()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    progress = not args.no_progress
    fp = load(args.model, dtype=jnp.float32)
    cfg = fp.cfg
    q = quantize(fp, QuantRecipe(bits=args.wbits, group=args.group, method="rtn"), progress=progress)
    windows = make_windows(
        tokenize(fp.tokenizer, load_text(args.data)), cfg.bos_token_id, args.seqlen, args.windows
    )
    calib_ids = tokenize(fp.tokenizer, load_text("sotu-calib"))
    bos = [cfg.bos_token_id]
    calib = pivot_windows(calib_ids, bos, args.calib_samples, args.calib_seqlen, 0)  # [BOS] + text
    prefix_b = make_prefix(fp, "bos")

    def ppl(model, kv=None, wkv=None, prefix=None):
        tail = () if wkv is None else (wkv,)
        if prefix is not None:
            fn, params = KVForward(cfg, kv, intact=True), (model.params, prefix.k, prefix.v, *tail)
        else:
            fn, params = (
                (KVForward(cfg, kv) if kv is not None else None),
                ((model.params, *tail) if tail else model.params),
            )
        res = perplexity(params, cfg, windows, args.batch_size, forward_fn=fn, progress=progress)
        return {"ppl": res.ppl, "tokens": res.tokens, "eval_seconds": res.seconds}

    if doc.get("fp_ppl") is None:
        doc["fp_ppl"] = ppl(fp)["ppl"]
        doc["w_ppl"] = ppl(q)["ppl"]
        save()
        log(f"fp {doc['fp_ppl']:.4f}, W{args.wbits} {doc['w_ppl']:.4f}")
    crr_cfg = CRRConfig(samples=args.calib_samples, epochs=args.crr_epochs, batch_size=args.crr_batch_size,
                        lr=args.crr_lr, k=args.crr_k)  # fmt: skip
    prefix_cfg = CalibConfig(
        samples=args.calib_samples, seqlen=args.calib_seqlen, epochs=args.prefix_epochs,
        batch_size=max(16, args.prefix_micro_batch) if args.calib_samples >= 16 else args.prefix_micro_batch,
        micro_batch=args.prefix_micro_batch,
    )  # fmt: skip
    for spec in args.bits.split(","):
        bits_rows(spec, args, doc, save, log, ppl, fp, q, calib, prefix_b, crr_cfg, prefix_cfg)
    save()
    log(f"wrote {args.out}.json and {args.out}.md ({doc['seconds'] / 60:.1f} min)")
    return 0


def bits_rows(spec, args, doc, save, log, ppl, fp, q, calib, prefix_b, crr_cfg, prefix_cfg) -> None:
    """Every row of one K/V bit setting (``spec`` such as ``K4V4``), skipping those already in ``doc``."""
    from jaxkv.calibrate import calibrate
    from jaxkv.kvcache import KVQuantConfig
    from jaxkv.wkvquant import crr_calibrate, smoothing_init

    kb, vb = (int(x) for x in spec.upper()[1:].split("V"))
    base = KVQuantConfig(kb, vb, group=args.kv_group, k_granularity="per-token")
    wkv_kv = dataclasses.replace(base, method="wkvquant")
    progress = not args.no_progress
    cache: dict = {}

    def row(name, fn):
        key = f"{spec}/{name}"
        if key in doc["rows"]:
            return
        t0 = time.perf_counter()
        r = fn()
        r["seconds"] = time.perf_counter() - t0
        doc["rows"][key] = r
        save()
        log(f"{key}: ppl {r['ppl']:.4f} ({r['seconds']:.0f} s)")

    def init(prefix):
        tag = "intact" if prefix else "plain"
        if ("init", tag) not in cache:
            cache["init", tag] = smoothing_init(q, wkv_kv, calib, prefix)
        return cache["init", tag]

    def crr(prefix):
        if args.intact_crr == "reuse":
            prefix = None
        tag = "intact" if prefix else "plain"
        if ("crr", tag) not in cache:
            cache["crr", tag] = crr_calibrate(fp, q, wkv_kv, calib, init(prefix), crr_cfg, prefix=prefix,
                                              progress=progress)  # fmt: skip
        return cache["crr", tag]

    def crr_row(prefix, prefix_for_eval=None):
        res = crr(prefix)
        return {**ppl(q, wkv_kv, res.params, prefix_for_eval), "crr_initial_losses": res.initial_losses,
                "crr_final_losses": res.final_losses, "crr_seconds": res.seconds}  # fmt: skip

    def calibrated():
        res = crr(prefix_b)
        text = calib[:, 1:]  # the prefix precedes the text
        cal = calibrate(fp, q, prefix_b, text, prefix_cfg, progress=progress, kv=wkv_kv, wkv=res.params)
        return {**ppl(q, wkv_kv, res.params, cal.prefix), "prefix_initial_loss": cal.initial_loss,
                "prefix_final_loss": float(np.mean(cal.losses[-prefix_cfg.steps_per_epoch :])),
                "prefix_seconds": cal.seconds}  # fmt: skip

    row("kivi", lambda: ppl(q, dataclasses.replace(base, k_granularity="per-channel")))
    row("minmax-all", lambda: ppl(q, dataclasses.replace(base, mode="all")))
    row("minmax-past-only", lambda: ppl(q, base))
    row("2d-init", lambda: ppl(q, wkv_kv, init(None)))
    row("crr", lambda: crr_row(None))
    row("intact-exact", lambda: crr_row(prefix_b, prefix_b))
    row("intact-calibrated", calibrated)


if __name__ == "__main__":
    sys.exit(main())
