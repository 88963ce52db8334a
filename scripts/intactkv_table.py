"""The IntactKV table: plain / + IntactKV[B] / + calibrated IntactKV[B] perplexity, and IntactKV[P] on chat.

Protocol (issue 5): SmolLM2-135M-Instruct, ``sotu-eval`` at seqlen 512, 32 windows (``jaxkv.evaluate``).
Rows: weights W3 g64 and W4 g64 by RTN, GPTQ and AWQ (GPTQ/AWQ calibrated on 128 x 512 tokens of
``sotu-calib``), and KV caches K4V4 and K4V2 (group 32, past-only) with full-precision weights.

* plain: the quantized model computes [BOS]'s K/V itself (and, for KV rows, BOS is quantized like
  any token);
* + IntactKV[B]: [BOS]'s K/V come from the full-precision model (kept unquantized in the cache);
* + calibrated: that prefix trained by :func:`jaxkv.calibrate` (paper recipe: 128 windows of
  ``sotu-calib``, 20 epochs, AdamW lr 2e-4, 3% warmup, clip 0.3, loss summed over blocks; for KV rows
  the student reads its K/V quantized).

IntactKV[P] on chat: for chat prompts (the user turns below), the full-precision model's greedy
reply (after its own system-prompt prefix) is the reference; each quantized model is teacher-forced
over system prompt + prompt + that reply and scored by the KL divergence of its next-token
distribution from the FP one (mean over reply positions) and the share of positions where its
argmax equals the FP argmax, without and with the FP system-prompt prefix (IntactKV[P]).

Writes ``OUT.json`` after every row (``--resume`` skips rows already there) and ``OUT.md``.

    python scripts/intactkv_table.py                                   # the full table (GPU)
    python scripts/intactkv_table.py --windows 2 --calib-samples 4 --epochs 1 --rows w3-rtn  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _results import open_results

ROWS = {  # name: (weight bits or None, method, (kbits, vbits) or None); cheapest first
    "w3-rtn": (3, "rtn", None),
    "w4-rtn": (4, "rtn", None),
    "k4v4": (None, None, (4, 4)),
    "k4v2": (None, None, (4, 2)),
    "w3-gptq": (3, "gptq", None),
    "w3-awq": (3, "awq", None),
    "w4-gptq": (4, "gptq", None),
    "w4-awq": (4, "awq", None),
}
CHAT_PROMPTS = [
    "What is the State of the Union address?",
    "Give me three tips for writing a clear speech.",
    "Explain what inflation is in two sentences.",
    "Who decides the budget of the United States government?",
    "Write a short greeting for a town meeting.",
    "Why do countries sign trade agreements?",
    "What does a senator do?",
    "Summarize the benefits of public libraries.",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="sotu-eval")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group", type=int, default=64, help="weight group size")
    p.add_argument("--kv-group", type=int, default=32)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--calib-samples", type=int, default=128, help="GPTQ/AWQ and prefix calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=20, help="prefix calibration epochs")
    p.add_argument("--micro-batch", type=int, default=16, help="windows per forward/backward (memory)")
    p.add_argument("--chat-tokens", type=int, default=32, help="FP greedy reply length for IntactKV[P]")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--out", default="results/intactkv", help="output path without extension")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# IntactKV: {s['model']} ({s['data']}, seqlen {s['seqlen']}, {s['windows']} windows)",
        "",
        f"Perplexity (lower is better); FP {result.get('fp_ppl', float('nan')):.3f}. Weights group "
        f"{s['group']} asymmetric; KV group {s['kv_group']}, past-only, per-channel keys, per-token "
        f"values. Calibration: {s['calib_samples']} x {s['calib_seqlen']} tokens of sotu-calib, "
        f"{s['epochs']} epochs, AdamW lr 2e-4.",
        "",
        "| row | plain | + IntactKV[B] | + calibrated IntactKV[B] | calib loss (start -> end) | calib tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['row']} | {r['plain']:.3f} | {r['intact']:.3f} | {r['calibrated']:.3f} | "
            f"{r['calib_initial_loss']:.4g} -> {r['calib_final_loss']:.4g} | {r['calib_tokens_per_second']:,.0f} |"
        )
    if result.get("chat"):
        c = result["chat"]
        lines += [
            "",
            f"IntactKV[P] on {c['prompts']} chat prompts ({c['pivot_tokens']} system-prompt pivot tokens, "
            f"{c['reply_tokens']} FP greedy reply tokens each): KL(FP || quantized) per token and greedy "
            "agreement with the FP model.",
            "",
            "| row | KL plain | KL + IntactKV[P] | agreement plain | agreement + IntactKV[P] |",
            "|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['row']} | {r['kl_plain']:.4f} | {r['kl_intact']:.4f} | "
                f"{r['agree_plain']:.3f} | {r['agree_intact']:.3f} |"
            )
    lines += ["", f"Device: {result['device']}; jax {result['jax']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxkv.calibrate import CalibConfig, calibrate
    from jaxkv.corpus import calibration_windows, load_text, tokenize
    from jaxkv.evaluate import make_windows, perplexity
    from jaxkv.kvcache import KVQuantConfig
    from jaxkv.load import load
    from jaxkv.model import KVForward
    from jaxkv.prefix import make_prefix
    from jaxkv.quant import QuantRecipe, calibration_tokens, quantize

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "no_progress", "rows")}
    result, save = open_results(args.out, settings, args.resume, markdown, rows=[], chat=None, fp_ppl=None)
    progress = not args.no_progress
    fp = load(args.model, dtype=jnp.float32)
    cfg = fp.cfg
    windows = make_windows(
        tokenize(fp.tokenizer, load_text(args.data)), cfg.bos_token_id, args.seqlen, args.windows
    )
    calib_ids = tokenize(fp.tokenizer, load_text("sotu-calib"))
    prefix_b = make_prefix(fp, "bos")
    # Text-only calibration windows: the one-token prefix precedes them.
    calib_windows = calibration_windows(calib_ids, args.calib_samples, args.calib_seqlen - 1, 0, bos_id=None)
    calib_cfg = CalibConfig(
        samples=args.calib_samples, seqlen=args.calib_seqlen, epochs=args.epochs, micro_batch=args.micro_batch,
        batch_size=max(16, args.micro_batch) if args.calib_samples >= 16 else args.micro_batch,
    )  # fmt: skip

    def ppl(model, kv, prefix):
        if prefix is None:
            fn, params = (KVForward(cfg, kv) if kv is not None else None), model.params
        else:
            fn, params = KVForward(cfg, kv, intact=True), (model.params, prefix.k, prefix.v)
        return perplexity(params, cfg, windows, args.batch_size, forward_fn=fn, progress=progress).ppl

    if result.get("fp_ppl") is None:
        result["fp_ppl"] = ppl(fp, None, None)
        save()
    gptq_calib = None
    models = {}
    for name in args.rows:
        bits, method, kvbits = ROWS[name]
        t0 = time.perf_counter()
        if bits is None:
            model = fp
        else:
            recipe = QuantRecipe(bits=bits, group=args.group, method=method, calib_samples=args.calib_samples,
                                 calib_seqlen=args.calib_seqlen)  # fmt: skip
            if recipe.needs_calibration and gptq_calib is None:
                gptq_calib = calibration_tokens(fp, recipe)
            model = quantize(fp, recipe, calib_tokens=gptq_calib if recipe.needs_calibration else None,
                             progress=progress)  # fmt: skip
            jax.block_until_ready(jax.tree.leaves(model.params))
        models[name] = model
        if any(r["row"] == name for r in result["rows"]):
            continue
        quantize_s = time.perf_counter() - t0
        kv = None if kvbits is None else KVQuantConfig(*kvbits, group=args.kv_group)
        row = {"row": name, "quantize_seconds": quantize_s}
        row["plain"] = ppl(model, kv, None)
        row["intact"] = ppl(model, kv, prefix_b)
        cal = calibrate(fp, model, prefix_b, calib_windows, calib_cfg, progress=progress, kv=kv)
        row["calibrated"] = ppl(model, kv, cal.prefix)
        row.update(
            calib_initial_loss=cal.initial_loss,
            calib_final_loss=float(np.mean(cal.losses[-calib_cfg.steps_per_epoch :])),
            calib_seconds=cal.seconds,
            calib_tokens_per_second=cal.tokens_per_second,
            calib_steps=len(cal.losses),
        )
        result["rows"].append(row)
        save()
        print(json.dumps(row), file=sys.stderr, flush=True)

    if not args.no_chat and result.get("chat") is None:
        result["chat"] = chat_table(fp, {k: m for k, m in models.items() if ROWS[k][0] is not None}, args)
        save()
    save()
    return 0


def chat_table(fp, models: dict, args) -> dict:
    """KL and greedy agreement of each quantized model to the FP model on chat replies, +/- IntactKV[P]."""
    from jaxkv.generate import encode_prompts, generate
    from jaxkv.model import forward_kv
    from jaxkv.prefix import make_prefix

    cfg = fp.cfg
    prefix_p = make_prefix(fp, "system")
    P = prefix_p.length
    gen = generate(fp, prefix_p, CHAT_PROMPTS, chat=True, max_new_tokens=args.chat_tokens, stop_at_eos=False)
    prompts = encode_prompts(fp.tokenizer, CHAT_PROMPTS, prefix_p, chat=True)
    seqs = [list(prefix_p.tokens) + p + r for p, r in zip(prompts, gen.tokens, strict=True)]
    fwd = jax.jit(forward_kv, static_argnames=("cfg", "kv", "pivot_len"))

    def reply_logprobs(model, pivot_kv):
        out = []
        for p, seq in zip(prompts, seqs, strict=True):
            tokens = jnp.asarray([seq], jnp.int32)
            positions = jnp.arange(len(seq), dtype=jnp.int32)[None]
            logits = fwd(model.params, tokens, positions, cfg, None, 0, pivot_kv)[0]
            start = P + len(p) - 1  # the position whose prediction is the first reply token
            out.append(jax.nn.log_softmax(logits[start : len(seq) - 1], axis=-1))
        return jnp.concatenate(out)

    ref = reply_logprobs(fp, (prefix_p.k, prefix_p.v))
    rows = []
    for name, model in models.items():
        row = {"row": name}
        for tag, pivot_kv in (("plain", None), ("intact", (prefix_p.k, prefix_p.v))):
            lp = reply_logprobs(model, pivot_kv)
            kl = jnp.sum(jnp.exp(ref) * (ref - lp), axis=-1)
            row[f"kl_{tag}"] = float(jnp.mean(kl))
            row[f"agree_{tag}"] = float(jnp.mean(jnp.argmax(lp, -1) == jnp.argmax(ref, -1)))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"prompts": len(CHAT_PROMPTS), "pivot_tokens": P, "reply_tokens": args.chat_tokens, "rows": rows}


if __name__ == "__main__":
    sys.exit(main())
