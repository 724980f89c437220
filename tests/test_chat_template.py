"""The published Gemma 4 IT chat template (fixtures/gemma4_it/, see its SOURCE.md) renders here as
transformers renders it, and its text tokenizes to the ids the real Gemma 4 tokenizer gives.

Expected text and ids: computed with transformers and the real 262144-piece Gemma 3 vocabulary plus
the Gemma 4 special tokens, when the fixture was added. That tokenizer is ~33 MB, so the test builds a small one
with the same pipeline (BPE with byte fallback, ' ' -> '▁', Split on ' ' merged with previous,
decoders Replace/ByteFallback/Fuse) whose vocabulary holds the REAL ids of exactly the pieces this text
needs; the pieces along the way to them (single characters, partial words) get stand-in ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from ferrisres.runtime.chat_template import ChatTemplateError, render_chat

FIXTURE = Path(__file__).parent / "fixtures" / "gemma4_it"
TEMPLATE_SHA256 = "0a2c8073c878ab1da004bee933a998606537bbb62016310352c7285c3f01c5b5"  # the Hub file's digest

# Special tokens as transformers passes them to the template (Gemma 4's tokenizer_config.json).
SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}

POEM = "Write a poem about Machine Learning."
EXPECTED_TEXT = "<bos><|turn>user\nWrite a poem about Machine Learning.<turn|>\n<|turn>model\n"
EXPECTED_IDS = [2, 105, 2364, 107, 6974, 496, 27355, 1003, 15313, 19180, 236761, 106, 107, 105, 4368, 107]

# The real ids (Gemma 3 vocabulary + Gemma 4 specials) of every token the expected text consists of.
SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|turn>": 105, "<turn|>": 106}
PIECE_IDS = {"\n": 107, "user": 2364, "model": 4368, "Write": 6974, "▁a": 496, "▁poem": 27355,
             "▁about": 1003, "▁Machine": 15313, "▁Learning": 19180, ".": 236761}
BYTE_IDS = 238  # <0x00>..<0xFF> are ids 238..493 in the Gemma vocabulary
STAND_IN_IDS = 262000  # partial pieces and single characters: not their real ids (unused by this test)


@pytest.fixture(scope="module")
def template() -> str:
    data = (FIXTURE / "chat_template.jinja").read_bytes()
    assert hashlib.sha256(data).hexdigest() == TEMPLATE_SHA256, "the fixture is no longer the published file"
    return data.decode("utf-8")


def gemma_tokenizer() -> Tokenizer:
    """A Gemma-pipeline tokenizer with the real ids of PIECE_IDS and SPECIAL_IDS.

    Each piece is built by merges that grow it one character at a time from the left ("▁a" + "b" ->
    "▁ab", ...); "▁a" is itself a real piece and the first step of "▁about"."""
    vocab = {token: i for token, i in SPECIAL_IDS.items()}
    vocab.update({f"<0x{b:02X}>": BYTE_IDS + b for b in range(256)})
    vocab.update(PIECE_IDS)
    merges = []
    next_id = STAND_IN_IDS

    def piece(text: str) -> None:
        nonlocal next_id
        if text not in vocab:
            vocab[text] = next_id
            next_id += 1

    for word in PIECE_IDS:
        for ch in word:
            piece(ch)
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1]
            piece(word[:end])
            if [left, right] not in merges:
                merges.append([left, right])
    assert len(set(vocab.values())) == len(vocab)

    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t, i in SPECIAL_IDS.items()
        ],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False},
        # As Gemma 3's tokenizer.json: a BOS on every encode with special tokens. The chat prompt already
        # starts with <bos>, so it must be encoded with add_special_tokens=False (as Model.encode does).
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return Tokenizer.from_str(json.dumps(spec))


# --- (a)-(c): one user message -----------------------------------------------------------------------

def test_single_user_message_renders_the_published_prompt(template):
    text = render_chat(template, [{"role": "user", "content": POEM}], add_generation_prompt=True, **SPECIAL)
    assert text == EXPECTED_TEXT


def test_single_user_message_tokenizes_to_the_real_ids(template):
    text = render_chat(template, [{"role": "user", "content": POEM}], add_generation_prompt=True, **SPECIAL)
    tokenizer = gemma_tokenizer()
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert encoding.ids == EXPECTED_IDS
    assert encoding.tokens == ["<bos>", "<|turn>", "user", "\n", "Write", "▁a", "▁poem", "▁about", "▁Machine",
                               "▁Learning", ".", "<turn|>", "\n", "<|turn>", "model", "\n"]
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text


def test_bos_appears_exactly_once(template):
    text = render_chat(template, [{"role": "user", "content": POEM}], add_generation_prompt=True, **SPECIAL)
    assert text.count("<bos>") == 1 and text.startswith("<bos>")
    ids = gemma_tokenizer().encode(text, add_special_tokens=False).ids
    assert ids.count(SPECIAL_IDS["<bos>"]) == 1 and ids[0] == SPECIAL_IDS["<bos>"]


def test_the_mini_tokenizer_is_a_gemma_tokenizer():
    """It behaves as the pipeline says beyond the one prompt: no prefix space, byte fallback, specials."""
    tokenizer = gemma_tokenizer()
    assert tokenizer.encode("Write", add_special_tokens=False).ids == [6974]
    assert tokenizer.encode(" about", add_special_tokens=False).ids == [1003]  # ' ' -> '▁', no prefix added
    assert tokenizer.encode("é", add_special_tokens=False).ids == [BYTE_IDS + 0xC3, BYTE_IDS + 0xA9]
    assert tokenizer.decode([BYTE_IDS + 0xC3, BYTE_IDS + 0xA9]) == "é"
    assert tokenizer.encode("model", add_special_tokens=True).ids == [2, 4368]  # the post-processor's BOS


# --- (d): system + user + assistant + user -----------------------------------------------------------

def test_multi_turn_render(template):
    """Written out from the template: the system prompt gets its own `system` turn (Gemma 3 folded it
    into the first user turn), assistant is spelled `model`, every turn closes with `<turn|>\\n`, and
    contents are trimmed. With thinking off (the default) the generation prompt is a bare
    `<|turn>model\\n`: the small-model template writes no empty thought channel."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant.\n"},
        {"role": "user", "content": "  Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": POEM},
    ]
    expected = (
        "<bos>"
        "<|turn>system\nYou are a helpful assistant.<turn|>\n"
        "<|turn>user\nHi!<turn|>\n"
        "<|turn>model\nHello! How can I help?<turn|>\n"
        "<|turn>user\nWrite a poem about Machine Learning.<turn|>\n"
        "<|turn>model\n"
    )
    assert render_chat(template, messages, add_generation_prompt=True, **SPECIAL) == expected
    # Without the generation prompt the text simply stops after the last turn.
    assert render_chat(template, messages, add_generation_prompt=False, **SPECIAL) == expected.removesuffix(
        "<|turn>model\n")


def test_earlier_thinking_is_dropped_and_thinking_mode_is_a_system_token(template):
    """An assistant turn's thought channel is not replayed into later prompts; enable_thinking=True
    opens a system turn with `<|think|>` (as transformers passes template kwargs)."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<|channel>thought\nGreet back.<channel|>Hello!",
         "reasoning_content": "Greet back."},
        {"role": "user", "content": POEM},
    ]
    assert render_chat(template, messages, **SPECIAL) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
        "<|turn>user\nWrite a poem about Machine Learning.<turn|>\n<|turn>model\n"
    )
    assert render_chat(template, [{"role": "user", "content": POEM}], enable_thinking=True, **SPECIAL) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n"
        "<|turn>user\nWrite a poem about Machine Learning.<turn|>\n<|turn>model\n"
    )


# --- (e): raise_exception ----------------------------------------------------------------------------

def test_raise_exception_becomes_chat_template_error():
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversation must start with user') }}{% endif %}ok")
    assert render_chat(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversation must start with user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


def test_the_gemma4_template_refuses_string_tool_arguments(template):
    """The published template's own raise_exception: tool call arguments must be a mapping."""
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    ]
    with pytest.raises(ChatTemplateError, match="must be a JSON object"):
        render_chat(template, messages, **SPECIAL)


# --- (f): the sandbox ---------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
])
def test_sandbox_refuses_escapes(attack):
    """Refused with ChatTemplateError naming Jinja's SecurityError (raised in the render's child process,
    so only its message crosses over)."""
    with pytest.raises(ChatTemplateError, match="SecurityError: .*unsafe"):
        render_chat(attack, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__ }}",
    "{{ cycler.__init__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ ''|attr('__class__') }}",
])
def test_sandbox_single_unsafe_attribute_renders_nothing(attack):
    """One unsafe attribute on its own is Jinja's sandbox `undefined`: it renders as nothing (no leak)."""
    assert render_chat(attack, [{"role": "user", "content": "x"}]) == ""


@pytest.mark.parametrize("attack", [
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ messages.pop() }}",
])
def test_sandbox_refuses_mutating_the_messages(attack):
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat(attack, messages)
    assert messages == [{"role": "user", "content": "x"}]
