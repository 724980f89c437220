"""Hostile GGUF files and checkpoint folders (class 8 of issue 13): every count and length is checked
against the file before anything is allocated, only regular files are read, and symbolic links are
followed only inside the model folder (or a Hugging Face cache snapshot's blobs). Each conversion runs
as a user runs it, under a timeout and a memory limit: one line naming the file, exit 1, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from conftest import FIXTURES
from ferrisres.format.writer import partial_files
from hostile import ran, refused, run_boxed
from test_gguf import write_gguf

CONVERT = "ferrisres-convert"


def _convert_refused(source: Path, tmp_path: Path, *fragments: str) -> str:
    out = tmp_path / "out.tern"
    line = refused(run_boxed(CONVERT, str(source), "-o", str(out), "--quiet", timeout=60), *fragments)
    assert not out.exists() and partial_files(out) == []
    return line


# ---- GGUF: counts and lengths against the file ----

def _gguf(n_kv: int, n_tensors: int = 0, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


def _key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


@pytest.mark.parametrize("data, fragment", [
    (_gguf(10**12, body=b"\0" * 1000), "1000000000000 metadata entries"),  # looped and grew without bound
    (_gguf(1, n_tensors=10**15, body=b"\0" * 1000), "cannot fit in the file"),
    (_gguf(1, body=struct.pack("<Q", 10**15) + b"\0" * 1000), "the key of metadata entry 0 needs"),
    (_gguf(1, body=_key(b"k") + struct.pack("<IQ", 8, 10**15) + b"\0" * 1000), "metadata entry 0 needs"),
    (_gguf(1, body=_key(b"k") + struct.pack("<IIQ", 9, 8, 10**12) + b"\0" * 1000), "declares 1000000000000 strings"),
    (_gguf(1, body=_key(b"k") + struct.pack("<IIQ", 9, 4, 10**12) + b"\0" * 1000), "metadata entry 0 needs"),
    (_gguf(1, body=_key(b"k") + struct.pack("<IIQ", 9, 9, 3) + b"\0" * 1000), "is an array of type 9"),
    (_gguf(1, body=_key(b"k") + struct.pack("<I", 77) + b"\0" * 1000), "unknown value type 77"),
    (_gguf(0, 1, _key(b"t") + struct.pack("<I", 100) + b"\0" * 1000), "tensor 0 has 100 dimensions"),
    (_gguf(0, 1, _key(b"t") + struct.pack("<IQQIQ", 2, 2**40, 2**40, 0, 0) + b"\0" * 1000), "the file cannot hold"),
    (_gguf(0, 1, _key(b"t") + struct.pack("<IQIQ", 1, 4, 999, 0) + b"\0" * 1000), "unknown type 999"),
    (_gguf(0, 1, _key(b"t") + struct.pack("<IQIQ", 1, 32, 0, 10**12) + b"\0" * 1000), "lies outside the file"),
    (b"GGUF" + struct.pack("<I", 99) + b"\0" * 100, "version 99"),
], ids=["kv-count", "tensor-count", "key-length", "string-length", "string-array", "u32-array", "nested-array",
        "value-type", "tensor-dims", "tensor-size", "tensor-type", "tensor-offset", "version"])
def test_gguf_counts_and_lengths_are_checked_against_the_file(tmp_path, data, fragment):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    _convert_refused(path, tmp_path, str(path), "is not a valid GGUF file", fragment)


@pytest.mark.parametrize("metadata, fragment", [
    ({"block_count": 10**9}, "block_count 1000000000 is not in [1, 1024]"),  # exhausted memory
    ({"embedding_length": 2**31}, "hidden_size"),
    ({"attention.layer_norm_rms_epsilon": float("nan")}, "rms_norm_eps"),
], ids=["layers", "hidden", "eps-nan"])
def test_gguf_values_that_size_the_model_are_bounded(tmp_path, metadata, fragment):
    path = tmp_path / "big.gguf"
    write_gguf(path, metadata=metadata)
    _convert_refused(path, tmp_path, fragment)


# ---- checkpoint folders: what is read, and where links lead ----

@pytest.fixture
def folder(tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny_gemma4", out)
    return out


def test_a_fifo_named_model_safetensors_is_refused_not_waited_on(folder, tmp_path):
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    _convert_refused(folder, tmp_path, "model.safetensors is not a regular file")


def test_a_fifo_among_the_shards_is_refused(folder, tmp_path):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    os.mkfifo(folder / "extra.safetensors")
    _convert_refused(folder, tmp_path, "extra.safetensors is not a regular file")


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "config.json", "tokenizer.json"])
def test_a_link_leaving_the_model_folder_is_refused(folder, tmp_path, name):
    outside = tmp_path / "secret.txt"
    outside.write_text("{}")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(outside)
    _convert_refused(folder, tmp_path, f"{folder / name} is a symbolic link to {outside}, outside the model folder")


def test_a_directory_named_like_a_document_is_refused(folder, tmp_path):
    (folder / "chat_template.jinja").mkdir()
    _convert_refused(folder, tmp_path, "chat_template.jinja is not a regular file")


def test_links_inside_the_folder_and_into_a_hub_cache_blobs_folder_are_followed(tmp_path):
    """As the Hugging Face hub lays out its cache: snapshots/<revision>/file -> ../../blobs/<hash>."""
    repo = tmp_path / "models--tiny--gemma4"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, source in enumerate(sorted((FIXTURES / "tiny_gemma4").iterdir())):
        shutil.copyfile(source, blobs / f"blob{i}")
        (snapshot / source.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    (snapshot / "sub").mkdir()
    shutil.copyfile(snapshot / "tokenizer_config.json", snapshot / "sub" / "tokenizer_config.json")
    (snapshot / "tokenizer_config.json").unlink()
    (snapshot / "tokenizer_config.json").symlink_to(Path("sub", "tokenizer_config.json"))
    ran(run_boxed(CONVERT, str(snapshot), "-o", str(tmp_path / "out.tern"), "--quiet"))


# ---- safetensors headers ----

def _with_header(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    new = json.dumps(change(header)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


FIRST = "model.language_model.embed_tokens.weight"


def _entry(**changes):
    def change(header):
        name = next(k for k in header if k != "__metadata__")
        header[name] = {**header[name], **changes}
        return header
    return change


@pytest.mark.parametrize("change, fragment", [
    (_entry(data_offsets=[0, 10**18]), "lies outside the file"),
    (_entry(data_offsets=[-8, 0]), "corrupt header entry"),
    (_entry(data_offsets=["0", "8"]), "corrupt header entry"),
    (_entry(data_offsets=[1.5, 8]), "corrupt header entry"),
    (_entry(data_offsets=[16, 8]), "lies outside the file"),
    (_entry(data_offsets=[0]), "corrupt header entry"),
    (_entry(dtype=["F32"]), "corrupt header entry"),
    (_entry(dtype="F8_E4M3"), "dtype F8_E4M3"),
    (_entry(shape=[-1, 64]), "corrupt header entry"),
    (_entry(shape=[10**30, 10**30]), "lies outside the file"),
    (_entry(shape="big"), "corrupt header entry"),
    (lambda h: {**h, "__metadata__": [1]}, ""),  # ignored, as safetensors ignores it: must not crash either way
    (lambda h: {k: 5 for k in h}, "corrupt header entry"),
    (lambda h: [1, 2], "corrupt safetensors header"),
    (lambda h: {k: {**v, "data_offsets": [0, v["data_offsets"][1] - v["data_offsets"][0]]} if k != "__metadata__"
                else v for k, v in h.items()}, "overlap"),
], ids=["offset-huge", "offset-negative", "offset-string", "offset-float", "offset-reversed", "offset-short",
        "dtype-list", "dtype-unknown", "shape-negative", "shape-huge", "shape-string", "metadata-list",
        "entry-not-object", "header-list", "overlap"])
def test_malformed_safetensors_headers_are_one_line(folder, tmp_path, change, fragment):
    _with_header(folder, change)
    out = tmp_path / "out.tern"
    run = run_boxed(CONVERT, str(folder), "-o", str(out), "--quiet", timeout=60)
    if change is not None and fragment == "":
        assert run.returncode in (0, 1) and "Traceback" not in run.stderr, run.stderr
        return
    refused(run, fragment)
    assert not out.exists()


DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors.index.json",
                                  "tokenizer_config.json", "tokenizer.json"])
def test_json_nested_beyond_the_parser_is_one_line(folder, tmp_path, name):
    (folder / name).write_text(DEEP)  # a RecursionError traceback before
    _convert_refused(folder, tmp_path, name)


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/hostname", "sub/model.safetensors", ".."])
def test_an_index_naming_files_outside_the_folder_is_refused(folder, tmp_path, shard):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    _convert_refused(folder, tmp_path, "model.safetensors.index.json names", "which is not a file name in")


def test_a_deeply_nested_safetensors_header_is_one_line(folder, tmp_path):
    header = (DEEP + " " * (-len(DEEP) % 8)).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    _convert_refused(folder, tmp_path, "corrupt safetensors header")


def test_a_gguf_vocabulary_piece_of_a_megabyte_is_refused_in_bounded_time(tmp_path):
    """Merges are found by splitting every piece at every position: one huge piece took for ever."""
    import test_gguf

    path = tmp_path / "long-piece.gguf"
    tokens = list(test_gguf.TOKENS)
    tokens[-1] = "x" * (1 << 20)
    original = test_gguf.TOKENS
    test_gguf.TOKENS = tokens
    try:
        write_gguf(path)
    finally:
        test_gguf.TOKENS = original
    _convert_refused(path, tmp_path, "tokenizer.ggml.tokens must be strings of at most 256 characters")
