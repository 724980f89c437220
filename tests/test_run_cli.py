"""ferrisres-run as a user runs it: pipes, Ctrl-C, interactive chat, prompt sources and limits.

Acceptance:
- `ferrisres-run ART -p Hello -n 200 | head -c 20` ends without a traceback (exit 0 or 141);
- Ctrl-C during generation exits 130 with the summary line ("generated ...", "stop: interrupted") and
  no traceback;
- `-i` chats turn by turn on an artifact with a chat template: three turns then /exit, /reset, and
  Ctrl-C during a reply stops that reply only; the next turn still replies and /exit exits 0;
- a chat session prefills only each turn's new tokens, and its cached computation equals a fresh
  full forward over the same ids (to twice the float32 bound: two float32 runs that batch differently);
- `--prompt-file` with invalid UTF-8, a prompt over `--max-context`, `--system` without a chat template:
  one-line errors; `--prompt -` reads stdin; `-n 0` prints nothing and exits 0.

Everything but the ChatSession checks runs the real console script in a subprocess.

The chat artifact is tiny_gemma4 with a Gemma-style chat template added to tokenizer_config.json. Like
Gemma's own template it renders the assistant's messages under the role "model", the role its
generation prompt opens: a template that wrote them as "assistant" instead would re-render the history
differently from what the model saw, and the session would rightly start over from a full prefill each
turn (checked separately below).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ferrisres.convert.build import Options, convert
from ferrisres.runtime import load
from ferrisres.runtime.chat import ChatSession
from ferrisres.runtime.kv_cache import KVCache

from artifact_weights import float32_bound
from conftest import FIXTURES, run_tool

RUN = "ferrisres-run"
TOOL = str(Path(sys.executable).parent / RUN)

GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# The same, but the assistant's turns come back as "assistant" while the generation prompt says "model".
ROLE_AS_IS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def with_chat_template(tmp_path_factory, template: str) -> Path:
    folder = tmp_path_factory.mktemp("chat") / "tiny_gemma4_chat"
    shutil.copytree(FIXTURES / "tiny_gemma4", folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2))
    out = folder.parent / "chat.tern"
    convert(folder, out, Options(), progress=False)
    return out


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory) -> Path:
    return with_chat_template(tmp_path_factory, GEMMA_STYLE_TEMPLATE)


@pytest.fixture(scope="module")
def plain(converted) -> str:
    return str(converted("tiny_gemma4", "ternary"))


def assert_one_line_error(result, *words: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith(f"{RUN}: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert result.stdout == "", result.stdout
    return lines[0]


class Running:
    """A console script started with Popen whose stdout and stderr are collected by threads as they come."""

    def __init__(self, *args: str, stdin: bool = False):
        self.proc = subprocess.Popen([TOOL, *args], stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._collect, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for r in self.readers:
            r.start()

    @staticmethod
    def _collect(stream, buffer: bytearray) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            buffer.extend(chunk)

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    def wait_for(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None and not condition():
                for r in self.readers:
                    r.join(5)
                if condition():
                    return
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}; stderr: {self.stderr!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s; stdout {self.stdout[-200:]!r}, stderr {self.stderr!r}")
            time.sleep(0.02)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        for r in self.readers:
            r.join(5)
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin:
            self.proc.stdin.close()


# ---------------------------------------------------------------------------------------------------------
# pipes and Ctrl-C


def test_closed_pipe_ends_quietly(plain):
    result = subprocess.run(["bash", "-c", f'set -o pipefail; "{TOOL}" "{plain}" -p Hello -n 200 | head -c 20'],
                            capture_output=True, timeout=60)
    stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert result.returncode in (0, 141), (result.returncode, stderr)
    assert len(result.stdout) == 20


def test_ctrl_c_during_generation(plain):
    with Running(plain, "-p", "Hello", "-n", "100000", "--raw") as run:
        run.wait_for(lambda: len(run.out) > 0, "generated text")
        run.proc.send_signal(signal.SIGINT)
        code = run.finish()
    assert "Traceback" not in run.stderr, run.stderr
    assert code == 130, (code, run.stderr)
    summary = [line for line in run.stderr.splitlines() if "generated" in line]
    assert len(summary) == 1, run.stderr
    assert "stop: interrupted" in summary[0], summary[0]


# ---------------------------------------------------------------------------------------------------------
# interactive chat


def session_transcript(artifact: Path, lines: list[str], max_tokens: int) -> tuple[str, list[int]]:
    """What `ferrisres-run ARTIFACT -i -n MAX_TOKENS` should print on stdout for these input lines, computed
    with ChatSession (greedy, as the artifact's generation config says): an input prompt '> ' per line read,
    each reply's text and a newline; and the prompt token count of each turn."""
    model = load(artifact)
    session = ChatSession(model)
    out, prompts = "", []
    for line in lines:
        out += "> "
        if line == "/exit":
            return out, prompts
        if line == "/reset":
            session.reset()
            continue
        g = session.reply(line, max_tokens)
        out += "".join(step.text for step in g) + "\n"
        session.finish()
        prompts.append(len(g.prompt_ids))
    return out + "> ", prompts  # end of input: one more prompt, then EOF


def summaries(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " generated " in line]


def prompt_tokens(summary: str) -> int:
    """N of the summary's "prompt N tokens"."""
    return int(summary.split("prompt ", 1)[1].split(" ", 1)[0])


def test_interactive_three_turns(chat_artifact):
    lines = ["Hello", "How are you?", "Tell me more.", "/exit"]
    result = run_tool(RUN, str(chat_artifact), "-i", "-n", "8", input="\n".join(lines) + "\n", timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    turns = summaries(result.stderr)
    assert len(turns) == 3, result.stderr
    expected, prompts = session_transcript(chat_artifact, lines, 8)
    assert result.stdout == expected, "stdout must be the three replies, each after its input prompt"
    assert [prompt_tokens(t) for t in turns] == prompts  # later turns prefill only their new tokens


def test_interactive_eof_ends_the_session(chat_artifact):
    result = run_tool(RUN, str(chat_artifact), "-i", "-n", "4", input="Hello\n", timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert len(summaries(result.stderr)) == 1
    assert result.stdout == session_transcript(chat_artifact, ["Hello"], 4)[0]


def test_interactive_reset_starts_over(chat_artifact):
    args = (RUN, str(chat_artifact), "-i", "-n", "8")
    lines = ["Hello", "/reset", "Hello", "/exit"]
    reset = run_tool(*args, input="\n".join(lines) + "\n", timeout=60)
    assert reset.returncode == 0 and "Traceback" not in reset.stderr, reset.stderr
    assert "conversation reset" in reset.stderr
    first, again = summaries(reset.stderr)
    assert prompt_tokens(again) == prompt_tokens(first), "after /reset the whole first prompt is prefilled again"
    expected, _ = session_transcript(chat_artifact, lines, 8)
    assert reset.stdout == expected
    replies = [r for r in reset.stdout.split("> ") if r]  # each reply follows its input prompt "> "
    assert len(replies) == 2 and replies[0] == replies[1], "after /reset the same message must get the same (greedy) reply"

    # Control: without /reset the second "Hello" would continue the conversation, prefilling another count.
    _, prompts = session_transcript(chat_artifact, ["Hello", "Hello", "/exit"], 8)
    assert prompts[1] != prompts[0]


def test_interactive_ctrl_c_stops_only_the_reply(chat_artifact):
    with Running(str(chat_artifact), "-i", "-n", "100000", stdin=True) as run:
        run.wait_for(lambda: run.out.startswith(b"> "), "the first input prompt")
        run.send("Hello")
        run.wait_for(lambda: len(run.out) > 12, "the first reply")
        run.proc.send_signal(signal.SIGINT)
        run.wait_for(lambda: run.stderr.count("reply stopped") == 1, "'reply stopped'")
        run.wait_for(lambda: run.out.endswith(b"> "), "the next input prompt")
        shown = len(run.out)
        run.send("Go on")
        run.wait_for(lambda: len(run.out) > shown + 10, "a reply to the next turn")
        run.proc.send_signal(signal.SIGINT)
        run.wait_for(lambda: run.stderr.count("reply stopped") == 2, "'reply stopped' of the second turn")
        run.send("/exit")
        code = run.finish()
    assert "Traceback" not in run.stderr, run.stderr
    assert code == 0, (code, run.stderr)
    turns = summaries(run.stderr)
    assert len(turns) == 2 and all("stop: interrupted" in t for t in turns), run.stderr


# ---------------------------------------------------------------------------------------------------------
# the chat session's cache, through the Python API


class ForwardSpy:
    """Wraps a model's forward: records (number of ids, last-token logits) per call; can raise Ctrl-C at the
    end of a call, after the real forward has updated the cache (as if the signal came just before it returned).
    A long prompt's chunks before its last go through `prefill`: recorded as (number of ids, None)."""

    def __init__(self, model):
        self.model = model
        self.forward, self.prefill = model.forward, model.prefill  # the real (bound) methods
        self.calls: list[tuple[int, np.ndarray | None]] = []
        self.interrupt_at: int | None = None
        model.forward = self  # instance attribute: Generation calls model.forward(ids, cache, last_only=True)
        model.prefill = lambda ids, cache: self.prefill(ids, cache) or self.calls.append((len(ids), None))

    def __call__(self, ids, cache, last_only=False):
        out = self.forward(ids, cache, last_only)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            self.interrupt_at = None  # Ctrl-C as late as it can come: the cache already holds these ids
            raise KeyboardInterrupt
        self.calls.append((len(ids), out[-1].copy()))
        return out


def full_prompt(model, session, user_text: str) -> str:
    return model.render_chat([*session.messages, {"role": "user", "content": user_text}])


def check_turn_against_full_forward(model, spy: ForwardSpy, session, user_text: str, max_tokens: int = 6):
    """Run one turn; check it prefilled only new tokens and that every logit row it computed from the cache
    equals a fresh full forward over the ids the cache holds. Returns the generation."""
    before = list(session.context)
    prompt = full_prompt(model, session, user_text)
    spy.calls.clear()
    g = session.reply(user_text, max_tokens)
    list(g)
    session.finish()
    ids = list(session.context)  # every token id the cache holds now: earlier turns, this prompt, this reply
    end = len(before) + len(g.prompt_ids)
    assert ids[: len(before)] == before and ids[len(before) : end] == g.prompt_ids
    # the cache holds exactly the rendered conversation so far (not, e.g., a stale or doubled history). A random
    # model's reply may be bytes that are not UTF-8: its text (with U+FFFD) has no round trip, only its ids
    if "\ufffd" not in prompt:
        assert model.tokenizer.decode(ids[:end], skip_special_tokens=False) == prompt
    assert 0 < len(g.prompt_ids) < len(model.encode(prompt)), "only the new tokens must be prefilled"
    chunks = [n for n, logits in spy.calls if logits is None]  # a long prompt's chunks before its last
    calls = spy.calls[len(chunks) :]
    assert sum(chunks) + calls[0][0] == len(g.prompt_ids)
    reference = model.logits(ids)  # a fresh full forward, no cache
    atol = 2 * float32_bound(model, ids)  # cached and full: two float32 runs, each within the bound
    for k, (n, logits) in enumerate(calls):
        assert n == (calls[0][0] if k == 0 else 1)
        np.testing.assert_allclose(logits, reference[end - 1 + k], atol=atol, rtol=0,
                                   err_msg=f"call {k} of the turn {user_text!r}")
    return g


def test_chat_session_prefills_new_tokens_and_matches_full_forward(chat_artifact):
    """The logits are caught where Generation computes them (a wrapper around model.forward); the ids they
    belong to are session.context, the ids the session's KV cache holds."""
    model = load(chat_artifact)
    spy = ForwardSpy(model)
    session = ChatSession(model)
    first = session.reply("Hello", 6)
    list(first)
    session.finish()
    assert first.prompt_ids == model.encode(full_prompt(model, ChatSession(model), "Hello"))
    check_turn_against_full_forward(model, spy, session, "How are you?")


@pytest.mark.parametrize("interrupt_at", [0, 3], ids=["during-prefill", "during-decode"])
def test_chat_session_after_interrupted_reply(chat_artifact, interrupt_at):
    model = load(chat_artifact)
    spy = ForwardSpy(model)
    session = ChatSession(model)
    g = session.reply("Hello", 6)
    list(g)
    session.finish()
    spy.interrupt_at = len(spy.calls) + interrupt_at
    g = session.reply("Stop me", 50)
    with pytest.raises(KeyboardInterrupt):
        list(g)
    session.finish()
    assert session.messages[-1]["role"] == "assistant"
    check_turn_against_full_forward(model, spy, session, "And now?")


def test_chat_session_starts_over_when_history_renders_differently(tmp_path_factory):
    """The as-is-role template renders the reply under "assistant" where the model saw "model": the cache
    no longer matches the conversation, so the whole prompt is prefilled again, and computed right."""
    model = load(with_chat_template(tmp_path_factory, ROLE_AS_IS_TEMPLATE))
    spy = ForwardSpy(model)
    session = ChatSession(model)
    list(session.reply("Hello", 6))
    session.finish()
    prompt = full_prompt(model, session, "How are you?")
    spy.calls.clear()
    g = session.reply("How are you?", 6)
    list(g)
    session.finish()
    assert g.prompt_ids == model.encode(prompt)
    prefill = next(logits for _, logits in spy.calls if logits is not None)  # the prompt's last chunk
    atol = 2 * float32_bound(model, g.prompt_ids)  # cached and full: two float32 runs, each within the bound
    np.testing.assert_allclose(prefill, model.logits(g.prompt_ids)[-1], atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# prompt sources and limits


def test_prompt_file_with_invalid_utf8(plain, tmp_path):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"Hello \xff\xfe world")
    assert_one_line_error(run_tool(RUN, plain, "--prompt-file", str(bad)), str(bad), "UTF-8")


def test_prompt_from_stdin(plain, tmp_path):
    direct = run_tool(RUN, plain, "-p", "Hello world", "-n", "12")
    assert direct.returncode == 0, direct.stderr
    g = load(plain).generate("Hello world", 12)
    list(g)
    assert direct.stdout == g.text + "\n"
    piped = run_tool(RUN, plain, "--prompt", "-", "-n", "12", input="Hello world")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == direct.stdout
    from_file = tmp_path / "prompt.txt"
    from_file.write_text("Hello world", encoding="utf-8")
    assert run_tool(RUN, plain, "--prompt-file", str(from_file), "-n", "12").stdout == direct.stdout


def test_prompt_longer_than_max_context(plain):
    result = run_tool(RUN, plain, "-p", "Once upon a time there was a very long prompt", "--max-context", "16")
    assert_one_line_error(result, "16")


def test_max_tokens_zero_prints_nothing(plain):
    result = run_tool(RUN, plain, "-p", "Hello", "-n", "0")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout in ("", "\n"), repr(result.stdout)
    assert "generated 0 tokens" in result.stderr


def test_a_raw_prompt_without_chat_template_is_said_once(plain, chat_artifact):
    result = run_tool(RUN, plain, "-p", "Hello", "-n", "2")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith(f"{RUN}: note:")]
    assert len(notes) == 1 and "no chat template" in notes[0] and "--chat-template" in notes[0]
    for quiet in (run_tool(RUN, plain, "-p", "Hello", "-n", "2", "--raw"), run_tool(RUN, str(chat_artifact), "-p", "Hello", "-n", "2")):
        assert quiet.returncode == 0 and "note:" not in quiet.stderr, quiet.stderr


def test_options_that_cannot_apply_are_said(plain, converted):
    """--threads beyond this process's CPUs is capped, and --cache int8 on a float artifact does nothing:
    both said on stderr, neither an error."""
    cpus = len(os.sched_getaffinity(0))
    result = run_tool(RUN, plain, "-p", "Hello", "-n", "2", "--raw", "--threads", str(cpus + 62))
    assert result.returncode == 0 and f"--threads {cpus + 62} is more than the {cpus} CPUs" in result.stderr
    assert f"| threads {cpus} |" in result.stderr.splitlines()[-1]
    teacher = str(converted("tiny_gemma4", "f32"))
    result = run_tool(RUN, teacher, "-p", "Hello", "-n", "2", "--raw", "--cache", "int8")
    assert result.returncode == 0 and "--cache int8 changes nothing" in result.stderr
    assert "note:" not in run_tool(RUN, plain, "-p", "Hello", "-n", "2", "--raw", "--cache", "int8").stderr


def test_threads_default_to_the_physical_cores_and_the_summary_says_how_many(plain):
    from ferrisres.runtime.kernels import default_threads

    for flags, threads in (((), default_threads()), (("--threads", "1"), 1)):
        result = run_tool(RUN, plain, "-p", "Hello", "-n", "2", "--raw", *flags)
        assert result.returncode == 0 and f"| threads {threads} |" in result.stderr.splitlines()[-1], result.stderr


def test_default_threads_count_each_core_once_within_the_cpu_quota(tmp_path, monkeypatch):
    """Hardware threads of one core list the same siblings; CPUs outside the affinity mask do not count;
    without a topology to read every usable CPU counts. The smallest CPU quota (v1 or v2) of the process's
    cgroup and its ancestors caps the count, rounded down."""
    from ferrisres.runtime.kernels import default_threads

    cpus = tmp_path / "devices" / "system" / "cpu"
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3", "4"]):
        (cpus / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (cpus / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    membership = tmp_path / "cgroup-of-the-process"
    membership.write_text("4:memory:/x\n1:cpu,cpuacct:/\n0::/\n")
    for usable, cores in (({0, 1, 2, 3, 4}, 3), ({0, 2}, 1), ({1, 2, 4}, 3), ({0, 1, 7}, 3)):  # cpu7: no topology
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, usable=usable: usable)
        assert default_threads(tmp_path, membership) == cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    cgroup = tmp_path / "fs" / "cgroup"
    (cgroup / "cpu").mkdir(parents=True)
    (cgroup / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, threads in (("-1", 3), ("250000", 2), ("150000", 1), ("100000", 1), ("20000", 1)):
        (cgroup / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert default_threads(tmp_path, membership) == threads
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    for limit, threads in (("max 100000", 3), ("290000 100000", 2)):
        (cgroup / "cpu.max").write_text(limit + "\n")
        assert default_threads(tmp_path, membership) == threads
    # a systemd unit's quota, seen from the host: the process's own cgroup and its parents are searched
    membership.write_text("0::/system.slice/app.service\n")
    (cgroup / "cpu.max").write_text("max 100000\n")
    (cgroup / "system.slice" / "app.service").mkdir(parents=True)
    (cgroup / "system.slice" / "cpu.max").write_text("200000 100000\n")
    assert default_threads(tmp_path, membership) == 2
    (cgroup / "system.slice" / "app.service" / "cpu.max").write_text("100000 100000\n")
    assert default_threads(tmp_path, membership) == 1
    assert default_threads(tmp_path, tmp_path / "no-such-file") == 3  # the roots' limits: none


def test_a_long_prompt_is_prefilled_in_chunks_each_reported_to_the_same_logits(converted):
    """A prompt longer than PREFILL_CHUNK is prefilled in chunks (its activations stay bounded), each
    reported to `on_prefill`, and leaves the cache one forward over the whole prompt leaves."""
    from ferrisres.runtime.generate import PREFILL_CHUNK

    model = load(converted("tiny_gemma4", "ternary"))
    ids = np.random.default_rng(0).integers(5, model.config.vocab_size, 2 * PREFILL_CHUNK + 7).tolist()
    whole = KVCache(model.config)
    model.forward(ids, whole, last_only=True)
    reported = []
    chunked = model.generate(ids, max_tokens=1, temperature=0)
    chunked.on_prefill = lambda done, total: reported.append((done, total))
    list(chunked)
    assert reported == [(PREFILL_CHUNK, len(ids)), (2 * PREFILL_CHUNK, len(ids)), (len(ids), len(ids))]
    assert chunked.cache.length == whole.length == len(ids)
    # the caches hold the same keys and values: the next token's logits agree (two float32 runs)
    following = [model.forward([7], cache, last_only=True)[-1] for cache in (whole, chunked.cache)]
    np.testing.assert_allclose(*following, rtol=0, atol=2 * float32_bound(model, [*ids, 7]))


def test_system_without_chat_template(plain, chat_artifact):
    assert_one_line_error(run_tool(RUN, plain, "-p", "Hello", "--system", "Be brief."), "--system")
    assert_one_line_error(run_tool(RUN, str(chat_artifact), "-p", "Hello", "--system", "Be brief.", "--raw"),
                          "--system")
    ok = run_tool(RUN, str(chat_artifact), "-p", "Hello", "--system", "Be brief.", "-n", "4")
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr
