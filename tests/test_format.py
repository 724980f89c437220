"""Unit tests of the `.tern` format package: encodings, writer, reader, verification, model config."""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from ferrisres.format import (
    ENCODINGS, FORMAT_VERSION, FULL, SLIDING, Artifact, ArtifactError, ArtifactWriter, ModelConfig, bf16_to_f32, f32_to_bf16,
    pack_ternary, ternary_lut, unpack_ternary,
)
from ferrisres.format.compression import compress, decompress
from ferrisres.format.encodings import base3_lut, pack_base3, unpack_base3
from ferrisres.format.spec import digest
from ferrisres.format.tables import pack_table_rows

ALIGNMENT = 4096  # SPEC: every dataset's data starts on a multiple of this


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------------------
# ternary packing


@pytest.mark.parametrize("n_in", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 64, 65, 66, 67])
@pytest.mark.parametrize("n_out", [1, 3])
def test_pack_unpack_round_trip(n_out, n_in):
    rng = np.random.default_rng(1000 * n_out + n_in)
    t = rng.integers(-1, 2, size=(n_out, n_in)).astype(np.int8)

    packed = pack_ternary(t)

    assert packed.dtype == np.uint8
    assert packed.shape == (n_out, (n_in + 3) // 4)
    codes = (packed[..., None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    assert not (codes == 3).any(), "a packed byte holds the invalid code 0b11"
    np.testing.assert_array_equal(unpack_ternary(packed, n_in), t.astype(np.float32))
    # padding of a short last byte: zero codes (0b01)
    codes = codes.reshape(n_out, -1)
    assert (codes[:, n_in:] == 0b01).all()


def test_pack_ternary_layout_by_hand():
    # codes: -1 -> 00, 0 -> 01, +1 -> 10; byte j holds columns 4j..4j+3, lowest bits first
    t = np.array(
        [
            [-1, 0, 1, 0, 1, 1, -1, 0],  # 0b01_10_01_00 = 0x64, 0b01_00_10_10 = 0x4A
            [1, 0, 0, 0, 0, 0, 0, -1],  # 0b01_01_01_10 = 0x56, 0b00_01_01_01 = 0x15
            [-1, -1, -1, -1, 1, 1, 1, 1],  # 0x00, 0b10_10_10_10 = 0xAA
        ],
        dtype=np.int8,
    )
    np.testing.assert_array_equal(pack_ternary(t), np.array([[0x64, 0x4A], [0x56, 0x15], [0x00, 0xAA]], dtype=np.uint8))


def test_pack_ternary_pads_short_row_with_zero_codes():
    # 5 columns: byte 0 = [+1, -1, -1, -1] = 0b00_00_00_10; byte 1 = [+1, pad, pad, pad] = 0b01_01_01_10
    t = np.array([[1, -1, -1, -1, 1]], dtype=np.int8)
    np.testing.assert_array_equal(pack_ternary(t), np.array([[0x02, 0x56]], dtype=np.uint8))


def test_unpack_by_hand_and_invalid_code_reads_as_zero():
    # 0xE4 = 0b11_10_01_00: columns -1, 0, +1, and an invalid 0b11 that must read as 0
    np.testing.assert_array_equal(unpack_ternary(np.array([[0xE4]], np.uint8), 4), [[-1, 0, 1, 0]])
    np.testing.assert_array_equal(unpack_ternary(np.array([[0xFF, 0x03]], np.uint8), 5), [[0, 0, 0, 0, 0]])
    lut = ternary_lut()
    assert lut.shape == (256, 4) and lut.dtype == np.float32
    np.testing.assert_array_equal(lut[0xFF], [0, 0, 0, 0])
    np.testing.assert_array_equal(lut[0x64], [-1, 0, 1, 0])


# ---------------------------------------------------------------------------------------------------------
# bfloat16


def _bits(u32: int) -> np.ndarray:
    return np.array([u32], dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize(
    "f32_bits, bf16_bits",
    [
        (0x3F800000, 0x3F80),  # 1.0
        (0x3F808000, 0x3F80),  # 1 + 2^-8: exactly halfway between 0x3F80 and 0x3F81 -> even 0x3F80
        (0x3F818000, 0x3F82),  # halfway between 0x3F81 and 0x3F82 -> even 0x3F82
        (0x3F808001, 0x3F81),  # just above halfway -> up
        (0x3F807FFF, 0x3F80),  # just below halfway -> down
        (0xBF818000, 0xBF82),  # negative tie -> even magnitude
        (0x40490FDB, 0x4049),  # pi -> 3.140625
        (0x3F7FFFFF, 0x3F80),  # rounding carries into the exponent: 0.99999994 -> 1.0
        (0x00000000, 0x0000),  # +0
        (0x80000000, 0x8000),  # -0
        (0x7F800000, 0x7F80),  # +inf
        (0xFF800000, 0xFF80),  # -inf
        (0x7F7FFFFF, 0x7F80),  # float32 max is past bf16 max + half an ulp: overflows to inf
        (0x00018000, 0x0002),  # subnormal tie -> even
    ],
)
def test_f32_to_bf16_by_hand(f32_bits, bf16_bits):
    assert int(f32_to_bf16(_bits(f32_bits))[0]) == bf16_bits


def test_f32_to_bf16_nan_stays_nan():
    out = f32_to_bf16(np.array([np.nan, 1.0, -np.nan], dtype=np.float32))
    assert out.dtype == np.uint16
    assert np.isnan(bf16_to_f32(out[[0, 2]])).all()
    assert out[1] == 0x3F80


def test_f32_to_bf16_is_round_to_nearest_even():
    """Against an independent reference: pick the nearer of the two bf16 neighbours, ties to even."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([bits, (bits & 0xFFFF0000) | 0x8000])  # plenty of exact ties
    x = bits.view(np.float32)
    keep = np.isfinite(x) & ((bits & 0x7FFFFFFF) <= 0x7F7F0000)  # finite and not past bf16's max
    bits, x = bits[keep], x[keep]

    lo = (bits >> 16).astype(np.uint32)  # truncation: the neighbour nearer zero
    hi = lo + 1  # the neighbour farther from zero (sign-magnitude)
    lo_val = (lo << 16).view(np.float32).astype(np.float64)
    hi_val = (hi << 16).view(np.float32).astype(np.float64)
    xd = x.astype(np.float64)
    d_lo, d_hi = np.abs(xd - lo_val), np.abs(hi_val - xd)
    expected = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))

    np.testing.assert_array_equal(f32_to_bf16(x), expected.astype(np.uint16))


def test_bf16_to_f32_is_exact():
    u = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    f = bf16_to_f32(u)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f.view(np.uint32), u.astype(np.uint32) << 16)  # bit for bit, NaNs too
    finite_or_inf = ~np.isnan(f)
    np.testing.assert_array_equal(f32_to_bf16(f[finite_or_inf]), u[finite_or_inf])  # and back
    assert bf16_to_f32(np.array([0x3F80, 0xC049], np.uint16)).tolist() == [1.0, -3.140625]


# ---------------------------------------------------------------------------------------------------------
# writer and reader


@pytest.fixture
def written(tmp_path):
    """An artifact with one tensor of every kind; returns (path, what was written)."""
    rng = np.random.default_rng(3)
    codes = rng.integers(-1, 2, size=(5, 7)).astype(np.int8)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    bf16 = f32_to_bf16(rng.standard_normal((4, 6)).astype(np.float32))
    int8 = rng.integers(-127, 128, size=(7, 3)).astype(np.int8)
    norm = rng.standard_normal(9).astype(np.float32)
    rows = rng.standard_normal((10, 4)).astype(np.float32)
    int4 = rng.integers(-8, 8, size=(2, 33))
    int6 = rng.integers(-32, 32, size=(2, 33))
    docs = {"notes.txt": "héllo ✓ — ünïcode\n", "config.json": {"b": [1, 2.5, None], "a": "ü"}}
    tensors = {
        "w.f32": ("f32", f32, f32.shape, f32),
        "w.bf16": ("bf16", bf16, bf16.shape, bf16),
        "w.int8": ("int8", int8, int8.shape, int8),
        "w.ternary": ("ternary", pack_ternary(codes), (5, 7), pack_ternary(codes)),
        "w.int4": ("int4-g32", pack_table_rows(int4, "int4-g32"), (2, 33), pack_table_rows(int4, "int4-g32")),
        "w.int6": ("int6-g32", pack_table_rows(int6, "int6-g32"), (2, 33), pack_table_rows(int6, "int6-g32")),
        "norm": ("f32", norm, norm.shape, norm),
    }
    path = tmp_path / "out" / "model.tern"
    path.parent.mkdir()
    with ArtifactWriter(path) as w:
        for name, text in docs.items():
            w.add_document(name, text)
        for name, (encoding, data, shape, _) in tensors.items():
            w.add_tensor(name, data, encoding, shape=shape)
        w.add_tensor_rows("rows", (rows[i : i + 3] for i in range(0, 10, 3)), rows.shape, "f32")
    tensors["rows"] = ("f32", rows, rows.shape, rows)
    return path, tensors, docs, codes


def test_round_trip(written):
    path, tensors, docs, codes = written
    assert files_in(path.parent) == ["model.tern"], "temporary files left beside the artifact"
    with Artifact.open(path, check_model=False) as a:
        assert a.version == FORMAT_VERSION
        assert set(a.tensors) == set(tensors)
        for name, (encoding, _, shape, stored) in tensors.items():
            info = a.tensors[name]
            assert info.encoding == encoding
            assert info.shape == tuple(shape)
            assert info.stored_shape == stored.shape
            assert info.nbytes == stored.nbytes
            data = a.tensor(name)
            assert data.dtype == ENCODINGS[encoding]
            np.testing.assert_array_equal(data, stored)
        np.testing.assert_array_equal(unpack_ternary(a.tensor("w.ternary"), 7), codes)
        assert a.tensors["w.ternary"].stored_shape == (5, 2)
        assert a.tensors["w.int4"].stored_shape == (2, 32)  # 33 values: two whole groups of 32, two per byte
        assert a.tensors["w.int6"].stored_shape == (2, 96)  # padded to 128 values, four per three bytes
        assert set(a.documents) == set(docs)
        assert a.document("notes.txt") == docs["notes.txt"]
        assert json.loads(a.document("config.json")) == docs["config.json"]
        with pytest.raises(ArtifactError, match="nope"):
            a.tensor("nope")
        with pytest.raises(ArtifactError, match="nope"):
            a.document("nope")


def test_every_dataset_is_aligned_and_inside_the_file(written):
    path = written[0]
    size = path.stat().st_size
    with Artifact.open(path, check_model=False) as a:
        infos = [*a.tensors.values(), *a.documents.values()]
        assert len(infos) == 10
        spans = []
        for info in infos:
            assert info.offset % ALIGNMENT == 0, f"{info.name} at offset {info.offset}"
            assert info.offset + info.nbytes <= size
            spans.append((info.offset, info.offset + info.nbytes))
        spans.sort()
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "datasets overlap"


def test_views_are_zero_copy_and_read_only(written):
    path = written[0]
    raw = path.read_bytes()
    with Artifact.open(path, check_model=False) as a:
        info = a.tensors["w.f32"]
        first, second = a.tensor("w.f32"), a.tensor("w.f32")
        assert np.shares_memory(first, second)
        assert not first.flags.writeable
        with pytest.raises(ValueError):
            first[0, 0] = 1.0
        base = first
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, memoryview):  # np.frombuffer keeps a memoryview of the buffer it wraps
            base = base.obj
        assert isinstance(base, mmap.mmap), f"the view is not backed by the memory map but by {type(base)}"
        # the view is exactly the bytes at the recorded offset
        assert first.tobytes() == raw[info.offset : info.offset + info.nbytes]


def test_writer_aborted_by_an_exception_leaves_nothing(tmp_path):
    path = tmp_path / "model.tern"
    with pytest.raises(RuntimeError, match="boom"):
        with ArtifactWriter(path) as w:
            w.add_document("a.json", {"x": 1})
            w.add_tensor("t", np.ones((4, 4), np.float32), "f32")
            partial = [n for n in files_in(tmp_path) if n.endswith(".partial")]
            assert len(partial) == 1 and not path.exists(), "writes must go to a temporary file"
            raise RuntimeError("boom")
    assert files_in(tmp_path) == []


def test_writer_failing_on_bad_data_leaves_nothing(tmp_path):
    path = tmp_path / "model.tern"
    with pytest.raises(ArtifactError):
        with ArtifactWriter(path) as w:
            w.add_tensor("t", np.ones((4, 4), np.float32), "f32")
            w.add_tensor("t", np.ones((4, 4), np.float32), "f32")  # written twice
    assert files_in(tmp_path) == []
    with pytest.raises(ArtifactError):
        with ArtifactWriter(path) as w:
            w.add_tensor("t", np.ones((4, 4), np.float64), "f32")  # dtype does not match the encoding
    assert files_in(tmp_path) == []


def test_aborted_overwrite_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.tern"
    path.write_bytes(b"old artifact")
    with pytest.raises(RuntimeError):
        with ArtifactWriter(path, overwrite=True) as w:
            w.add_tensor("t", np.ones((4, 4), np.float32), "f32")
            raise RuntimeError("boom")
    assert files_in(tmp_path) == ["model.tern"]
    assert path.read_bytes() == b"old artifact"


def test_writer_refuses_existing_path_unless_overwrite(tmp_path):
    path = tmp_path / "model.tern"
    path.write_bytes(b"old artifact")
    with pytest.raises(ArtifactError, match="exists"):
        ArtifactWriter(path)
    assert path.read_bytes() == b"old artifact"
    assert files_in(tmp_path) == ["model.tern"]

    with ArtifactWriter(path, overwrite=True) as w:
        w.add_tensor("t", np.full((2, 3), 7, np.float32), "f32")
    assert files_in(tmp_path) == ["model.tern"]
    with Artifact.open(path, check_model=False) as a:
        np.testing.assert_array_equal(a.tensor("t"), np.full((2, 3), 7, np.float32))


def test_writer_refuses_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        ArtifactWriter(tmp_path / "missing" / "model.tern")
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# verify


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_verify_intact(written):
    with Artifact.open(written[0], check_model=False) as a:
        assert a.verify() == []


@pytest.mark.parametrize("name", ["w.f32", "w.ternary", "rows", "norm"])
def test_verify_names_exactly_the_flipped_tensor(written, name):
    path = written[0]
    with Artifact.open(path, check_model=False) as a:
        info = a.tensors[name]
    _flip_byte(path, info.offset + info.nbytes // 2)
    with Artifact.open(path, check_model=False) as a:
        assert a.verify() == [f"tensors/{name}"]


def test_verify_names_a_flipped_document(written):
    path = written[0]
    with Artifact.open(path, check_model=False) as a:
        info = a.documents["config.json"]
    _flip_byte(path, info.offset)
    with Artifact.open(path, check_model=False) as a:
        assert a.verify() == ["meta/config.json"]


def test_copy_in_another_folder_verifies(written, tmp_path):
    path, tensors = written[0], written[1]
    other = tmp_path / "elsewhere" / "renamed.tern"
    other.parent.mkdir()
    shutil.copy(path, other)
    with Artifact.open(other, check_model=False) as a:
        assert a.verify() == []
        for name, (_, _, _, stored) in tensors.items():
            np.testing.assert_array_equal(a.tensor(name), stored)


def test_converted_artifact_verifies_and_is_aligned(converted):
    with Artifact.open(converted("tiny_gemma4")) as a:
        assert a.verify() == []
        assert all(i.offset % ALIGNMENT == 0 for i in [*a.tensors.values(), *a.documents.values()])


# ---------------------------------------------------------------------------------------------------------
# model config


def config_dict() -> dict:
    rope = {"theta": 10000.0, "partial_rotary_factor": 1.0, "factor": 1.0}
    return {
        "vocab_size": 512, "hidden_size": 64, "num_layers": 3, "num_heads": 2,
        "layer_types": [SLIDING, FULL, SLIDING], "head_dims": [16, 32, 16], "kv_heads": [1, 1, 1],
        "intermediate_sizes": [128, 128, 256], "kv_sources": [0, 1, 0], "k_eq_v": False, "sliding_window": 8,
        "rope": {SLIDING: {"rope_type": "default", **rope}, FULL: {**rope, "rope_type": "proportional", "partial_rotary_factor": 0.25}},
        "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0, "ple_dim": 8, "ple_vocab_size": 512,
        "max_position_embeddings": 1024, "bos_token_id": 2, "eos_token_ids": [1, 106], "pad_token_id": 0,
        "architecture": "gemma4_text", "activation": "gelu_pytorch_tanh",
    }


def test_model_config_round_trip():
    c = ModelConfig.from_json(json.dumps(config_dict()))
    assert c.num_layers == 3 and c.head_dims == (16, 32, 16) and c.kv_sources == (0, 1, 0)
    assert c.rope[FULL].partial_rotary_factor == 0.25
    assert not c.has_own_kv(2) and c.is_full(1)
    assert ModelConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '"a string"', "42", "{\"vocab_size\": 512,}"])
def test_model_config_rejects_malformed_json(text):
    with pytest.raises(ArtifactError, match="model config"):
        ModelConfig.from_json(text)


def _changed(**changes) -> str:
    d = config_dict()
    d.update(changes)
    return json.dumps(d)


def _without(key: str) -> str:
    d = config_dict()
    del d[key]
    return json.dumps(d)


@pytest.mark.parametrize(
    "text, named",
    [
        (_changed(head_dims=[16, 32]), "head_dims"),
        (_changed(kv_heads=[1, 1, 1, 1]), "kv_heads"),
        (_changed(layer_types=[SLIDING, FULL]), "layer_types"),
        (_changed(intermediate_sizes=[]), "intermediate_sizes"),
        (_changed(kv_sources=[0, 1]), "kv_sources"),
        (_changed(num_layers=4), "4 layers"),
        (_changed(layer_types=[SLIDING, "global", SLIDING]), "global"),
        (_changed(kv_sources=[0, 1, 1]), "layer 2"),  # a sliding layer cannot share a full layer's KV
        (_changed(kv_sources=[0, 2, 0]), "layer 1"),  # a source must not come later
        (_changed(kv_heads=[1, 3, 1]), "layer 1"),  # 2 heads not divisible by 3
        (_changed(kv_heads=[1, 0, 1]), "layer 1"),  # zero kv heads
        (_changed(rope={SLIDING: config_dict()["rope"][SLIDING]}), FULL),
        (_changed(extra_field=1), "extra_field"),
        (_without("vocab_size"), "vocab_size"),
        (_changed(head_dims=16), "model config"),
        (_changed(rope={SLIDING: 5, FULL: 5}), "model config"),
        (_changed(architecture="llama"), "llama"),
    ],
    ids=[
        "short-head_dims", "long-kv_heads", "short-layer_types", "empty-intermediate_sizes", "short-kv_sources",
        "num_layers-mismatch", "unknown-layer-type", "kv-source-of-other-type", "kv-source-later-layer",
        "heads-not-divisible", "zero-kv-heads", "rope-missing-for-type", "unknown-field", "missing-field",
        "list-is-a-number", "rope-not-objects", "other-architecture",
    ],
)
def test_model_config_rejects_inconsistent_config(text, named):
    with pytest.raises(ArtifactError) as e:
        ModelConfig.from_json(text)
    assert named in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# base-3 ternary packing (format 1.2)


@pytest.mark.parametrize("n_in", [1, 4, 5, 6, 63, 64, 65, 69, 70, 128, 130, 1536])
def test_base3_pack_unpack_round_trip(n_in):
    rng = np.random.default_rng(n_in)
    t = rng.integers(-1, 2, size=(3, n_in)).astype(np.int8)
    packed = pack_base3(t)
    # 13 bytes per whole block of 64 codes, then 5 codes a byte: 1.625 bits per code where 2-bit takes 2
    assert packed.dtype == np.uint8 and packed.shape == (3, n_in // 64 * 13 + -(-(n_in % 64) // 5))
    assert packed.max() < 243, "a written byte is a 5-digit base-3 number"
    np.testing.assert_array_equal(unpack_base3(packed, n_in), t.astype(np.float32))
    digits = packed[..., None] // 3 ** np.arange(5) % 3
    used = np.zeros(digits.size // 3, bool)
    used[np.arange(n_in) + np.arange(n_in) // 64] = True  # slot 5j + k of code k of byte j
    assert (digits.reshape(3, -1)[:, ~used] == 1).all(), "unused slots (one per block, the row's tail) hold zeros"


def test_base3_layout_by_hand():
    # digit t + 1, slot k weighs 3^k: [+1, 0, -1, +1, -1] -> 2 + 1*3 + 0*9 + 2*27 + 0*81 = 59 (SPEC.md's example)
    np.testing.assert_array_equal(pack_base3(np.array([[1, 0, -1, 1, -1]])), [[59]])
    # 65 columns: block 0 (64 codes + an unused zero slot) in bytes 0-12, column 64 alone in byte 13
    t = np.zeros((1, 65), np.int8)
    t[0, 63], t[0, 64] = 1, -1  # slot 63 = byte 12, digit 3 (27); slot 65 = byte 13, digit 0
    packed = pack_base3(t)
    assert packed.shape == (1, 14)
    assert packed[0, 12] == 121 + 27 and packed[0, 13] == 121 - 1  # 121: five zeros (digits 1)


def test_base3_bytes_no_writer_writes_read_as_zeros():
    lut = base3_lut()
    assert lut.shape == (256, 5) and lut.dtype == np.float32
    np.testing.assert_array_equal(lut[243:], 0)
    np.testing.assert_array_equal(lut[59], [1, 0, -1, 1, -1])
    np.testing.assert_array_equal(lut[0], [-1] * 5)
    np.testing.assert_array_equal(lut[242], [1] * 5)


# ---------------------------------------------------------------------------------------------------------
# documents stored compressed (format 1.2)


def test_documents_are_stored_as_zlib_streams_of_their_text(written):
    path, _, docs, _ = written
    with Artifact.open(path, check_model=False) as a, h5py.File(path, "r") as f:
        for name in docs:
            assert a.documents[name].encoding == "zlib"
            assert zlib.decompress(bytes(f[f"meta/{name}"][...])).decode("utf-8") == a.document(name)
    text = json.dumps({"vocab": {f"piece{i}": i for i in range(5000)}})
    assert len(compress(text.encode())) < len(text) / 3  # what it is for: a tokenizer's JSON shrinks


@pytest.mark.parametrize("stored,words", [
    (zlib.compress(bytes(1001)), "inflates to more than 1000 bytes, more than a document may have"),
    (zlib.compress(b"{}")[:-2], "is damaged (its zlib stream is cut short)"),
    (zlib.compress(b"{}") + b"x", "is damaged (bytes follow its zlib stream)"),
    (b"{}", "is damaged (its zlib stream: "),
])
def test_a_compressed_document_inflates_within_its_bound_or_is_refused_by_name(stored, words):
    assert decompress(zlib.compress(bytes(1000)), 1000, "doc") == bytes(1000)  # exactly the bound: read
    with pytest.raises(ArtifactError, match=f"^doc {re.escape(words)}"):
        decompress(stored, 1000, "doc")


def test_a_compressed_bomb_is_refused_without_inflating_it(written, tmp_path):
    """A 1 MB stream that would inflate to 1 GiB: refused at the bound, naming the file and the document."""
    path = written[0]
    deflater = zlib.compressobj(9)
    bomb = b"".join([*(deflater.compress(bytes(1 << 20)) for _ in range(1024)), deflater.flush()])
    with h5py.File(path, "r+", alignment_threshold=1, alignment_interval=ALIGNMENT) as f:
        del f["meta/config.json"]
        ds = f["meta"].create_dataset("config.json", data=np.frombuffer(bomb, np.uint8))
        ds.attrs.update({"encoding": "zlib", "blake2b": digest(np.frombuffer(bomb, np.uint8))})
    with Artifact.open(path, check_model=False) as a:
        with pytest.raises(ArtifactError, match=f"{re.escape(str(path))}: document config.json inflates to more than"):
            a.document("config.json")


def test_rows_refuse_an_id_outside_the_table(converted):
    """The model config bounds every token id (and the per-layer table's rows by vocab_size); `rows`, which
    reads by file offset, refuses anything else rather than return another tensor's bytes."""
    with Artifact.open(converted("tiny_gemma4")) as a:
        rows = a.tensors["embed_tokens_per_layer"].stored_shape[0]
        assert a.rows("embed_tokens_per_layer", np.array([0, rows - 1])).shape[0] == 2
        for bad in (rows, -1):
            with pytest.raises(ArtifactError, match=f"row {bad} of tensor embed_tokens_per_layer, which has {rows}"):
                a.rows("embed_tokens_per_layer", np.array([0, bad]))
