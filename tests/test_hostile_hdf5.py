"""HDF5 metadata built to mislead the reader (classes 5 and 10 of issue 13).

- A variable-length attribute's length field, patched to 2^31 - 1: HDF5 allocates (and touches) what it
  declares before it checks it, 2.1 GB for a 4-byte patch. The structural walk runs in a child process
  with bounded memory, so the tool ends in one line with its peak memory near its normal size (measured,
  with a generous RLIMIT_AS that would let 2.1 GB through).
- A dataset placed over HDF5 metadata that is not an object header (a B-tree or heap block of a group):
  it opened and passed --verify. Every byte HDF5 reads while walking the structure is metadata, and no
  dataset may cover any of it.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from ferrisres.format import Artifact
from ferrisres.format.spec import digest
from hostile import ran, refused, run_boxed

GENEROUS = 6 << 30  # an address-space limit that lets a 2.1 GB allocation through


@pytest.fixture(scope="module")
def base(converted):
    return converted("tiny_gemma4")


def _global_heap_descriptors(data: bytes, length: int) -> list[int]:
    """Offsets of the (length u32, collection address u64) descriptors of variable-length strings."""
    heaps = [m.start() for m in re.finditer(b"GCOL", data)]
    return [m.start() for heap in heaps for m in re.finditer(re.escape(struct.pack("<IQ", length, heap)), data)]


def test_a_variable_length_attribute_declaring_2gb_is_refused_in_bounded_memory(base, tmp_path):
    data = bytearray(base.read_bytes())
    found = _global_heap_descriptors(bytes(data), 64)  # every 64-hex-digit digest attribute
    assert found, "no digest attribute found to patch"
    data[found[0] : found[0] + 4] = struct.pack("<I", 2**31 - 1)
    bad = tmp_path / "vlen.tern"
    bad.write_bytes(data)
    for tool in ("ferrisres-inspect", "ferrisres-run"):
        run = run_boxed(tool, str(bad), *(["-p", "Hi", "-n", "1"] if tool == "ferrisres-run" else []), memory=GENEROUS)
        refused(run, str(bad), "is damaged")
        assert run.peak_mb < 400, f"{tool} peaked at {run.peak_mb:.0f} MB"


def _over_metadata(base: Path, dst: Path) -> tuple[str, int]:
    """A copy of `base` whose tensors/norm (256 bytes of float32) lies over a block of group metadata that
    is not an object header, with its digest recomputed so that --verify passes. Returns (block, offset)."""
    with Artifact.open(base) as a:
        info = a.tensors["norm"]
        spans = sorted((i.offset, i.offset + i.nbytes) for i in [*a.tensors.values(), *a.documents.values()])
    data = bytearray(base.read_bytes())

    def free(start: int) -> bool:
        return start % 64 == 0 and all(end <= start or begin >= start + info.nbytes for begin, end in spans)

    for signature in (b"FHDB", b"BTLF", b"FRHP", b"BTHD", b"TREE", b"HEAP", b"SNOD"):
        target = next((m.start() for m in re.finditer(signature, data) if free(m.start())), None)
        if target is not None:
            break
    else:
        pytest.fail("no group metadata block found")
    layout = bytes([3, 1]) + struct.pack("<QQ", info.offset, info.nbytes)
    at = data.find(layout)
    assert at >= 0 and data.find(layout, at + 1) < 0
    data[at + 2 : at + 10] = struct.pack("<Q", target)
    old, new = info.digest.encode(), digest(data[target : target + info.nbytes]).encode()
    assert data.count(old) == 1
    data[data.find(old) : data.find(old) + 64] = new
    dst.write_bytes(data)
    return signature.decode(), target


def test_a_dataset_placed_over_group_metadata_is_refused(base, tmp_path):
    bad = tmp_path / "over.tern"
    block, offset = _over_metadata(base, bad)
    for tool, args in (("ferrisres-inspect", ["--verify"]), ("ferrisres-run", ["-p", "Hi", "-n", "1", "--raw"])):
        refused(run_boxed(tool, str(bad), *args), str(bad), "dataset /tensors/norm overlaps HDF5 metadata")


def test_the_metadata_check_passes_every_valid_artifact(converted, tmp_path):
    for artifact in (converted("tiny_gemma4"), converted("tiny_gemma4", quant="f32"),
                     converted("tiny_gemma4_bf16")):
        ran(run_boxed("ferrisres-inspect", str(artifact), "--verify"))
