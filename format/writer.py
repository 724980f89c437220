"""Streaming, atomic writer of `.tern` artifacts.

Tensors are added one at a time and written straight to disk, so memory holds one tensor at most.
Everything goes to a temporary file beside the target, which takes the final name only when the
artifact is complete and has passed the caller's `check` (the converter reopens it with the reader):
an interrupted, failed or refused write never leaves a file under the final name. Without `overwrite`
the final name is taken with a hard link, which fails rather than replace a file created meanwhile.

The temporary file is `.<name>.<random>.partial` in the target's folder. Its writer holds an
exclusive lock (flock) on it until it is renamed or removed; the lock dies with the process, so a
partial file nobody holds a lock on was left by a writer that was killed (SIGKILL, power loss) and
`remove_stale_partials` may delete it. A failed write (disk full, I/O error) raises `ArtifactError`
with one line saying why, and removes the temporary file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
from h5py import h5d, h5p

from .compression import compress
from .encodings import ENCODINGS
from .errors import ArtifactError
from .spec import ALIGNMENT, DIGEST_ATTR, FORMAT_NAME, FORMAT_VERSION, META_GROUP, TENSOR_GROUP, digest_stream

_PARTIAL_SUFFIX = ".partial"
_WORK_SUFFIX = ".work"  # a folder of a conversion's intermediate files (see `work_folder`)
_RANDOM_PART = r"[A-Za-z0-9_]{8}"  # what tempfile.mkstemp puts between prefix and suffix


def partial_name_prefix(path: Path) -> str:
    """Temporary files of an artifact being written are `.<name>.<random>.partial` in its folder."""
    return f".{path.name}."


def partial_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files of artifacts being (or once being) written to `path`, by any process."""
    path = Path(path)
    suffixes = f"({re.escape(_PARTIAL_SUFFIX)}|{re.escape(_WORK_SUFFIX)})"
    pattern = re.compile(re.escape(partial_name_prefix(path)) + _RANDOM_PART + suffixes)
    try:
        return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


def remove_stale_partials(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Delete the temporary files of `path` that no live writer holds (left by a killed conversion).

    Returns (removed, in use): a partial file whose lock is held belongs to a running writer and is
    left alone, as is one whose lock cannot be tested (a file system without locks).
    """
    removed, in_use = [], []
    for p in partial_files(path):
        folder = p.name.endswith(_WORK_SUFFIX)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if folder else 0))
        except OSError:
            continue  # gone meanwhile (renamed into place or removed by its writer), or not a plain file
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EWOULDBLOCK: a writer is alive; anything else: cannot tell
                in_use.append(p)
                continue
            try:
                mine = os.fstat(fd)
                kind = stat.S_ISDIR if folder else stat.S_ISREG
                same = kind(mine.st_mode) and os.stat(p, follow_symlinks=False).st_ino == mine.st_ino
            except FileNotFoundError:
                same = False
            if same:
                shutil.rmtree(p, ignore_errors=True) if folder else p.unlink(missing_ok=True)
                removed.append(p)
        finally:
            os.close(fd)
    return removed, in_use


@contextmanager
def work_folder(path: str | os.PathLike):
    """A folder `.<name>.<random>.work` beside the artifact `path` for a conversion's intermediate files,
    locked (flock on the folder) while in use and removed afterwards; one that a killed conversion left
    is removed by the next `remove_stale_partials`, as a partial file is."""
    path = Path(path)
    for _ in range(5):
        try:
            folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=partial_name_prefix(path), suffix=_WORK_SUFFIX))
        except OSError as e:
            raise ArtifactError(f"cannot write in {path.parent}: {e.strerror or e}") from None
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(folder, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break  # locked before any cleaner could take it for stale
        except OSError:
            pass  # a cleaner locked it first and is removing it: start again
        os.close(fd)
    else:
        raise ArtifactError(f"cannot create a work folder in {path.parent}")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


class ArtifactWriter:
    """Write an artifact: `with ArtifactWriter(path) as w: w.add_document(...); w.add_tensor(...)`."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False,
                 check: Callable[[Path], None] | None = None):
        """`check(temporary_path)` runs on the complete, closed file before it takes the final name: if it
        raises, nothing is renamed (the converter reopens the file with the reader there)."""
        self.path = Path(path)
        self._overwrite = overwrite
        self._check = check
        if self.path.exists() and not overwrite:
            raise ArtifactError(f"{self.path} already exists")
        if not self.path.parent.is_dir():
            raise ArtifactError(f"output folder {self.path.parent} does not exist")
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._lock: int | None = None  # open descriptor of the temporary file, holding its flock
        self._reserved = 0  # bytes of the temporary file whose disk blocks are allocated

    def __enter__(self) -> "ArtifactWriter":
        try:
            self._create_locked_temporary()
            # Every allocation starts on a 4096-byte boundary, so each tensor can be viewed straight
            # out of a memory map; track_order keeps datasets listed in the order they were written.
            # HDF5's own file lock is off: this writer holds its own lock on the file (see above).
            with self._io():
                self._file = h5py.File(
                    self._tmp, "w", alignment_threshold=1, alignment_interval=ALIGNMENT, track_order=True,
                    locking=False,
                )
                self._file.attrs["format"] = FORMAT_NAME
                self._file.attrs["format_version"] = "%d.%d" % FORMAT_VERSION
                self._meta = self._file.create_group(META_GROUP, track_order=True)
                self._tensors = self._file.create_group(TENSOR_GROUP, track_order=True)
                self._reserve()
        except BaseException:
            self._discard()
            raise
        return self

    def _create_locked_temporary(self) -> None:
        for _ in range(5):
            try:
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=partial_name_prefix(self.path),
                                           suffix=_PARTIAL_SUFFIX)
            except OSError as e:
                raise ArtifactError(f"cannot write in {self.path.parent}: {e.strerror or e}") from None
            self._lock, self._tmp = fd, Path(tmp)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # a cleaner (remove_stale_partials) locked it first and is deleting it: start again
            except OSError:
                return  # a file system without locks: the file is still ours, only not marked as in use
            else:
                try:
                    if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                        return  # locked, and still the file under that name: no cleaner can take it now
                except FileNotFoundError:
                    pass  # a cleaner removed the file between its creation and our lock: start again
            os.close(fd)
            self._lock = self._tmp = None
        raise ArtifactError(f"cannot create a temporary file in {self.path.parent}")

    def add_document(self, name: str, content: str | dict | list) -> None:
        """Store a UTF-8 text document, zlib-compressed (a dict or list is stored as canonical JSON)."""
        if not isinstance(content, str):
            content = json.dumps(content, sort_keys=True, ensure_ascii=False)
        data = np.frombuffer(compress(content.encode("utf-8")), dtype=np.uint8)
        self._create(self._meta, name, [data], data.shape, data.dtype, {"encoding": "zlib"})

    def add_tensor(self, name: str, data: np.ndarray, encoding: str, shape: tuple[int, ...] | None = None,
                   rotation: int = 0) -> None:
        """Store one tensor. `shape` is its logical shape when that differs from the stored one (ternary);
        `rotation`, for grouped ternary, the order of the Hadamard blocks its input is rotated by."""
        self.add_tensor_rows(name, [data], data.shape, encoding, shape, rotation)

    def add_tensor_rows(
        self, name: str, blocks, stored_shape: tuple[int, ...], encoding: str, shape: tuple[int, ...] | None = None,
        rotation: int = 0,
    ) -> None:
        """Store a tensor given as consecutive blocks of rows, so a huge one never has to be in memory whole."""
        expected = ENCODINGS[encoding]
        logical = tuple(stored_shape) if shape is None else tuple(shape)
        attrs = {"encoding": encoding, "shape": np.asarray(logical, dtype=np.int64)}
        if rotation:
            attrs["rotation"] = np.int64(rotation)
        self._create(self._tensors, name, blocks, tuple(stored_shape), expected, attrs)

    def _create(self, group: h5py.Group, name: str, blocks, shape: tuple[int, ...], dtype: np.dtype, attrs: dict):
        if name in group:
            raise ArtifactError(f"{group.name}/{name} written twice")
        if not all(shape):
            raise ArtifactError(f"{group.name}/{name} is empty")
        # HDF5 allocates the dataset's bytes at once (never filling them) and this writer writes them
        # itself, into disk blocks reserved beforehand: a full disk fails here, in a call whose error
        # is caught, never inside HDF5, which cannot close a file cleanly after a failed write.
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
        with self._io():
            ds = group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)
            offset = ds.id.get_offset()
            self._reserve()
        if offset is None:
            raise ArtifactError(f"{group.name}/{name}: HDF5 allocated no storage for it")
        hasher = digest_stream()
        row, row_bytes = 0, dtype.itemsize * math.prod(shape[1:])
        for block in blocks:  # errors of the caller's blocks (bad input, Ctrl-C) pass through as they are
            if block.dtype != dtype or block.shape[1:] != shape[1:]:
                raise ArtifactError(f"{group.name}/{name}: block {block.dtype}{list(block.shape)} does not fit {dtype}{list(shape)}")
            if row + len(block) > shape[0]:
                raise ArtifactError(f"{group.name}/{name}: more than {shape[0]} rows written")
            data = memoryview(np.ascontiguousarray(block)).cast("B")
            with self._io():
                _pwrite_all(self._lock, data, offset + row * row_bytes)
            hasher.update(data)
            row += len(block)
        if row != shape[0]:
            raise ArtifactError(f"{group.name}/{name}: {row} rows written of {shape[0]}")
        with self._io():
            for k, v in attrs.items():
                ds.attrs[k] = v
            ds.attrs[DIGEST_ATTR] = hasher.hexdigest()
            self._reserve()

    def _reserve(self) -> None:
        """Allocate disk blocks for all the file HDF5 has allocated so far (EOA): its own metadata writes
        then land in blocks that exist, and a full disk shows up here as ENOSPC."""
        size = self._file.id.get_filesize()
        if size > self._reserved:
            try:
                os.posix_fallocate(self._lock, self._reserved, size - self._reserved)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                # a file system that cannot reserve space: go on, and let writes fail where they fail
            self._reserved = size

    @contextmanager
    def _io(self):
        """HDF5 and OS write failures (disk full, I/O error) as one-line ArtifactErrors."""
        try:
            yield
        except ArtifactError:
            raise
        except (OSError, RuntimeError) as e:
            raise ArtifactError(f"cannot write {self.path}: {_write_failure(e)}") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            with self._io():
                self._file.close()
                self._file = None
                os.fsync(self._lock)
                os.chmod(self._tmp, 0o644 & ~_umask())
            if self._check is not None:
                self._check(self._tmp)
            with self._io():
                self._rename()
            self._tmp = None
            _fsync_folder(self.path.parent)  # make the rename itself durable
        except BaseException:
            self._discard()
            raise
        finally:
            self._unlock()

    def _rename(self) -> None:
        """The temporary file takes the final name. Without `overwrite` a file that appeared there meanwhile
        (created by someone else while this one was written) is never replaced: a hard link fails if the name
        exists, where a rename would silently replace it."""
        if self._overwrite:
            os.replace(self._tmp, self.path)
            return
        taken = ArtifactError(f"{self.path} was created by someone else while this artifact was being written; "
                              "it was left as it is (replace it with --force)")
        try:
            os.link(self._tmp, self.path)
        except FileExistsError:
            raise taken from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if self.path.exists():  # a file system without hard links: the best left is to look just before
                raise taken from None
            os.rename(self._tmp, self.path)
            return
        self._tmp.unlink()

    def _discard(self) -> None:
        if self._file is not None:
            if self._lock is not None:
                # Free the disk space first: after a write failed on a full disk, HDF5 must still
                # flush its metadata to close the file cleanly (a half-closed HDF5 file can crash
                # the process at exit), and it is about to be deleted anyway.
                try:
                    os.ftruncate(self._lock, 0)
                except OSError:
                    pass
            try:
                self._file.close()
            except Exception:
                pass  # the file is being thrown away; its close error would only hide the real one
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: the OS error if there is one (HDF5 buries it in its message)."""
    code = getattr(e, "errno", None)
    if not code:
        found = re.search(r"errno = (\d+)", str(e))
        code = int(found.group(1)) if found else None
    if code:
        reason = os.strerror(code)
        if code in (errno.ENOSPC, errno.EDQUOT):
            reason += " (the partial file was removed)"
        return reason
    return " ".join(str(e).split())[:200] or type(e).__name__


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename has happened all the same
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
