"""Constants of the `.tern` format (described in full in SPEC.md) and its digest function."""

from __future__ import annotations

import hashlib

import numpy as np

FORMAT_NAME = "ferrisres.tern"
# A reader refuses a newer major version. 1.1 added grouped ternary and quantized tables; 1.2 zlib documents
# and base-3 ternary; 1.3 three-plane ternary; 1.4 int6 tables (SPEC.md, "History")
FORMAT_VERSION = (1, 4)
ALIGNMENT = 4096  # byte offset of every dataset's data is a multiple of this
META_GROUP = "meta"  # UTF-8 documents: configs, tokenizer, provenance
TENSOR_GROUP = "tensors"  # model weights by artifact name
DIGEST_ATTR = "blake2b"  # hex BLAKE2b-256 of a dataset's raw bytes


def digest_stream():
    """A BLAKE2b-256 hasher: feed it a dataset's raw bytes in order; `.hexdigest()` is the stored digest."""
    return hashlib.blake2b(digest_size=32)


def digest(data: np.ndarray) -> str:
    """Hex BLAKE2b-256 of the raw bytes of a contiguous array."""
    h = digest_stream()
    h.update(memoryview(data).cast("B"))
    return h.hexdigest()
