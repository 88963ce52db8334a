"""The Mosaic GPU int4 decode-matmul candidate (``jaxkv.kernels.mgpu_gemv``) on a machine without a
GPU: its numerics in Mosaic GPU's interpreter (the left operand staged through shared memory, as
that interpreter's wgmma needs) against float64 numpy, and its register-operand version lowered for
CUDA (layout inference and the Mosaic GPU dialect lowering run here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.kernels import mgpu_gemv
from jaxkv.kernels import qmatmul as qk


@pytest.mark.parametrize(
    "M,I,O,split,block_o", [(1, 512, 128, 2, 64), (3, 256, 192, 1, 64), (1, 512, 256, 2, 128)]
)
def test_mgpu_gemv_matches_float64_in_the_interpreter(M, I, O, split, block_o):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    group = 128
    rng = np.random.default_rng(M + I)
    codes = rng.integers(0, 16, (I, O)).astype(np.uint8)
    scale = (rng.random((I // group, O)) * 0.02 + 0.001).astype(np.float16)
    zero = rng.integers(0, 16, (I // group, O)).astype(np.uint8)
    x = jnp.asarray(rng.normal(size=(M, I)), jnp.bfloat16)
    wt, s, b = mgpu_gemv.pack_weight(jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(zero))
    assert wt.dtype == jnp.int4 and wt.shape == (O, I)
    y = mgpu_gemv.matmul(
        x, wt, s, b, split=split, block_o=block_o, interpret=InterpretGPUParams(), a_in_smem=True
    )
    assert y.shape == (M, O) and y.dtype == jnp.bfloat16
    ref = qk.reference(np.asarray(x, np.float64), codes, scale, zero, group)
    assert np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref) < 6e-3


@pytest.mark.parametrize("block_o", [64, 256])
def test_mgpu_gemv_lowers_for_cuda(block_o):
    S = jax.ShapeDtypeStruct
    I, O, G = 1024, 256, 8
    args = (S((O, I), jnp.int4), S((I, 16), jnp.bfloat16), S((G, O), jnp.bfloat16), S((G, O), jnp.bfloat16))
    f = jax.jit(lambda *a: mgpu_gemv.gemv(*a, split=2, block_o=block_o))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(ValueError, match="split 3"):
        mgpu_gemv.gemv(*[jnp.zeros(a.shape, a.dtype) for a in args], split=3)
