"""The quantized encodings of the embedding tables (format 1.1): `int8` rows and `int4-g32` / `int4-g64`.

A table is read a few rows at a time (the tokens of a step) and, when the head is tied, multiplied whole
as the output projection. Both only ever need rows, so every encoding here is row-wise:
- `int8`: one float32 scale per row (the `int8` linear encoding, now also allowed for the tables);
- `int4-gN`: a float16 scale per group of N consecutive values of a row, values q in [-8, 7] packed two
  per byte, `q + 8` in the low nibble for the even column and in the high nibble for the odd one. A
  row is padded with zeros (code 8) to a whole number of groups, so every group is whole on disk.
"""

from __future__ import annotations

import numpy as np

from .encodings import decode_f32

INT4_GROUPS = {"int4-g32": 32, "int4-g64": 64}  # encoding -> values per scale
INT4_ZERO_CODE = 8
SCALE_ENCODINGS = {"int8": "f32", **{e: "f16" for e in INT4_GROUPS}}  # a quantized table's scales: their encoding


def int4_groups(encoding: str, n_in: int) -> int:
    """Scale groups per row of `n_in` values."""
    return -(-n_in // INT4_GROUPS[encoding])


def scale_shape(encoding: str, shape: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scales of a table of logical `shape` stored as `encoding`: per row, or per group of a row."""
    rows, n_in = shape
    return (rows,) if encoding == "int8" else (rows, int4_groups(encoding, n_in))


def int4_stored_columns(encoding: str, n_in: int) -> int:
    """Bytes per packed row: whole groups, two values per byte."""
    return int4_groups(encoding, n_in) * INT4_GROUPS[encoding] // 2


def pack_int4(q: np.ndarray, encoding: str) -> np.ndarray:
    """Pack int values in [-8, 7] of shape [rows, n_in] into uint8 [rows, int4_stored_columns]."""
    rows, n_in = q.shape
    codes = np.full((rows, 2 * int4_stored_columns(encoding, n_in)), INT4_ZERO_CODE, dtype=np.uint8)
    codes[:, :n_in] = q + INT4_ZERO_CODE
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def int4_lut() -> np.ndarray:
    """float32 [256, 2]: the two values (before scaling) a packed byte holds."""
    b = np.arange(256, dtype=np.int16)[:, None]
    return (((b >> np.array([0, 4], dtype=np.int16)) & 15) - INT4_ZERO_CODE).astype(np.float32)


def unpack_int4(packed: np.ndarray, scale: np.ndarray, encoding: str) -> np.ndarray:
    """float32 [rows, whole groups * N] of packed rows with their float16 group scales [rows, groups]
    (padding included: the caller cuts it off, or multiplies it by zero inputs)."""
    rows, group = packed.shape[0], INT4_GROUPS[encoding]
    values = int4_lut()[packed].reshape(rows, -1, group)
    values *= scale.astype(np.float32)[:, :, None]
    return values.reshape(rows, -1)


def decode_table_rows(rows: np.ndarray, encoding: str, scale: np.ndarray | None, n_in: int) -> np.ndarray:
    """float32 [len(rows), n_in] of rows read from a table stored as `encoding`, with the rows of its
    scale tensor (None for the float encodings)."""
    if encoding == "int8":
        return rows.astype(np.float32) * scale[:, None]
    if encoding in INT4_GROUPS:
        return unpack_int4(rows, scale, encoding)[:, :n_in]
    return decode_f32(rows, encoding)
