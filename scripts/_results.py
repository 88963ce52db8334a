"""The results files of the table scripts: ``OUT.json`` rewritten after every row, ``OUT.md`` beside it."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import jax


def open_results(
    out: str, settings: dict, resume: bool, markdown: Callable[[dict], str], **fields
) -> tuple[dict, Callable[[], None]]:
    """``(result, save)``: the run's result and the function that writes it to OUT.json and OUT.md.

    ``result`` holds ``settings``, the device, the jax version and the host, then ``fields`` (the
    empty rows, ...). With ``resume``, an OUT.json of the same settings gives its ``fields`` back.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    result = {
        "settings": settings,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "jax": jax.__version__,
        "host": platform.node(),
        **fields,
    }
    if resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("settings") == settings:
            result.update({k: old.get(k, v) for k, v in fields.items()})

    def save():
        json_path.write_text(json.dumps(result, indent=2))
        md_path.write_text(markdown(result))

    return result, save
