"""Generation: where it stops, and what it streams.

Acceptance:
- stopping: generation stops exactly before any EOS id of the generation config (stop_reason "eos",
  the EOS token in neither `tokens` nor the text; as `Step` documents, the last step is the EOS token's
  own and carries only text that was still held back); a stop string ends it (stop_reason "stop_string")
  and neither the stop string nor anything after it is ever streamed or in `generation.text`, also
  through `ferrisres-run --stop`;
- UTF-8 streaming: a character split over byte-fallback tokens is streamed whole once complete (the
  steps in the middle of it show nothing, no step shows U+FFFD), and invalid bytes come out as U+FFFD
  instead of being held back forever.

The EOS checks use a copy of tiny_gemma4 whose generation_config.json lists, besides <eos>, two tokens
the model really produces greedily (found by generating from the unmodified artifact first). The
streaming checks drive the real `Generation` with a scripted model: the real config and tokenizer of
the tiny artifact, and a forward pass whose logits make greedy decoding pick a given token sequence.
"""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from ferrisres.convert.build import Options, convert
from ferrisres.runtime import load
from ferrisres.runtime.generate import Generation
from ferrisres.runtime.sampling import SamplingParams

from conftest import FIXTURES, run_tool

PROMPTS = ("a", "Hello world", "When", "dog", "It was", "The quick brown fox", "b", "x y z", "1 2 3", "Hi",
           "Once upon a time", "cat", "I am", "my name")
N = 30
EOS = 1


def greedy_run(model, prompt: str, max_tokens: int = N, **options):
    g = model.generate(prompt, max_tokens=max_tokens, temperature=0.0, **options)
    steps = list(g)
    return g, steps


def first_new_piece(model, tokens: list[int]) -> int | None:
    """The first position i >= 1 whose token is an ordinary piece (not special, not a byte) not seen before
    and whose text does not already occur in the text before it: a token whose absence is visible."""
    tokenizer = model.tokenizer
    for i in range(1, len(tokens)):
        t = tokens[i]
        piece = tokenizer.id_to_token(t)
        if t in tokens[:i] or piece.startswith("<") and piece.endswith(">"):
            continue
        text = tokenizer.decode([t]).strip()
        if text and text not in tokenizer.decode(tokens[:i]):
            return i
    return None


@pytest.fixture(scope="module")
def eos_case(converted, tmp_path_factory):
    """(artifact with eos_token_id [1, A, B], [(prompt, greedy tokens of the original, index of its EOS)]).
    Both rounded to nearest: calibration never samples an EOS id, so with other EOS ids it would
    calibrate, and quantize, differently."""
    original = load(converted("tiny_gemma4", "ternary", method="rtn"))
    found = []  # (prompt, tokens, i)
    for prompt in PROMPTS:
        _, steps = greedy_run(original, prompt)
        tokens = [s.token for s in steps]
        i = first_new_piece(original, tokens)
        if i is None:
            continue
        if any(tokens[i] in t[:j] or t[j] in tokens[:i] or t[j] == tokens[i] for _, t, j in found):
            continue  # each chosen EOS must be the first EOS its own prompt meets
        found.append((prompt, tokens, i))
        if len(found) == 2:
            break
    assert len(found) == 2, "the tiny model produced too few distinct pieces to choose two EOS tokens from"
    a, b = (t[i] for _, t, i in found)

    folder = tmp_path_factory.mktemp("eos") / "tiny_gemma4_eos"
    shutil.copytree(FIXTURES / "tiny_gemma4", folder)
    generation_config = json.loads((folder / "generation_config.json").read_text())
    generation_config["eos_token_id"] = [EOS, a, b]
    (folder / "generation_config.json").write_text(json.dumps(generation_config))
    out = folder.parent / "eos.tern"
    convert(folder, out, Options(method="rtn"), progress=False)
    return out, found


def test_eos_ids_come_from_generation_config(eos_case):
    artifact, found = eos_case
    model = load(artifact)
    assert set(model.config.eos_token_ids) == {EOS, *(t[i] for _, t, i in found)}


@pytest.mark.parametrize("case", [0, 1])
def test_generation_stops_exactly_before_each_eos(eos_case, case):
    artifact, found = eos_case
    prompt, original_tokens, i = found[case]
    eos = original_tokens[i]
    model = load(artifact)
    g, steps = greedy_run(model, prompt)
    assert g.stop_reason == "eos"
    assert g.tokens == original_tokens[:i], "must stop exactly before the EOS token, after the same tokens"
    assert eos not in g.tokens
    # The run ends with a step for the EOS token itself (documented in Step): it carries only held-back text.
    assert [s.token for s in steps] == original_tokens[: i + 1]
    expected_text = model.tokenizer.decode(original_tokens[:i], skip_special_tokens=True)
    assert g.text == expected_text
    assert "".join(s.text for s in steps) == expected_text
    eos_text = model.tokenizer.decode([eos]).strip()
    assert eos_text not in g.text, f"the EOS token's text {eos_text!r} leaked into {g.text!r}"


def test_run_stops_at_eos(eos_case):
    artifact, found = eos_case
    prompt, original_tokens, i = found[0]
    model = load(artifact)
    result = run_tool("ferrisres-run", str(artifact), "-p", prompt, "-n", str(N))
    assert result.returncode == 0, result.stderr
    assert result.stdout == model.tokenizer.decode(original_tokens[:i]) + "\n"
    assert f"generated {i} tokens" in result.stderr and "stop: eos" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------------
# stop strings


def token_texts(model, tokens: list[int]) -> list[str]:
    """The text each token adds to the decoded text."""
    out, before = [], ""
    for j in range(len(tokens)):
        now = model.tokenizer.decode(tokens[: j + 1])
        out.append(now[len(before):])
        before = now
    return out


def stop_strings_for(text: str, pieces: list[str]) -> dict[str, str] | None:
    """Stop strings of three kinds, chosen from what the model says, that first occur in `text` after its
    start and at three different places (so which one stops first is known); None if there are none. Every
    candidate of each kind is tried, so that a small change of the greedy text still offers a case."""
    clean = lambda s: bool(s) and "\ufffd" not in s and s.isprintable()  # noqa: E731
    candidates = {
        "across a token boundary": [a[-1] + b[:2] for a, b in zip(pieces, pieces[1:]) if clean(a) and clean(b) and a != b],
        "ending inside a token": [piece[:2] for piece in pieces[1:] if clean(piece) and len(piece) >= 3],
        "from the middle of the text": [text[i : i + 4] for i in range(len(text) // 2, len(text) - 3)
                                        if clean(text[i : i + 4])],
    }
    candidates = {kind: [s for s in dict.fromkeys(found) if text.find(s) > 0] for kind, found in candidates.items()}
    for chosen in itertools.product(*candidates.values()):
        if len({text.find(s) for s in chosen}) == 3:
            return dict(zip(candidates, chosen))
    return None


@pytest.fixture(scope="module")
def stop_case(converted):
    """(model, prompt, greedy text, {kind: stop string}): the first prompt whose greedy text offers all three kinds."""
    model = load(converted("tiny_gemma4", "ternary"))
    for prompt in PROMPTS:
        g, steps = greedy_run(model, prompt)
        assert g.stop_reason == "max_tokens"
        stops = stop_strings_for(g.text, token_texts(model, g.tokens))
        if stops is not None:
            return model, prompt, g.text, stops
    pytest.fail("no prompt's greedy text offers the stop strings to test")


def check_stopped_at(model, prompt: str, full_text: str, stops: tuple[str, ...]) -> None:
    expected = full_text[: min(full_text.find(s) for s in stops if s in full_text)]
    g, steps = greedy_run(model, prompt, stop=stops)
    streamed = "".join(s.text for s in steps)
    assert g.stop_reason == "stop_string", (stops, full_text)
    for stop in stops:
        assert stop not in streamed and stop not in g.text
    assert streamed == expected, f"stop {stops!r}: the stream must be everything before it, nothing after"
    assert g.text == expected
    for k in range(1, len(steps) + 1):  # never shown, not even for a while
        shown = "".join(s.text for s in steps[:k])
        assert expected.startswith(shown) and not any(stop in shown for stop in stops)


@pytest.mark.parametrize("kind", ["across a token boundary", "ending inside a token", "from the middle of the text"])
def test_stop_string_ends_generation_and_is_never_shown(stop_case, kind):
    model, prompt, full_text, stops = stop_case
    check_stopped_at(model, prompt, full_text, (stops[kind],))


def test_several_stop_strings_first_occurrence_wins(stop_case):
    model, prompt, full_text, stops = stop_case
    check_stopped_at(model, prompt, full_text, ("zzz\x01", *stops.values()))
    check_stopped_at(model, prompt, full_text, tuple(reversed(stops.values())))


def test_stop_string_that_never_appears_changes_nothing(stop_case):
    model, prompt, full_text, stops = stop_case
    teaser = full_text[:2] + "\x01"  # its start keeps appearing, it never does
    g, steps = greedy_run(model, prompt, stop=("zzz\x01", teaser))
    assert g.stop_reason == "max_tokens"
    assert g.text == full_text == "".join(s.text for s in steps)


@pytest.mark.parametrize("how", ["one", "repeated"])
def test_run_stop_flag(stop_case, converted, how):
    model, prompt, full_text, stops = stop_case
    chosen = [stops["ending inside a token"]] if how == "one" else ["zzz", *stops.values()]
    expected = full_text[: min(full_text.find(s) for s in chosen if s in full_text)]
    args = [a for s in chosen for a in ("--stop", s)]
    result = run_tool("ferrisres-run", str(converted("tiny_gemma4", "ternary")), "-p", prompt, "-n", str(N), *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for s in chosen:
        assert s not in result.stdout
    assert result.stdout.rstrip("\n") == expected
    assert "stop: stop_string" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# UTF-8 streaming over byte-fallback tokens, with a scripted model


class ScriptedModel:
    """What Generation needs of a model: the real config, tokenizer and decoding of ids to text, and a forward
    pass whose logits make greedy decoding pick `script[k]` at the k-th call."""

    def __init__(self, real, script: list[int]):
        self.config = real.config
        self.tokenizer = real.tokenizer
        self.decode = real.decode
        self.script = list(script)
        self.calls = 0

    def forward(self, ids, cache, last_only=False):
        token = self.script[self.calls]
        self.calls += 1
        cache.length += len(ids)
        logits = np.full((1 if last_only else len(ids), self.config.vocab_size), -10.0, dtype=np.float32)
        logits[-1, token] = 10.0
        return logits


@pytest.fixture(scope="module")
def real(converted):
    return load(converted("tiny_gemma4", "ternary"))


def piece(real, text: str) -> int:
    token = real.tokenizer.token_to_id(text)
    assert token is not None, f"{text!r} is not a token of the tiny tokenizer"
    return token


def byte_tokens(real, data: bytes) -> list[int]:
    return [piece(real, f"<0x{b:02X}>") for b in data]


def scripted(real, script: list[int], max_tokens: int = 100, stop=()) -> tuple[Generation, list]:
    g = Generation(ScriptedModel(real, script), [real.config.bos_token_id], SamplingParams(), max_tokens,
                   stop_ids={EOS}, stop_strings=stop)
    return g, list(g)


def test_characters_split_over_byte_tokens_stream_whole(real):
    emoji, kanji = "😊".encode(), "東".encode()
    assert (len(emoji), len(kanji)) == (4, 3)
    script = [piece(real, "a"), *byte_tokens(real, emoji), piece(real, "b"), *byte_tokens(real, kanji), EOS]
    g, steps = scripted(real, script)
    texts = [s.text for s in steps]
    assert g.stop_reason == "eos"
    assert "".join(texts) == "a😊b東" == g.text
    assert not any("\ufffd" in t for t in texts), texts
    assert texts == ["a", "", "", "", "", "😊b", "", "", "", "東"], "a run of byte tokens is shown when it ends"
    assert g.tokens == script[:-1]
    assert [s.token for s in steps] == script  # the last step is the EOS token's, with nothing left to show


def test_character_completed_by_the_last_token_allowed(real):
    """max_tokens ends the run on the character's last byte: it is shown whole."""
    script = [piece(real, "a"), *byte_tokens(real, "東".encode())]
    g, steps = scripted(real, script, max_tokens=len(script))
    assert g.stop_reason == "max_tokens"
    assert [s.text for s in steps] == ["a", "", "", "東"]


def test_stray_continuation_byte_is_shown_as_replacement_when_its_run_ends(real):
    script = [piece(real, "a"), *byte_tokens(real, b"\xb8"), piece(real, "a"), EOS]
    g, steps = scripted(real, script)
    texts = [s.text for s in steps]
    assert texts == ["a", "", "\ufffda", ""], texts
    assert g.text == "a\ufffda"


@pytest.mark.parametrize("run", [b"\r\x9c", "😊".encode() + b"\x9c", b"\xe6\x9d\xb1\xe6"])
def test_a_byte_that_spoils_its_run_never_contradicts_what_was_streamed(real, run):
    """The tokenizer reads a whole run of byte tokens as U+FFFD when it is not valid UTF-8, a carriage return
    or a whole emoji included: nothing of a run is shown before it ends, so the stream is the final text."""
    script = [piece(real, "a"), *byte_tokens(real, run), piece(real, "b"), EOS]
    g, steps = scripted(real, script)
    streamed = "".join(s.text for s in steps)
    assert streamed == g.text == real.decode(script[:-1]) and g.text.startswith("a\ufffd") and g.text.endswith("b")
    assert [s.text for s in steps[1 : 1 + len(run)]] == [""] * len(run)


def test_a_long_run_of_byte_tokens_is_shown_before_it_ends_in_whole_characters(real):
    """A model may go on in bytes for long: a run waits for its end up to HELD_BYTES bytes, then shows what
    it has, never part of a character."""
    from ferrisres.runtime.generate import HELD_BYTES

    text = "東京は日本の首都です"  # 10 characters of 3 bytes
    script = [piece(real, "a"), *byte_tokens(real, text.encode()), piece(real, "b"), EOS]
    g, steps = scripted(real, script)
    texts = [s.text for s in steps]
    assert "".join(texts) == g.text == "a" + text + "b"
    first = HELD_BYTES + -HELD_BYTES % 3  # the first whole character boundary at or past HELD_BYTES bytes
    assert texts[:first] == ["a"] + [""] * (first - 1) and texts[first] == text[: first // 3], texts
    later = texts[first + 1 : -2]  # the run's last bytes, before "b" and EOS
    assert all(t == "" or t in text[first // 3 :] for t in later) and "".join(later) + texts[-2] == text[first // 3 :] + "b"


def test_unfinished_character_before_ordinary_piece_becomes_replacement(real):
    script = [piece(real, "a"), *byte_tokens(real, b"\xf0\x9f"), piece(real, "b"), piece(real, "c"), EOS]
    g, steps = scripted(real, script)
    streamed = "".join(s.text for s in steps)
    assert streamed == g.text
    assert streamed.startswith("a\ufffd") and streamed.endswith("bc") and set(streamed[1:-2]) == {"\ufffd"}
    b_step = next(s for s in steps if s.token == piece(real, "b"))
    assert b_step.text.endswith("b"), "the text after the broken bytes must not be held back"


def test_unfinished_character_at_max_tokens_is_shown(real):
    script = [piece(real, "a"), *byte_tokens(real, b"\xe6\x9d")]
    g, steps = scripted(real, script, max_tokens=3)
    streamed = "".join(s.text for s in steps)
    assert streamed == g.text and streamed.startswith("a\ufffd")


def test_unfinished_character_before_eos_is_not_held_back_forever(real):
    """EOS right after the first bytes of a character: what `generation.text` has must also have been streamed."""
    script = [piece(real, "a"), *byte_tokens(real, b"\xf0\x9f"), EOS]
    g, steps = scripted(real, script)
    streamed = "".join(s.text for s in steps)
    assert g.stop_reason == "eos"
    assert "\ufffd" in g.text
    assert streamed == g.text, f"streamed {streamed!r} but the generation's text is {g.text!r}"


def test_text_held_back_for_a_possible_stop_string_is_streamed_at_eos(real):
    """'b' is held back because it could start the stop string 'bc'; EOS comes next: 'b' must still be shown."""
    script = [piece(real, "a"), piece(real, "b"), EOS]
    g, steps = scripted(real, script, stop=("bc",))
    streamed = "".join(s.text for s in steps)
    assert g.stop_reason == "eos"
    assert g.text == "ab"
    assert streamed == "ab", f"streamed {streamed!r} but the generation's text is {g.text!r}"


def test_stop_string_made_of_byte_tokens(real):
    script = [piece(real, "a"), *byte_tokens(real, "😊".encode()), piece(real, "b"), EOS]
    g, steps = scripted(real, script, stop=("😊",))
    texts = [s.text for s in steps]
    assert g.stop_reason == "stop_string"
    assert "".join(texts) == g.text == "a"
    assert not any("\ufffd" in t for t in texts)


@pytest.mark.parametrize("stops", [("bc", "abc"), ("abc", "bc")])
def test_earliest_stop_string_wins_whatever_their_order(real, stops):
    """Text 'xabc': "abc" starts before "bc", so nothing after 'x' may be shown, in either order of the stops."""
    script = [piece(real, "x"), piece(real, "a"), piece(real, "b"), piece(real, "c"), EOS]
    g, steps = scripted(real, script, stop=stops)
    assert g.stop_reason == "stop_string"
    assert "".join(s.text for s in steps) == g.text == "x", (stops, g.text)
