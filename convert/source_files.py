"""The files of a checkpoint folder, read only when they are what they claim to be.

A checkpoint folder may come from anyone. Only regular files are read: a FIFO named model.safetensors
would block the converter for ever, a device would never end. A symbolic link is followed only when
it stays inside the model folder or, for a Hugging Face cache snapshot (`snapshots/<revision>/`), inside
that repository's `blobs/` folder, where the hub keeps the real files: a `chat_template.jinja` linked to
a system file would otherwise be embedded in the artifact.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ConversionError


def source_file(path: Path) -> Path | None:
    """`path` when it is a regular file that may be read, None when nothing is there; a ConversionError
    naming it when something else is (a FIFO, a device, a folder, a link leaving the model folder)."""
    try:
        if path.is_symlink():
            target = path.resolve()
            if not any(target.is_relative_to(root) for root in _allowed_roots(path.parent)):
                raise ConversionError(f"{path} is a symbolic link to {target}, outside the model folder "
                                      "(copy the file in instead)")
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise ConversionError(f"{path} is a broken symbolic link") from None
        return None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise ConversionError(f"{path} is not a regular file")
    return path


def read_source(path: Path) -> bytes:
    """The bytes of a file `source_file` accepted, opened so that nothing swapped in meanwhile can block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConversionError(f"{path} is not a regular file")
        return f.read()


def _allowed_roots(folder: Path) -> list[Path]:
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<revision>/file -> ../../blobs/<hash>
        roots.append(real.parent.parent / "blobs")
    return roots
