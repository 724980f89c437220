"""The structure of an untrusted `.tern` file, checked: which datasets it holds and where their bytes are.

An artifact may come from anyone, so nothing it declares is used before it is checked, and every
failure is an `ArtifactError` whose message names the file and the dataset:
- the root holds the groups /meta and /tensors and nothing else; /meta and /tensors hold datasets
  only, reached by hard links (a soft or external link is refused, never followed);
- every dataset is contiguous and unfiltered, stored in this file (external storage and virtual
  datasets are refused: nothing is ever read outside the file), with a simple dataspace, the exact
  little-endian datatype its encoding names, its bytes aligned and inside the file, clear of the
  superblock, of every byte libhdf5 read as metadata during the walk, and of every other dataset;
- attributes are checked for their type and size before they are read (`shape`: a short integer
  array; `encoding` and `blake2b`: text; `blake2b`: 64 hex digits), so memory stays bounded by the
  file whatever a header declares; sizes are computed with Python integers (no overflow).

h5py walks the file in a forked child with bounded memory and time (`isolated.py`: libhdf5 allocates
what a length field declares before checking it), which sends back the checked list of datasets.
The data itself is not read: the reader hands it out, and `Artifact.verify` checks its digests.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import re
import stat
from dataclasses import astuple, dataclass
from pathlib import Path

import h5py
from h5py import h5a, h5d, h5g, h5l, h5o, h5s, h5t
import numpy as np

from .encodings import BASE3_TERNARY, DOCUMENT_ENCODINGS, ENCODINGS, GROUPED_TERNARY, base3_columns, packed_columns
from .errors import ArtifactError
from .isolated import run_isolated
from .spec import DIGEST_ATTR, FORMAT_NAME, FORMAT_VERSION, META_GROUP, TENSOR_GROUP
from .tables import GROUPED_TABLES, stored_columns

WALK_SECONDS = 120.0  # the structure of Gemma 4 E2B (~2,000 datasets) is walked in well under a second
WALK_MEMORY = 512 << 20  # bytes of address space the walk may add (HDF5's caches, the datasets' records)
_MIN_ALIGNMENT = 64  # what a reader demands; the writer uses ALIGNMENT
_SUPERBLOCK_BYTES = 100  # the largest HDF5 superblock with its root entry (version 1, 8-byte addresses)
_MAX_RANK = 8  # dimensions of a dataset or of a `shape` attribute
_MAX_TEXT_ATTR = 4096  # bytes of a fixed-length text attribute
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")  # BLAKE2b-256, hex
_VERSION = re.compile(r"([0-9]+)\.([0-9]+)")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    encoding: str
    shape: tuple[int, ...]  # logical shape
    stored_shape: tuple[int, ...]
    offset: int
    nbytes: int
    digest: str
    rotation: int = 0  # grouped ternary: order of the block Hadamard rotation of the input (0: none)


def stored_shape_of(encoding: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dataset shape an encoding uses for a tensor of logical `shape`."""
    if encoding == "ternary":
        return (*shape[:-1], packed_columns(shape[-1]))
    if encoding in BASE3_TERNARY:
        return (*shape[:-1], BASE3_TERNARY[encoding], base3_columns(shape[-1]))
    if encoding in GROUPED_TERNARY:
        return (*shape[:-1], GROUPED_TERNARY[encoding], packed_columns(shape[-1]))
    if encoding in GROUPED_TABLES:
        return (*shape[:-1], stored_columns(encoding, shape[-1]))
    return shape


@dataclass(frozen=True)
class Structure:
    """What the walk found: the format version, and the documents and tensors by name."""

    version: tuple[int, int]
    documents: dict[str, TensorInfo]
    tensors: dict[str, TensorInfo]


def read_structure(path: Path, st: os.stat_result) -> Structure:
    """The checked structure of the regular file at `path` (`st`: its stat, from `stat_regular_file`)."""
    # HDF5 allocates what a length field in the file declares before checking it (a 4-byte patch to
    # an attribute made it take 2.1 GB): the walk runs in a child with bounded memory and time.
    version, documents, tensors = run_isolated(
        lambda: _walk_structure(path, st.st_size), seconds=WALK_SECONDS, memory=WALK_MEMORY, error=ArtifactError,
        what=f"{path}: reading its HDF5 structure")
    return Structure(tuple(version), _tensor_infos(documents), _tensor_infos(tensors))


def stat_regular_file(path: Path) -> os.stat_result:
    """The file's stat, if it is a regular file this process may read (a FIFO would block on open)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):  # a folder, a FIFO (opening it would block), a device
        raise ArtifactError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ArtifactError(f"{path}: permission denied")
    return st


class _RecordedReads(io.FileIO):
    """The file, read-only, remembering the (offset, size) of every read."""

    def __init__(self, path: Path):
        super().__init__(path, "r")
        self.reads: list[tuple[int, int]] = []

    def readinto(self, buffer) -> int:
        self.reads.append((self.tell(), len(buffer)))
        return super().readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        start = self.tell()
        data = super().read(size)
        self.reads.append((start, len(data)))
        return data


def _walk_structure(path: Path, file_size: int) -> tuple[tuple[int, int], dict, dict]:
    """The format version, documents and tensors of the file, every object checked (see the module's doc)."""
    try:
        # HDF5 reads through a Python file object, so that every byte it reads as metadata is seen
        with _RecordedReads(path) as source, h5py.File(source, "r") as f:
            version = _check_header(path, f)
            walk = _Walk(path, f, file_size)
            documents = walk.group(META_GROUP, tensors=False)
            tensors = walk.group(TENSOR_GROUP, tensors=True)
            walk.check_overlaps(source.reads)
            return version, _records(documents), _records(tensors)  # as JSON, from the child that walked
    except ArtifactError:
        raise
    except OSError:
        raise ArtifactError(f"{path} is not a .tern artifact, or is damaged (HDF5 cannot read it)") from None
    except Exception as e:  # h5py raises many types on damaged files; all mean the same to a user
        raise ArtifactError(f"{path}: damaged artifact structure ({one_line(e)})") from None


def _records(infos: dict[str, TensorInfo]) -> list[list]:
    return [list(astuple(info)) for info in infos.values()]


def _tensor_infos(records: list[list]) -> dict[str, TensorInfo]:
    infos = [TensorInfo(name, encoding, tuple(shape), tuple(stored), offset, nbytes, digest, rotation)
             for name, encoding, shape, stored, offset, nbytes, digest, rotation in records]
    return {info.name: info for info in infos}


def _check_header(path: Path, f: h5py.File) -> tuple[int, int]:
    root = f"{path}: the root group"
    try:
        name = _text_attr(f.id, "format", root, required=False)
    except ArtifactError:
        raise ArtifactError(f"{path} is not a .tern artifact (its format attribute is not text)") from None
    if name != FORMAT_NAME:
        what = "it has no format attribute" if name is None else f"its format is {name[:100]!r}"
        raise ArtifactError(f"{path} is not a .tern artifact ({what})")
    text = _text_attr(f.id, "format_version", root)
    match = _VERSION.fullmatch(text)
    try:
        major, minor = int(match.group(1)), int(match.group(2))
    except (AttributeError, ValueError):  # no match, or more digits than int() parses
        raise ArtifactError(f"{path}: malformed format_version {text[:100]!r} (expected MAJOR.MINOR)") from None
    if major > FORMAT_VERSION[0]:
        raise ArtifactError(
            f"{path} uses .tern format {major}.{minor}, newer than this ferrisres reads "
            f"({FORMAT_VERSION[0]}.x): upgrade ferrisres"
        )
    if major < 1:
        raise ArtifactError(f"{path}: unsupported .tern format version {text}")
    return major, minor


class _Walk:
    """One pass over the file's objects: checks each, remembers where data and object headers lie."""

    def __init__(self, path: Path, f: h5py.File, file_size: int):
        self.path, self.f, self.file_size = path, f, file_size
        self.base = int(f.id.get_create_plist().get_userblock())  # where the superblock is; addresses count from it
        self.spans: list[tuple[int, int, str]] = []  # data: (start, end, dataset)
        self.headers: list[tuple[int, str]] = [(self.base + _header_address(f.id), "the root group")]
        for name in f:
            if name not in (META_GROUP, TENSOR_GROUP):
                raise ArtifactError(f"{path}: unexpected object /{name} (a .tern file holds only /meta and /tensors)")

    def group(self, group: str, *, tensors: bool) -> dict[str, TensorInfo]:
        path = self.path
        gid = _open_hard_link(self.f.id, group, f"{path}: /{group}")
        if gid is None:
            raise ArtifactError(f"{path}: group /{group} is missing")
        if not isinstance(gid, h5g.GroupID):
            raise ArtifactError(f"{path}: /{group} is not a group")
        self.headers.append((self.base + _header_address(gid), f"group /{group}"))
        out = {}
        for name in h5py.Group(gid):
            where = f"{path}: dataset /{group}/{name}"
            try:
                oid = _open_hard_link(gid, name, where)
                if not isinstance(oid, h5d.DatasetID):
                    raise ArtifactError(f"{where} is not a dataset")
                info = self._dataset(oid, name, where, tensors)
                self.headers.append((self.base + _header_address(oid), f"dataset /{group}/{name}"))
            except ArtifactError:
                raise
            except Exception as e:  # HDF5 cannot read this object: say which one
                raise ArtifactError(f"{where} is damaged ({one_line(e)})") from None
            self.spans.append((info.offset, info.offset + info.nbytes, f"/{group}/{name}"))
            out[name] = info
        return out

    def _dataset(self, ds: h5d.DatasetID, name: str, where: str, tensors: bool) -> TensorInfo:
        # Where the data is: in this file, in one contiguous run of raw bytes.
        dcpl = ds.get_create_plist()
        if dcpl.get_external_count():
            raise ArtifactError(f"{where} keeps its data in external files; an artifact is read only from itself")
        layout = dcpl.get_layout()
        if layout == h5d.VIRTUAL:
            raise ArtifactError(f"{where} is a virtual dataset (its data would come from other files)")
        if layout == h5d.CHUNKED or dcpl.get_nfilters():
            raise ArtifactError(f"{where} is chunked or filtered (compressed); the format needs contiguous raw data")
        if layout != h5d.CONTIGUOUS:
            raise ArtifactError(f"{where} is stored compact, inside its object header; the format needs contiguous raw data")

        # What it holds: a simple dataspace, the exact datatype of its encoding.
        space = ds.get_space()
        if space.get_simple_extent_type() != h5s.SIMPLE:
            raise ArtifactError(f"{where} has a scalar or null dataspace; the format needs an array")
        stored = tuple(int(n) for n in space.shape)
        if not 1 <= len(stored) <= (_MAX_RANK if tensors else 1):
            raise ArtifactError(f"{where} has {len(stored)} dimensions")
        if min(stored) < 1:
            raise ArtifactError(f"{where} is empty (shape {list(stored)})")
        encoding = _text_attr(ds, "encoding", where) if tensors else _text_attr(ds, "encoding", where, required=False)
        if not tensors and encoding not in (None, *DOCUMENT_ENCODINGS):
            raise ArtifactError(f"{where} has encoding {encoding[:50]!r}; documents are {' or '.join(DOCUMENT_ENCODINGS)}")
        encoding = encoding or "bytes"
        if encoding not in ENCODINGS:
            raise ArtifactError(f"{where} has unknown encoding {encoding[:50]!r}")
        expected = ENCODINGS[encoding]
        tid = ds.get_type()
        if not tid.equal(h5t.py_create(expected)):
            raise ArtifactError(f"{where} has datatype {_describe_type(tid)}, encoding {encoding} needs {_describe_dtype(expected)}")

        # Where its bytes are, computed from the declared shape with Python integers and checked
        # against the file before anything is read.
        nbytes = math.prod(stored) * expected.itemsize
        offset = ds.get_offset()
        if offset is None:
            raise ArtifactError(f"{where} has no data (its storage was never allocated)")
        offset = int(offset)
        if offset + nbytes > self.file_size:
            raise ArtifactError(
                f"{where} lies outside the file (offset {offset}, {nbytes} bytes, file of {self.file_size} bytes)"
            )
        if offset < self.base + _SUPERBLOCK_BYTES:
            raise ArtifactError(f"{where} overlaps the HDF5 superblock (offset {offset})")
        if offset % _MIN_ALIGNMENT:
            raise ArtifactError(f"{where} is misaligned (offset {offset} is not a multiple of {_MIN_ALIGNMENT})")
        storage = int(ds.get_storage_size())
        if storage != nbytes:
            raise ArtifactError(f"{where} has {storage} bytes of storage for {nbytes} bytes of data")

        rotation = 0
        if tensors:
            shape = _shape_attr(ds, where)
            if stored_shape_of(encoding, shape) != stored:
                raise ArtifactError(f"{where} is stored as {list(stored)}, which does not hold logical shape {list(shape)}")
            if encoding in GROUPED_TERNARY and encoding not in BASE3_TERNARY and shape[-1] % 4:
                raise ArtifactError(f"{where}: logical shape {list(shape)}: a grouped ternary row's width must be a multiple of 4")
            rotation = _rotation_attr(ds, where, encoding, shape[-1])
        else:
            shape = stored
        value = _text_attr(ds, DIGEST_ATTR, where)
        if not _DIGEST.fullmatch(value):
            raise ArtifactError(f"{where}: attribute {DIGEST_ATTR!r} is not a BLAKE2b-256 digest (64 hex digits)")
        return TensorInfo(name, encoding, shape, stored, offset, nbytes, value.lower(), rotation)

    def check_overlaps(self, metadata_reads: list[tuple[int, int]]) -> None:
        """No two datasets share a byte, no dataset covers an object header the walk went through, nor any
        byte HDF5 read while walking (superblock, headers and their continuations, B-trees, heaps: the
        walk reads no dataset's data, so every byte it read is metadata)."""
        spans = sorted(self.spans)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise ArtifactError(
                    f"{self.path}: dataset {second} overlaps dataset {first}: every dataset must have its own bytes"
                )
        starts = [s[0] for s in spans]
        for address, what in self.headers:
            i = bisect.bisect_right(starts, address) - 1
            if i >= 0 and address < spans[i][1]:
                raise ArtifactError(f"{self.path}: dataset {spans[i][2]} overlaps HDF5 metadata (the object header of {what})")
        for start, size in metadata_reads:
            i = bisect.bisect_left(starts, start + size) - 1  # the last dataset starting before the read ends
            if i >= 0 and spans[i][1] > start:
                raise ArtifactError(f"{self.path}: dataset {spans[i][2]} overlaps HDF5 metadata (bytes {start} to "
                                    f"{start + size} were read as metadata)")


def _open_hard_link(gid, name: str, where: str):
    """The object `name` of group `gid` (None if there is none), opened only if it is a hard link:
    a soft link could alias another dataset, an external one would open another file."""
    key = name.encode("utf-8")
    if not gid.links.exists(key):
        return None
    kind = gid.links.get_info(key).type
    if kind != h5l.TYPE_HARD:
        what = {h5l.TYPE_SOFT: "a soft", h5l.TYPE_EXTERNAL: "an external"}.get(kind, "a user-defined")
        raise ArtifactError(f"{where} is {what} link; a .tern file has none (nothing outside it is ever read)")
    return h5o.open(gid, key)


def _header_address(oid) -> int:
    return int(h5o.get_info(oid).addr)


def _open_attr(oid, key: str):
    name = key.encode("utf-8")
    return h5a.open(oid, name) if h5a.exists(oid, name) else None


def _text_attr(oid, key: str, where: str, required: bool = True) -> str | None:
    """A scalar text attribute (variable or fixed length, UTF-8), its type checked before it is read."""
    aid = _open_attr(oid, key)
    if aid is None:
        if required:
            raise ArtifactError(f"{where} lacks the text attribute {key!r}")
        return None
    tid = aid.get_type()
    if tid.get_class() != h5t.STRING or aid.get_space().get_simple_extent_type() != h5s.SCALAR:
        raise ArtifactError(f"{where}: attribute {key!r} is not a text string")
    if tid.is_variable_str():
        value = np.empty((), dtype=h5py.string_dtype())
        aid.read(value, mtype=h5t.py_create(value.dtype))
    else:
        if tid.get_size() > _MAX_TEXT_ATTR:
            raise ArtifactError(f"{where}: attribute {key!r} is too long")
        value = np.empty((), dtype=f"S{tid.get_size()}")
        aid.read(value, mtype=tid)
    value = value[()]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ArtifactError(f"{where}: attribute {key!r} is not valid UTF-8") from None
    if not isinstance(value, str):
        raise ArtifactError(f"{where}: attribute {key!r} is not a text string")
    return value


def _shape_attr(oid, where: str) -> tuple[int, ...]:
    """The `shape` attribute: 1 to _MAX_RANK positive integers (its size is checked before it is read)."""
    aid = _open_attr(oid, "shape")
    if aid is None:
        raise ArtifactError(f"{where} lacks the attribute 'shape'")
    space = aid.get_space()
    if (
        aid.get_type().get_class() != h5t.INTEGER
        or space.get_simple_extent_type() != h5s.SIMPLE
        or len(space.shape) != 1
        or not 1 <= space.shape[0] <= _MAX_RANK
    ):
        raise ArtifactError(f"{where}: attribute 'shape' is not an array of 1 to {_MAX_RANK} integers")
    value = np.empty(space.shape, dtype=np.int64)
    aid.read(value)
    shape = tuple(int(n) for n in value)
    if min(shape) < 1:
        raise ArtifactError(f"{where}: attribute 'shape' {list(shape)} has a dimension below 1")
    return shape


def _rotation_attr(oid, where: str, encoding: str, in_features: int) -> int:
    """The optional `rotation` of a grouped ternary tensor: a scalar integer, 0 or a power of two that
    divides the tensor's input width (the order of its block Hadamard rotation)."""
    aid = _open_attr(oid, "rotation")
    if aid is None:
        return 0
    if encoding not in GROUPED_TERNARY:
        raise ArtifactError(f"{where}: attribute 'rotation' is only defined for grouped ternary encodings")
    if aid.get_type().get_class() != h5t.INTEGER or aid.get_space().get_simple_extent_type() != h5s.SCALAR:
        raise ArtifactError(f"{where}: attribute 'rotation' is not a scalar integer")
    value = np.empty((), dtype=np.int64)
    aid.read(value)
    block = int(value)
    if block and (block < 2 or block & (block - 1) or in_features % block):
        raise ArtifactError(f"{where}: attribute 'rotation' is {block}, not 0 or a power of two dividing {in_features}")
    return block


def _describe_type(tid) -> str:
    cls = tid.get_class()
    if cls in (h5t.INTEGER, h5t.FLOAT) and tid.get_size() > 1 and tid.get_order() == h5t.ORDER_BE:
        return f"big-endian {'float' if cls == h5t.FLOAT else 'integer'} of {tid.get_size()} bytes"
    try:
        return _describe_dtype(tid.dtype)
    except Exception:
        return f"HDF5 class {cls}"


def _describe_dtype(dtype: np.dtype) -> str:
    return f"{dtype.name} ({dtype.str})" if dtype.kind in "iuf" else str(dtype)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"
