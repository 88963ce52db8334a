"""The weight-quantization table: perplexity of FP and W{8,4,3,2} x {RTN, GPTQ, AWQ} on one model.

Default protocol (issue 3): SmolLM2-135M-Instruct, ``sotu-eval`` at seqlen 512, 32 windows (BOS
first, ``jaxkv.evaluate``), group 64, asymmetric, fp16 scales; GPTQ/AWQ calibrated on 128 windows of
512 tokens of ``sotu-calib`` (one set of windows shared by every method). Writes
``OUT.json`` (every row, rewritten after each one, so an interrupted run keeps what it finished;
``--resume`` skips rows already there with the same settings) and ``OUT.md``.

    python scripts/weight_quant_table.py                       # the full table (a GPU run)
    python scripts/weight_quant_table.py --windows 2 --calib-samples 8 --bits 4   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
from _results import open_results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--data", default="sotu-eval")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"], choices=("rtn", "gptq", "awq"))
    p.add_argument("--sym", action="store_true")
    p.add_argument("--scale-dtype", default="float16")
    p.add_argument("--calib-data", default="sotu-calib")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order (implies static groups)")
    p.add_argument("--out", default="results/weight_quant", help="output path without extension")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def markdown(result: dict) -> str:
    rows = result["rows"]
    s = result["settings"]
    bits = sorted({r["bits"] for r in rows if r["bits"] is not None}, reverse=True)
    methods = [m for m in ("rtn", "gptq", "awq") if any(r["method"] == m for r in rows)]
    fp = next((r for r in rows if r["method"] == "fp"), None)
    lines = [
        f"# Weight quantization: {s['model']} ({s['data']}, seqlen {s['seqlen']}, {s['windows']} windows)",
        "",
        f"Group {s['group']}, {'symmetric' if s['sym'] else 'asymmetric'}, {s['scale_dtype']} scales; "
        f"GPTQ/AWQ calibrated on {s['calib_samples']} x {s['calib_seqlen']} tokens of {s['calib_data']}"
        f"{' (GPTQ act-order)' if s['act_order'] else ''}. Perplexity (lower is better)"
        + (f"; FP {fp['ppl']:.3f}." if fp else "."),
        "",
        "| method | " + " | ".join(f"W{b}" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
    ]
    if fp:
        lines.append("| FP | " + " | ".join(f"{fp['ppl']:.3f}" for _ in bits) + " |")
    for m in methods:
        cells = []
        for b in bits:
            r = next((r for r in rows if r["method"] == m and r["bits"] == b), None)
            cells.append("" if r is None else f"{r['ppl']:.3f}")
        lines.append(f"| {m.upper()} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Real storage of the quantized linears (packed codes + scales + zeros) vs the same at fp16:",
        "",
    ]
    lines.append("| | " + " | ".join(f"W{b}" for b in bits) + " |")
    lines.append("|---|" + "---|" * len(bits))
    ratio_cells = []
    for b in bits:
        r = next((r for r in rows if r["bits"] == b), None)
        ratio_cells.append("" if r is None else f"{r['quantized_ratio']:.3f}")
    lines.append("| bytes / fp16 bytes | " + " | ".join(ratio_cells) + " |")
    if fp:
        lines += [
            "",
            f"Whole model at FP ({s['dtype']}): {fp['weight_bytes']:,} bytes; fp16: {fp['weight_bytes_fp16']:,}.",
        ]
    lines += [
        "",
        f"Device: {result['device']}; jax {result['jax']}. Times are wall-clock seconds (quantize + eval).",
    ]
    lines.append("")
    lines.append("| method | bits | ppl | weight_bytes | quantize s | eval s |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['bits'] or '-'} | {r['ppl']:.4f} | {r['weight_bytes']:,} | "
            f"{r['quantize_seconds']:.1f} | {r['eval_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxkv.corpus import load_text, tokenize
    from jaxkv.evaluate import make_windows, perplexity
    from jaxkv.load import load
    from jaxkv.quant import (
        QuantRecipe,
        calibration_tokens,
        quantize,
        quantized_bytes,
        weight_bytes,
        weight_bytes_fp16,
    )

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "no_progress")}
    result, save = open_results(args.out, settings, args.resume, markdown, rows=[])

    def done(method, bits):
        return any(r["method"] == method and r["bits"] == bits for r in result["rows"])

    progress = not args.no_progress
    model = load(args.model, dtype=getattr(jnp, args.dtype))
    ids = tokenize(model.tokenizer, load_text(args.data))
    windows = make_windows(ids, model.cfg.bos_token_id, args.seqlen, args.windows)

    def evaluate(m, method, bits, q_seconds):
        res = perplexity(m.params, m.cfg, windows, batch_size=args.batch_size, progress=progress)
        qb, qfp = quantized_bytes(m.params)
        row = {
            "method": method,
            "bits": bits,
            "ppl": res.ppl,
            "tokens": res.tokens,
            "weight_bytes": weight_bytes(m.params),
            "weight_bytes_fp16": weight_bytes_fp16(m.params),
            "quantized_bytes": qb,
            "quantized_bytes_fp16": qfp,
            "quantized_ratio": qb / qfp if qfp else 1.0,
            "quantize_seconds": q_seconds,
            "eval_seconds": res.seconds,
        }
        result["rows"].append(row)
        save()
        print(
            f"{method:5s} W{bits or '-'}: ppl {res.ppl:.4f} ({res.seconds:.1f} s eval)",
            file=sys.stderr,
            flush=True,
        )

    if not done("fp", None):
        evaluate(model, "fp", None, 0.0)
    base = QuantRecipe(
        bits=args.bits[0],
        group=args.group,
        sym=args.sym,
        scale_dtype=args.scale_dtype,
        calib_data=args.calib_data,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        calib_batch=args.calib_batch,
        act_order=args.act_order,
    )
    calib = None
    for method in args.methods:
        for bits in args.bits:
            if done(method, bits):
                continue
            recipe = dataclasses.replace(base, bits=bits, method=method)
            if recipe.needs_calibration and calib is None:
                calib = calibration_tokens(model, recipe)
            t0 = time.perf_counter()
            qm = quantize(model, recipe, calib_tokens=calib, progress=progress)
            jax.block_until_ready(jax.tree.leaves(qm.params))
            evaluate(qm, method, bits, time.perf_counter() - t0)
            del qm
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
