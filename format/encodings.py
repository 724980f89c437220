"""How numbers are stored in a `.tern` artifact: the tensor encodings and their (un)packing.

Every tensor dataset carries an `encoding` attribute naming one of `ENCODINGS`; the value is the
numpy dtype of the bytes on disk. numpy has no bfloat16, so bf16 tensors are stored as their raw
uint16 bit patterns. Ternary weights are packed 4 to a byte (see `pack_ternary`); ternary and int8
weights have a float32 companion dataset `<name>.weight_scale` (per row, or `[1]` per tensor).

Grouped ternary weights (`ternary-g1`, `ternary-g2`, `ternary-g3`) hold one to three planes of ternary codes per row,
W = sum_p scale_p * T_p, with a float16 scale per plane and per group of columns, and optionally
multiply an input rotated by a block Hadamard matrix (`hadamard`, attribute `rotation`). Their base-3
forms (`ternary5-g1`, `ternary5-g2`, format 1.2; `ternary5-g3`, 1.3) pack 5 codes per byte instead of 4
(`pack_base3`). Three planes (format 1.3) are for the linears a student gives one plane more than the rest.
"""

from __future__ import annotations

import functools

import numpy as np

ENCODINGS: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
    "ternary": np.dtype("u1"),
    "ternary-g1": np.dtype("u1"),
    "ternary-g2": np.dtype("u1"),
    "ternary-g3": np.dtype("u1"),
    "ternary5-g1": np.dtype("u1"),
    "ternary5-g2": np.dtype("u1"),
    "ternary5-g3": np.dtype("u1"),
    "int4-g32": np.dtype("u1"),  # embedding tables only (tables.py)
    "int4-g64": np.dtype("u1"),
    "int6-g32": np.dtype("u1"),
    "i64": np.dtype("<i8"),
    "bytes": np.dtype("u1"),
    "zlib": np.dtype("u1"),  # documents only (compression.py)
}
DOCUMENT_ENCODINGS = ("bytes", "zlib")  # a document's text as is, or compressed (format 1.2)

# 2-bit ternary codes: value + 1, so -1 -> 0b00, 0 -> 0b01, +1 -> 0b10. 0b11 is invalid.
BASE3_TERNARY = {"ternary5-g1": 1, "ternary5-g2": 2, "ternary5-g3": 3}  # grouped ternary packed 5 codes per byte
GROUPED_TERNARY = {"ternary-g1": 1, "ternary-g2": 2, "ternary-g3": 3, **BASE3_TERNARY}  # encoding -> planes of codes per row


def tied_planes(scales: np.ndarray) -> bool:
    """Whether grouped ternary scales [out, planes, groups] (float16 or their bit patterns) are tied: every
    plane's 3 times the next one's. A group's levels are then the uniform grid of 3^planes steps of the last
    plane's scale, and the codes of a column one number (runtime/fast_kernels.py multiplies it once)."""
    with np.errstate(invalid="ignore"):  # a damaged scale may be a signaling NaN: not tied, and no warning
        s = np.asarray(scales).view(np.float16).astype(np.float32)  # x 3 is exact in float32
        return s.shape[1] > 1 and bool(np.all(s[:, :-1] == 3 * s[:, 1:]))


# Base-3 codes: a byte holds 5 codes as the base-3 number sum_k (t_k + 1) 3^k (3^5 = 243 <= 256). A row is
# cut into blocks of 64 codes, each packed into 13 bytes (65 slots, the last one a zero), so that every
# group of a multiple of 64 columns starts on a byte. Bytes 243-255 are never written and read as 5 zeros.
BASE3_BLOCK = 64  # codes per block
BASE3_BLOCK_BYTES = 13  # ceil(64 / 5)
_POWERS_OF_3 = 3 ** np.arange(5)


def packed_columns(n_in: int) -> int:
    """Bytes per packed ternary row of `n_in` weights."""
    return (n_in + 3) // 4


def pack_ternary(t: np.ndarray) -> np.ndarray:
    """Pack int values in {-1, 0, +1} of shape [out, in] into uint8 [out, ceil(in/4)].

    Byte j of row r holds columns 4j..4j+3, the lowest bits first; a short last byte is padded with zeros
    (code 0b01).
    """
    out_dim, in_dim = t.shape
    codes = np.full((out_dim, 4 * packed_columns(in_dim)), 1, dtype=np.uint8)
    codes[:, :in_dim] = t + 1
    codes = codes.reshape(out_dim, -1, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def ternary_lut() -> np.ndarray:
    """float32 [256, 4]: the four weights a packed byte holds (an invalid code 0b11 reads as 0)."""
    b = np.arange(256, dtype=np.uint8)[:, None]
    codes = (b >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    return np.where(codes == 3, 0, codes.astype(np.float32) - 1).astype(np.float32)


def unpack_ternary(packed: np.ndarray, n_in: int) -> np.ndarray:
    """float32 [out, n_in] from a packed [out, ceil(n_in/4)] array (whole matrix; for tests and tools)."""
    return ternary_lut()[packed].reshape(packed.shape[0], -1)[:, :n_in]


def base3_columns(n_in: int) -> int:
    """Bytes per base-3 packed row of `n_in` codes: whole blocks of 13 bytes, then ceil(rest / 5)."""
    return n_in // BASE3_BLOCK * BASE3_BLOCK_BYTES + -(-(n_in % BASE3_BLOCK) // 5)


def base3_fits(n_in: int, groups: int) -> bool:
    """Whether `groups` scale groups of a row of `n_in` codes start on base-3 bytes: one group per row, or
    groups of whole blocks of 64 codes."""
    return groups == 1 or n_in % groups == 0 and n_in // groups % BASE3_BLOCK == 0


def base3_slots(n_in: int) -> np.ndarray:
    """int64 [n_in]: the slot (5 per byte: code k of byte j is slot 5j + k) that holds each column's code."""
    columns = np.arange(n_in)
    return columns + columns // BASE3_BLOCK  # each block of 64 columns is followed by one unused slot


def pack_base3(t: np.ndarray) -> np.ndarray:
    """Pack int values in {-1, 0, +1} of shape [out, in] into uint8 [out, base3_columns(in)]."""
    out_dim, in_dim = t.shape
    digits = np.full((out_dim, 5 * base3_columns(in_dim)), 1, dtype=np.uint8)  # unused slots: zeros (digit 1)
    digits[:, base3_slots(in_dim)] = t + 1
    return (digits.reshape(out_dim, -1, 5) @ _POWERS_OF_3.astype(np.uint8)).astype(np.uint8)


def base3_lut() -> np.ndarray:
    """float32 [256, 5]: the five codes a base-3 byte holds, slot 5j + k in column k (bytes >= 243 read as 0)."""
    b = np.arange(256)[:, None]
    return np.where(b < 243, b // _POWERS_OF_3 % 3 - 1, 0).astype(np.float32)


def unpack_base3(packed: np.ndarray, n_in: int) -> np.ndarray:
    """float32 [out, n_in] from a base-3 packed [out, base3_columns(n_in)] array (for tests and tools)."""
    return base3_lut()[packed].reshape(packed.shape[0], -1)[:, base3_slots(n_in)]


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns (uint16), nearest-even, as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_to_f32(u: np.ndarray) -> np.ndarray:
    """Exact widening of bfloat16 bit patterns (uint16) to float32."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def decode_f32(data: np.ndarray, encoding: str) -> np.ndarray:
    """A float32 copy of a float tensor stored as f32, f16 or bf16."""
    if encoding == "bf16":
        return bf16_to_f32(data)
    if encoding in ("f32", "f16"):
        return np.asarray(data, dtype=np.float32)
    raise ValueError(f"encoding {encoding!r} is not a plain float encoding")


@functools.cache
def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two), float64. It is symmetric
    and its own inverse, so rotating an input by it and the weight's columns by it cancel exactly."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {n}")
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    h = h / np.sqrt(n)
    h.flags.writeable = False  # one shared copy per order
    return h


def rotate_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x [..., n] with each run of `block` consecutive entries of the last axis multiplied by
    `hadamard(block)` (n a multiple of block)."""
    shape = x.shape
    return (x.reshape(*shape[:-1], shape[-1] // block, block) @ np.asarray(hadamard(block), dtype=x.dtype)).reshape(shape)
