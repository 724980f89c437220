"""The model config stored in an artifact: Gemma 4's text decoder with every per-layer value resolved.

Hugging Face configs spell per-layer facts several ways (`global_head_dim`, `per_layer_config`,
`num_kv_shared_layers`); the converter resolves them once into this flat form, so the runtime and
any other reader get explicit per-layer lists and never re-derive Gemma 4's rules.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from .documents import check_model_config, parse_object
from .errors import ArtifactError

ARCHITECTURES = ("gemma4_text", "gemma3_text")
SLIDING = "sliding_attention"
FULL = "full_attention"
ROPE_TYPES = ("default", "linear", "proportional")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str  # "default"/"linear" (every pair rotates; linear divides by factor) or "proportional"
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]
    kv_heads: tuple[int, ...]
    intermediate_sizes: tuple[int, ...]
    kv_sources: tuple[int, ...]  # the layer whose keys/values layer i attends to (i itself unless KV-shared)
    k_eq_v: bool  # full-attention layers have no v_proj: V is the raw K projection
    sliding_window: int
    rope: dict[str, RopeConfig]  # by layer type
    rms_norm_eps: float
    final_logit_softcapping: float | None
    ple_dim: int  # hidden_size_per_layer_input; 0 = no per-layer embeddings
    ple_vocab_size: int
    max_position_embeddings: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    architecture: str = "gemma4_text"  # or "gemma3_text": the same decoder with the differences below
    activation: str = "gelu_pytorch_tanh"
    attention_scale: float = 1.0  # Gemma 3: query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = None
    value_norm: bool = True  # Gemma 4 RMS-normalizes V (no weight); Gemma 3 does not
    layer_scalars: bool = True  # Gemma 4 scales each layer's output; Gemma 3 has no such tensor
    # Gemma 4's own mixture-of-experts block (26B-A4B), which runs beside the dense MLP.
    moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    # The student's additions (docs/design.md), recorded so a runtime needs no flags to run it.
    mlp_experts: int = 0  # each dense MLP expanded into this many experts with a router; 0 = dense
    mlp_top_k: int = 0  # experts each token uses
    attnres: bool = False  # Block AttnRes across blocks that end at full-attention layers

    def __post_init__(self):
        # How the fields fit together; each field's type and range is documents.py's (from_dict, and the
        # converter's check of what it embeds), and the converter's config builder checks its own.
        problems = []
        L = self.num_layers
        for name in ("layer_types", "head_dims", "kv_heads", "intermediate_sizes", "kv_sources"):
            if len(getattr(self, name)) != L:
                problems.append(f"{name} has {len(getattr(self, name))} entries for {L} layers")
        if problems:
            raise ArtifactError("model config: " + "; ".join(problems))
        for i, t in enumerate(self.layer_types):
            if t not in (SLIDING, FULL):
                raise ArtifactError(f"model config: layer {i} has unknown type {t!r}")
            if t not in self.rope:
                raise ArtifactError(f"model config: no rope parameters for {t}")
            src = self.kv_sources[i]
            if not (0 <= src <= i) or self.kv_sources[src] != src or self.layer_types[src] != t:
                raise ArtifactError(f"model config: layer {i} takes keys/values from invalid layer {src}")
            if self.num_heads % self.kv_heads[i]:
                raise ArtifactError(f"model config: layer {i}: {self.num_heads} heads not divisible by {self.kv_heads[i]} kv heads")
        for t, r in self.rope.items():
            if r.rope_type not in ROPE_TYPES:
                raise ArtifactError(f"model config: rope type {r.rope_type!r} of {t} is not supported")
        if self.moe_block and not (0 < self.top_k_experts <= self.num_experts and self.moe_intermediate_size > 0):
            raise ArtifactError("model config: the MoE block needs 0 < top_k_experts <= num_experts and moe_intermediate_size")
        if self.mlp_experts and not (self.mlp_experts >= 2 and 0 < self.mlp_top_k <= self.mlp_experts):
            raise ArtifactError("model config: an expert MLP needs mlp_experts >= 2 and 0 < mlp_top_k <= mlp_experts")
        if self.ple_dim and self.ple_vocab_size < self.vocab_size:  # every token id looks up its own row
            raise ArtifactError(f"model config: ple_vocab_size {self.ple_vocab_size} is less than vocab_size "
                                f"{self.vocab_size}: a token's per-layer embedding would be read past the table")
        if self.architecture not in ARCHITECTURES or self.activation != "gelu_pytorch_tanh":
            raise ArtifactError(f"model config: unsupported architecture {self.architecture}/{self.activation}")

    def is_full(self, i: int) -> bool:
        return self.layer_types[i] == FULL

    def has_own_kv(self, i: int) -> bool:
        return self.kv_sources[i] == i

    def has_v_proj(self, i: int) -> bool:
        return not (self.k_eq_v and self.is_full(i))

    def attnres_blocks(self) -> list[range]:
        """Block AttnRes blocks: consecutive layers, each block ending at a full-attention layer."""
        ends = [i for i in range(self.num_layers) if self.is_full(i)]
        if not ends or ends[-1] != self.num_layers - 1:
            ends.append(self.num_layers - 1)
        return [range(start, end + 1) for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(parse_object("model config", text))

    @classmethod
    def from_dict(cls, value: dict) -> "ModelConfig":
        """The config of a parsed model_config.json: every field checked (documents.py), then built."""
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ArtifactError(f"model config: unknown fields {sorted(unknown)[:5]}")
        check_model_config(value)
        try:
            d = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            d["rope"] = {k: RopeConfig(**r) for k, r in d["rope"].items()}
            return cls(**d)
        except (TypeError, KeyError) as e:  # a field missing
            raise ArtifactError(f"model config is malformed: {e}") from None
