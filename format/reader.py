"""Reader of `.tern` artifacts: check the structure (`validate.py`), memory-map the file once, hand out views.

Tensors are zero-copy numpy views into one read-only memory map, so opening costs milliseconds and
pages are read as they are used. With `check_model` (the default) the known JSON documents are parsed
once, every field the runtime reads has the type and range `documents.py` gives it, and every tensor
agrees with the model config (`schema.py`). What open does not check is the data itself: `verify()`
compares every dataset with its digest.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from .compression import decompress
from .documents import MAX_DOCUMENT, MAX_TEMPLATE, check_document
from .encodings import ENCODINGS
from .errors import ArtifactError
from .model_config import ModelConfig
from .schema import check_tensors
from .spec import META_GROUP, TENSOR_GROUP, digest
from .validate import TensorInfo, one_line, read_structure, stat_regular_file

REQUIRED_DOCUMENTS = ("model_config.json", "tokenizer.json")
JSON_DOCUMENTS = ("model_config.json", "student_config.json", "tokenizer_config.json", "generation_config.json",
                  "provenance.json")  # each, when present, must be a JSON object (documents.py checks their fields)


class Artifact:
    """An open, validated `.tern` file. `tensor(name)` and `document(name)` are views into its memory map;
    `config` is its model config, with which every tensor's name, shape and encoding agrees."""

    config: ModelConfig

    def __init__(self, path: Path, version: tuple[int, int], tensors: dict, documents: dict, buffer: mmap.mmap,
                 fd: int):
        self.path = path
        self.version = version
        self.tensors: dict[str, TensorInfo] = tensors
        self.documents: dict[str, TensorInfo] = documents
        self._buffer = buffer
        self._fd = fd
        self._bytes = np.frombuffer(buffer, dtype=np.uint8)
        self._json: dict[str, dict] = {}  # JSON documents parsed and checked so far

    @classmethod
    def open(cls, path: str | os.PathLike, check_model: bool = True) -> "Artifact":
        """Open and validate. With `check_model` (always, but for tools and tests of the bare container)
        the documents and the model config are parsed and every tensor checked against the config."""
        path = Path(path)
        st = stat_regular_file(path)
        structure = read_structure(path, st)
        artifact = cls(path, structure.version, structure.tensors, structure.documents, *_map(path, st))
        if check_model:
            try:
                artifact._check_documents()
                artifact.config = artifact._model_config()
                check_tensors(path, artifact.tensors, artifact.config)
            except BaseException:
                artifact.close()
                raise
        return artifact

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory. They stay in the kernel's page cache,
        so the next read of them is a cheap minor fault: a pass over a model larger than what it needs
        at once (calibration runs the whole float model per token) then holds only what it is reading."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._buffer.madvise(mmap.MADV_DONTNEED)

    def _check_documents(self) -> None:
        for name in REQUIRED_DOCUMENTS:
            if name not in self.documents:
                raise ArtifactError(f"{self.path}: document {name} is missing")
        for name in JSON_DOCUMENTS:
            self.json(name)
        if "chat_template.jinja" in self.documents:
            self._document_bytes("chat_template.jinja", MAX_TEMPLATE, "a chat template")

    def _model_config(self) -> ModelConfig:
        try:
            return ModelConfig.from_dict(self.json("model_config.json"))
        except ArtifactError as e:
            raise ArtifactError(f"{self.path}: {e}") from None

    def tensor(self, name: str) -> np.ndarray:
        """The stored data of tensor `name` (encoding's dtype, stored shape), read-only and zero-copy."""
        info = self.tensors.get(name)
        if info is None:
            raise ArtifactError(f"{self.path}: tensor {name} is missing")
        return self._view(info)

    def document(self, name: str) -> str:
        """Document `name`'s text (inflated, when it is stored compressed, to at most MAX_DOCUMENT bytes)."""
        try:
            return self._document_bytes(name, MAX_DOCUMENT, "a document").decode("utf-8")
        except UnicodeDecodeError:
            raise ArtifactError(f"{self.path}: document {name} is not valid UTF-8") from None

    def _document_bytes(self, name: str, limit: int, what: str) -> bytes:
        """The bytes of document `name`'s text, refused beyond `limit` (`what` may have that many)."""
        info = self.documents.get(name)
        if info is None:
            raise ArtifactError(f"{self.path}: document {name} is missing")
        stored = self._view(info)
        if info.encoding == "zlib":
            return decompress(stored, limit, f"{self.path}: document {name}", what)
        if info.nbytes > limit:
            raise ArtifactError(f"{self.path}: document {name} has {info.nbytes} bytes, more than {what} may have ({limit})")
        return stored.tobytes()

    def json(self, name: str) -> dict | None:
        """JSON document `name` as an object, its fields checked (`documents.py`); None if there is none.
        Parsed once and kept: for the small documents (the tokenizer's is the tokenizers library's job)."""
        if name not in self._json and name in self.documents:
            try:
                self._json[name] = check_document(name, self.document(name))
            except ArtifactError as e:
                raise ArtifactError(f"{self.path}: {e}") from None
        return self._json.get(name)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of tensor `name` (stored dtype), copied with file reads rather than through the memory
        map: each scattered row of a lookup table would otherwise fault in ~64 KB of pages that stay
        resident, so memory would grow with every distinct token seen."""
        info = self.tensors[name]
        rows = info.stored_shape[0]
        row_bytes = info.nbytes // rows
        out = np.empty((len(ids), *info.stored_shape[1:]), dtype=ENCODINGS[info.encoding])
        buffer = memoryview(out).cast("B")
        for k, row in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
            # the model config bounds every id; this is the last guard against reading another tensor's bytes
            if not 0 <= row < rows:
                raise ArtifactError(f"{self.path}: row {row} of tensor {name}, which has {rows}")
            read = os.preadv(self._fd, [buffer[k * row_bytes : (k + 1) * row_bytes]], info.offset + row * row_bytes)
            if read != row_bytes:
                raise ArtifactError(f"{self.path}: tensor {name} row {row}: the file ends inside it")
        return out

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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self._buffer.close()
        except BufferError:
            pass  # views handed out are still alive; the map is released when they are

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _map(path: Path, before: os.stat_result) -> tuple[mmap.mmap, int]:
    """The whole file, mapped read-only, and a descriptor of it; it must be the very file that was walked."""
    try:
        with open(path, "rb") as f:
            now = os.fstat(f.fileno())
            if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (
                before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns
            ):
                raise ArtifactError(f"{path} changed while it was being opened (replaced or rewritten); open it again")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), os.dup(f.fileno())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot map the file ({one_line(e)})") from None
