"""How a student's embedding tables are stored (`--tables`, `--per-layer-table`) and their quantizers.

The token embedding and Gemma 4's per-layer embedding table are most of a ternary student's bytes
(E2B: 262144 x 1536 and 262144 x 8960), so they are quantized row-wise (format/tables.py): int8 with a
scale per row, or int6 or int4 with a float16 scale per group of 32 or 64 values. The defaults were
chosen by measurement (QUALITY.md, "Embedding tables").
"""

from __future__ import annotations

import numpy as np

from ferrisres.format.tables import GROUPED_TABLES, pack_table_rows, padded_columns, table_bits, table_group

from .errors import ConversionError
from .quantize import int8_rows

TABLE_CHOICES = ("bf16", "int8", *GROUPED_TABLES)  # from the largest to the smallest
DEFAULT_TABLES = "int6-g32"  # both tables of a ternary student (the token one is also its tied head): QUALITY.md
_F16_MAX = float(np.finfo(np.float16).max)


def quantize_table_rows(block: np.ndarray, encoding: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored rows and their scales of a float32 block of table rows, in a quantized encoding."""
    if encoding == "int8":
        return int8_rows(block)
    return grouped_rows(block, encoding, name)


def grouped_rows(w: np.ndarray, encoding: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 or int6 per group of a row: w ~ scale * q, q in [-m, m] (m = 7 or 31), scale =
    max|group| / m in float16 (the quantization uses the float16 scale as stored, so its rounding adds
    no error of its own)."""
    rows, n_in = w.shape
    group, largest = table_group(encoding), 2 ** (table_bits(encoding) - 1) - 1
    padded = np.zeros((rows, padded_columns(encoding, n_in)), dtype=np.float32)
    padded[:, :n_in] = w
    groups = padded.reshape(rows, -1, group)
    peak = np.max(np.abs(groups), axis=2)
    if np.any(peak / largest > _F16_MAX):
        raise ConversionError(f"{name}: values up to {peak.max():.3g} do not fit {encoding} with float16 scales; "
                              "use --tables int8 or bf16")
    scale = (peak / largest).astype(np.float16)
    safe = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.clip(np.rint(groups / safe[:, :, None]), -largest, largest).astype(np.int8).reshape(rows, -1)
    return pack_table_rows(q[:, :n_in], encoding), scale
