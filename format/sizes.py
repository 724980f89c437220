"""What an artifact's bytes are: grouped by kind and encoding, and what the same model would take as
its bf16 teacher. Printed by the converter when it finishes and by the runtime with --verbose."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .reader import Artifact
from .schema import HEAD, NORM, ROUTER, SCALAR, TABLE, Tensor, head_tensor, tensor_table
from .validate import TensorInfo

_KINDS = {ROUTER: "routers", NORM: "norms, scalars and gates", SCALAR: "norms, scalars and gates"}
_TABLE_KINDS = {"embed_tokens": "token embedding", "embed_tokens_per_layer": "per-layer embedding table"}


def tensor_kind(info: TensorInfo, tensor: Tensor | None) -> str:
    """The group a tensor's bytes are reported under: what it is (`tensor`: its entry in the tensor
    table; None for a scale), and how it is stored."""
    if tensor is None:
        kind = "scales"
    elif info.name == HEAD:
        kind = "output head copy"
    elif tensor.role == TABLE:
        kind = _TABLE_KINDS[info.name]
    else:
        kind = _KINDS.get(tensor.role, "linear weights")
    return f"{kind} ({info.encoding})"


def bytes_by_kind(artifact: Artifact) -> dict[str, int]:
    table = _table(artifact)
    out: dict[str, int] = defaultdict(int)
    for info in artifact.tensors.values():
        out[tensor_kind(info, table.get(info.name))] += info.nbytes
    return dict(sorted(out.items()))


def teacher_bf16_bytes(artifact: Artifact) -> int:
    """Bytes of the teacher the student was made from, in bf16: its own weights once each, without the
    student's additions (head copy, scales, routers, gates, experts beyond the dense one)."""
    table = _table(artifact)
    params = sum(int(np.prod(info.shape)) for info in artifact.tensors.values()
                 if info.name in table and not table[info.name].student)
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


def _table(artifact: Artifact) -> dict[str, Tensor]:
    """The artifact's tensor table, its head copy included (scales are not in it)."""
    return {**tensor_table(artifact.config), HEAD: head_tensor(artifact.config)}
