"""Hostile documents inside an artifact: tokenizer.json settings (class 1 of issue 13) and every field of
every document the runtime reads (class 3). Each is refused at open (or, for tokenizer.json, before the
tokenizers library encodes anything) with one line naming the file, the document and the field, under a memory
limit and a timeout: no abort inside a library, no allocation sized by the document, no traceback."""

from __future__ import annotations

import json

import pytest

from hostile import document, refused, run_boxed, with_documents

RUN = ("ferrisres-run",)
RUN_ARGS = ("-p", "Hi", "-n", "2", "--raw")


@pytest.fixture(scope="module")
def base(converted):
    return converted("tiny_gemma4")


def _both_tools(path, *fragments):
    """The runtime and the inspector both refuse `path` with one line naming it and `fragments`."""
    refused(run_boxed("ferrisres-run", str(path), *RUN_ARGS), str(path), *fragments)
    refused(run_boxed("ferrisres-inspect", str(path)), str(path), *fragments)


# ---- class 1: tokenizer.json settings the tokenizers library would trust ----

_PADDING = {"strategy": {"Fixed": 10**12}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
            "pad_type_id": 0, "pad_token": "<pad>"}
_TRUNCATION = {"direction": "Right", "max_length": 10, "strategy": "LongestFirst", "stride": 100}
_DOUBLING = {"type": "Replace", "pattern": {"String": "a"}, "content": "aa"}
_STRIP_BOTH = {"type": "Strip", "content": " ", "start": 1, "stop": 3}
_ADDED = {"id": 10**12, "content": "x", "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": True}


@pytest.mark.parametrize("change, fragment", [
    (lambda t: {**t, "padding": _PADDING}, "padding must be null"),  # aborted the tokenizers library
    (lambda t: {**t, "padding": {**_PADDING, "strategy": {"Fixed": 5 * 10**7}}}, "padding must be null"),  # 3-5 GB
    (lambda t: {**t, "padding": {**_PADDING, "strategy": "BatchLongest", "pad_to_multiple_of": 10**12}},
     "padding must be null"),
    (lambda t: {**t, "truncation": _TRUNCATION}, "truncation must be null"),
    (lambda t: {**t, "added_tokens": [*t["added_tokens"], _ADDED]}, "added_tokens"),
    (lambda t: {**t, "added_tokens": [{"content": 5}]}, "added_tokens"),
    (lambda t: {**t, "model": {**t["model"], "type": "Fancy"}}, "model must be"),
    (lambda t: {**t, "model": 3}, "model must be"),
    # the text pipeline: a doubling Replace chained 8 times is 256x per pass (32 times: 2^32, an abort), in the
    # normalizer or the decoder; a Precompiled map the library panics on; a regular expression that exhausts
    # its engine on a crafted prompt
    (lambda t: {**t, "normalizer": {"type": "Sequence", "normalizers": [_DOUBLING] * 8}}, "normalizer must be"),
    (lambda t: {**t, "decoder": {"type": "Sequence", "decoders": [*t["decoder"]["decoders"], _DOUBLING]}},
     "decoder must be"),
    (lambda t: {**t, "normalizer": {"type": "Precompiled", "precompiled_charsmap": ""}}, "normalizer must be"),
    # 4 MiB of added-token text besides the fixture's own: the library's matcher over them takes ~70 bytes a character
    (lambda t: {**t, "added_tokens": [*t["added_tokens"], *({**_ADDED, "id": 1000 + i, "content": f"{i:0>1024}"}
                                                           for i in range(4096))]}, "characters in all"),
    (lambda t: {**t, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated",
                                       "invert": False}}, "pre_tokenizer must be"),
    (lambda t: {**t, "normalizer": {"type": "Sequence", "normalizers": [{"type": "Sequence", "normalizers": []}]}},
     "normalizer must be"),
    # an empty Prepend followed by another normalizer makes the library panic on every text
    (lambda t: {**t, "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": ""},
                                                                        {"type": "Lowercase"}]}}, "normalizer must be"),
    # the library's Strip decoder panics on any token shorter than its `stop` (an empty reply's text included)
    (lambda t: {**t, "decoder": {"type": "Sequence", "decoders": [*t["decoder"]["decoders"], _STRIP_BOTH]}},
     "decoder must be"),
], ids=["padding-1e12", "padding-5e7", "pad-multiple", "truncation", "added-id-huge", "added-malformed",
        "model-type", "model-not-object", "normalizer-doubling", "decoder-doubling", "precompiled-panic", "added-text",
        "split-regex",
        "nested-sequence", "empty-prepend", "strip-stop"])
def test_tokenizer_settings_are_refused_before_the_library_uses_them(base, tmp_path, change, fragment):
    bad = with_documents(base, tmp_path / "bad.tern", tokenizer_json=change(document(base, "tokenizer.json")))
    line = refused(run_boxed("ferrisres-run", str(bad), *RUN_ARGS), str(bad), "tokenizer.json", fragment)
    assert len(line) < 400


# ---- class 3: every field of every document the runtime reads ----

def _config(**changes):
    return lambda c: {**c, **changes}


@pytest.mark.parametrize("change, fragment", [
    (_config(mlp_experts=10**6, mlp_top_k=2), "mlp_experts must be an integer in [0, 1024]"),  # exhausted memory
    (_config(mlp_experts=2.0, mlp_top_k=1), "mlp_experts must be an integer"),
    (_config(num_experts=10**30), "num_experts must be"),
    (_config(hidden_size=10**40), "hidden_size must be"),
    (_config(num_layers=10**9), "num_layers must be"),
    (_config(vocab_size=True), "vocab_size must be"),
    (_config(attention_scale=float("nan")), "attention_scale must be"),
    (_config(attention_scale="big"), "attention_scale must be"),
    (_config(attention_scale=-1.0), "attention_scale must be"),
    (_config(attention_scale=10**400), "attention_scale must be"),  # beyond float: OverflowError before
    (_config(attn_logit_softcapping=0), "attn_logit_softcapping must be"),
    (_config(final_logit_softcapping=1e300), "final_logit_softcapping must be"),
    (_config(rms_norm_eps=[1]), "rms_norm_eps must be"),
    (_config(value_norm="yes"), "value_norm must be"),
    (_config(max_position_embeddings=10**25), "max_position_embeddings must be"),
    (_config(sliding_window=0), "sliding_window must be"),
    (_config(bos_token_id=512), "bos_token_id 512 is not below vocab_size 512"),
    (_config(ple_vocab_size=1), "ple_vocab_size 1 is less than vocab_size 512"),  # rows read past the table
    (_config(eos_token_ids=[2**40]), "eos_token_ids must be"),
    (_config(head_dims=[16.0] * 10), "head_dims must be"),
    (_config(kv_sources=[{}] * 10), "kv_sources must be"),
    (_config(layer_types=[[]] * 10), "layer_types must be"),
    (_config(rope={"full_attention": {"rope_type": "default", "theta": 1e400}}), "rope full_attention must be"),
    (_config(rope={"sliding_attention": {"rope_type": "default", "theta": 1.0, "extra": 1}}), "rope sliding_attention"),
    (_config(rope=[]), "rope must be"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_model_config_fields_are_typed_and_ranged_at_open(base, tmp_path, change, fragment):
    config = change(document(base, "model_config.json"))
    bad = with_documents(base, tmp_path / "bad.tern", model_config_json=json.dumps(config))  # NaN as Python writes it
    _both_tools(bad, "model config", fragment)


@pytest.mark.parametrize("changes, fragment", [
    ({"do_sample": True, "top_k": 2.5}, "top_k must be"),  # a traceback in sampling
    ({"do_sample": True, "top_k": 10**23}, "top_k must be"),
    ({"do_sample": True, "temperature": "hot"}, "temperature must be"),
    ({"do_sample": True, "temperature": 10**400}, "temperature must be"),
    ({"do_sample": True, "top_p": 0}, "top_p must be"),
    ({"do_sample": "yes"}, "do_sample must be"),
    ({"repetition_penalty": -1}, "repetition_penalty must be"),
    ({"eos_token_id": [1, "two"]}, "eos_token_id must be"),
])
def test_generation_config_fields_are_typed_and_ranged_at_open(base, tmp_path, changes, fragment):
    bad = with_documents(base, tmp_path / "bad.tern",
                         generation_config_json={**document(base, "generation_config.json"), **changes})
    _both_tools(bad, "generation_config.json", fragment)


@pytest.mark.parametrize("changes, fragment", [
    ({"chat_template": [{"name": ["default"], "template": "x"}]}, "chat_template must be"),  # unhashable name
    ({"chat_template": 42}, "chat_template must be"),
    ({"chat_template": "x" * ((1 << 20) + 1)}, "chat_template must be"),
])
def test_tokenizer_config_fields_are_typed_and_ranged_at_open(base, tmp_path, changes, fragment):
    bad = with_documents(base, tmp_path / "bad.tern",
                         tokenizer_config_json={**document(base, "tokenizer_config.json"), **changes})
    _both_tools(bad, "tokenizer_config.json", fragment)


def test_chat_template_file_size_is_bounded_at_open(base, tmp_path):
    bad = with_documents(base, tmp_path / "bad.tern", chat_template_jinja="{{ 'x' }}" + " " * (1 << 20))
    _both_tools(bad, "chat_template.jinja", "more than a chat template may have")


# ---- the text pipelines the checks accept never panic ----

_PIECES = ["a", "aa", " ", "▁", "日", "\u0301", "xxxxx"]
_BEHAVIORS = ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]
_METASPACE = lambda r: {"type": "Metaspace", "replacement": r.choice(["▁", " ", "日"]),  # noqa: E731
                        "prepend_scheme": r.choice(["always", "never", "first"]), "split": r.random() < 0.5}


def _replace(r):
    pattern = r.choice(_PIECES)
    return {"type": "Replace", "pattern": {"String": pattern},
            "content": r.choice([p for p in ["", *_PIECES] if len(p) <= len(pattern)])}


_NORMALIZERS = [_replace, lambda r: {"type": "Prepend", "prepend": r.choice(["", *_PIECES])},
                lambda r: {"type": r.choice(["NFC", "NFD", "Lowercase"])},
                lambda r: {"type": "Strip", "strip_left": r.random() < 0.5, "strip_right": r.random() < 0.5}]
_PRE_TOKENIZERS = [lambda r: {"type": "Split", "pattern": {"String": r.choice(_PIECES)}, "behavior": r.choice(_BEHAVIORS),
                              "invert": r.random() < 0.5},
                   _METASPACE, lambda r: {"type": r.choice(["Whitespace", "WhitespaceSplit"])},
                   lambda r: {"type": "Punctuation", "behavior": r.choice(_BEHAVIORS)},
                   lambda r: {"type": "Digits", "individual_digits": r.random() < 0.5}]
_DECODERS = [_replace, lambda r: {"type": r.choice(["ByteFallback", "Fuse"])}, _METASPACE,
             lambda r: {"type": "Strip", "content": r.choice([" ", "▁"]), "start": r.choice([0, 1, 3]), "stop": r.choice([0, 0, 2])}]


def _pipeline(r, makers, field):
    parts = [r.choice(makers)(r) for _ in range(r.randint(0, 5))]
    return parts[0] if len(parts) == 1 else {"type": "Sequence", field: parts}


def test_every_text_pipeline_the_checks_accept_encodes_and_decodes_without_a_panic(base):
    # Seeded random pipelines of the components the checks allow, with the parameters they allow and some
    # they refuse (an empty Prepend, a Strip decoder's `stop`): those the checks accept must encode and
    # decode any text without the library panicking (it found both of those refused here).
    import random

    from tokenizers import Tokenizer

    from ferrisres.format.documents import check_tokenizer
    from ferrisres.format.errors import ArtifactError

    r, tokenizer, texts = random.Random(0), document(base, "tokenizer.json"), ["", " ", "Hi there", "  x  ", "▁▁a",
                                                                               "日本語 テキスト", "é\u0301 12 345", "a" * 40]
    accepted = 0
    for _ in range(400):
        candidate = {**tokenizer, "normalizer": _pipeline(r, _NORMALIZERS, "normalizers"),
                     "pre_tokenizer": _pipeline(r, _PRE_TOKENIZERS, "pretokenizers"),
                     "decoder": _pipeline(r, _DECODERS, "decoders")}
        try:
            check_tokenizer(candidate)
        except ArtifactError:
            continue
        accepted += 1
        library = Tokenizer.from_str(json.dumps(candidate))
        for text in texts:
            ids = library.encode(text, add_special_tokens=False).ids  # a panic fails the test
            for some in (ids, ids[:1], [], [r.randrange(500) for _ in range(5)]):
                library.decode(some, skip_special_tokens=False)
    assert accepted > 100
