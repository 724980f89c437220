"""Streaming, atomic writer of `.tern` artifacts.

Tensors are added one at a time and written straight to disk, so memory holds one tensor at most.
Everything goes to a temporary file beside the target, renamed over it only when the artifact is
complete: an interrupted or failed write never leaves a file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from .encodings import ENCODINGS
from .errors import ArtifactError
from .spec import ALIGNMENT, DIGEST_ATTR, FORMAT_NAME, FORMAT_VERSION, META_GROUP, TENSOR_GROUP, digest_stream


def partial_name_prefix(path: Path) -> str:
    """Temporary files of an artifact being written are `.<name>.<random>.partial` in its folder."""
    return f".{path.name}."


class ArtifactWriter:
    """Write an artifact: `with ArtifactWriter(path) as w: w.add_document(...); w.add_tensor(...)`."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise ArtifactError(f"{self.path} already exists")
        if not self.path.parent.is_dir():
            raise ArtifactError(f"output folder {self.path.parent} does not exist")
        self._file: h5py.File | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> "ArtifactWriter":
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=partial_name_prefix(self.path), suffix=".partial")
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            # Every allocation starts on a 4096-byte boundary, so each tensor can be viewed straight
            # out of a memory map; track_order keeps datasets listed in the order they were written.
            self._file = h5py.File(
                self._tmp, "w", alignment_threshold=1, alignment_interval=ALIGNMENT, track_order=True
            )
            self._file.attrs["format"] = FORMAT_NAME
            self._file.attrs["format_version"] = "%d.%d" % FORMAT_VERSION
            self._meta = self._file.create_group(META_GROUP, track_order=True)
            self._tensors = self._file.create_group(TENSOR_GROUP, track_order=True)
        except BaseException:
            self._discard()
            raise
        return self

    def add_document(self, name: str, content: str | dict | list) -> None:
        """Store a UTF-8 text document (a dict or list is stored as canonical JSON)."""
        if not isinstance(content, str):
            content = json.dumps(content, sort_keys=True, ensure_ascii=False)
        data = np.frombuffer(content.encode("utf-8"), dtype=np.uint8)
        self._create(self._meta, name, [data], data.shape, data.dtype, {"encoding": "bytes"})

    def add_tensor(self, name: str, data: np.ndarray, encoding: str, shape: tuple[int, ...] | None = None) -> None:
        """Store one tensor. `shape` is its logical shape when that differs from the stored one (ternary)."""
        self.add_tensor_rows(name, [data], data.shape, encoding, shape)

    def add_tensor_rows(
        self, name: str, blocks, stored_shape: tuple[int, ...], encoding: str, shape: tuple[int, ...] | None = None
    ) -> None:
        """Store a tensor given as consecutive blocks of rows, so a huge one never has to be in memory whole."""
        expected = ENCODINGS[encoding]
        logical = tuple(stored_shape) if shape is None else tuple(shape)
        attrs = {"encoding": encoding, "shape": np.asarray(logical, dtype=np.int64)}
        self._create(self._tensors, name, blocks, tuple(stored_shape), expected, attrs)

    def _create(self, group: h5py.Group, name: str, blocks, shape: tuple[int, ...], dtype: np.dtype, attrs: dict):
        if name in group:
            raise ArtifactError(f"{group.name}/{name} written twice")
        if not all(shape):
            raise ArtifactError(f"{group.name}/{name} is empty")
        ds = group.create_dataset(name, shape=shape, dtype=dtype)
        hasher = digest_stream()
        row = 0
        for block in blocks:
            if block.dtype != dtype or block.shape[1:] != shape[1:]:
                raise ArtifactError(f"{group.name}/{name}: block {block.dtype}{list(block.shape)} does not fit {dtype}{list(shape)}")
            block = np.ascontiguousarray(block)
            ds[row : row + len(block)] = block
            hasher.update(memoryview(block).cast("B"))
            row += len(block)
        if row != shape[0]:
            raise ArtifactError(f"{group.name}/{name}: {row} rows written of {shape[0]}")
        for k, v in attrs.items():
            ds.attrs[k] = v
        ds.attrs[DIGEST_ATTR] = hasher.hexdigest()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._file.close()
            self._file = None
            with open(self._tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(self._tmp, 0o644 & ~_umask())
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass  # the file is being thrown away; its close error would only hide the real one
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

