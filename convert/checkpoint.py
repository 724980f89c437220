"""Read a Hugging Face checkpoint folder's safetensors files, one tensor at a time.

The safetensors format is parsed directly (8-byte header length, JSON header, raw little-endian
data); a tensor, or a block of its rows, is read only when asked for, so memory holds one block at
a time. The `safetensors` package cannot hand numpy a bfloat16 tensor, and Gemma ships
bf16, hence this small reader.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferrisres.format import bf16_to_f32

from .errors import ConversionError
from .source_files import read_source, source_file

SOURCE_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_MAX_HEADER = 100_000_000  # the limit the safetensors reference implementation enforces


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class Checkpoint:
    """All tensors of a (single-file or sharded) safetensors checkpoint, by name."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = _safetensors_files(folder)
        self.tensors: dict[str, SourceTensor] = {}
        for file in self.files:
            for t in _read_header(file):
                if t.name in self.tensors:
                    raise ConversionError(f"tensor {t.name} appears in both {self.tensors[t.name].file.name} and {file.name}")
                self.tensors[t.name] = t
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def check(self, name: str, shape: tuple[int, ...]) -> SourceTensor:
        """The tensor `name`, which must exist with `shape` and a supported dtype."""
        t = self.tensors.get(name)
        if t is None:
            raise ConversionError(f"tensor {name} is missing from {self.folder}")
        if t.shape != tuple(shape):
            raise ConversionError(f"tensor {name} has shape {list(t.shape)}, the config implies {list(shape)}")
        if t.dtype not in SOURCE_DTYPES:
            raise ConversionError(f"tensor {name} has dtype {t.dtype}; only F32, F16 and BF16 are supported")
        return t

    def read_f32(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name` (or its rows r0:r1) as a float32 array, checked against `shape`.

        Read with plain file reads into a fresh buffer, not through a memory map: mapped pages would stay
        in this process's resident memory, which would then grow to the whole checkpoint's size."""
        t = self.check(name, shape)
        dtype = SOURCE_DTYPES[t.dtype]
        r0, r1 = rows if rows is not None else (0, t.shape[0])
        row_items = math.prod(t.shape[1:])
        raw = np.empty((r1 - r0, *t.shape[1:]), dtype=dtype)
        view = memoryview(raw).cast("B")
        offset = t.begin + r0 * row_items * dtype.itemsize
        done = 0
        while done < len(view):
            n = os.preadv(self._fd(t.file), [view[done:]], offset + done)
            if n == 0:
                raise ConversionError(f"{t.file} is truncated inside tensor {name}")
            done += n
        data = bf16_to_f32(raw) if t.dtype == "BF16" else raw.astype(np.float32)
        if not np.isfinite(data).all():
            where = f" (rows {r0}-{r1})" if rows else ""
            raise ConversionError(f"tensor {name} contains NaN or Inf{where}")
        return data

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if source_file(index):
        try:
            weight_map = json.loads(read_source(index))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ConversionError(f"{index} is not a valid safetensors index") from None
        for name in names:  # a shard is a file of the folder: "../x" or "/etc/x" would read elsewhere
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise ConversionError(f"{index} names {str(name)[:100]!r}, which is not a file name in {folder}")
        files = [folder / n for n in names]
        for f in files:
            if source_file(f) is None:
                raise ConversionError(f"{index} names {f.name}, which is missing")
        return files
    single = folder / "model.safetensors"
    if source_file(single):
        return [single]
    found = sorted(p for p in folder.glob("*.safetensors") if source_file(p))
    if not found:
        raise ConversionError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    return found


def _read_header(file: Path) -> list[SourceTensor]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{file} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ConversionError(f"{file} is not a valid safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise ConversionError(f"{file} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file} has a corrupt safetensors header")
    data_start = 8 + n
    tensors = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (_integer(v) for v in meta["data_offsets"])
            shape = tuple(_integer(v) for v in meta["shape"])
            dtype = meta["dtype"]
            if not isinstance(dtype, str):
                raise TypeError(dtype)
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{file}: corrupt header entry for tensor {name}") from None
        itemsize = SOURCE_DTYPES[dtype].itemsize if dtype in SOURCE_DTYPES else None
        # Python integers: a corrupt header cannot overflow the size computation into a plausible value.
        if not 0 <= begin <= end or data_start + end > size or (
            itemsize is not None and end - begin != itemsize * math.prod(shape)
        ):
            raise ConversionError(f"{file}: tensor {name} lies outside the file (truncated or corrupt)")
        tensors.append(SourceTensor(name, file, dtype, shape, data_start + begin, data_start + end))
    spans = sorted((t.begin, t.end, t.name) for t in tensors if t.end > t.begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ConversionError(f"{file}: tensors {first} and {second} overlap (corrupt header)")
    return tensors


def _integer(value) -> int:
    """A non-negative JSON integer (not a float, string or boolean)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value
