"""scripts/epilogue_sweep.py without a GPU: its cases check against numpy in Pallas' interpreter,
and the trace's kernels split into cases and calls."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import epilogue_sweep  # noqa: E402


def test_trace_splits_into_cases_and_calls():
    """Two cases 20 ms apart (the host's pause), 3 calls each of 2 and 1 launches, after a profiler
    launch of its own: per-call medians and launch counts."""
    us = 1e6 * epilogue_sweep.PAUSE_S
    kernels = [(0.0, "profiler", 1.0)]
    t = 2 * us
    for a, b in ((2.0, 3.0), (2.5, 3.0), (9.0, 3.0)):  # case 1: two launches a call
        kernels += [(t, "x", a), (t + 10, "y", b)]
        t += 50
    t += 2 * us
    for a in (1.0, 4.0, 2.0):  # case 2: one launch a call
        kernels.append((t, "z", a))
        t += 50
    assert epilogue_sweep.per_call(kernels, 2, 3) == [(5.5, 2), (2.0, 1)]
    with pytest.raises(RuntimeError, match="cases"):
        epilogue_sweep.per_call(kernels, 3, 3)


def test_cases_match_numpy_in_the_interpreter(monkeypatch):
    """Every case (the XLA version and one tile of each epilogue) against its float32 reference."""
    import jax

    from jaxkv.kernels import epilogue

    for name in ("qkv_rope", "residual_norm", "silu_mul"):
        monkeypatch.setattr(epilogue, name, functools.partial(getattr(epilogue, name), interpret=True))
    cases = epilogue_sweep.cases([128], [4])
    assert [c[:2] for c in cases] == [
        ("qkv_rope", "xla"), ("qkv_rope", "4 warps"),
        ("residual_norm O", "xla"), ("residual_norm O", "128 columns, 4 warps"),
        ("residual_norm down", "xla"), ("residual_norm down", "128 columns, 4 warps"),
        ("silu_mul", "xla"), ("silu_mul", "128 columns, 4 warps"),
    ]  # fmt: skip
    for _, _, fn, args, ref in cases:
        got = np.asarray(jax.tree.leaves(fn(*args))[0], np.float64).reshape(ref.shape)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 4e-3  # bf16 outputs
