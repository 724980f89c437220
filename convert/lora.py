"""A PEFT LoRA adapter, merged into the weights before quantization: W += (alpha / r) * B @ A.

Merging first and quantizing the merged weight (the FerrisRes PR #68 order) is what lets a
fine-tuned adapter survive ternarization; quantizing first would throw the adapter's update away.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .errors import ConversionError
from .source_files import read_source, source_file

_PEFT_PREFIX = "base_model.model."


class LoraAdapter:
    """`adapter_config.json` + `adapter_model.safetensors`, as PEFT saves them."""

    def __init__(self, folder: Path):
        config_path = folder / "adapter_config.json"
        if source_file(config_path) is None:
            raise ConversionError(f"--lora {folder}: no adapter_config.json")
        try:
            config = json.loads(read_source(config_path).decode("utf-8"))
            r, alpha = int(config["r"]), float(config["lora_alpha"])
            if not 1 <= r <= 2**20 or not np.isfinite(alpha):
                raise ValueError(r)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):  # OverflowError: int(Infinity)
            raise ConversionError(f"{config_path}: needs an integer r in [1, 2^20] and a finite lora_alpha") from None
        for unsupported in ("use_dora", "fan_in_fan_out"):
            if config.get(unsupported):
                raise ConversionError(f"{config_path}: {unsupported} adapters are not supported")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ConversionError(f"{config_path}: per-module rank_pattern/alpha_pattern is not supported")
        if source_file(folder / "adapter_model.safetensors") is None:
            raise ConversionError(f"--lora {folder}: no adapter_model.safetensors (pickled .bin adapters are not read)")
        self.scale = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
        self.weights = Checkpoint(folder)
        self.modules: dict[str, tuple[str, str]] = {}  # checkpoint weight name -> (A name, B name)
        for name in self.weights.tensors:
            if name.endswith(".lora_A.weight"):
                module = name[: -len(".lora_A.weight")]
                b = module + ".lora_B.weight"
                if b not in self.weights.tensors:
                    raise ConversionError(f"{folder}: {name} has no matching lora_B")
                target = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
                self.modules[target + ".weight"] = (name, b)
        if not self.modules:
            raise ConversionError(f"--lora {folder}: the adapter holds no lora_A/lora_B weights")

    def check_targets(self, used: set[str], checkpoint: Checkpoint) -> None:
        """Every adapted module must be a weight the student converts, with matching shapes."""
        for target, (a, b) in self.modules.items():
            if target not in used:
                raise ConversionError(f"--lora: the adapter's module {target} is not a weight this model converts")
            out_dim, in_dim = checkpoint.tensors[target].shape
            shape_a, shape_b = self.weights.tensors[a].shape, self.weights.tensors[b].shape
            if shape_a[1:] != (in_dim,) or shape_b[:1] != (out_dim,) or shape_a[0] != shape_b[1]:
                raise ConversionError(f"--lora: {a} {list(shape_a)} / {b} {list(shape_b)} do not fit {target} {[out_dim, in_dim]}")

    def merged(self, source: str, w: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
        """`w` (the weight `source`, or its rows r0:r1) with the adapter's update added, in float32."""
        pair = self.modules.get(source)
        if pair is None:
            return w
        a, b = (self.weights.read_f32(n, self.weights.tensors[n].shape) for n in pair)
        if rows is not None:
            b = b[rows[0] : rows[1]]
        return (w + np.float32(self.scale) * (b @ a)).astype(np.float32)
