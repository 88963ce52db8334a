"""Rebuild the vendored SOTU corpora ``jaxkv/data/sotu-{calib,eval}.txt.xz`` from the speech folder.

    python scripts/build_corpus.py [--src /work/shared/data/sotu] [--out jaxkv/data] [--check]

The split and join rule lives in :func:`jaxkv.corpus.build_sotu_texts`. The decompressed texts are
fully deterministic and pinned by the sha256 values in ``jaxkv.corpus.BUILTIN_TEXTS`` (also listed in
``jaxkv/data/README.md``); the xz bytes are deterministic for a given liblzma version (preset 9, CRC64
check, single stream). ``--check`` verifies the files in ``--out`` instead of writing them.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxkv.corpus import BUILTIN_TEXTS, SOTU_SEPARATOR, build_sotu_texts  # noqa: E402

DEFAULT_SRC = "/work/shared/data/sotu"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "jaxkv" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=DEFAULT_SRC, help="folder of YEAR_first_last_party.txt files")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where the .txt.xz files go")
    ap.add_argument("--check", action="store_true", help="verify existing files instead of writing")
    args = ap.parse_args(argv)

    texts = build_sotu_texts(args.src)
    ok = True
    for name, text in texts.items():
        entry = BUILTIN_TEXTS[name]
        data = text.encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        path = Path(args.out) / entry.filename
        n_speeches = text.count(SOTU_SEPARATOR) + 1
        if args.check:
            same = path.is_file() and lzma.decompress(path.read_bytes()) == data
            ok &= same
            print(f"{path}: {'OK' if same else 'DIFFERS from a rebuild'}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9))
            print(f"wrote {path} ({path.stat().st_size} bytes)")
        print(f"  {name}: {n_speeches} speeches, {len(data)} bytes, sha256 {digest}")
        if digest != entry.sha256:
            ok = False
            print(f"  sha256 differs from jaxkv.corpus.BUILTIN_TEXTS[{name!r}] ({entry.sha256}): update it")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
