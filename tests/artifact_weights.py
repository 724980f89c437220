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
        if info.encoding in ("ternary", "int8"):
            flat = data.reshape(-1, data.shape[-1])  # 3-D (experts) tensors unpack as rows too
            w = (unpack_ternary(flat, info.shape[-1]) if info.encoding == "ternary" else flat.astype(np.float32)).reshape(info.shape)
            scale = artifact.tensor(name + ".weight_scale")
            out[name] = w * (scale[..., None] if scale.size > 1 else scale[0])
        else:
            out[name] = decode_f32(data, info.encoding)
    return out
