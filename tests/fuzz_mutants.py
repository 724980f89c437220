"""The mutants of the fuzz test: damaged and hostile variants of valid artifacts, one function per
mutation family, each mutant with the outcomes its kind allows. Deterministic: the driver that runs
them and the test that judges them build the same list."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from h5py import h5d, h5p, h5t

from ferrisres.format import FORMAT_VERSION
from ferrisres.format.documents import MAX_DOCUMENT, MAX_TEMPLATE

from fuzz_common import INSPECT_REFUSES, INTACT, REFUSED, RUN_REFUSES, VERIFY_FAILS, Dataset, Mutant, layout


def build_mutants(bases: dict[str, Path]) -> list[Mutant]:
    """Every mutant, deterministically from the base artifacts (by label: ternary, f32, bf16, grouped, base3)."""
    b = Bases(bases)
    for family in FAMILIES:
        family(b)
    names = [m.name for m in b.mutants]
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    assert not duplicates, f"mutant names are not unique: {duplicates[:5]}"
    return b.mutants


class Bases:
    """The base artifacts as the mutations see them, the datasets they aim at, and the mutants so far."""

    def __init__(self, paths: dict[str, Path]):
        self.paths = paths
        self.lay = {label: layout(path) for label, path in paths.items()}
        self.size = {label: path.stat().st_size for label, path in paths.items()}
        self.mutants: list[Mutant] = []
        tensors = self.tensors
        self.ternary = tensors("ternary", lambda d: d.encoding.startswith("ternary"))[0]
        self.norm = ([d for d in tensors("ternary") if d.name == "norm"] or
                     tensors("ternary", lambda d: len(d.shape) == 1 and "scale" not in d.name and d.nbytes >= 256))[0]
        self.int8 = tensors("ternary", lambda d: d.encoding == "int8")[0]
        self.bf16 = tensors("bf16", lambda d: d.encoding == "bf16")[0]
        # the grouped tables (int4 and int6) and their float16 scales
        self.grouped_tables = tensors("grouped", lambda d: d.name.startswith("embed_tokens"))
        self.int4 = next(d for d in self.grouped_tables if d.encoding == "int4-g32")
        self.int4_scale = self.lay["grouped"][f"tensors/{self.int4.name}.weight_scale"]
        self.base3 = tensors("base3", lambda d: d.encoding == "ternary5-g3" and d.shape[-1] >= 256)[0]  # 4 groups
        self.X, self.N, self.H = (f"tensors/{d.name}" for d in (self.ternary, self.norm, self.int8))
        self.I4, self.I4S = f"tensors/{self.int4.name}", f"tensors/{self.int4_scale.name}"

    def add(self, name, family, base, make, expect, words=(), verify=None, keep=False, same_data=True) -> None:
        same_data = same_data and family not in ("JSON documents", "documents")  # those rewrite documents, digests and all
        self.mutants.append(Mutant(name, family, base, make, frozenset(expect), tuple(words), verify, keep, same_data))

    def tensors(self, label: str, pred=lambda d: True) -> list[Dataset]:
        return [d for d in self.lay[label].values() if d.group == "tensors" and pred(d)]


# ---- how mutants are made

def copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def xor_bytes(path: Path, changes: dict[int, int]) -> None:
    with open(path, "r+b") as f:
        for offset, mask in changes.items():
            f.seek(offset)
            b = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([b ^ mask]))


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def h5edit(edit: Callable) -> Callable[[Path, Path], None]:
    """A mutant made by editing a copy of the base with h5py (new allocations aligned as the writer's)."""

    def make(src: Path, dst: Path) -> None:
        import h5py

        copy(src, dst)
        with h5py.File(dst, "r+", alignment_threshold=1, alignment_interval=4096) as f:
            edit(f)

    return make


def blake2b(data: np.ndarray) -> str:
    from ferrisres.format.spec import digest

    return digest(np.ascontiguousarray(data))


def rewrite(f, key: str, data=None, attrs: dict | None = None, fix_digest: bool = True, **create) -> None:
    """Replace dataset `key` by a new one (same name) made from `data` (default: its own data) with
    h5py `create` options; `attrs` override its attributes (None deletes one). With `fix_digest` the
    digest is recomputed from the stored bytes, so only what the mutation is about is wrong."""
    old = f[key]
    old_attrs = dict(old.attrs)
    if data is None:
        data = old[...]
    group, name = key.rsplit("/", 1)
    del f[key]
    ds = f[group].create_dataset(name, data=data, **create)
    new_attrs = {**old_attrs, **(attrs or {})}
    if fix_digest and "blake2b" not in (attrs or {}) and ds.shape is not None and ds.size:
        try:
            new_attrs["blake2b"] = blake2b(np.asarray(ds[...]))
        except (OSError, TypeError, ValueError):
            pass
    for k, v in new_attrs.items():
        if v is not None:
            ds.attrs[k] = v


def set_document(f, name: str, text: str | bytes | None, encoding: str = "bytes") -> None:
    """Replace (or add, or with None delete) document `name`, with a correct digest; `text` is stored as
    given under `encoding` (bytes of a zlib stream for "zlib")."""
    key = f"meta/{name}"
    if key in f:
        del f[key]
    if text is None:
        return
    raw = np.frombuffer(text.encode("utf-8") if isinstance(text, str) else text, dtype=np.uint8)
    ds = f["meta"].create_dataset(name, data=raw)
    ds.attrs["encoding"] = encoding
    ds.attrs["blake2b"] = blake2b(raw)


def document_text(f, name: str) -> str:
    """Document `name` of an open artifact, inflated when it is stored compressed."""
    ds = f[f"meta/{name}"]
    raw = bytes(ds[...])
    return (zlib.decompress(raw) if ds.attrs.get("encoding") == "zlib" else raw).decode("utf-8")


def zlib_bomb(size: int) -> bytes:
    """A zlib stream of `size` zero bytes, made a MiB at a time (~1000x smaller than what it inflates to)."""
    deflater, chunk = zlib.compressobj(9), bytes(1 << 20)
    parts = [deflater.compress(chunk) for _ in range(size >> 20)]
    return b"".join([*parts, deflater.compress(bytes(size % (1 << 20))), deflater.flush()])


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[object], None]:
    """An h5py edit replacing JSON document `name` by `change(parsed)` (serialised unless it is a str)."""

    def edit(f) -> None:
        value = json.loads(document_text(f, name))
        new = change(value)
        new = new if new is not None else value
        set_document(f, name, new if isinstance(new, (str, bytes)) else json.dumps(new))

    return edit


def updated(**changes) -> Callable[[dict], dict]:
    return lambda d: {**d, **changes}


def set_attr(key: str | None, name: str, value) -> Callable[[Path, Path], None]:
    """A mutant whose attribute `name` of dataset `key` (None: of the root group) is `value` (None: deleted)."""

    def edit(f) -> None:
        attrs = (f if key is None else f[key]).attrs
        if value is None:
            del attrs[name]
        else:
            attrs[name] = value

    return h5edit(edit)


def find_once(data: bytes, pattern: bytes, start: int = 0, end: int | None = None) -> int:
    at = data.find(pattern, start, end)
    assert at >= 0 and data.find(pattern, at + 1, end) < 0, f"pattern {pattern.hex()} not found exactly once"
    return at


def layout_message(data: bytes, d: Dataset) -> int:
    """Offset of the address field in dataset `d`'s contiguous-layout message (version 3)."""
    return find_once(data, bytes([3, 1]) + struct.pack("<QQ", d.offset, d.nbytes), d.header, d.header + 4096) + 2


def patched(fn: Callable[[bytes, bytearray], None]) -> Callable[[Path, Path], None]:
    def make(src: Path, dst: Path) -> None:
        data = src.read_bytes()
        out = bytearray(data)
        fn(data, out)
        dst.write_bytes(out)

    return make


# ---- the mutation families


def not_artifacts(b: Bases) -> None:
    """Files that are not artifacts at all."""
    add = b.add

    def write(data: bytes):
        return lambda src, dst: dst.write_bytes(data)

    def fifo(src, dst):
        os.mkfifo(dst)

    def folder(src, dst):
        dst.mkdir()

    def symlink_loop(src, dst):
        os.symlink(dst.name, dst)

    def device(src, dst):
        os.symlink("/dev/zero", dst)

    def plain_hdf5(src, dst):
        with h5py.File(dst, "w") as f:
            f["x"] = np.arange(10)

    rng = random.Random(1)
    special = {
        "empty file": (write(b""), ("not a .tern",)),
        "text file": (write(b"this is not an HDF5 file\n" * 50), ("not a .tern",)),
        "random bytes": (write(bytes(rng.getrandbits(8) for _ in range(65536))), ("not a .tern",)),
        "HDF5 signature only": (write(b"\x89HDF\r\n\x1a\n" + bytes(4096)), ("not a .tern",)),
        "plain HDF5 file": (plain_hdf5, ("not a .tern",)),
        "folder": (folder, ("not a regular file",)),
        "FIFO": (fifo, ("not a regular file",)),
        "device": (device, ("not a regular file",)),
        "symlink loop": (symlink_loop, ("cannot read",)),
    }
    for name, (make, words) in special.items():
        add(f"special/{name}", "not an artifact", None, make, {REFUSED}, words, keep=name in ("FIFO", "folder"))


def truncations(b: Bases) -> None:
    """Truncation: at the start, in the superblock, in object headers, in data, near the end."""
    add, lay, size, grouped_tables = b.add, b.lay, b.size, b.grouped_tables
    for label in ("ternary", "f32", "grouped"):
        n = size[label]
        cuts = {1, 7, 8, 64, 96, 200, 4095, 4096, 4097, n - 4096, n - 100, n - 1}
        cuts |= {n * k // 29 for k in range(1, 29)} if label == "ternary" else {n * k // 9 for k in range(1, 9)}
        if label == "grouped":  # the table encodings' own datasets: their headers and data
            cuts = {d.header + 8 for d in grouped_tables} | {d.offset + d.nbytes // 2 for d in grouped_tables}
        cuts |= {d.header + 8 for d in list(lay[label].values())[::40]}
        for cut in sorted(cuts):
            add(f"truncate/{label}/{cut}", "truncation", label,
                lambda src, dst, cut=cut: dst.write_bytes(src.read_bytes()[:cut]), {REFUSED},
                keep=(label, cut) == ("ternary", 4096))


def extensions(b: Bases) -> None:
    """More bytes than HDF5 wrote: appended, or a user block in front (HDF5 finds its superblock at 512)."""
    add = b.add
    add("extend/append 1 byte", "extension", "ternary", lambda src, dst: dst.write_bytes(src.read_bytes() + b"\0"), {INTACT})
    add("extend/append 1 MiB", "extension", "ternary",
        lambda src, dst: dst.write_bytes(src.read_bytes() + bytes(random.Random(2).getrandbits(8) for _ in range(1 << 20))),
        {INTACT})
    add("extend/512-byte user block", "extension", "ternary",
        lambda src, dst: dst.write_bytes(bytes(512) + src.read_bytes()), {INTACT}, keep=True)
    add("copy/other folder", "extension", "ternary", copy, {INTACT})
    add("copy/symlink", "extension", "ternary", lambda src, dst: os.symlink(src, dst), {INTACT})


def superblock_flips(b: Bases) -> None:
    """One bit flipped in the superblock."""
    add = b.add
    rng = random.Random(3)
    for byte, bit in sorted({(rng.randrange(0, 96), rng.randrange(8)) for _ in range(48)}):
        add(f"superblock flip/{byte}.{bit}", "superblock flip", "ternary",
            lambda src, dst, byte=byte, bit=bit: (copy(src, dst), xor_bytes(dst, {byte: 1 << bit})),
            {REFUSED, INTACT})


def metadata_flips(b: Bases) -> None:
    """One byte changed in HDF5 metadata: object headers, heaps, B-trees, attribute values."""
    add, lay, bases = b.add, b.lay, b.paths
    for label, count in (("ternary", 90), ("f32", 20)):
        data = np.fromfile(bases[label], dtype=np.uint8)
        in_data = np.zeros(len(data), bool)
        for d in lay[label].values():
            in_data[d.offset : d.offset + d.nbytes] = True
        candidates = np.flatnonzero((data != 0) & ~in_data)
        candidates = candidates[candidates >= 96]
        rng = random.Random(4 if label == "ternary" else 5)
        for at in sorted(rng.sample(list(candidates), count)):
            mask = rng.randrange(1, 256)
            add(f"metadata flip/{label}/{at}^{mask:02x}", "metadata flip", label,
                lambda src, dst, at=int(at), mask=mask: (copy(src, dst), xor_bytes(dst, {at: mask})),
                {REFUSED, VERIFY_FAILS, INTACT})


def data_flips(b: Bases) -> None:
    """One byte changed in the data of every dataset: --verify must name exactly that dataset."""
    add, lay, ternary, grouped_tables = b.add, b.lay, b.ternary, b.grouped_tables
    for label in ("ternary", "f32", "bf16", "grouped", "base3"):
        rng = random.Random(f"data-{label}")
        for d in lay[label].values():
            if (label == "bf16" and d.encoding != "bf16" or label == "grouped" and d not in grouped_tables
                    or label == "base3" and not d.encoding.startswith("ternary5")):
                continue  # the rest is as in the ternary student
            at, mask = d.offset + rng.randrange(d.nbytes), rng.randrange(1, 256)
            expect = {VERIFY_FAILS} if d.group == "tensors" else {VERIFY_FAILS, REFUSED}
            add(f"data flip/{label}/{d.key}", "data flip", label,
                lambda src, dst, at=at, mask=mask: (copy(src, dst), xor_bytes(dst, {at: mask})),
                expect, verify=(d.key,), keep=d.key == f"tensors/{ternary.name}" and label == "ternary")


def attribute_text(b: Bases) -> None:
    """A character of an attribute's text changed in place (the strings live in HDF5's global heap)."""
    add, bases = b.add, b.paths
    raw = bases["ternary"].read_bytes()
    rng = random.Random(6)
    unique = [d for d in b.lay["ternary"].values() if raw.count(d.digest.encode()) == 1]
    for d in rng.sample(unique, 12):
        at = find_once(raw, d.digest.encode()) + rng.randrange(64)
        other = "0123456789abcdef".replace(chr(raw[at]), "")[rng.randrange(15)]
        add(f"digest text/{d.key} other hex digit", "attribute text", "ternary",
            lambda src, dst, at=at, c=other: (copy(src, dst), patch(dst, at, c.encode())),
            {VERIFY_FAILS}, verify=(d.key,))
        add(f"digest text/{d.key} not hex", "attribute text", "ternary",
            lambda src, dst, at=at: (copy(src, dst), patch(dst, at, b"g")), {REFUSED}, (d.name, "blake2b"))
    name_at = find_once(raw, b"ferrisres.tern")
    version_at = raw.find(b"%d.%d\0" % FORMAT_VERSION, name_at)
    for name, at, text, expect, words in [
        ("format", name_at + 10, b"a", REFUSED, ("not a .tern", "ferrisres.aern")),
        ("format_version 2.x", version_at, b"2", REFUSED, ("2.%d" % FORMAT_VERSION[1], "newer")),
        ("format_version 1.9", version_at + 2, b"9", INTACT, ()),
        ("format_version 1:x", version_at + 1, b":", REFUSED, ("malformed",)),
    ]:
        add(f"root text/{name}", "attribute text", "ternary",
            lambda src, dst, at=at, text=text: (copy(src, dst), patch(dst, at, text)), {expect}, words)


def root_attributes(b: Bases) -> None:
    """Root attributes rewritten with h5py."""
    add = b.add

    for name, key, value, expect, words in [
        ("format missing", "format", None, REFUSED, ("not a .tern", "no format")),
        ("format int", "format", 7, REFUSED, ("not a .tern",)),
        ("format other", "format", "ferrisres.tern2", REFUSED, ("not a .tern", "ferrisres.tern2")),
        ("format array", "format", np.array([b"ferrisres.tern"]), REFUSED, ("not a .tern",)),
        ("format fixed-length bytes", "format", np.bytes_(b"ferrisres.tern"), INTACT, ()),
        ("version missing", "format_version", None, REFUSED, ("format_version",)),
        ("version 2.0", "format_version", "2.0", REFUSED, ("2.0", "newer")),
        ("version 99999999999999999999.0", "format_version", "99999999999999999999.0", REFUSED, ("newer",)),
        ("version 1.7", "format_version", "1.7", INTACT, ()),
        ("version 0.9", "format_version", "0.9", REFUSED, ("unsupported",)),
        ("version 1", "format_version", "1", REFUSED, ("malformed",)),
        ("version 1.0.0", "format_version", "1.0.0", REFUSED, ("malformed",)),
        ("version x.y", "format_version", "x.y", REFUSED, ("malformed",)),
        ("version with space", "format_version", " 1.0", REFUSED, ("malformed",)),
        ("version empty", "format_version", "", REFUSED, ("malformed",)),
        ("version float", "format_version", 1.0, REFUSED, ("format_version", "text")),
        ("version 5000 digits", "format_version", "1" * 5000 + ".0", REFUSED, ("malformed",)),
    ]:
        add(f"root attr/{name}", "root attributes", "ternary", set_attr(None, key, value), {expect}, words,
            keep=name == "version 2.0")


def dataset_attributes(b: Bases) -> None:
    """Tensor and document attributes rewritten with h5py."""
    add, ternary, norm, X, N, H = b.add, b.ternary, b.norm, b.X, b.N, b.H

    for target, name, value, expect, words in [
        (X, "encoding", "f64", REFUSED, ("unknown encoding",)),
        (X, "encoding", 7, REFUSED, ("encoding", "text")),
        (X, "encoding", None, REFUSED, ("encoding",)),
        (X, "encoding", "int8", REFUSED, ("datatype",)),
        (X, "encoding", "bf16", REFUSED, ("datatype",)),
        (X, "encoding", np.array(["ternary"], dtype=h5py.string_dtype()), REFUSED, ("encoding", "text")),
        (N, "encoding", "f16", REFUSED, ("datatype",)),
        (N, "encoding", "ternary", REFUSED, ("datatype",)),
        (H, "encoding", "ternary", REFUSED, ()),
        (X, "shape", np.asarray(ternary.shape, dtype=np.float64), REFUSED, ("shape",)),
        (X, "shape", "[32, 64]", REFUSED, ("shape",)),
        (X, "shape", np.asarray([ternary.shape]), REFUSED, ("shape",)),
        (X, "shape", -np.asarray(ternary.shape), REFUSED, ("shape",)),
        (X, "shape", np.asarray([2**62, 2**62]), REFUSED, ("shape",)),
        (X, "shape", np.asarray([2**63 - 1] * 2, dtype=np.uint64), REFUSED, ("shape",)),
        (X, "shape", np.zeros(0, np.int64), REFUSED, ("shape",)),
        (X, "shape", np.ones(9, np.int64), REFUSED, ("shape",)),
        (X, "shape", None, REFUSED, ("shape",)),
        (N, "shape", norm.shape[0], REFUSED, ("shape",)),
        (X, "shape", np.asarray([*ternary.shape, 1]), REFUSED, ("shape",)),
        (X, "shape", np.asarray([ternary.shape[0], ternary.shape[1] - 1]), REFUSED, ("shape",)),
        (X, "shape", np.asarray(ternary.shape, dtype=np.int32), INTACT, ()),
        (X, "shape", np.asarray(ternary.shape, dtype=np.uint16), INTACT, ()),
        (X, "shape", np.asarray(ternary.shape, dtype=">i8"), INTACT, ()),
        (X, "blake2b", ternary.digest[:-1], REFUSED, ("blake2b",)),
        (X, "blake2b", ternary.digest + "0", REFUSED, ("blake2b",)),
        (X, "blake2b", "z" * 64, REFUSED, ("blake2b",)),
        (X, "blake2b", 12345, REFUSED, ("blake2b", "text")),
        (X, "blake2b", None, REFUSED, ("blake2b",)),
        (X, "blake2b", "x" * 100_000, REFUSED, ("blake2b",)),
        (X, "blake2b", ternary.digest.upper(), INTACT, ()),
        (X, "blake2b", np.bytes_(ternary.digest.encode()), INTACT, ()),
        (X, "blake2b", norm.digest, VERIFY_FAILS, ()),
        ("meta/model_config.json", "encoding", "f32", REFUSED, ("model_config.json", "bytes")),
        ("meta/model_config.json", "blake2b", norm.digest, VERIFY_FAILS, ()),
        ("meta/tokenizer.json", "blake2b", None, REFUSED, ("tokenizer.json", "blake2b")),
    ]:
        verify = (target,) if expect == VERIFY_FAILS else None
        label = f"{target} {name}={str(value)[:30]!r} #{len(b.mutants)}" if not isinstance(value, np.ndarray) else \
            f"{target} {name}={value.dtype}{list(value.shape)} #{len(b.mutants)}"
        add(f"attr/{label}", "dataset attributes", "ternary", set_attr(target, name, value), {expect},
            (*words, target.split("/", 1)[1]) if expect == REFUSED and target.startswith("tensors") else words,
            verify=verify)


def grouped_table_attributes(b: Bases) -> None:
    """The int4 and int6 tables' attributes: each other reading of their bytes is refused, naming the tensor."""
    add = b.add
    for table in (d for d in b.grouped_tables if not d.name.endswith(".weight_scale")):
        scale = b.lay["grouped"][f"tensors/{table.name}.weight_scale"]
        T, S, kind = f"tensors/{table.name}", f"tensors/{scale.name}", table.encoding
        other = "int6-g32" if kind.startswith("int4") else "int4-g64"  # another grouped encoding, other bytes per row
        rows, cols = table.shape
        for target, name, value, words in [
            (T, "encoding", other, ("stored as", table.name)),
            (T, "encoding", "ternary", ("stored as", table.name)),
            (T, "encoding", "int8", ("datatype", table.name)),
            (T, "encoding", kind[:6] + "16", ("unknown encoding", table.name)),
            (T, "shape", np.asarray([rows, cols + 128]), ("stored as", table.name)),  # stored rows longer (int6: blocks of 128)
            (T, "shape", np.asarray([rows, cols - 1]), ("shape", table.name)),  # the same groups: the model's shape
            (T, "shape", np.asarray([rows - 1, cols]), ("stored as", table.name)),
            (S, "encoding", "f32", ("datatype", scale.name)),
            (S, "shape", np.asarray([rows * scale.shape[1]]), ("stored as", scale.name)),
        ]:
            add(f"{kind} attr/{target} {name}={str(value)[:30]}", "dataset attributes", "grouped",
                set_attr(target, name, value), {REFUSED}, words)
        add(f"{kind} table/scale missing", "dataset attributes", "grouped", h5edit(lambda f, S=S: f.__delitem__(S)),
            {REFUSED}, (scale.name, "float16"))
        add(f"{kind} table/per-tensor scale", "dataset attributes", "grouped",
            h5edit(lambda f, S=S: rewrite(f, S, f[S][:1, :1].reshape(1), {"shape": np.asarray([1])})), {REFUSED},
            (scale.name, "float16"))


def base3_tensors(b: Bases) -> None:
    """A base-3 ternary tensor of three planes (`ternary5-g3`, format 1.3): other readings of its bytes are refused,
    naming it; the byte values no writer writes (243-255) are defined, and read as zeros."""
    add, d = b.add, b.base3
    key, scale = f"tensors/{d.name}", f"tensors/{d.name}.weight_scale"
    for value, words in [("ternary-g3", ("stored as",)), ("ternary5-g1", ("stored as",)), ("ternary5-g2", ("stored as",)),
                         ("ternary5-g4", ("unknown encoding",)), ("int8", ("datatype",))]:
        add(f"base3 attr/encoding={value}", "base-3 tensors", "base3", set_attr(key, "encoding", value), {REFUSED},
            (*words, d.name))
    add("base3 attr/shape one column wider", "base-3 tensors", "base3",
        set_attr(key, "shape", np.asarray([*d.shape[:-1], d.shape[-1] + 1])), {REFUSED}, ("shape", d.name))

    def bytes_past_242(f):
        data = f[key][...]
        data[:, :, :1] = 243 + np.arange(len(data))[:, None, None] % 13
        rewrite(f, key, data)

    add("base3 data/bytes 243-255", "base-3 tensors", "base3", h5edit(bytes_past_242), {INTACT}, same_data=False)

    def groups_of_32(f):  # halves of 64-column blocks: a group would start inside a byte
        halves = np.repeat(f[scale][...], 2, axis=-1)
        rewrite(f, scale, halves, {"shape": np.asarray(halves.shape)})

    add("base3 scale/groups of 32 columns", "base-3 tensors", "base3", h5edit(groups_of_32), {REFUSED},
        ("whole blocks of 64", d.name))


def json_documents(b: Bases) -> None:
    """JSON documents: valid containers (digests fixed) with contents the tools must refuse or tolerate."""
    add = b.add
    deep = "[" * 100_000 + "]" * 100_000

    def each_rope(**changes):
        return lambda d: {**d, "rope": {k: {**v, **changes} for k, v in d["rope"].items()}}

    for doc, label, change, expect, words in [
        ("model_config.json", "not JSON", lambda d: "{not json", {REFUSED}, ("model_config.json", "JSON")),
        ("model_config.json", "an array", lambda d: "[1, 2]", {REFUSED}, ("model_config.json", "object")),
        ("model_config.json", "nested 100000 deep", lambda d: deep, {REFUSED}, ("model_config.json",)),
        ("model_config.json", "not UTF-8", lambda d: b"\xff\xfe{}", {REFUSED}, ("model_config.json", "UTF-8")),
        ("model_config.json", "unknown field", updated(extra_field=1), {REFUSED}, ("extra_field",)),
        ("model_config.json", "no vocab_size", lambda d: {k: v for k, v in d.items() if k != "vocab_size"},
         {REFUSED}, ("model config",)),
        ("model_config.json", "hidden_size a string", updated(hidden_size="64"), {REFUSED}, ("hidden_size",)),
        ("model_config.json", "hidden_size true", updated(hidden_size=True), {REFUSED}, ("hidden_size",)),
        ("model_config.json", "vocab_size 10**15", updated(vocab_size=10**15), {REFUSED}, ("vocab_size",)),
        ("model_config.json", "vocab_size 2**70", updated(vocab_size=2**70), {REFUSED}, ("vocab_size",)),
        ("model_config.json", "num_layers 0", updated(num_layers=0), {REFUSED}, ("num_layers",)),
        ("model_config.json", "num_heads 3", updated(num_heads=3), {REFUSED}, ()),
        ("model_config.json", "rms_norm_eps a string", updated(rms_norm_eps="x"), {REFUSED}, ("rms_norm_eps",)),
        ("model_config.json", "rms_norm_eps NaN", updated(rms_norm_eps=float("nan")), {REFUSED}, ("rms_norm_eps",)),
        ("model_config.json", "softcapping a string", updated(final_logit_softcapping="x"), {REFUSED},
         ("final_logit_softcapping",)),
        ("model_config.json", "softcapping 0", updated(final_logit_softcapping=0), {REFUSED},
         ("final_logit_softcapping",)),
        ("model_config.json", "eos ids strings", updated(eos_token_ids=["a"]), {REFUSED}, ("eos_token_ids",)),
        ("model_config.json", "eos ids a number", updated(eos_token_ids=5), {REFUSED}, ("model config",)),
        ("model_config.json", "bos outside the vocabulary", updated(bos_token_id=10**6), {REFUSED}, ("bos_token_id",)),
        ("model_config.json", "bos a string", updated(bos_token_id="2"), {REFUSED}, ("bos_token_id",)),
        ("model_config.json", "k_eq_v a string", updated(k_eq_v="yes"), {REFUSED}, ("k_eq_v",)),
        ("model_config.json", "kv_sources across types", updated(kv_sources=[0] * 10), {REFUSED}, ("keys/values",)),
        ("model_config.json", "unknown layer type", updated(layer_types=["other"] * 10), {REFUSED}, ("other",)),
        ("model_config.json", "context of 1", updated(max_position_embeddings=1), {RUN_REFUSES}, ("context",)),
        ("model_config.json", "context of 2**62", updated(max_position_embeddings=2**62), {INTACT}, ()),
        ("model_config.json", "sliding window 10**8", updated(sliding_window=10**8), {INTACT}, ()),
        ("model_config.json", "sliding window 2**40", updated(sliding_window=2**40), {INTACT}, ()),
        ("model_config.json", "rope theta a string", each_rope(theta="x"), {REFUSED}, ("theta",)),
        ("model_config.json", "rope factor 0", each_rope(factor=0), {REFUSED}, ("factor",)),
        ("model_config.json", "rope partial factor 2", each_rope(partial_rotary_factor=2), {REFUSED},
         ("partial_rotary_factor",)),
        ("model_config.json", "rope unknown field", each_rope(surprise=1), {REFUSED}, ("model config",)),
        ("model_config.json", "rope an array", lambda d: {**d, "rope": []}, {REFUSED}, ("model config",)),
        ("generation_config.json", "an array", lambda d: "[]", {REFUSED}, ("generation_config.json", "object")),
        ("generation_config.json", "nested 100000 deep", lambda d: deep, {REFUSED}, ("generation_config.json",)),
        # every field the runtime reads is checked at open (format/documents.py): inspect refuses them too
        ("generation_config.json", "top_k -5", updated(do_sample=True, top_k=-5), {REFUSED}, ("top_k",)),
        ("generation_config.json", "temperature a string", updated(do_sample=True, temperature="hot"),
         {REFUSED}, ("temperature",)),
        ("generation_config.json", "repetition_penalty a string", updated(repetition_penalty="x"),
         {REFUSED}, ("repetition_penalty",)),
        ("generation_config.json", "unknown setting", updated(unknown_setting=[1, {"a": None}]), {INTACT}, ()),
        ("student_config.json", "null", lambda d: "null", {REFUSED}, ("student_config.json",)),
        ("student_config.json", "moe without its fields", updated(moe={"x": 1}), {INTACT, INSPECT_REFUSES}, ()),
        ("provenance.json", "nested 100000 deep", lambda d: deep, {REFUSED}, ("provenance.json",)),
        ("provenance.json", "command line a number", updated(command_line=5), {INTACT, INSPECT_REFUSES}, ()),
        ("tokenizer_config.json", "not JSON", lambda d: "{", {REFUSED}, ("tokenizer_config.json",)),
        ("tokenizer_config.json", "odd special tokens", updated(bos_token={"content": 5}, pad_token=[1]), {INTACT}, ()),
        ("tokenizer_config.json", "chat template a number", updated(chat_template=7), {REFUSED}, ("chat_template",)),
        ("tokenizer.json", "not JSON", lambda d: "{not json", {RUN_REFUSES}, ("tokenizer.json",)),
        ("tokenizer.json", "empty object", lambda d: "{}", {RUN_REFUSES}, ("tokenizer.json",)),
        ("tokenizer.json", "nested 100000 deep", lambda d: deep, {RUN_REFUSES}, ("tokenizer.json",)),
        ("tokenizer.json", "cut short", lambda d: json.dumps(d)[:5000], {RUN_REFUSES}, ("tokenizer.json",)),
    ]:
        add(f"json/{doc} {label}", "JSON documents", "ternary", h5edit(edit_json(doc, change)), expect, words)


def documents(b: Bases) -> None:
    """Documents missing or added."""
    add = b.add
    for doc, expect, words in [
        ("tokenizer.json", REFUSED, ("tokenizer.json", "missing")),
        ("model_config.json", REFUSED, ("model_config.json", "missing")),
        ("student_config.json", INTACT, ()),
        ("generation_config.json", INTACT, ()),
        ("provenance.json", INTACT, ()),
    ]:
        add(f"documents/without {doc}", "documents", "ternary",
            h5edit(lambda f, doc=doc: set_document(f, doc, None)), {expect}, words)
    add("documents/extra notes.txt", "documents", "ternary", h5edit(lambda f: set_document(f, "notes.txt", "hi")), {INTACT})
    config = json.dumps({"vocab_size": 1}).encode()
    for label, stored, words in [  # zlib documents (format 1.2): inflated within a bound, or refused by name
        ("inflates past the bound", zlib_bomb(MAX_DOCUMENT + 1), ("model_config.json", "inflates to more than")),
        ("cut short", zlib.compress(config)[:-3], ("model_config.json", "cut short")),
        ("bytes after the stream", zlib.compress(config) + b"\0", ("model_config.json", "bytes follow")),
        ("not a zlib stream", config, ("model_config.json", "damaged")),
    ]:
        add(f"documents/zlib {label}", "documents", "ternary",
            h5edit(lambda f, stored=stored: set_document(f, "model_config.json", stored, "zlib")), {REFUSED}, words)
    add("documents/zlib template inflates past its bound", "documents", "ternary",
        h5edit(lambda f: set_document(f, "chat_template.jinja", zlib_bomb(MAX_TEMPLATE + 1), "zlib")), {REFUSED},
        ("chat_template.jinja", "more than a chat template may have"))
    add("documents/extra future.json, not JSON", "documents", "ternary",
        h5edit(lambda f: set_document(f, "future.json", "{oops")), {INTACT})


def structure(b: Bases) -> None:
    """The structure of groups and links."""
    add, tensors, ternary, norm = b.add, b.tensors, b.ternary, b.norm
    other = tensors("ternary", lambda d: d.nbytes == norm.nbytes and d.name != norm.name)[0]

    def external_target(dst: Path) -> Path:
        side = dst.with_name("side.h5")
        with h5py.File(side, "w") as s:
            s["x"] = np.zeros(norm.shape, np.float32)
            s["x"].attrs.update({"encoding": "f32", "shape": np.asarray(norm.shape), "blake2b": "0" * 64})
        return side

    def with_external_link(src: Path, dst: Path) -> None:
        side = external_target(dst)
        h5edit(lambda f: (f["tensors"].__delitem__(norm.name),
                          f["tensors"].__setitem__(norm.name, h5py.ExternalLink(str(side), "/x"))))(src, dst)

    def with_external_meta(src: Path, dst: Path) -> None:
        side = dst.with_name("side.h5")
        shutil.copyfile(src, side)
        h5edit(lambda f: (f.__delitem__("meta"), f.__setitem__("meta", h5py.ExternalLink(str(side), "/meta"))))(src, dst)

    def add_extra_tensor(f):
        data = np.zeros(4, np.float32)
        ds = f["tensors"].create_dataset("layers.99.extra", data=data)
        ds.attrs.update({"encoding": "f32", "shape": np.asarray([4]), "blake2b": blake2b(data)})

    structure = [
        ("tensor missing", lambda f: f["tensors"].__delitem__(ternary.name), (ternary.name, "missing")),
        ("tensor extra", add_extra_tensor, ("layers.99.extra", "unexpected")),
        ("group in /tensors", lambda f: f["tensors"].create_group("sub"), ("sub", "not a dataset")),
        ("extra root group", lambda f: f.create_group("more"), ("/more", "unexpected")),
        ("extra root dataset", lambda f: f.create_dataset("more", data=[1]), ("/more", "unexpected")),
        ("no /tensors", lambda f: f.__delitem__("tensors"), ("/tensors", "missing")),
        ("no /meta", lambda f: f.__delitem__("meta"), ("/meta", "missing")),
        ("/tensors a dataset", lambda f: (f.__delitem__("tensors"), f.create_dataset("tensors", data=[1])),
         ("/tensors", "not a group")),
        ("soft link tensor", lambda f: (f["tensors"].__delitem__(norm.name),
                                        f["tensors"].__setitem__(norm.name, h5py.SoftLink(f"/tensors/{other.name}"))),
         (norm.name, "soft link")),
        ("dangling soft link", lambda f: f["tensors"].__setitem__("x", h5py.SoftLink("/nowhere")), ("soft link",)),
        ("soft link /meta", lambda f: (f.move("meta", "meta2"), f.__setitem__("meta", h5py.SoftLink("/meta2"))),
         ("unexpected",)),
        ("hard link alias", lambda f: (f["tensors"].__delitem__(norm.name),
                                       f["tensors"].__setitem__(norm.name, f[f"tensors/{other.name}"])),
         ("overlaps", norm.name)),
    ]
    for name, edit, words in structure:
        add(f"structure/{name}", "structure", "ternary", h5edit(edit), {REFUSED}, words,
            keep=name == "hard link alias")
    add("structure/external link tensor", "structure", "ternary", with_external_link, {REFUSED},
        (norm.name, "external link"), keep=True)
    add("structure/external link /meta", "structure", "ternary", with_external_meta, {REFUSED}, ("/meta", "external link"))


def storage_layouts(b: Bases) -> None:
    """Storage layouts other than contiguous raw bytes in this file."""
    add, ternary, norm, X, N = b.add, b.ternary, b.norm, b.X, b.N

    def compact(f):
        data, attrs = f[N][...], dict(f[N].attrs)
        del f[N]
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_layout(h5d.COMPACT)
        ds = f["tensors"].create_dataset(norm.name, data=data, dcpl=dcpl)
        ds.attrs.update(attrs)

    def external_storage(src: Path, dst: Path) -> None:
        side = dst.with_name("raw.bin")
        with h5py.File(src, "r") as f:
            side.write_bytes(f[N][...].tobytes())
        h5edit(lambda f: rewrite(f, N, external=[(str(side), 0, norm.nbytes)]))(src, dst)

    def virtual(f):
        attrs = dict(f[N].attrs)
        f.move(N, "tensors/source")
        layout_ = h5py.VirtualLayout(shape=norm.shape, dtype=np.float32)
        layout_[...] = h5py.VirtualSource(f["tensors/source"])
        f["tensors"].create_virtual_dataset(norm.name, layout_)
        f[N].attrs.update(attrs)
        del f["tensors/source"]

    def never_written(f):
        attrs = dict(f[N].attrs)
        del f[N]
        ds = f["tensors"].create_dataset(norm.name, shape=norm.shape, dtype=np.float32)
        ds.attrs.update(attrs)

    storage = [
        ("chunked", h5edit(lambda f: rewrite(f, X, chunks=(4, *ternary.stored_shape[1:]))), ("chunked",)),
        ("gzip", h5edit(lambda f: rewrite(f, X, compression="gzip")), ("chunked or filtered",)),
        ("shuffle", h5edit(lambda f: rewrite(f, N, shuffle=True)), ("chunked or filtered",)),
        ("fletcher32", h5edit(lambda f: rewrite(f, N, fletcher32=True)), ("chunked or filtered",)),
        ("resizable", h5edit(lambda f: rewrite(f, N, maxshape=(None,))), ("chunked",)),
        ("compact", h5edit(compact), ("compact",)),
        ("external storage", external_storage, ("external files",)),
        ("virtual dataset", h5edit(virtual), ("virtual",)),
        ("never written", h5edit(never_written), ("no data",)),
    ]
    for name, make, words in storage:
        target = ternary if name in ("chunked", "gzip") else norm
        add(f"storage/{name}", "storage layout", "ternary", make, {REFUSED}, (*words, target.name),
            keep=name in ("gzip", "external storage", "virtual dataset"))


def datatypes(b: Bases) -> None:
    """Datatypes other than the encoding's, same bytes or same values."""
    add, norm, bf16, I4, I4S, X, N, H = b.add, b.norm, b.bf16, b.I4, b.I4S, b.X, b.N, b.H

    def odd_float(f):
        data, attrs = f[N][...], dict(f[N].attrs)
        del f[N]
        tid = h5t.IEEE_F32LE.copy()
        tid.set_ebias(100)  # a 4-byte float numpy would read as float32, and is not
        ds = f["tensors"].create_dataset(norm.name, shape=norm.shape, dtype=h5py.Datatype(tid))
        ds.id.write(h5py.h5s.ALL, h5py.h5s.ALL, data.astype(np.float32), mtype=h5t.IEEE_F32LE)
        ds.attrs.update(attrs)

    dtypes = [
        ("f32 big-endian", "ternary", N, lambda f: rewrite(f, N, f[N][...].astype(">f4")), ("big-endian",)),
        ("f32 as f64", "ternary", N, lambda f: rewrite(f, N, f[N][...].astype("<f8")), ("datatype",)),
        ("f32 as int32", "ternary", N, lambda f: rewrite(f, N, f[N][...].view("<i4")), ("datatype",)),
        ("f32 as opaque", "ternary", N, lambda f: rewrite(f, N, f[N][...].view("V4")), ("datatype",)),
        ("f32 with another exponent bias", "ternary", N, odd_float, ("datatype",)),
        ("ternary as int8", "ternary", X, lambda f: rewrite(f, X, f[X][...].view("i1")), ("datatype",)),
        ("ternary as uint16", "ternary", X, lambda f: rewrite(f, X, f[X][...].view("<u2")), ("datatype",)),
        ("int8 as uint8", "ternary", H, lambda f: rewrite(f, H, f[H][...].view("u1")), ("datatype",)),
        ("document as int8", "ternary", "meta/model_config.json",
         lambda f: rewrite(f, "meta/model_config.json", f["meta/model_config.json"][...].view("i1")), ("datatype",)),
        ("document as a string", "ternary", "meta/model_config.json",
         lambda f: rewrite(f, "meta/model_config.json", document_text(f, "model_config.json")),
         ("model_config.json",)),
        ("bf16 as f16", "bf16", f"tensors/{bf16.name}",
         lambda f: rewrite(f, f"tensors/{bf16.name}", f[f"tensors/{bf16.name}"][...].view("<f2")), ("datatype",)),
        ("bf16 big-endian", "bf16", f"tensors/{bf16.name}",
         lambda f: rewrite(f, f"tensors/{bf16.name}", f[f"tensors/{bf16.name}"][...].astype(">u2")), ("big-endian",)),
    ]
    dtypes += [
        ("int4 as int8", "grouped", I4, lambda f: rewrite(f, I4, f[I4][...].view("i1")), ("datatype",)),
        ("int4 scale as f32", "grouped", I4S, lambda f: rewrite(f, I4S, f[I4S][...].astype("<f4")), ("datatype",)),
        ("int4 scale big-endian", "grouped", I4S, lambda f: rewrite(f, I4S, f[I4S][...].astype(">f2")), ("big-endian",)),
        ("int4 scale as bf16 bits", "grouped", I4S, lambda f: rewrite(f, I4S, f[I4S][...].view("<u2")), ("datatype",)),
    ]
    for name, base, target, edit, words in dtypes:
        add(f"dtype/{name}", "datatype", base, h5edit(edit), {REFUSED}, (*words, target.split("/", 1)[1]),
            keep=name == "f32 big-endian")


def dataspaces(b: Bases) -> None:
    """Shapes: dataspaces that do not fit the shape attribute, or the config."""
    add, ternary, norm, X, N = b.add, b.ternary, b.norm, b.X, b.N
    shapes = [
        ("norm one shorter", lambda f: rewrite(f, N, f[N][:-1], {"shape": np.asarray([norm.shape[0] - 1])}),
         ("shape",)),
        ("matrix 3-D", lambda f: rewrite(f, X, f[X][...][..., None], {"shape": np.asarray([*ternary.shape[:-1], ternary.stored_shape[-1], 1])}),
         ("shape",)),
        ("scalar dataspace", lambda f: rewrite(f, N, np.float32(1.0)), ("scalar",)),
        ("null dataspace", lambda f: rewrite(f, N, h5py.Empty("<f4")), ("scalar or null",)),
        ("zero rows", lambda f: rewrite(f, X, np.zeros((0, ternary.stored_shape[1]), np.uint8)), ("empty",)),
        ("document 2-D", lambda f: rewrite(f, "meta/model_config.json", f["meta/model_config.json"][...][None, :]),
         ("model_config.json", "dimensions")),
    ]
    for name, edit, words in shapes:
        add(f"shape/{name}", "dataspace", "ternary", h5edit(edit), {REFUSED}, words)


def layout_patches(b: Bases) -> None:
    """The layout message patched in place: data addresses that alias, overlap or leave the file."""
    add, tensors, size, bases, norm = b.add, b.tensors, b.size, b.paths, b.norm
    alias_a, alias_b = [d for d in tensors("ternary") if d.nbytes == norm.nbytes][:2]
    with h5py.File(bases["ternary"], "r") as f:
        root_header = h5py.h5o.get_info(f.id).addr
    big = max(tensors("ternary"), key=lambda d: d.nbytes)
    for name, target, value, words in [
        ("alias another dataset", alias_b, alias_a.offset, ("overlaps",)),
        ("overlap part of another", norm, big.offset + 4096, ("overlaps",)),
        ("overlap its own object header", norm, norm.header, ("overlaps HDF5 metadata",)),
        ("overlap the root object header", norm, root_header, ("overlaps HDF5 metadata",)),
        ("address 0", norm, 0, ()),
        ("superblock", norm, 64, ("superblock",)),
        ("past the end", norm, size["ternary"] - 64, ()),  # HDF5 2.0 refuses these itself: "invalid dataset size"
        ("far past the end", norm, 2**62, ()),
        ("misaligned", norm, norm.offset + 8, ("misaligned",)),
        ("undefined address", norm, 2**64 - 1, ("no data",)),
    ]:
        def fn(data, out, target=target, value=value):
            at = layout_message(data, target)
            out[at : at + 8] = struct.pack("<Q", value)

        add(f"layout/{name}", "layout patch", "ternary", patched(fn), {REFUSED}, (*words, target.name),
            keep=name == "alias another dataset")


def declared_shapes(b: Bases) -> None:
    """Declared shapes patched in place: dataspace and layout size together, up to absurd."""
    add, ternary = b.add, b.ternary
    for factor in (2, 1 << 20, 1 << 40):
        def fn(data, out, factor=factor, d=ternary):
            rank = f"<{len(d.stored_shape)}Q"  # the dataspace's dimensions, then its maximum dimensions
            dims = struct.pack(rank, *d.stored_shape)
            at = find_once(data, dims + dims, d.header, d.header + 4096)
            new = struct.pack(rank, d.stored_shape[0] * factor, *d.stored_shape[1:])
            out[at : at + 2 * len(new)] = new + new
            size_at = layout_message(data, d) + 8
            out[size_at : size_at + 8] = struct.pack("<Q", d.nbytes * factor)

        add(f"declared shape/x{factor}", "layout patch", "ternary", patched(fn), {REFUSED}, (ternary.name,))

    def size_only(data, out, d=ternary):
        at = layout_message(data, d) + 8
        out[at : at + 8] = struct.pack("<Q", d.nbytes * 2)

    add("declared shape/layout size only", "layout patch", "ternary", patched(size_only), {REFUSED}, (ternary.name,))


FAMILIES = (not_artifacts, truncations, extensions, superblock_flips, metadata_flips, data_flips, attribute_text,
            root_attributes, dataset_attributes, grouped_table_attributes, base3_tensors, json_documents, documents, structure,
            storage_layouts, datatypes, dataspaces, layout_patches, declared_shapes)
