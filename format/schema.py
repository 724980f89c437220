"""The tensor table: every tensor an artifact of a given model config holds, what it is, its shape, and
how it may be encoded. The one place that knows Gemma's tensor vocabulary (the converter's names of
each tensor in a checkpoint are in convert/names.py).

The reader checks every artifact against this before any tensor is used, so a runtime can trust
that names, shapes and encodings agree with the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .encodings import BASE3_BLOCK, BASE3_TERNARY, GROUPED_TERNARY, base3_fits
from .errors import ArtifactError
from .model_config import ModelConfig
from .tables import GROUPED_TABLES, SCALE_ENCODINGS, scale_shape

# What a tensor is
TABLE = "table"  # an embedding table: looked up by row, never multiplied whole (but as the tied head)
PROJECTION = "projection"  # a linear map of the decoder
ROUTER = "router"  # what chooses experts: the logits' matrix, and Gemma 4's router scales
NORM = "norm"  # an RMSNorm's weight
SCALAR = "scalar"  # a layer's output scale, and the AttnRes gates
FLOAT32_ROLES = (ROUTER, NORM, SCALAR)  # what every artifact stores as float32, student or teacher

TABLE_ENCODINGS = ("bf16", "f16", "f32", "int8", *GROUPED_TABLES)  # int8 and int4: format 1.1, int6: 1.4 (tables.py)
LINEAR_ENCODINGS = ("ternary", *GROUPED_TERNARY, "int8", "bf16", "f16", "f32")
SCALED_ENCODINGS = ("ternary", "int8")  # stored with a float32 companion `<name>.weight_scale`
TABLE_SCALE_ENCODINGS = tuple(SCALE_ENCODINGS)  # tables stored with a scale per row (int8) or per group (int4, int6)
# ternary and int8: per row (the tensor's shape without its last axis) or [1] for the whole tensor;
# grouped ternary: float16 [..., out, planes, groups], each group `in / groups` consecutive columns
SCALE_SUFFIX = ".weight_scale"
_FLOAT_NAMES = {"f32": "float32", "f16": "float16"}
HEAD = "lm_head"  # optional: the output head's own copy; without it the head is embed_tokens (tied)


@dataclass(frozen=True)
class Tensor:
    """One entry of the tensor table."""

    shape: tuple[int, ...]  # logical shape
    role: str  # TABLE, PROJECTION, ROUTER, NORM or SCALAR
    ternary: bool = False  # a ternary student stores it as ternary codes (the decoder's projections)
    student: bool = False  # not a tensor of the teacher: made by the converter (an expanded MLP's router and
    #                        experts beyond the first, which start as the dense one; the AttnRes gates)


def tensor_table(c: ModelConfig) -> dict[str, Tensor]:
    """Every weight the model has, by artifact name, in execution order."""
    H, P, L = c.hidden_size, c.ple_dim, c.num_layers
    t: dict[str, Tensor] = {"embed_tokens": Tensor((c.vocab_size, H), TABLE)}
    if P:
        t["embed_tokens_per_layer"] = Tensor((c.ple_vocab_size, L * P), TABLE)
        t["per_layer_model_projection"] = Tensor((L * P, H), PROJECTION)  # a student keeps it in float (docs/design.md)
        t["per_layer_projection_norm"] = Tensor((P,), NORM)
    for i in range(L):
        p = f"layers.{i}."
        hd, kvh, inter = c.head_dims[i], c.kv_heads[i], c.intermediate_sizes[i]
        t[p + "input_layernorm"] = Tensor((H,), NORM)
        t[p + "self_attn.q_proj"] = _projection(c.num_heads * hd, H)
        t[p + "self_attn.q_norm"] = Tensor((hd,), NORM)
        if c.has_own_kv(i):
            t[p + "self_attn.k_proj"] = _projection(kvh * hd, H)
            if c.has_v_proj(i):
                t[p + "self_attn.v_proj"] = _projection(kvh * hd, H)
            t[p + "self_attn.k_norm"] = Tensor((hd,), NORM)
        t[p + "self_attn.o_proj"] = _projection(H, c.num_heads * hd)
        t[p + "post_attention_layernorm"] = Tensor((H,), NORM)
        t[p + "pre_feedforward_layernorm"] = Tensor((H,), NORM)
        if c.mlp_experts:
            t[p + "mlp.router"] = Tensor((c.mlp_experts, H), ROUTER, student=True)
            for e in range(c.mlp_experts):
                t.update(_mlp(f"{p}mlp.experts.{e}.", inter, H, student=e > 0))
        else:
            t.update(_mlp(p + "mlp.", inter, H))
        if c.moe_block:
            E, I = c.num_experts, c.moe_intermediate_size
            t[p + "post_feedforward_layernorm_1"] = Tensor((H,), NORM)
            t[p + "router.proj"] = Tensor((E, H), ROUTER)
            t[p + "router.scale"] = Tensor((H,), ROUTER)
            t[p + "router.per_expert_scale"] = Tensor((E,), ROUTER)
            t[p + "pre_feedforward_layernorm_2"] = Tensor((H,), NORM)
            t[p + "experts.gate_up_proj"] = _projection(E, 2 * I, H)
            t[p + "experts.down_proj"] = _projection(E, H, I)
            t[p + "post_feedforward_layernorm_2"] = Tensor((H,), NORM)
        t[p + "post_feedforward_layernorm"] = Tensor((H,), NORM)
        if P:
            t[p + "per_layer_input_gate"] = _projection(P, H)
            t[p + "per_layer_projection"] = _projection(H, P)
            t[p + "post_per_layer_input_norm"] = Tensor((H,), NORM)
        if c.layer_scalars:
            t[p + "layer_scalar"] = Tensor((1,), SCALAR)
    if c.attnres:
        t["attnres_gates"] = Tensor((len(c.attnres_blocks()),), SCALAR, student=True)
    t["norm"] = Tensor((H,), NORM)
    return t


def weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Logical shape of every weight the model has, by artifact name, in execution order."""
    return {name: tensor.shape for name, tensor in tensor_table(c).items()}


def head_tensor(c: ModelConfig) -> Tensor:
    """The optional HEAD: a copy of the tied embedding table, in an encoding faster to multiply."""
    return Tensor((c.vocab_size, c.hidden_size), PROJECTION, student=True)


def _projection(*shape: int) -> Tensor:
    return Tensor(shape, PROJECTION, ternary=True)


def _mlp(prefix: str, inter: int, H: int, student: bool = False) -> dict[str, Tensor]:
    return {prefix + "gate_proj": Tensor((inter, H), PROJECTION, True, student),
            prefix + "up_proj": Tensor((inter, H), PROJECTION, True, student),
            prefix + "down_proj": Tensor((H, inter), PROJECTION, True, student)}


def allowed_encodings(tensor: Tensor) -> tuple[str, ...]:
    if len(tensor.shape) == 1:
        return ("f32",)  # norms, scalars, router scales
    return TABLE_ENCODINGS if tensor.role == TABLE else LINEAR_ENCODINGS


def check_tensors(path: Path, tensors: dict, config: ModelConfig) -> None:
    """Raise ArtifactError naming the first tensor that is missing, extra, misshapen or wrongly encoded."""
    expected = tensor_table(config)
    if HEAD in tensors:
        expected[HEAD] = head_tensor(config)
    scales = set()
    for name, tensor in expected.items():
        info, shape = tensors.get(name), tensor.shape
        if info is None:
            raise ArtifactError(f"{path}: tensor {name} is missing")
        if info.shape != shape:
            raise ArtifactError(f"{path}: tensor {name} has shape {list(info.shape)}, the model config implies {list(shape)}")
        allowed = allowed_encodings(tensor)
        if info.encoding not in allowed:
            raise ArtifactError(f"{path}: tensor {name} has encoding {info.encoding}, expected one of {', '.join(allowed)}")
        if tensor.role == TABLE and info.encoding in TABLE_SCALE_ENCODINGS:
            _check_table_scale(path, name, info.encoding, shape, tensors.get(name + SCALE_SUFFIX))
            scales.add(name + SCALE_SUFFIX)
        elif info.encoding in SCALED_ENCODINGS:
            scale = tensors.get(name + SCALE_SUFFIX)
            if scale is None or scale.encoding != "f32" or scale.shape not in (shape[:-1], (1,)):
                raise ArtifactError(f"{path}: tensor {name}{SCALE_SUFFIX} is missing or not float32 {list(shape[:-1])} or [1]")
            scales.add(name + SCALE_SUFFIX)
        if info.encoding in GROUPED_TERNARY:
            _check_group_scale(path, name, shape, info.encoding, tensors.get(name + SCALE_SUFFIX))
            scales.add(name + SCALE_SUFFIX)
    extra = sorted(set(tensors) - set(expected) - scales)
    if extra:
        raise ArtifactError(f"{path}: unexpected tensor {extra[0]} for this model config")


def _check_group_scale(path: Path, name: str, shape: tuple[int, ...], encoding: str, scale) -> None:
    n_in, planes = shape[-1], GROUPED_TERNARY[encoding]
    groups = scale.shape[-1] if scale is not None else 0
    if n_in % 4 and encoding not in BASE3_TERNARY:
        raise ArtifactError(f"{path}: tensor {name} is grouped ternary, which needs an input width divisible by 4, not {n_in}")
    if (scale is None or scale.encoding != "f16" or scale.shape[:-1] != (*shape[:-1], planes)
            or groups < 1 or n_in % groups):
        raise ArtifactError(f"{path}: tensor {name}{SCALE_SUFFIX} is missing or not float16 "
                            f"{[*shape[:-1], planes]} + [groups], with groups dividing {n_in}")
    if encoding in BASE3_TERNARY and not base3_fits(n_in, groups):
        # a group must start on a byte, so that a kernel applies one scale to whole bytes
        raise ArtifactError(f"{path}: tensor {name} is {encoding}, whose groups must be whole blocks of {BASE3_BLOCK} "
                            f"columns (or one group per row), not {n_in // groups}")


def _check_table_scale(path: Path, name: str, encoding: str, shape: tuple[int, int], scale) -> None:
    """A table is read by rows, its scales too: a float32 per row (int8) or a float16 per group (int4, int6), never [1]."""
    dtype, expected = SCALE_ENCODINGS[encoding], scale_shape(encoding, shape)
    if scale is None or scale.encoding != dtype or scale.shape != expected:
        raise ArtifactError(f"{path}: tensor {name}{SCALE_SUFFIX} is missing or not {_FLOAT_NAMES[dtype]} "
                            f"{list(expected)} (the scales of a table stored as {encoding})")
