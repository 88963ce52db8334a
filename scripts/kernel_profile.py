"""Launch one of jaxkv's decode kernels a few times on realistic inputs, for an instruction-level
profile under Nsight Compute (``ncu``), which reads the hardware counters the JAX trace lacks.

Cases (Llama-2-7B shapes):

* ``kv``     the split-K decode attention kernel (``jaxkv.kernels.kvdecode``) over one layer's
             quantized body: ``--batch`` 8 sequences, ``--slots`` 4352, 32 KV heads x 128, ``--kv``
             K4V2 at group 32; ``--warps`` its warps per program (default: the module's);
* ``qmm``    the int4 tensor-core matmul kernel (``jaxkv.kernels.qmatmul``) at ``--rows`` 8 on the
             fused Q/K/V weight 4096 x 12288, group 128, its default tile;
* ``gemv``   the one-row int4 kernel on the same weight (batch-1 decode).

Each case runs ``--launches`` times after one compiling call; profile one launch past the first
with ncu (``-s 1 -c 1``), e.g.::

    ncu --clock-control none --set full -k regex:kv_decode -s 1 -c 1 -o OUT/kv \\
        python scripts/kernel_profile.py kv
    ncu --import OUT/kv.ncu-rep --page details          # throughput, occupancy, stall reasons
    ncu --import OUT/kv.ncu-rep --page source --csv --print-source sass   # per-instruction counters

Without ncu the script checks the kernel's output against XLA's and prints the wall time per
launch (host clock around synchronised calls: a lead, not a benchmark).
"""

from __future__ import annotations

import argparse
import sys
import time


def random_side(key, spec, shape, scale_shape):
    """One random quantized side of a cache layer: codes of ``shape`` ``[B, K, S, H]`` (head-major),
    float8 scales and int8 zero points of ``scale_shape`` (``spec`` says bits and group)."""
    import jax
    import jax.numpy as jnp

    from jaxkv.kvcache import QuantSide, pack_codes

    k1, k2, k3 = jax.random.split(key, 3)
    codes = jax.random.randint(k1, shape, 0, 2**spec.bits).astype(jnp.uint8)
    scale = jax.random.uniform(k2, scale_shape, jnp.float32, 0.01, 0.3).astype(jnp.float8_e4m3fn)
    zero = jax.random.randint(k3, scale_shape, -4, 2**spec.bits + 4).astype(jnp.int8)
    return QuantSide(pack_codes(codes, spec.bits), scale, zero, None, spec)


def body_attention(q, ks, vs, slots: int, group: int, sm_scale: float, **tile):
    """One query per sequence ``q [B, 1, K, G, H]`` over the whole quantized body of ``slots`` slots
    (no new token, no window, no pivot): the decode kernel's per-chunk partials
    (``kvdecode.body_partials``, tile keywords passed on) and their softmax merge."""
    import jax
    import jax.numpy as jnp

    from jaxkv.kernels import kvdecode

    B, _, K, _, H = q.shape
    z = jnp.zeros((B, 1, K, H), q.dtype)
    m, l, o = kvdecode.body_partials(
        kvdecode.step_heads(q.reshape(B, 1, -1, H), z, z), jnp.full((B,), slots, jnp.int32), ks.data, ks.scale,
        ks.zero, vs.data, vs.scale, vs.zero, kbits=ks.spec.bits, vbits=vs.spec.bits, group=group,
        sm_scale=sm_scale, interpret=jax.default_backend() != "gpu", **tile,
    )  # fmt: skip
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # [B, K, NC, G]
    return (jnp.einsum("BKCG,BKCGH->BKGH", w, o) / jnp.sum(l * w, axis=2)[..., None])[:, None]


def kv_case(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.bench import parse_kv
    from jaxkv.kvattention import body_scores, body_values
    from jaxkv.kvcache import side_specs

    kv = parse_kv(args.kv)
    kspec, vspec = side_specs(kv, kv.kbits, kv.vbits)
    B, S, K, G, H, g = args.batch, args.slots, 32, 1, 128, kv.group
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, 1, K, G, H), jnp.bfloat16)

    ks = random_side(keys[1], kspec, (B, K, S, H), (B, K, S // g, H))
    vs = random_side(keys[2], vspec, (B, K, S, H), (B, K, S, H // g))
    scale = 1.0 / np.sqrt(H)
    kernel = jax.jit(lambda q, ks, vs: body_attention(q, ks, vs, S, g, scale, num_warps=args.warps))

    @jax.jit
    def xla(q, ks, vs):
        return body_values(jax.nn.softmax(body_scores(q, ks) * scale, axis=-1), vs, q.dtype)

    return kernel, xla, (q, ks, vs)


def qmm_case(args, rows):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.kernels import qmatmul as qk
    from jaxkv.quant.qarray import QArray, dequantize, pack

    I, O, group = 4096, 12288, 128
    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k1, (rows, I), jnp.bfloat16)
    codes = jax.random.randint(k2, (1, I, O), 0, 16, jnp.int32)
    scale = (jax.random.uniform(k3, (1, I // group, O), jnp.float32, 0.5, 1.5) * 0.02).astype(jnp.float16)
    zero = jax.random.randint(k4, (1, I // group, O), 0, 16, jnp.int32).astype(jnp.uint8)
    w = QArray(pack(codes, 4), scale, zero, bits=4, group=group, dtype=np.dtype(jnp.bfloat16))
    interpret = jax.default_backend() != "gpu"

    @jax.jit
    def kernel(x, w):
        return qk.qmatmul(x, w.packed, w.scale, w.zero, None, bits=4, group=group, interpret=interpret)

    @jax.jit
    def xla(x, w):
        return x.astype(jnp.float32) @ dequantize(w, jnp.float32)

    return kernel, xla, (x, w)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case", choices=("kv", "qmm", "gemv"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--slots", type=int, default=4352)
    p.add_argument("--kv", default="K4V2")
    p.add_argument("--warps", type=int, default=None)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--launches", type=int, default=3)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    if args.case == "kv":
        kernel, xla, inputs = kv_case(args)
    else:
        kernel, xla, inputs = qmm_case(args, 1 if args.case == "gemv" else args.rows)
    y = np.asarray(kernel(*inputs), np.float64)
    ref = np.asarray(xla(*inputs), np.float64)
    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    t0 = time.perf_counter()
    for _ in range(args.launches):
        jax.block_until_ready(kernel(*inputs))
    ms = (time.perf_counter() - t0) / args.launches * 1e3
    print(f"{args.case}: rel err vs XLA {err:.2e}, {ms:.3f} ms per call (host clock)")
    return 0 if err < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
