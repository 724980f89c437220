"""Gemma 4 checkpoint folder -> `.tern` artifact: the conversion pipeline.

Each weight is read, encoded and written before the next is read, so memory holds one tensor (or,
for the big embedding tables, one block of rows) at a time. What the student is:
- every decoder projection (q/k/v/o, MLP gate/up/down, per-layer-input gate and projection) becomes
  ternary with float32 scales (`--quant ternary`), or stays a float in the chosen dtype (teacher);
- norms and layer scalars stay float32; the embedding tables are stored as `--tables` says
  (a ternary student's default: quantized, see tables.py; a teacher's: its dtype);
- a ternary student with bf16 tables gets an int8 per-row copy of the tied output head, the fastest
  per-token matvec in numpy; with quantized tables the head is the quantized token embedding itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ferrisres.format import HEAD, ArtifactWriter, ModelConfig, f32_to_bf16, pack_ternary, weight_shapes
from ferrisres.format.reader import stored_shape_of
from ferrisres.format.schema import SCALE_SUFFIX, TABLES
from ferrisres.format.tables import SCALE_ENCODINGS

from . import __version__
from .checkpoint import Checkpoint
from .errors import ConversionError
from .gguf_source import GGUFSource, is_gguf
from .hf_config import eos_token_ids, model_config, read_config, read_json_object, text_config_with_defaults
from .lora import LoraAdapter
from .quantize import ternarize
from .student import Options, StudentWeights, student_config
from .tables import quantize_table_rows

log = logging.getLogger("ferrisres.convert")

QUANTS = ("ternary", "bf16", "f16", "f32")
TERNARY_SUFFIXES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "gate_proj", "up_proj",
    "down_proj", "per_layer_input_gate", "per_layer_projection", "experts.gate_up_proj", "experts.down_proj",
)
TEXT_PREFIXES = ("model.language_model.", "model.")  # multimodal (as the real E2B) or text-only
MULTIMODAL_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
SHARED_KV_SUFFIXES = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")
_BLOCK_BYTES = 64 << 20  # float32 bytes per block of rows when streaming a big table


def convert(model_dir: Path, out: Path, options: Options, *, overwrite: bool = False,
            command_line: list[str] | None = None, progress: bool = True) -> ModelConfig:
    """Convert the checkpoint in `model_dir` into the artifact `out`; returns the model config written.
    Every input problem is found before anything is written."""
    if not model_dir.exists():
        raise ConversionError(f"{model_dir} does not exist")
    # ---- input: a checkpoint folder, or a GGUF file standing in for one (gguf_source.py) ----
    gguf_input = GGUFSource(model_dir) if model_dir.is_file() and is_gguf(model_dir) else None
    if gguf_input is None and not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a folder (nor a GGUF file)")
    if gguf_input is not None:
        text_config, generation_config = text_config_with_defaults(gguf_input.text_config), gguf_input.generation_config
    else:
        text_config, _ = read_config(model_dir)
        generation_config = _read_json(model_dir / "generation_config.json")
    config = student_config(model_config(text_config, eos_token_ids(text_config, generation_config)), options)
    documents = gguf_input.documents() if gguf_input is not None else _folder_documents(model_dir, generation_config)
    # ---- end of input ----
    lora = LoraAdapter(Path(options.lora)) if options.lora else None
    checkpoint = gguf_input if gguf_input is not None else Checkpoint(model_dir)
    weights = StudentWeights(checkpoint, _text_prefix(checkpoint, model_dir), config, options, lora)
    shapes = weight_shapes(config)
    sources = {weights.source_name(name): shape for name, shape in shapes.items() if weights.source_name(name)}
    for source, shape in sources.items():
        checkpoint.check(source, shape)
    if lora is not None:
        lora.check_targets(set(sources), checkpoint)
    _log_skipped(checkpoint, set(sources))

    with ArtifactWriter(out, overwrite=overwrite) as writer:
        writer.add_document("model_config.json", config.to_json())
        writer.add_document("student_config.json", options.recorded())
        for document, content in documents.items():  # tokenizer.json, tokenizer_config.json, ...
            writer.add_document(document, content)
        writer.add_document("provenance.json", _provenance(model_dir, checkpoint, options, command_line))

        for name, shape in _progress(shapes.items(), progress):
            if options.quant == "ternary" and _is_projection(name):
                codes, scale = ternarize(weights.read(name, shape).reshape(-1, shape[-1]), options.scheme)
                writer.add_tensor(name, pack_ternary(codes).reshape(*shape[:-1], -1), "ternary", shape=shape)
                writer.add_tensor(name + SCALE_SUFFIX, scale.reshape(shape[:-1]) if scale.size > 1 else scale, "f32")
            elif len(shape) == 1 or _is_router(name):  # norms, scalars, gates and routers stay float32
                writer.add_tensor(name, weights.read(name, shape), "f32")
            elif name in TABLES:
                _write_table(writer, weights, name, shape, options.table_encodings()[name])
            else:
                source = weights.source_name(name)
                encoding = _float_encoding(checkpoint.tensors[source].dtype, options.quant)
                blocks = (_encode(b, encoding) for b in _row_blocks(weights, name, shape))
                writer.add_tensor_rows(name, blocks, shape, encoding)
        if options.head_copy():  # the tied head as its own int8 copy with per-row scales
            _write_quantized_rows(writer, HEAD, _row_blocks(weights, "embed_tokens", shapes["embed_tokens"]),
                                  shapes["embed_tokens"], "int8")
    return config


def _folder_documents(model_dir: Path, generation_config: dict | None) -> dict[str, str | dict]:
    """The tokenizer and generation documents of a checkpoint folder, as the artifact embeds them."""
    tokenizer = model_dir / "tokenizer.json"
    if not tokenizer.is_file():
        raise ConversionError(f"{model_dir} has no tokenizer.json")
    documents: dict[str, str | dict] = {"tokenizer.json": _read_text(tokenizer)}
    for optional in ("tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / optional).is_file():
            documents[optional] = _read_text(model_dir / optional)
    if generation_config is not None:
        documents["generation_config.json"] = generation_config
    return documents


def _is_projection(name: str) -> bool:
    """The decoder's linear maps: what a ternary student makes ternary."""
    return name.endswith(TERNARY_SUFFIXES)


def _is_router(name: str) -> bool:
    return name.endswith(("mlp.router", "router.proj"))


def _write_table(writer: ArtifactWriter, weights: StudentWeights, name: str, shape: tuple[int, int],
                 encoding: str) -> None:
    """An embedding table, streamed a block of rows at a time, as a float or quantized."""
    blocks = _row_blocks(weights, name, shape)
    if encoding in ("bf16", "f16", "f32"):
        writer.add_tensor_rows(name, (_encode(b, encoding) for b in blocks), shape, encoding)
    else:
        _write_quantized_rows(writer, name, blocks, shape, encoding)


def _write_quantized_rows(writer: ArtifactWriter, name: str, blocks, shape: tuple[int, int], encoding: str) -> None:
    """A table (or the head copy) quantized block by block of rows (format/tables.py), then its scales."""
    scales = []

    def quantized():
        for block in blocks:
            q, s = quantize_table_rows(block, encoding, name)
            scales.append(s)
            yield q

    writer.add_tensor_rows(name, quantized(), stored_shape_of(encoding, shape), encoding, shape=shape)
    writer.add_tensor(name + SCALE_SUFFIX, np.concatenate(scales), SCALE_ENCODINGS[encoding])


def _row_blocks(weights: StudentWeights, name: str, shape: tuple[int, ...]):
    if len(shape) != 2:
        yield weights.read(name, shape)
        return
    rows = max(1, _BLOCK_BYTES // (4 * shape[1]))
    for r0 in range(0, shape[0], rows):
        yield weights.read(name, shape, rows=(r0, min(r0 + rows, shape[0])))


def _float_encoding(source_dtype: str, quant: str) -> str:
    """A teacher is written in the dtype asked for. A ternary student keeps float32 sources in float32
    and stores everything else (bf16, f16, a GGUF's quantized types) as bf16, as precise as needed."""
    if quant != "ternary":
        return quant
    return "f32" if source_dtype == "F32" else "bf16"


def _encode(block: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "bf16":
        return f32_to_bf16(block)
    if encoding == "f16":
        return block.astype(np.float16)
    return block


def _text_prefix(checkpoint: Checkpoint, model_dir: Path) -> str:
    for prefix in TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in checkpoint:
            return prefix
    raise ConversionError(
        f"{model_dir}: no Gemma 4 text weights (neither model.language_model.embed_tokens.weight "
        "nor model.embed_tokens.weight)"
    )


def _log_skipped(checkpoint: Checkpoint, used: set[str]) -> None:
    skipped = sorted(set(checkpoint.tensors) - used)
    towers = [n for n in skipped if n.startswith(MULTIMODAL_PREFIXES)]
    shared_kv = [n for n in skipped if n.endswith(SHARED_KV_SUFFIXES)]
    other = sorted(set(skipped) - set(towers) - set(shared_kv))
    if towers:
        log.info("skipped %d vision/audio tensors (the student is text-only)", len(towers))
    if shared_kv:
        log.info("skipped %d k_proj/v_proj/k_norm tensors of KV-shared layers (Gemma 4 never uses them)", len(shared_kv))
    if other:
        log.warning("ignored %d tensors this model does not use, e.g. %s", len(other), other[0])


def _provenance(model_dir: Path, checkpoint: Checkpoint, options: Options, command_line: list[str] | None) -> dict:
    extra = model_dir.iterdir() if model_dir.is_dir() else ()  # a GGUF file is its own only source
    files = sorted({*checkpoint.files, *(p for p in extra if p.suffix in (".json", ".jinja") and p.is_file())})
    provenance = {
        "converter": f"ferrisres {__version__}",
        "command_line": command_line,
        "options": options.recorded(),
        "source_files": {p.name: _file_digest(p) for p in files},
    }
    if "SOURCE_DATE_EPOCH" in os.environ:  # no wall-clock time otherwise: same input, same bytes
        provenance["created"] = int(os.environ["SOURCE_DATE_EPOCH"])
    return provenance


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return "blake2b-256:" + hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=32)).hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path} is not valid UTF-8 (byte {e.start})") from None


def _read_json(path: Path) -> dict | None:
    return read_json_object(path) if path.is_file() else None


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(list(items), desc="converting", unit="tensor", disable=None)
