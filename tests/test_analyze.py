"""Pivot analysis: attention probabilities and hidden states against transformers, pivot detection, the
error-vs-intact-pivots curve, and the ``analyze`` command's files.

One tiny Llama (3 layers, GQA) with a planted pivot is shared by every test, so that jit compilations are
shared too: BOS's embedding is one huge channel (a massive activation that survives every block), and
every other token carries a constant channel that its queries map onto the low-frequency rotary pair
where BOS's key sits, so all heads attend to BOS (an attention sink).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv import analyze as A

D, H, NH, KH = 64, 16, 4, 2
BOS, MASSIVE, SHARED = 1, 0, 1  # BOS id; BOS's massive channel; the channel every other token carries
SEQLEN, NWIN, EARLY, MAX_INTACT = 32, 3, 4, 3


def _planted_hf_model(out_dir):
    import tokenizers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=D, intermediate_size=128, num_hidden_layers=3, num_attention_heads=NH,
        num_key_value_heads=KH, head_dim=H, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=BOS, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
        emb = model.model.embed_tokens.weight
        emb.mul_(10)
        emb[:, SHARED] = 1.0
        emb[BOS] = 0.0
        emb[BOS, MASSIVE] = 1000.0
        for layer in model.model.layers:
            # Lowest-frequency rotary pair of each head: the query-key product barely depends on distance.
            for h in range(NH):
                layer.self_attn.q_proj.weight[h * H + H // 2 - 1, SHARED] = 3.0
            for h in range(KH):
                layer.self_attn.k_proj.weight[h * H + H // 2 - 1, MASSIVE] = 3.0
    model.save_pretrained(out_dir)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 128)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return model.eval()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """``(hf_model, jaxkv LoadedModel, model dir, data file, windows)``."""
    from jaxkv.load import load

    out = tmp_path_factory.mktemp("planted")
    hf = _planted_hf_model(out / "model")
    rng = np.random.default_rng(0)
    data = out / "text.txt"
    data.write_text(" ".join(f"w{i}" for i in rng.integers(3, 128, size=NWIN * SEQLEN + 50)))
    model = load(str(out / "model"))
    windows = A.load_windows(model, str(data), SEQLEN, NWIN)
    return hf, model, out / "model", data, windows


@pytest.fixture(scope="module")
def cli_run(planted, tmp_path_factory):
    """The ``analyze`` command run once on the planted model; returns its output directory."""
    _, _, model_dir, data, _ = planted
    parser = argparse.ArgumentParser()
    A.add_analyze_parser(parser.add_subparsers(dest="command"))
    out = tmp_path_factory.mktemp("analysis")
    args = parser.parse_args(
        ["analyze", "--model", str(model_dir), "--data", str(data), "--out", str(out / "res"),
         "--windows", str(NWIN), "--seqlen", str(SEQLEN), "--early", str(EARLY),
         "--max-intact", str(MAX_INTACT), "--no-progress"]
    )  # fmt: skip
    assert args.func(args) == 0
    return out / "res"


def test_attention_and_hidden_states_match_transformers(planted):
    import torch

    hf, model, _, _, windows = planted
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = hf(
            torch.as_tensor(windows, dtype=torch.long), output_attentions=True, output_hidden_states=True
        )
    cfg = model.cfg
    positions = jnp.broadcast_to(jnp.arange(SEQLEN, dtype=jnp.int32), windows.shape)
    xs = np.asarray(A.hidden_states(model.params, jnp.asarray(windows), positions, cfg))
    L = cfg.num_layers
    assert xs.shape == (L + 1, NWIN, SEQLEN, D) and len(ref.hidden_states) == L + 1
    # Every entry but the last is a block input; transformers normalises its last entry.
    for l in range(L):
        want = ref.hidden_states[l].numpy()
        np.testing.assert_allclose(xs[l], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"{l}")
    probs = np.asarray(A.attention_probs(model.params, jnp.asarray(xs), positions, cfg))
    assert probs.shape == (L, NWIN, NH, SEQLEN, SEQLEN)
    for l in range(L):
        np.testing.assert_allclose(probs[l], ref.attentions[l].numpy(), atol=1e-5, err_msg=f"layer {l}")
    # The planted sink: every head of layer 0 puts most of its attention on BOS.
    assert probs[0, :, :, EARLY:, 0].mean() > 0.9


def test_intact_kv_paths_agree_with_a_pivot_segment(planted):
    """``quantized_outputs`` (FP K/V in the first body slots, earlier tokens as padding) and ``attention``
    with a pivot give what the model computes with a real pivot segment (``calibrate.block_outputs``)."""
    from jaxkv.calibrate import block_outputs
    from jaxkv.model import dense, rms_norm
    from jaxkv.prefix import make_prefix

    _, model, _, _, windows = planted
    cfg, params = model.cfg, model.params
    n = 1  # every window starts with BOS, so a one-token pivot segment serves the whole batch
    prefix = make_prefix(model, [BOS])
    body = jnp.asarray(windows[:, n:])
    want = block_outputs(params, cfg, (prefix.k, prefix.v), body, n)  # [L, B, T-n, D]
    fp_k, fp_v = _fp_kv(model, windows)
    outs, attn = A._quantized_outputs(params, fp_k, fp_v, jnp.asarray(windows), n, cfg)
    np.testing.assert_allclose(np.asarray(outs[:, :, n:]), np.asarray(want), rtol=1e-5, atol=1e-3)

    positions = jnp.broadcast_to(jnp.arange(n, SEQLEN, dtype=jnp.int32), body.shape)

    @jax.jit
    def blocks(params, pk, pv):
        pk, pv = (jnp.broadcast_to(a[:, None], (a.shape[0], NWIN, *a.shape[1:])) for a in (pk, pv))
        x, ys, attns, probs = jnp.take(params["embed"], body, axis=0), [], [], []
        for l in range(cfg.num_layers):
            lp = jax.tree.map(lambda a, l=l: a[l], params["layers"])
            p, a = A.attention(lp, x, positions, cfg, pk[l], pv[l])
            y = x + a
            h = rms_norm(y, lp["mlp_norm"], cfg.rms_norm_eps)
            ys.append(y + dense(jax.nn.silu(dense(h, lp["w_gate"])) * dense(h, lp["w_up"]), lp["w_down"]))
            attns.append(a)
            probs.append(p)
            x = want[l]  # the next block starts from the model's own output: errors do not compound
        return jnp.stack(ys), jnp.stack(attns), jnp.stack(probs)

    ys, attn_ref, probs = blocks(params, prefix.k, prefix.v)
    assert probs.shape == (cfg.num_layers, NWIN, NH, SEQLEN - n, SEQLEN)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(want), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(attn[:, :, n:]), np.asarray(attn_ref), rtol=1e-5, atol=1e-4)


def _fp_kv(model, windows):
    from jaxkv.prefix import make_prefix

    prefixes = [make_prefix(model, w[:MAX_INTACT].tolist()) for w in windows]
    return jnp.stack([p.k for p in prefixes]), jnp.stack([p.v for p in prefixes])


def test_detect_pivots_synthetic():
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(6, 2, 16, 8)).astype(np.float32)  # [L+1, B, T, D]: blocks 0..4
    xs[2:5, 0, 0] *= 100  # blocks 1..3: window 0, position 0
    xs[2:5, 1, 5] *= 100  # blocks 1..3: window 1, position 5 (a pivot beyond position 0)
    xs[1, 1, 9] *= 100  # block 0 only: large once, not a pivot
    ratios = A.norm_ratios(xs)
    assert ratios.shape == (5, 2, 16)
    got = A.detect_pivots(ratios, threshold=16.0, min_frac=0.5)
    assert got["outlier_layers"] == [0, 1, 2, 3]
    assert [(b, t) for b, t, *_ in got["pivots"]] == [(0, 0), (1, 5)]
    assert [k for _, _, k, _ in got["pivots"]] == [3, 3]
    assert got["counts"] == [1, 2, 2, 2, 0]
    assert got["runners_up"][0][:3] == (1, 9, 1) and len(got["runners_up"]) == 5
    # A stricter rule (every outlier layer) drops them; nothing over the threshold finds nothing.
    assert A.detect_pivots(ratios, 16.0, 1.0)["pivots"] == []
    assert A.detect_pivots(A.norm_ratios(rng.normal(size=(3, 2, 16, 8))), 16.0)["pivots"] == []


def test_cli_writes_summary_and_plots(cli_run):
    names = {p.name for p in cli_run.iterdir()}
    assert names == {
        "summary.json", "massive_activations.png", "attention_share.png", "error_vs_intact.png",
        "pivot_counts.png",
    }  # fmt: skip
    for name in names - {"summary.json"}:
        assert (cli_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((cli_run / "summary.json").read_text())
    assert s["quantizer"] in ("jaxkv.quant.quantize", "jaxkv.quant.rtn") and s["recipe"] == "W3 g64 rtn"
    assert s["windows"] == NWIN and s["seqlen"] == SEQLEN and s["data"].endswith("text.txt")


def test_planted_pivot_is_found_and_intact_kv_helps(cli_run):
    s = json.loads((cli_run / "summary.json").read_text())
    m = s["massive"]
    for r in m["per_layer"]:  # the massive activation at position 0 survives every block
        assert r["pos0_absmax"] > 500 > 20 * r["other_absmax"] and r["pos0_channel"] == MASSIVE
    share = np.asarray(s["attention_share"]["per_layer"])
    assert share.shape == (3, EARLY) and share[:, 0].min() > 0.3 and np.all(share.sum(1) <= 1 + 1e-6)
    pv = s["pivots"]
    assert [(p["window"], p["position"], p["token"]) for p in pv["tokens"]] == [
        (b, 0, "<s>") for b in range(NWIN)
    ]
    assert pv["by_position"] == {"0": NWIN} and pv["non_initial"] == []
    e = s["error"]
    block, attn = np.asarray(e["block_mse"]), np.asarray(e["attn_mse"])
    assert e["n"] == list(range(MAX_INTACT + 1)) and block.shape == attn.shape == (MAX_INTACT + 1, 3)
    # The paper's curve: keeping BOS intact removes much of the error; the sink takes nearly all attention,
    # so further intact tokens change little (float noise may move the curve by far less than 0.1%).
    mean = block.mean(1)
    assert mean[1] < 0.7 * mean[0] and attn.mean(1)[1] < 0.7 * attn.mean(1)[0]
    assert e["max_relative_increase"] < 1e-3 and np.all(mean[1:] <= mean[1] * (1 + 1e-3))
    assert np.all(block > 0)


def test_error_curve_is_exact_where_it_must_be(planted):
    """With the full-precision weights every error is zero; with only BOS's embedding changed, every error
    is zero as soon as BOS's K/V are kept intact (n >= 1), and not before."""
    _, model, _, _, windows = planted
    N = MAX_INTACT
    fp = A._fp_pass(model, windows, EARLY)[:2]
    exact = A.error_curve(model, model.params, windows, N, fp=fp, progress=False)
    assert np.abs(exact.block_mse).max() < 1e-9 and np.abs(exact.attn_mse).max() < 1e-9
    params = dict(model.params)
    params["embed"] = model.params["embed"].at[BOS].set(model.params["embed"][5])  # BOS loses its outlier
    curve = A.error_curve(model, params, windows, N, fp=fp, progress=False)
    assert curve.block_mse[0].min() > 1e-2 and curve.attn_mse[0].min() > 1e-2
    assert np.abs(curve.block_mse[1:]).max() < 1e-9 and np.abs(curve.attn_mse_remaining[1:]).max() < 1e-9
