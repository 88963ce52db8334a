"""CLI for IntactKV: ``jaxkv prefix``, ``jaxkv calibrate`` (with resume), ``eval ppl --intactkv/--prefix``
and ``generate --intactkv/--prefix`` on a tiny model; refusals of mismatched prefixes."""

import json
import sys

import numpy as np
import pytest

from jaxkv.cli import main


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def ppl_args(model_dir):
    return ["--model", str(model_dir), "--data", str(model_dir / "text.txt"), "--seqlen", "16",
            "--windows", "3", "--json", "--no-progress"]  # fmt: skip


CALIB = ["--samples", "4", "--seqlen", "12", "--epochs", "3", "--batch-size", "2", "--lr", "0.05",
         "--checkpoint-every", "1", "--no-progress", "--json"]  # fmt: skip
W3 = ["--wbits", "3", "--group", "32"]


def test_prefix_calibrate_eval_generate(model_dir, tmp_path, capsys, monkeypatch):
    data = ["--data", str(model_dir / "text.txt")]
    pre = run_json(capsys, ["prefix", "--model", str(model_dir), "--out", str(tmp_path / "bos"), "--json"])
    assert pre["pivot_tokens"] == [1]

    # An exact FP [BOS] prefix changes nothing for the FP model, and something for the W3 one.
    fp = run_json(capsys, ["eval", "ppl", *ppl_args(model_dir)])
    fp_b = run_json(capsys, ["eval", "ppl", *ppl_args(model_dir), "--intactkv", "bos"])
    np.testing.assert_allclose(fp_b["ppl"], fp["ppl"], rtol=1e-5)
    w3 = run_json(capsys, ["eval", "ppl", *ppl_args(model_dir), *W3])
    w3_b = run_json(capsys, ["eval", "ppl", *ppl_args(model_dir), *W3, "--intactkv", "bos"])
    w3_saved = run_json(capsys, ["eval", "ppl", *ppl_args(model_dir), *W3, "--prefix", str(tmp_path / "bos")])
    assert w3_b["ppl"] != w3["ppl"] and w3_saved["ppl"] == w3_b["ppl"]

    # Calibrate for W3, interrupted after 2 steps then resumed: the same result as one run.
    full = run_json(capsys, ["calibrate", "--model", str(model_dir), *W3, *data, *CALIB, "--out",
                             str(tmp_path / "cal")])  # fmt: skip
    assert full["steps"] == 6 and full["final_loss"] < full["initial_loss"]
    assert (tmp_path / "cal" / "loss.png").stat().st_size > 1000
    cal = run_json(capsys, ["eval", "ppl", *ppl_args(model_dir), *W3, "--prefix", str(tmp_path / "cal")])
    assert cal["ppl"] != w3_b["ppl"] and cal["intactkv"] == "prefix"

    # Interrupt after 2 steps (the module, not the jaxkv.calibrate function, holds what the CLI calls).
    calibrate_mod = sys.modules["jaxkv.calibrate"]
    real = calibrate_mod.calibrate
    argv = ["calibrate", "--model", str(model_dir), *W3, *data, *CALIB, "--out", str(tmp_path / "res")]
    monkeypatch.setattr(calibrate_mod, "calibrate", lambda *a, **k: real(*a, **{**k, "stop_after": 2}))
    part = run_json(capsys, argv)
    monkeypatch.undo()
    assert part["steps"] == 2
    resumed = run_json(capsys, [*argv, "--resume"])
    assert resumed["steps"] == 4
    res_ppl = run_json(capsys, ["eval", "ppl", *ppl_args(model_dir), *W3, "--prefix", str(tmp_path / "res")])
    np.testing.assert_allclose(res_ppl["ppl"], cal["ppl"], rtol=1e-5)

    # A prefix calibrated for W3 is refused by a W4 model, and a multi-token prefix by perplexity.
    assert main(["eval", "ppl", *ppl_args(model_dir), "--wbits", "4", "--group", "32", "--prefix",
                 str(tmp_path / "cal")]) == 2  # fmt: skip
    assert "recipe" in capsys.readouterr().err
    run_json(capsys, ["prefix", "--model", str(model_dir), "--pivot", "1,5,6", "--pivot-ids", "--out",
                      str(tmp_path / "p3"), "--json"])  # fmt: skip
    assert main(["eval", "ppl", *ppl_args(model_dir), "--prefix", str(tmp_path / "p3")]) == 2
    assert "one-token" in capsys.readouterr().err

    # generate from the calibrated prefix: the W3 model, the prompt after the pivot.
    assert main(["generate", "--model", str(model_dir), *W3, "--prefix", str(tmp_path / "cal"),
                 "--prompt", "we the", "--max-new-tokens", "4", "--no-progress"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--model", str(model_dir), "--intactkv", "bos", "--kbits", "4", "--vbits", "2", "--kv-group", "8",
                 "--prompt", "we the", "--max-new-tokens", "4"]) == 0  # fmt: skip


@pytest.mark.parametrize("bad", [["--prefix", "/nonexistent/prefix"]])
def test_missing_prefix_is_a_clear_error(model_dir, capsys, bad):
    assert main(["eval", "ppl", *ppl_args(model_dir), *bad]) == 2
    assert "jaxkv: error:" in capsys.readouterr().err
