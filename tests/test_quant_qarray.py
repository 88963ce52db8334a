"""QArray: bit-exact packing, RTN equal to a float64 numpy llm-awq reference, matmul, storage bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.quant import qarray as qa
from jaxkv.quant.qarray import QArray


def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit-by-bit reference: per column, code k occupies bits [k*bits, (k+1)*bits) of a LE byte stream."""
    I, O = codes.shape
    out = np.zeros((I * bits // 8, O), np.uint8)
    for k in range(I):
        for b in range(bits):
            bit = (codes[k].astype(np.int64) >> b) & 1
            pos = k * bits + b
            out[pos // 8] |= (bit << (pos % 8)).astype(np.uint8)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_bitwise_reference_at_boundary_codes(bits):
    maxq = 2**bits - 1
    rng = np.random.default_rng(bits)
    I = 48
    cols = [
        np.zeros(I),  # all 0
        np.full(I, maxq),  # all max
        np.tile([0, maxq], I // 2),  # alternating extremes
        np.tile([maxq, 0, 1, maxq - 1], I // 4),
        np.arange(I) % (maxq + 1),  # every code
        rng.integers(0, maxq + 1, I),
    ]
    codes = np.stack(cols, axis=1).astype(np.uint8)
    packed = np.asarray(qa.pack(jnp.asarray(codes), bits))
    assert packed.dtype == np.uint8 and packed.shape == (I * bits // 8, len(cols))
    np.testing.assert_array_equal(packed, np_pack(codes, bits))
    np.testing.assert_array_equal(np.asarray(qa.unpack(jnp.asarray(packed), bits)), codes)


def test_pack_known_bytes():
    col = lambda v: jnp.asarray(np.array(v, np.uint8)[:, None])  # noqa: E731
    assert np.asarray(qa.pack(col([1, 2]), 4)).ravel().tolist() == [0x21]
    assert np.asarray(qa.pack(col([3, 0, 1, 2]), 2)).ravel().tolist() == [0b10_01_00_11]
    # 3-bit codes 0..7: bitstream 000 001 010 011 100 101 110 111 (LSB first) = 0x88, 0xC6, 0xFA
    assert np.asarray(qa.pack(col(list(range(8))), 3)).ravel().tolist() == [0x88, 0xC6, 0xFA]
    assert np.asarray(qa.pack(col([7] * 8), 3)).ravel().tolist() == [0xFF] * 3


def test_pack_leading_axes_and_errors():
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 8, (3, 16, 5)), jnp.uint8)
    p = qa.pack(codes, 3)
    assert p.shape == (3, 6, 5)
    np.testing.assert_array_equal(qa.unpack(p, 3), codes)
    with pytest.raises(ValueError, match="multiple of 8"):
        qa.pack(jnp.zeros((12, 2), jnp.uint8), 3)
    with pytest.raises(ValueError, match="not supported"):
        qa.pack(jnp.zeros((8, 2), jnp.uint8), 5)


def np_pseudo_quantize(w_oi: np.ndarray, n_bit: int, group: int, zero_point=True, scale_dtype=np.float64):
    """llm-awq ``pseudo_quantize_tensor`` in float64 numpy, on a torch-layout [out, in] weight.

    Returns (codes [out, in], dequantized [out, in]); symmetric codes are offset by 2^(n_bit-1).
    The one addition: scales are rounded to ``scale_dtype`` (the storage) before use; for float64
    this is the formula verbatim.
    """
    shape = w_oi.shape
    w = w_oi.astype(np.float64).reshape(-1, group)
    if zero_point:
        max_val, min_val = w.max(axis=1, keepdims=True), w.min(axis=1, keepdims=True)
        max_int, min_int = 2**n_bit - 1, 0
        scales = np.maximum(max_val - min_val, 1e-5) / max_int
        scales = scales.astype(scale_dtype).astype(np.float64)
        zeros = np.clip(-np.round(min_val / scales), min_int, max_int)
    else:
        max_val = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-5)
        max_int, min_int = 2 ** (n_bit - 1) - 1, -(2 ** (n_bit - 1))
        scales = (max_val / max_int).astype(scale_dtype).astype(np.float64)
        zeros = 0
    q = np.clip(np.round(w / scales) + zeros, min_int, max_int)
    deq = (q - zeros) * scales
    codes = q if zero_point else q + 2 ** (n_bit - 1)
    return codes.reshape(shape), deq.reshape(shape)


def _test_weight(seed):
    rng = np.random.default_rng(seed)
    w_io = rng.standard_normal((128, 24)) * 0.05
    w_io[:, 3] += 0.3  # a skewed column: zero point far from the middle
    w_io[5:37, 7] = 0.0  # a constant group: hits the 1e-5 clamp
    w_io[64:96, 9] = np.linspace(-0.3, 0.45, 32)  # lands on exact .5 ties of w / scale
    return w_io


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_equals_float64_llm_awq_reference_exactly(bits, sym):
    w_io = _test_weight(10 * bits + sym)
    want_codes, want_deq = np_pseudo_quantize(w_io.T, bits, 32, zero_point=not sym)
    with jax.enable_x64(True):
        q = qa.quantize_tensor(jnp.asarray(w_io), bits, 32, sym=sym, scale_dtype=jnp.float64)
        codes = np.asarray(qa.codes_of(q))
        deq = np.asarray(qa.dequantize(q, jnp.float64))
    np.testing.assert_array_equal(codes, want_codes.T)
    np.testing.assert_array_equal(deq, want_deq.T)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bits", [3, 4])
def test_rtn_float32_model_equals_reference_with_stored_scales(scale_dtype, bits):
    w = _test_weight(bits).astype(np.float32)
    sd = np.dtype(jnp.dtype(scale_dtype))
    want_codes, want_deq = np_pseudo_quantize(w.T, bits, 32, scale_dtype=sd)
    q = qa.quantize_tensor(jnp.asarray(w), bits, 32, scale_dtype=sd)
    assert q.scale.dtype == sd
    np.testing.assert_array_equal(np.asarray(qa.codes_of(q)), want_codes.T)
    # (q - z) * s is exact in float64 and rounds once to float32, as the float32 product does.
    np.testing.assert_array_equal(np.asarray(qa.dequantize(q)), want_deq.T.astype(np.float32))


def test_traced_rtn_matches_host_rtn_codes():
    w = jnp.asarray(_test_weight(5), jnp.float32)
    host = qa.quantize_tensor(w, 4, 32)
    traced = jax.jit(lambda w: qa.quantize_tensor(w, 4, 32))(w)
    assert np.mean(np.asarray(qa.codes_of(host)) == np.asarray(qa.codes_of(traced))) > 0.99


def test_scale_dtype_codes_use_stored_scale():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 16)) * 0.02, jnp.float32)
    for sd in (jnp.bfloat16, jnp.float16):
        q = qa.quantize_tensor(w, 4, 32, scale_dtype=sd)
        assert q.scale.dtype == sd and q.zero.dtype == jnp.uint8
        s = q.scale.astype(jnp.float32)
        z = q.zero.astype(jnp.float32)
        expect = jnp.clip(jnp.round(w.reshape(2, 32, 16) / s[:, None]) + z[:, None], 0, 15).reshape(64, 16)
        np.testing.assert_array_equal(qa.codes_of(q), expect.astype(jnp.uint8))


def test_qarray_is_a_pytree_with_static_metadata_and_scan_slices_it():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((3, 64, 32)) * 0.05, jnp.float32)
    q = qa.quantize_tensor(w, 3, 16)
    assert isinstance(q, QArray) and q.shape == (3, 64, 32) and q.dtype == np.float32
    leaves = jax.tree.leaves(q)
    assert [x.shape for x in leaves] == [(3, 24, 32), (3, 4, 32), (3, 4, 32)]
    assert q[1].shape == (64, 32) and q[1].bits == 3
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 64)), jnp.float32)

    def body(h, wl):
        return h, qa.matmul(h, wl)

    # Full float32 matmuls: on GPU, XLA's default precision (TF32) would make both sides inexact.
    with jax.default_matmul_precision("highest"):
        _, ys = jax.lax.scan(body, x, q)
        for l in range(3):
            np.testing.assert_allclose(ys[l], x @ qa.dequantize(q[l]), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        q[0, 1]


@pytest.mark.parametrize("rows", [1, 40])  # the grouped path (decode) and the dequantize path (prefill)
@pytest.mark.parametrize("sym", [False, True])
def test_matmul_paths_equal_dequantized_matmul(rows, sym):
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((128, 48)) * 0.05, jnp.float32)
    q = qa.quantize_tensor(w, 4, 32, sym=sym)
    x = jnp.asarray(rng.standard_normal((rows, 128)), jnp.float32)
    ref = x @ qa.dequantize(q)
    np.testing.assert_allclose(jax.jit(qa.matmul)(x, q), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qa.einsum("...i,io->...o", x, q), ref, rtol=1e-5, atol=1e-5)
    xb = x.astype(jnp.bfloat16)
    out = qa.matmul(xb, q.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=0.05, atol=0.05)


def test_group_must_divide_input_dim():
    w = jnp.zeros((576, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"group size 128 does not divide its input dimension 576"):
        qa.quantize_tensor(w, 4, 128, name="layers/wq")
    assert qa.quantize_tensor(w, 4, -1).group == 576  # per-channel


def test_nbytes_storage_counts_real_bytes():
    w = jnp.zeros((2, 576, 1536), jnp.float32)
    for bits, sym in [(4, False), (3, False), (2, True), (8, False)]:
        q = qa.quantize_tensor(w, bits, 64, sym=sym, scale_dtype=jnp.float16)
        ng = 576 // 64
        expect = 2 * (576 * bits // 8 * 1536 + ng * 1536 * 2 + (0 if sym else ng * 1536))
        assert q.nbytes_storage() == expect
        assert qa.weight_bytes({"w": q}) == expect
        assert qa.weight_bytes_fp16({"w": q}) == 2 * 2 * 576 * 1536


def np_oi_bytes(codes: np.ndarray, group: int) -> np.ndarray:
    """The decode layout from its definition, byte by byte: packed[o, g*group/2 + j] holds input
    g*group + j (low nibble) and g*group + group/2 + j (high nibble) of column o."""
    I, O = codes.shape
    half = group // 2
    out = np.zeros((O, I // 2), np.uint8)
    for o in range(O):
        for g in range(I // group):
            for j in range(half):
                out[o, g * half + j] = codes[g * group + j, o] | (codes[g * group + half + j, o] << 4)
    return out


@pytest.mark.parametrize("group,sym", [(32, False), (64, True), (-1, False)])
def test_decode_layout_oi_is_the_same_weight(group, sym):
    """``to_layout(q, "oi")``: bytes as defined, the same logical shape, codes and dequantized values
    (so the XLA matmul agrees too), indexable on the stacked axis, and back to identical bytes."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((2, 128, 48)), jnp.float32)
    q = qa.quantize_tensor(w, 4, group, sym=sym)
    oi = qa.to_layout(q, "oi")
    g = 128 if group == -1 else group
    assert oi.layout == "oi" and oi.packed.shape == (2, 48, 64) and oi.shape == q.shape == (2, 128, 48)
    np.testing.assert_array_equal(np.asarray(oi.packed[1]), np_oi_bytes(np.asarray(qa.codes_of(q)[1]), g))
    np.testing.assert_array_equal(np.asarray(qa.codes_of(oi)), np.asarray(qa.codes_of(q)))
    np.testing.assert_array_equal(np.asarray(qa.dequantize(oi)), np.asarray(qa.dequantize(q)))
    assert oi[1].shape == (128, 48) and "layout=oi" in repr(oi)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(qa.matmul(x, oi[0])), np.asarray(qa.matmul(x, q[0])))
    x = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)  # many rows: dequantize, one matmul
    np.testing.assert_allclose(
        np.asarray(qa.matmul(x, oi[1])), np.asarray(qa.matmul(x, q[1])), rtol=1e-5, atol=1e-5
    )
    back = qa.to_layout(oi, "io")
    assert back.layout == "io"
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(q.packed))


def test_decode_layout_oi_8bit_is_the_transposed_codes():
    rng = np.random.default_rng(6)
    q = qa.quantize_tensor(jnp.asarray(rng.standard_normal((2, 64, 48)), jnp.float32), 8, 32)
    oi = qa.to_layout(q, "oi")
    assert oi.packed.shape == (2, 48, 64) and oi.shape == q.shape
    np.testing.assert_array_equal(np.asarray(oi.packed), np.swapaxes(np.asarray(q.packed), -1, -2))
    np.testing.assert_array_equal(np.asarray(qa.dequantize(oi)), np.asarray(qa.dequantize(q)))
    x = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)  # many rows: dequantize as stored
    np.testing.assert_allclose(
        np.asarray(qa.matmul(x, oi[0])), np.asarray(qa.matmul(x, q[0])), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(qa.to_layout(oi, "io").packed), np.asarray(q.packed))


def test_decode_layout_oi_rejects_other_bit_widths():
    q = qa.quantize_tensor(jnp.ones((64, 32), jnp.float32), 3, 32)
    with pytest.raises(ValueError, match="4- and 8-bit"):
        qa.to_layout(q, "oi")
    with pytest.raises(ValueError, match="unknown QArray layout"):
        qa.to_layout(q, "cols")
    assert qa.decode_layout_for(q, 8) == "io"  # no GPU kernel here (CPU), and not 4- or 8-bit
