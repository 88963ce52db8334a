"""Launchers: the gcloud commands of launch/tpu_pod.py (checked as text: no TPU here) and the process
layout of launch/multi_gpu.py (run for real on CPU in per-gpu mode: the environment it sets starts
JAX's distributed runtime)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


tpu_pod = load("tpu_pod")
multi_gpu = load("multi_gpu")

BASE = ["--name", "pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32"]


def commands(argv: list[str]) -> list[str]:
    return [str(s) for s in tpu_pod.plan(tpu_pod.parse_args(argv))]


def test_tpu_pod_direct_create_install_run_fetch():
    cmds = commands(
        [*BASE, "--project", "proj", "--mesh", "data=2,tensor=4", "--", "calibrate", "--model", "m"]
    )
    assert cmds[0] == (
        "gcloud compute tpus tpu-vm create pod --accelerator-type=v4-32 --version=tpu-ubuntu2204-base "
        "--zone=us-central2-b --project=proj"
    )
    assert any(c.startswith("git -C ") and "archive --format=tar.gz --prefix=jaxkv/" in c for c in cmds)
    scp = next(c for c in cmds if " tpu-vm scp " in c and "jaxkv-src.tar.gz" in c)
    assert scp.endswith("--worker=all")
    install = next(c for c in cmds if "pip install" in c)
    assert "--worker=all" in install and "'jax[tpu]'" in install and "install -q ./jaxkv" in install
    run = next(c for c in cmds if "jaxkv calibrate" in c)
    assert (
        "--worker=all" in run
        and "JAXKV_DISTRIBUTED=on jaxkv calibrate --model m --mesh data=2,tensor=4" in run
    )
    assert "--out jaxkv-out" in run
    # a local --remote-out comes back from worker 0, where process 0 wrote it
    assert cmds[-1] == "gcloud compute tpus tpu-vm scp --recurse pod:jaxkv-out tpu-outputs --zone=us-central2-b --project=proj --worker=0"  # fmt: skip
    assert not any(" delete " in c for c in cmds)


def test_tpu_pod_queued_spot_gcs_outputs_mesh_file_and_delete():
    argv = [*BASE, "--accelerator-type", "v5litepod-16", "--queued", "--spot", "--valid-until-duration", "6h",
            "--mesh", str(ROOT / "configs/mesh/pod-fsdp4-tp4.yaml"), "--remote-out", "gs://b/run",
            "--steps", "create,run,fetch,delete", "--", "calibrate", "--out", "gs://b/x"]  # fmt: skip
    cmds = commands(argv)
    assert cmds[0].startswith("gcloud compute tpus queued-resources create pod-qr --node-id=pod ")
    assert "--runtime-version=v2-alpha-tpuv5-lite" in cmds[0] and "--spot" in cmds[0]
    assert "--valid-until-duration=6h" in cmds[0]
    assert "queued-resources describe pod-qr" in cmds[1] and "repeat until it prints ACTIVE" in cmds[1]
    assert not any("pip install" in c for c in cmds)  # install not requested
    run = next(c for c in cmds if "jaxkv calibrate" in c)
    # the YAML is turned into a spec string (workers need no copy); the command's own --out is kept
    assert "--mesh data=-1,fsdp=4,tensor=4,indivisible=error" in run and run.count("--out") == 1
    assert "gcloud storage cp --recursive gs://b/run tpu-outputs" in cmds
    assert (
        cmds[-1] == "gcloud compute tpus queued-resources delete pod-qr --zone=us-central2-b --force --quiet"
    )


def test_tpu_pod_pip_source_and_errors(capsys):
    cmds = commands([*BASE, "--source", "git+https://example.com/jaxkv@v1", "--steps", "install"])
    assert len(cmds) == 1 and "python3 -m pip install -q git+https://example.com/jaxkv@v1" in cmds[0]
    with pytest.raises(SystemExit):
        tpu_pod.parse_args([*BASE, "--steps", "create,launch"])
    assert "unknown steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpu_pod.parse_args(["--name", "p", "--zone", "z", "--accelerator-type", "v9-8"])
    assert "--runtime-version" in capsys.readouterr().err


def test_tpu_pod_dry_run_prints_every_command_and_runs_none(capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("dry run executed a command")

    monkeypatch.setattr(tpu_pod.subprocess, "run", refuse)
    assert tpu_pod.main([*BASE, "--queued", "--steps", ",".join(tpu_pod.STEPS), "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == commands([*BASE, "--queued", "--steps", ",".join(tpu_pod.STEPS)])
    assert len(printed) == 10 and "jaxkv calibrate --out jaxkv-out" in printed[6]


def test_multi_gpu_plans():
    args = multi_gpu.parse_args(["--gpus", "0,3", "--mesh", "tensor=2", "--", "generate", "--prompt", "a b"])
    (one,) = multi_gpu.plan(args, multi_gpu.gpu_ids(args.gpus), 0)
    assert str(one) == "CUDA_VISIBLE_DEVICES=0,3 jaxkv generate --prompt 'a b' --mesh tensor=2"
    args = multi_gpu.parse_args(["--gpus", "3", "--mode", "per-gpu", "--", "calibrate"])
    procs = multi_gpu.plan(args, multi_gpu.gpu_ids(args.gpus), 4321)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in procs] == ["0", "1", "2"]
    assert [p.env["JAXKV_PROCESS_ID"] for p in procs] == ["0", "1", "2"]
    assert {p.env["JAXKV_COORDINATOR_ADDRESS"] for p in procs} == {"127.0.0.1:4321"}
    assert {p.env["JAXKV_NUM_PROCESSES"] for p in procs} == {"3"}
    assert procs[0].log is None and procs[2].log.endswith("process-2.log")
    assert procs[0].argv == ("jaxkv", "calibrate")
    with pytest.raises(SystemExit):
        multi_gpu.gpu_ids("all", 0)


def test_multi_gpu_per_gpu_processes_join_jax_distributed(tmp_path):
    """Two real processes (CPU backend) started by the launcher form one JAX runtime."""
    script = (
        "import json, sys; from jaxkv import distributed; i = distributed.initialize(); "
        "import jax; print(json.dumps([i.process_id, i.num_processes, jax.device_count()]))"
    )
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "multi_gpu.py"), "--gpus", "2", "--mode", "per-gpu",
         "--log-dir", str(tmp_path), "--raw", "--", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, 2, 2]
    assert json.loads((tmp_path / "process-1.log").read_text().strip().splitlines()[-1]) == [1, 2, 2]


def test_multi_gpu_failure_stops_the_rest(tmp_path):
    script = "import os, sys, time; sys.exit(3) if os.environ['JAXKV_PROCESS_ID'] == '1' else time.sleep(60)"
    args = multi_gpu.parse_args(["--gpus", "2", "--mode", "per-gpu", "--log-dir", str(tmp_path), "--raw",
                                 "--", sys.executable, "-c", script])  # fmt: skip
    assert multi_gpu.run(multi_gpu.plan(args, ["0", "1"], 1)) == 3
