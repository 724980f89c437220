"""The `.tern` artifact: one HDF5 file holding a ternary Gemma 4 student, memory-mappable (see SPEC.md).

Both the converter and the runtime import this package; it imports neither.
"""

from .encodings import ENCODINGS, bf16_to_f32, decode_f32, f32_to_bf16, pack_ternary, ternary_lut, unpack_ternary
from .errors import ArtifactError
from .model_config import FULL, SLIDING, ModelConfig, RopeConfig
from .reader import Artifact
from .validate import TensorInfo
from .schema import HEAD, weight_shapes
from .spec import FORMAT_NAME, FORMAT_VERSION
from .writer import ArtifactWriter

__all__ = [
    "ENCODINGS", "FORMAT_NAME", "HEAD", "FORMAT_VERSION", "FULL", "SLIDING", "Artifact", "ArtifactError",
    "ArtifactWriter", "ModelConfig", "RopeConfig", "TensorInfo", "bf16_to_f32", "decode_f32",
    "f32_to_bf16", "pack_ternary", "ternary_lut", "unpack_ternary", "weight_shapes",
]
