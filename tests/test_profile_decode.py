"""scripts/profile_decode.py's trace reading on a synthetic Perfetto trace: only GPU stream kernels
count, per-step sums, categories, and the launch sequence with the idle gap before each kernel."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import profile_decode  # noqa: E402


def _trace(path: Path) -> str:
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "python"}},
    ]
    kernels = [  # two decode steps, listed out of order
        (10.0, "qmatmul_int4_gemv", 12.0),
        (23.0, "input_reduce_fusion_3", 2.0),
        (26.0, "kv_decode_k4v2", 5.0),
        (40.0, "qmatmul_int4_gemv", 12.0),
        (52.5, "input_reduce_fusion_3", 2.5),
        (56.0, "loop_add_fusion", 1.0),
    ]
    events = [{"ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": d, "name": n} for ts, n, d in kernels[::-1]]
    events.append(
        {"ph": "X", "pid": 2, "tid": 1, "ts": 5.0, "dur": 100.0, "name": "host work"}
    )  # not a kernel
    f = path / "t.trace.json.gz"
    with gzip.open(f, "wt") as fh:
        json.dump({"traceEvents": meta + events}, fh)
    return str(f)


def test_trace_summary_categories_and_sequence(tmp_path):
    path = _trace(tmp_path)
    ks = profile_decode.gpu_kernels(path)
    assert [k[1] for k in ks] == [
        "qmatmul_int4_gemv", "input_reduce_fusion_3", "kv_decode_k4v2", "qmatmul_int4_gemv",
        "input_reduce_fusion_3", "loop_add_fusion",
    ]  # fmt: skip
    rows = {r["kernel"]: r for r in profile_decode.summarise(ks, steps=2)}
    assert rows["qmatmul_int4_gemv"] == {
        "kernel": "qmatmul_int4_gemv",
        "launches_per_step": 1.0,
        "us_per_step": 12.0,
    }
    assert rows["input_reduce_fusion_3"]["us_per_step"] == 2.25
    cats = profile_decode.categorise(list(rows.values()))
    assert cats["quantized matmul (Pallas)"]["us_per_step"] == 12.0
    assert cats["decode attention (Pallas)"] == {"us_per_step": 2.5, "launches_per_step": 0.5}
    assert cats["other (elementwise, copies)"]["launches_per_step"] == 0.5
    seq = tmp_path / "s.tsv"
    profile_decode.write_sequence(ks, seq)
    lines = [line.split("\t") for line in seq.read_text().splitlines()]
    assert lines[0] == ["start_us", "us", "gap_us", "kernel"]
    # gaps: end of one kernel to the start of the next (the first has none)
    assert [float(row[2]) for row in lines[1:]] == [0.0, 1.0, 1.0, 9.0, 0.5, 1.0]
    assert [row[3] for row in lines[1:]] == [k[1] for k in ks]
