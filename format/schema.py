"""Which tensors an artifact of a given model config holds, their shapes, and how each may be encoded.

The reader checks every artifact against this before any tensor is used, so a runtime can trust
that names, shapes and encodings agree with the config.
"""

from __future__ import annotations

from pathlib import Path

from .encodings import GROUPED_TERNARY
from .errors import ArtifactError
from .model_config import ModelConfig
from .tables import INT4_GROUPS, SCALE_ENCODINGS, scale_shape

TABLES = ("embed_tokens", "embed_tokens_per_layer")  # looked up by row, never multiplied whole
TABLE_ENCODINGS = ("bf16", "f16", "f32", "int8", *INT4_GROUPS)  # int8 and int4: format 1.1, see tables.py
LINEAR_ENCODINGS = ("ternary", "ternary-g1", "ternary-g2", "int8", "bf16", "f16", "f32")
SCALED_ENCODINGS = ("ternary", "int8")  # stored with a float32 companion `<name>.weight_scale`
TABLE_SCALE_ENCODINGS = tuple(SCALE_ENCODINGS)  # tables stored with a scale per row (int8) or per group (int4)
# ternary and int8: per row (the tensor's shape without its last axis) or [1] for the whole tensor;
# grouped ternary: float16 [..., out, planes, groups], each group `in / groups` consecutive columns
SCALE_SUFFIX = ".weight_scale"
_FLOAT_NAMES = {"f32": "float32", "f16": "float16"}
HEAD = "lm_head"  # optional: the output head's own copy; without it the head is embed_tokens (tied)


def weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Logical shape of every weight the model has, by artifact name, in execution order."""
    H, P, L = c.hidden_size, c.ple_dim, c.num_layers
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (c.vocab_size, H)}
    if P:
        shapes["embed_tokens_per_layer"] = (c.ple_vocab_size, L * P)
        shapes["per_layer_model_projection"] = (L * P, H)
        shapes["per_layer_projection_norm"] = (P,)
    for i in range(L):
        p = f"layers.{i}."
        hd, kvh, inter = c.head_dims[i], c.kv_heads[i], c.intermediate_sizes[i]
        shapes[p + "input_layernorm"] = (H,)
        shapes[p + "self_attn.q_proj"] = (c.num_heads * hd, H)
        shapes[p + "self_attn.q_norm"] = (hd,)
        if c.has_own_kv(i):
            shapes[p + "self_attn.k_proj"] = (kvh * hd, H)
            if c.has_v_proj(i):
                shapes[p + "self_attn.v_proj"] = (kvh * hd, H)
            shapes[p + "self_attn.k_norm"] = (hd,)
        shapes[p + "self_attn.o_proj"] = (H, c.num_heads * hd)
        shapes[p + "post_attention_layernorm"] = (H,)
        shapes[p + "pre_feedforward_layernorm"] = (H,)
        if c.mlp_experts:
            shapes[p + "mlp.router"] = (c.mlp_experts, H)
            for e in range(c.mlp_experts):
                shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", inter, H))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", inter, H))
        if c.moe_block:
            E, I = c.num_experts, c.moe_intermediate_size
            shapes[p + "post_feedforward_layernorm_1"] = (H,)
            shapes[p + "router.proj"] = (E, H)
            shapes[p + "router.scale"] = (H,)
            shapes[p + "router.per_expert_scale"] = (E,)
            shapes[p + "pre_feedforward_layernorm_2"] = (H,)
            shapes[p + "experts.gate_up_proj"] = (E, 2 * I, H)
            shapes[p + "experts.down_proj"] = (E, H, I)
            shapes[p + "post_feedforward_layernorm_2"] = (H,)
        shapes[p + "post_feedforward_layernorm"] = (H,)
        if P:
            shapes[p + "per_layer_input_gate"] = (P, H)
            shapes[p + "per_layer_projection"] = (H, P)
            shapes[p + "post_per_layer_input_norm"] = (H,)
        if c.layer_scalars:
            shapes[p + "layer_scalar"] = (1,)
    if c.attnres:
        shapes["attnres_gates"] = (len(c.attnres_blocks()),)
    shapes["norm"] = (H,)
    return shapes


def _mlp_shapes(prefix: str, inter: int, H: int) -> dict[str, tuple[int, int]]:
    return {prefix + "gate_proj": (inter, H), prefix + "up_proj": (inter, H), prefix + "down_proj": (H, inter)}


def allowed_encodings(name: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    if len(shape) == 1:
        return ("f32",)  # norms and layer scalars
    return TABLE_ENCODINGS if name in TABLES else LINEAR_ENCODINGS


def check_tensors(path: Path, tensors: dict, config: ModelConfig) -> None:
    """Raise ArtifactError naming the first tensor that is missing, extra, misshapen or wrongly encoded."""
    expected = weight_shapes(config)
    if HEAD in tensors:
        expected[HEAD] = expected["embed_tokens"]
    scales = set()
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise ArtifactError(f"{path}: tensor {name} is missing")
        if info.shape != shape:
            raise ArtifactError(f"{path}: tensor {name} has shape {list(info.shape)}, the model config implies {list(shape)}")
        allowed = allowed_encodings(name, shape)
        if info.encoding not in allowed:
            raise ArtifactError(f"{path}: tensor {name} has encoding {info.encoding}, expected one of {', '.join(allowed)}")
        if name in TABLES and info.encoding in TABLE_SCALE_ENCODINGS:
            _check_table_scale(path, name, info.encoding, shape, tensors.get(name + SCALE_SUFFIX))
            scales.add(name + SCALE_SUFFIX)
        elif info.encoding in SCALED_ENCODINGS:
            scale = tensors.get(name + SCALE_SUFFIX)
            if scale is None or scale.encoding != "f32" or scale.shape not in (shape[:-1], (1,)):
                raise ArtifactError(f"{path}: tensor {name}{SCALE_SUFFIX} is missing or not float32 {list(shape[:-1])} or [1]")
            scales.add(name + SCALE_SUFFIX)
        if info.encoding in GROUPED_TERNARY:
            _check_group_scale(path, name, shape, GROUPED_TERNARY[info.encoding], tensors.get(name + SCALE_SUFFIX))
            scales.add(name + SCALE_SUFFIX)
    extra = sorted(set(tensors) - set(expected) - scales)
    if extra:
        raise ArtifactError(f"{path}: unexpected tensor {extra[0]} for this model config")


def _check_group_scale(path: Path, name: str, shape: tuple[int, ...], planes: int, scale) -> None:
    n_in = shape[-1]
    groups = scale.shape[-1] if scale is not None else 0
    if n_in % 4:
        raise ArtifactError(f"{path}: tensor {name} is grouped ternary, which needs an input width divisible by 4, not {n_in}")
    if (scale is None or scale.encoding != "f16" or scale.shape[:-1] != (*shape[:-1], planes)
            or groups < 1 or n_in % groups):
        raise ArtifactError(f"{path}: tensor {name}{SCALE_SUFFIX} is missing or not float16 "
                            f"{[*shape[:-1], planes]} + [groups], with groups dividing {n_in}")


def _check_table_scale(path: Path, name: str, encoding: str, shape: tuple[int, int], scale) -> None:
    """A table is read by rows, its scales too: a float32 per row (int8) or a float16 per group (int4), never [1]."""
    dtype, expected = SCALE_ENCODINGS[encoding], scale_shape(encoding, shape)
    if scale is None or scale.encoding != dtype or scale.shape != expected:
        raise ArtifactError(f"{path}: tensor {name}{SCALE_SUFFIX} is missing or not {_FLOAT_NAMES[dtype]} "
                            f"{list(expected)} (the scales of a table stored as {encoding})")
