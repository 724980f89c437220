"""Walk a GGUF file's header and check every count and length against the file before the gguf package
parses it.

The gguf package trusts the header: a 1 KB file declaring 10^12 metadata entries, a 10^15-byte string
or an array of 10^12 strings makes it allocate and loop without bound (in numpy, where SIGTERM waits).
Here every count is checked against the bytes left before it is used, with Python integers, so the
walk itself costs at most one step per real entry and the package is handed only a consistent header.
Layout (GGUF v2/v3, little-endian): magic, version u32, tensor count u64, metadata count u64; each
metadata entry: key (u64 length + bytes), value type u32, value; each tensor: name, dimension count
u32, dimensions u64 each, type u32, data offset u64.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from .errors import ConversionError

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by GGUF value type
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


def check_gguf_header(path: Path) -> None:
    """Raise ConversionError naming `path` and the entry whose count or length the file cannot hold."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _Walk(path, data).header()
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise ConversionError(f"{path} cannot be read as a GGUF file ({e})") from None


class _Walk:
    def __init__(self, path: Path, data: mmap.mmap):
        self.path, self.data, self.at = path, data, 0

    def fail(self, what: str) -> ConversionError:
        return ConversionError(f"{self.path} is not a valid GGUF file: {what} (at byte {self.at}, file of "
                               f"{len(self.data)} bytes)")

    def take(self, n: int, what: str) -> int:
        """Skip `n` bytes, which must be in the file; returns where they start."""
        if n > len(self.data) - self.at:
            raise self.fail(f"{what} needs {n} bytes, more than the file holds")
        start, self.at = self.at, self.at + n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.data, self.take(8, what))[0]

    def string(self, what: str) -> None:
        self.take(self.u64(f"the length of {what}"), what)

    def header(self) -> None:
        self.take(4, "the magic")
        version = self.u32("the version")
        if version not in (2, 3):
            raise self.fail(f"version {version} (this reads versions 2 and 3)")
        n_tensors, n_kv = self.u64("the tensor count"), self.u64("the metadata count")
        # every metadata entry takes at least 12 bytes, every tensor entry at least 24: counts beyond that are lies
        if n_kv * 12 + n_tensors * 24 > len(self.data) - self.at:
            raise self.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the file")
        for i in range(n_kv):
            self.string(f"the key of metadata entry {i}")
            self.value(self.u32(f"the type of metadata entry {i}"), f"metadata entry {i}")
        extents = [self.tensor(i) for i in range(n_tensors)]
        data_start = self.at  # at least: the data follows the tensor entries, aligned
        for i, (offset, nbytes) in enumerate(extents):
            if offset + nbytes > len(self.data) - data_start:
                raise self.fail(f"the data of tensor {i} ({nbytes} bytes at offset {offset}) lies outside the file")

    def value(self, kind: int, what: str) -> None:
        if kind in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[kind], what)
        elif kind == _STRING:
            self.string(what)
        elif kind == _ARRAY:
            item = self.u32(f"the item type of {what}")
            count = self.u64(f"the length of {what}")
            if item in _SCALAR_SIZES:
                self.take(count * _SCALAR_SIZES[item], what)
            elif item == _STRING:
                if count * 8 > len(self.data) - self.at:
                    raise self.fail(f"{what} declares {count} strings, more than the file holds")
                for _ in range(count):
                    self.string(f"a string of {what}")
            else:  # arrays of arrays: no GGUF writer makes them, and they would nest without bound
                raise self.fail(f"{what} is an array of type {item}")
        else:
            raise self.fail(f"{what} has unknown value type {kind}")

    def tensor(self, i: int) -> tuple[int, int]:
        """Walk tensor entry `i`; returns its data's offset (from the data section) and size in bytes."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # the `convert` extra, needed for GGUF input only

        self.string(f"the name of tensor {i}")
        n_dims = self.u32(f"the dimension count of tensor {i}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.fail(f"tensor {i} has {n_dims} dimensions")
        dims = [self.u64(f"a dimension of tensor {i}") for _ in range(n_dims)]
        kind = self.u32(f"the type of tensor {i}")
        offset = self.u64(f"the data offset of tensor {i}")
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise self.fail(f"tensor {i} has unknown type {kind}") from None
        nbytes = math.prod(dims) // block * block_bytes
        if min(dims) < 1 or dims[0] % block or nbytes > len(self.data):
            raise self.fail(f"tensor {i} has dimensions {dims} of type {kind}, which the file cannot hold")
        return offset, nbytes
