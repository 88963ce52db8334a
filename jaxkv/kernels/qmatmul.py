"""Weight-only quantized matmul for decode: a Pallas (Triton) GPU kernel over packed QArray storage.

Conventions
-----------
* ``y [M, O] = x [M, I] @ w`` for a 4- or 8-bit :class:`~jaxkv.quant.qarray.QArray` ``w`` stored as
  in ``jaxkv.quant.qarray``: codes bit-packed along I (two 4-bit codes per byte, low nibble = even
  row), one scale and one uint8 zero point per (group of ``group`` input rows, output column).
* In the decode layout ``"oi"`` (``jaxkv.quant.qarray``) the codes come as ``[L, O, I*bits/8]``:
  a group's bytes load as ``[block_n, group*bits/8]`` rows and enter the product transposed, so the
  tensor-core operand is read from shared memory in words rather than gathered a byte at a time
  (SASS of the 8-row Q/K/V kernel: 616 instructions and no one-byte shared loads, against 880 with
  64; ``scripts/kernel_sass.py qmm8 qmm8oi``), and the low and high nibbles of byte ``j`` meet
  inputs ``j`` and ``j + group/2`` (two contiguous loads of ``x``, not strided ones). 8-bit
  codes (``kernel_sass.py qmm8-int8 qmm8oi-int8``): 848 instead of 992 instructions, no one-byte
  loads instead of 128, 128 registers instead of 225 (not yet timed on a GPU). One row in this layout
  takes the tensor-core kernel too.
* The weight may carry a leading stacked-layer axis ``[L, ...]`` with ``layer`` the (traced) index
  of the layer to use: the kernel reads that layer's bytes in place. Slicing the stacked weight
  first (what ``lax.scan`` over layers does) would make XLA copy the slice before the custom call,
  tripling the bytes a memory-bound decode step moves.
* Order of evaluation, per group ``g`` of input rows and block of output columns::

      acc += (x_g @ codes_g - sum(x_g) * zero_g) * scale_g

  The codes enter the tensor-core product exactly (integers < 256 are exact in bf16/f16) with
  float32 accumulation; the dequantization ``(q - zero) * scale`` is never formed per weight. A 4-bit
  nibble becomes the 16-bit float ``offset + c`` by half a byte permute (:func:`code_plane_16`, the
  offset joining the zero point), and ``sum(x_g)`` arrives already broadcast over the columns from a
  product with ones, so a group costs no shuffles: at 8 rows on an H100 the four Llama-2-7B shapes
  took 107.8 us together against 126.9 with a shift, mask and bit-or per nibble and a row sum
  (results/bench/h100_run24_qmm_*.md: each change alone 114-115 us).
* One row of 4-bit codes (batch-1 decode) takes its own kernel, :func:`_gemv4_kernel` (plain FMAs,
  no tensor cores, no layout shuffle), built to spend as few instructions per weight as possible
  (at one row it was bound by integer instruction issue rather than memory: cutting them from about
  2.5 to 1.5 per weight made it 1.25-1.33x faster on an H200): a nibble becomes the float ``0.5 + c/256``
  with one byte permute (inline PTX ``prmt``, its code placed in the mantissa of 0.5; the masks are
  shared by four bytes; no integer-to-float convert, no subtraction), one FMA (:func:`fma`)
  multiplies it by ``x``, and scale and zero point are applied once per group and column through
  ``sum_i x_i (c_i - z) s = s (256 sum_i x_i (0.5 + c_i/256) - (128 + z) sum_i x_i)``. Each program
  (one warp, :func:`default_config`) issues the loads of a whole group (``group/2 x block_n`` bytes)
  before using them. Its loop spends 2.8 SASS instructions per weight (3.2 with the earlier 4
  warps), and the column sums leave the tile's layout through shared memory once per group (4
  stores, 4 ``ldmatrix``, a barrier; ``scripts/kernel_sass.py gemv``). Applying scale and zero
  point to every tile row instead (stride-0 loads of the group's row, the rows summed once per
  program) took that out of the loop for 12% more instructions: at one warp and a group per program
  it tied (H100 run 64, within 0.4 us per shape), at 4 warps it was up to 1.12x slower (run 63),
  so it was not kept.
  Otherwise the tile has at least 16 rows (the smallest tensor-core tile; rows past ``x``'s re-read
  its last row and their outputs are dropped, so ``x`` is never padded); for 4-bit codes the kernel
  loads the even and the odd input rows with strided loads, so each nibble plane multiplies its own
  rows. ``split_k`` programs share the input dimension of one column block and write float32
  partial sums that XLA adds (a small [split_k, 16, O] array next to the weight's I*O/2 bytes); with
  one split the kernel writes the output directly. Every XLA op around the kernel is a separate
  launch in a decode step, so the wrapper keeps them to (with splits) one reduction; at batch 1 the
  model takes the partial sums as they are (``partials=True``) and adds them in the launch of what
  follows the matmul (``jaxkv.kernels.epilogue``).
* Tried on an H200 and removed, slower (results/bench/h200_run11_*): split-K partial sums added
  with float32 atomics into one zero-filled output (batch 1: 2.893 against 2.723 ms per Llama-2-7B
  token; the kernel itself 8-11% slower per shape, and the zero fill cost what the sum did); the
  FMA scheme of the one-row kernel for 2-8 rows (at 8 rows 2.6-2.7x slower than the tensor-core
  kernel: an FMA per weight and row outweighs the conversions it saves). On an H100 (run 68,
  ``results/bench/h100_run68_*``): one row over the decode layout with no split along the inputs
  (16 outputs and all their groups per program, so no partial sums for XLA; commit f447e20), 1.4-1.8x
  the one-row kernel's time per shape (1.1-1.5x with its split sum) and 3.126 against 2.359 ms per
  token: 168 registers and 4.1 instructions per weight against 64 and 2.8. Run 73: the one-row
  kernel's last program per column block running the epilogue (``jaxkv.kernels.epilogue`` says
  why it lost).
* GPU only (Triton lowering); :func:`supported` says when the kernel applies, and
  ``jaxkv.quant.qarray.einsum`` keeps the portable XLA path everywhere else (CPU, TPU, many rows).
  ``interpret=True`` runs the same kernel body on any backend (tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_ROWS = 64  # decode batches; prefill and perplexity keep XLA's dequantize-then-matmul


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile choice: ``block_n`` output columns per program, ``split_k`` programs along I."""

    block_n: int = 128
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 4
    sub_rows: int = 8  # one-row kernel: packed byte rows per load (sub_rows x block_n bytes)


def default_config(
    I: int, O: int, group: int, rows: int = 16, bits: int = 4, layout: str = "io"
) -> KernelConfig:
    """A tile for ``[I, O]``, split along I when the output columns alone do not give enough
    programs (the decode layout ``"oi"`` always takes the tensor-core kernel, so one row there gets
    the tile of two). Tensor-core tiles: at least two programs per SM of an H100/H200 (132 SMs). The
    one-row 4-bit kernel: one warp of 16-byte loads (4 byte rows x 128 columns) and one group of 128
    inputs per program (64 byte rows per program for smaller groups, so the float32 partial sums stay
    1/16 of the weight's bytes). Each program issues its group's loads and then waits for them, so
    the overlap comes from the programs beside it, and the more of them the better: on an H100 this
    tile was the fastest of 1, 2 and 4 warps, 64 or 128 columns and splits of 2 to one group per
    program for all four Llama-2-7B shapes (Q/K/V, O, gate/up, down: 13.8, 7.4, 22.4, 13.0 us with
    the split sum, against 15.9, 8.2, 27.1, 14.2 for the earlier 4-warp tile of up to 32 splits;
    results/bench/h100_run63_gemv_sweep.md, h100_run64_gemv_sweep.md), and the int4 decode step
    went from 2.530 to 2.368 ms per token (h100_run64_b1_*.md). Up to
    16 rows (batch 2-16 decode), 128 columns and 4 warps, split until 384 programs and at most
    8 groups per program: since a group's row sum left the shuffles for the tensor cores, the best
    swept tiles at 8 rows for the four Llama-2-7B shapes all had 4 warps (H200, 85.4 us together
    against 107.6 at the earlier 8 warps, split until 256 programs; best splits 4, 16, 8, 16 for
    Q/K/V, O, gate/up, down; results/bench/h200_run25_qmm_b8_sweep.md); this rule takes three of
    the four. Single tiles vary by up to 1.3x between runs (run 16 timed the same tile of Q/K/V at
    28.8 against run 15's 38.6 us), so near-ties are noise."""
    if layout == "oi":
        rows = max(rows, 2)
    groups = I // group
    warps, stages, max_groups = 4, 4, groups
    if bits == 4 and rows == 1:
        # one warp, 16-byte loads, a group per program: as many small programs as the input allows
        block_n = 128 if O % 128 == 0 else 64
        per_prog = max(1, 128 // group)  # groups below 128 inputs: 64 byte rows per program still
        return KernelConfig(
            block_n=block_n, split_k=-(-groups // per_prog), num_warps=1, num_stages=1,
            sub_rows=min(512 // block_n, group // 2),
        )  # fmt: skip
    if rows <= 16 and O % 128 == 0:
        block_n, sub_rows, warps, stages = 128, KernelConfig.sub_rows, 4, 3
        target, max_split, max_groups = 384, 16, 8
    else:
        block_n = 128 if O >= 16384 and O % 128 == 0 else 64
        sub_rows = KernelConfig.sub_rows
        target, max_split = 2 * 132, 8
    split_k = 1
    while (
        (O // block_n * split_k < target or groups > max_groups * split_k)
        and split_k < max_split
        and split_k * 2 <= groups
    ):
        split_k *= 2
    return KernelConfig(
        block_n=block_n, split_k=split_k, num_warps=warps, num_stages=stages, sub_rows=sub_rows
    )


def supported(x_rows: int, I: int, O: int, bits: int, group: int) -> bool:
    """True when the kernel handles this product (else the XLA path runs)."""
    return (
        bits in (4, 8)
        and x_rows <= MAX_ROWS
        and group in (32, 64, 128, 256)
        and I % group == 0
        and O % 64 == 0
    )


# Four packed bytes -> four 16-bit floats ``offset + c`` of one code plane, as two words: mask the
# plane of all four bytes at once (shifted down first), then each byte permute puts two codes under
# the exponent byte (bf16 0x43cc = 128 + cc, f16 0x64cc = 1024 + cc). $0, $1 the results, $2 the input.
_PLANE16_PTX = """{
.reg .b32 c, hi;
%s
mov.b32 hi, %s;
prmt.b32 $0, c, hi, 0x4140;
prmt.b32 $1, c, hi, 0x4342;
}"""
_EXPONENT_BYTE = {jnp.dtype(jnp.bfloat16): (0x43, 128.0), jnp.dtype(jnp.float16): (0x64, 1024.0)}


def code_plane_16(packed: jax.Array, bits: int, k: int, dtype, interpret: bool) -> tuple[jax.Array, float]:
    """Plane ``k`` (bits ``[k*bits, (k+1)*bits)`` of each byte) of uint8 ``packed`` 2- or 4-bit codes
    as ``offset + c`` in the 16-bit float ``dtype``, exact: bf16 128 + c, f16 1024 + c. Returns the
    values and ``offset`` (the caller removes it through the zero point). On the GPU a byte permute
    makes two values (inline PTX; no shift, mask and convert per value, which the Triton pipeline
    emits for the same expression in plain operations: H100, results/bench/h100_run24_qmm_*.md and
    kv_*.md); the interpreter (tests off the GPU) computes the same values with ordinary operations."""
    byte, offset = _EXPONENT_BYTE[jnp.dtype(dtype)]
    mask = (1 << bits) - 1
    if interpret:
        c = (packed.astype(jnp.uint32) >> (k * bits)) & mask
        return (c.astype(jnp.float32) + offset).astype(dtype), offset
    masks = "0x" + f"{mask:02X}" * 4
    shift = f"shr.u32 c, $2, {k * bits};\nand.b32 c, c, {masks};" if k else f"and.b32 c, $2, {masks};"
    values = pltriton.elementwise_inline_asm(
        _PLANE16_PTX % (shift, "0x" + f"{byte:02X}" * 4),
        args=[packed],
        constraints="=r,=r,r",
        pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, dtype)],
    )[0]
    return values, offset


def _kernel(
    layer_ref, x_ref, p_ref, s_ref, z_ref, o_ref, *, bits, group, groups, groups_per_prog, block_n, oi, interpret
):  # fmt: skip
    n, k = pl.program_id(0), pl.program_id(1)
    # 2-D weights (one layer) index without a layer offset, so the compiler can prove the
    # alignment it needs for wide vector loads; stacked ones add the traced layer offset.
    stacked = p_ref.ndim == 3
    lead = (layer_ref[0],) if stacked else ()
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    M, Mp = x_ref.shape[0], o_ref.shape[0]
    # The tensor-core tile has Mp >= 16 rows: rows past x's M re-read its last row (their outputs are
    # dropped), so no padded copy of x is made outside (one XLA launch per matmul saved).
    x_rows = slice(None) if Mp == M else jnp.minimum(jnp.arange(Mp, dtype=jnp.int32), M - 1)
    first = k * groups_per_prog
    rows = group // 2 if bits == 4 else group  # packed byte rows per group

    def load(g):
        """Group g's packed bytes [rows, block_n] and its x columns."""
        group_rows = pl.ds(pl.multiple_of(g * rows, rows), rows)
        if oi:  # [block_n, rows] as stored, transposed in registers
            p = p_ref[(*lead, cols, group_rows)].T
            if bits == 4:  # low nibbles meet the group's first half of x, high nibbles the second
                return p, (
                    x_ref[x_rows, pl.ds(g * group, rows)],
                    x_ref[x_rows, pl.ds(g * group + rows, rows)],
                )
            return p, (x_ref[x_rows, pl.ds(g * group, group)],)
        p = p_ref[(*lead, group_rows, cols)]
        if bits == 4:  # even input rows meet the low nibbles, odd rows the high ones (strided loads)
            return p, (
                x_ref[x_rows, pl.ds(g * group, group // 2, 2)],
                x_ref[x_rows, pl.ds(g * group + 1, group // 2, 2)],
            )
        return p, (x_ref[x_rows, pl.ds(g * group, group)],)

    def update(acc, g, p, xs):
        scale = s_ref[(*lead, pl.ds(g, 1), cols)].astype(jnp.float32)  # [1, block_n]
        zero = z_ref[(*lead, pl.ds(g, 1), cols)].astype(jnp.float32)
        # sum(x) of the group broadcast over the columns, by the tensor cores (a product with ones):
        # a row sum would cost cross-lane shuffles and a layout change per group
        ones = jnp.ones(p.shape, xs[0].dtype)
        xsum = sum(pltriton.dot(x, ones) for x in xs)  # [Mp, block_n] float32
        if bits == 4:  # each nibble plane meets its own input rows (even: low, odd: high)
            lo, offset = code_plane_16(p, 4, 0, xs[0].dtype, interpret)
            hi, _ = code_plane_16(p, 4, 1, xs[0].dtype, interpret)
            a = pltriton.dot(xs[0], lo) + pltriton.dot(xs[1], hi)
            zero = zero + offset
        else:
            a = pltriton.dot(xs[0], p.astype(jnp.float32).astype(xs[0].dtype))
        return acc + (a - xsum * zero) * scale

    def body(j, acc):
        return update(acc, first + j, *load(first + j))

    # The last split may hold fewer groups when split_k does not divide them. (Issuing the loads of
    # 2 or 4 groups before their arithmetic was slower at 8 rows on an H200, best tile against best
    # tile 1.06-1.41x (results/bench/h200_run16_gemv_b8_unroll_rejected.json); so was the weight as
    # the left operand, y^T = w^T x^T, 1.15-1.27x (results/bench/h200_run15_gemv_b8_sweep.json).)
    steps = jnp.minimum(groups_per_prog, groups - first)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((Mp, block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


# Four packed bytes (four columns, one even and one odd input row) -> four float32 ``0.5 + c/256``
# of one code plane: mask that plane of all four bytes at once (shifted down first), then one byte
# permute per value puts its code in mantissa bits 16-19 under the exponent byte of 0.5 (0x3F, with
# bit 23 clear). Operands: $0-$3 the floats of bytes 0-3, $4 the packed input. (One asm for all
# planes would save the masks, but Pallas lowers one result per asm.)
_PLANE_PTX = """{
.reg .b32 c, half;
%s
mov.b32 half, 0x3F000000;
prmt.b32 $0, c, half, 0x7044;
prmt.b32 $1, c, half, 0x7144;
prmt.b32 $2, c, half, 0x7244;
prmt.b32 $3, c, half, 0x7344;
}"""


def _plane_ptx(bits: int, k: int) -> str:
    mask = "0x" + f"{(1 << bits) - 1:02X}" * 4
    shift = f"shr.u32 c, $4, {k * bits};\nand.b32 c, c, {mask};" if k else f"and.b32 c, $4, {mask};"
    return _PLANE_PTX % shift


def code_planes_f32(p: jax.Array, bits: int, interpret: bool) -> tuple[jax.Array, ...]:
    """uint8 ``p`` of packed ``bits``-bit codes -> its ``8 // bits`` planes (plane k: bits
    ``[k*bits, (k+1)*bits)`` of each byte) as float32 ``0.5 + c/256`` (exact): for 2 and 4 bits
    little more than one integer operation per value (a byte permute each, the masks shared by four
    bytes) instead of a widening convert, a shift and a mask; the caller removes the 0.5 through the
    zero point and the 1/256 through the scale. 8-bit codes (one plane) and the interpreter (tests
    off the GPU) compute the same values with ordinary operations."""
    mask = (1 << bits) - 1
    if interpret or bits == 8:
        u = p.astype(jnp.uint32)
        return tuple(
            jax.lax.bitcast_convert_type((((u >> (k * bits)) & mask) << 16) | 0x3F000000, jnp.float32)
            if bits < 8
            else u.astype(jnp.float32) * (1 / 256) + 0.5
            for k in range(8 // bits)
        )
    out = [jax.ShapeDtypeStruct(p.shape, jnp.float32)]
    return tuple(
        pltriton.elementwise_inline_asm(
            _plane_ptx(bits, k), args=[p], constraints="=r,=r,=r,=r,r", pack=4, result_shape_dtypes=out
        )[0]
        for k in range(8 // bits)
    )


def fma(a: jax.Array, b: jax.Array, c: jax.Array, interpret: bool) -> jax.Array:
    """float32 ``a * b + c`` (broadcast) as one fused multiply-add: the Triton pipeline under Pallas
    leaves ``a * b + c`` as a multiply and an add (H100, Nsight Compute, run 18: 0 fused against 3.8M
    unfused float32 instructions in the one-row kernel), so the kernels ask for ``fma.rn.f32`` by
    inline PTX. The interpreter (tests off the GPU) rounds twice."""
    if interpret:
        return a * b + c
    a, b, c = jnp.broadcast_arrays(a, b, c)
    return pltriton.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;",
        args=[a, b, c],
        constraints="=r,r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )[0]


def _gemv_program(layer_ref, p_ref, block_n: int, groups_per_prog: int):
    """This program's layer index (empty for 2-D weights), output columns and first group."""
    n, k = pl.program_id(0), pl.program_id(1)
    lead = (layer_ref[0],) if p_ref.ndim == 3 else ()
    return lead, pl.ds(pl.multiple_of(n * block_n, block_n), block_n), k * groups_per_prog


def _load_group(p_ref, lead, cols, g, group: int, sub_rows: int) -> tuple[jax.Array, ...]:
    """Group ``g``'s packed bytes as ``[sub_rows, block_n]`` tiles, every load issued before any is
    used (so they are all in flight before the arithmetic starts)."""
    half = group // 2  # packed byte rows per group
    return tuple(
        p_ref[(*lead, pl.ds(pl.multiple_of(g * half + t * sub_rows, sub_rows), sub_rows), cols)]
        for t in range(half // sub_rows)
    )


def _x_pair(x_ref, row, sub_rows: int) -> tuple[jax.Array, jax.Array]:
    """``x`` at the even and the odd input rows from ``row`` on (the rows of a tile's low and high
    nibbles), as float32 columns ``[sub_rows, 1]``."""
    xe = x_ref[pl.ds(0, 1), pl.ds(row, sub_rows, 2)].astype(jnp.float32).T
    xo = x_ref[pl.ds(0, 1), pl.ds(row + 1, sub_rows, 2)].astype(jnp.float32).T
    return xe, xo


def _gemv4_kernel(
    layer_ref, x_ref, p_ref, s_ref, z_ref, o_ref, *, group, groups, groups_per_prog, block_n, sub_rows, interpret
):  # fmt: skip
    """One row of ``x`` times 4-bit weights (batch-1 decode); see the module docstring."""
    lead, cols, first = _gemv_program(layer_ref, p_ref, block_n, groups_per_prog)

    def body(j, carry):
        out, zterm = carry
        g = first + j
        tiles = _load_group(p_ref, lead, cols, g, group, sub_rows)
        xsum = jnp.sum(x_ref[pl.ds(0, 1), pl.ds(g * group, group)].astype(jnp.float32))
        acc = jnp.zeros((sub_rows, block_n), jnp.float32)
        for t, p in enumerate(tiles):
            xe, xo = _x_pair(x_ref, g * group + 2 * t * sub_rows, sub_rows)
            lo, hi = code_planes_f32(p, 4, interpret)
            acc = fma(hi, xo, fma(lo, xe, acc, interpret), interpret)
        # sum_i x_i (c_i - z) s = s (256 sum_i x_i (0.5 + c_i/256) - (128 + z) sum_i x_i)
        scale = s_ref[(*lead, pl.ds(g, 1), cols)].astype(jnp.float32)  # [1, block_n]
        zero = z_ref[(*lead, pl.ds(g, 1), cols)].astype(jnp.float32)
        return out + acc * (256.0 * scale), zterm + (128.0 + zero) * scale * xsum

    steps = jnp.minimum(groups_per_prog, groups - first)
    init = (jnp.zeros((sub_rows, block_n), jnp.float32), jnp.zeros((1, block_n), jnp.float32))
    # No software pipelining: carrying the next group's bytes in registers (loaded while this group
    # computes) was slower on an H200 at the same tile (median 1.06-1.12x, best tiles 1.0-1.29x;
    # results/bench/h200_run7_gemv_sweep_prefetch_rejected.json): the overlap comes from the other
    # programs on the SM.
    out, zterm = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = (jnp.sum(out, axis=0, keepdims=True) - zterm).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group", "layout", "config", "partials", "interpret"))
def qmatmul(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    layer: jax.Array,
    row_scale: jax.Array | None = None,
    *,
    bits: int,
    group: int,
    layout: str = "io",
    config: KernelConfig | None = None,
    partials: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """``x [M, I] @ dequantize(w[layer])`` -> ``[M, O]`` in ``x.dtype`` (float32 accumulation).

    ``packed [L, I*bits/8, O]`` uint8 (layout ``"io"``) or ``[L, O, I*bits/8]`` (``"oi"``; module
    docstring), ``scale``/``zero`` ``[L, I/group, O]`` (zero uint8; symmetric weights pass their
    implicit zero point as an array), ``layer`` an int32 scalar, or None when ``L == 1`` (the kernel
    then needs no layer offset). ``row_scale [M]`` (float32), when given, multiplies each output row
    in float32 before the rounding to ``x.dtype``, in the launch that adds the split-K partial sums
    (``jaxkv.model`` passes RMSNorm's ``1/rms`` this way, so the norm needs no scaling launch).
    ``partials=True`` returns the kernel's float32 output as it is, ``[split_k, Mp, O]`` with
    ``Mp >= M`` rows (rows past ``M`` are padding), for a launch that adds the splits together with
    what comes next (``jaxkv.kernels.epilogue``).
    """
    M, I = x.shape
    oi = layout == "oi"
    O = packed.shape[1 if oi else 2]
    cfg = config or default_config(I, O, group, M, bits, layout)
    gemv = bits == 4 and M == 1 and not oi
    # Triton block shapes are powers of two; the tensor-core tile has at least 16 rows.
    Mp = 1 if gemv else max(16, 1 << (M - 1).bit_length())
    groups = I // group
    if O % cfg.block_n or cfg.split_k > groups or (gemv and (group // 2) % cfg.sub_rows):
        raise ValueError(f"tile {cfg} does not divide the weight [{I}, {O}] with group {group}")
    weights = (packed, scale, zero)
    if layer is None:  # one layer: drop the unit axis (free) so the kernel indexes 2-D refs
        weights = tuple(a.reshape(a.shape[1:]) for a in weights)
        layer = 0
    # One split writes x.dtype directly (float32 when rows are scaled after); several write float32
    # partial sums that XLA adds.
    if partials and row_scale is not None:
        raise ValueError("row_scale applies to the summed output; with partials=True the caller sums")
    out_dtype = x.dtype if cfg.split_k == 1 and row_scale is None and not partials else jnp.float32
    tiling = dict(group=group, groups=groups, groups_per_prog=-(-groups // cfg.split_k), block_n=cfg.block_n)
    if gemv:
        kernel = functools.partial(_gemv4_kernel, sub_rows=cfg.sub_rows, interpret=interpret, **tiling)
    else:
        kernel = functools.partial(_kernel, bits=bits, oi=oi, interpret=interpret, **tiling)
    full = pl.BlockSpec(memory_space=None)
    out = pl.pallas_call(
        kernel,
        grid=(O // cfg.block_n, cfg.split_k),
        in_specs=[full] * 5,
        out_specs=pl.BlockSpec((None, Mp, cfg.block_n), lambda n, k: (k, 0, n)),
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, Mp, O), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"qmatmul_int{bits}" + ("_gemv" if gemv else "_oi" if oi else ""),
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), x, *weights)
    if partials:
        return out
    y = (out[0] if cfg.split_k == 1 else jnp.sum(out, axis=0))[:M]
    if row_scale is not None:
        y = y * row_scale.reshape(M, 1).astype(jnp.float32)
    return y.astype(x.dtype)


def zero_points(w) -> jax.Array:
    """The uint8 zero points of a QArray, the implicit ``2**(bits-1)`` when symmetric."""
    if w.zero is not None:
        return w.zero
    return jnp.full(w.scale.shape, 2 ** (w.bits - 1), jnp.uint8)


def reference(
    x: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int
) -> np.ndarray:
    """float64 numpy ``x @ ((codes - zero) * scale)`` for one ``[I, O]`` layer (tests)."""
    I, O = codes.shape
    w = (
        codes.astype(np.float64).reshape(I // group, group, O) - zero.astype(np.float64)[:, None]
    ) * scale.astype(np.float64)[:, None]
    return x.astype(np.float64) @ w.reshape(I, O)
