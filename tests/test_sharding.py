"""Sharding: mesh specs and logical-axis rules (in process, one device), and sharded results equal to
single-device ones on 8 fake CPU devices (``tests/sharding_worker.py`` in a subprocess, since the
device count must be set before JAX starts)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxkv import sharding as sh
from jaxkv.config import ModelConfig
from jaxkv.kvcache import KVQuantConfig, init_cache
from jaxkv.params import init_params
from jaxkv.quant.qarray import quantize_tensor

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,),
)  # fmt: skip
SMOL = dataclasses.replace(CFG, num_heads=9, num_kv_heads=3, hidden_size=48)
SIZES = {"data": 2, "fsdp": 2, "tensor": 4}


# ----------------------------------------------------------------------------------------------
# Sharded == unsharded, on 8 fake devices


@pytest.fixture(scope="module")
def sharded() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # LLVM optimisation of these tiny programs costs more CPU than running them (about half the
    # worker's time); the reference runs in the same process under the same flags.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharding_worker.py")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    return out


def result(out: dict, *keys: str) -> dict:
    for k in keys:
        out = out[k]
    assert "error" not in out, out["error"]
    return out


MESHES = ("data=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4")


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_forward_and_quantized_forward_equal_unsharded(sharded, mesh):
    assert result(sharded, mesh, "forward")["max_diff"] < TOL
    q = result(sharded, mesh, "quantized_forward")
    assert q["max_diff"] < TOL
    # packed codes, scales and zero points of one weight share one spec
    assert len(set(q["wq_specs"].values())) == 1


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_cache_and_generate_equal_unsharded(sharded, mesh):
    cached = result(sharded, mesh, "cached_prefill")
    assert cached["max_diff"] < TOL
    if "tensor=4" in mesh:  # 2 KV heads do not split 4 ways: replicated, batch still split
        assert "tensor" not in cached["cache_k_spec"]
    elif "tensor=2" in mesh:
        assert "tensor" in cached["cache_k_spec"]
    assert result(sharded, mesh, "generate")["equal"]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_calibration_step_equals_unsharded(sharded, mesh):
    assert result(sharded, mesh, "calibration_step")["max_diff"] < TOL


def test_quantized_kv_cache_generate_sharded(sharded):
    assert result(sharded, "quantized_kv_generate")["equal"]


def test_sharded_decode_keeps_one_buffer_per_layer(sharded):
    """Decode on a mesh loops over per-layer weights and cache buffers, each sharded like its slice
    of the stacked one (generate checks the tokens above)."""
    r = result(sharded, "decode_params")
    assert r["ok"] and r["cache_ok"] and "tensor" in r["wq_spec"]
    assert r["refused_split"]  # already split parameters: a clear error


def test_indivisible_heads_replicated_or_split(sharded):
    rep = result(sharded, "smol data=2,tensor=4")  # 9 / 3 heads on tensor=4: replicated
    assert rep["max_diff"] < TOL
    assert "tensor" not in rep["wq_spec"] and "tensor" in rep["w_up_spec"]
    split = result(sharded, "smol tensor=3")  # on tensor=3: split
    assert split["max_diff"] < TOL and "tensor" in split["wq_spec"]


def test_orbax_restore_onto_another_mesh_shape(sharded):
    r = result(sharded, "checkpoint_reshard")
    assert r["max_diff"] == 0.0 and r["shardings_ok"]


def test_loader_places_each_tensor_into_its_sharding_reading_it_once(sharded):
    r = result(sharded, "loader")
    assert r["max_diff"] == 0.0 and r["shardings_ok"]
    assert r["max_reads"] == 1 and r["tensors"] == r["expected_tensors"]


# ----------------------------------------------------------------------------------------------
# Mesh specs


def test_mesh_spec_parsing_and_sizes():
    assert sh.MeshSpec.parse("auto").sizes(8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert sh.MeshSpec.parse(None) == sh.MeshSpec()
    assert sh.MeshSpec.parse("data=2,fsdp=1,tensor=4").sizes(8) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert sh.MeshSpec.parse("tensor=2").sizes(8) == {
        "data": 4,
        "fsdp": 1,
        "tensor": 2,
    }  # data takes the rest
    assert sh.MeshSpec.parse("data=2, fsdp=-1").sizes(8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sh.MeshSpec.parse("fsdp=-1").sizes(8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sh.MeshSpec.parse("tensor=2,indivisible=error").rules.indivisible == "error"
    for bad, match in [
        ("data=2,tensor=3", "needs 6 devices"),
        ("tensor=3", "not a multiple of the 3"),
        ("pipeline=2", "unknown keys"),
        ("data=two", "not an integer"),
        ("data=-1,tensor=-1", "at most one"),
        ("data=0", "positive integer"),
        ("tensor=2,indivisible=maybe", "indivisible"),
        ("tensor", "key=value"),
    ]:
        with pytest.raises(sh.ShardingError, match=match):
            sh.MeshSpec.parse(bad).sizes(8)


def test_mesh_config_files_parse():
    files = sorted((ROOT / "configs" / "mesh").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        spec = sh.MeshSpec.parse(str(f))
        n = 2 * int(np.prod([getattr(spec, a) for a in sh.MESH_AXES if getattr(spec, a) != -1]))
        assert int(np.prod(list(spec.sizes(n).values()))) == n


def test_mesh_cli_helpers():
    parser = argparse.ArgumentParser()
    sh.add_mesh_arg(parser)
    assert sh.mesh_from_args(parser.parse_args(["--mesh", "none"])) is None
    if jax.device_count() == 1:
        assert sh.mesh_from_args(parser.parse_args([])) is None
    saved = sh.current_rules()
    try:
        mesh = sh.mesh_from_args(
            parser.parse_args(["--mesh", f"data={jax.device_count()},indivisible=error"])
        )
        assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
        assert sh.current_rules().indivisible == "error"
    finally:
        sh.set_rules(saved)


# ----------------------------------------------------------------------------------------------
# Rules


def test_param_specs_follow_param_infos():
    specs = sh.param_specs(CFG, SIZES)
    P = jax.sharding.PartitionSpec
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["layers"]["wq"] == P(None, "fsdp", "tensor")  # 4 query heads split 4 ways
    assert specs["layers"]["wk"] == P(None, "fsdp")  # 2 KV heads: replicated
    assert specs["layers"]["wo"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["w_down"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["attn_norm"] == P(None, "fsdp")


def test_indivisible_heads_replicate_or_refuse():
    P = jax.sharding.PartitionSpec
    specs = sh.param_specs(SMOL, SIZES)
    assert specs["layers"]["wq"] == P(None, "fsdp")  # 9 query heads on tensor=4: replicated
    assert specs["layers"]["wk"] == P(None, "fsdp")  # 3 KV heads: replicated
    assert specs["layers"]["w_up"] == P(None, "fsdp", "tensor")  # the MLP still splits
    strict = sh.ShardingRules(indivisible="error")
    with pytest.raises(
        sh.ShardingError, match=r"param layers/wk: dimension 2 \(kv_heads, size 24\).*3 KV heads"
    ):
        sh.param_specs(SMOL, SIZES, strict)
    # KV heads always replicated (a serving-stack choice), query heads strict: the error names them
    with pytest.raises(
        sh.ShardingError, match=r"param layers/wo: dimension 1 \(q_heads, size 72\).*9 query heads"
    ):
        sh.param_specs(SMOL, SIZES, strict.replace(kv_heads=None))
    # query heads divide, KV heads do not: the error names the KV heads
    gqa = dataclasses.replace(CFG, num_heads=8, num_kv_heads=2)
    with pytest.raises(sh.ShardingError, match=r"param layers/wk.*2 KV heads cannot be split 4 ways"):
        sh.param_specs(gqa, SIZES, strict)
    # tensor=3 splits 9 / 3 heads (strictly, everything else must split 3 ways too)
    smol3 = dataclasses.replace(SMOL, vocab_size=48, intermediate_size=48)
    specs = sh.param_specs(smol3, {"data": 1, "fsdp": 1, "tensor": 3}, strict)
    assert specs["layers"]["wq"] == specs["layers"]["wk"] == P(None, None, "tensor")


def test_batch_splits_over_what_divides():
    P = jax.sharding.PartitionSpec
    assert sh.spec_for(("batch", None), (8, 5), SIZES) == P(("data", "fsdp"))
    assert sh.spec_for(("batch", None), (2, 5), SIZES) == P("data")  # fsdp dropped, data kept
    assert sh.spec_for(("batch", None), (1, 5), SIZES) == P()
    with pytest.raises(sh.ShardingError, match="batch"):
        sh.spec_for(("batch",), (2,), SIZES, sh.ShardingRules(indivisible="error"))


def test_qarray_shards_whole_groups_and_chunks():
    P = jax.sharding.PartitionSpec
    info = sh.param_infos(CFG)["layers"]["wo"]  # [L, N*H=32, D]: input dim split by heads
    w = np.zeros(info.shape, np.float32)
    assert sh.qarray_spec(quantize_tensor(w, 4, 8), info, CFG, SIZES) == P(None, "tensor", "fsdp")
    # group 16: 2 groups cannot go to 4 devices -> the input dim is replicated, or refused
    q16 = quantize_tensor(w, 4, 16)
    assert sh.qarray_spec(q16, info, CFG, SIZES) == P(None, None, "fsdp")
    with pytest.raises(sh.ShardingError, match="2 quantization groups of 16 rows"):
        sh.qarray_spec(q16, info, CFG, SIZES, sh.ShardingRules(indivisible="error"))
    # per-channel (one group): the input dim never splits
    assert sh.qarray_spec(quantize_tensor(w, 4, -1), info, CFG, SIZES) == P(None, None, "fsdp")


def test_unknown_leaf_and_unknown_logical_axis_are_errors():
    mesh = sh.make_mesh("auto", jax.devices()[:1])
    params = init_params(CFG, jax.random.key(0))
    params["layers"]["extra"] = params["layers"]["wq"]
    with pytest.raises(sh.ShardingError, match="param layers/extra: no sharding rule"):
        sh.param_shardings(CFG, mesh, params)
    rules = sh.ShardingRules(rules=tuple((n, a) for n, a in sh.DEFAULT_RULES if n != "mlp"))
    with pytest.raises(
        sh.ShardingError, match="param layers/w_down: no sharding rule for logical axis 'mlp'"
    ):
        sh.param_specs(CFG, SIZES, rules)
    with pytest.raises(sh.ShardingError, match="no sharding rule for cache leaf segments/0/k/codes"):
        sh._cache_axes(["segments", "0", "k", "codes"], "KV cache")


def test_cache_shardings_cover_full_precision_and_quantized_caches():
    mesh = sh.make_mesh("auto", jax.devices()[:1])
    for kv in (None, KVQuantConfig(kbits=4, vbits=2, group=8, residual=8)):
        pk = np.zeros((CFG.num_layers, 3, CFG.num_kv_heads, CFG.head_dim), np.float32)
        cache = init_cache(CFG, 2, 16, pivot_k=pk, pivot_v=pk, kv=kv)
        shardings = sh.cache_shardings(cache, CFG, mesh)
        assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(cache))
        placed = sh.shard_cache(cache, CFG, mesh)
        assert jax.tree.structure(placed) == jax.tree.structure(cache)
    # the spec a quantized body leaf (head-major) and a window get on a wide mesh: B over data+fsdp,
    # K over tensor
    body, window = sh._SEGMENT_AXES["data"], sh._SEGMENT_AXES["window"]
    assert sh.spec_for(body, (2, 8, 4, 16, 4), SIZES, units={2: [(4, "4 KV heads")]}) == (
        jax.sharding.PartitionSpec(None, ("data", "fsdp"), "tensor")
    )
    assert sh.spec_for(window, (2, 8, 16, 4, 4), SIZES, units={3: [(4, "4 KV heads")]}) == (
        jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, "tensor")
    )


def test_constrain_is_a_no_op_without_a_mesh():
    x = np.ones((2, 3, 4), np.float32)
    assert sh.constrain(x) is x
