"""The student's float32 weights, by artifact name, before encoding (design.md §2).

Most are the checkpoint's own tensors (with a LoRA adapter merged in, if given). The student's
additions are made here, deterministically from the seed:
- MoE expansion: expert 0 of each MLP is the dense MLP; expert e >= 1 is the dense MLP plus Gaussian
  noise of `moe_noise` x the tensor's RMS; the router [experts, hidden] starts near uniform.
- Block AttnRes: one gate per block, all `attnres_gate`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ferrisres.format import ModelConfig

from .checkpoint import Checkpoint
from .errors import ConversionError
from .lora import LoraAdapter
from .quantize import DEFAULT_SCHEME
from .tables import DEFAULT_PER_LAYER_TABLE, DEFAULT_TABLES, TABLE_CHOICES

# Checkpoint parameters stored without a ".weight" suffix.
BARE_PARAMETERS = ("layer_scalar", "router.scale", "router.per_expert_scale", "experts.gate_up_proj", "experts.down_proj")
ROUTER_INIT_STD = 0.02  # x hidden**-0.5: router logits start with a std of ~0.02, so routing is near uniform
_EXPERT = re.compile(r"(layers\.\d+\.mlp\.)experts\.(\d+)\.(\w+_proj)$")


@dataclass(frozen=True)
class Options:
    """Everything `ferrisres-convert` can be asked to do (the flags of the same names)."""

    quant: str = "ternary"  # or "bf16" / "f16" / "f32": the unquantized teacher
    scheme: str = DEFAULT_SCHEME  # ternary scale scheme, see quantize.py
    moe_experts: int = 0  # 0 = dense MLPs
    moe_top_k: int = 2
    moe_noise: float = 0.01
    attnres: bool = False
    attnres_gate: float = 0.0
    seed: int = 0
    lora: str | None = None  # PEFT adapter folder, merged before quantization
    tables: str | None = None  # both embedding tables' encoding (None: the student's default, a teacher's quant)
    per_layer_table: str | None = None  # the per-layer table's, if not that of --tables

    def table_encodings(self) -> dict[str, str]:
        """The encoding of each embedding table, by artifact name."""
        if self.tables is not None:
            default, per_layer = self.tables, self.tables
        elif self.quant == "ternary":
            default, per_layer = DEFAULT_TABLES, DEFAULT_PER_LAYER_TABLE
        else:  # a teacher keeps its tables as the rest of its weights unless asked
            default, per_layer = self.quant, self.quant
        return {"embed_tokens": default, "embed_tokens_per_layer": self.per_layer_table or per_layer}

    def head_copy(self) -> bool:
        """A ternary student with a bf16 token embedding gets an int8 copy of the tied head (the fastest
        head in numpy); with a quantized one the head is that quantized table itself."""
        return self.quant == "ternary" and self.table_encodings()["embed_tokens"] == "bf16"

    def recorded(self) -> dict:
        """The options as the artifact's student_config.json and provenance record them."""
        return {
            "quant": self.quant,
            "scheme": self.scheme if self.quant == "ternary" else None,
            "head": "int8-row" if self.head_copy() else "tied",
            "tables": self.table_encodings(),
            "moe": {"experts": self.moe_experts, "top_k": self.moe_top_k, "noise": self.moe_noise, "seed": self.seed}
            if self.moe_experts else None,
            "attnres": {"gate": self.attnres_gate} if self.attnres else None,
            "lora": Path(self.lora).name if self.lora else None,
        }


class StudentWeights:
    """float32 weights of the student by artifact name, read (and derived) one tensor at a time."""

    def __init__(self, checkpoint: Checkpoint, prefix: str, config: ModelConfig, options: Options,
                 lora: LoraAdapter | None = None):
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.config = config
        self.options = options
        self.lora = lora

    def source_name(self, name: str) -> str | None:
        """The checkpoint tensor an artifact tensor comes from (None: made by the converter)."""
        expert = _EXPERT.match(name)
        if expert:
            name = expert.group(1) + expert.group(3)
        elif name.endswith("mlp.router") or name == "attnres_gates":
            return None
        return self.prefix + name + ("" if name.endswith(BARE_PARAMETERS) else ".weight")

    def read(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name` (or its rows r0:r1, for the big tables) as float32."""
        if name == "attnres_gates":
            return np.full(shape, self.options.attnres_gate, dtype=np.float32)
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        if name.endswith("mlp.router"):
            rng = np.random.default_rng([self.options.seed, layer, 1 << 20])
            std = ROUTER_INIT_STD * self.config.hidden_size**-0.5
            return (rng.standard_normal(shape) * std).astype(np.float32)
        source = self.source_name(name)
        expert = _EXPERT.match(name)
        w = self.checkpoint.read_f32(source, shape, rows)
        if self.lora is not None:
            w = self.lora.merged(source, w, rows)
        if self.config.architecture == "gemma3_text" and len(shape) == 1:
            w = w + np.float32(1)  # Gemma 3's RMSNorm multiplies by (1 + w); the artifact stores that factor
        if expert and int(expert.group(2)) > 0 and self.options.moe_noise:
            kind = ("gate_proj", "up_proj", "down_proj").index(expert.group(3))
            rng = np.random.default_rng([self.options.seed, layer, int(expert.group(2)), kind])
            rms = np.sqrt(np.mean(np.square(w, dtype=np.float64)))
            w = (w + rng.standard_normal(w.shape) * (self.options.moe_noise * rms)).astype(np.float32)
        return w


def student_config(base: ModelConfig, options: Options) -> ModelConfig:
    """The model config of the student: the teacher's, with its MoE expansion and AttnRes."""
    if not isinstance(options.seed, int) or options.seed < 0:
        raise ConversionError(f"--seed must be an integer >= 0, got {options.seed}")
    if not math.isfinite(options.moe_noise) or options.moe_noise < 0:
        raise ConversionError(f"--moe-noise must be a finite number >= 0, got {options.moe_noise}")
    if not math.isfinite(options.attnres_gate):
        raise ConversionError(f"--attnres-gate must be a finite number, got {options.attnres_gate}")
    defaults = Options()
    for flag, given, needs, default in (
        ("--attnres-gate", options.attnres_gate, "--attnres", defaults.attnres_gate),
        ("--moe-top-k", options.moe_top_k, "--moe-experts", defaults.moe_top_k),
        ("--moe-noise", options.moe_noise, "--moe-experts", defaults.moe_noise),
    ):
        enabled = options.attnres if needs == "--attnres" else options.moe_experts
        if given != default and not enabled:
            raise ConversionError(f"{flag} has no effect without {needs}")
    if options.quant != "ternary" and options.scheme != defaults.scheme:
        raise ConversionError(f"--scheme applies to ternary students, not to --quant {options.quant}")
    for flag, value in (("--tables", options.tables), ("--per-layer-table", options.per_layer_table)):
        if value is not None and value not in TABLE_CHOICES:
            raise ConversionError(f"{flag} must be one of {', '.join(TABLE_CHOICES)}, got {value!r}")
    if options.per_layer_table is not None and not base.ple_dim:
        raise ConversionError("--per-layer-table: this model has no per-layer embedding table")
    if options.moe_experts:
        if base.moe_block:
            raise ConversionError("--moe-experts: this model already has Gemma 4's own MoE block; its experts are kept as they are")
        if options.moe_experts < 2:
            raise ConversionError(f"--moe-experts must be >= 2, got {options.moe_experts}")
        if not 1 <= options.moe_top_k <= options.moe_experts:
            raise ConversionError(f"--moe-top-k must be between 1 and --moe-experts ({options.moe_experts}), got {options.moe_top_k}")
    return replace(
        base,
        mlp_experts=options.moe_experts,
        mlp_top_k=options.moe_top_k if options.moe_experts else 0,
        attnres=options.attnres,
    )
