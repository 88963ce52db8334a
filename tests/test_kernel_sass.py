"""scripts/kernel_sass.py on a machine without a GPU: the kernels lower for CUDA to Triton IR here
(the part that needs no triton package), and the SASS listing parser counts opcodes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import kernel_sass  # noqa: E402


@pytest.mark.parametrize("name,warps", [("merge", None), ("qmm8", 2), ("qmm8oi", 2)])
def test_kernels_lower_to_triton_ir(tmp_path, name, warps):
    launch = kernel_sass.lower(name, tmp_path, warps)
    ir = (tmp_path / f"{name}.ttir").read_text()
    assert "tt.func public" in ir and "tt.dot" in ir  # a Triton kernel with its tensor-core products
    assert launch["warps"] == (warps or 1)


@pytest.mark.parametrize("name", ["epi-qkv", "epi-down"])
def test_epilogue_launches_lower_to_triton_ir(tmp_path, name):
    """The batch-1 epilogues (``epilogue.launch``, 4 warps) lower for CUDA."""
    launch = kernel_sass.lower(name, tmp_path, None)
    ir = (tmp_path / f"{name}.ttir").read_text()
    assert "tt.func public" in ir and "tt.load" in ir and "tt.atomic_rmw" not in ir
    assert launch == {"warps": 4, "stages": 1}


@pytest.mark.parametrize("which", ["qkv", "o", "silu", "down"])
def test_epilogues_lower_for_cuda_at_smollm2_shapes(which):
    """SmolLM2-135M's sizes (hidden 576 = 9 blocks of 64, so 9 partial sums of squares; 9 + 2 x 3
    heads of 64; FFN 1536): every epilogue lowers for CUDA, whose Triton blocks must all be powers
    of two (a ``[9, 1]`` load is not)."""
    import jax

    fn, args, _, _ = kernel_sass.epilogue_case(which, D=576, F=1536, N=9, K=3, H=64, group=64)
    assert "epilogue_" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_unknown_kernel_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown kernel"):
        kernel_sass.lower("attention", tmp_path, None)


def test_sass_counts_opcodes_without_predicates_or_modifiers():
    listing = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 LDS.U8 R4, [R2+0x10] ;                     /* 0x0000100002047984 */
        /*0020*/               @P1 HMMA.16816.F32.BF16 R8, R12, R16, R8 ;    /* 0x000000100c08723c */
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R18, R8 ;    /* 0x000000120c08723c */
        /*0040*/                   EXIT ;                                    /* 0x000000000000794d */
"""
    counts = kernel_sass.sass_counts(listing)
    assert counts == {"LDC": 1, "LDS": 1, "HMMA": 2, "EXIT": 1}
    assert kernel_sass.byte_shared_loads(listing) == 1


def _lower_instead_of_timing(monkeypatch, qc) -> list[str]:
    """Make ``qmatmul_candidates`` lower each jitted candidate for CUDA (two weight copies) where it
    would time it, and fail it there, so nothing runs; returns the lowered texts as they come."""
    lowered = []

    def lower_instead(f, *args, **kw):
        lowered.append(f.trace(*args).lower(lowering_platforms=("cuda",)).as_text())
        raise RuntimeError("lowered, not run")

    monkeypatch.setattr(qc, "_time", lower_instead)
    monkeypatch.setattr(qc, "COPIES", 2)
    return lowered


def test_mosaic_mixed_candidate_lowers_for_cuda(monkeypatch):
    """``qmatmul_candidates.mosaic_mixed_candidate`` (JAX's Mosaic GPU mixed-type matmul as a one-row
    product) lowers for CUDA on a machine without a GPU: its tile fits a decode shape. The timing is
    replaced by the lowering, so nothing runs."""
    import jax.numpy as jnp
    import qmatmul_candidates as qc
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    class SMs:  # the kernel's persistent grid is one program per SM of the default device
        core_count = 132

    monkeypatch.setattr(mixed.backend, "get_default_device", lambda: SMs())
    lowered = _lower_instead_of_timing(monkeypatch, qc)
    qc.mosaic_mixed_candidate(jnp.ones((1, 256), jnp.bfloat16), 128, lambda *a, **k: None)
    assert len(lowered) == 1 and "mosaic_gpu" in lowered[0]


def test_mosaic_own_candidate_lowers_each_split_for_cuda(monkeypatch):
    """``qmatmul_candidates.mosaic_own_candidate`` tries every split of the groups that leaves 2 to
    16 per program (here 4 groups: splits 1 and 2), each lowered for CUDA instead of timed."""
    import jax.numpy as jnp
    import qmatmul_candidates as qc

    from jaxkv.kernels import mgpu_gemv

    lowered = _lower_instead_of_timing(monkeypatch, qc)
    w = mgpu_gemv.pack_weight(
        jnp.zeros((512, 128), jnp.uint8), jnp.ones((4, 128), jnp.float16), jnp.zeros((4, 128), jnp.uint8)
    )
    qc.mosaic_own_candidate(jnp.ones((1, 512), jnp.bfloat16), [w, w], 128, lambda *a, **k: None)
    assert len(lowered) == 2 and all("mosaic_gpu" in t for t in lowered)


def test_gpu_time_is_the_traced_kernels_time_per_call(monkeypatch):
    """``qmatmul_candidates --gpu-time``: the GPU kernels of a profiler trace of the calls, summed
    and divided by the calls; a trace without GPU kernels (this CPU) is refused."""
    import jax
    import jax.numpy as jnp
    import profile_decode
    import qmatmul_candidates as qc

    f = jax.jit(lambda x: x * 2)
    with pytest.raises(RuntimeError, match="needs a GPU"):
        qc._gpu_time(f, (jnp.ones(4),), calls=2)
    monkeypatch.setattr(profile_decode, "gpu_kernels", lambda path: [(0.0, "a", 30.0), (40.0, "b", 10.0)])
    assert qc._gpu_time(f, (jnp.ones(4),), calls=2) == pytest.approx(20e-6)
