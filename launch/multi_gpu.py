#!/usr/bin/env python3
"""Run a jaxkv command on several GPUs of one host: one process for all of them, or one per GPU.

* ``--mode single`` (default): one process sees every selected GPU (``CUDA_VISIBLE_DEVICES``) and
  shards over them through its mesh. Simplest, and what tensor-parallel decode wants.
* ``--mode per-gpu``: one process per GPU joined by JAX's distributed runtime on 127.0.0.1 (the
  process layout of a multi-host run, on one host: useful to test it, or when per-process host
  memory or input pipelines matter). Each process gets ``CUDA_VISIBLE_DEVICES=<its GPU>`` and
  ``JAXKV_COORDINATOR_ADDRESS``, ``JAXKV_NUM_PROCESSES``, ``JAXKV_PROCESS_ID``, which
  ``jaxkv.distributed.initialize`` reads. Process 0 prints to the terminal; the others write
  ``<log-dir>/process-<i>.log``. If one process fails the others are stopped.

``--dry-run`` prints each process's environment and command. Example::

    python launch/multi_gpu.py --gpus 0,1 --mesh tensor=2 -- generate --model smollm2-135m --prompt Hi
    python launch/multi_gpu.py --gpus 4 --mode per-gpu --mesh data=4 -- calibrate --model ...
    python launch/multi_gpu.py --gpus 2 --raw -- python scripts/gpu_sharding_check.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MODES = ("single", "per-gpu")


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """One process to start: the environment it adds and its command line."""

    env: dict[str, str]
    argv: tuple[str, ...]
    log: str | None  # None: inherit the terminal

    def __str__(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}" + (f" > {self.log} 2>&1" if self.log else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Arguments after -- form the jaxkv command."
    )
    p.add_argument("--gpus", default="all", help="a count (first N GPUs), a list like 0,2,3, or all")
    p.add_argument("--mode", choices=MODES, default="single")
    p.add_argument("--mesh", default=None, help="--mesh passed to the command")
    p.add_argument("--port", type=int, default=None, help="coordinator port (per-gpu; default: a free one)")
    p.add_argument("--log-dir", default="multi_gpu_logs")
    p.add_argument(
        "--raw", action="store_true", help="the arguments after -- are a full command, not jaxkv's"
    )
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if not command:
        p.error("give the command after --, e.g. -- calibrate --model ...")
    args.command = command
    return args


def gpu_ids(spec: str, visible: int | None = None) -> list[str]:
    """GPU ids from ``--gpus``: ``all`` needs ``visible`` (the host's GPU count)."""
    if spec == "all":
        if not visible:
            raise SystemExit("multi_gpu: no GPU found (nvidia-smi); pass --gpus")
        return [str(i) for i in range(visible)]
    if "," in spec:
        return [s.strip() for s in spec.split(",") if s.strip()]
    n = int(spec)
    if n < 1:
        raise SystemExit("multi_gpu: --gpus must be >= 1")
    return [str(i) for i in range(n)]


def count_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def plan(args, gpus: list[str], port: int) -> list[ProcessSpec]:
    """The processes to start (the launcher's whole behaviour; tested as such)."""
    cmd = list(args.command) if args.raw else ["jaxkv", *args.command]
    if args.mesh and "--mesh" not in cmd:
        cmd += ["--mesh", args.mesh]
    if args.mode == "single":
        return [ProcessSpec({"CUDA_VISIBLE_DEVICES": ",".join(gpus)}, tuple(cmd), None)]
    procs = []
    for i, gpu in enumerate(gpus):
        env = {
            "CUDA_VISIBLE_DEVICES": gpu,
            "JAXKV_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAXKV_NUM_PROCESSES": str(len(gpus)),
            "JAXKV_PROCESS_ID": str(i),
        }
        procs.append(
            ProcessSpec(env, tuple(cmd), None if i == 0 else str(Path(args.log_dir) / f"process-{i}.log"))
        )
    return procs


def run(procs: list[ProcessSpec]) -> int:
    """Start every process, wait for all; on the first failure stop the rest. Returns the worst status."""
    running = []
    for spec in procs:
        out = None
        if spec.log:
            Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
            out = open(spec.log, "w")  # noqa: SIM115 - closed when the process ends
        p = subprocess.Popen(
            spec.argv, env={**os.environ, **spec.env}, stdout=out, stderr=subprocess.STDOUT if out else None
        )
        running.append((p, out))
    status = 0
    try:
        while running:
            for p, out in list(running):
                rc = p.poll()
                if rc is None:
                    continue
                running.remove((p, out))
                if out:
                    out.close()
                if rc and not status:
                    status = rc
                    for q, _ in running:
                        q.send_signal(signal.SIGTERM)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for q, _ in running:
            q.send_signal(signal.SIGINT)
        return 130
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpus = gpu_ids(args.gpus, None if args.gpus != "all" else count_gpus())
    port = args.port or (free_port() if args.mode == "per-gpu" else 0)
    procs = plan(args, gpus, port)
    if args.dry_run:
        for spec in procs:
            print(spec)
        return 0
    return run(procs)


if __name__ == "__main__":
    sys.exit(main())
