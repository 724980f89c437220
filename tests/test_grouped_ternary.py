"""The grouped trit-plane encodings (`ternary-g1`, `-g2`, `-g3`) in the artifact and the runtime: what the
reader refuses, and that every way the runtime multiplies them computes the same weight."""

from __future__ import annotations

import shutil
import warnings

import h5py
import numpy as np
import pytest
from artifact_weights import base3_codes, dequantized_weights
from conftest import run_tool

from ferrisres.format import Artifact, ArtifactError, unpack_ternary
from ferrisres.format.encodings import GROUPED_TERNARY, rotate_blocks, tied_planes
from ferrisres.runtime import load
from ferrisres.runtime import kernels
from ferrisres.runtime.kernels import GROUPED_MATVEC_TOKENS, Linear, rotated_input

NAME = "layers.0.mlp.down_proj"  # [64, 256]: four groups of 64, rotation 64


def patched(path, tmp_path, change) -> str:
    out = tmp_path / "patched.tern"
    shutil.copy(path, out)
    with h5py.File(out, "r+") as f:
        change(f["tensors"])
    return str(out)


@pytest.mark.parametrize("change,words", [
    (lambda t: t[NAME].attrs.__setitem__("rotation", np.int64(48)), "'rotation' is 48, not 0 or a power of two dividing 256"),
    (lambda t: t[NAME].attrs.__setitem__("rotation", np.int64(512)), "'rotation' is 512"),
    (lambda t: t[NAME].attrs.__setitem__("rotation", np.float64(64)), "'rotation' is not a scalar integer"),
    (lambda t: t["layers.0.input_layernorm"].attrs.__setitem__("rotation", np.int64(64)),
     "'rotation' is only defined for grouped ternary encodings"),
    (lambda t: t.__delitem__(NAME + ".weight_scale"), f"tensor {NAME}.weight_scale is missing or not float16"),
])
def test_reader_refuses_a_bad_grouped_tensor_with_one_line(converted, tmp_path, change, words):
    path = patched(converted("tiny_gemma4"), tmp_path, change)
    with pytest.raises(ArtifactError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Artifact.open(path)
    result = run_tool("ferrisres-run", path, "-p", "Hi", "-n", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and words in result.stderr


def test_reader_refuses_group_scales_whose_groups_do_not_divide_the_row(converted, tmp_path):
    def change(t):
        scales = t[NAME + ".weight_scale"][...]
        attrs = dict(t[NAME + ".weight_scale"].attrs)
        del t[NAME + ".weight_scale"]
        t.create_dataset(NAME + ".weight_scale", data=scales[..., :3])  # 3 groups of a 256-wide row
        for k, v in attrs.items():
            if k != "shape":
                t[NAME + ".weight_scale"].attrs[k] = v
        t[NAME + ".weight_scale"].attrs["shape"] = np.asarray([*scales.shape[:-1], 3], dtype=np.int64)

    with pytest.raises(ArtifactError, match="with groups dividing 256"):
        Artifact.open(patched(converted("tiny_gemma4"), tmp_path, change))


@pytest.mark.parametrize("encoding,options", [("ternary-g3", {}), ("ternary5-g3", {"packing": "base3"}),
                                              ("ternary-g3", {"plane_scales": "free"}),
                                              ("ternary-g2", {"down_planes": 2}),
                                              ("ternary-g2", {"down_planes": 2, "plane_scales": "free"}),
                                              ("ternary5-g2", {"down_planes": 2, "packing": "base3"})])
def test_every_multiplication_path_computes_the_dequantized_weight(converted, encoding, options, monkeypatch):
    """Chunked numpy decode, the int8 code cache and row-split threads against the independent dequantizer;
    2-bit tied planes (the default) decoded as levels, free ones plane by plane."""
    model = load(converted("tiny_gemma4", **options))
    expected = dequantized_weights(model.artifact)[NAME]
    linear = model.weights.layers[0]["mlp.down_proj"]
    assert linear.encoding == encoding and linear.rotation == 64
    assert linear.tied == (encoding.startswith("ternary-") and options.get("plane_scales") != "free")
    np.testing.assert_allclose(linear.dequantize(), expected, rtol=0, atol=1e-6)
    # a few tokens (group scales on the partial sums) and a prompt past GROUPED_MATVEC_TOKENS (on the weights)
    for tokens in (5, GROUPED_MATVEC_TOKENS + 1):
        x = np.random.default_rng(tokens).standard_normal((tokens, 256))
        want = x @ expected.T
        # float32 products over up to 3 planes x 256 inputs (base-3: 3 x 320 slots, the unused ones exact zeros):
        # rounding errors of either sign add up like a random walk, sqrt(960) x 6e-8 (float32's unit roundoff)
        # ~ 2e-6 of sum |x| |w|; 1e-5 leaves room for the rotation's own rounding
        atol = 1e-5 * np.max(np.abs(x).sum(axis=1)) * np.abs(expected).max()
        np.testing.assert_allclose(linear(x), want, rtol=0, atol=atol)
        small_chunks = Linear(linear.data, linear.encoding, (64, 256), None, linear.group_scale, linear.rotation)
        small_chunks.rows_per_chunk = 7  # chunks that do not divide the rows (BLAS may sum in another order)
        with monkeypatch.context() as m:
            m.setattr(kernels, "PROMPT_CHUNK_ROWS", 7)  # a prompt's chunks too
            np.testing.assert_allclose(small_chunks(x), linear(x), rtol=0, atol=atol)
        codes = Linear(linear.data, linear.encoding, (64, 256), None, linear.group_scale, linear.rotation)
        codes.keep_int8()
        np.testing.assert_array_equal(codes(x), linear(x))


def test_rotation_is_computed_once_for_linears_sharing_an_input():
    x = np.random.default_rng(1).standard_normal((3, 128))
    first = rotated_input(x, 64)
    assert rotated_input(x, 64) is first  # q, k and v: one rotation
    assert rotated_input(x.copy(), 64) is not first  # another input is rotated anew
    np.testing.assert_allclose(first, rotate_blocks(x, 64), rtol=0, atol=1e-6)
    np.testing.assert_allclose(rotate_blocks(rotate_blocks(x, 64), 64), x, atol=1e-12)  # its own inverse


def test_base3_packing_stores_the_same_codes_in_13_bytes_per_64(converted):
    two_bit, base3 = (load(converted("tiny_gemma4", method="rtn", **options)).artifact
                      for options in ({}, {"packing": "base3"}))
    packed = {name: info for name, info in two_bit.tensors.items() if info.encoding in ("ternary-g2", "ternary-g3")}
    assert {info.encoding for info in packed.values()} == {"ternary-g2", "ternary-g3"}  # down projections: 3 planes
    for name, info in packed.items():
        other, n_in = base3.tensors[name], info.shape[-1]
        assert other.encoding == info.encoding.replace("ternary-", "ternary5-") and other.shape == info.shape
        assert other.stored_shape[-1] == n_in // 64 * 13 + -(-(n_in % 64) // 5)  # 32 wide: 7 bytes, not 8
        np.testing.assert_array_equal(base3.tensor(name + ".weight_scale"), two_bit.tensor(name + ".weight_scale"))
        codes = base3_codes(base3.tensor(name).reshape(-1, other.stored_shape[-1]), n_in)
        np.testing.assert_array_equal(codes, unpack_ternary(two_bit.tensor(name).reshape(-1, info.stored_shape[-1]), n_in))


def test_base3_keeps_2bit_for_groups_that_are_not_whole_blocks(converted):
    """--group 32: a group would start inside a base-3 byte, so those tensors stay 2-bit; a 32-wide input is
    one group, which base-3 holds."""
    artifact = load(converted("tiny_gemma4", method="rtn", group=32, packing="base3")).artifact
    assert artifact.tensors["layers.0.mlp.down_proj"].encoding == "ternary-g3"  # 256 wide: 8 groups of 32
    assert artifact.tensors["layers.0.self_attn.o_proj"].encoding == "ternary5-g2"  # 32 wide: 1 group


def test_a_damaged_scale_is_not_tied_and_warns_nothing():
    """A flipped bit can make a float16 scale a signaling NaN, whose conversion warns (a line on stderr of
    every command); such planes are simply not tied."""
    scales = np.array([[[9.0, 3.0], [3.0, 1.0]]], dtype=np.float16).transpose(0, 2, 1).copy()  # [1, 2 planes, 2 groups]
    assert tied_planes(scales)
    for bits in (0x7D01, 0x7C00, 0x7E00):  # signaling NaN, infinity, quiet NaN
        damaged = scales.view(np.uint16).copy()
        damaged[0, 1, 0] = bits
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not tied_planes(damaged)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_plane_scales_are_tied_by_default_and_free_on_request(converted, method):
    """By default every tensor of more than one plane has tied scales (each plane's exactly 3 times the next
    one's); `--plane-scales free` fits each plane its own, and the student's config says which."""
    for plane_scales in ("tied", "free"):
        options = {"method": method} if plane_scales == "tied" else {"method": method, "plane_scales": "free"}
        artifact = load(converted("tiny_gemma4", **options)).artifact
        planes = [name for name, info in artifact.tensors.items() if GROUPED_TERNARY.get(info.encoding, 1) > 1]
        assert len(planes) > 10 and artifact.json("student_config.json")["plane_scales"] == plane_scales
        tied = [tied_planes(artifact.tensor(name + ".weight_scale")) for name in planes]
        assert all(tied) if plane_scales == "tied" else not any(tied)

