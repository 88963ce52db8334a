"""Persistence: Orbax save/restore (bitwise identical logits) and the Hugging Face GPTQ/AWQ layouts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.config import ModelConfig
from jaxkv.errors import CheckpointError
from jaxkv.model import forward_jit
from jaxkv.params import init_params
from jaxkv.quant import QArray, QuantRecipe, quantize
from jaxkv.quant import qarray as qa
from jaxkv.quant.io import (
    awq_pack_cols,
    export_hf,
    gptq_pack_rows,
    import_hf,
    is_hf_quantized,
    load_quantized,
    read_metadata,
    restore_quantized,
    save_quantized,
)


@dataclasses.dataclass(frozen=True)
class Model:
    cfg: ModelConfig
    params: dict
    tokenizer: object = None
    name: str = "tiny"
    source: str = "/nowhere/tiny"
    kind: str = "hf"
    fingerprint: str = "0123456789abcdef"
    dtype: str = "float32"
    recipe: object = None


def tiny_model(tie=False, bias=False):
    cfg = ModelConfig(vocab_size=80, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, tie_word_embeddings=tie, attention_bias=bias)  # fmt: skip
    return Model(cfg, init_params(cfg, jax.random.key(7)))


TOKS = np.random.default_rng(0).integers(0, 80, (2, 12)).astype(np.int32)


def logits(params, cfg):
    pos = jnp.broadcast_to(jnp.arange(TOKS.shape[1]), TOKS.shape)
    return np.asarray(forward_jit(params, jnp.asarray(TOKS), pos, cfg))


def assert_trees_identical(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("recipe", [QuantRecipe(bits=3, group=16), QuantRecipe(bits=4, group=32, sym=True,
                                    scale_dtype="bfloat16", include=("layers/.*", "lm_head"), exclude=("layers/.*norm",))])  # fmt: skip
def test_save_restore_bitwise_identical_logits(tmp_path, recipe):
    qm = quantize(tiny_model(), recipe)
    assert qm.recipe == recipe
    save_quantized(tmp_path / "q", qm)
    meta = read_metadata(tmp_path / "q")
    assert meta["recipe"] == recipe.to_dict() and meta["model"]["fingerprint"] == qm.fingerprint
    assert meta["qarrays"]["layers/wq"]["bits"] == recipe.bits
    ck = restore_quantized(tmp_path / "q")
    assert ck.recipe == recipe and ck.cfg == qm.cfg
    assert_trees_identical(ck.params, qm.params)
    np.testing.assert_array_equal(logits(ck.params, ck.cfg), logits(qm.params, qm.cfg))
    lm = load_quantized(tmp_path / "q")
    assert lm.fingerprint == qm.fingerprint and lm.cfg == qm.cfg  # prefixes of the FP model still match
    assert isinstance(lm.params["layers"]["w_down"], QArray)


def test_save_writes_the_canonical_packing_of_decode_layout_weights(tmp_path):
    """Weights repacked for the decode kernel (``"oi"``) are saved in the canonical packing: the
    checkpoint equals that of the unrepacked model, byte for byte."""
    qm = quantize(tiny_model(), QuantRecipe(bits=4, group=32))
    oi = dataclasses.replace(
        qm, params=jax.tree.map(lambda w: qa.to_layout(w, "oi") if isinstance(w, QArray) else w, qm.params,
                                is_leaf=lambda w: isinstance(w, QArray))
    )  # fmt: skip
    assert oi.params["layers"]["wq"].layout == "oi"
    save_quantized(tmp_path / "oi", oi)
    ck = restore_quantized(tmp_path / "oi")
    assert ck.params["layers"]["wq"].layout == "io"
    assert_trees_identical(ck.params, qm.params)


def test_restore_detects_corruption(tmp_path):
    qm = quantize(tiny_model(), QuantRecipe(bits=4, group=32))
    save_quantized(tmp_path / "q", qm)
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "q" / "quant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checksum"):
        restore_quantized(tmp_path / "q")
    with pytest.raises(CheckpointError, match="no quant.json"):
        restore_quantized(tmp_path)


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ ``QuantLinear.pack``'s loop (intweight [in, out]) -> qweight uint32 [in*bits/32, out]."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values in 3 words, crossing word boundaries
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_equals_autogptq_and_qarray_bytes(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (64, 6)).astype(np.uint8)
    codes[:32, 0] = 2**bits - 1  # boundary codes
    codes[32:, 0] = 0
    want = autogptq_pack(codes, bits)
    np.testing.assert_array_equal(gptq_pack_rows(codes, bits).view(np.uint32), want)
    # The QArray packing is the same bitstream, viewed as little-endian bytes.
    packed = np.asarray(qa.pack(jnp.asarray(codes), bits))
    np.testing.assert_array_equal(
        packed, want.astype("<u4").view(np.uint8).reshape(-1, 6, 4).transpose(0, 2, 1).reshape(-1, 6)
    )


def test_awq_packing_equals_autoawq_order():
    codes = np.random.default_rng(0).integers(0, 16, (5, 16)).astype(np.uint8)
    packed = awq_pack_cols(codes).view(np.uint32)
    # AutoAWQ dequantize_gemm: unpack nibbles in shift order, then undo the order with [0, 4, 1, 5, 2, 6, 3, 7].
    nib = (packed[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    nib = nib.reshape(5, 16)
    order = np.arange(16).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    np.testing.assert_array_equal(nib[:, order], codes)


@pytest.mark.parametrize("bits, tie", [(2, False), (3, True), (4, False), (8, True)])
def test_hf_gptq_export_import_round_trip(tmp_path, bits, tie):
    qm = quantize(tiny_model(tie=tie, bias=tie), QuantRecipe(bits=bits, group=32, sym=bits == 2))
    export_hf(tmp_path / "hf", qm.params, qm.cfg, fmt="gptq")
    assert is_hf_quantized(tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["quantization_config"]["bits"] == bits and hf["quantization_config"]["group_size"] == 32
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (64 * bits // 32, 64)
    assert t["model.layers.0.self_attn.q_proj.qweight"].dtype == np.int32
    assert t["model.layers.1.mlp.down_proj.scales"].shape == (4, 64)
    if bits != 2:  # v1 stores zero - 1
        z = np.asarray(qm.params["layers"]["wk"].zero[0]).astype(np.int64) - 1
        np.testing.assert_array_equal(
            t["model.layers.0.self_attn.k_proj.qzeros"].view(np.uint32),
            autogptq_pack((z & (2**bits - 1)).T, bits).T,
        )
    cfg, params, qc = import_hf(tmp_path / "hf")
    assert cfg == qm.cfg and qc["quant_method"] == "gptq"
    assert_trees_identical(params, qm.params)
    np.testing.assert_array_equal(logits(params, cfg), logits(qm.params, qm.cfg))


def test_hf_awq_export_import_round_trip(tmp_path):
    qm = quantize(tiny_model(), QuantRecipe(bits=4, group=32))
    export_hf(tmp_path / "awq", qm.params, qm.cfg, fmt="awq")
    cfg, params, qc = import_hf(tmp_path / "awq")
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    assert_trees_identical(params, qm.params)
    np.testing.assert_array_equal(logits(params, cfg), logits(qm.params, qm.cfg))


def test_hf_import_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    qm = quantize(tiny_model(), QuantRecipe(bits=4, group=32))
    export_hf(tmp_path / "hf", qm.params, qm.cfg)
    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.g_idx"] = np.random.default_rng(0).permutation(
        t["model.layers.0.mlp.up_proj.g_idx"]
    )
    save_file(t, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="g_idx"):
        import_hf(tmp_path / "hf")
    t["model.layers.0.mlp.up_proj.g_idx"] = np.sort(t["model.layers.0.mlp.up_proj.g_idx"])
    t["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(t, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not mapped.*extra"):
        import_hf(tmp_path / "hf")
    with pytest.raises(Exception, match="4-bit"):
        export_hf(
            tmp_path / "x", quantize(tiny_model(), QuantRecipe(bits=3, group=32)).params, qm.cfg, fmt="awq"
        )
