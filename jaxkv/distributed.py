"""Multi-host runs on JAX's distributed runtime: start-up, process identity, logging from process 0.

Conventions
-----------
* Every process runs the same program (multi-controller JAX): it calls :func:`initialize` before any
  other JAX call, builds the same global mesh (``jaxkv.sharding.make_mesh``), and feeds only the rows
  of data that its own devices hold (``jaxkv.sharding.global_batch``). Results that every process
  needs come back replicated (``jaxkv.sharding.to_host``); files and logs are written by process 0.
* Where the coordinator comes from, first match wins:

  1. arguments / flags: ``--coordinator HOST:PORT --num-processes N --process-id I``;
  2. environment: ``JAXKV_COORDINATOR_ADDRESS`` (or JAX's own ``JAX_COORDINATOR_ADDRESS``),
     ``JAXKV_NUM_PROCESSES``, ``JAXKV_PROCESS_ID`` (what ``launch/multi_gpu.py`` sets);
  3. ``mode="on"`` (``--distributed on`` / ``JAXKV_DISTRIBUTED=on``) without any of those: JAX's cluster
     auto-detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes): what ``launch/tpu_pod.py``
     uses, since every TPU VM worker knows its slice from the metadata server.

  With ``mode="auto"`` (the default) and none of 1-2 set, the run is single-process and nothing is
  initialised. ``mode="off"`` never initialises.
* ``cpu_devices`` (``--cpu-devices``) sets the number of CPU devices per process: for tests and
  dry runs of the multi-host path on one machine (the CPU backend's collectives use gloo).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import jax

from jaxkv.errors import JaxkvError

MODES = ("auto", "on", "off")
ENV_COORDINATOR = ("JAXKV_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = "JAXKV_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXKV_PROCESS_ID"
ENV_MODE = "JAXKV_DISTRIBUTED"

_initialized = False


class DistributedError(JaxkvError):
    """The distributed runtime could not be started (bad settings, unreachable coordinator)."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: its index, the process count and the device counts."""

    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int
    platform: str

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def settings(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str | None = None,
) -> dict | None:
    """The ``jax.distributed.initialize`` keyword arguments that flags and environment ask for.

    Returns None for a single-process run; ``{}`` means "let JAX detect the cluster" (mode on).
    """
    mode = (mode or os.environ.get(ENV_MODE) or "auto").lower()
    if mode not in MODES:
        raise DistributedError(f"distributed mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None
    coordinator = coordinator or next((os.environ[e] for e in ENV_COORDINATOR if os.environ.get(e)), None)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    explicit = {k: v for k, v in given.items() if v is not None}
    if not explicit:
        return {} if mode == "on" else None
    if mode == "auto" and len(explicit) < 3:
        missing = ", ".join(sorted(set(given) - set(explicit)))
        raise DistributedError(
            f"distributed settings are incomplete: {missing} not given (flags --coordinator, "
            f"--num-processes, --process-id or {ENV_COORDINATOR[0]}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
            f"use --distributed on to let JAX detect the rest on a managed cluster"
        )
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id must lie in [0, {num_processes}), got {process_id}")
    return explicit


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    mode: str | None = None,
    local_device_ids: list[int] | None = None,
    cpu_devices: int | None = None,
    timeout_s: int = 300,
) -> ProcessInfo:
    """Start JAX's distributed runtime when flags or environment ask for it (module docstring).

    Must run before any other JAX call. Idempotent. Returns this process's :class:`ProcessInfo`.
    """
    global _initialized
    if cpu_devices is not None:
        # Only effective before the CPU backend starts (i.e. before the first device query).
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    kwargs = settings(coordinator, num_processes, process_id, mode)
    if kwargs is not None and not _initialized:
        if local_device_ids is not None:
            kwargs["local_device_ids"] = local_device_ids
        try:
            jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
        except (RuntimeError, ValueError) as e:
            where = kwargs.get("coordinator_address", "auto-detected cluster")
            raise DistributedError(f"could not start the distributed runtime ({where}): {e}") from None
        _initialized = True
    info = process_info()
    setup_logging(info)
    return info


def process_info() -> ProcessInfo:
    return ProcessInfo(
        process_id=jax.process_index(),
        num_processes=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        platform=jax.devices()[0].platform,
    )


def is_main() -> bool:
    """True on process 0 (the one that logs and writes files)."""
    return jax.process_index() == 0


def log(*args, file=None) -> None:
    """``print`` to stderr on process 0 only."""
    if is_main():
        print(*args, file=file or sys.stderr, flush=True)


def setup_logging(info: ProcessInfo | None = None) -> None:
    """Silence INFO logs (jaxkv's, JAX's, Orbax's) on every process but process 0."""
    info = info or process_info()
    if info.num_processes > 1 and not info.is_main:
        for name in ("jaxkv", "jax", "absl", "orbax"):
            logging.getLogger(name).setLevel(logging.WARNING)


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def shutdown() -> None:
    global _initialized
    if _initialized:
        jax.distributed.shutdown()
        _initialized = False


# ----------------------------------------------------------------------------------------------
# Command line


def add_distributed_args(parser) -> None:
    """``--distributed {auto,on,off} --coordinator HOST:PORT --num-processes N --process-id I``."""
    g = parser.add_argument_group("multi-host (JAX distributed runtime)")
    g.add_argument(
        "--distributed",
        choices=MODES,
        default=None,
        help="auto (default): start it when a coordinator is given by flags or JAXKV_* environment; "
        "on: also let JAX detect the cluster (Cloud TPU pods, SLURM); off: single process",
    )
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="CPU devices per process (to try multi-host on one machine)",
    )


def initialize_from_args(args) -> ProcessInfo:
    """:func:`initialize` from the flags of :func:`add_distributed_args` (missing ones: environment)."""
    return initialize(
        getattr(args, "coordinator", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
        mode=getattr(args, "distributed", None),
        cpu_devices=getattr(args, "cpu_devices", None),
    )
