"""IntactKV calibration: train the prefix K/V (and nothing else) so the quantized model matches the FP one.

Conventions
-----------
* Trainable: the prefix's ``k``/``v`` ``[L, P, K, H]``. Teacher: the full-precision model with the
  original (exact) prefix. Student: the quantized model with the trainable prefix in its cache's
  pivot segment. Both see the same windows of text tokens at positions P..P+T-1.
* Loss (the IntactKV reference code's ``compute_ptq_loss``): for every decoder block, the mean over
  batch, tokens and channels of the squared difference between the student's and the teacher's
  block outputs, halved, summed over blocks; ``loss="last"`` keeps only the last block. Prefix
  positions are excluded by construction (they are not in the window).
* Optimiser (the paper's): AdamW, lr 2e-4, no weight decay, linear warm-up over the first 3% of
  steps then constant, global-norm clipping at 0.3. One step sees ``batch_size`` windows (the paper:
  batch 1 with 16 accumulation steps), processed ``micro_batch`` at a time with accumulated
  gradients, so memory does not grow with ``batch_size``. 128 windows, 20 epochs = 160 steps.
* Data order is a fixed function of ``seed`` and the epoch, and every ``checkpoint_every`` steps the
  prefix, the optimiser state and the step go to an Orbax checkpoint: ``resume=True`` continues an
  interrupted run to exactly the result of an uninterrupted one.
* The teacher's block outputs are recomputed inside each jitted step (no gradient flows to them):
  this costs one more forward but no memory that grows with the calibration set.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxkv import sharding
from jaxkv.errors import JaxkvError
from jaxkv.kvcache import KVQuantConfig, init_cache
from jaxkv.model import decoder
from jaxkv.prefix import Prefix


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Calibration recipe (defaults: the IntactKV paper's)."""

    samples: int = 128
    seqlen: int = 512  # tokens per window, prefix included
    epochs: int = 20
    batch_size: int = 16  # windows per optimiser step
    micro_batch: int = 1  # windows per forward/backward inside a step
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    clip_norm: float = 0.3
    loss: str = "all"  # "all" blocks summed, or "last" block only
    seed: int = 0
    checkpoint_every: int = 20  # steps

    def __post_init__(self):
        for name in ("samples", "seqlen", "epochs", "batch_size", "micro_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise JaxkvError(f"calibration {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch:
            raise JaxkvError(
                f"calibration batch_size={self.batch_size} is not a multiple of micro_batch={self.micro_batch}"
            )
        if self.loss not in ("all", "last"):
            raise JaxkvError(f"calibration loss must be 'all' or 'last', got {self.loss!r}")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or self.clip_norm <= 0:
            raise JaxkvError("calibration lr and clip_norm must be > 0, warmup_ratio in [0, 1)")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclasses.dataclass
class CalibResult:
    prefix: Prefix
    losses: list[float]  # mean loss of each step, from the first step of this run (resumed ones too)
    initial_loss: float  # loss of the untrained prefix on the first batch
    seconds: float
    tokens_per_second: float  # calibration tokens processed (student forward+backward) per second


# Cached: the optimiser is a static argument of the jitted train_step, so a new object per calibrate()
# call would recompile the step every time.
@functools.lru_cache(maxsize=16)
def make_optimizer(cfg: CalibConfig) -> optax.GradientTransformation:
    warmup = int(round(cfg.warmup_ratio * cfg.total_steps))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup]
    )
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(schedule, weight_decay=0.0))


def block_outputs(params, model_cfg, kv, windows, P):
    """Decoder block outputs [L, B, T, D] (float32) for text windows [B, T] after the pivot kv=(k, v)."""
    B, T = windows.shape
    cache = init_cache(model_cfg, B, T, kv[0].dtype, kv[0], kv[1])
    positions = jnp.broadcast_to(jnp.arange(P, P + T, dtype=jnp.int32), (B, T))
    _, _, outs = decoder(params, windows, positions, cache, model_cfg, collect=True)
    return outs.astype(jnp.float32)


def quantized_kv_block_outputs(params, model_cfg, pivot_kv, windows, pivot_tokens, kv_cfg, wkv=None):
    """As :func:`block_outputs`, with attention reading K/V quantized by ``kv_cfg`` (the pivot stays
    full precision): the window runs after the pivot tokens with ``pivot_kv`` replacing their K/V,
    and the pivot positions' outputs are dropped. ``wkv``: the parameters of a ``wkvquant`` ``kv_cfg``."""
    B, T = windows.shape
    P = len(pivot_tokens)
    tokens = jnp.concatenate([jnp.broadcast_to(jnp.asarray(pivot_tokens, windows.dtype), (B, P)), windows], 1)
    positions = jnp.broadcast_to(jnp.arange(P + T, dtype=jnp.int32), (B, P + T))
    _, _, outs = decoder(
        params, tokens, positions, None, model_cfg, collect=True, kv=kv_cfg, pivot_kv=pivot_kv, wkv=wkv
    )
    return outs[:, :, P:].astype(jnp.float32)


def calibration_loss(
    trainable, fp_params, q_params, fp_kv, windows, model_cfg, loss_kind: str, kv_cfg=None, pivot_tokens=(),
    wkv=None,
):  # fmt: skip
    """Sum over blocks (or the last) of half the mean squared difference of block outputs, teacher =
    the FP model after the FP prefix, student = ``q_params`` after the trainable prefix (its KV cache
    quantized by ``kv_cfg`` when given)."""
    P = fp_kv[0].shape[1]
    teacher = jax.lax.stop_gradient(block_outputs(fp_params, model_cfg, fp_kv, windows, P))
    pivot_kv = (trainable["k"], trainable["v"])
    if kv_cfg is None:
        student = block_outputs(q_params, model_cfg, pivot_kv, windows, P)
    else:
        student = quantized_kv_block_outputs(
            q_params, model_cfg, pivot_kv, windows, pivot_tokens, kv_cfg, wkv
        )
    per_block = jnp.mean(jnp.square(student - teacher), axis=(1, 2, 3)) / 2
    return per_block[-1] if loss_kind == "last" else jnp.sum(per_block)


@functools.partial(
    jax.jit,
    static_argnames=("model_cfg", "loss_kind", "tx", "kv_cfg", "pivot_tokens"),
    donate_argnames=("trainable", "opt_state"),
)
def train_step(
    trainable,
    opt_state,
    fp_params,
    q_params,
    fp_kv,
    batch,
    model_cfg,
    loss_kind,
    tx,
    kv_cfg=None,
    pivot_tokens=(),
    wkv=None,
):
    """One optimiser step over batch [n_micro, micro_batch, T], gradients accumulated over micro batches."""
    grad_fn = jax.value_and_grad(calibration_loss)

    def micro(acc, windows):
        loss, g = grad_fn(
            trainable, fp_params, q_params, fp_kv, windows, model_cfg, loss_kind, kv_cfg, pivot_tokens, wkv
        )
        return jax.tree.map(jnp.add, acc, (loss, g)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
    (loss, grads), _ = jax.lax.scan(micro, zero, batch)
    n = batch.shape[0]
    loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


_loss_jit = jax.jit(calibration_loss, static_argnames=("model_cfg", "loss_kind", "kv_cfg", "pivot_tokens"))


def epoch_order(cfg: CalibConfig, epoch: int) -> np.ndarray:
    """The window order of one epoch: a permutation fixed by the seed and the epoch number."""
    return np.random.default_rng([cfg.seed, epoch]).permutation(cfg.samples)


def calibrate(
    fp_model,
    q_model,
    prefix: Prefix,
    windows,
    cfg: CalibConfig = CalibConfig(),
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    mesh: Mesh | None = None,
    kv: KVQuantConfig | None = None,
    wkv: dict | None = None,
) -> CalibResult:
    """Calibrate ``prefix`` so that ``q_model`` with it matches ``fp_model`` on ``windows``.

    ``windows`` are text token ids ``[N, T]`` (no pivot tokens: the prefix precedes them); the first
    ``cfg.samples`` rows are used. ``checkpoint_dir`` receives periodic Orbax checkpoints; with
    ``resume`` the latest one there is restored first. ``stop_after`` ends the run after that many
    steps in total (to test resumption).

    With ``mesh`` the run is data-parallel over ``data`` x ``fsdp`` (each step's windows split across
    them; every process builds only its rows), weights sit in their ``jaxkv.sharding`` shardings (fsdp
    splits D, tensor splits heads) and the prefix K/V split by KV heads; the returned prefix holds
    global arrays (``jaxkv.sharding.to_host`` reads them on any process).

    ``kv`` (a :class:`jaxkv.kvcache.KVQuantConfig`) calibrates for a quantized KV cache: the student's
    attention reads the windows' K/V as that cache would (the prefix stays full precision), so the
    prefix learns to serve a model whose weights and KV cache are both quantized. ``wkv``: the
    learned parameters of a ``wkvquant`` ``kv`` (``jaxkv.wkvquant``), fixed here: the prefix is
    calibrated after them, for the quantizer they define.
    """
    if kv is not None and kv.is_identity(fp_model.cfg.num_layers):
        kv = wkv = None
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[0] < cfg.samples:
        raise JaxkvError(
            f"calibration needs at least {cfg.samples} windows [N, T], got shape {windows.shape}"
        )
    windows = windows[: cfg.samples]
    if q_model.cfg != fp_model.cfg:
        raise JaxkvError("the quantized and full-precision models have different configurations")
    model_cfg = fp_model.cfg
    tx = make_optimizer(cfg)
    fp_kv = (prefix.k, prefix.v)
    fp_params, q_params = fp_model.params, q_model.params
    if mesh is not None:
        fp_params = sharding.shard_params(fp_params, model_cfg, mesh)
        q_params = sharding.shard_params(q_params, model_cfg, mesh)
        kv_sh = sharding.kv_sharding(prefix.k.shape, model_cfg, mesh)
        fp_kv = sharding.place(fp_kv, (kv_sh, kv_sh))
        if wkv is not None:
            wkv = sharding.place(wkv, jax.tree.map(lambda _: sharding.replicated(mesh), wkv))
    trainable = {"k": jnp.array(fp_kv[0], copy=True), "v": jnp.array(fp_kv[1], copy=True)}
    opt_state = tx.init(trainable)
    if mesh is not None:
        # Adam's moments split like the prefix, counters replicated: the first step then sees the
        # shardings every later step does (one compilation), and all of it is global (multi-host).
        rep = sharding.replicated(mesh)
        opt_state = sharding.place(opt_state, jax.tree.map(lambda x: kv_sh if x.ndim else rep, opt_state))
    start_step = 0
    manager = None
    if checkpoint_dir is not None:
        from jaxkv.checkpoint import CalibCheckpointer

        manager = CalibCheckpointer(checkpoint_dir, cfg)
        if resume:
            restored = manager.restore_latest(trainable, opt_state)
            if restored is not None:
                start_step, trainable, opt_state = restored
    elif resume:
        raise JaxkvError("resume needs a checkpoint directory")

    n_micro = cfg.batch_size // cfg.micro_batch
    T = windows.shape[1]
    total = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
    losses: list[float] = []
    first_batch = windows[epoch_order(cfg, 0)[: cfg.batch_size]]
    first_batch = jnp.asarray(first_batch) if mesh is None else sharding.global_batch(first_batch, mesh)
    with sharding.activate(mesh):
        initial = float(
            _loss_jit(trainable if start_step == 0 else {"k": fp_kv[0], "v": fp_kv[1]},
                      fp_params, q_params, fp_kv, first_batch, model_cfg, cfg.loss, kv, tuple(prefix.tokens),
                      wkv)
        )  # fmt: skip
    progress = progress and jax.process_index() == 0  # multi-host: one bar, from process 0
    bar = tqdm(total=total, initial=start_step, desc="calibrate", unit="step", disable=not progress)
    t0 = time.perf_counter()
    steps_run = 0
    try:
        for step in range(start_step, total):
            epoch, within = divmod(step, cfg.steps_per_epoch)
            idx = epoch_order(cfg, epoch)[within * cfg.batch_size : (within + 1) * cfg.batch_size]
            if len(idx) < cfg.batch_size:  # last, partial batch of an epoch: wrap around
                idx = np.concatenate([idx, epoch_order(cfg, epoch)[: cfg.batch_size - len(idx)]])
            rows = idx.reshape(n_micro, cfg.micro_batch)
            if mesh is None:
                batch = jnp.asarray(windows[rows])
            else:  # windows split over the batch axes; a process reads only the rows its devices hold
                batch = sharding.global_batch(
                    lambda i, rows=rows: windows[rows[i[0], i[1]]][..., i[2]],
                    mesh, rows.shape + (T,), windows.dtype, batch_dim=1,
                )  # fmt: skip
            with sharding.activate(mesh):
                trainable, opt_state, loss = train_step(
                    trainable, opt_state, fp_params, q_params, fp_kv, batch, model_cfg, cfg.loss, tx,
                    kv, tuple(prefix.tokens), wkv,
                )  # fmt: skip
            losses.append(float(loss))
            steps_run += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.5g}", refresh=False)
            if manager is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total):
                manager.save(step + 1, trainable, opt_state)
    except KeyboardInterrupt:
        # Keep every finished step: the interrupted run resumes exactly where it stopped.
        if manager is not None and steps_run:
            manager.save(start_step + steps_run, trainable, opt_state)
            manager.close()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if manager is not None:
        manager.close()
    new_prefix = prefix.replace(k=trainable["k"], v=trainable["v"])
    tokens = steps_run * cfg.batch_size * T
    return CalibResult(new_prefix, losses, initial, seconds, tokens / seconds if seconds > 0 else 0.0)
