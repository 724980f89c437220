"""Long prompts (class 4 of issue 13): attention takes the prompt's queries in chunks of rows, so peak
memory grows linearly with the prompt, not with its square (6k tokens needed ~2 GB of scores on the tiny
model and ended in a MemoryError traceback under this limit); running out of memory anyway is one line."""

from __future__ import annotations

import random
import re

import numpy as np

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
    for window, softcap in ((None, None), (8, 50.0)):
        whole = gemma4.attention(q, k, v, q_pos, k_pos, window, 0.5, softcap)
        monkeypatch.setattr(gemma4, "SCORES_BYTES", 8 * heads * S * 5)  # chunks of 5 rows, the last of 2
        chunked = gemma4.attention(q, k, v, q_pos, k_pos, window, 0.5, softcap)
        monkeypatch.undo()
        assert np.array_equal(whole, chunked)


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
