"""Resolve a Hugging Face Gemma 4 (or Gemma 3) `config.json` into the artifact's explicit `ModelConfig`.

Follows transformers' `Gemma4TextConfig` (5.24): its defaults, both serialisations of per-layer
values (the published `global_head_dim` / `num_global_key_value_heads`, and `per_layer_config`
as 5.24 writes it), and its KV-sharing rule; and `Gemma3TextConfig` for Gemma 3.
"""

from __future__ import annotations

import json
from pathlib import Path

from ferrisres.format import FULL, SLIDING, ArtifactError, ModelConfig, RopeConfig
from ferrisres.format.documents import MAX_LAYERS

from .errors import ConversionError
from .source_files import read_source, source_file

# Gemma4TextConfig's class defaults (not E2B's values: a config.json states those).
_DEFAULTS = {
    "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2, "tie_word_embeddings": True, "sliding_window": 512, "final_logit_softcapping": None,
    "vocab_size_per_layer_input": 262144, "hidden_size_per_layer_input": 256, "attention_k_eq_v": False,
    "num_kv_shared_layers": 0, "enable_moe_block": False, "use_double_wide_mlp": False,
    "use_bidirectional_attention": None, "attention_bias": False,
}
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}
# Gemma3TextConfig's defaults: no per-layer embeddings, KV sharing, V norm or layer scalars.
_GEMMA3_DEFAULTS = {
    **_DEFAULTS, "vocab_size": 262208, "num_hidden_layers": 26, "sliding_window": 4096,
    "hidden_size_per_layer_input": 0, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
    "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
}
_FAMILIES = {"gemma4": ("gemma4_text", _DEFAULTS), "gemma4_text": ("gemma4_text", _DEFAULTS),
             "gemma3": ("gemma3_text", _GEMMA3_DEFAULTS), "gemma3_text": ("gemma3_text", _GEMMA3_DEFAULTS)}


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file that must hold an object, or a ConversionError naming the file."""
    try:
        value = json.loads(read_source(path).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ConversionError(f"{path} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return value


def read_config(folder: Path) -> tuple[dict, dict]:
    """The text config dict (defaults filled in) and the whole config.json of a checkpoint folder."""
    path = folder / "config.json"
    if source_file(path) is None:
        raise ConversionError(f"{folder} has no config.json")
    whole = read_json_object(path)
    model_type = whole.get("model_type")
    if model_type not in _FAMILIES:
        raise ConversionError(f"{path}: model_type {model_type!r} is not Gemma 4 (or Gemma 3): expected one of {sorted(_FAMILIES)}")
    text = whole if model_type.endswith("_text") else whole.get("text_config")
    if not isinstance(text, dict):
        raise ConversionError(f"{path}: a {model_type} config needs a text_config object")
    return text_config_with_defaults({**text, "model_type": _FAMILIES[model_type][0]}), whole


def text_config_with_defaults(text: dict) -> dict:
    """A text config (model_type gemma4_text or gemma3_text) with transformers' defaults filled in."""
    architecture, defaults = _FAMILIES[text.get("model_type", "gemma4_text")]
    return {**defaults, **text, "model_type": architecture}


def model_config(text: dict, eos_token_ids: list[int]) -> ModelConfig:
    """The resolved per-layer config; raises ConversionError for what the runtime cannot run."""
    c = text
    for key, supported in (("attention_bias", False), ("tie_word_embeddings", True)):
        if bool(c.get(key)) != supported:
            raise ConversionError(f"config: {key}={c.get(key)} is not supported yet")
    if c["use_bidirectional_attention"] == "all":
        raise ConversionError("config: use_bidirectional_attention='all' (a non-causal model) is not supported")
    if c["hidden_activation"] != "gelu_pytorch_tanh":
        raise ConversionError(f"config: hidden_activation {c['hidden_activation']!r} is not supported")
    gemma3 = c["model_type"] == "gemma3_text"
    L = _int(c, "num_hidden_layers", maximum=MAX_LAYERS)
    pattern = _int(c, "sliding_window_pattern") if gemma3 else 6
    layer_types = list(c.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(L)])
    if len(layer_types) != L:
        raise ConversionError(f"config: layer_types has {len(layer_types)} entries for {L} layers")
    if not gemma3:
        layer_types[-1] = FULL  # as Gemma4TextConfig does: its last layer is always full attention
    overrides = [{}] * L if gemma3 else _per_layer_overrides(c, layer_types)
    head_dims = tuple(_int({**c, **overrides[i]}, "head_dim") for i in range(L))
    kv_heads = tuple(_int({**c, **overrides[i]}, "num_key_value_heads") for i in range(L))
    kv_sources = _kv_sources(layer_types, _int(c, "num_kv_shared_layers", minimum=0))
    inter = _int(c, "intermediate_size")
    wide = bool(c["use_double_wide_mlp"])
    intermediate = tuple(2 * inter if wide and kv_sources[i] != i else inter for i in range(L))
    rope_params = c.get("rope_parameters") or (_gemma3_rope(c) if gemma3 else _DEFAULT_ROPE)
    try:
        rope = {t: _rope(rope_params[t]) for t in sorted(set(layer_types))}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConversionError(f"config: rope_parameters lack a value ({e})") from None
    softcap = c["final_logit_softcapping"]
    try:
        return ModelConfig(
            vocab_size=_int(c, "vocab_size"),
            hidden_size=_int(c, "hidden_size"),
            num_layers=L,
            num_heads=_int(c, "num_attention_heads"),
            layer_types=tuple(layer_types),
            head_dims=head_dims,
            kv_heads=kv_heads,
            intermediate_sizes=intermediate,
            kv_sources=kv_sources,
            k_eq_v=bool(c["attention_k_eq_v"]),
            sliding_window=_int(c, "sliding_window"),
            rope=rope,
            rms_norm_eps=_float(c, "rms_norm_eps"),
            final_logit_softcapping=_float(c, "final_logit_softcapping") if softcap else None,
            ple_dim=_int({**c, "hidden_size_per_layer_input": c["hidden_size_per_layer_input"] or 0},
                         "hidden_size_per_layer_input", minimum=0),
            ple_vocab_size=_int(c, "vocab_size_per_layer_input"),
            max_position_embeddings=_int(c, "max_position_embeddings"),
            bos_token_id=_int(c, "bos_token_id", minimum=0),
            eos_token_ids=tuple(eos_token_ids),
            pad_token_id=_int({**c, "pad_token_id": c["pad_token_id"] or 0}, "pad_token_id", minimum=0),
            **_moe_block(c),
            **(_gemma3_differences(c) if gemma3 else {}),
        )
    except ArtifactError as e:
        raise ConversionError(str(e)) from None


def _gemma3_rope(c: dict) -> dict:
    """Gemma 3 (older config spelling): local layers use rope_local_base_freq, global ones rope_theta
    with the optional rope_scaling (e.g. linear, factor 8 on the larger models)."""
    full = {"rope_type": "default", "rope_theta": c["rope_theta"], **(c.get("rope_scaling") or {})}
    return {SLIDING: {"rope_type": "default", "rope_theta": c["rope_local_base_freq"]}, FULL: full}


def _gemma3_differences(c: dict) -> dict:
    softcap = c.get("attn_logit_softcapping")
    return {
        "architecture": "gemma3_text",
        "attention_scale": _float(c, "query_pre_attn_scalar") ** -0.5,
        "attn_logit_softcapping": _float(c, "attn_logit_softcapping") if softcap else None,
        "value_norm": False,
        "layer_scalars": False,
    }


def _moe_block(c: dict) -> dict:
    """Gemma 4's own MoE block (26B-A4B) beside the dense MLP."""
    if not c["enable_moe_block"]:
        return {}
    return {
        "moe_block": True,
        "num_experts": _int(c, "num_experts"),
        "top_k_experts": _int(c, "top_k_experts"),
        "moe_intermediate_size": _int(c, "moe_intermediate_size"),
    }


def _int(c: dict, key: str, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    """c[key] as an int in [minimum, maximum], or a ConversionError naming the key (per-layer lists are
    built from some of these before the model config is checked: they must be bounded here)."""
    value = c.get(key)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum
            or value != int(value)):
        raise ConversionError(f"config: {key}={str(value)[:40]} is not an integer in [{minimum}, {maximum}]")
    return int(value)


def _float(c: dict, key: str) -> float:
    value = c.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConversionError(f"config: {key}={value!r} is not a positive number")
    return float(value)


def _rope(params: dict) -> RopeConfig:
    rope_type = str(params.get("rope_type", "default"))
    return RopeConfig(
        rope_type=rope_type,
        theta=float(params["rope_theta"]),
        partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
        factor=float(params.get("factor", 1.0)) if rope_type != "default" else 1.0,  # "default" ignores it
    )


def eos_token_ids(text: dict, generation_config: dict | None) -> list[int]:
    """Stop ids: the generation config's (Gemma 4 IT lists several), else the model config's."""
    value = (generation_config or {}).get("eos_token_id", text.get("eos_token_id"))
    ids = value if isinstance(value, list) else [value]
    try:
        return [int(i) for i in ids if i is not None]
    except (TypeError, ValueError):
        raise ConversionError(f"eos_token_id {value!r} is not a list of token ids") from None


def _per_layer_overrides(c: dict, layer_types: list[str]) -> list[dict]:
    """Per-layer head_dim / num_key_value_heads overrides, from either config spelling."""
    L = len(layer_types)
    if "per_layer_config" in c:
        raw = c["per_layer_config"] or {}
        out = [dict(raw.get(str(i), raw.get(i, {})) or {}) for i in range(L)]
        for i, o in enumerate(out):
            unknown = set(o) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConversionError(f"config: per_layer_config[{i}] overrides {sorted(unknown)}, not supported")
        return out
    full = {"head_dim": c.get("global_head_dim", 512)}
    global_kv = c.get("num_global_key_value_heads")
    if c["attention_k_eq_v"] and global_kv is not None:
        full["num_key_value_heads"] = global_kv
    return [dict(full) if t == FULL else {} for t in layer_types]


def _kv_sources(layer_types: list[str], num_shared: int) -> tuple[int, ...]:
    """Layer i >= L - num_shared attends to the keys/values of the last earlier non-shared layer of its type."""
    L = len(layer_types)
    first_shared = L - num_shared
    if not 0 < first_shared <= L:
        raise ConversionError(f"config: num_kv_shared_layers={num_shared} leaves no layer to produce keys/values")
    sources = list(range(first_shared))
    for i in range(first_shared, L):
        producers = [j for j in range(first_shared) if layer_types[j] == layer_types[i]]
        if not producers:
            raise ConversionError(f"config: shared layer {i} ({layer_types[i]}) has no earlier layer of its type")
        sources.append(producers[-1])
    return tuple(sources)
