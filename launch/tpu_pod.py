#!/usr/bin/env python3
"""Run a jaxkv command on every worker of a Cloud TPU VM slice (a pod), with gcloud.

Steps (``--steps``, default all but ``delete``)::

    create   gcloud compute tpus tpu-vm create (or, with --queued, queued-resources create, then
             poll until the slice is ACTIVE)
    install  pack this checkout (git archive HEAD), copy it to every worker, pip install jax[tpu] and it
    run      JAXKV_DISTRIBUTED=on jaxkv <command> ... --out <remote-out> on every worker at once:
             jax.distributed.initialize() finds the coordinator from the TPU metadata, each worker
             feeds its own devices, process 0 logs
    fetch    copy <remote-out> back: from a gs:// bucket (what multi-host Orbax checkpoints need: every
             host writes its own shards) or, for a local path, from worker 0
    delete   delete the slice (or the queued resource)

``--dry-run`` prints every command and runs none. Example::

    python launch/tpu_pod.py --name jaxkv-v5e --zone us-west4-a --accelerator-type v5litepod-16 \\
        --queued --spot --mesh configs/mesh/pod-fsdp4-tp4.yaml --remote-out gs://my-bucket/run1 \\
        --outputs ./run1 --dry-run -- calibrate --model meta-llama/Llama-2-7b-hf --wbits 4
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("create", "install", "run", "fetch", "delete")
DEFAULT_STEPS = ("create", "install", "run", "fetch")
# Runtime images per TPU generation (https://cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}  # fmt: skip
REPO = Path(__file__).resolve().parents[1]
SRC_ARCHIVE = "jaxkv-src.tar.gz"


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the plan: ``argv`` run locally; ``poll_until`` repeats it until stdout says so."""

    name: str
    argv: tuple[str, ...]
    poll_until: str | None = None

    def __str__(self) -> str:
        line = shlex.join(self.argv)
        return line + (f"    # repeat until it prints {self.poll_until}" if self.poll_until else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Arguments after -- form the jaxkv command (default: calibrate).",
    )
    p.add_argument("--name", required=True, help="TPU VM (node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-16, v4-32, v6e-64")
    p.add_argument("--runtime-version", default=None, help="TPU VM image (default: by accelerator type)")
    p.add_argument(
        "--queued", action="store_true", help="create through a queued resource (waits for capacity)"
    )
    p.add_argument("--spot", action="store_true", help="spot capacity")
    p.add_argument("--valid-until-duration", default=None, help="queued: give up after this long, e.g. 6h")
    p.add_argument("--source", default=None, help="pip requirement to install instead of this checkout")
    p.add_argument("--mesh", default=None, help="--mesh passed to the command (spec or configs/mesh/*.yaml)")
    p.add_argument("--remote-out", default="jaxkv-out", help="output directory on the workers, or gs://...")
    p.add_argument("--outputs", default="tpu-outputs", help="local directory the outputs are fetched into")
    p.add_argument(
        "--steps", default=",".join(DEFAULT_STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    p.add_argument("--poll-seconds", type=float, default=30.0)
    p.add_argument("--dry-run", action="store_true", help="print every command, run none")
    args = p.parse_args(argv)
    args.command = command or ["calibrate"]
    args.steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if args.runtime_version is None:
        generation = args.accelerator_type.rsplit("-", 1)[0]
        if generation not in RUNTIMES:
            p.error(f"no default runtime for {args.accelerator_type}; pass --runtime-version")
        args.runtime_version = RUNTIMES[generation]
    return args


def _where(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _tpu(args, *words: str) -> tuple[str, ...]:
    return ("gcloud", "compute", "tpus", *words)


def mesh_spec(mesh: str) -> str:
    """A mesh YAML file (configs/mesh/*.yaml) as the equivalent spec string: workers need no copy of it."""
    if not mesh.endswith((".yaml", ".yml")):
        return mesh
    import yaml

    d = yaml.safe_load(Path(mesh).read_text()) or {}
    return ",".join(f"{k}={v}" for k, v in d.items())


def remote_command(args) -> str:
    """The shell line every worker runs: the jaxkv command with --mesh and --out, under JAX's runtime."""
    cmd = ["jaxkv", *args.command]
    if args.mesh and "--mesh" not in cmd:
        cmd += ["--mesh", mesh_spec(args.mesh)]
    if "--out" not in cmd:
        cmd += ["--out", args.remote_out]
    # JAXKV_DISTRIBUTED=on: jax.distributed.initialize() with the slice's settings from the metadata.
    return f"export PATH=$HOME/.local/bin:$PATH && cd ~ && JAXKV_DISTRIBUTED=on {shlex.join(cmd)}"


def plan(args) -> list[Step]:
    """Every command of the requested steps, in order (the launcher's whole behaviour; tested as such)."""
    qr = f"{args.name}-qr"
    spot = ["--spot"] if args.spot else []
    steps: list[Step] = []
    if "create" in args.steps:
        if args.queued:
            extra = (
                [f"--valid-until-duration={args.valid_until_duration}"] if args.valid_until_duration else []
            )
            steps.append(Step("create", _tpu(args, "queued-resources", "create", qr, f"--node-id={args.name}",
                                             f"--accelerator-type={args.accelerator_type}",
                                             f"--runtime-version={args.runtime_version}", *_where(args), *spot, *extra)))  # fmt: skip
            steps.append(Step("wait", _tpu(args, "queued-resources", "describe", qr, *_where(args),
                                           "--format=value(state.state)"), poll_until="ACTIVE"))  # fmt: skip
        else:
            steps.append(Step("create", _tpu(args, "tpu-vm", "create", args.name,
                                             f"--accelerator-type={args.accelerator_type}",
                                             f"--version={args.runtime_version}", *_where(args), *spot)))  # fmt: skip
    ssh = _tpu(args, "tpu-vm", "ssh", args.name, *_where(args), "--worker=all")
    if "install" in args.steps:
        if args.source:
            pkg = shlex.quote(args.source)
        else:
            archive = str(Path(args.outputs) / SRC_ARCHIVE)
            steps.append(Step("pack", ("mkdir", "-p", args.outputs)))
            steps.append(Step("pack", ("git", "-C", str(REPO), "archive", "--format=tar.gz", "--prefix=jaxkv/",
                                       "-o", archive, "HEAD")))  # fmt: skip
            steps.append(Step("copy", _tpu(args, "tpu-vm", "scp", archive, f"{args.name}:~/{SRC_ARCHIVE}",
                                           *_where(args), "--worker=all")))  # fmt: skip
            pkg = "./jaxkv"
        unpack = f"rm -rf ~/jaxkv && tar xzf ~/{SRC_ARCHIVE} -C ~ && " if not args.source else ""
        install = (
            f"cd ~ && {unpack}python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q {pkg}"
        )
        steps.append(Step("install", (*ssh, f"--command={install}")))
    if "run" in args.steps:
        steps.append(Step("run", (*ssh, f"--command={remote_command(args)}")))
    if "fetch" in args.steps:
        steps.append(Step("fetch", ("mkdir", "-p", args.outputs)))
        if args.remote_out.startswith("gs://"):
            steps.append(
                Step("fetch", ("gcloud", "storage", "cp", "--recursive", args.remote_out, args.outputs))
            )
        else:
            # Process 0 writes the files; Orbax arrays sharded across hosts need a gs:// --remote-out.
            steps.append(Step("fetch", _tpu(args, "tpu-vm", "scp", "--recurse", f"{args.name}:{args.remote_out}",
                                            args.outputs, *_where(args), "--worker=0")))  # fmt: skip
    if "delete" in args.steps:
        if args.queued:
            steps.append(
                Step(
                    "delete",
                    _tpu(args, "queued-resources", "delete", qr, *_where(args), "--force", "--quiet"),
                )
            )
        else:
            steps.append(Step("delete", _tpu(args, "tpu-vm", "delete", args.name, *_where(args), "--quiet")))
    return steps


def execute(step: Step, poll_seconds: float) -> None:
    print(f"+ {step}", flush=True)
    if step.poll_until is None:
        subprocess.run(step.argv, check=True)
        return
    while True:
        out = subprocess.run(step.argv, check=True, capture_output=True, text=True).stdout.strip()
        print(f"  state: {out or '?'}", flush=True)
        if out == step.poll_until:
            return
        if out in ("FAILED", "SUSPENDED"):
            raise SystemExit(f"the queued resource is {out}")
        time.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        for step in steps:
            print(step)
        return 0
    try:
        for step in steps:
            execute(step, args.poll_seconds)
    except subprocess.CalledProcessError as e:
        print(f"tpu_pod: {shlex.join(e.cmd)} failed with status {e.returncode}", file=sys.stderr)
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
