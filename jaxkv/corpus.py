"""Text corpora for calibration and evaluation, tokenization, and GPTQ-style calibration windows.

Conventions
-----------
* A *source* names a text. :func:`load_text` resolves it in this order:

  1. a built-in corpus shipped as package data (works offline, fixed by sha256):
     ``sotu-calib`` -- State of the Union addresses from 1790 to 1989 (calibration only);
     ``sotu-eval``  -- the addresses from 1990 on (evaluation only; never calibrate on it);
  2. a Hugging Face dataset name, fetched with the ``datasets`` package (network or a warm HF cache):
     ``wikitext2`` -- wikitext-2-raw-v1, test split, rows joined with ``"\\n\\n"`` (GPTQ/IntactKV);
     ``c4``        -- allenai/c4 ``en/c4-validation.00000-of-00008.json.gz``, its first 1100 documents
     joined with ``" "`` (GPTQ's ``get_c4_new``, which IntactKV uses; GPTQ then keeps the first
     256 * seqlen tokens, which :func:`jaxkv.evaluate.make_windows` with ``n=256`` approximates);
  3. otherwise a path to a UTF-8 text file (``*.xz`` files are decompressed). To read a file whose
     name equals one of the names above, write it as a path, e.g. ``./c4``.

* Built-in SOTU split rule (see ``jaxkv/data/README.md`` and :func:`build_sotu_texts`): each source
  file ``YEAR_first_last_party.txt`` is decoded as UTF-8 and stripped of leading/trailing whitespace;
  files with YEAR < 1990 go to ``sotu-calib``, YEAR >= 1990 to ``sotu-eval``; within a split the
  speeches are in file-name order, joined by exactly ``"\\n\\n"``, with no trailing newline. No speech
  contains ``"\\n\\n"``, so ``text.split("\\n\\n")`` recovers the speeches.
* Token ids are 1-D int32 numpy arrays; windows are int32 ``[N, L]`` arrays whose column 0 is BOS,
  the same layout as the perplexity windows of :mod:`jaxkv.evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import lzma
import re
from pathlib import Path

import numpy as np

from jaxkv.errors import JaxkvError

SOTU_SPLIT_YEAR = 1990  # first year of the evaluation split
SOTU_SEPARATOR = "\n\n"
_SOTU_FILE = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.txt$")


@dataclasses.dataclass(frozen=True)
class BuiltinText:
    """A corpus shipped in ``jaxkv/data``: an xz file whose decompressed UTF-8 text has ``sha256``."""

    filename: str
    sha256: str
    description: str


BUILTIN_TEXTS: dict[str, BuiltinText] = {
    "sotu-calib": BuiltinText(
        "sotu-calib.txt.xz",
        "ce5fe39b5223cba8115a28a28bc3f1253e096e5799a9d6a70803914d25b2328b",
        "State of the Union addresses 1790-1989 (calibration split)",
    ),
    "sotu-eval": BuiltinText(
        "sotu-eval.txt.xz",
        "f1b42f33fe325e14690a26906195226ab5fa6cd03ec91cae2bfa19e30c95b551",
        "State of the Union addresses 1990-2021 (evaluation split)",
    ),
}
HF_TEXTS = ("wikitext2", "c4")


def _known_names() -> str:
    return f"built-in: {', '.join(BUILTIN_TEXTS)}; Hugging Face: {', '.join(HF_TEXTS)}"


def load_text(source: str) -> str:
    """The text named by ``source`` (a built-in name, a Hugging Face dataset name, or a file path).

    Raises :class:`JaxkvError` for an unknown name or missing file, a file that is not UTF-8,
    corrupt package data, or a Hugging Face dataset that cannot be fetched.
    """
    if not isinstance(source, str) or not source:
        raise JaxkvError(f"text source must be a non-empty string, got {source!r} ({_known_names()})")
    if source in BUILTIN_TEXTS:
        return _load_builtin(source)
    if source in HF_TEXTS:
        return _load_hf(source)
    return _load_file(Path(source).expanduser())


@functools.cache
def _load_builtin(name: str) -> str:
    # Cached: the calibration text is ~10 MB and callers often load it more than once.
    entry = BUILTIN_TEXTS[name]
    resource = importlib.resources.files("jaxkv").joinpath("data", entry.filename)
    try:
        raw = resource.read_bytes()
    except FileNotFoundError:
        raise JaxkvError(
            f"built-in text {name!r}: package data file jaxkv/data/{entry.filename} is missing "
            "(rebuild it with scripts/build_corpus.py, or reinstall jaxkv with its package data)"
        ) from None
    try:
        data = lzma.decompress(raw)
    except lzma.LZMAError as e:
        raise JaxkvError(
            f"built-in text {name!r}: jaxkv/data/{entry.filename} is not valid xz ({e})"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise JaxkvError(
            f"built-in text {name!r}: decompressed sha256 is {digest}, expected {entry.sha256} "
            "(the package data is corrupt or was rebuilt from different sources)"
        )
    return data.decode("utf-8")


def _load_file(path: Path) -> str:
    if not path.exists():
        raise JaxkvError(f"text source {str(path)!r}: no such file, and not a known name ({_known_names()})")
    if not path.is_file():
        raise JaxkvError(f"text source {str(path)!r} is not a regular file")
    data = path.read_bytes()
    if path.suffix == ".xz":
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as e:
            raise JaxkvError(f"text source {str(path)!r}: not valid xz ({e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JaxkvError(f"text source {str(path)!r} is not UTF-8 text ({e})") from None


def _load_hf(name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise JaxkvError(
            f"text source {name!r} needs the 'datasets' package (pip install datasets); "
            f"the built-in texts ({', '.join(BUILTIN_TEXTS)}) work without it"
        ) from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
            return "\n\n".join(ds["text"])
        ds = datasets.load_dataset(
            "allenai/c4",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation",
        )
        return " ".join(ds[:1100]["text"])
    except Exception as e:  # network, hub and cache errors come in many types; report them uniformly
        raise JaxkvError(
            f"could not load Hugging Face dataset for {name!r} ({type(e).__name__}: {e}); it needs network "
            f"access or a populated HF cache. Offline alternatives: {', '.join(BUILTIN_TEXTS)}"
        ) from e


def build_sotu_texts(src_dir: str | Path) -> dict[str, str]:
    """``{"sotu-calib": text, "sotu-eval": text}`` built from a folder of ``YEAR_*.txt`` speeches.

    The rule is the one in the module docstring. Strict on purpose: any other file in the folder,
    a non-UTF-8 file, an empty speech or one containing the separator is an error, so the packaged
    texts cannot silently change.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise JaxkvError(f"SOTU source folder {str(src)!r} does not exist")
    splits: dict[str, list[str]] = {"sotu-calib": [], "sotu-eval": []}
    names = sorted(p.name for p in src.iterdir())
    if not names:
        raise JaxkvError(f"SOTU source folder {str(src)!r} is empty")
    for fname in names:
        m = _SOTU_FILE.match(fname)
        if m is None:
            raise JaxkvError(f"{src / fname}: not a speech file name of the form YEAR_first_last_party.txt")
        try:
            speech = (src / fname).read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise JaxkvError(f"{src / fname}: not UTF-8 ({e})") from None
        if not speech:
            raise JaxkvError(f"{src / fname}: empty speech")
        if SOTU_SEPARATOR in speech:
            raise JaxkvError(f"{src / fname}: contains the separator {SOTU_SEPARATOR!r}")
        split = "sotu-calib" if int(m.group(1)) < SOTU_SPLIT_YEAR else "sotu-eval"
        splits[split].append(speech)
    return {name: SOTU_SEPARATOR.join(speeches) for name, speeches in splits.items()}


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids [M] (int32) of the whole ``text``, without special tokens (no BOS/EOS added).

    ``tokenizer`` is a Hugging Face tokenizer (``PreTrainedTokenizerFast``).
    """
    # verbose=False: the text is far longer than model_max_length by design; windows cut it later.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def calibration_windows(tokens, n: int, seqlen: int, seed: int, *, bos_id: int | None) -> np.ndarray:
    """``n`` random windows [n, seqlen] (int32) of ``tokens``, GPTQ style, with BOS first.

    Row j is ``[bos_id] + tokens[s_j : s_j + seqlen - 1]`` (or ``tokens[s_j : s_j + seqlen]`` when
    ``bos_id`` is None), where the starts ``s_j`` are drawn independently and uniformly from every
    valid start, ``np.random.default_rng(seed).integers(0, M - body + 1, size=n)`` with ``body`` the
    number of text tokens per row. Windows may overlap (as in GPTQ, which draws with ``random.randint``;
    GPTQ's draw also never picks the last valid start, ours does). BOS first matches the perplexity
    windows, so calibration sees the pivot token where evaluation and generation do.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise JaxkvError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    if not isinstance(n, int) or n < 1:
        raise JaxkvError(f"n must be a positive integer, got {n!r}")
    min_len = 2 if bos_id is not None else 1
    if not isinstance(seqlen, int) or seqlen < min_len:
        raise JaxkvError(f"seqlen must be an integer >= {min_len}, got {seqlen!r}")
    body = seqlen - 1 if bos_id is not None else seqlen
    if tokens.shape[0] < body:
        raise JaxkvError(f"{tokens.shape[0]} tokens are too few for windows of {body} text tokens")
    starts = np.random.default_rng(seed).integers(0, tokens.shape[0] - body + 1, size=n)
    rows = tokens[starts[:, None] + np.arange(body)[None, :]].astype(np.int32)
    if bos_id is None:
        return rows
    return np.concatenate([np.full((n, 1), bos_id, dtype=np.int32), rows], axis=1)
