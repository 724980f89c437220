"""The quantized encodings of the embedding tables: `int8` rows (format 1.1), `int4-g32` / `int4-g64`
(1.1) and `int6-g32` (1.4).

A table is read a few rows at a time (the tokens of a step) and, when the head is tied, multiplied whole
as the output projection. Both only ever need rows, so every encoding here is row-wise:
- `int8`: one float32 scale per row (the `int8` linear encoding, now also allowed for the tables);
- the grouped encodings `int4-gN` and `int6-gN`: a float16 scale per group of N consecutive values of a
  row. A row is padded with zeros to whole groups (int6: to a multiple of 128 values, four groups per
  quarter-row block below), so every group is whole on disk.
  - `int4`: values q in [-8, 7] as codes q + 8, two per byte, the even column in the low nibble.
  - `int6`: values q in [-32, 31] as codes c = q + 32. A padded row of W values is W/2 bytes of low
    nibbles (byte j: column j in bits 0-3, column j + W/2 in bits 4-7), then W/4 bytes of high bits
    (byte j: columns j, j + W/4, j + W/2, j + 3W/4 in bits 0-1, 2-3, 4-5, 6-7). Each column's bits sit
    at the same index of a contiguous half or quarter of the row, so numpy decodes a row with a few
    whole-array shifts and masks (a lookup table through np.take costs 4x more per value, measured
    with int4).
"""

from __future__ import annotations

import numpy as np

from .encodings import decode_f32

GROUPED_TABLES = {"int6-g32": (6, 32), "int4-g32": (4, 32), "int4-g64": (4, 64)}  # encoding -> (bits, values per scale)
ZERO_CODE = {4: 8, 6: 32}  # the code of the value 0, by bits
INT6_ROW_MULTIPLE = 128  # an int6 row's quarters hold whole groups of 32
SCALE_ENCODINGS = {"int8": "f32", **{e: "f16" for e in GROUPED_TABLES}}  # a quantized table's scales: their encoding


def table_bits(encoding: str) -> int:
    return GROUPED_TABLES[encoding][0]


def table_group(encoding: str) -> int:
    """Values per scale of a grouped table encoding."""
    return GROUPED_TABLES[encoding][1]


def padded_columns(encoding: str, n_in: int) -> int:
    """Values per stored row: whole groups (int6: a multiple of 128)."""
    multiple = INT6_ROW_MULTIPLE if table_bits(encoding) == 6 else table_group(encoding)
    return -(-n_in // multiple) * multiple


def table_groups(encoding: str, n_in: int) -> int:
    """Scale groups per stored row of `n_in` values."""
    return padded_columns(encoding, n_in) // table_group(encoding)


def scale_shape(encoding: str, shape: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scales of a table of logical `shape` stored as `encoding`: per row, or per group of a row."""
    rows, n_in = shape
    return (rows,) if encoding == "int8" else (rows, table_groups(encoding, n_in))


def stored_columns(encoding: str, n_in: int) -> int:
    """Bytes per packed row."""
    return padded_columns(encoding, n_in) * table_bits(encoding) // 8


def pack_table_rows(q: np.ndarray, encoding: str) -> np.ndarray:
    """Pack int values of shape [rows, n_in] (in [-8, 7] for int4, [-32, 31] for int6) into uint8
    [rows, stored_columns]."""
    rows, n_in = q.shape
    bits = table_bits(encoding)
    codes = np.full((rows, padded_columns(encoding, n_in)), ZERO_CODE[bits], dtype=np.uint8)
    codes[:, :n_in] = q + ZERO_CODE[bits]
    if bits == 4:
        return codes[:, 0::2] | (codes[:, 1::2] << 4)
    low, high = codes & 15, codes >> 4
    halves, quarters = np.split(low, 2, axis=1), np.split(high, 4, axis=1)
    nibbles = halves[0] | (halves[1] << 4)
    crumbs = quarters[0] | (quarters[1] << 2) | (quarters[2] << 4) | (quarters[3] << 6)
    return np.concatenate([nibbles, crumbs], axis=1)


def table_values(packed: np.ndarray, encoding: str) -> np.ndarray:
    """int8 [rows, padded values]: the values q (code minus the zero code) of packed int4 or int6 rows,
    without their scales. Exact: a grouped table's weights are these times their group's scale."""
    bits = table_bits(encoding)
    values = np.empty((len(packed), packed.shape[1] * 8 // bits), dtype=np.int8)
    codes = values.view(np.uint8)
    # a few thousand rows at a time: the int6 shifts' temporaries stay in cache (E2B's table: 0.43 s)
    for r0 in range(0, len(packed), _DECODE_ROWS):
        rows, out = packed[r0 : r0 + _DECODE_ROWS], codes[r0 : r0 + _DECODE_ROWS]
        if bits == 4:
            np.bitwise_and(rows, 15, out=out[:, 0::2])
            np.right_shift(rows, 4, out=out[:, 1::2])
        else:
            _int6_codes(rows, out)
    np.subtract(codes, ZERO_CODE[bits], out=codes)  # modulo 256: viewed as int8, code - zero code
    return values


_DECODE_ROWS = 4096


def _int6_codes(packed: np.ndarray, codes: np.ndarray) -> None:
    """The int6 codes of packed rows [rows, 3W/4] into uint8 `codes` [rows, W]."""
    width = codes.shape[1]
    half = width // 2
    low, high = packed[:, :half], packed[:, half:]
    np.bitwise_and(low, 15, out=codes[:, :half])
    np.right_shift(low, 4, out=codes[:, half:])
    for k, part in enumerate(np.split(codes, 4, axis=1)):  # the high bits of quarter k, moved to bits 4-5
        shifted = np.left_shift(high, 4 - 2 * k) if k < 2 else np.right_shift(high, 2 * k - 4)
        np.bitwise_or(part, np.bitwise_and(shifted, 48, out=shifted), out=part)


def unpack_table_rows(packed: np.ndarray, scale: np.ndarray, encoding: str) -> np.ndarray:
    """float32 [rows, padded values] of packed rows with their float16 group scales [rows, groups]
    (padding included: the caller cuts it off, or multiplies it by zero inputs)."""
    rows, group = packed.shape[0], table_group(encoding)
    values = table_values(packed, encoding).astype(np.float32).reshape(rows, -1, group)
    values *= scale.astype(np.float32)[:, :, None]
    return values.reshape(rows, -1)


def decode_table_rows(rows: np.ndarray, encoding: str, scale: np.ndarray | None, n_in: int) -> np.ndarray:
    """float32 [len(rows), n_in] of rows read from a table stored as `encoding`, with the rows of its
    scale tensor (None for the float encodings)."""
    if encoding == "int8":
        return rows.astype(np.float32) * scale[:, None]
    if encoding in GROUPED_TABLES:
        return unpack_table_rows(rows, scale, encoding)[:, :n_in]
    return decode_f32(rows, encoding)
