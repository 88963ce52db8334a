"""The Hugging Face transformers peer of ``jaxkv bench``: ``generate`` with a static cache on the
same shape with random bf16 weights, greedy, every sequence running to ``new_tokens`` (no EOS).

``--mode eager`` disables transformers' automatic ``torch.compile`` of the decode step;
``--mode compile`` keeps it (a static cache compiles the forward with ``mode="reduce-overhead"``,
i.e. CUDA graphs). ``--weights int4`` quantizes every linear layer but the LM head with torchao
(``Int4WeightOnlyConfig``, group 128, the ``tile_packed_to_4d`` format: PyTorch's own tinygemm kernel
``aten._weight_int4pack_mm``, no fbgemm), the public int4 decode path jaxkv compares against;
torchao is not a dependency of jaxkv (its wheel is pure Python plus optional extensions).
Prefill time = a ``generate`` of one new token; decode time per step = (time of the full
``generate`` - prefill time) / (new_tokens - 1); medians of ``--repeats`` after a warm-up.
Prints one JSON line (``python -m jaxkv.bench_hf --shape llama2-7b --batch 1 --prompt 128``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def hf_config(cfg):
    """A transformers ``LlamaConfig`` of the jaxkv ModelConfig ``cfg``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=max(cfg.max_position_embeddings, 8192),
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def label(args, torch_version: str) -> str:
    """The row name of a peer run: the library, its version, the mode, weights, batch and prompt."""
    import transformers

    lib = f"transformers {transformers.__version__}"
    if args.weights == "int4":
        import torchao

        who = f"{lib} + torchao {torchao.__version__} int4 g128 (torch {torch_version})"
    else:
        who = f"{lib} bf16 (torch {torch_version})"
    return f"{who} {args.mode} b{args.batch} p{args.prompt}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", choices=("eager", "compile"), default="eager")
    p.add_argument("--weights", choices=("bf16", "int4"), default="bf16")
    args = p.parse_args(argv)

    import torch
    from transformers import LlamaForCausalLM

    from jaxkv.config import shape_config

    cfg = shape_config(args.shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(hf_config(cfg), torch_dtype=torch.bfloat16).eval()
    if args.weights == "int4":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        quantize_(model.model, config)  # the decoder layers; the LM head stays bf16, as in jaxkv
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device="cuda")
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                cache_implementation="static", disable_compile=args.mode == "eager",
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        torch.cuda.synchronize()
        assert out.shape[1] == args.prompt + n
        return time.perf_counter() - t0

    gen(args.new_tokens)  # warm-up: compiles in compile mode
    gen(args.new_tokens)
    prefill = statistics.median(gen(1) for _ in range(args.repeats))
    full = statistics.median(gen(args.new_tokens) for _ in range(args.repeats))
    step = (full - prefill) / (args.new_tokens - 1)
    print(
        json.dumps(
            {
                "label": label(args, torch.__version__),
                "batch": args.batch,
                "prompt": args.prompt,
                "mode": args.mode,
                "ms_per_token": step * 1e3,
                "decode_tokens_per_s": args.batch / step,
                "prefill_tokens_per_s": args.batch * args.prompt / prefill,
                "peak_bytes": torch.cuda.max_memory_allocated(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
