"""Multi-host: a real two-process run on localhost through ``jax.distributed`` (CPU backend, gloo
collectives) agrees with the single-process run (calibration with Orbax checkpoints and a resume,
perplexity with and without the prefix, generation); flag/environment resolution of the settings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxkv import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # As in test_sharding: LLVM optimisation of tiny programs costs more than running them.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    for name in (
        "JAXKV_COORDINATOR_ADDRESS",
        "JAX_COORDINATOR_ADDRESS",
        "JAXKV_NUM_PROCESSES",
        "JAXKV_PROCESS_ID",
    ):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--out", str(out), *extra],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two processes x 2 CPU devices on mesh data=2,tensor=2, and the single-process reference."""
    multi, single = tmp_path_factory.mktemp("two_process"), tmp_path_factory.mktemp("one_process")
    port = str(free_port())
    procs = [
        spawn(multi, "--num-processes", "2", "--process-id", str(i), "--port", port, "--cpu-devices", "2")
        for i in range(2)
    ]
    procs.append(spawn(single))
    logs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(stderr)
        assert p.returncode == 0, stderr[-6000:]
    read = lambda d, i: json.loads((d / f"result-{i}.json").read_text())  # noqa: E731
    return {"p0": read(multi, 0), "p1": read(multi, 1), "ref": read(single, 0), "logs": logs}


def test_two_process_calibration_and_evaluation_agree_with_one_process(runs):
    p0, p1, ref = runs["p0"], runs["p1"], runs["ref"]
    assert (p0["num_processes"], p0["global_devices"], p0["mesh"]) == (2, 4, "data=2,fsdp=1,tensor=2")
    assert (ref["num_processes"], ref["mesh"]) == (1, "none")
    # calibration: the same losses and the same trained prefix (which did move)
    np.testing.assert_allclose(p0["losses"], ref["losses"], rtol=1e-5)
    np.testing.assert_allclose(p0["initial_loss"], ref["initial_loss"], rtol=1e-5)
    assert ref["k_change"] > 1e-5
    for name in ("k", "v"):
        np.testing.assert_allclose(p0[name], ref[name], atol=1e-5)
        assert p0[name] == p1[name]  # every process reads the same global result
    # Orbax multi-host checkpoints: the resumed run restores the final step and has nothing left to do
    assert p0["resumed_steps"] == 0 and p0["resumed_k_equal"] and p1["resumed_k_equal"]
    assert p0["restored_prefix_equal"] and p1["restored_prefix_equal"]  # save_prefix / restore_prefix
    # evaluation: perplexity with and without the calibrated prefix
    assert p0["tokens"] == ref["tokens"]
    for name in ("ppl", "ppl_prefixed", "nll_sum"):
        np.testing.assert_allclose(p0[name], ref[name], rtol=1e-5)
        assert p0[name] == p1[name]


def test_two_process_generate_agrees_with_one_process(runs):
    assert runs["p0"]["generated"] == runs["p1"]["generated"] == runs["ref"]["generated"]
    assert len(runs["ref"]["generated"]) == 2


def test_only_process_zero_logs(runs):
    p0_log, p1_log, _ = runs["logs"]
    assert "[process 0 of 2] mesh data=2,fsdp=1,tensor=2" in p0_log
    assert "[process 0" not in p1_log


def test_settings_from_flags_and_environment(monkeypatch):
    for name in ("JAXKV_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "JAXKV_NUM_PROCESSES",
                 "JAXKV_PROCESS_ID", "JAXKV_DISTRIBUTED"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert distributed.settings() is None  # single process
    assert distributed.settings(mode="on") == {}  # let JAX detect the cluster (Cloud TPU)
    assert distributed.settings("h:1234", 2, 1) == {
        "coordinator_address": "h:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    monkeypatch.setenv("JAXKV_COORDINATOR_ADDRESS", "10.0.0.1:8476")
    monkeypatch.setenv("JAXKV_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXKV_PROCESS_ID", "3")
    assert distributed.settings() == {
        "coordinator_address": "10.0.0.1:8476",
        "num_processes": 4,
        "process_id": 3,
    }
    assert distributed.settings(process_id=0)["process_id"] == 0  # flags win over the environment
    assert distributed.settings(mode="off") is None
    monkeypatch.setenv("JAXKV_DISTRIBUTED", "off")
    assert distributed.settings() is None
    monkeypatch.delenv("JAXKV_DISTRIBUTED")
    monkeypatch.delenv("JAXKV_PROCESS_ID")
    with pytest.raises(distributed.DistributedError, match="process_id not given"):
        distributed.settings()
    # on a managed cluster JAX fills in what is missing
    assert distributed.settings(mode="on") == {"coordinator_address": "10.0.0.1:8476", "num_processes": 4}
    monkeypatch.setenv("JAXKV_PROCESS_ID", "x")
    with pytest.raises(distributed.DistributedError, match="not an integer"):
        distributed.settings()
    with pytest.raises(distributed.DistributedError, match=r"process_id must lie in \[0, 2\)"):
        distributed.settings("h:1", 2, 2)
    with pytest.raises(distributed.DistributedError, match="mode"):
        distributed.settings(mode="maybe")


def test_single_process_initialize_is_a_no_op(monkeypatch):
    monkeypatch.delenv("JAXKV_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    info = distributed.initialize(mode="auto")
    assert info.num_processes == 1 and info.is_main and distributed.is_main()
    distributed.barrier("nothing to wait for")
