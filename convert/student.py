"""The student's float32 weights, by artifact name, before encoding (docs/design.md, "The student").

Most are the checkpoint's own tensors (with a LoRA adapter merged in, if given). The student's
additions are made here, deterministically from the seed:
- MoE expansion: expert 0 of each MLP is the dense MLP; expert e >= 1 is the dense MLP plus Gaussian
  noise of `moe_noise` x the tensor's RMS; the router [experts, hidden] starts near uniform.
- Block AttnRes: one gate per block, all `attnres_gate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ferrisres.format import ModelConfig
from ferrisres.format.schema import NORM, tensor_table

from .checkpoint import Checkpoint
from .errors import ConversionError
from .lora import LoraAdapter
from .names import expert_of, hf_name
from .quantize import DEFAULT_SCHEME
from .tables import DEFAULT_TABLES, TABLE_CHOICES

PACKINGS = ("2bit", "base3")  # grouped ternary: 4 codes per byte (ternary-gN), 5 (ternary5-gN, format 1.2)
SEQUENCE_TOKENS = 128  # tokens per calibration sequence (BOS included)

# The MLP down projections' planes by --planes: the 2-plane student gives them a third. Measured on Gemma 3
# 270M, they carry the largest share of the student's error per weight (docs/quantization.md).
DOWN_PLANES_DEFAULT = {1: 1, 2: 3}

ROUTER_INIT_STD = 0.02  # x hidden**-0.5: router logits start with a std of ~0.02, so routing is near uniform


@dataclass(frozen=True)
class Options:
    """Everything `ferrisres-convert` can be asked to do (the flags of the same names)."""

    quant: str = "ternary"  # or "bf16" / "f16" / "f32": the unquantized teacher
    method: str = "gptq"  # "gptq": calibrated (calibrate.py); "rtn": round to nearest, no calibration
    planes: int = 2  # ternary planes per weight (1: the strict 1.58-bit student)
    down_planes: int | None = None  # the MLP down projections' planes (None: DOWN_PLANES_DEFAULT[planes])
    plane_scales: str = "tied"  # "tied": each plane's scales 3x the next one's (a uniform grid); "free": each its own
    group: int = 64  # columns per scale (0: one scale per row)
    rotate: int = 64  # block Hadamard order of each linear's input rotation (0: none)
    packing: str = "2bit"  # grouped ternary codes: "2bit" (4 per byte) or "base3" (5 per byte)
    calibration: str = "teacher"  # "teacher" (text sampled from the float student) or a UTF-8 text file
    calibration_tokens: int = 8192
    scheme: str = DEFAULT_SCHEME  # per-row scale scheme of --method rtn --planes 1 --group row, see quantize.py
    moe_experts: int = 0  # 0 = dense MLPs
    moe_top_k: int = 2
    moe_noise: float = 0.01
    attnres: bool = False
    attnres_gate: float = 0.0
    seed: int = 0
    lora: str | None = None  # PEFT adapter folder, merged before quantization
    chat_template: str | None = None  # a Jinja chat template file, embedded in place of the checkpoint's
    tables: str | None = None  # both embedding tables' encoding (None: the student's default, a teacher's quant)
    per_layer_table: str | None = None  # the per-layer table's, if not that of --tables

    def planes_of(self, name: str) -> int:
        """Ternary planes of the linear `name`: the MLP down projections (dense, every expert, Gemma 4's MoE
        block) may carry more than the others (docs/quantization.md, "Where the planes go")."""
        if name.endswith("down_proj"):
            return self.down_planes or DOWN_PLANES_DEFAULT[self.planes]
        return self.planes

    @property
    def per_row(self) -> bool:
        """The original student: one scale per row by `scheme`, the `ternary` encoding."""
        return (self.method == "rtn" and self.planes == 1 and self.planes_of("down_proj") == 1 and self.group == 0
                and self.rotate == 0)

    def float_student(self) -> "Options":
        """The same student (MoE expansion, AttnRes, LoRA) unquantized, in bf16: what calibration runs.
        Its tables stay bf16: calibrating on the student's int8 tables measured worse on Gemma 3 270M
        (top-1 67.7% against 69.6%, perplexity 31.3 against 29.8)."""
        return replace(Options(), quant="bf16", moe_experts=self.moe_experts, moe_top_k=self.moe_top_k,
                       moe_noise=self.moe_noise, attnres=self.attnres, attnres_gate=self.attnres_gate,
                       seed=self.seed, lora=self.lora)

    def table_encodings(self) -> dict[str, str]:
        """The encoding of each embedding table, by artifact name."""
        if self.tables is not None:
            tables = self.tables
        else:  # a teacher keeps its tables as the rest of its weights unless asked
            tables = DEFAULT_TABLES if self.quant == "ternary" else self.quant
        return {"embed_tokens": tables, "embed_tokens_per_layer": self.per_layer_table or tables}

    def head_copy(self) -> bool:
        """A ternary student with a bf16 token embedding gets an int8 copy of the tied head (the fastest
        head in numpy); with a quantized one the head is that quantized table itself."""
        return self.quant == "ternary" and self.table_encodings()["embed_tokens"] == "bf16"

    def recorded(self) -> dict:
        """The options as the artifact's student_config.json and provenance record them: what was asked
        for, never where its files were (provenance names them and their digests)."""
        ternary = self.quant == "ternary"
        calibrated = ternary and self.method == "gptq"
        return {
            "quant": self.quant,
            "method": self.method if ternary else None,
            "planes": self.planes if ternary else None,
            "down_planes": self.planes_of("down_proj") if ternary else None,
            # one plane has no scales to tie
            "plane_scales": self.plane_scales if ternary and max(self.planes, self.planes_of("down_proj")) > 1 else None,
            "group": (self.group or "row") if ternary else None,
            "rotate": self.rotate if ternary else None,
            "packing": self.packing if ternary and not self.per_row else None,
            "calibration": ({"source": "teacher" if self.calibration == "teacher" else "text file",
                             "tokens": self.calibration_tokens} if calibrated else None),
            "scheme": self.scheme if ternary and self.per_row else None,
            "head": "int8-row" if self.head_copy() else "tied",
            "tables": self.table_encodings(),
            "moe": {"experts": self.moe_experts, "top_k": self.moe_top_k, "noise": self.moe_noise, "seed": self.seed}
            if self.moe_experts else None,
            "attnres": {"gate": self.attnres_gate} if self.attnres else None,
            "lora": "merged" if self.lora else None,
        }


class StudentWeights:
    """float32 weights of the student by artifact name, read (and derived) one tensor at a time."""

    def __init__(self, checkpoint: Checkpoint, prefix: str, config: ModelConfig, options: Options,
                 lora: LoraAdapter | None = None):
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.config = config
        self.tensors = tensor_table(config)
        self.options = options
        self.lora = lora

    def source_name(self, name: str) -> str | None:
        """The checkpoint tensor an artifact tensor comes from (None: made by the converter)."""
        return hf_name(name, self.prefix)

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
        expert = expert_of(name)
        w = self.checkpoint.read_f32(source, shape, rows)
        if self.lora is not None:
            w = self.lora.merged(source, w, rows)
        if self.config.architecture == "gemma3_text" and self.tensors[name].role == NORM:
            w = w + np.float32(1)  # Gemma 3's RMSNorm multiplies by (1 + w); the artifact stores that factor
        if expert and expert[0] > 0 and self.options.moe_noise:
            kind = ("gate_proj", "up_proj", "down_proj").index(expert[1])
            rng = np.random.default_rng([self.options.seed, layer, expert[0], kind])
            rms = np.sqrt(np.mean(np.square(w, dtype=np.float64)))
            w = (w + rng.standard_normal(w.shape) * (self.options.moe_noise * rms)).astype(np.float32)
        return w


def student_config(base: ModelConfig, options: Options) -> ModelConfig:
    """The model config of the student: the teacher's, with its MoE expansion and AttnRes."""
    if not isinstance(options.seed, int) or options.seed < 0:
        raise ConversionError(f"--seed must be an integer >= 0, got {options.seed}")
    if not 0 <= options.moe_noise <= 1:  # relative to each tensor's RMS: 1e300 overflowed the weights to Inf
        raise ConversionError(f"--moe-noise must be in [0, 1], got {options.moe_noise}")
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
    _check_quantization(options, defaults)
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


def _check_quantization(options: Options, defaults: Options) -> None:
    """The quantization flags make sense together (each refused with the flag that does not)."""
    if options.quant != "ternary":
        for flag in ("method", "planes", "down_planes", "plane_scales", "group", "rotate", "calibration", "calibration_tokens",
                     "scheme"):
            if getattr(options, flag) != getattr(defaults, flag):
                raise ConversionError(f"--{flag.replace('_', '-')} applies to ternary students, not to --quant {options.quant}")
        return
    if options.method not in ("gptq", "rtn"):
        raise ConversionError(f"--method must be gptq or rtn, got {options.method!r}")
    if options.planes not in (1, 2):
        raise ConversionError(f"--planes must be 1 or 2, got {options.planes}")
    if options.down_planes is not None and options.down_planes not in (1, 2, 3):
        raise ConversionError(f"--down-planes must be 1, 2 or 3, got {options.down_planes}")
    if options.plane_scales not in ("tied", "free"):
        raise ConversionError(f"--plane-scales must be tied or free, got {options.plane_scales!r}")
    if options.group < 0 or options.group % 4:
        raise ConversionError(f"--group must be a positive multiple of 4 or 'row', got {options.group}")
    if options.rotate < 0 or options.rotate & (options.rotate - 1) or options.rotate == 1:
        raise ConversionError(f"--rotate must be a power of two >= 2 or 'none', got {options.rotate}")
    if options.scheme != defaults.scheme and not options.per_row:
        raise ConversionError("--scheme sets per-row scales: it needs --method rtn --planes 1 (and no --group or --rotate)")
    if options.method != "gptq":
        for flag in ("calibration", "calibration_tokens"):
            if getattr(options, flag) != getattr(defaults, flag):
                raise ConversionError(f"--{flag.replace('_', '-')} has no effect without --method gptq")
    elif options.calibration_tokens < SEQUENCE_TOKENS:
        raise ConversionError(f"--calibration-tokens must be at least {SEQUENCE_TOKENS}, got {options.calibration_tokens}")
    elif options.calibration != "teacher" and not Path(options.calibration).is_file():
        raise ConversionError(f"--calibration {options.calibration}: no such file (give a UTF-8 text file, or 'teacher')")
    if options.attnres and options.attnres_gate and options.method == "gptq":
        raise ConversionError("--method gptq calibrates many sequences at once, which Block AttnRes with a "
                              "non-zero --attnres-gate cannot run yet: use --method rtn")
