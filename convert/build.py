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
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ferrisres.format import HEAD, ArtifactWriter, ModelConfig, f32_to_bf16, pack_ternary, weight_shapes
from ferrisres.format.encodings import base3_fits, pack_base3
from ferrisres.format.writer import work_folder
from ferrisres.format.documents import check_document
from ferrisres.format.errors import ArtifactError
from ferrisres.format.reader import Artifact
from ferrisres.format.validate import stored_shape_of
from ferrisres.format.schema import FLOAT32_ROLES, SCALE_SUFFIX, TABLE, tensor_table
from ferrisres.format.tables import SCALE_ENCODINGS

from . import __version__
from .checkpoint import Checkpoint
from .errors import ConversionError
from .gguf_source import GGUFSource, is_gguf
from .hf_config import eos_token_ids, model_config, read_config, read_json_object, text_config_with_defaults
from .lora import LoraAdapter
from .names import MULTIMODAL_PREFIXES, SHARED_KV_SUFFIXES, TEXT_PREFIXES
from .quantize import TritPlanes, group_size_for, rotation_for, round_to_planes, ternarize
from .source_files import read_source, source_file
from .student import Options, StudentWeights, student_config
from .tables import quantize_table_rows

log = logging.getLogger("ferrisres.convert")

QUANTS = ("ternary", "bf16", "f16", "f32")
_BLOCK_BYTES = 64 << 20  # float32 bytes per block of rows when streaming a big table


def convert(model_dir: Path, out: Path, options: Options, *, overwrite: bool = False,
            progress: bool = True) -> ModelConfig:
    """Convert the checkpoint in `model_dir` into the artifact `out`; returns the model config written.
    Every input problem is found before anything is written."""
    source = _read_input(model_dir, options)
    _write_artifact(source, out, options, overwrite, progress)
    return source.config


@dataclass
class _Input:
    """The checkpoint, read and checked: what an artifact of it is written from."""

    model_dir: Path
    config: ModelConfig
    documents: dict[str, str | dict]
    checkpoint: Checkpoint | GGUFSource
    weights: StudentWeights
    shapes: dict[str, tuple[int, ...]]


def _read_input(model_dir: Path, options: Options) -> _Input:
    if not model_dir.exists():
        raise ConversionError(f"{model_dir} does not exist")
    # ---- input: a checkpoint folder, or a GGUF file standing in for one (gguf_source.py) ----
    gguf_input = None
    if model_dir.is_file() and is_gguf(model_dir):
        # the gguf package parses every metadata entry first: ~25 s for a 262144-piece vocabulary
        log.info("reading %s (GGUF metadata and vocabulary: can take half a minute)", model_dir.name)
        gguf_input = GGUFSource(model_dir)
    if gguf_input is None and not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a folder (nor a GGUF file)")
    if gguf_input is not None:
        text_config, generation_config = text_config_with_defaults(gguf_input.text_config), gguf_input.generation_config
    else:
        text_config, _ = read_config(model_dir)
        generation_config = _read_json(model_dir / "generation_config.json")
    config = student_config(model_config(text_config, eos_token_ids(text_config, generation_config)), options)
    if gguf_input is not None:
        log.info("building the tokenizer from the GGUF vocabulary")
    documents = gguf_input.documents() if gguf_input is not None else _folder_documents(model_dir, generation_config)
    if options.chat_template:
        documents["chat_template.jinja"] = read_chat_template(Path(options.chat_template))
    _check_documents(model_dir, config, documents)
    # ---- end of input ----
    lora = LoraAdapter(Path(options.lora)) if options.lora else None
    checkpoint = gguf_input if gguf_input is not None else Checkpoint(model_dir)
    weights = StudentWeights(checkpoint, _text_prefix(checkpoint, model_dir), config, options, lora)
    shapes = weight_shapes(config)
    sources = {weights.source_name(name): shape for name, shape in shapes.items() if weights.source_name(name)}
    for name, shape in sources.items():
        checkpoint.check(name, shape)
    if lora is not None:
        lora.check_targets(set(sources), checkpoint)
    _log_skipped(checkpoint, set(sources))
    return _Input(model_dir, config, documents, checkpoint, weights, shapes)


def _write_artifact(source: _Input, out: Path, options: Options, overwrite: bool, progress: bool) -> None:
    config, documents, checkpoint, weights, shapes = (source.config, source.documents, source.checkpoint,
                                                      source.weights, source.shapes)
    with _calibration(source, out, options) as calibration, \
            ArtifactWriter(out, overwrite=overwrite, check=_reopen) as writer:
        writer.add_document("model_config.json", config.to_json())
        writer.add_document("student_config.json", options.recorded())
        for document, content in documents.items():  # tokenizer.json, tokenizer_config.json, ...
            writer.add_document(document, content)
        writer.add_document("provenance.json", _provenance(source.model_dir, checkpoint, options))

        tensors = tensor_table(config)
        for name, shape in _progress(shapes.items(), progress):
            if options.quant == "ternary" and tensors[name].ternary:
                _write_projection(writer, name, shape, weights, options, calibration)
            elif tensors[name].role in FLOAT32_ROLES:
                writer.add_tensor(name, weights.read(name, shape), "f32")
            elif tensors[name].role == TABLE:
                _write_table(writer, weights, name, shape, options.table_encodings()[name])
            else:
                source = weights.source_name(name)
                encoding = _float_encoding(checkpoint.tensors[source].dtype, options.quant)
                blocks = (_encode(b, encoding) for b in _row_blocks(weights, name, shape))
                writer.add_tensor_rows(name, blocks, shape, encoding)
        if options.head_copy():  # the tied head as its own int8 copy with per-row scales
            _write_quantized_rows(writer, HEAD, _row_blocks(weights, "embed_tokens", shapes["embed_tokens"]),
                                  shapes["embed_tokens"], "int8")


@contextmanager
def _calibration(source: _Input, out: Path, options: Options):
    """For --method gptq, a `Calibration` over the float student, written from the same opened input
    to a temporary artifact beside the output (removed afterwards); None otherwise."""
    if options.quant != "ternary" or options.method != "gptq":
        yield None
        return
    from ferrisres.runtime import load, set_threads  # the converter runs the model only to calibrate

    from .calibrate import Calibration, calibration_sequences

    set_threads(os.cpu_count() or 1)
    with work_folder(out) as work:
        float_student = work / "float-student.tern"
        log.info("calibration: writing the float student (bf16) to a temporary artifact")
        try:
            _write_artifact(source, float_student, options.float_student(), overwrite=False, progress=False)
        except ArtifactError as e:
            raise ConversionError(f"cannot write {out}: calibration's temporary float model beside it failed: {e}") from None
        model = load(float_student)
        try:
            sequences = calibration_sequences(model, options.calibration, options.calibration_tokens, options.seed)
            log.info("calibration: %d sequences of %d tokens", len(sequences), len(sequences[0]))
            ternary = {name for name, tensor in tensor_table(source.config).items() if tensor.ternary}
            yield Calibration(model, source.weights, ternary, sequences, options.planes_of, options.group, options.rotate,
                              options.plane_scales == "tied")
        finally:
            model.artifact.close()


def _write_projection(writer: ArtifactWriter, name: str, shape: tuple[int, ...], weights: StudentWeights,
                      options: Options, calibration) -> None:
    """A decoder projection as the ternary student stores it: per-row `ternary` (the original scheme),
    or grouped trit-planes, calibrated or rounded to nearest."""
    if options.per_row:
        codes, scale = ternarize(weights.read(name, shape).reshape(-1, shape[-1]), options.scheme)
        writer.add_tensor(name, pack_ternary(codes).reshape(*shape[:-1], -1), "ternary", shape=shape)
        writer.add_tensor(name + SCALE_SUFFIX, scale.reshape(shape[:-1]) if scale.size > 1 else scale, "f32")
        return
    n_in = shape[-1]
    if n_in % 4:
        raise ConversionError(f"{name}: grouped ternary needs an input width divisible by 4, not {n_in} "
                              "(use --method rtn --planes 1 --group row --rotate none)")
    if calibration is not None:
        parts: list[TritPlanes] = calibration.quantized(name)
    else:
        w = weights.read(name, shape)
        group, rotation = group_size_for(n_in, options.group or n_in), rotation_for(n_in, options.rotate)
        tied = options.plane_scales == "tied"
        parts = [round_to_planes(m, options.planes_of(name), group, rotation, tied) for m in (w if w.ndim == 3 else w[None])]
    planes = options.planes_of(name)
    codes = np.stack([p.codes for p in parts]).reshape(-1, n_in)
    scales = np.stack([p.scales for p in parts]).reshape(*shape[:-1], planes, -1)
    # base-3 bytes hold whole groups only when the groups are whole blocks of 64 columns: a tensor whose
    # groups are not (an input width without such a divisor) keeps the 2-bit packing
    base3 = options.packing == "base3" and base3_fits(n_in, scales.shape[-1])
    packed = (pack_base3 if base3 else pack_ternary)(codes).reshape(*shape[:-1], planes, -1)
    encoding = f"ternary5-g{planes}" if base3 else f"ternary-g{planes}"
    writer.add_tensor(name, packed, encoding, shape=shape, rotation=parts[0].rotation)
    writer.add_tensor(name + SCALE_SUFFIX, scales, "f16")


def _check_documents(model_dir: Path, config: ModelConfig, documents: dict[str, str | dict]) -> None:
    """The checks the runtime makes when it opens the artifact, made on what is about to be embedded."""
    texts = {"model_config.json": config.to_json(), **documents}
    try:
        ModelConfig.from_json(texts["model_config.json"])
        for name, content in texts.items():
            check_document(name, content if isinstance(content, str) else json.dumps(content))
    except ArtifactError as e:
        raise ConversionError(f"{model_dir}: {e}") from None


def _reopen(written: Path) -> None:
    """The complete artifact, opened with the runtime's own checks before it takes its final name."""
    try:
        with Artifact.open(written) as artifact:
            check_document("tokenizer.json", artifact.document("tokenizer.json"))
    except ArtifactError as e:
        raise ConversionError(f"the artifact written would not open, so it was not kept: {e}") from None


def _folder_documents(model_dir: Path, generation_config: dict | None) -> dict[str, str | dict]:
    """The tokenizer and generation documents of a checkpoint folder, as the artifact embeds them."""
    tokenizer = model_dir / "tokenizer.json"
    if source_file(tokenizer) is None:
        raise ConversionError(f"{model_dir} has no tokenizer.json")
    documents: dict[str, str | dict] = {"tokenizer.json": _read_text(tokenizer)}
    for optional in ("tokenizer_config.json", "chat_template.jinja"):
        if source_file(model_dir / optional):
            documents[optional] = _read_text(model_dir / optional)
    if generation_config is not None:
        documents["generation_config.json"] = generation_config
    return documents


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


def _provenance(model_dir: Path, checkpoint: Checkpoint, options: Options) -> dict:
    """The converter, the options and every source file by name and digest. Not the paths nor the
    command line as typed: the same input content and options give the same bytes, wherever the files
    are and whatever the output is called."""
    extra = model_dir.iterdir() if model_dir.is_dir() else ()  # a GGUF file is its own only source
    files = sorted({*checkpoint.files, *(p for p in extra if p.suffix in (".json", ".jinja") and source_file(p))})
    sources = {p.name: _file_digest(p) for p in files}
    if options.lora:
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # what LoraAdapter reads
            sources[f"lora/{name}"] = _file_digest(Path(options.lora) / name)
    if options.chat_template:
        sources["chat_template/" + Path(options.chat_template).name] = _file_digest(Path(options.chat_template))
    if options.quant == "ternary" and options.method == "gptq" and options.calibration != "teacher":
        sources["calibration/" + Path(options.calibration).name] = _file_digest(Path(options.calibration))
    provenance = {
        "converter": f"ferrisres {__version__}",
        "options": options.recorded(),
        "source_files": sources,
    }
    if "SOURCE_DATE_EPOCH" in os.environ:  # no wall-clock time otherwise: same input, same bytes
        provenance["created"] = int(os.environ["SOURCE_DATE_EPOCH"])
    return provenance


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return "blake2b-256:" + hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=32)).hexdigest()


def _read_text(path: Path) -> str:
    try:
        return read_source(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path} is not valid UTF-8 (byte {e.start})") from None


def read_chat_template(path: Path) -> str:
    """A Jinja chat template file, checked to parse, so a broken one is refused before any work."""
    if not path.is_file():
        raise ConversionError(f"--chat-template {path}: no such file")
    text = _read_text(path)
    try:
        ImmutableSandboxedEnvironment().parse(text)  # parsed only; the runtime renders it in the same sandbox
    except jinja2.TemplateSyntaxError as e:
        raise ConversionError(f"--chat-template {path}: not a Jinja template (line {e.lineno}: {e.message})") from None
    return text


def _read_json(path: Path) -> dict | None:
    return read_json_object(path) if source_file(path) else None


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(list(items), desc="converting", unit="tensor", disable=None)
