"""Dequantize an artifact's weights with plain numpy, independently of the runtime's kernels."""

from __future__ import annotations

import numpy as np

from ferrisres.format import Artifact, decode_f32, unpack_ternary


def dequantized_weights(artifact: Artifact) -> dict[str, np.ndarray]:
    """float32 weights by artifact name (scales applied), the input `reference_logits` takes."""
    out = {}
    for name, info in artifact.tensors.items():
        if name.endswith(".weight_scale"):
            continue
        data = artifact.tensor(name)
        if info.encoding.startswith("int4-g"):
            out[name] = _int4_table(data, artifact.tensor(name + ".weight_scale"), int(info.encoding[6:]), info.shape)
        elif info.encoding in ("ternary", "int8"):
            flat = data.reshape(-1, data.shape[-1])  # 3-D (experts) tensors unpack as rows too
            w = (unpack_ternary(flat, info.shape[-1]) if info.encoding == "ternary" else flat.astype(np.float32)).reshape(info.shape)
            scale = artifact.tensor(name + ".weight_scale")
            out[name] = w * (scale[..., None] if scale.size > 1 else scale[0])
        else:
            out[name] = decode_f32(data, info.encoding)
    return out


def _int4_table(packed: np.ndarray, scale: np.ndarray, group: int, shape: tuple[int, int]) -> np.ndarray:
    """SPEC.md: value = (nibble - 8) * the float16 scale of its group; even columns in the low nibbles."""
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.float32) - 8
    values = codes * np.repeat(scale.astype(np.float32), group, axis=1)
    return values[:, : shape[1]]
