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
