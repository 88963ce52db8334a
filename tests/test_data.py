"""The vendored SOTU corpora, load_text's resolution and errors, tokenize, calibration_windows."""

from __future__ import annotations

import hashlib
import lzma
import re
from pathlib import Path

import numpy as np
import pytest

from jaxkv import corpus
from jaxkv.corpus import BUILTIN_TEXTS, build_sotu_texts, calibration_windows, load_text
from jaxkv.errors import JaxkvError

DATA_DIR = Path(corpus.__file__).parent / "data"
SOTU_SRC = Path("/work/shared/data/sotu")
needs_src = pytest.mark.skipif(not SOTU_SRC.is_dir(), reason="SOTU source folder not available")

# Openings of the boundary speeches: 1989 (George Bush, last of calib), 1990 (first of eval).
OPENING_1989 = "Mr. Speaker, Mr. President, and distinguished Members of the House and Senate"
OPENING_1990 = (
    "Mr. President, Mr. Speaker, Members of the United States Congress: I return as a former President"
)


def test_package_data_sizes():
    sizes = {f: (DATA_DIR / f).stat().st_size for f in ("sotu-calib.txt.xz", "sotu-eval.txt.xz")}
    assert sum(sizes.values()) < 4 * 2**20
    assert all(s > 100_000 for s in sizes.values())


def test_builtin_texts_match_readme_sha256():
    readme = (DATA_DIR / "README.md").read_text()
    for name, entry in BUILTIN_TEXTS.items():
        stem = entry.filename.removesuffix(".xz")
        m = re.search(rf"sha256\({re.escape(stem)}\)\s*=\s*([0-9a-f]{{64}})", readme)
        assert m, f"README lacks the sha256 of {stem}"
        assert m.group(1) == entry.sha256
        data = lzma.decompress((DATA_DIR / entry.filename).read_bytes())
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        assert load_text(name).encode("utf-8") == data


def test_split_rule_and_boundaries():
    calib, ev = load_text("sotu-calib").split("\n\n"), load_text("sotu-eval").split("\n\n")
    assert (len(calib), len(ev)) == (201, 32)  # 233 files; 1953 and 1961 have two speeches each
    assert all(s and s == s.strip() for s in calib + ev)
    assert calib[0].startswith("Fellow-Citizens of the Senate and House of Representatives")  # 1790
    assert calib[-1].startswith(OPENING_1989)
    assert ev[0].startswith(OPENING_1990)
    assert not any(s.startswith(OPENING_1990) for s in calib)
    assert not set(calib) & set(ev)


@needs_src
def test_rebuild_from_source_is_identical_and_split_by_year():
    texts = build_sotu_texts(SOTU_SRC)
    assert texts == {name: load_text(name) for name in BUILTIN_TEXTS}
    by_text = {}
    for p in sorted(SOTU_SRC.iterdir()):
        by_text.setdefault(p.read_text(encoding="utf-8").strip(), []).append(int(p.name[:4]))
    calib_years = [y for s in texts["sotu-calib"].split("\n\n") for y in by_text[s]]
    eval_years = [y for s in texts["sotu-eval"].split("\n\n") for y in by_text[s]]
    assert max(calib_years) < 1990 <= min(eval_years)
    assert calib_years == sorted(calib_years) and eval_years == sorted(eval_years)


def test_build_rule_on_a_small_folder(tmp_path):
    (tmp_path / "1989_a_b_r.txt").write_text("  old speech.\n")
    (tmp_path / "1990_c_d_d.txt").write_text("new one.")
    (tmp_path / "1788_e_f_n.txt").write_text("older.\n\n")
    (tmp_path / "2001_g_h_r.txt").write_text("newer.\n")
    assert build_sotu_texts(tmp_path) == {
        "sotu-calib": "older.\n\nold speech.",
        "sotu-eval": "new one.\n\nnewer.",
    }
    (tmp_path / "2002_x_y_r.txt").write_text("para one.\n\npara two.")
    with pytest.raises(JaxkvError, match="separator"):
        build_sotu_texts(tmp_path)
    (tmp_path / "2002_x_y_r.txt").unlink()
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(JaxkvError, match="YEAR_first_last_party"):
        build_sotu_texts(tmp_path)


def test_load_text_from_files(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo\n", encoding="utf-8")
    assert load_text(str(p)) == "héllo\n"
    px = tmp_path / "t.txt.xz"
    px.write_bytes(lzma.compress(b"compressed"))
    assert load_text(str(px)) == "compressed"
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(JaxkvError, match="not UTF-8"):
        load_text(str(tmp_path / "bad.txt"))
    with pytest.raises(JaxkvError, match="not a regular file"):
        load_text(str(tmp_path))


@pytest.mark.parametrize("source", ["no-such-corpus", "/nonexistent/dir/text.txt", "wikitext-2"])
def test_load_text_unknown_name_or_missing_file(source):
    with pytest.raises(JaxkvError, match="no such file, and not a known name"):
        load_text(source)


def test_load_text_rejects_empty_source():
    with pytest.raises(JaxkvError):
        load_text("")


def test_hf_failure_is_a_jaxkv_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(JaxkvError, match="could not load Hugging Face dataset for 'wikitext2'"):
        load_text("wikitext2")


def test_hf_join_rules(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        if path == "Salesforce/wikitext":
            return datasets.Dataset.from_dict({"text": ["a", "", " b"]})
        return datasets.Dataset.from_dict({"text": [f"d{i}" for i in range(1200)]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_text("wikitext2") == "a\n\n\n\n b"
    assert calls[0][1] == ("wikitext-2-raw-v1",) and calls[0][2]["split"] == "test"
    c4 = load_text("c4")
    assert c4 == " ".join(f"d{i}" for i in range(1100))
    assert calls[1][2]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_tokenize_adds_no_special_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, "a": 2, "b": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", model_max_length=4
    )
    ids = corpus.tokenize(fast, "a b a b a b c")
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [2, 3, 2, 3, 2, 3, 1])


def test_calibration_windows_layout_and_determinism():
    tokens = np.arange(1000, 1100)
    w = calibration_windows(tokens, n=64, seqlen=9, seed=3, bos_id=7)
    assert w.shape == (64, 9) and w.dtype == np.int32
    assert (w[:, 0] == 7).all()
    starts = w[:, 1] - 1000
    np.testing.assert_array_equal(w[:, 1:], 1000 + starts[:, None] + np.arange(8))  # contiguous runs
    assert starts.min() >= 0 and starts.max() <= 100 - 8
    np.testing.assert_array_equal(w, calibration_windows(tokens, 64, 9, 3, bos_id=7))
    assert not np.array_equal(w, calibration_windows(tokens, 64, 9, 4, bos_id=7))
    raw = calibration_windows(tokens, 4, 9, 3, bos_id=None)
    assert raw.shape == (4, 9) and (np.diff(raw, axis=1) == 1).all()


def test_calibration_windows_reach_both_ends():
    tokens = np.arange(10)
    w = calibration_windows(tokens, n=200, seqlen=5, seed=0, bos_id=99)
    assert set(w[:, 1].tolist()) == set(range(7))  # every start 0..M-(L-1), the last one included
    exact = calibration_windows(np.arange(4), n=3, seqlen=5, seed=0, bos_id=99)
    np.testing.assert_array_equal(exact, [[99, 0, 1, 2, 3]] * 3)


@pytest.mark.parametrize(
    ("tokens", "n", "seqlen"),
    [(np.arange(3), 1, 5), (np.arange(10), 0, 5), (np.arange(10), 1, 1), (np.zeros((2, 5), int), 1, 3)],
)
def test_calibration_windows_errors(tokens, n, seqlen):
    with pytest.raises(JaxkvError):
        calibration_windows(tokens, n, seqlen, 0, bos_id=1)
