"""CLI: ``jaxkv quantize`` then ``jaxkv eval ppl --quantized`` equals on-the-fly ``--wbits``; JSON bytes."""

import json

from jaxkv.cli import main


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_quantize_then_eval_equals_on_the_fly(model_dir, tmp_path, capsys):
    common = [
        "--data",
        str(model_dir / "text.txt"),
        "--seqlen",
        "16",
        "--windows",
        "3",
        "--json",
        "--no-progress",
    ]
    q = run_json(capsys, ["quantize", "--model", str(model_dir), "--wbits", "4", "--group", "32", "--out",
                          str(tmp_path / "q"), "--json", "--no-progress"])  # fmt: skip
    assert q["wbits"] == 4 and q["quantized_weight_bytes"] / q["quantized_weight_bytes_fp16"] < 0.33
    fp = run_json(capsys, ["eval", "ppl", "--model", str(model_dir), *common])
    fly = run_json(
        capsys, ["eval", "ppl", "--model", str(model_dir), "--wbits", "4", "--group", "32", *common]
    )
    saved = run_json(capsys, ["eval", "ppl", "--quantized", str(tmp_path / "q"), *common])
    assert saved["ppl"] == fly["ppl"] != fp["ppl"]
    assert saved["weight_bytes"] == fly["weight_bytes"] < fp["weight_bytes"]
    assert saved["weight_bytes_fp16"] == fly["weight_bytes_fp16"] == fp["weight_bytes_fp16"]
    assert fly["method"] == "rtn" and fly["group"] == 32


def test_gptq_export_and_errors(model_dir, tmp_path, capsys):
    common = ["--model", str(model_dir), "--wbits", "3", "--group", "32", "--no-progress"]
    out = run_json(capsys, ["quantize", *common, "--method", "gptq", "--calib-samples", "2", "--calib-seqlen", "16", "--calib-data", str(model_dir / "text.txt"),
                            "--format", "gptq", "--out", str(tmp_path / "g"), "--json"])  # fmt: skip
    assert out["format"] == "gptq" and (tmp_path / "g" / "model.safetensors").is_file()
    ppl = run_json(capsys, ["eval", "ppl", "--quantized", str(tmp_path / "g"), "--data", str(model_dir / "text.txt"),
                            "--seqlen", "16", "--windows", "2", "--json", "--no-progress"])  # fmt: skip
    assert ppl["weight_bytes"] < ppl["weight_bytes_fp16"]
    assert main(["quantize", "--model", str(model_dir), "--group", "128", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "jaxkv: error: group size 128 does not divide the input dimension 96 of layers/w_down"
    )
