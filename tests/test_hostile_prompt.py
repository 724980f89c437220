"""Long prompts (class 4 of issue 13): attention takes the prompt's queries in chunks of rows, so peak
memory grows linearly with the prompt, not with its square (6k tokens needed ~2 GB of scores on the tiny
model and ended in a MemoryError traceback under this limit); running out of memory anyway is one line."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from ferrisres.runtime import gemma4
from hostile import ran, run_boxed

WORDS = "the quick brown fox jumps over lazy dog capital France Paris river mountain".split()


def _prompt_file(tmp_path, characters: int):
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(characters // 5))[:characters]
    path = tmp_path / "prompt.txt"
    path.write_text(text)
    return path


def test_chunked_attention_is_exactly_the_whole_attention(monkeypatch):
    rng = np.random.default_rng(0)
    T, S, heads, kv_heads, hd = 37, 50, 4, 2, 8
    q, k, v = rng.normal(size=(T, heads, hd)), rng.normal(size=(S, kv_heads, hd)), rng.normal(size=(S, kv_heads, hd))
    q_pos, k_pos = np.arange(S - T, S), np.arange(S)
    for window, softcap in ((None, None), (30, 50.0)):  # a window of 30: most keys seen, all of them read
        whole = gemma4.attention(q, k, v, q_pos, k_pos, window, 0.5, softcap)
        monkeypatch.setattr(gemma4, "SCORES_BYTES", 8 * heads * S * 5)  # chunks of 5 rows, the last of 2
        chunked = gemma4.attention(q, k, v, q_pos, k_pos, window, 0.5, softcap)
        monkeypatch.undo()
        assert np.array_equal(whole, chunked)


def test_a_sliding_window_reads_only_the_keys_it_reaches_and_computes_the_same():
    """Keys out of every query's window have weight exactly 0, so leaving them out changes only the float32
    rounding of the sums over keys. Integer q, k, v (|.| <= 2, 8-dim heads) make every score exact in float32, so
    what is left is out = sum_s p_s v_s over at most S keys: (S + 3) u max|v| (sum_s p_s = 1) for each of the two."""
    rng = np.random.default_rng(1)
    T, S, heads, kv_heads, hd, window = 37, 50, 4, 2, 8, 8
    q, k, v = (rng.integers(-2, 3, size=shape).astype(np.float64) for shape in ((T, heads, hd), (S, kv_heads, hd), (S, kv_heads, hd)))
    q_pos, k_pos = np.arange(S - T, S), np.arange(S)
    v[3:6], k_pos[3:6] = np.nan, -1  # slots no query's window reaches: read, 0 x NaN would make the outputs NaN
    read = []
    real = gemma4._attention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemma4, "_attention", lambda q, keys, *a: read.append(len(keys)) or real(q, keys, *a))
        windowed = gemma4.attention(q, k, v, q_pos, k_pos, window, 0.5, 50.0)
    assert max(read) <= 2 * window  # each chunk of at most `window` queries reads at most 2 x window keys
    visible = k_pos >= 0
    whole = real(q, k[visible], v[visible], q_pos, k_pos[visible], window, 0.5, 50.0)
    np.testing.assert_allclose(windowed, whole, rtol=0, atol=2 * (S + 3) * 2.0**-24 * 2)


def test_a_long_prompt_runs_in_memory_linear_in_its_length(converted, tmp_path):
    run = run_boxed("ferrisres-run", str(converted("tiny_gemma4")), "--prompt-file", str(_prompt_file(tmp_path, 21000)),
                    "--raw", "-n", "1", timeout=120)
    ran(run)
    tokens = int(re.search(r"prompt (\d+) tokens", run.stderr).group(1))
    assert tokens > 5500 and run.peak_mb < 400, (run.peak_mb, run.stderr)


def test_running_out_of_memory_is_one_line(converted, monkeypatch, capsys):
    """Wherever numpy runs out (simulated in attention, where the scores are), one line names the file."""
    from ferrisres.runtime.cli import main

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 2.00 GiB for an array with shape (2, 16384, 8192)")

    monkeypatch.setattr(gemma4, "attention", out_of_memory)
    base = converted("tiny_gemma4")
    assert main([str(base), "-p", "Hi there", "--raw", "-n", "1"]) == 1
    err = capsys.readouterr().err
    assert err == f"ferrisres-run: error: {base}: out of memory with a prompt of 6 tokens (a shorter prompt needs less)\n"


def test_leading_bos_tokens_become_one_in_a_single_pass(converted):
    # 200,000 BOS: stripped one slice at a time, as before, this took minutes (quadratic); a server request
    # of that many kept a worker busy after its client left
    from ferrisres.runtime import load

    model = load(converted("tiny_gemma4"))
    bos, hi = model.config.bos_token_id, model.encode("Hi", add_bos=False)
    assert model.encode("<bos>" * 3 + "Hi") == [bos, *hi]
    assert model.encode("Hi") == [bos, *hi]
    assert model.encode("<bos>" * 200_000) == [bos]
    assert model.encode("<bos><bos>Hi", add_bos=False) == [bos, bos, *hi]  # without add_bos: as written


def test_text_the_tokenizer_cannot_take_is_a_value_error(converted, monkeypatch):
    from ferrisres.runtime import load

    model = load(converted("tiny_gemma4"))
    with pytest.raises(ValueError, match="not valid Unicode: a lone surrogate at character 3"):
        model.encode("Hi \udcff")

    class PanicException(BaseException):  # how a Rust panic inside the tokenizers library reaches Python
        pass

    class Panicking:
        def encode(self, text, add_special_tokens):
            raise PanicException("Onig: Regex search error: retry-limit-in-match over\nbacktrace")

    monkeypatch.setitem(model.__dict__, "tokenizer", Panicking())
    with pytest.raises(ValueError, match="the tokenizer failed on this text .*retry-limit-in-match over\\)$"):
        model.encode("Hi")

    class Interrupting:
        def encode(self, text, add_special_tokens):
            raise KeyboardInterrupt

    monkeypatch.setitem(model.__dict__, "tokenizer", Interrupting())
    with pytest.raises(KeyboardInterrupt):  # not taken for a panic
        model.encode("Hi")


def test_a_decoder_that_panics_is_a_value_error(converted):
    # the tokenizers library's Strip decoder indexes past the start of a token shorter than its `stop`; the
    # artifact checks refuse such a decoder (test_hostile_documents), and what the checks did not foresee
    # still ends a reply with one line, not a panic through Python
    from tokenizers import decoders

    from ferrisres.runtime import load

    model = load(converted("tiny_gemma4"))
    model.tokenizer.decoder = decoders.Sequence([model.tokenizer.decoder, decoders.Strip(" ", 0, 3)])
    with pytest.raises(ValueError, match="^the tokenizer failed to decode the reply \\(the tokenizers library failed: "
                                         "index out of bounds"):
        model.decode([])  # an empty reply: Fuse makes it one empty token
