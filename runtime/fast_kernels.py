"""Fused compiled kernels (numba, `pip install ferrisres[fast]`): `y = x @ W.T` in one pass over the stored bytes.

The numpy path (kernels.py) decodes a chunk of rows into float32 and hands it to BLAS: every packed
byte becomes 16 bytes written and read again. Here each byte is loaded once, its codes are unpacked in
registers by shifts and masks and multiplied into the token's input at once, as llama.cpp's TQ2_0 and
bitnet.cpp's I2_S dot products do (docs/kernels.md). What fits numba of their tricks:

- the input is deinterleaved once per call (x[4j + k] -> xk[k, j]), so that the k-th code of every
  byte meets a contiguous run of x and LLVM vectorizes the byte loop (16 bytes per AVX-512 step);
- group scales multiply a group's partial sum, once per group and plane, never each weight;
- the two planes of a row are unpacked in the same loop over the input;
- rows are split over threads (`prange`); for a few tokens a row is unpacked once, in L1 or L2, and
  multiplied by each. More tokens than `MAX_TOKENS` go to numpy, whose sgemm then wins; the int8 kernel
  takes any number, `INT8_TOKENS` a call.

Sums are float32 like BLAS's, in another order (fastmath `reassoc` lets LLVM vectorize them): the
difference from the numpy path is float32 rounding, which the tests bound. `kernel="int8"` goes further,
as llama.cpp does: the inputs of the ternary products are rounded to int8 per group of 64 and multiplied
in integers by vpdpbusd (or vpmaddubsw), which numba reaches through LLVM intrinsics (below); its codes
are unpacked by byte lookups (vpshufb), all planes of a row at once, and stay in registers for up to
TOKEN_BLOCK tokens; when the planes' scales are tied (each 3 times the next one's, the converter's default),
a column's codes are added into one number first, so each token takes one vpdpbusd for all planes. The tied
head over an int6 table goes the same way, its six-bit values assembled from
the packed row by shifts and masks (`_int6_table`). That moves results by the inputs' rounding, far beyond
float32's: a kernel of its own (`--kernel auto` takes it where the CPU has the instructions), not the
reference. T-MAC's lookups of precomputed input sums are not taken:
per 4 weights they cost what one lane of vpdpbusd does.
"""

from __future__ import annotations

import functools
import sys
import threading
import time

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ferrisres.format.encodings import BASE3_TERNARY, GROUPED_TERNARY
from ferrisres.format.tables import ZERO_CODE, table_group

from . import kernels

# reassoc: LLVM may reorder float sums, which it needs to vectorize them; contract: fused multiply-adds.
# No other fast-math flag: NaN and infinities propagate as in numpy. cache=True: compiled once per machine.
_JIT = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"}, boundscheck=False, error_model="numpy")
LANES = 16  # partial sums of a group are added LANES at a time: one AVX-512 vector (two AVX2 ones) of float32
_ONE = np.float32(1)  # a float32 constant: numba makes float32 - 1 a float64
_THREE, _THIRD = np.float32(3), np.float32(1 / 3)
# float16 bit pattern -> float32 (numba has no float16 on the CPU): group scales and f16 weights
_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
_this_thread = threading.local()  # each thread's numba thread count (`_use_threads`) and last int8 input
# Group sizes the kernels know at compile time. A row is then one long vectorized sum, each product
# multiplied by its group's scale (looked up by index from the row's scales, in L1): a sum per group is too
# short for LLVM's vector loop and a group size only known at run time defeats it too (2-3x slower, measured
# on the E2B shapes). DEFAULT_GROUP: the converter's default group of codes (DEFAULT_GROUP_BYTES packed 4 per
# byte); TABLE_GROUP: an int4-g32 or int6-g32 table's, as the tied head; other groups take the partial-sum loops.
DEFAULT_GROUP = 64
DEFAULT_GROUP_BYTES = DEFAULT_GROUP // 4
TABLE_GROUP = table_group("int6-g32")  # the default table's group (int4-g32's too)


@njit(inline="always", **_JIT)
def _group_sum(partial, start, n):
    """partial[start:start + n] summed; LANES at a time when n allows, which LLVM turns into vector adds."""
    s = np.float32(0)
    if n % LANES == 0:
        for c in range(start, start + n, LANES):
            for lane in range(LANES):
                s += partial[c + lane]
    else:
        for j in range(start, start + n):
            s += partial[j]
    return s


@njit(inline="always", **_JIT)
def _valid_codes(b):
    """A packed byte (int32) with each invalid code 0b11 made 0b01 (weight 0), as numpy's table reads it."""
    return np.int32(b ^ ((b & (b >> 1) & 0x55) << 1))


@njit(inline="always", **_JIT)
def _weights(b):
    """The four weights of one packed byte (codes weight + 1, lowest bits first; `_valid_codes`), as
    float32. Subtracting the inputs' sum once per group instead of 1 per code (as TQ2_0 does in integers)
    measured < 10% faster here, and in float32 it would leave rounding residue where the weights are zero."""
    b = _valid_codes(b)
    return (np.float32(np.int32(b & 3)) - _ONE, np.float32(np.int32((b >> 2) & 3)) - _ONE,
            np.float32(np.int32((b >> 4) & 3)) - _ONE, np.float32(np.int32(b >> 6)) - _ONE)


@njit(inline="always", **_JIT)
def _dot4(w, x, j):
    """Byte j's four weights `w` times their inputs x[:, j] (x: one token's deinterleaved input)."""
    return w[0] * x[0, j] + w[1] * x[1, j] + w[2] * x[2, j] + w[3] * x[3, j]


@njit(inline="always", **_JIT)
def _weights5(b):
    """The five weights of one base-3 byte (digits weight + 1, lowest first), as float32, computed in
    float32 lanes: for an integer q < 256, floor(q * float32(1/3)) is q // 3 (float32(1/3) exceeds 1/3 by
    1e-8, too little to reach the next integer), and q - 3 * (q // 3) is exact. A byte >= 243 is first made
    121 (five zeros), as numpy's table reads it."""
    q0 = np.float32(b if b < 243 else 121)
    q1 = np.floor(q0 * _THIRD)
    q2 = np.floor(q1 * _THIRD)
    q3 = np.floor(q2 * _THIRD)
    q4 = np.floor(q3 * _THIRD)
    return (q0 - _THREE * q1 - _ONE, q1 - _THREE * q2 - _ONE, q2 - _THREE * q3 - _ONE, q3 - _THREE * q4 - _ONE,
            q4 - _ONE)


@njit(inline="always", **_JIT)
def _dot5(w, x, j):
    """A base-3 byte j's five weights `w` times their inputs x[:, j]."""
    return w[0] * x[0, j] + w[1] * x[1, j] + w[2] * x[2, j] + w[3] * x[3, j] + w[4] * x[4, j]


@njit(inline="always", **_JIT)
def _row_scales(scales, f16, out):
    """out[g]: the float32 value of a row's float16 scale g."""
    for g in range(len(scales)):
        out[g] = f16[scales[g]]


@njit(inline="always", **_JIT)
def _scaled_groups(partial, scales, group_bytes, f16):
    """sum over groups g of scale[g] * (partial's sum over group g): the scales multiply partial sums."""
    total = np.float32(0)
    for g in range(len(scales)):
        total += f16[scales[g]] * _group_sum(partial, g * group_bytes, group_bytes)
    return total


@njit(parallel=True, **_JIT)
def _ternary(packed, x, scales, group_bytes, f16, out):
    """One token: out[r] = sum over planes p and groups g of scale[r, p, g] * (weights of group g of plane p) . x.

    packed [rows, planes, bytes] uint8; x [4, bytes] the deinterleaved input; scales [rows, planes, groups]
    float16 bit patterns (read through `f16`); each group is `group_bytes` consecutive bytes."""
    rows, planes, nbytes = packed.shape
    for r in prange(rows):
        row_scales = np.empty(scales.shape[2], dtype=np.float32)
        total = np.float32(0)
        for p in range(planes):
            row = packed[r, p]
            if group_bytes == DEFAULT_GROUP_BYTES:
                _row_scales(scales[r, p], f16, row_scales)
                for j in range(nbytes):
                    total += row_scales[j // DEFAULT_GROUP_BYTES] * _dot4(_weights(np.int32(row[j])), x, j)
            else:
                partial = np.empty(nbytes, dtype=np.float32)
                for j in range(nbytes):
                    partial[j] = _dot4(_weights(np.int32(row[j])), x, j)
                total += _scaled_groups(partial, scales[r, p], group_bytes, f16)
        out[r] = total


@njit(parallel=True, **_JIT)
def _ternary_tokens(packed, xk, scales, group_bytes, f16, out):
    """`_ternary` for T tokens (xk [T, 4, bytes], out [T, rows]): each plane of a row is unpacked once
    into float32 weights (a row: L1 or L2), then multiplied by every token. Unpacking four tokens' worth
    at a time in registers instead was faster for 1536-wide rows, 2.5x slower for 12288-wide ones."""
    rows, planes, nbytes = packed.shape
    tokens = out.shape[0]
    for r in prange(rows):
        w = np.empty((4, nbytes), dtype=np.float32)  # w[k, j]: weight of code k of byte j
        w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
        row_scales = np.empty(scales.shape[2], dtype=np.float32)
        partial = np.empty(nbytes, dtype=np.float32)
        totals = np.zeros(tokens, dtype=np.float32)
        for p in range(planes):
            row = packed[r, p]
            for j in range(nbytes):
                w0[j], w1[j], w2[j], w3[j] = _weights(np.int32(row[j]))
            _row_scales(scales[r, p], f16, row_scales)
            for t in range(tokens):
                x0, x1, x2, x3 = xk[t, 0], xk[t, 1], xk[t, 2], xk[t, 3]
                if group_bytes == DEFAULT_GROUP_BYTES:
                    s = np.float32(0)
                    for j in range(nbytes):
                        s += row_scales[j // DEFAULT_GROUP_BYTES] * (w0[j] * x0[j] + w1[j] * x1[j] + w2[j] * x2[j]
                                                                     + w3[j] * x3[j])
                    totals[t] += s
                else:
                    for j in range(nbytes):
                        partial[j] = w0[j] * x0[j] + w1[j] * x1[j] + w2[j] * x2[j] + w3[j] * x3[j]
                    totals[t] += _scaled_groups(partial, scales[r, p], group_bytes, f16)
        for t in range(tokens):
            out[t, r] = totals[t]


@njit(inline="always", **_JIT)
def _byte_scales(scales, group_bytes, f16, out):
    """out[p, j]: the float32 scale of byte j of plane p (each group's scale, repeated over its bytes)."""
    for p in range(scales.shape[0]):
        for g in range(scales.shape[1]):
            s = f16[scales[p, g]]
            for j in range(g * group_bytes, (g + 1) * group_bytes):
                out[p, j] = s


@njit(parallel=True, **_JIT)
def _ternary5(packed, x, scales, group_bytes, f16, out):
    """`_ternary` for base-3 bytes: x [5, bytes] the input of code k of byte j at [k, j] (zero in unused slots).
    A group here is 13 bytes, too few for `_group_sum`'s vector adds: each byte's products are scaled
    instead, so the whole row is one vectorized sum."""
    rows, planes, nbytes = packed.shape
    for r in prange(rows):
        byte_scales = np.empty((planes, nbytes), dtype=np.float32)
        _byte_scales(scales[r], group_bytes, f16, byte_scales)
        first, last, s0, s1 = packed[r, 0], packed[r, planes - 1], byte_scales[0], byte_scales[planes - 1]
        total = np.float32(0)
        if planes == 2:  # both planes against each input once
            for j in range(nbytes):
                total += (_dot5(_weights5(np.int32(first[j])), x, j) * s0[j]
                          + _dot5(_weights5(np.int32(last[j])), x, j) * s1[j])
        else:  # one plane, or three: a plane at a time
            for p in range(planes):
                row, byte_scale = packed[r, p], byte_scales[p]
                for j in range(nbytes):
                    total += _dot5(_weights5(np.int32(row[j])), x, j) * byte_scale[j]
        out[r] = total


@njit(parallel=True, **_JIT)
def _ternary5_tokens(packed, xk, scales, group_bytes, f16, out):
    """`_ternary_tokens` for base-3 bytes (xk [T, 5, bytes])."""
    rows, planes, nbytes = packed.shape
    tokens = out.shape[0]
    for r in prange(rows):
        w = np.empty((5, nbytes), dtype=np.float32)
        w0, w1, w2, w3, w4 = w[0], w[1], w[2], w[3], w[4]
        partial = np.empty(nbytes, dtype=np.float32)
        totals = np.zeros(tokens, dtype=np.float32)
        for p in range(planes):
            row = packed[r, p]
            for j in range(nbytes):
                w0[j], w1[j], w2[j], w3[j], w4[j] = _weights5(np.int32(row[j]))
            for t in range(tokens):
                x0, x1, x2, x3, x4 = xk[t, 0], xk[t, 1], xk[t, 2], xk[t, 3], xk[t, 4]
                for j in range(nbytes):
                    partial[j] = w0[j] * x0[j] + w1[j] * x1[j] + w2[j] * x2[j] + w3[j] * x3[j] + w4[j] * x4[j]
                totals[t] += _scaled_groups(partial, scales[r, p], group_bytes, f16)
        for t in range(tokens):
            out[t, r] = totals[t]


@njit(parallel=True, **_JIT)
def _ternary_rows(packed, x, out):
    """One token through per-row ternary (the row's scale is applied by the caller): out[r] = row r . x."""
    for r in prange(packed.shape[0]):
        row = packed[r]
        s = np.float32(0)
        for j in range(packed.shape[1]):
            s += _dot4(_weights(np.int32(row[j])), x, j)
        out[r] = s


@njit(parallel=True, **_JIT)
def _int8(q, x, out):
    """int8 rows (the head over an int8 table, or --cache int8 codes); the row scale is the caller's."""
    for r in prange(q.shape[0]):
        for t in range(x.shape[0]):
            s = np.float32(0)
            for j in range(q.shape[1]):
                s += np.float32(q[r, j]) * x[t, j]
            out[t, r] = s


@njit(inline="always", **_JIT)
def _grouped_codes_dot(row, x, row_scales, group):
    """sum over j of row_scales[j // group] * row[j] * x[j]: int8 codes with a scale per `group` columns.
    Inlined where `group` is a literal, which LLVM needs to vectorize the row as one sum."""
    s = np.float32(0)
    for j in range(len(row)):
        s += row_scales[j // group] * np.float32(np.int32(row[j])) * x[j]
    return s


@njit(parallel=True, **_JIT)
def _int8_groups(q, x, scales, group, f16, out):
    """int8 codes with float16 group scales: grouped ternary kept unpacked (`--cache int8`), or an int4 or
    int6 table unpacked as the tied head. q [rows, planes, width], scales [rows, planes, groups] of
    `group` columns each."""
    rows, planes, width = q.shape
    for r in prange(rows):
        row_scales = np.empty(scales.shape[2], dtype=np.float32)
        partial = np.empty(width, dtype=np.float32)
        for t in range(x.shape[0]):
            xt = x[t]
            total = np.float32(0)
            for p in range(planes):
                row = q[r, p]
                if group == DEFAULT_GROUP:
                    _row_scales(scales[r, p], f16, row_scales)
                    total += _grouped_codes_dot(row, xt, row_scales, DEFAULT_GROUP)
                elif group == TABLE_GROUP:
                    _row_scales(scales[r, p], f16, row_scales)
                    total += _grouped_codes_dot(row, xt, row_scales, TABLE_GROUP)
                else:
                    for j in range(width):
                        partial[j] = np.float32(np.int32(row[j])) * xt[j]
                    total += _scaled_groups(partial, scales[r, p], group, f16)
            out[t, r] = total


@njit(parallel=True, **_JIT)
def _bf16(u, x, out):
    """bf16 rows as uint16 bit patterns: the float32 bits are u << 16, widened a row at a time in L1."""
    rows, n = u.shape
    for r in prange(rows):
        bits = np.empty(n, dtype=np.uint32)
        w = bits.view(np.float32)
        for j in range(n):
            bits[j] = np.uint32(u[r, j]) << 16
        for t in range(x.shape[0]):
            s = np.float32(0)
            for j in range(n):
                s += w[j] * x[t, j]
            out[t, r] = s


@njit(parallel=True, **_JIT)
def _f16(u, x, f16, out):
    """f16 rows as uint16 bit patterns, widened through the 65536-entry table (exact, NaN and inf included)."""
    rows, n = u.shape
    for r in prange(rows):
        w = np.empty(n, dtype=np.float32)
        for j in range(n):
            w[j] = f16[u[r, j]]
        for t in range(x.shape[0]):
            s = np.float32(0)
            for j in range(n):
                s += w[j] * x[t, j]
            out[t, r] = s


# int8 activations (`kernel="int8"`), for the default encoding (2-bit grouped ternary, groups of 64): each
# group of 64 inputs is rounded to int8 with its own scale (absmax / 127), and a byte's four codes (weight + 1,
# 0..2) multiply them in integers, 64 bytes at a time, by the one x86 instruction that multiplies unsigned
# by signed bytes and sums each four products into an int32 lane (vpdpbusd; without AVX512-VNNI, vpmaddubsw
# then vpmaddwd): what llama.cpp's TQ2_0 and bitnet.cpp's I2_S do. The codes' +1 is taken off per lane by
# starting each lane's sum from minus its inputs' sum, and each lane (4 bytes, inside one group) is scaled by
# its group's weight scale times its input scale. Numba reaches these instructions through LLVM intrinsics.
# A byte's codes are split by nibble and looked up (vpshufb: 7 instructions for 64 bytes, against 12 by
# shifts and masks), every plane of a 64-byte chunk once for a block of tokens, and each count of planes
# and tokens is a function of its own, whose loop pointers and codes all sit in registers: measured on
# E2B's shapes (one thread, from DRAM), 1.7-1.9x the speed of unpacking a plane at a time per token, and
# 3.2x at 8 tokens (docs/kernels.md).
INT8_ISAS = ("avx512vnni", "avx512bw", "avx2")  # best first; the int8 kernel needs one of them
# A kernel learns which one to emit from the type of an argument (a literal would be simpler, but numba's
# parallel loops cannot carry one): an empty array whose record dtype has one field, named after it.
ISA_ARGUMENTS = {isa: np.empty(0, dtype=[(isa, np.uint8)]) for isa in INT8_ISAS}
INT8_CHUNK = 64  # packed bytes a vector step reads: 16 int32 lanes of 4 bytes, 4 groups of 16 bytes
# A row's bytes are asked for at least this far ahead (`_prefetch`): one core's stream of loads, with the work
# between them, left DRAM idle (EPYC: 9.2 GB/s over a 150 MB matrix against sgemv's 23.5; 12.4 with it, measured
# at 512-4096). On the Xeon, 4096 read the three-plane rows 1.2x faster than 2048 and 1024 (11.3 against 9.6 and
# 8.4 GB/s, 1536x6144), the others 1.0-1.2x; 8192 no faster.
PREFETCH_BYTES = 4096
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V64, _V16I, _V16F = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)  # one AVX-512 register


def int8_isas() -> list[str]:
    """The int8 dot-product instruction sets of INT8_ISAS this CPU has, best first (all need AVX2, and
    F16C for the group scales); none: `kernel="int8"` is refused."""
    features = llvmlite.binding.get_host_cpu_features()
    if not (features.get("avx2") and features.get("f16c")):
        return []
    return [isa for isa in INT8_ISAS if features.get(isa) and (isa != "avx512vnni" or features.get("avx512bw"))]


def _vector(builder, pointer, offset, vector_type):
    """The `vector_type` at element `offset` of `pointer` (unaligned)."""
    return builder.load(builder.bitcast(builder.gep(pointer, [offset]), vector_type.as_pointer()), align=1)


def _splat(vector_type, value):
    return ir.Constant(vector_type, [value] * vector_type.count)


def _call(builder, name, result, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [a.type for a in args]), name)
    return builder.call(fn, args)


def _halves(builder, vector):
    """The two 32-byte halves of a <64 x i8> vector: AVX2's registers."""
    return [builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, 32), list(range(32 * h, 32 * h + 32))))
            for h in range(2)]


def _joined(builder, low, high):
    """Two vectors of n elements as one of 2n."""
    n = 2 * low.type.count
    return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, n), list(range(n))))


def _dot_lanes(builder, isa, acc, codes, x):
    """acc <16 x i32> + the sum of each 4 adjacent products of codes <64 x u8> and x <64 x i8>."""
    v16i, v32s = ir.VectorType(_I32, 16), ir.VectorType(_I16, 32)
    if isa == "avx512vnni":
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", v16i, acc, builder.bitcast(codes, v16i), builder.bitcast(x, v16i))
    ones = _splat(v32s, 1)  # pair sums (at most 2 * 2 * 127: no saturation) -> sums of 4 in int32
    if isa == "avx512bw":
        pairs = _call(builder, "llvm.x86.avx512.pmaddubs.w.512", v32s, codes, x)
        return builder.add(acc, _call(builder, "llvm.x86.avx512.pmaddw.d.512", v16i, pairs, ones))
    sums = [_call(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8),
                  _call(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(_I16, 16), c, xh), _splat(ir.VectorType(_I16, 16), 1))
            for c, xh in zip(_halves(builder, codes), _halves(builder, x))]
    return builder.add(acc, _joined(builder, *sums))


def _lookup(builder, isa, table, index):
    """<64 x i8>: table[index] per byte (vpshufb; `table` repeats its 16 entries in each 16-byte lane, `index`
    < 16)."""
    if isa != "avx2":
        return _call(builder, "llvm.x86.avx512.pshuf.b.512", ir.VectorType(_I8, 64), table, index)
    return _joined(builder, *[_call(builder, "llvm.x86.avx2.pshuf.b", ir.VectorType(_I8, 32), t, i)
                              for t, i in zip(_halves(builder, table), _halves(builder, index))])


def _code(stored: int) -> int:
    """A stored 2-bit code as the kernels read it: weight + 1, the invalid 0b11 read as 0b01 (weight 0), as
    numpy does."""
    return 1 if stored == 3 else stored


# vpshufb tables from a nibble (two codes) to its low and to its high code: a packed byte's four codes are the
# low nibble's two then the high nibble's two, so 3 instructions split the nibbles and 4 lookups give the codes
_LOW_CODE = [_code(n & 3) for n in range(16)] * 4
_HIGH_CODE = [_code(n >> 2) for n in range(16)] * 4
MAX_PLANES = max(GROUPED_TERNARY.values())
# Tokens per pass over a chunk: 3 planes' 12 code vectors, 4 inputs and 4 sums fit AVX-512's 32 registers
# (8 tokens measured no faster)
TOKEN_BLOCK = 4
# Table encodings the int8 kernel reads packed as the tied head (`_int6_table`), with inputs rounded per group of
# the table's (TABLE_GROUP) and codes offset by INT6_ZERO; other tables are unpacked to int8 at load.
INT8_TABLES = ("int6-g32",)
INT6_ZERO = ZERO_CODE[6]


def _rows_codegen(isa_name: str, loop, max_planes: int):
    """The code of an int8 row intrinsic (`_int8_rows`, `_int6_rows`; arguments row, xq, xsum, xscale, scales,
    first, out, r, isa): one call of the LLVM function `loop(module, isa, planes, tokens, index)` for the row's
    count of planes (up to `max_planes`) and the block's count of tokens, with the pointers at token `first`'s
    data, then (nbytes, groups, rows, x_stride, lanes): a plane's bytes, the row's groups, out's rows, and
    per token, xq's inputs and xsum's lanes."""

    def codegen(context, builder, signature, args):
        names = ("row", "xq", "xsum", "xscale", "scales", "first", "out", "r")
        arrays = {n: context.make_array(t)(context, builder, a) for n, t, a in zip(names, signature.args, args)
                  if isinstance(t, types.Array)}
        first, r = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (5, 7))
        planes, nbytes = (builder.extract_value(arrays["row"].shape, i) for i in range(2))
        groups = builder.extract_value(arrays["scales"].shape, 1)
        tokens, rows = (builder.extract_value(arrays["out"].shape, i) for i in range(2))
        x_stride = builder.extract_value(arrays["xq"].shape, 1)  # xq [T, inputs]
        lanes = builder.extract_value(arrays["xsum"].shape, 1)
        index = nbytes.type
        pointers = [arrays["row"].data,
                    builder.gep(arrays["xq"].data, [builder.mul(first, x_stride)]),
                    builder.gep(arrays["xsum"].data, [builder.mul(first, lanes)]),
                    builder.gep(arrays["xscale"].data, [builder.mul(first, lanes)]),
                    builder.bitcast(arrays["scales"].data, ir.HalfType().as_pointer()),
                    builder.gep(arrays["out"].data, [builder.add(builder.mul(first, rows), r)])]
        left = builder.sub(tokens, first)
        most = ir.Constant(index, TOKEN_BLOCK)
        block = builder.select(builder.icmp_signed("<", left, most), left, most)
        for n_planes in range(1, max_planes + 1):
            for n_tokens in range(1, TOKEN_BLOCK + 1):
                case = builder.and_(builder.icmp_signed("==", planes, ir.Constant(index, n_planes)),
                                    builder.icmp_signed("==", block, ir.Constant(index, n_tokens)))
                with builder.if_then(case):
                    function = loop(builder.module, isa_name, n_planes, n_tokens, index)
                    builder.call(function, [*pointers, nbytes, groups, rows, x_stride, lanes])
        return context.get_dummy_value()

    return codegen


@intrinsic
def _int8_rows(typingctx, row, xq, xsum, xscale, scales, first, out, r, isa):
    """out[first + t, r] = the product of a row's whole 64-byte chunks (all its planes) with token first + t,
    for the TOKEN_BLOCK tokens from `first` on (fewer at the end): the sum over planes and groups of the
    group's weight scale x input scale x (codes . xq - the inputs' sum). row [planes, nbytes] packed codes;
    xq [T, 4 * nbytes] int8, the input of code k of byte j at [t, k * nbytes + j]; xsum, xscale [T, nbytes / 4]:
    per 4-byte lane, its inputs' sum and their group's scale; scales [planes, groups] the row's float16 group
    scales (bit patterns, widened by F16C); out [T, rows] float32; `isa` an ISA_ARGUMENTS array.

    Each chunk of every plane is read and unpacked once, by byte lookups, and its codes stay in registers
    for the block's tokens. The loop is a function of its own for each count of planes (1 to MAX_PLANES)
    and of tokens (1 to TOKEN_BLOCK), `_int8_loop`, so that all of it is in registers."""
    signature = types.void(row, xq, xsum, xscale, scales, first, out, r, isa)
    return signature, _rows_codegen(next(iter(isa.dtype.fields)), _int8_loop, MAX_PLANES)


@intrinsic
def _tied_rows(typingctx, row, xq, xsum, xscale, scales, first, out, r, isa):
    """`_int8_rows` for a row whose planes' scales are tied (`tied_planes`): its planes' codes at a column
    are one number, multiplied once per token (`_int8_loop`, tied)."""
    signature = types.void(row, xq, xsum, xscale, scales, first, out, r, isa)
    return signature, _rows_codegen(next(iter(isa.dtype.fields)), functools.partial(_int8_loop, tied=True), MAX_PLANES)


def _int8_loop(module, isa, n_planes, n_tokens, index, tied=False):
    """The LLVM function of `_int8_rows` for `n_planes` planes and `n_tokens` tokens (defined once per module),
    of `_loop_function`'s arguments. `tied`: plane p's scales are 3^(P-1-p) times the last plane's, so the
    weight at a column is that scale times sum_p 3^(P-1-p) t_p, and the codes sum_p 3^(P-1-p) (t_p + 1), from 0 to
    3^P - 1 (the last minus the first are (3^P - 1) / 2 times each input's sum), take one vpdpbusd per token
    for all planes."""
    tied = tied and n_planes > 1
    fn, builder = _loop_function(module, f"ferrisres_int8_rows_{isa}_{n_planes}_{n_tokens}" + ("_tied" if tied else ""), index)
    if builder is None:
        return fn
    prow, pxq, pxsum, pxscale, pscales, pout, nbytes, groups, rows, x_stride, lanes = fn.args
    const = lambda value: ir.Constant(index, value)  # noqa: E731
    weights = [3 ** (n_planes - 1 - p) if tied else 1 for p in range(n_planes)]  # of each plane's codes
    tables = [(ir.Constant(_V64, [w * c for c in _LOW_CODE]), ir.Constant(_V64, [w * c for c in _HIGH_CODE])) for w in weights]
    nibble = _splat(_V64, 0x0F)
    spread = ir.Constant(_V16I, [lane // 4 for lane in range(16)])  # a group's scale to its 4 lanes
    totals = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in range(n_tokens)]
    row_bytes = builder.mul(nbytes, const(n_planes))
    with cgutils.for_range(builder, builder.udiv(nbytes, const(INT8_CHUNK))) as loop:
        at = builder.mul(loop.index, const(INT8_CHUNK))
        codes, lane_scales = [], []
        starts = [builder.add(builder.mul(nbytes, const(p)), at) for p in range(n_planes)]  # each plane's chunk
        _prefetch(builder, prow, row_bytes, starts)
        for p, start in enumerate(starts):
            b = _vector(builder, prow, start, _V64)
            lo, hi = builder.and_(b, nibble), builder.and_(builder.lshr(b, _splat(_V64, 4)), nibble)
            low, high = tables[p]
            plane = [_lookup(builder, isa, low, lo), _lookup(builder, isa, high, lo),
                     _lookup(builder, isa, low, hi), _lookup(builder, isa, high, hi)]
            if tied and codes:
                codes[0] = [builder.add(a, c) for a, c in zip(codes[0], plane)]
            else:
                codes.append(plane)
            if tied and p < n_planes - 1:
                continue  # only the last plane's scales are read
            at_scale = builder.add(builder.mul(groups, const(p)), builder.mul(loop.index, const(4)))
            group_scales = builder.fpext(_vector(builder, pscales, at_scale, ir.VectorType(ir.HalfType(), 4)), ir.VectorType(_F32, 4))
            lane_scales.append(builder.shuffle_vector(group_scales, group_scales, spread))
        for t in range(n_tokens):
            x_at = builder.add(builder.mul(x_stride, const(t)), at)
            xs = [_vector(builder, pxq, builder.add(x_at, builder.mul(nbytes, const(k))), _V64) for k in range(4)]
            lane = builder.add(builder.mul(lanes, const(t)), builder.mul(loop.index, const(16)))
            sums = _vector(builder, pxsum, lane, _V16I)
            minus_sums = builder.mul(sums, _splat(_V16I, -sum(weights))) if tied else builder.neg(sums)
            scaled = None
            for p in range(len(codes)):
                acc = minus_sums
                for k in range(4):
                    acc = _dot_lanes(builder, isa, acc, codes[p][k], xs[k])
                exact = builder.sitofp(acc, _V16F)
                scaled = builder.fmul(exact, lane_scales[p]) if scaled is None else _fma(builder, exact, lane_scales[p], scaled)
            builder.store(_fma(builder, scaled, _vector(builder, pxscale, lane, _V16F), builder.load(totals[t])), totals[t])
    _store_sums(builder, totals, pout, rows)
    return fn


def _loop_function(module, name: str, index):
    """The internal LLVM function `name` of the row loops' arguments (row, xq, xsum, xscale, scales, out,
    nbytes, groups, rows, x_stride, lanes), and a builder at its entry; the builder is None when the module
    already defines it (a loop is defined once per module)."""
    if name in module.globals:
        return module.globals[name], None
    arguments = [_I8.as_pointer(), _I8.as_pointer(), _I32.as_pointer(), _F32.as_pointer(),
                 ir.HalfType().as_pointer(), _F32.as_pointer(), *[index] * 5]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), arguments), name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")  # its own registers: inlined beside the other counts', loop pointers spilled
    for a in fn.args[:6]:
        a.add_attribute("noalias")
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def _prefetch(builder, row, row_bytes, offsets) -> None:
    """Ask for one cache line per stream of `offsets` (where a chunk reads each plane, or run, of its row of
    `row_bytes`; past the end of the matrix: no fault). A row of PREFETCH_BYTES or more: each stream's line
    in the next row, so each plane is asked for a row ahead of its loads. (Asked for in memory order instead,
    from the chunk's place in the row, the last plane of a 3 x 3072-byte row came too late, after its first
    third was read: E2B's 1536x12288 down projections took 1.1-1.2x as long, one thread, from DRAM.) A
    shorter row: as many lines PREFETCH_BYTES past the bytes of the row read so far, in memory order, which
    carries them into the next rows (each stream's lines some rows on were 1.05-1.15x slower there for E2B's
    12288x1536 gate/up and the head)."""
    n = ir.Constant(row_bytes.type, len(offsets))
    done = builder.mul(offsets[0], n)  # the row's bytes before this chunk: the first stream's offset, times the streams
    long = builder.icmp_unsigned(">=", row_bytes, ir.Constant(row_bytes.type, PREFETCH_BYTES))
    for line, offset in enumerate(offsets):
        in_order = builder.add(done, ir.Constant(done.type, PREFETCH_BYTES + 64 * line))
        ahead = builder.select(long, builder.add(row_bytes, offset), in_order)
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), builder.gep(row, [ahead]), ir.Constant(_I32, 0),
              ir.Constant(_I32, 3), ir.Constant(_I32, 1))


def _fma(builder, a, b, c):
    """a * b + c, fused, on <16 x float>."""
    return _call(builder, "llvm.fma.v16f32", _V16F, a, b, c)


def _store_sums(builder, totals, pout, rows) -> None:
    """out[t * rows] = the sum of the 16 lanes of token t's total (pout: at the first token's output), and return."""
    for t, total in enumerate(totals):
        v = builder.load(total)
        for width in (8, 4, 2, 1):  # halves added: 4 steps
            pick = lambda offset: ir.Constant(ir.VectorType(_I32, width), list(range(offset, offset + width)))  # noqa: E731
            v = builder.fadd(builder.shuffle_vector(v, v, pick(0)), builder.shuffle_vector(v, v, pick(width)))
        builder.store(builder.extract_element(v, ir.Constant(_I32, 0)), builder.gep(pout, [builder.mul(rows, ir.Constant(rows.type, t))]))
    builder.ret_void()


@intrinsic
def _int6_rows(typingctx, row, xq, xsum, xscale, scales, first, out, r, isa):
    """`_int8_rows` for a row of an int6-g32 table (row [1, 3W/4]: format/tables.py's W/2 bytes of low
    nibbles, then W/4 of high bits) against int8 inputs in their own order (xq [T, W]; xsum: 32 times each
    lane's sum, the zero code; xsum and xscale [T, W/4]); scales [1, W/32]. `_int6_loop` for each count of
    tokens."""
    signature = types.void(row, xq, xsum, xscale, scales, first, out, r, isa)
    return signature, _rows_codegen(next(iter(isa.dtype.fields)), _int6_loop, 1)


def _int6_loop(module, isa, n_planes, n_tokens, index):
    """The LLVM function of `_int6_rows` for `n_tokens` tokens (`n_planes` is 1), of `_loop_function`'s
    arguments. A chunk is 64 bytes of high bits at j and the two 64-byte runs of nibbles at j and W/4 + j
    that complete them: 64 values of each quarter k of the row, columns kW/4 + j on, whose int32 lanes of 4
    columns each lie in one group of 32 (a row's quarters hold whole groups). W/4 is a multiple of 32: when
    it is not one of 64 (Gemma 3's 640 columns), the last chunk is the 64 bytes that end the quarter, its
    first 32 already counted and scaled by zero."""
    fn, builder = _loop_function(module, f"ferrisres_int6_rows_{isa}_{n_tokens}", index)
    if builder is None:
        return fn
    prow, pxq, pxsum, pxscale, pscales, pout, nbytes, groups, rows, x_stride, lanes = fn.args
    const = lambda value: ir.Constant(index, value)  # noqa: E731
    spread = ir.Constant(_V16I, [lane // 8 for lane in range(16)])  # a group's scale to its 8 lanes
    quarter = builder.udiv(nbytes, const(3))
    totals = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in range(n_tokens)]

    def chunk(at, keep=None):
        """The products of the chunk at byte `at` of each run added to the totals; `keep`: lanes' 0/1 factors."""
        starts = [at, builder.add(quarter, at), builder.add(builder.mul(quarter, const(2)), at)]
        _prefetch(builder, prow, nbytes, starts)
        runs = [_vector(builder, prow, start, _V64) for start in starts]
        low, high = runs[:2], runs[2]
        four, two = _splat(_V64, 4), _splat(_V64, 2)
        # quarter k: the low nibbles of run k (k < 2) or the high ones of run k - 2, with bits 2k..2k+1 of `high`
        # moved to bits 4-5
        nibbles = [low[0], low[1], builder.lshr(low[0], four), builder.lshr(low[1], four)]
        moved = [builder.shl(high, four), builder.shl(high, two), high, builder.lshr(high, two)]
        codes = [builder.or_(builder.and_(n, _splat(_V64, 0x0F)), builder.and_(m, _splat(_V64, 0x30)))
                 for n, m in zip(nibbles, moved)]
        columns = [builder.add(builder.mul(quarter, const(k)), at) for k in range(4)]
        lane_scales = []
        for column in columns:
            group_scales = builder.fpext(_vector(builder, pscales, builder.udiv(column, const(TABLE_GROUP)),
                                                 ir.VectorType(ir.HalfType(), 2)), ir.VectorType(_F32, 2))
            spread_scales = builder.shuffle_vector(group_scales, group_scales, spread)
            lane_scales.append(spread_scales if keep is None else builder.fmul(spread_scales, keep))
        for t in range(n_tokens):
            total = builder.load(totals[t])
            for k, column in enumerate(columns):
                x = _vector(builder, pxq, builder.add(builder.mul(x_stride, const(t)), column), _V64)
                lane = builder.add(builder.mul(lanes, const(t)), builder.udiv(column, const(4)))
                acc = _dot_lanes(builder, isa, builder.neg(_vector(builder, pxsum, lane, _V16I)), codes[k], x)
                scale = builder.fmul(lane_scales[k], _vector(builder, pxscale, lane, _V16F))
                total = _fma(builder, builder.sitofp(acc, _V16F), scale, total)
            builder.store(total, totals[t])

    with cgutils.for_range(builder, builder.udiv(quarter, const(INT8_CHUNK))) as loop:
        chunk(builder.mul(loop.index, const(INT8_CHUNK)))
    half = builder.and_(builder.icmp_unsigned("!=", builder.urem(quarter, const(INT8_CHUNK)), const(0)),
                        builder.icmp_unsigned(">=", quarter, const(INT8_CHUNK)))
    with builder.if_then(half):
        chunk(builder.sub(quarter, const(INT8_CHUNK)), ir.Constant(_V16F, [0.0] * 8 + [1.0] * 8))
    _store_sums(builder, totals, pout, rows)
    return fn


@njit(inline="always", **_JIT)
def _int8_tail(row, xq, xsum, xscale, scales, f16, start):
    """`_int8_rows` for the groups of a plane's `row` from byte `start` (a multiple of DEFAULT_GROUP_BYTES)
    on, which fill no whole chunk, in scalar integers."""
    total = np.float32(0)
    for g in range(start // DEFAULT_GROUP_BYTES, len(row) // DEFAULT_GROUP_BYTES):
        s = np.int32(0)
        for j in range(g * DEFAULT_GROUP_BYTES, (g + 1) * DEFAULT_GROUP_BYTES):
            b = _valid_codes(np.int32(row[j]))
            for k in range(4):
                s = np.int32(s + ((b >> (2 * k)) & 3) * np.int32(xq[k * len(row) + j]))
        lanes = 4 * g
        s = np.int32(s - xsum[lanes] - xsum[lanes + 1] - xsum[lanes + 2] - xsum[lanes + 3])
        total += f16[scales[g]] * xscale[lanes] * np.float32(s)
    return total


@njit(parallel=True, **_JIT)
def _ternary_int8(packed, xq, xsum, xscale, scales, f16, isa, tied, out):
    """T tokens through 2-bit grouped ternary (groups of DEFAULT_GROUP) with int8 inputs: out [T, rows].
    xq [T, 4 * nbytes] (deinterleaved), xsum and xscale [T, nbytes / 4] from `_quantized_input`. A row is read
    from memory once per TOKEN_BLOCK tokens. `isa`: an ISA_ARGUMENTS array."""
    rows, planes, nbytes = packed.shape
    tokens = xq.shape[0]
    tail = nbytes - nbytes % INT8_CHUNK
    for r in prange(rows):
        for first in range(0, tokens, TOKEN_BLOCK):
            if tied:
                _tied_rows(packed[r], xq, xsum, xscale, scales[r], first, out, r, isa)
            else:
                _int8_rows(packed[r], xq, xsum, xscale, scales[r], first, out, r, isa)
        if tail < nbytes:
            for p in range(planes):
                for t in range(tokens):
                    out[t, r] += _int8_tail(packed[r, p], xq[t], xsum[t], xscale[t], scales[r, p], f16, tail)


@njit(parallel=True, **_JIT)
def _int6_table(packed, xq, xsum, xscale, scales, f16, isa, out):
    """T tokens through an int6-g32 table's packed rows (the tied head) with int8 inputs: out [T, rows].
    packed [rows, 1, 3W/4], scales [rows, 1, W/32]; xq [T, W] in the inputs' own order, xsum and xscale
    [T, W/4] from `_quantized_input`. A row is read from memory once per TOKEN_BLOCK tokens; rows of fewer
    than 256 values, too short for a chunk, value by value."""
    rows = packed.shape[0]
    tokens = xq.shape[0]
    short = packed.shape[2] // 3 < INT8_CHUNK
    for r in prange(rows):
        if short:
            for t in range(tokens):
                out[t, r] = _int6_row(packed[r, 0], xq[t], xscale[t], scales[r, 0], f16)
        else:
            for first in range(0, tokens, TOKEN_BLOCK):
                _int6_rows(packed[r], xq, xsum, xscale, scales[r], first, out, r, isa)


@njit(inline="always", **_JIT)
def _int6_row(row, xq, xscale, scales, f16):
    """`_int6_rows` for one token, value by value."""
    quarter = len(row) // 3
    total = np.float32(0)
    for j in range(quarter):
        high = np.int32(row[2 * quarter + j])
        for k in range(4):
            column = k * quarter + j
            low = np.int32(row[j + (k & 1) * quarter]) >> (4 * (k >> 1))
            code = (low & 15) | (((high >> (2 * k)) & 3) << 4)
            value = np.int32(code - INT6_ZERO) * np.int32(xq[column])
            total += f16[scales[column // TABLE_GROUP]] * xscale[column // 4] * np.float32(value)
    return total


@njit(inline="always", **_JIT)
def _quantized_input(x, group, zero, interleaved, xq, xsum, xscale):
    """x [T, width] float32 -> each group of `group` inputs as int8, rint(x / s) with s = absmax / 127, into
    xq [T, width]: in their own order, or deinterleaved (`interleaved`: x[4j + k] -> [k * width / 4 + j], the
    input of code k of 2-bit byte j). Per int32 lane of the kernels (4 bytes of xq: 4 inputs, 16 when
    deinterleaved), `zero` times its inputs' sum (xsum: a lane's sum starts from minus it, which takes off
    the codes' zero) and its group's s (xscale). A group holding NaN or infinity gets s NaN: its products
    are NaN, as in float32."""
    tokens, width = x.shape
    quarter = width // 4
    lane_shift = 4 if interleaved else 2  # inputs per lane: 16 or 4
    for t in range(tokens):
        for g in range(width // group):
            start = g * group
            amax, finite = np.float32(0), True
            for i in range(start, start + group):
                amax = max(amax, abs(x[t, i]))
                finite &= abs(x[t, i]) < np.inf  # false for NaN too, which max() would skip
            s = amax / np.float32(127) if amax > 0 else np.float32(1)
            finite &= s < np.inf
            for lane in range(start >> lane_shift, (start + group) >> lane_shift):
                xsum[t, lane] = 0
                xscale[t, lane] = s if finite else np.float32(np.nan)
            for i in range(start, start + group):
                q = np.int32(np.rint(min(max(x[t, i] / s, np.float32(-127)), np.float32(127)))) if finite else 0
                xq[t, (i & 3) * quarter + (i >> 2) if interleaved else i] = q
                xsum[t, i >> lane_shift] += zero * q


# `_quantized_input` for each kernel, its arguments literal once inlined: LLVM then divides by constants
# (with them variable, quantizing 1-16 tokens measured 1.5-2.2x slower)
@njit(**_JIT)
def _ternary_input(x, xq, xsum, xscale):
    _quantized_input(x, DEFAULT_GROUP, 1, True, xq, xsum, xscale)


@njit(**_JIT)
def _table_input(x, xq, xsum, xscale):
    _quantized_input(x, TABLE_GROUP, INT6_ZERO, False, xq, xsum, xscale)


def _int8_inputs(x: np.ndarray, quantized_input, lane_inputs: int):
    """(xq, xsum, xscale) of x [T, width] for a kernel: `_ternary_input` (16 inputs a lane) or `_table_input` (4).
    q/k/v (and gate/up) are called with the same rotated input (`kernels.rotated_input`): the last one
    quantized is kept, so it is quantized once for all of them."""
    last = getattr(_this_thread, "int8_input", None)
    if last is not None and last[0] is x and last[1] is quantized_input:
        return last[2]
    lanes = x.shape[1] // lane_inputs
    xq = np.empty(x.shape, dtype=np.int8)
    xsum, xscale = np.empty((len(x), lanes), dtype=np.int32), np.empty((len(x), lanes), dtype=np.float32)
    quantized_input(x, xq, xsum, xscale)
    _this_thread.int8_input = (x, quantized_input, (xq, xsum, xscale))  # holds x: its id cannot be reused meanwhile
    return xq, xsum, xscale


class FastMatmul:
    """The fused product of one `kernels.Linear`: call with x [T, in] float32 (already rotated), get
    [T, out] float32 without the per-row scale, as `Linear._chunked_matmul` returns it."""

    def __init__(self, linear: kernels.Linear, int8_isa: str | None = None):
        if linear.encoding not in FAST_ENCODINGS:
            raise ValueError(f"no fast kernel for encoding {linear.encoding!r}")
        self.encoding, self.in_features = linear.encoding, linear.in_features
        self.width, self.positions = linear.width, linear.positions
        data = np.ascontiguousarray(linear.data)  # (a mapped tensor already is) the int8 kernel reads it by pointer
        self.data = data.view(np.uint16) if linear.encoding in ("bf16", "f16") else data
        self.scales, self.group_bytes = None, 0
        if linear.group_scale is not None:  # [out, planes, groups]: grouped ternary, or int8 codes with group scales
            self.scales = np.ascontiguousarray(linear.group_scale).view(np.uint16)  # the int8 kernel reads it by pointer
            self.group_bytes = linear.data.shape[-1] // self.scales.shape[-1]  # bytes (int8 codes: columns) per group
        # int8 inputs: 2-bit grouped ternary in groups of DEFAULT_GROUP, and an int6 table's packed rows (other
        # encodings keep float32 inputs)
        int8_encoding = (linear.encoding in GROUPED_TERNARY and linear.encoding not in BASE3_TERNARY
                         and self.group_bytes == DEFAULT_GROUP_BYTES) or linear.encoding in INT8_TABLES
        self.int8_isa = int8_isa if int8_encoding else None
        self.tied = self.int8_isa is not None and linear.tied
        if linear.encoding in INT8_TABLES and self.int8_isa is None:
            raise ValueError(f"packed {linear.encoding} rows take the int8 kernel only: keep_int8() them first")
        # the int8 kernel takes any number of tokens, INT8_TOKENS a call (__call__)
        self.max_tokens = sys.maxsize if self.int8_isa is not None else MAX_TOKENS[linear.encoding]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        _use_threads(kernels.threads() if self.data.nbytes >= PARALLEL_BYTES else 1)
        if self.int8_isa is not None and len(x) > INT8_TOKENS:  # a prompt: blocks whose int8 inputs stay in L1/L2
            return np.concatenate([self._rows(self.data, self.scales, x[i : i + INT8_TOKENS])
                                   for i in range(0, len(x), INT8_TOKENS)])
        return self._rows(self.data, self.scales, x)

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) this Linear's kernels for its arrays' types, on one row:
        for one token and, when it takes them, for several."""
        _use_threads(1)  # one row: other threads would only be woken (on a loaded machine, at great cost)
        for tokens in range(1, min(self.max_tokens, 2) + 1):
            self._rows(self.data[:1], None if self.scales is None else self.scales[:1],
                       np.zeros((tokens, self.in_features), np.float32))

    def _rows(self, data: np.ndarray, scales: np.ndarray | None, x: np.ndarray) -> np.ndarray:
        # rows padded to whole bytes (or groups), and base-3 bytes' unused slots, hold zero weights there
        x = kernels.decoded_input(np.ascontiguousarray(x, dtype=np.float32), self.width, self.positions)
        out = np.empty((len(x), len(data)), dtype=np.float32)
        if self.encoding in INT8_TABLES:
            _int6_table(data, *_int8_inputs(x, _table_input, 4), scales, _F16, ISA_ARGUMENTS[self.int8_isa], out)
        elif self.int8_isa is not None:
            _ternary_int8(data, *_int8_inputs(x, _ternary_input, 16), scales, _F16, ISA_ARGUMENTS[self.int8_isa],
                          self.tied, out)
        elif self.encoding == "int8" and scales is not None:
            _int8_groups(data, x, scales, self.group_bytes, _F16, out)
        elif self.encoding == "int8":
            _int8(data, x, out)
        elif self.encoding == "bf16":
            _bf16(data, x, out)
        elif self.encoding == "f16":
            _f16(data, x, _F16, out)
        elif self.encoding == "ternary":  # numpy's sgemm takes several tokens (MAX_TOKENS): one at a time here
            for t, xt in enumerate(_deinterleaved(x, 4)):
                _ternary_rows(data, xt, out[t])
        elif self.encoding in BASE3_TERNARY and len(x) == 1:
            _ternary5(data, _deinterleaved(x, kernels.BASE3_SLOTS, 5)[0], scales, self.group_bytes, _F16, out[0])
        elif self.encoding in BASE3_TERNARY:
            _ternary5_tokens(data, _deinterleaved(x, kernels.BASE3_SLOTS, 5), scales, self.group_bytes, _F16, out)
        elif len(x) == 1:
            _ternary(data, _deinterleaved(x, 4)[0], scales, self.group_bytes, _F16, out[0])
        else:
            _ternary_tokens(data, _deinterleaved(x, 4), scales, self.group_bytes, _F16, out)
        return out


def _deinterleaved(x: np.ndarray, per_byte: int, codes: int | None = None) -> np.ndarray:
    """x [T, per_byte * n] as [T, codes, n]: [t, k, j] is the input of code k of byte j (the first `codes`
    of every `per_byte` slots; all of them by default)."""
    return np.ascontiguousarray(x.reshape(len(x), -1, per_byte)[:, :, :codes].transpose(0, 2, 1))


# Smaller weights run on one thread: waking the others costs more than they save (the tiny test models
# decoded 30x slower on two threads of a loaded machine).
PARALLEL_BYTES = 64 << 10
# Up to how many tokens a call beats numpy's decode-a-chunk-then-sgemm, which pays the decoding once for
# all tokens where these kernels pay it per token (bench/kernels.py, docs/kernels.md): at commit 398fa4a,
# 2-bit grouped ternary 1.6x faster at 8 tokens and even at 16, base-3 1.3x at 4 and slower at 8, per-row
# ternary 2.1x at 4.
MAX_TOKENS = {"ternary": 4, **{encoding: 8 for encoding in GROUPED_TERNARY}, **{encoding: 4 for encoding in BASE3_TERNARY},
              "int8": 8, "bf16": 8, "f16": 8}
# The int8 kernel's tokens a call; more (a prompt, a large batch) are taken this many at a time
# (`FastMatmul.__call__`), so that their int8 inputs stay in L1 or L2 while a row's codes are multiplied by them.
# A 256-token prompt through one product on one thread (E2B shapes, best of 5): gate/up 6144x1536 39 ms in
# blocks of 16 against 53 in blocks of 64 and numpy's 71; down 1536x12288, 110 against 126 and 182.
INT8_TOKENS = 16
FAST_ENCODINGS = ("ternary", *GROUPED_TERNARY, "int8", *INT8_TABLES, "bf16", "f16")  # f32 stays with BLAS


def _use_threads(n: int) -> None:
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    if getattr(_this_thread, "numba_threads", None) != n:  # asking numba costs more than a small product
        numba.set_num_threads(n)  # numba keeps the count per calling thread, as _this_thread does
        _this_thread.numba_threads = n


def attach(linears, int8: bool = False) -> float:
    """Give every Linear with a fast kernel its `FastMatmul` (with `int8`, int8 inputs where the encoding
    allows: a ValueError if this CPU cannot), and compile (or load from numba's cache) each kernel for the
    arrays it will see, on one row; returns the seconds this took."""
    start = time.perf_counter()
    isas = int8_isas() if int8 else [None]
    if not isas:
        raise ValueError("the int8 kernel needs an x86-64 CPU with AVX2 and F16C: use --kernel fast")
    isa = isas[0]
    for linear in linears:
        if linear.encoding in FAST_ENCODINGS:
            linear.fast = FastMatmul(linear, isa)
            linear.fast.warm_up()
    return time.perf_counter() - start
