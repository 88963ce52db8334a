"""Launch the K4V2 decode kernel without and with its window program (for ncu launch stats)."""
import sys
import jax, jax.numpy as jnp
from jaxkv.bench import parse_kv
from jaxkv.kernels import kvdecode
from jaxkv.kvcache import pack_codes, side_specs

kv = parse_kv("K4V2")
kspec, vspec = side_specs(kv, kv.kbits, kv.vbits)
B, S, K, G, H, g = 8, 4352, 32, 1, 128, kv.group
J, C = S // g, H // g
ks = jax.random.split(jax.random.key(0), 12)
q = jax.random.normal(ks[0], (B, K * (G + 2), H), jnp.bfloat16)
f8 = jnp.float8_e4m3fn
kd = pack_codes(jax.random.randint(ks[1], (B, K, S, H), 0, 16).astype(jnp.uint8), 4)
vd = pack_codes(jax.random.randint(ks[2], (B, K, S, H), 0, 4).astype(jnp.uint8), 2)
ksc = jax.random.uniform(ks[3], (B, K, J, H), jnp.float32, 0.01, 0.3).astype(f8)
kz = jax.random.randint(ks[4], (B, K, J, H), 0, 16).astype(jnp.int8)
vsc = jax.random.uniform(ks[5], (B, K, S, C), jnp.float32, 0.01, 0.3).astype(f8)
vz = jax.random.randint(ks[6], (B, K, S, C), 0, 4).astype(jnp.int8)
print("windows", kspec.window, vspec.window, file=sys.stderr)
Rk, Rv = kspec.window, vspec.window
kring = jax.random.normal(ks[7], (B, Rk, K, H), jnp.bfloat16) if Rk else None
vring = jax.random.normal(ks[8], (B, Rv, K, H), jnp.bfloat16) if Rv else None
n_old = S - g + 3
meta = jnp.tile(jnp.array([[n_old, S - g - 32, S - g, n_old + 1]], jnp.int32), (B, 1))
nread = jnp.full((B,), S - g - 32, jnp.int32)
bits = dict(kbits=4, vbits=2, group=g)
for _ in range(2):
    jax.block_until_ready(kvdecode.body_partials(q, nread, kd, ksc, kz, vd, vsc, vz, **bits, sm_scale=0.088))
for _ in range(2):
    jax.block_until_ready(kvdecode.body_partials(q, nread, kd, ksc, kz, vd, vsc, vz, (kring, vring, meta), **bits, sm_scale=0.088))
print("done", file=sys.stderr)
