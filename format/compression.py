"""Documents stored compressed (format 1.2): a `zlib` document is its UTF-8 text as one zlib stream (RFC 1950).

The dataset stays a contiguous run of bytes like every other, so the structure walk, the overlap checks and
the digests treat it as they treat any dataset; only reading it differs. The stream is inflated here, not
by an HDF5 filter, so that its output is bounded by what the reader allows, whatever the file declares:
deflate expands up to ~1000x, and a few kilobytes could otherwise ask for gigabytes.
"""

from __future__ import annotations

import zlib

from .errors import ArtifactError

COMPRESSION_LEVEL = 9  # the smallest output; the same bytes for the same text and zlib build


def compress(text: bytes) -> bytes:
    return zlib.compress(text, COMPRESSION_LEVEL)


def decompress(stored: bytes, limit: int, where: str, kind: str = "a document") -> bytes:
    """The text of a zlib document, at most `limit` bytes (what `kind` may have), or an ArtifactError
    starting with `where`: a stream that inflates beyond `limit` is stopped there (a decompression bomb
    allocates nothing more)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(stored, limit + 1)
    except zlib.error as e:
        raise ArtifactError(f"{where} is damaged (its zlib stream: {e})") from None
    if len(text) > limit:
        raise ArtifactError(f"{where} inflates to more than {limit} bytes, more than {kind} may have")
    if not inflater.eof:
        raise ArtifactError(f"{where} is damaged (its zlib stream is cut short)")
    if inflater.unused_data:
        raise ArtifactError(f"{where} is damaged (bytes follow its zlib stream)")
    return text
