"""Dequantize an artifact's weights with plain numpy, independently of the runtime's kernels, and bound
how far a float32 forward over them may be from the exact one."""

from __future__ import annotations

import numpy as np
from reference_forward import float32_bounds

from ferrisres.format import Artifact, decode_f32, unpack_ternary
from ferrisres.format.encodings import BASE3_TERNARY, GROUPED_TERNARY, hadamard


def dequantized_weights(artifact: Artifact) -> dict[str, np.ndarray]:
    """float32 weights by artifact name (scales applied), the input `reference_logits` takes."""
    out = {}
    for name, info in artifact.tensors.items():
        if name.endswith(".weight_scale"):
            continue
        data = artifact.tensor(name)
        if info.encoding in GROUPED_TERNARY:
            out[name] = _grouped_ternary(data, artifact.tensor(name + ".weight_scale"), info.shape, info.rotation,
                                         info.encoding in BASE3_TERNARY)
        elif info.encoding.startswith("int4-g"):
            out[name] = _int4_table(data, artifact.tensor(name + ".weight_scale"), int(info.encoding[6:]), info.shape)
        elif info.encoding.startswith("int6-g"):
            out[name] = _int6_table(data, artifact.tensor(name + ".weight_scale"), int(info.encoding[6:]), info.shape)
        elif info.encoding in ("ternary", "int8"):
            flat = data.reshape(-1, data.shape[-1])  # 3-D (experts) tensors unpack as rows too
            w = (unpack_ternary(flat, info.shape[-1]) if info.encoding == "ternary" else flat.astype(np.float32)).reshape(info.shape)
            scale = artifact.tensor(name + ".weight_scale")
            out[name] = w * (scale[..., None] if scale.size > 1 else scale[0])
        else:
            out[name] = decode_f32(data, info.encoding)
    return out


def base3_codes(packed: np.ndarray, n_in: int) -> np.ndarray:
    """SPEC.md: byte j's digit k (base 3, lowest first) minus 1 is slot 5j + k; blocks of 64 codes take 65
    slots, the last one unused."""
    slots = (packed[..., None].astype(np.int64) // 3 ** np.arange(5) % 3 - 1).reshape(len(packed), -1)
    blocks = [slots[:, b * 65 : b * 65 + 64] for b in range(-(-n_in // 64))]
    return np.concatenate(blocks, axis=1)[:, :n_in].astype(np.float32)


def _grouped_ternary(packed: np.ndarray, scales: np.ndarray, shape: tuple[int, ...], rotation: int,
                     base3: bool) -> np.ndarray:
    """sum over planes p of scale[.., p, group] * T_p, then (rotated tensors) W' R: the weight that
    multiplies the unrotated input."""
    n_in, groups = shape[-1], scales.shape[-1]
    rows = packed.reshape(-1, packed.shape[-1])
    codes = (base3_codes(rows, n_in) if base3 else unpack_ternary(rows, n_in)).reshape(*packed.shape[:-1], n_in)
    per_column = np.repeat(scales.astype(np.float64), n_in // groups, axis=-1)  # [.., out, planes, in]
    w = np.sum(codes * per_column, axis=-2)
    if rotation:
        blocks = np.kron(np.eye(n_in // rotation), hadamard(rotation))  # R, block diagonal
        w = w @ blocks
    return w
_bounds: dict[tuple, float] = {}


def float32_bound(model, ids) -> float:
    """How far a float32 forward of `model` on `ids` may be from the exact one (reference_forward's
    `float32_bounds` on the dequantized weights), cached per artifact and prompt. Two float32 runs that
    differ only in how they batch or sum are each within it of the exact logits: 2x apart at most."""
    key = (str(model.artifact.path), np.asarray(ids).tobytes())
    if key not in _bounds:
        weights = dequantized_weights(model.artifact)
        _bounds[key] = float32_bounds(weights, model.config, np.asarray(ids))["logits"]
    return _bounds[key]


def oracle_tolerance(model, ref) -> float:
    """How far `model`'s logits may be from transformers' float32 ones in `ref` (the prompt and its greedy
    continuation): both are float32 implementations, each within the float32 bound of the exact logits
    (transformers' float32 norms and softmax round about once per value, far less than a product does)."""
    return 2 * float32_bound(model, [*ref["ids"], *ref["greedy"][:-1]])


def _int4_table(packed: np.ndarray, scale: np.ndarray, group: int, shape: tuple[int, int]) -> np.ndarray:
    """SPEC.md: value = (nibble - 8) * the float16 scale of its group; even columns in the low nibbles."""
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.float32) - 8
    values = codes * np.repeat(scale.astype(np.float32), group, axis=1)
    return values[:, : shape[1]]


def _int6_table(packed: np.ndarray, scale: np.ndarray, group: int, shape: tuple[int, int]) -> np.ndarray:
    """SPEC.md: of a padded row of W codes, byte j < W/2 holds the low bits of columns j (bits 0-3) and
    j + W/2 (bits 4-7), byte W/2 + j the high bits of columns j + k W/4 (bits 2k..2k+1); value = (code - 32)
    * its group's scale."""
    width = packed.shape[1] * 4 // 3
    half, quarter = width // 2, width // 4
    packed = packed.astype(np.int64)
    codes = np.empty((packed.shape[0], width), dtype=np.int64)
    for column in range(width):
        low = packed[:, column % half] >> (4 * (column // half)) & 15
        high = packed[:, half + column % quarter] >> (2 * (column // quarter)) & 3
        codes[:, column] = low + 16 * high
    values = (codes - 32) * np.repeat(scale.astype(np.float64), group, axis=1)
    return values[:, : shape[1]].astype(np.float32)
