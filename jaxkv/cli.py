"""The ``jaxkv`` command line: thin wrappers that parse flags and call the library.

Every command that fails on bad input prints one line ``jaxkv: error: ...`` on stderr and exits with
status 2; no traceback reaches the user (set ``JAXKV_DEBUG=1`` to see one). Commands with ``--json``
print exactly one JSON object on stdout; progress bars and logs go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

DTYPES = ("float32", "bfloat16")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="a preset name (smollm2-135m), a .gguf file, a local Hugging Face directory, or a hub id",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")


def _load(args):
    import jax.numpy as jnp

    from jaxkv.load import load

    return load(args.model, dtype=getattr(jnp, args.dtype), mesh=getattr(args, "device_mesh", None))


# --- meshes and multi-host runs (issue 6) --------------------------------------------------------


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    """``--mesh`` (jaxkv.sharding) and the multi-host flags (jaxkv.distributed)."""
    from jaxkv.distributed import add_distributed_args
    from jaxkv.sharding import add_mesh_arg

    add_mesh_arg(p)
    add_distributed_args(p)


def _start(args) -> None:
    """Join a multi-host run if flags/environment ask (before any other JAX call), then build the mesh.

    Only process 0 prints results: the others' stdout goes to /dev/null.
    """
    args.device_mesh = None
    if not hasattr(args, "mesh"):
        return
    from jaxkv import distributed, sharding

    info = distributed.initialize_from_args(args)
    if not info.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    args.device_mesh = sharding.mesh_from_args(args)


# --- quantized KV cache flags (issue 4) ---------------------------------------------------------


def _add_kv_args(p: argparse.ArgumentParser, pivot: bool = False, params: bool = True) -> None:
    g = p.add_argument_group("KV cache quantization (16 bits = off)")
    g.add_argument("--kbits", type=int, default=16, choices=(16, 8, 4, 3, 2), help="key bits")
    g.add_argument("--vbits", type=int, default=16, choices=(16, 8, 4, 3, 2), help="value bits")
    g.add_argument(
        "--kv-group", type=int, default=32, help="group size: tokens (per-channel keys), channels else"
    )
    g.add_argument("--kv-residual", type=int, default=0, help="recent tokens kept at full precision")
    g.add_argument("--kv-mode", default="past-only", choices=("past-only", "all"))
    g.add_argument(
        "--kv-method", default="minmax", choices=("minmax", "wkvquant"),
        help="minmax, or wkvquant: per-channel smoothing + per-token quantization with learned clipping "
        "(parameters from --kv-params DIR or --prefix DIR of jaxkv calibrate --kv-method wkvquant)",
    )  # fmt: skip
    g.add_argument(
        "--kv-key-granularity", default=None, choices=("per-channel", "per-token"),
        help="default per-channel (KIVI) for minmax, per-token for wkvquant",
    )  # fmt: skip
    g.add_argument(
        "--kv-scale-dtype", default="float8_e4m3fn", choices=("float8_e4m3fn", "float16", "bfloat16")
    )
    g.add_argument(
        "--kv-budget",
        type=float,
        default=None,
        help="mean K/V bits: per-layer bits from W_k/W_v norms (replaces --kbits/--vbits)",
    )
    if pivot:
        g.add_argument(
            "--kv-pivot", type=int, default=0, help="leading window positions kept full precision (1 = [BOS])"
        )
    if params:
        g.add_argument(
            "--kv-params",
            default=None,
            help="saved wkvquant parameters (DIR or DIR/kvquant of jaxkv calibrate)",
        )


def _kv_config(args, model):
    from jaxkv.kvcache import make_kv_config

    granularity = args.kv_key_granularity or ("per-token" if args.kv_method == "wkvquant" else "per-channel")
    return make_kv_config(
        model.params, model.cfg, kbits=args.kbits, vbits=args.vbits, group=args.kv_group,
        residual=args.kv_residual, mode=args.kv_mode, k_granularity=granularity,
        scale_dtype=args.kv_scale_dtype, budget=args.kv_budget, method=args.kv_method,
    )  # fmt: skip


def _wkv_dir(path) -> str | None:
    """``jaxkv calibrate --out DIR`` keeps wkvquant parameters in DIR/kvquant; accept either directory."""
    from pathlib import Path

    for d in (Path(path) / "kvquant", Path(path)):
        if (d / "wkvquant.json").is_file():
            return str(d)
    return None


def _wkv_for(args, model, kv):
    """The learned parameters of a wkvquant KV cache (--kv-params, else --prefix DIR/kvquant), or None."""
    from jaxkv.errors import JaxkvError

    if kv is None or kv.method != "wkvquant":
        if getattr(args, "kv_params", None):
            raise JaxkvError("--kv-params needs --kv-method wkvquant and a quantized KV cache")
        return None
    path = args.kv_params or (args.prefix and _wkv_dir(args.prefix))
    if not path or not _wkv_dir(path):
        raise JaxkvError(
            "--kv-method wkvquant needs its learned parameters: --kv-params DIR, or --prefix DIR of "
            f"`jaxkv calibrate --kv-method wkvquant` (none found in {path or args.prefix})"
        )
    from jaxkv.wkvquant import restore_wkv

    return restore_wkv(_wkv_dir(path), model, kv)


# --- weight quantization (issue 3) ---------------------------------------------------------------


def _add_wq_args(p: argparse.ArgumentParser, default_bits: int = 16, saved: bool = True) -> None:
    """Weight-quantization flags; ``saved`` adds --quantized DIR (a saved quantized model instead)."""
    g = p.add_argument_group("weight quantization (16 bits = off)")
    g.add_argument("--wbits", type=int, default=default_bits, choices=(16, 8, 4, 3, 2))
    g.add_argument("--group", type=int, default=64, help="input rows per scale; -1 = per-channel")
    g.add_argument("--method", default="rtn", choices=("rtn", "gptq", "awq"))
    g.add_argument("--sym", action="store_true", help="symmetric (no zero points)")
    g.add_argument("--scale-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    g.add_argument("--calib-data", default="sotu-calib", help="GPTQ/AWQ calibration text (as --data)")
    g.add_argument("--calib-samples", type=int, default=128, help="GPTQ/AWQ calibration windows")
    g.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    g.add_argument("--act-order", action="store_true", help="GPTQ act-order (implies static groups)")
    if saved:
        g.add_argument(
            "--quantized", default=None, help="a saved quantized model (jaxkv quantize --out, HF GPTQ/AWQ)"
        )


def _wq_recipe(args):
    from jaxkv.quant import QuantRecipe

    return QuantRecipe(
        bits=args.wbits, group=args.group, method=args.method, sym=args.sym, scale_dtype=args.scale_dtype,
        calib_data=args.calib_data, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        act_order=args.act_order,
    )  # fmt: skip


def _load_wq(args, need_fp: bool = False):
    """``(fp_model, model)``: the model to run (--quantized DIR, else --model quantized per --wbits;
    16: as loaded) and, when ``need_fp`` (IntactKV prefixes, calibration), the full-precision --model
    it came from (else None)."""
    if getattr(args, "quantized", None):
        from jaxkv.quant.io import load_quantized

        return (_load(args) if need_fp else None), load_quantized(args.quantized)
    model = _load(args)
    if args.wbits == 16:
        return (model if need_fp else None), model
    from jaxkv.quant import quantize

    return (model if need_fp else None), quantize(model, _wq_recipe(args), progress=not args.no_progress)


# --- IntactKV prefixes (issue 5) -------------------------------------------------------------------


def _add_intactkv_args(p: argparse.ArgumentParser, pivots=("none", "bos", "system")) -> None:
    g = p.add_argument_group("IntactKV")
    g.add_argument(
        "--intactkv",
        default="none",
        choices=pivots,
        help="pivot tokens whose K/V come from the full-precision --model (bos: IntactKV[B], "
        "system: the chat template's system prompt, IntactKV[P])",
    )
    g.add_argument("--prefix", default=None, help="a saved prefix (jaxkv prefix/calibrate --out DIR)")


def _prefix_for(args, fp, model):
    """The IntactKV prefix asked for by --prefix or --intactkv (None for neither)."""
    from jaxkv.prefix import make_prefix

    if args.prefix:
        from jaxkv.checkpoint import restore_prefix

        return restore_prefix(_prefix_dir(args.prefix), model)
    if args.intactkv == "none":
        return None
    return make_prefix(fp, args.intactkv)


def _prefix_dir(path: str) -> str:
    """``jaxkv calibrate --out DIR`` keeps its prefix in DIR/prefix; accept either directory."""
    from pathlib import Path

    sub = Path(path) / "prefix"
    return str(sub) if (sub / "prefix.json").is_file() else path


def _wq_report(args, model) -> dict:
    from jaxkv.quant import quantized_bytes, weight_bytes, weight_bytes_fp16

    recipe = getattr(model, "recipe", None)
    if recipe is None and getattr(args, "quantized", None):
        from jaxkv.quant.io import saved_recipe

        recipe = saved_recipe(args.quantized)
    elif recipe is None and args.wbits != 16:
        recipe = _wq_recipe(args)
    qb, qfp = quantized_bytes(model.params)
    out = {
        "weight_bytes": weight_bytes(model.params),
        "weight_bytes_fp16": weight_bytes_fp16(model.params),
        "quantized_weight_bytes": qb,
        "quantized_weight_bytes_fp16": qfp,
    }
    if recipe is not None:
        out.update(wbits=recipe.bits, group=recipe.group, method=recipe.method, sym=recipe.sym)
    if getattr(args, "quantized", None):
        out["quantized"] = args.quantized
    return out


def cmd_quantize(args) -> int:
    from jaxkv.quant import quantize

    if args.wbits == 16:
        from jaxkv.errors import JaxkvError

        raise JaxkvError("--wbits 16 means no quantization; choose 8, 4, 3 or 2")
    model = _load(args)
    t0 = time.perf_counter()
    qm = quantize(model, _wq_recipe(args), progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    if args.format == "jaxkv":
        from jaxkv.quant.io import save_quantized

        path = save_quantized(args.out, qm, _wq_recipe(args))
    else:
        from jaxkv.quant.io import export_hf

        path = export_hf(args.out, qm.params, qm.cfg, fmt=args.format, tokenizer=qm.tokenizer)
    out = {"model": args.model, "out": str(path), "format": args.format, "seconds": seconds}
    out.update(_wq_report(args, qm))
    if args.json:
        print(json.dumps(out))
    else:
        ratio = out["quantized_weight_bytes"] / max(out["quantized_weight_bytes_fp16"], 1)
        print(f"saved {_wq_recipe(args).describe()} to {path} ({ratio:.3f}x fp16 for the quantized layers)")
    return 0


def _add_quantize_command(sub) -> None:
    p = sub.add_parser("quantize", help="quantize weights (RTN, GPTQ, AWQ) and save the packed model")
    _add_model_args(p)
    _add_wq_args(p, default_bits=4, saved=False)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format", default="jaxkv", choices=("jaxkv", "gptq", "awq"),
        help="jaxkv (Orbax + JSON), or a Hugging Face GPTQ/AWQ safetensors directory",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quantize)


# -------------------------------------------------------------------------------------------------


def cmd_prefix(args) -> int:
    from jaxkv.checkpoint import save_prefix
    from jaxkv.prefix import make_prefix

    model = _load(args)
    pivot = args.pivot
    if pivot not in ("bos", "system") and args.pivot_ids:
        pivot = [int(t) for t in pivot.split(",")]
    prefix = make_prefix(model, pivot)
    path = save_prefix(args.out, prefix, model)
    out = {"out": str(path), "pivot_tokens": list(prefix.tokens), "fingerprint": prefix.fingerprint}
    print(json.dumps(out) if args.json else f"prefix of {prefix.length} pivot tokens saved to {path}")
    return 0


def cmd_calibrate(args) -> int:
    from pathlib import Path

    import numpy as np

    from jaxkv.calibrate import CalibConfig, calibrate
    from jaxkv.checkpoint import restore_prefix, save_prefix
    from jaxkv.corpus import calibration_windows, load_text, tokenize
    from jaxkv.prefix import make_prefix

    cfg = CalibConfig(
        samples=args.samples, seqlen=args.seqlen, epochs=args.epochs, batch_size=args.batch_size,
        micro_batch=args.micro_batch, lr=args.lr, warmup_ratio=args.warmup, clip_norm=args.clip,
        loss=args.loss, seed=args.seed, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    fp, q = _load_wq(args, need_fp=True)
    out = Path(args.out)
    prefix = restore_prefix(_prefix_dir(args.prefix), fp) if args.prefix else make_prefix(fp, args.pivot)
    ids = tokenize(fp.tokenizer, load_text(args.data))
    kv = _kv_config(args, q)
    wkv = wkv_report = None
    if kv is not None and kv.method == "wkvquant":
        wkv, wkv_report = _calibrate_wkv(args, fp, q, kv, None if args.skip_prefix else prefix, ids, out)
        if args.skip_prefix:
            print(json.dumps(wkv_report) if args.json else f"wkvquant parameters saved to {out / 'kvquant'}")
            return 0
    # Text-only windows: the prefix precedes them, so a window holds seqlen - P tokens.
    windows = calibration_windows(ids, cfg.samples, cfg.seqlen - prefix.length, cfg.seed, bos_id=None)
    res = calibrate(
        fp, q, prefix, windows, cfg, checkpoint_dir=out / "checkpoints", resume=args.resume,
        progress=not args.no_progress, mesh=args.device_mesh, kv=kv, wkv=wkv,
    )  # fmt: skip
    report = {
        "out": str(out),
        "pivot_tokens": list(prefix.tokens),
        "steps": len(res.losses),
        "initial_loss": res.initial_loss,
        "final_loss": float(np.mean(res.losses[-cfg.steps_per_epoch :])) if res.losses else None,
        "seconds": res.seconds,
        "tokens_per_second": res.tokens_per_second,
        "calibration": dataclasses.asdict(cfg),
    }
    if wkv_report is not None:
        report["wkvquant"] = wkv_report
    save_prefix(out / "prefix", res.prefix, q, extra={"calibration": report})
    from jaxkv import distributed

    if distributed.is_main():
        (out / "calibration.json").write_text(json.dumps({**report, "losses": res.losses}, indent=1))
        _plot_losses(res.losses, res.initial_loss, out / "loss.png")
    print(json.dumps(report) if args.json else f"calibrated prefix saved to {out / 'prefix'}")
    return 0


def _calibrate_wkv(args, fp, q, kv, prefix, ids, out):
    """wkvquant parameters for ``q``: smoothing initialised from statistics, then CRR (unless
    --crr-epochs 0), on windows of pivot + text (the prefix's pivot, kept full precision, or [BOS],
    quantized, without one); saved to OUT/kvquant. With --resume a finished OUT/kvquant is reused."""
    from jaxkv.wkvquant import CRRConfig, crr_calibrate, pivot_windows, restore_wkv, save_wkv, smoothing_init

    done = out / "kvquant"
    if args.resume and (done / "wkvquant.json").is_file():
        from jaxkv.wkvquant import read_wkv_metadata

        return restore_wkv(done, q, kv), read_wkv_metadata(done).get("wkvquant")
    samples = args.crr_samples or args.samples
    pivot = list(prefix.tokens) if prefix is not None else [q.cfg.bos_token_id]
    windows = pivot_windows(ids, pivot, samples, args.seqlen, args.seed)
    params = smoothing_init(q, kv, windows, prefix)
    report = {"kv": kv.label(), "samples": samples, "seqlen": args.seqlen, "pivot_tokens": pivot,
              "pivot_full_precision": prefix is not None, "crr": None}  # fmt: skip
    if args.crr_epochs > 0:
        crr = CRRConfig(samples=samples, epochs=args.crr_epochs, batch_size=args.crr_batch_size, lr=args.crr_lr,
                        k=args.crr_k, clip_init=args.crr_clip_init, seed=args.seed)  # fmt: skip
        res = crr_calibrate(
            fp, q, kv, windows, params, crr, prefix=prefix, checkpoint_dir=out / "kvquant_checkpoints",
            resume=args.resume, progress=not args.no_progress,
        )  # fmt: skip
        params = res.params
        report["crr"] = {**dataclasses.asdict(crr), "initial_losses": res.initial_losses,
                         "final_losses": res.final_losses, "seconds": res.seconds}  # fmt: skip
    save_wkv(done, params, kv, q, extra={"wkvquant": report})
    return params, report


def _plot_losses(losses, initial, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, label="step loss")
    ax.axhline(initial, color="gray", ls="--", label="initial (exact FP prefix)")
    ax.set_xlabel("step")
    ax.set_ylabel("block-output MSE / 2, summed")
    ax.set_title("IntactKV prefix calibration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _add_prefix_commands(sub) -> None:
    p = sub.add_parser("prefix", help="build an IntactKV prefix from the full-precision model and save it")
    _add_model_args(p)
    p.add_argument("--pivot", default="bos", help="bos, system, a string, or comma-separated token ids")
    p.add_argument("--pivot-ids", action="store_true", help="read --pivot as comma-separated token ids")
    p.add_argument("--out", required=True, help="output directory (Orbax arrays + prefix.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_prefix)

    from jaxkv.calibrate import CalibConfig

    d = CalibConfig()
    p = sub.add_parser(
        "calibrate",
        help="calibrate an IntactKV prefix for a quantized model (MSE to the full-precision model)",
    )
    _add_model_args(p)
    p.add_argument("--pivot", default="bos", help="bos, system or a string (ignored with --prefix)")
    p.add_argument("--prefix", default=None, help="start from this saved prefix instead of --pivot")
    p.add_argument("--data", default="sotu-calib", help="calibration text (as eval ppl --data)")
    p.add_argument("--samples", type=int, default=d.samples, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per window, prefix included")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per optimiser step")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="windows per forward/backward")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=float, default=d.warmup_ratio, help="warmup fraction of all steps")
    p.add_argument("--clip", type=float, default=d.clip_norm, help="gradient global-norm clip")
    p.add_argument("--loss", default=d.loss, choices=("all", "last"), help="blocks in the loss")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps")
    p.add_argument("--out", required=True, help="output directory: prefix/, checkpoints/, loss.png")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true")
    _add_wq_args(p, default_bits=4)
    _add_kv_args(p, params=False)
    g = p.add_argument_group("wkvquant (--kv-method wkvquant): parameters learned first, then the prefix")
    g.add_argument("--crr-samples", type=int, default=None, help="CRR windows (default --samples)")
    g.add_argument("--crr-epochs", type=int, default=2, help="CRR epochs per block (0: smoothing init only)")
    g.add_argument("--crr-batch-size", type=int, default=1, help="CRR windows per step")
    g.add_argument("--crr-lr", type=float, default=5e-3, help="CRR AdamW learning rate")
    g.add_argument("--crr-k", type=int, default=5, help="blocks in the CRR loss (the paper's 5)")
    g.add_argument(
        "--crr-clip-init", type=float, default=4.0, help="initial clipping logits (sigmoid: 0.982)"
    )
    g.add_argument(
        "--skip-prefix", action="store_true", help="learn the wkvquant parameters only ([BOS] quantized)"
    )
    _add_scale_args(p)
    p.set_defaults(func=cmd_calibrate)


def cmd_fetch(args) -> int:
    from jaxkv.fetch import fetch

    path = fetch(args.name)
    print(path)
    return 0


def cmd_generate(args) -> int:
    from jaxkv.generate import generate_iter

    fp, model = _load_wq(args, need_fp=args.intactkv != "none" and not args.prefix)
    prefix = _prefix_for(args, fp, model)
    del fp
    tokenizer = model.tokenizer
    t0 = time.perf_counter()
    t_first = None
    generated: list[int] = []
    printed = ""
    eos = set(model.cfg.eos_token_ids)
    kv = _kv_config(args, model)
    wkv = _wkv_for(args, model, kv)
    if args.device_mesh is None:  # one device: fused projections, one buffer per layer (faster decode)
        from jaxkv.model import decode_layout

        model = dataclasses.replace(model, params=decode_layout(model.params))
    for piece, _ in generate_iter(
        model,
        prefix,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_len=args.max_len,
        chat=args.chat,
        chunk=1,
        prefill_chunk=args.prefill_chunk,
        kv=kv,
        wkv=wkv,
        mesh=args.device_mesh,
    ):
        if t_first is None:
            t_first = time.perf_counter()
        for tok in piece[0].tolist():
            if tok in eos:
                break
            generated.append(tok)
        # Decode the whole continuation each time: a token may end in the middle of a UTF-8 character.
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    n = len(generated)
    if args.stats:
        rate = (n - 1) / (t_end - t_first) if n > 1 else float("nan")
        print(
            f"[{n} tokens; first token after {t_first - t0:.2f} s; {rate:.1f} tokens/s after it]",
            file=sys.stderr,
        )
        if kv is not None:
            from jaxkv.kvcache import kv_report

            rep = kv_report(model.cfg, kv)
            print(
                f"[KV cache {kv.label()}: {rep['kv_bytes_per_token']:.0f} bytes/token, "
                f"{rep['kv_ratio_fp16']:.3f}x fp16]",
                file=sys.stderr,
            )
    return 0


def cmd_eval_ppl(args) -> int:
    from jaxkv.corpus import load_text
    from jaxkv.evaluate import make_windows, perplexity

    fp, model = _load_wq(args, need_fp=args.intactkv != "none" and not args.prefix)
    prefix = _prefix_for(args, fp, model)
    del fp
    text = load_text(args.data)
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    bos = model.cfg.bos_token_id
    if bos is None:
        from jaxkv.errors import JaxkvError

        raise JaxkvError(f"{args.model} has no BOS token; the perplexity protocol needs one")
    windows = make_windows(ids, bos, args.seqlen, args.windows)
    kv = _kv_config(args, model)
    wkv = _wkv_for(args, model, kv)
    tail = () if wkv is None else (wkv,)  # KVForward takes wkvquant parameters last
    forward_fn, params = None, model.params
    if prefix is not None:
        from jaxkv.model import KVForward
        from jaxkv.prefix import check_pivot

        if prefix.length != 1 or args.kv_pivot > 1:
            from jaxkv.errors import JaxkvError

            raise JaxkvError(
                "perplexity windows start with [BOS] only, so they take a one-token (bos) prefix; "
                f"this prefix has pivot tokens {list(prefix.tokens)}"
            )
        check_pivot(windows, prefix)
        forward_fn, params = KVForward(model.cfg, kv, intact=True), (model.params, prefix.k, prefix.v, *tail)
    elif kv is not None or args.kv_pivot:
        from jaxkv.model import KVForward

        forward_fn = KVForward(model.cfg, kv, args.kv_pivot)
        params = (model.params, *tail) if tail else model.params
    res = perplexity(
        params,
        model.cfg,
        windows,
        batch_size=args.batch_size,
        forward_fn=forward_fn,
        progress=not args.no_progress,
        mesh=args.device_mesh,
    )
    out = {
        "model": args.model,
        "data": args.data,
        "seqlen": args.seqlen,
        "windows": int(windows.shape[0]),
        "dtype": args.dtype,
        "ppl": res.ppl,
        "tokens": res.tokens,
        "seconds": res.seconds,
    }
    from jaxkv.kvcache import kv_report

    out.update(
        kv_report(model.cfg, kv),
        kv_pivot=args.kv_pivot,
        kv_params=_wkv_dir(args.kv_params or args.prefix or ".") if wkv else None,
    )
    out.update(intactkv=args.intactkv if prefix is None or not args.prefix else "prefix", prefix=args.prefix)
    out.update(_wq_report(args, model))
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"perplexity {res.ppl:.4f} over {res.tokens} tokens ({windows.shape[0]} windows, {res.seconds:.1f} s)"
        )
    return 0


def cmd_bench(args) -> int:
    from jaxkv import bench

    results = bench.run(args)
    print(bench.markdown(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxkv", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download an embedded model preset into the jaxkv cache")
    p.add_argument("name", help="preset name, e.g. smollm2-135m")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("generate", help="generate text, streaming tokens as they come")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: prompt + new tokens)")
    p.add_argument(
        "--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill call (bounds its memory)"
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--stats", action="store_true", help="print token counts and speed on stderr")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (GPTQ/AWQ calibration)")
    _add_kv_args(p)
    _add_wq_args(p)
    _add_intactkv_args(p)
    _add_scale_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="metric", required=True)
    p = esub.add_parser("ppl", help="perplexity with the IntactKV paper's window protocol")
    _add_model_args(p)
    p.add_argument("--data", default="sotu-eval", help="sotu-eval, sotu-calib, a text file, wikitext2 or c4")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=32, help="number of windows (0 = all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true")
    _add_kv_args(p, pivot=True)
    _add_wq_args(p)
    _add_intactkv_args(p, pivots=("none", "bos"))
    _add_scale_args(p)
    p.set_defaults(func=cmd_eval_ppl)

    p = sub.add_parser(
        "bench", help="decode/prefill speed of a shape preset with random weights, beside peers (GPU)"
    )
    from jaxkv import bench

    bench.add_args(p)
    p.set_defaults(func=cmd_bench)

    _add_quantize_command(sub)
    _add_prefix_commands(sub)
    from jaxkv.analyze import add_analyze_parser

    add_analyze_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "windows", None) == 0:
        args.windows = None
    from jaxkv.errors import JaxkvError

    try:
        _start(args)
        return args.func(args)
    except (JaxkvError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("JAXKV_DEBUG"):
            raise
        print(f"jaxkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
