"""The types and ranges of every field the runtime reads from an artifact's documents, in one place.

An artifact may come from anyone, and its documents are handed to numpy, Jinja and the tokenizers
library, none of which expect hostile values: a 10^12-token padding aborts the tokenizers library,
10^6 experts exhaust memory, a float where an index belongs ends in a traceback far from the file.
So the reader checks each document here when it opens the artifact, and the converter checks what it
is about to embed with the same functions. Every bound is far above what any Gemma model uses and
low enough that nothing computed from it can exhaust memory before the tensors are checked against
the file. A problem is an `ArtifactError` naming the document and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from .errors import ArtifactError

MAX_DIMENSION = 1 << 20  # hidden, head, intermediate sizes (Gemma 4 31B: 21,504)
MAX_VOCAB = 1 << 24  # vocabulary rows (Gemma: 262,144)
MAX_LAYERS = 1024  # decoder layers (Gemma 4 31B: 60)
MAX_HEADS = 1024  # attention heads per layer
MAX_EXPERTS = 1024  # experts of an MoE block or of an expanded MLP (Gemma 4 26B-A4B: 128)
MAX_POSITIONS = 1 << 62  # context length and sliding window: declared, never allocated (caches grow with tokens)
MAX_TOKEN_ID = (1 << 31) - 1  # what every tokenizer and numpy index type holds
MAX_TEMPLATE = 1 << 20  # bytes of a chat template (Gemma 4's is ~15 KB)
MAX_DOCUMENT = 1 << 27  # bytes a compressed document may inflate to (Gemma's largest tokenizer.json: 33 MB)
MAX_ADDED_TOKEN = 1 << 10  # characters of an added token's text
# characters of all added tokens together: the tokenizers library builds a matcher over them at ~70 bytes a
# character (20 million of them took 1.4 GB, measured)
MAX_ADDED_TEXT = 1 << 22

Check = Callable[[object], str | None]  # a value's problem in a few words, or None if it is fine


def integer(low: int, high: int) -> Check:
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            return f"an integer in [{low}, {high}]"
    return check


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Check:
    def check(v):
        # an int is finite whatever its size (math.isfinite(10**400) would raise OverflowError)
        ok = isinstance(v, float) and math.isfinite(v) or isinstance(v, int) and not isinstance(v, bool)
        if ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high):
            return None
        return f"a finite number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return check


def boolean(v):
    if not isinstance(v, bool):
        return "true or false"


def text(max_chars: int) -> Check:
    def check(v):
        if not isinstance(v, str) or len(v) > max_chars:
            return f"a string of at most {max_chars} characters"
    return check


def one_of(*choices) -> Check:
    def check(v):
        if not isinstance(v, str) or v not in choices:
            return "one of " + ", ".join(choices)
    return check


def optional(inner: Check) -> Check:
    return lambda v: None if v is None else (lambda p: p and f"null or {p}")(inner(v))


def list_of(inner: Check, max_len: int, item: str = "entry") -> Check:
    def check(v):
        if not isinstance(v, list) or len(v) > max_len:
            return f"a list of at most {max_len} entries"
        for i, value in enumerate(v):
            problem = inner(value)
            if problem:
                return f"a list whose entries are {problem} ({item} {i} has {_shown(value)})"
    return check


def obj(fields: dict[str, Check], required: tuple[str, ...] = (), others: bool = True) -> Check:
    """A JSON object whose `fields` (when present) pass their checks; `others`: other keys are allowed."""
    def check(v):
        if not isinstance(v, dict):
            return "a JSON object"
        for key in required:
            if key not in v:
                return f"an object with the field {key}"
        for key, value in v.items():
            if key in fields:
                problem = fields[key](value)
                if problem:
                    return f"an object whose {key} is {problem}"
            elif not others:
                return f"an object without the field {str(key)[:50]!r}"
    return check


def check_fields(document: str, value: dict, fields: dict[str, Check]) -> None:
    """Raise an ArtifactError naming `document` and the first field of `value` that fails its check."""
    for name, check in fields.items():
        if name in value:
            problem = check(value[name])
            if problem:
                raise ArtifactError(f"{document}: {name} must be {problem}, got {_shown(value[name])}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- model_config.json: every field (ModelConfig also checks how they fit together) ----

_ROPE = obj({"rope_type": text(64), "theta": number(0, low_open=True), "partial_rotary_factor": number(0, 1),
             "factor": number(0, low_open=True)}, required=("rope_type", "theta"), others=False)
_LAYER_LIST = lambda entry: list_of(entry, MAX_LAYERS, "layer")  # noqa: E731
MODEL_CONFIG_FIELDS: dict[str, Check] = {
    "vocab_size": integer(1, MAX_VOCAB),
    "hidden_size": integer(1, MAX_DIMENSION),
    "num_layers": integer(1, MAX_LAYERS),
    "num_heads": integer(1, MAX_HEADS),
    "layer_types": _LAYER_LIST(text(64)),
    "head_dims": _LAYER_LIST(integer(1, MAX_DIMENSION)),
    "kv_heads": _LAYER_LIST(integer(1, MAX_HEADS)),
    "intermediate_sizes": _LAYER_LIST(integer(1, MAX_DIMENSION)),
    "kv_sources": _LAYER_LIST(integer(0, MAX_LAYERS - 1)),
    "k_eq_v": boolean,
    "sliding_window": integer(1, MAX_POSITIONS),
    "rope": obj({}, others=True),  # its values: _ROPE, checked below
    "rms_norm_eps": number(0, 1),
    "final_logit_softcapping": optional(number(0, 1e6, low_open=True)),
    "ple_dim": integer(0, MAX_DIMENSION),
    "ple_vocab_size": integer(1, MAX_VOCAB),
    "max_position_embeddings": integer(1, MAX_POSITIONS),
    "bos_token_id": integer(0, MAX_VOCAB - 1),
    "eos_token_ids": list_of(integer(0, MAX_VOCAB - 1), 64),
    "pad_token_id": integer(0, MAX_VOCAB - 1),
    "architecture": text(64),
    "activation": text(64),
    "attention_scale": number(0, 1e6, low_open=True),
    "attn_logit_softcapping": optional(number(0, 1e6, low_open=True)),
    "value_norm": boolean,
    "layer_scalars": boolean,
    "moe_block": boolean,
    "num_experts": integer(0, MAX_EXPERTS),
    "top_k_experts": integer(0, MAX_EXPERTS),
    "moe_intermediate_size": integer(0, MAX_DIMENSION),
    "mlp_experts": integer(0, MAX_EXPERTS),
    "mlp_top_k": integer(0, MAX_EXPERTS),
    "attnres": boolean,
}


def check_model_config(value: dict) -> None:
    """model_config.json, field by field, before a ModelConfig is built from it."""
    check_fields("model config", value, MODEL_CONFIG_FIELDS)
    for layer_type, rope in value.get("rope", {}).items():
        problem = _ROPE(rope)
        if problem:
            raise ArtifactError(f"model config: rope {str(layer_type)[:50]} must be {problem}, got {_shown(rope)}")
    if isinstance(value.get("vocab_size"), int):
        for name in ("bos_token_id", "pad_token_id"):
            if isinstance(value.get(name), int) and value[name] >= value["vocab_size"]:
                raise ArtifactError(f"model config: {name} {value[name]} is not below vocab_size {value['vocab_size']}")


# ---- generation_config.json: the fields the runtime reads (transformers writes many others) ----

_TOKEN_IDS = lambda v: None if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKEN_ID \
    else list_of(integer(0, MAX_TOKEN_ID), 64)(v)  # noqa: E731
GENERATION_CONFIG_FIELDS: dict[str, Check] = {
    "do_sample": optional(boolean),
    "temperature": optional(lambda v: None if v == 0 and not isinstance(v, bool) else  # 0: greedy
                            number(1e-6, 1e6)(v) and "0 or a finite number in [1e-06, 1000000.0]"),
    "top_k": optional(integer(0, MAX_TOKEN_ID)),
    "top_p": optional(number(0, 1, low_open=True)),
    "min_p": optional(number(0, 1, high_open=True)),
    "repetition_penalty": optional(number(0, 1e6, low_open=True)),
    "bos_token_id": optional(_TOKEN_IDS),
    "eos_token_id": optional(_TOKEN_IDS),
    "pad_token_id": optional(_TOKEN_IDS),
}


# ---- tokenizer_config.json: the chat template (its special tokens are read only when they are strings) ----

_NAMED_TEMPLATE = obj({"name": text(256), "template": text(MAX_TEMPLATE)}, required=("name", "template"))


def check_tokenizer_config(value: dict) -> None:
    template = value.get("chat_template")
    if template is not None:
        problem = text(MAX_TEMPLATE)(template) and list_of(_NAMED_TEMPLATE, 64)(template)
        if problem:
            raise ArtifactError(f"tokenizer_config.json: chat_template must be a string of at most {MAX_TEMPLATE} "
                                f"characters or a list of {{name, template}} objects, got {_shown(template)}")


# ---- tokenizer.json: what the tokenizers library would trust ----

_ADDED_TOKEN = obj({"id": integer(0, MAX_TOKEN_ID), "content": text(MAX_ADDED_TOKEN)}, required=("id", "content"))

# The text pipeline runs in Rust on every prompt and every token printed, with no bound of its own: a Replace
# of "a" by "aa" repeated 32 times turns "a" into 2^32 characters (the library aborts), a malformed
# Precompiled map panics. Only components Gemma's tokenizers and the GGUF conversion's use are accepted, in
# one Sequence at most, none of which makes a text more than a few characters longer.
MAX_PIPELINE = 16  # components of a Sequence (Gemma's decoder: 3)
MAX_PREPEND = 64  # characters a Prepend adds (Gemma's GGUF tokenizer: 1)


def _no_longer_replace(v: dict) -> str | None:
    pattern, content = v.get("pattern"), v.get("content")
    s = pattern.get("String") if isinstance(pattern, dict) else None
    if not (isinstance(s, str) and s and isinstance(content, str) and len(content) <= len(s)):
        return "a Replace of a non-empty string by one no longer"
    return None


def _string_split(v: dict) -> str | None:
    pattern = v.get("pattern")
    if not (isinstance(pattern, dict) and isinstance(pattern.get("String"), str)):
        return "a Split on a string (a regular expression can exhaust its engine on a crafted text)"
    return None


def _prepend(v: dict) -> str | None:
    # an empty one leaves alignments that the next normalizer (Lowercase, NFD) indexes past: a panic
    if not (isinstance(v.get("prepend"), str) and 1 <= len(v["prepend"]) <= MAX_PREPEND):
        return f"a Prepend of 1 to {MAX_PREPEND} characters"
    return None


def _leading_strip(v: dict) -> str | None:
    if v.get("stop") != 0:  # the library's Strip indexes past the start of a token shorter than `stop`: a panic
        return "a Strip of leading characters only (stop 0)"
    return None


def pipeline(sequence_field: str, components: dict[str, Callable[[dict], str | None] | None]) -> Check:
    """A tokenizer component (normalizer, pre_tokenizer, decoder): null, one of `components` (a type and the
    check of its fields, None when it has none to check), or a Sequence of them under `sequence_field`."""
    kinds = ", ".join(components)

    def component(v):
        if not isinstance(v, dict) or v.get("type") not in components:
            return f"one of {kinds}"
        check = components[v["type"]]
        return check(v) if check else None

    def check(v):
        if v is None:
            return None
        if isinstance(v, dict) and v.get("type") == "Sequence":
            problem = list_of(component, MAX_PIPELINE)(v.get(sequence_field))
            return problem and f"a Sequence whose {sequence_field} are {problem}"
        return component(v)
    return check


TOKENIZER_FIELDS: dict[str, Check] = {
    # The runtime encodes one text at a time: it never pads, and never cuts a prompt short. The
    # tokenizers library allocates a fixed padding length up front (10^12 aborts it), so these must be off.
    "padding": lambda v: None if v is None else "null (the runtime never pads)",
    "truncation": lambda v: None if v is None else "null (the runtime never truncates a prompt)",
    "added_tokens": lambda v: list_of(_ADDED_TOKEN, MAX_VOCAB)(v) or (
        sum(len(t["content"]) for t in v) > MAX_ADDED_TEXT and f"tokens of at most {MAX_ADDED_TEXT} characters in all"
        or None),
    "model": obj({"type": one_of("BPE", "Unigram", "WordLevel", "WordPiece")}, required=("type",)),
    "normalizer": pipeline("normalizers", {"Replace": _no_longer_replace, "Prepend": _prepend, "NFC": None, "NFD": None,
                                           "Lowercase": None, "Strip": None}),
    "pre_tokenizer": pipeline("pretokenizers", {"Split": _string_split, "Metaspace": None, "Whitespace": None,
                                                "WhitespaceSplit": None, "Punctuation": None, "Digits": None}),
    "decoder": pipeline("decoders", {"Replace": _no_longer_replace, "ByteFallback": None, "Fuse": None, "Strip": _leading_strip,
                                     "Metaspace": None}),
}


def check_tokenizer(value: dict) -> None:
    check_fields("tokenizer.json", value, TOKENIZER_FIELDS)


def check_loaded_tokenizer(tokenizer) -> None:
    """TOKENIZER_FIELDS checked on what the tokenizers library read from tokenizer.json (a `Tokenizer`):
    the same rules as check_tokenizer without parsing the document's tens of MB a second time in Python.
    Reading the settings is safe; a padding length is only allocated when a text is encoded."""
    pipeline = {name: json.loads(part.__getstate__()) for name in ("normalizer", "pre_tokenizer", "decoder")
                if (part := getattr(tokenizer, name)) is not None}
    check_tokenizer({"padding": tokenizer.padding, "truncation": tokenizer.truncation,
                     "added_tokens": [{"id": i, "content": t.content} for i, t in tokenizer.get_added_tokens_decoder().items()],
                     "model": {"type": type(tokenizer.model).__name__}, **pipeline})


def check_chat_template(template: str) -> None:
    if len(template) > MAX_TEMPLATE:
        raise ArtifactError(f"chat_template.jinja: {len(template)} characters, more than a chat template may have "
                            f"({MAX_TEMPLATE})")


# Each JSON document the runtime reads, and its check (the others need only be JSON objects; model_config.json
# is checked by ModelConfig as it is built, with check_model_config).
DOCUMENT_CHECKS: dict[str, Callable[[dict], None]] = {
    "generation_config.json": lambda v: check_fields("generation_config.json", v, GENERATION_CONFIG_FIELDS),
    "tokenizer_config.json": check_tokenizer_config,
    "tokenizer.json": check_tokenizer,
}


def check_document(name: str, text: str) -> dict | None:
    """Document `name` parsed, when it is one of the JSON documents, and checked; returns its value."""
    if not name.endswith(".json"):
        if name == "chat_template.jinja":
            check_chat_template(text)
        return None
    value = parse_object(f"document {name}", text)
    if name in DOCUMENT_CHECKS:
        DOCUMENT_CHECKS[name](value)
    return value


def parse_object(what: str, text: str) -> dict:
    """`text` parsed as JSON, which must be an object (`what` names it in the error)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{what} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{what} is not a JSON object")
    return value
