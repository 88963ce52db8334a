"""The ``jaxkv`` command line: thin wrappers that parse flags and call the library.

Every command that fails on bad input prints one line ``jaxkv: error: ...`` on stderr and exits with
status 2; no traceback reaches the user (set ``JAXKV_DEBUG=1`` to see one). Commands with ``--json``
print exactly one JSON object on stdout; progress bars and logs go to stderr.
"""

from __future__ import annotations

import argparse
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


def _add_kv_args(p: argparse.ArgumentParser, pivot: bool = False) -> None:
    g = p.add_argument_group("KV cache quantization (16 bits = off)")
    g.add_argument("--kbits", type=int, default=16, choices=(16, 8, 4, 3, 2), help="key bits")
    g.add_argument("--vbits", type=int, default=16, choices=(16, 8, 4, 3, 2), help="value bits")
    g.add_argument(
        "--kv-group", type=int, default=32, help="group size: tokens (per-channel keys), channels else"
    )
    g.add_argument("--kv-residual", type=int, default=0, help="recent tokens kept at full precision")
    g.add_argument("--kv-mode", default="past-only", choices=("past-only", "all"))
    g.add_argument("--kv-key-granularity", default="per-channel", choices=("per-channel", "per-token"))
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


def _kv_config(args, model):
    from jaxkv.kvcache import make_kv_config

    return make_kv_config(
        model.params, model.cfg, kbits=args.kbits, vbits=args.vbits, group=args.kv_group,
        residual=args.kv_residual, mode=args.kv_mode, k_granularity=args.kv_key_granularity,
        scale_dtype=args.kv_scale_dtype, budget=args.kv_budget,
    )  # fmt: skip


# --- weight quantization (issue 3) ---------------------------------------------------------------


def _add_wq_args(p: argparse.ArgumentParser, for_eval: bool = True) -> None:
    g = p.add_argument_group("weight quantization (16 bits = off)")
    g.add_argument("--wbits", type=int, default=16 if for_eval else 4, choices=(16, 8, 4, 3, 2))
    g.add_argument("--group", type=int, default=64, help="input rows per scale; -1 = per-channel")
    g.add_argument("--method", default="rtn", choices=("rtn", "gptq", "awq"))
    g.add_argument("--sym", action="store_true", help="symmetric (no zero points)")
    g.add_argument("--scale-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    g.add_argument("--calib-data", default="sotu-calib", help="GPTQ/AWQ calibration text (as --data)")
    g.add_argument("--calib-samples", type=int, default=128, help="GPTQ/AWQ calibration windows")
    g.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    g.add_argument("--act-order", action="store_true", help="GPTQ act-order (implies static groups)")
    if for_eval:
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


def _load_wq(args):
    """The model to evaluate: --quantized DIR, else --model quantized per --wbits (16: as loaded)."""
    if getattr(args, "quantized", None):
        from jaxkv.quant.io import load_quantized

        return load_quantized(args.quantized)
    model = _load(args)
    if args.wbits == 16:
        return model
    from jaxkv.quant import quantize

    return quantize(model, _wq_recipe(args), progress=not args.no_progress)


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
    _add_wq_args(p, for_eval=False)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format", default="jaxkv", choices=("jaxkv", "gptq", "awq"),
        help="jaxkv (Orbax + JSON), or a Hugging Face GPTQ/AWQ safetensors directory",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quantize)


# -------------------------------------------------------------------------------------------------


def cmd_fetch(args) -> int:
    from jaxkv.fetch import fetch

    path = fetch(args.name)
    print(path)
    return 0


def cmd_generate(args) -> int:
    from jaxkv.generate import generate_iter

    model = _load(args)
    tokenizer = model.tokenizer
    t0 = time.perf_counter()
    t_first = None
    generated: list[int] = []
    printed = ""
    eos = set(model.cfg.eos_token_ids)
    kv = _kv_config(args, model)
    for piece, _ in generate_iter(
        model,
        None,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_len=args.max_len,
        chat=args.chat,
        chunk=1,
        kv=kv,
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

    model = _load_wq(args)
    text = load_text(args.data)
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    bos = model.cfg.bos_token_id
    if bos is None:
        from jaxkv.errors import JaxkvError

        raise JaxkvError(f"{args.model} has no BOS token; the perplexity protocol needs one")
    windows = make_windows(ids, bos, args.seqlen, args.windows)
    kv = _kv_config(args, model)
    forward_fn = None
    if kv is not None or args.kv_pivot:
        from jaxkv.model import KVForward

        forward_fn = KVForward(model.cfg, kv, args.kv_pivot)
    res = perplexity(
        model.params,
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

    out.update(kv_report(model.cfg, kv), kv_pivot=args.kv_pivot)
    out.update(_wq_report(args, model))
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"perplexity {res.ppl:.4f} over {res.tokens} tokens ({windows.shape[0]} windows, {res.seconds:.1f} s)"
        )
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
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--stats", action="store_true", help="print token counts and speed on stderr")
    _add_kv_args(p)
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
    _add_scale_args(p)
    p.set_defaults(func=cmd_eval_ppl)

    _add_quantize_command(sub)
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
