"""What each artifact tensor is called in the checkpoints the converter reads: a Hugging Face folder's
safetensors (`model.language_model.layers.0.self_attn.q_proj.weight`) and a llama.cpp GGUF file
(`blk.0.attn_q.weight`). What each tensor is, and which ones an artifact holds, is the tensor table of
format/schema.py; this is only its names elsewhere, as gguf-py's tensor_mapping.py is to its constants.
"""

from __future__ import annotations

import re

# ---- Hugging Face safetensors

TEXT_PREFIXES = ("model.language_model.", "model.")  # multimodal (as the real E2B) or text-only
# What a Gemma 4 checkpoint holds that the artifact does not: the towers of the other modalities, and
# the keys/values of KV-shared layers (they read an earlier layer's, so transformers never uses theirs).
MULTIMODAL_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
SHARED_KV_SUFFIXES = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")
BARE_PARAMETERS = ("layer_scalar", "router.scale", "router.per_expert_scale", "experts.gate_up_proj",
                   "experts.down_proj")  # stored without a ".weight" suffix
MADE_FROM_NOTHING = ("mlp.router", "attnres_gates")  # the converter's own: no checkpoint tensor at all
_EXPERT = re.compile(r"(layers\.\d+\.mlp\.)experts\.(\d+)\.(\w+_proj)$")


def expert_of(name: str) -> tuple[int, str] | None:
    """(expert, "gate_proj" | "up_proj" | "down_proj") of a tensor of an expanded MLP, else None."""
    m = _EXPERT.match(name)
    return (int(m.group(2)), m.group(3)) if m else None


def hf_name(name: str, prefix: str) -> str | None:
    """The checkpoint tensor artifact tensor `name` comes from, under the checkpoint's text `prefix`
    (None: the converter makes it from nothing). Every expert of an expanded MLP starts as the dense MLP."""
    m = _EXPERT.match(name)
    if m:
        name = m.group(1) + m.group(3)
    elif name.endswith(MADE_FROM_NOTHING):
        return None
    return prefix + name + ("" if name.endswith(BARE_PARAMETERS) else ".weight")


# ---- GGUF (llama.cpp's convert_hf_to_gguf.py, `Gemma3Model`)

GEMMA3_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # only in a GGUF of an untied head
}
GEMMA3_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def gguf_to_hf(gguf_name: str) -> str | None:
    """The Hugging Face name of a gemma3 GGUF tensor (None: not one this mapping knows)."""
    if gguf_name in GEMMA3_GLOBAL:
        return GEMMA3_GLOBAL[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in GEMMA3_BLOCK:
        return f"model.layers.{m.group(1)}.{GEMMA3_BLOCK[m.group(2)]}.weight"
    return None


def norm_shift(gguf_name: str) -> float:
    """What llama.cpp's Gemma3Model added to the tensor: 1 for every norm weight, else 0."""
    return 1.0 if gguf_name.endswith("norm.weight") else 0.0
