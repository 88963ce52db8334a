"""One decode token per sequence through a full-precision (unquantized) KV cache in one Pallas
(Triton) GPU kernel: the pivot segment, the body slots before the token and the token itself in
one online softmax, and the token's key and value written into the body in place.

Why a kernel: over XLA, a layer's attention at one decode token was six small launches (scores,
masks, softmax, the value product) and two cache writes, which XLA placed at the end of the step;
at batch 1 each costs about as long to start as it does to run (H100, run 28: 17 us a layer, a
sixth of the int4 Llama-2-7B step). Here it is the launch that builds the step heads (RoPE on
queries and keys, ``jaxkv.kernels.kvdecode.step_heads``) and this one.

Conventions
-----------
* ``heads [B, N + 2K, H]`` the token's query, key and value heads after RoPE (queries first, then
  keys, then values: :func:`jaxkv.kernels.kvdecode.step_heads`); the body ``[B, S, K, H]`` one
  layer of ``jaxkv.kvcache``'s unquantized cache (slot ``j`` holds position ``P + j``); the pivot
  segment ``[P, K, H]`` shared by the batch; ``positions [B]`` (-1: padding).
* The query at position ``pos`` sees pivot slots ``p <= pos``, the body slots ``j < pos - P`` as
  the cache holds them, and itself at slot ``pos - P`` (when inside the body: the token is written
  there, the XLA path's ``mode="drop"`` for slots past the end). That is ``jaxkv.model``'s causal
  mask for a cache filled in order.
* Grid ``(B, K, chunks)``: a program per sequence, KV head and chunk of slots reads its ``G`` query
  heads as one tensor-core tile of ``ROWS = 16`` rows (head ``r % G`` in row ``r``), loops over its
  body slots in tiles of :data:`TILE` with a running maximum, and takes the token's own score and
  value from registers when its slot is in the chunk. With one chunk (the sequences' KV heads fill
  the GPU, or the cache is short: :func:`chunks`) the program also attends to the pivot segment and
  writes the output: one launch. With more (flash-decoding), each writes its chunk's maximum,
  exponential sum and weighted values, and ``jaxkv.kernels.kvdecode.merge`` adds the pivot segment
  and combines them (a second launch). Llama-2-7B int4 on an H100, one chunk against XLA (run 50):
  batch 1 at 256 slots 2.417 against 2.649 ms/token, batch 8 at 4224 slots 8.547 against 9.326, but
  batch 1 at 4224 slots (32 programs) 3.858 against 3.711, hence the split.
* Precision as the XLA path (``jaxkv.model._attend``): scores from the model's dtype with float32
  accumulation, scaled by ``1/sqrt(H)`` and softmaxed in float32, probabilities rounded to the
  model's dtype before the value product; float32 models multiply in full float32.
* GPU only (Triton lowering); ``interpret=True`` runs the same kernel body on any backend (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxkv.kernels import kvdecode
from jaxkv.kernels.kvdecode import _F32, _MASKED, ROWS, _dot, _pow2, _pow2_ceil

TILE = 64  # body slots per loop step
CHUNK_SLOTS = 1024  # the fewest slots per program when the slots are split (:func:`chunks`)
NUM_WARPS = 4
NUM_STAGES = 3


def supported(head_dim: int, q_per_kv: int) -> bool:
    """True when the kernel handles these heads: power-of-two tiles, at most one tensor-core tile of
    query heads per KV head."""
    return _pow2(head_dim) and head_dim >= 16 and _pow2(q_per_kv) and q_per_kv <= ROWS


def _kernel(
    heads_ref, pos_ref, pk_ref, pv_ref, ck_ref, cv_ref, *refs, P, Pp, S, N, K, G, H, tile, chunk, split, sm_scale,
    dtype,
):  # fmt: skip
    # refs: the output (split: the partials m, l, o), then the cache outputs (aliased to ck, cv)
    *outs, ck_out, cv_out = refs
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    dot = _dot(dtype)
    pos = pos_ref[b]
    slot = pos - P
    write = (slot >= 0) & (slot < S)  # padding (-1) and slots past the body: no token in the body
    lo = c * chunk  # this program's slots [lo, lo + chunk)
    n_read = jnp.clip(jnp.minimum(slot, lo + chunk), lo, S)  # old body slots [lo, n_read) seen
    mine = write & (slot >= lo) & (slot < lo + chunk)  # the token's slot is in this program's chunk
    q16 = heads_ref[b, h * G + (jnp.arange(ROWS, dtype=jnp.int32) & (G - 1)), :].astype(dtype)  # [ROWS, H]
    knew = heads_ref[b, N + h, :]  # [H]
    vnew = heads_ref[b, N + K + h, :]

    def scores(keys):  # [ROWS, n] float32
        return jax.lax.dot_general(q16, keys, (((1,), (1,)), ((), ())), **dot) * sm_scale

    if P and not split:  # split: merge attends to the pivot segment
        p_ = jnp.arange(Pp, dtype=jnp.int32)
        prow = jnp.minimum(p_, P - 1)
        visible = ((p_ < P) & (p_ <= pos))[None, :]  # causal: a padding query (-1) sees none
        s = jnp.where(visible, scores(pk_ref[prow, h, :].astype(dtype)), _MASKED)  # [ROWS, Pp]
        m = jnp.max(s, axis=1, keepdims=True)
        e = jnp.where(visible, jnp.exp(s - m), 0.0)
        l = jnp.sum(e, axis=1, keepdims=True)
        acc = jax.lax.dot_general(
            e.astype(dtype), pv_ref[prow, h, :].astype(dtype), (((1,), (0,)), ((), ())), **dot
        )  # [ROWS, H]
    else:
        m = jnp.full((ROWS, 1), _MASKED, _F32)
        l = jnp.zeros((ROWS, 1), _F32)
        acc = jnp.zeros((ROWS, H), _F32)

    def body(t, carry):
        m, l, acc = carry
        j = lo + t * tile + jnp.arange(tile, dtype=jnp.int32)
        rows = jnp.minimum(j, S - 1)  # the last tile re-reads the final slot, masked
        live = (j < n_read)[None, :]
        s = jnp.where(live, scores(ck_ref[b, rows, h, :].astype(dtype)), _MASKED)  # [ROWS, tile]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        e = jnp.where(live, jnp.exp(s - m_new), 0.0)
        pv = jax.lax.dot_general(
            e.astype(dtype), cv_ref[b, rows, h, :].astype(dtype), (((1,), (0,)), ((), ())), **dot
        )
        return m_new, l * alpha + jnp.sum(e, axis=1, keepdims=True), acc * alpha + pv

    m, l, acc = jax.lax.fori_loop(0, (n_read - lo + tile - 1) // tile, body, (m, l, acc))

    # The token itself, from registers (its slot in the cache is written below, after every read).
    s_new = jnp.sum(q16.astype(_F32) * knew.astype(dtype).astype(_F32)[None, :], axis=1, keepdims=True)
    s_new = s_new * sm_scale  # [ROWS, 1]
    m_new = jnp.where(mine, jnp.maximum(m, s_new), m)
    alpha = jnp.exp(m - m_new)
    e_new = jnp.where(mine, jnp.exp(s_new - m_new), 0.0)
    v_row = vnew.astype(dtype).astype(_F32)[None, :]  # [1, H]
    acc = acc * alpha + e_new.astype(dtype).astype(_F32) * v_row
    l = l * alpha + e_new

    def per_head(x):  # rows u * G + g are head g's copies (identical): keep one per head
        return x.reshape(ROWS // G, G, x.shape[-1]).max(axis=0)

    if split:  # merge's partials: the chunk's maximum, exponential sum and weighted values
        m_ref, l_ref, o_ref = outs
        m_ref[b, h, c, :] = per_head(m_new)[:, 0]
        l_ref[b, h, c, :] = per_head(l)[:, 0]
        o_ref[b, h, c, :, :] = per_head(acc)
    else:
        (out_ref,) = outs
        out = acc / jnp.where(l > 0, l, 1.0)  # a padding query without a pivot sees nothing: 0
        out_ref[b, h, :, :] = per_head(out).astype(out_ref.dtype)

    @pl.when(mine)
    def _():
        ck_out[b, slot, h, :] = knew.astype(ck_out.dtype)
        cv_out[b, slot, h, :] = vnew.astype(cv_out.dtype)


def chunks(batch: int, kv_heads: int, slots: int, cores: int) -> int:
    """Programs per sequence and KV head along the slots: one, unless the sequences' heads are
    fewer than the GPU's ``cores`` and the cache holds more than :data:`CHUNK_SLOTS` slots; then
    enough to give every core a program, each at least ``CHUNK_SLOTS`` long."""
    return kvdecode.chunks(batch, kv_heads, slots, cores, min_slots=CHUNK_SLOTS, per_core=1)


@functools.partial(jax.jit, static_argnames=("sm_scale", "dtype", "chunks", "tile", "num_warps", "interpret"))
def attend(
    heads, positions, pivot_k, pivot_v, k, v, *, sm_scale, dtype, chunks=1, tile=TILE, num_warps=NUM_WARPS,
    interpret=False,
):  # fmt: skip
    """Attention of one decode query per sequence over a full-precision cache layer, the new token
    written in place (module docstring). ``heads [B, N + 2K, H]``, ``positions [B]`` int32,
    ``pivot_k``/``pivot_v [P, K, H]``, ``k``/``v [B, S, K, H]`` (donate them: they are updated in
    place); ``dtype`` the products' operands (the model's dtype); ``chunks`` programs per sequence
    and KV head along the slots (:func:`chunks`): past one, each writes its softmax partials and
    ``jaxkv.kernels.kvdecode.merge`` combines them with the pivot segment (a second launch).

    Returns ``(out [B, K, G, H] in heads.dtype, k, v)``."""
    B, S, K, H = k.shape
    N = heads.shape[1] - 2 * K
    G = N // K
    P = pivot_k.shape[0]
    Pp = max(ROWS, _pow2_ceil(P))  # a power of two, at least one tensor-core tile
    split = chunks > 1
    chunk = -(-S // (chunks * tile)) * tile  # slots per program, whole tiles
    NC = -(-S // chunk)
    # the refs need an entry when there is no pivot; never read
    pk, pv = (pivot_k, pivot_v) if P else (jnp.zeros((1, K, H), heads.dtype),) * 2
    kernel = functools.partial(
        _kernel, P=P, Pp=Pp, S=S, N=N, K=K, G=G, H=H, tile=tile, chunk=chunk, split=split, sm_scale=sm_scale,
        dtype=jnp.dtype(dtype),
    )  # fmt: skip
    if split:
        out_shape = [jax.ShapeDtypeStruct((B, K, NC, G), _F32)] * 2 + [
            jax.ShapeDtypeStruct((B, K, NC, G, H), _F32)
        ]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, K, G, H), heads.dtype)]
    full = pl.BlockSpec(memory_space=None)
    *out, k, v = pl.pallas_call(
        kernel,
        grid=(B, K, NC),
        in_specs=[full] * 6,
        out_specs=[full] * (len(out_shape) + 2),
        out_shape=[
            *out_shape,
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        input_output_aliases={4: len(out_shape), 5: len(out_shape) + 1},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES),
        interpret=interpret,
        name="kv_decode_fp_partials" if split else "kv_decode_fp",
    )(heads, positions.astype(jnp.int32), pk, pv, k, v)
    if split:
        out = [
            kvdecode.merge(
                heads,
                positions,
                pivot_k,
                pivot_v,
                *out,
                sm_scale=sm_scale,
                out_dtype=heads.dtype,
                dtype=dtype,
                interpret=interpret,
            )  # fmt: skip
        ]
    return out[0], k, v
