"""Read a GGUF file (llama.cpp) as if it were a Hugging Face checkpoint folder.

`GGUFSource` offers what the converter takes from a folder: the text config as transformers'
config.json would hold it, tokenizer.json / tokenizer_config.json / generation_config.json (rebuilt
by gguf_tokenizer.py), and the weights under Hugging Face names through the same interface as
checkpoint.py's `Checkpoint` (`tensors`, `check`, `read_f32`, `files`). The `gguf` package parses
the file and memory-maps it; a tensor (or a block of its rows) is dequantized only when read, so
memory holds one tensor at a time.

What llama.cpp's convert_hf_to_gguf.py (`Gemma3Model`) changed, undone here:
- names: `token_embd` <- `model.embed_tokens`, `blk.{i}.attn_q` <- `model.layers.{i}.self_attn.q_proj`,
  ... (names.py); `output.weight` exists only for an untied head;
- shapes: GGUF lists dimensions fastest-first, so the Hugging Face shape is the reverse; the bytes
  are in the same row-major order, nothing is transposed;
- norms: every `*norm.weight` was stored as w + 1 (Gemma3RMSNorm multiplies by 1 + w; llama.cpp's
  RMSNorm by the weight): the Hugging Face weight is the GGUF value - 1. (On the real Gemma 3 270M
  GGUF, value - 1 is exactly a bfloat16 number for every norm entry while the value itself is not:
  w + 1 of a bf16 checkpoint, computed in float32.)
- q/k: no permutation. llama.cpp permutes q/k rows only for its llama-architecture RoPE
  (`LlamaModel.modify_tensors`); `Gemma3Model` derives from `TextModel` and keeps HF's order
  (Gemma uses the same half-split "neox" RoPE as transformers).
- token_embd: rows beyond the tokenizer's vocabulary were dropped (262208 -> 262144 for the larger
  Gemma 3 models; the 270M has 262144 already): the config's vocab_size is token_embd's row count.

Config facts the GGUF does not carry are filled as llama.cpp itself assumes them for `gemma3`
(src/llama-model.cpp): sliding-window pattern 6 (every 6th layer global), local RoPE base 10000,
query_pre_attn_scalar = head_dim (hidden_size / heads for the 62-layer 27B), gelu_pytorch_tanh,
tied embeddings, no attention bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferrisres.format import FULL, SLIDING
from ferrisres.format.documents import MAX_LAYERS

from .errors import ConversionError, require_extra
from .gguf_header import check_gguf_header
from .gguf_tokenizer import GGUFVocab, eos_token_ids, tokenizer_documents
from .names import gguf_to_hf, norm_shift

SUPPORTED_ARCHITECTURES = ("gemma3",)
GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """A file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # Hugging Face name
    gguf_name: str
    dtype: str  # GGML type name: F32, F16, BF16, Q8_0, Q4_K, Q6_K, ...
    shape: tuple[int, ...]  # Hugging Face order (the GGUF dimensions reversed)
    source: object = field(repr=False, compare=False)  # gguf.ReaderTensor


class GGUFSource:
    """A GGUF file presented as a Hugging Face checkpoint: config, tokenizer files and tensors by HF name."""

    def __init__(self, path: Path):
        # the converter's `convert` extra; imported here so HF folders convert without it
        gguf = require_extra("gguf", f"{path.name}: GGUF input")
        self._gguf = gguf
        self.path = path
        self.folder = path  # what error messages name
        self.files = [path]
        check_gguf_header(path)
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError, KeyError, IndexError, EOFError) as e:
            detail = " ".join(str(e).split())
            raise ConversionError(f"{path} is not a readable GGUF file (truncated or corrupt? {detail})") from None
        self.metadata = {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}
        arch = self.metadata.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            hint = "; convert the Hugging Face checkpoint folder instead" if arch == "gemma4" else ""
            raise ConversionError(
                f"{path.name}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)}{hint})"
            )
        self.architecture = arch
        self.tensors: dict[str, GGUFTensor] = {}
        for t in self.reader.tensors:
            name = gguf_to_hf(t.name) or t.name  # unknown tensors keep their GGUF name: the converter reports them as unused
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[name] = GGUFTensor(name, t.name, t.tensor_type.name, shape, t)
        if "model.embed_tokens.weight" not in self.tensors:
            raise ConversionError(f"{path.name}: GGUF file has no token_embd.weight")
        context = self._meta("context_length", int, None)
        try:
            self.vocab = GGUFVocab.from_metadata(self.metadata, model_max_length=context, tokenizer_class="GemmaTokenizer")
        except ConversionError as e:
            raise ConversionError(f"{path.name}: {e}") from None
        self.text_config = self._gemma3_config()
        ids = {"bos_token_id": self.vocab.bos_id, "eos_token_id": eos_token_ids(self.vocab), "pad_token_id": self.vocab.pad_id}
        self.generation_config = {k: v for k, v in ids.items() if v is not None}
        if len(self.vocab.tokens) > self.text_config["vocab_size"]:
            raise ConversionError(f"{path.name}: the tokenizer has {len(self.vocab.tokens)} tokens, "
                                  f"token_embd only {self.text_config['vocab_size']} rows")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    # ---- the Checkpoint interface -------------------------------------------------------------

    def check(self, name: str, shape: tuple[int, ...]) -> GGUFTensor:
        """The tensor `name`, which must exist with `shape` and a type the gguf package can dequantize."""
        t = self.tensors.get(name)
        if t is None:
            raise ConversionError(f"tensor {name} is missing from {self.path.name}")
        if t.shape != tuple(shape):
            raise ConversionError(f"tensor {name} ({t.gguf_name}) has shape {list(t.shape)}, the config implies {list(shape)}")
        self._dequantize(t, (0, 1) if len(t.shape) > 1 else None)  # a trial on one row: unsupported types fail here
        return t

    def read_f32(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name` (or its rows r0:r1) as float32 under Hugging Face conventions (norms without the +1)."""
        t = self.check(name, shape)
        data = self._dequantize(t, rows)
        shift = norm_shift(t.gguf_name)
        if shift:
            data = data - np.float32(shift)
        if not np.isfinite(data).all():
            where = f" (rows {rows[0]}-{rows[1]})" if rows else ""
            raise ConversionError(f"tensor {name} ({t.gguf_name}) contains NaN or Inf{where}")
        return data

    def documents(self) -> dict[str, str | dict]:
        """tokenizer.json, tokenizer_config.json and generation_config.json, as a checkpoint folder has them."""
        docs = tokenizer_documents(self.vocab)
        docs["generation_config.json"] = self.generation_config
        return docs

    # ---- internals ----------------------------------------------------------------------------

    def _dequantize(self, t: GGUFTensor, rows: tuple[int, int] | None) -> np.ndarray:
        gguf = self._gguf
        raw = t.source.data  # memory-mapped: [rows, bytes per row] for block-quantized types
        if rows is not None:
            raw = raw[rows[0] : rows[1]]
        qtype = t.source.tensor_type
        try:
            if qtype == gguf.GGMLQuantizationType.F64:
                data = np.asarray(raw, dtype=np.float32)
            else:
                data = gguf.quants.dequantize(raw, qtype)
        except NotImplementedError:
            raise ConversionError(
                f"{self.path.name}: tensor {t.gguf_name} has type {qtype.name}, which the gguf package cannot dequantize"
            ) from None
        out_shape = t.shape if rows is None else (rows[1] - rows[0], *t.shape[1:])
        return np.ascontiguousarray(data, dtype=np.float32).reshape(out_shape)

    def _meta(self, key: str, kind: type, default):
        value = self.metadata.get(f"{self.architecture}.{key}")
        if value is None:
            return default
        try:
            if kind is float:
                return float(str(np.float32(value)))  # the decimal the float32 came from: 1e-06, not 9.99999997e-07
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ConversionError(f"{self.path.name}: GGUF metadata {self.architecture}.{key} is not a "
                                  f"{kind.__name__}: {str(value)[:40]}") from None

    def _gemma3_config(self) -> dict:
        """The text config as transformers' Gemma3TextConfig (config.json of a Gemma3ForCausalLM) holds it."""
        m, name = self._meta, self.path.name
        keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
        required = {key: m(key, int, None) for key in keys}
        missing = [k for k, v in required.items() if v is None]
        if missing:
            raise ConversionError(f"{name}: GGUF metadata lacks {self.architecture}.{missing[0]}")
        layers, hidden = required["block_count"], required["embedding_length"]
        if not 1 <= layers <= MAX_LAYERS:  # per-layer lists are built from it next
            raise ConversionError(f"{name}: GGUF metadata {self.architecture}.block_count {layers} is not in "
                                  f"[1, {MAX_LAYERS}]")
        heads = required["attention.head_count"]
        head_dim = m("attention.key_length", int, 256)
        if m("attention.value_length", int, head_dim) != head_dim:
            raise ConversionError(f"{name}: key_length {head_dim} != value_length {m('attention.value_length', int, None)}")
        window = m("attention.sliding_window", int, None)
        layer_types = self._layer_types(layers, window)
        scale = m("attention.scale", float, None)
        if scale:  # newer GGUFs may state the attention scale; it is query_pre_attn_scalar ** -0.5
            query_pre_attn_scalar = round(scale**-2, 6)
        else:  # llama.cpp's rule for gemma3: head_dim, except the 62-layer 27B (hidden / heads)
            query_pre_attn_scalar = hidden // heads if layers == 62 else head_dim
        rope_scaling = None
        scaling_type = self.metadata.get(f"{self.architecture}.rope.scaling.type")
        if scaling_type not in (None, "none"):
            rope_scaling = {"rope_type": scaling_type, "factor": m("rope.scaling.factor", float, 1.0)}
        embed = self.tensors["model.embed_tokens.weight"].shape
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": embed[0],
            "hidden_size": hidden,
            "intermediate_size": required["feed_forward_length"],
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": m("attention.head_count_kv", int, heads),
            "head_dim": head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": m("context_length", int, 131072),
            "rms_norm_eps": m("attention.layer_norm_rms_epsilon", float, 1e-6),
            "rope_theta": m("rope.freq_base", float, 1000000.0),
            "rope_local_base_freq": m("rope.freq_base_swa", float, 10000.0),
            "rope_scaling": rope_scaling,
            "query_pre_attn_scalar": query_pre_attn_scalar,
            "sliding_window": window if window else m("context_length", int, 131072),
            "sliding_window_pattern": self._sliding_period(),
            "layer_types": layer_types,
            "final_logit_softcapping": m("final_logit_softcapping", float, None),
            "attn_logit_softcapping": m("attn_logit_softcapping", float, None),
            "attention_bias": False,
            "use_bidirectional_attention": False,
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "bos_token_id": self.vocab.bos_id,
            "eos_token_id": self.vocab.eos_id,
            "pad_token_id": self.vocab.pad_id,
        }

    def _sliding_period(self) -> int:
        pattern = self.metadata.get(f"{self.architecture}.attention.sliding_window_pattern", 6)
        return 6 if isinstance(pattern, list) or not pattern else int(pattern)  # layer_types states a list

    def _layer_types(self, layers: int, window: int | None) -> list[str]:
        """Which layers use the sliding window: llama.cpp's fixed gemma3 pattern (every 6th layer global)
        unless the GGUF states one (`attention.sliding_window_pattern`, a period or one flag per layer)."""
        if not window:  # converted from a config with sliding_window_pattern 1: no sliding layers
            return [FULL] * layers
        pattern = self.metadata.get(f"{self.architecture}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            if len(pattern) != layers:
                raise ConversionError(f"{self.path.name}: sliding_window_pattern has {len(pattern)} entries for {layers} layers")
            return [SLIDING if flag else FULL for flag in pattern]
        period = int(pattern)  # llama.cpp's set_swa_pattern: layer i slides unless i % period == period - 1; 0: all slide
        return [SLIDING if not period or (i + 1) % period else FULL for i in range(layers)]
