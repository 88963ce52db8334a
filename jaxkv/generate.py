"""Text generation: one jitted prefill, then a jitted ``while_loop`` of one-token decode steps.

Conventions
-----------
* ``model`` is anything with ``.cfg``, ``.params`` and ``.tokenizer`` (what ``jaxkv.load`` returns,
  quantized or not). ``prefix`` is None or an IntactKV prefix: its ``k``/``v`` ``[L, P, K, H]`` fill the
  cache's pivot segment and its ``tokens`` are not re-encoded: the prompt continues at position P.
* Prompts are right-padded to a length bucket (a power of two, at least 16), so a new prompt length
  recompiles only when it crosses a bucket. The decode loop takes its step limit as a traced value:
  streaming in chunks of any size and running to the end share one compiled program.
* The cache is donated to each call; nothing returns to the host between steps of one chunk.
* Finished sequences (EOS seen) keep their slot in the batch but stop writing to the cache, and their
  remaining outputs are ``pad_id``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxkv import sharding
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.kvcache import KVCache, KVQuantConfig, init_cache
from jaxkv.model import forward
from jaxkv.sampling import sample

PREFILL_CHUNK = 1024  # prompt tokens per prefill call (generate_iter's default)
MIN_BUCKET = 16


@dataclasses.dataclass
class GenerationResult:
    """New tokens per prompt (EOS excluded), their text when a tokenizer is known, and timings."""

    tokens: list[list[int]]
    texts: list[str] | None
    prompt_tokens: list[list[int]]
    finished: list[bool]  # True where the sequence ended with an EOS token
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # decode steps run after the prefill (the prefill yields the first token)


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    out: jax.Array  # [B, M] generated tokens, pad after EOS
    step: jax.Array  # tokens generated so far (same for the whole batch)
    done: jax.Array  # [B] bool
    key: jax.Array


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def encode_prompts(tokenizer, prompt, prefix=None, chat: bool = False) -> list[list[int]]:
    """Token ids per prompt. A string or list of strings needs a tokenizer; ids pass through.

    With a prefix, the prompt is the continuation of the pivot tokens, so no special tokens are
    added (BOS, if any, is already in the prefix). ``chat`` applies the tokenizer's chat template
    to each string as one user message.
    """
    if isinstance(prompt, str):
        prompt = [prompt]
    if len(prompt) == 0:
        raise JaxkvError("no prompt given")
    if all(isinstance(t, (int, np.integer)) for t in prompt):
        prompt = [list(prompt)]
    ids = []
    for p in prompt:
        if isinstance(p, str):
            if tokenizer is None:
                raise JaxkvError("a text prompt needs a tokenizer; pass token ids instead")
            if chat:
                p = tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                if prefix is not None:
                    pivot_text = tokenizer.decode(list(prefix.tokens))
                    if not p.startswith(pivot_text):
                        raise JaxkvError(
                            "the chat-formatted prompt does not start with the prefix's pivot text"
                        )
                    p = p[len(pivot_text) :]
                ids.append(tokenizer.encode(p, add_special_tokens=False))
            else:
                ids.append(tokenizer.encode(p, add_special_tokens=prefix is None))
        else:
            ids.append([int(t) for t in p])
    for i, t in enumerate(ids):
        if not t:
            raise JaxkvError(f"prompt {i} is empty after tokenization")
    return ids


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"), donate_argnames=("cache",))
def _prefill(params, tokens, positions, cache, last_index, key, temperature, top_p, cfg: ModelConfig, top_k):
    logits, cache = forward(params, tokens, positions, cache, cfg)
    last = logits[jnp.arange(tokens.shape[0]), last_index]
    return sample(last, key, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"), donate_argnames=("state",))
def _decode(params, state: DecodeState, limit, temperature, top_p, eos_ids, pad_id, cfg: ModelConfig, top_k):
    """Run decode steps until ``limit`` tokens exist, the buffer is full, or every sequence ended."""
    M = state.out.shape[1]
    P = state.cache.pivot_len

    def cond(s: DecodeState):
        return (s.step < jnp.minimum(limit, M)) & ~jnp.all(s.done)

    def body(s: DecodeState):
        last = s.out[:, s.step - 1]
        pos = jnp.where(s.done, -1, P + s.cache.lengths)
        logits, cache = forward(params, last[:, None], pos[:, None], s.cache, cfg)
        tok = sample(logits[:, 0], jax.random.fold_in(s.key, s.step), temperature, top_k, top_p)
        tok = jnp.where(s.done, pad_id, tok)
        done = s.done | jnp.isin(tok, eos_ids)
        return DecodeState(cache, s.out.at[:, s.step].set(tok), s.step + 1, done, s.key)

    return jax.lax.while_loop(cond, body, state)


def generate_iter(
    model,
    prefix,
    prompt,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    max_len: int | None = None,
    chat: bool = False,
    chunk: int | None = 1,
    prefill_chunk: int | None = PREFILL_CHUNK,
    stop_at_eos: bool = True,
    kv: KVQuantConfig | None = None,
    wkv: dict | None = None,
    mesh: Mesh | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(new_tokens [B, n], done [B])`` after every ``chunk`` decode steps (None: one chunk).

    The first yield holds the token produced by the prefill. Tokens after a sequence's EOS are
    ``pad_id``. The prompt is prefilled ``prefill_chunk`` tokens per call (None: all at once): the
    prefill's attention holds float32 scores for every (prompt token, cache slot) pair of a call
    (17 GB per such array for 8 x 4096 tokens over 4,128 slots and 32 heads), so long prompts in
    one call can exhaust device memory; the chunks continue the cache, and the tokens are the same. :func:`generate` collects this iterator; the CLI streams it. ``kv``: a quantized KV cache;
    ``wkv``: the learned parameters of a ``wkvquant`` one (``jaxkv.wkvquant``). With ``mesh``, weights,
    cache and prompts are placed in their ``jaxkv.sharding`` shardings (tensor-parallel decode on a
    ``tensor`` axis; the batch splits over ``data``/``fsdp``) and jit propagates the rest; ``model``
    then holds stacked parameters, split into one sharded buffer per layer for decode
    (``jaxkv.sharding.shard_decode_params``), and the cache is per layer as on one device.
    """
    cfg: ModelConfig = model.cfg
    tokenizer = getattr(model, "tokenizer", None)
    if max_new_tokens < 1:
        raise JaxkvError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise JaxkvError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise JaxkvError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    ids = encode_prompts(tokenizer, prompt, prefix, chat)
    B = len(ids)
    longest = max(len(t) for t in ids)
    for t in ids:
        if max(t) >= cfg.vocab_size or min(t) < 0:
            raise JaxkvError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
    bucket = _bucket(longest)
    if max_len is None:
        max_len = bucket + max_new_tokens
    elif longest + max_new_tokens > max_len:
        raise JaxkvError(
            f"the prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
            f"the cache length {max_len}"
        )
    bucket = min(bucket, max_len)

    dtype = model.params["embed"].dtype
    pivot_k = pivot_v = None
    if prefix is not None:
        pivot_k, pivot_v = prefix.k, prefix.v
    params = model.params
    if mesh is not None:  # one buffer per layer, each in its sharding (as decode_layout on one device)
        params = sharding.shard_decode_params(params, cfg, mesh)
    # decode_layout's per-layer parameters loop over layers in Python: the cache then keeps one buffer
    # per layer too, updated in place (jaxkv.kvcache, "per-layer layout")
    per_layer = isinstance(params["layers"], (list, tuple))
    cache = init_cache(cfg, B, max_len, dtype, pivot_k, pivot_v, kv=kv, wkv=wkv, per_layer=per_layer)
    P = cache.pivot_len

    tokens = np.zeros((B, bucket), np.int32)
    positions = np.full((B, bucket), -1, np.int32)
    for b, t in enumerate(ids):
        tokens[b, : len(t)] = t
        positions[b, : len(t)] = P + np.arange(len(t))
    last = np.array([len(t) - 1 for t in ids], np.int32)
    if mesh is not None:
        cache = sharding.shard_cache(cache, cfg, mesh)

    eos_ids = jnp.asarray(cfg.eos_token_ids if stop_at_eos and cfg.eos_token_ids else (-1,), jnp.int32)
    pad_id = cfg.eos_token_ids[0] if cfg.eos_token_ids else 0
    key = jax.random.key(seed)
    # None: greedy at trace time (see jaxkv.sampling); sampling and greedy compile separately.
    temperature = None if temperature == 0 else jnp.float32(temperature)
    top_p = jnp.float32(top_p)

    C = bucket if prefill_chunk is None else min(bucket, prefill_chunk)
    first = None
    for s in range(0, bucket, C):
        e = min(bucket, s + C)
        here = (last >= s) & (last < e)  # rows whose last prompt token is in this chunk
        if not (positions[:, s:e] >= 0).any():
            break  # padding only from here on
        part = (tokens[:, s:e], positions[:, s:e], np.clip(last - s, 0, e - s - 1), here)
        if mesh is not None:
            part = tuple(sharding.global_batch(a, mesh) for a in part)
        with sharding.activate(mesh):
            # the same key for every chunk: a row's token is drawn as in one call
            tok, cache = _prefill(
                params, part[0], part[1], cache, part[2], jax.random.fold_in(key, 0), temperature, top_p,
                cfg, top_k,
            )  # fmt: skip
            first = tok if first is None else jnp.where(part[3], tok, first)
    out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
    state = DecodeState(cache, out, jnp.int32(1), jnp.isin(first, eos_ids), key)
    # to_host: under a multi-host mesh the batch is spread over processes (np.asarray would refuse).
    first_np, done_np = sharding.to_host(first), sharding.to_host(state.done)
    yield first_np[:, None], done_np

    emitted = 1
    step_chunk = max_new_tokens if chunk is None else max(1, chunk)
    while emitted < max_new_tokens and not done_np.all():
        limit = min(emitted + step_chunk, max_new_tokens)
        with sharding.activate(mesh):
            state = _decode(params, state, jnp.int32(limit), temperature, top_p, eos_ids, pad_id, cfg, top_k)
        step = int(state.step)
        done_np = sharding.to_host(state.done)
        yield sharding.to_host(state.out)[:, emitted:step], done_np
        emitted = step


def generate(model, prefix, prompt, **kwargs) -> GenerationResult:
    """Generate continuations of ``prompt`` (a string, a list of strings, or token ids).

    Keyword arguments are those of :func:`generate_iter` (``max_new_tokens``, ``temperature``,
    ``top_k``, ``top_p``, ``seed``, ``max_len``, ``chat``). Greedy when ``temperature == 0``.
    """
    kwargs.setdefault("chunk", None)
    tokenizer = getattr(model, "tokenizer", None)
    cfg = model.cfg
    prompt_tokens = encode_prompts(tokenizer, prompt, prefix, kwargs.get("chat", False))
    t0 = time.perf_counter()
    pieces = []
    prefill_seconds = 0.0
    for piece, _ in generate_iter(model, prefix, prompt_tokens, **{**kwargs, "chat": False}):
        if not pieces:
            prefill_seconds = time.perf_counter() - t0
        pieces.append(piece)
    total = time.perf_counter() - t0
    all_tokens = np.concatenate(pieces, axis=1)
    eos = set(cfg.eos_token_ids) if kwargs.get("stop_at_eos", True) else set()
    tokens, finished = [], []
    for row in all_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        tokens.append(row if cut is None else row[:cut])
        finished.append(cut is not None)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return GenerationResult(
        tokens=tokens,
        texts=texts,
        prompt_tokens=prompt_tokens,
        finished=finished,
        prefill_seconds=prefill_seconds,
        decode_seconds=total - prefill_seconds,
        decode_steps=all_tokens.shape[1] - 1,
    )


def teacher_forced_greedy(model, prompt_tokens: Sequence[int], new_tokens: Sequence[int], prefix=None):
    """Argmax of a cache-free forward over prompt + new tokens, at the positions that produced each new token.

    Used by tests: greedy decoding is correct iff this equals the generated tokens.
    """
    seq = list(prompt_tokens) + list(new_tokens)
    if prefix is not None:
        seq = list(prefix.tokens) + seq
    T = len(seq)
    logits, _ = forward(model.params, jnp.asarray([seq]), jnp.arange(T)[None], None, model.cfg)
    start = T - len(new_tokens) - 1
    return np.asarray(jnp.argmax(logits[0, start : T - 1], axis=-1)).tolist()
