"""IntactKV calibration: the loss falls, only the prefix changes, resume equals an uninterrupted run."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from jaxkv.calibrate import CalibConfig, calibrate
from jaxkv.checkpoint import CheckpointError, restore_prefix, save_prefix
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.params import init_params
from jaxkv.prefix import make_prefix, model_fingerprint


@dataclasses.dataclass
class TinyModel:
    cfg: ModelConfig
    params: dict
    tokenizer: object = None
    recipe: object = None
    fingerprint: str | None = None  # a quantized model carries its FP origin's


CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,),
)  # fmt: skip
CALIB = CalibConfig(samples=16, seqlen=12, epochs=2, batch_size=4, micro_batch=2, lr=3e-2, checkpoint_every=2)


@pytest.fixture(scope="module")
def models():
    fp = init_params(CFG, jax.random.key(0))
    fp = jax.tree.map(lambda x: x * 4 if x.ndim == 3 else x, fp)
    # A stand-in for a quantized model: every weight matrix perturbed by 20% noise.
    keys = iter(jax.random.split(jax.random.key(1), 64))
    q = jax.tree.map(
        lambda x: x * (1 + 0.2 * jax.random.normal(next(keys), x.shape)) if x.ndim == 3 else x, fp
    )
    fp_model = TinyModel(CFG, fp)
    return fp_model, TinyModel(CFG, q, recipe={"bits": 3}, fingerprint=model_fingerprint(fp_model))


@pytest.fixture(scope="module")
def windows():
    return np.random.RandomState(0).randint(3, 64, (16, 11)).astype(np.int32)


def test_calibration_lowers_loss_and_changes_only_the_prefix(models, windows):
    fp, q = models
    prefix = make_prefix(fp, [1, 5, 6])
    res = calibrate(fp, q, prefix, windows, CALIB, progress=False)
    assert len(res.losses) == CALIB.total_steps == 8
    assert np.mean(res.losses[-2:]) < 0.9 * res.initial_loss
    assert res.prefix.tokens == prefix.tokens
    assert not np.allclose(np.asarray(res.prefix.k), np.asarray(prefix.k))
    np.testing.assert_array_equal(np.asarray(res.prefix.logits), np.asarray(prefix.logits))
    assert res.tokens_per_second > 0


def test_resume_gives_the_uninterrupted_result(models, windows, tmp_path):
    fp, q = models
    prefix = make_prefix(fp, "bos")
    full = calibrate(fp, q, prefix, windows, CALIB, progress=False)
    part = calibrate(fp, q, prefix, windows, CALIB, checkpoint_dir=tmp_path, progress=False, stop_after=3)
    assert len(part.losses) == 3
    # A stopped run saves its last step: the resumed run continues from step 3.
    rest = calibrate(fp, q, prefix, windows, CALIB, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert len(rest.losses) == CALIB.total_steps - 3
    np.testing.assert_allclose(rest.losses, full.losses[3:], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(rest.prefix.k), np.asarray(full.prefix.k))
    np.testing.assert_array_equal(np.asarray(rest.prefix.v), np.asarray(full.prefix.v))
    # A hard crash loses the steps after the last periodic checkpoint (every 2 steps), nothing else.
    crashed = tmp_path / "crashed"
    calibrate(fp, q, prefix, windows, CALIB, checkpoint_dir=crashed, progress=False, stop_after=3)
    shutil.rmtree(crashed / "checkpoints" / "3")
    rest = calibrate(fp, q, prefix, windows, CALIB, checkpoint_dir=crashed, resume=True, progress=False)
    assert len(rest.losses) == CALIB.total_steps - 2
    np.testing.assert_array_equal(np.asarray(rest.prefix.k), np.asarray(full.prefix.k))
    other = dataclasses.replace(CALIB, lr=1e-3)
    with pytest.raises(CheckpointError, match="calibration settings"):
        calibrate(fp, q, prefix, windows, other, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_prefix_save_restore_roundtrip_and_refusals(models, windows, tmp_path):
    fp, q = models
    prefix = make_prefix(fp, [1, 7])
    save_prefix(tmp_path / "exact", prefix, fp)
    back = restore_prefix(tmp_path / "exact", q)  # an exact prefix fits any quantization of fp
    np.testing.assert_array_equal(np.asarray(back.k), np.asarray(prefix.k))
    assert back.tokens == (1, 7) and back.fingerprint == prefix.fingerprint

    calibrated = calibrate(
        fp, q, prefix, windows, dataclasses.replace(CALIB, epochs=1), progress=False
    ).prefix
    save_prefix(tmp_path / "calib", calibrated, q)
    restore_prefix(tmp_path / "calib", q)
    with pytest.raises(CheckpointError, match="calibrated for quantization recipe"):
        restore_prefix(tmp_path / "calib", dataclasses.replace(q, recipe={"bits": 4}))
    other_model = TinyModel(CFG, jax.tree.map(lambda x: x + 0.01, fp.params))
    with pytest.raises(CheckpointError, match="made from model"):
        restore_prefix(tmp_path / "exact", other_model)

    # Corruption: flip bytes in the largest array file.
    files = sorted(
        (p for p in (tmp_path / "exact" / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[-1].write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        restore_prefix(tmp_path / "exact", fp)
    with pytest.raises(CheckpointError, match="no prefix.json"):
        restore_prefix(tmp_path / "nothing")


def test_bad_calibration_settings(models, windows):
    with pytest.raises(JaxkvError, match="multiple of micro_batch"):
        CalibConfig(batch_size=5, micro_batch=2)
    fp, q = models
    with pytest.raises(JaxkvError, match="at least 128 windows"):
        calibrate(fp, q, make_prefix(fp, "bos"), windows, CalibConfig(), progress=False)


def test_calibration_for_a_quantized_kv_cache(models, windows):
    """The student reads its windows' K/V quantized (prefix intact): with 16-bit KV the pivot-token
    route gives the cached route's block outputs; with K2V2 the loss is larger than without KV
    quantization and calibration still lowers it."""
    import jax.numpy as jnp

    from jaxkv.calibrate import block_outputs, calibration_loss, quantized_kv_block_outputs
    from jaxkv.kvcache import KVQuantConfig

    fp, q = models
    prefix = make_prefix(fp, [1, 5, 6])
    pivot_kv = (prefix.k, prefix.v)
    w = jnp.asarray(windows[:3])
    cached = block_outputs(q.params, CFG, pivot_kv, w, 3)
    routed = quantized_kv_block_outputs(q.params, CFG, pivot_kv, w, (1, 5, 6), KVQuantConfig(16, 16))
    np.testing.assert_allclose(np.asarray(routed), np.asarray(cached), atol=2e-5, rtol=0)

    kv = KVQuantConfig(2, 2, group=4)
    trainable = {"k": prefix.k, "v": prefix.v}
    plain = calibration_loss(trainable, fp.params, q.params, pivot_kv, w, CFG, "all")
    quant = calibration_loss(trainable, fp.params, q.params, pivot_kv, w, CFG, "all", kv, (1, 5, 6))
    assert float(quant) > float(plain) * 1.05
    res = calibrate(fp, q, prefix, windows, CALIB, progress=False, kv=kv)
    assert np.mean(res.losses[-2:]) < 0.9 * res.initial_loss
