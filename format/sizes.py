"""What an artifact's bytes are: grouped by kind and encoding, and what the same model would take as
its bf16 teacher. Printed by the converter when it finishes and by the runtime with --verbose."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from .reader import Artifact
from .schema import HEAD, SCALE_SUFFIX
from .validate import TensorInfo

_OTHER_EXPERT = re.compile(r"\.mlp\.experts\.[1-9]\d*\.")  # experts 1.. of an expanded MLP: copies of the dense one


def tensor_kind(info: TensorInfo) -> str:
    """The group a tensor's bytes are reported under: what it is, and how it is stored."""
    name = info.name
    if name.endswith(SCALE_SUFFIX):
        kind = "scales"
    elif name == "embed_tokens":
        kind = "token embedding"
    elif name == "embed_tokens_per_layer":
        kind = "per-layer embedding table"
    elif name == HEAD:
        kind = "output head copy"
    elif "router" in name:
        kind = "routers"
    elif name == "attnres_gates" or len(info.shape) == 1:
        kind = "norms, scalars and gates"
    else:
        kind = "linear weights"
    return f"{kind} ({info.encoding})"


def bytes_by_kind(artifact: Artifact) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for info in artifact.tensors.values():
        out[tensor_kind(info)] += info.nbytes
    return dict(sorted(out.items()))


def teacher_bf16_bytes(artifact: Artifact) -> int:
    """Bytes of the teacher the student was made from, in bf16: its own weights once each, without the
    student's additions (head copy, scales, routers, gates, experts beyond the dense one)."""
    params = 0
    for info in artifact.tensors.values():
        if info.name == HEAD or info.name.endswith(SCALE_SUFFIX) or "mlp.router" in info.name:
            continue
        if info.name == "attnres_gates" or _OTHER_EXPERT.search(info.name):
            continue
        params += int(np.prod(info.shape))
    return 2 * params


def size_summary(artifact: Artifact) -> str:
    """Lines: bytes by kind, the total, and the bf16 teacher's size for comparison."""
    kinds = bytes_by_kind(artifact)
    total = sum(kinds.values())
    teacher = teacher_bf16_bytes(artifact)
    lines = [f"  {kind:<40} {n / 1e6:12.3f} MB" for kind, n in kinds.items()]
    lines.append(f"  {'all weights':<40} {total / 1e6:12.3f} MB  (bf16 teacher: {teacher / 1e6:.3f} MB, "
                 f"{total / teacher:.2f}x)")
    return "\n".join(lines)
