"""Reader of `.tern` artifacts: validate the structure, memory-map the file once, hand out views.

h5py is used only to walk the HDF5 structure at open time. Tensors are then zero-copy numpy views
into one read-only memory map, so opening costs milliseconds and pages are read as they are used.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .encodings import ENCODINGS, packed_columns
from .errors import ArtifactError
from .model_config import ModelConfig
from .schema import check_tensors
from .spec import DIGEST_ATTR, FORMAT_NAME, FORMAT_VERSION, META_GROUP, TENSOR_GROUP, digest

_MIN_ALIGNMENT = 64  # what a reader demands; the writer uses ALIGNMENT


@dataclass(frozen=True)
class TensorInfo:
    name: str
    encoding: str
    shape: tuple[int, ...]  # logical shape
    stored_shape: tuple[int, ...]
    offset: int
    nbytes: int
    digest: str


def stored_shape_of(encoding: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dataset shape an encoding uses for a tensor of logical `shape`."""
    if encoding == "ternary":
        return (*shape[:-1], packed_columns(shape[-1]))
    return shape


class Artifact:
    """An open, validated `.tern` file. `tensor(name)` and `document(name)` are views into its memory map;
    `config` is its model config, with which every tensor's name, shape and encoding agrees."""

    config: ModelConfig

    def __init__(self, path: Path, version: tuple[int, int], tensors: dict, documents: dict, buffer: mmap.mmap):
        self.path = path
        self.version = version
        self.tensors: dict[str, TensorInfo] = tensors
        self.documents: dict[str, TensorInfo] = documents
        self._buffer = buffer
        self._bytes = np.frombuffer(buffer, dtype=np.uint8)

    @classmethod
    def open(cls, path: str | os.PathLike, check_model: bool = True) -> "Artifact":
        """Open and validate. With `check_model` (always, but for tools and tests of the bare container)
        the model config is parsed and every tensor checked against it."""
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: no such file") from None
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path} is not a regular file")
        if not os.access(path, os.R_OK):
            raise ArtifactError(f"{path}: permission denied")
        try:
            with h5py.File(path, "r") as f:
                version = _check_header(path, f)
                documents = _walk_group(path, f, META_GROUP, st.st_size, tensors=False)
                tensors = _walk_group(path, f, TENSOR_GROUP, st.st_size, tensors=True)
        except ArtifactError:
            raise
        except OSError:
            raise ArtifactError(f"{path} is not a .tern artifact, or is damaged (HDF5 cannot read it)") from None
        except Exception as e:  # h5py raises many types on damaged files; all mean the same to a user
            raise ArtifactError(f"{path}: damaged artifact structure ({type(e).__name__}: {e})") from None
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        artifact = cls(path, version, tensors, documents, buffer)
        if check_model:
            try:
                artifact.config = artifact._model_config()
                check_tensors(path, tensors, artifact.config)
            except BaseException:
                artifact.close()
                raise
        return artifact

    def _model_config(self) -> ModelConfig:
        text = self.document("model_config.json")
        try:
            return ModelConfig.from_json(text)
        except ArtifactError as e:
            raise ArtifactError(f"{self.path}: {e}") from None

    def tensor(self, name: str) -> np.ndarray:
        """The stored data of tensor `name` (encoding's dtype, stored shape), read-only and zero-copy."""
        info = self.tensors.get(name)
        if info is None:
            raise ArtifactError(f"{self.path}: tensor {name} is missing")
        return self._view(info)

    def document(self, name: str) -> str:
        info = self.documents.get(name)
        if info is None:
            raise ArtifactError(f"{self.path}: document {name} is missing")
        try:
            return self._view(info).tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ArtifactError(f"{self.path}: document {name} is not valid UTF-8") from None

    def _view(self, info: TensorInfo) -> np.ndarray:
        raw = self._bytes[info.offset : info.offset + info.nbytes]
        return raw.view(ENCODINGS[info.encoding]).reshape(info.stored_shape)

    def verify(self) -> list[str]:
        """Recompute every dataset's digest; returns the names (`meta/x`, `tensors/y`) that do not match."""
        bad = []
        for group, items in ((META_GROUP, self.documents), (TENSOR_GROUP, self.tensors)):
            for info in items.values():
                raw = self._bytes[info.offset : info.offset + info.nbytes]
                if digest(raw) != info.digest:
                    bad.append(f"{group}/{info.name}")
        return bad

    def close(self) -> None:
        self._bytes = None
        try:
            self._buffer.close()
        except BufferError:
            pass  # views handed out are still alive; the map is released when they are

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_header(path: Path, f: h5py.File) -> tuple[int, int]:
    name = f.attrs.get("format")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if name != FORMAT_NAME:
        what = "it has no format attribute" if name is None else f"its format is {name!r}"
        raise ArtifactError(f"{path} is not a .tern artifact ({what})")
    text = _str_attr(f.attrs, "format_version", f"{path}: the root group")
    try:
        major, minor = (int(p) for p in text.split("."))
    except ValueError:
        raise ArtifactError(f"{path}: malformed format_version {text!r}") from None
    if major > FORMAT_VERSION[0]:
        raise ArtifactError(
            f"{path} uses .tern format {major}.{minor}, newer than this ferrisres reads "
            f"({FORMAT_VERSION[0]}.x): upgrade ferrisres"
        )
    if major < 1:
        raise ArtifactError(f"{path}: unsupported .tern format version {text}")
    return major, minor


def _walk_group(path: Path, f: h5py.File, group: str, file_size: int, *, tensors: bool) -> dict[str, TensorInfo]:
    g = f.get(group)
    if not isinstance(g, h5py.Group):
        raise ArtifactError(f"{path}: group /{group} is missing")
    out = {}
    for name, ds in g.items():
        where = f"{path}: dataset /{group}/{name}"
        if not isinstance(ds, h5py.Dataset):
            raise ArtifactError(f"{where} is not a dataset")
        encoding = _str_attr(ds.attrs, "encoding", where) if tensors else "bytes"
        if encoding not in ENCODINGS:
            raise ArtifactError(f"{where} has unknown encoding {encoding!r}")
        if ds.dtype != ENCODINGS[encoding]:
            raise ArtifactError(f"{where} has dtype {ds.dtype}, encoding {encoding} needs {ENCODINGS[encoding]}")
        stored = tuple(int(n) for n in ds.shape)
        if tensors:
            shape = tuple(int(n) for n in np.asarray(ds.attrs.get("shape", ()), dtype=np.int64).reshape(-1))
            if stored_shape_of(encoding, shape) != stored:
                raise ArtifactError(f"{where} is stored as {stored}, which does not hold logical shape {shape}")
        else:
            shape = stored
        if ds.chunks is not None or ds.id.get_create_plist().get_nfilters():
            raise ArtifactError(f"{where} is chunked or filtered; the format needs contiguous raw data")
        offset = ds.id.get_offset()
        nbytes = int(np.prod(stored, dtype=np.int64)) * ds.dtype.itemsize
        if offset is None or nbytes == 0:
            raise ArtifactError(f"{where} has no data")
        if offset % _MIN_ALIGNMENT or offset + nbytes > file_size:
            raise ArtifactError(f"{where} lies outside the file or is misaligned (offset {offset}, {nbytes} bytes)")
        out[name] = TensorInfo(name, encoding, shape, stored, offset, nbytes, _str_attr(ds.attrs, DIGEST_ATTR, where))
    return out


def _str_attr(attrs, key: str, where: str) -> str:
    value = attrs.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise ArtifactError(f"{where} lacks the text attribute {key!r}")
    return value

