"""ferrisres-serve: the real server in a subprocess on a tiny artifact, spoken to with the official `openai`
client and with raw HTTP; and its scheduler in process (chunked prefill beside decoding, cancellation)."""

from __future__ import annotations

import gc
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import FIXTURES, run_tool

from ferrisres.convert.build import Options, convert
from ferrisres.runtime import load
from ferrisres.runtime.generate import Generation
from ferrisres.runtime.scheduler import ALONE_CHUNK, Finished, Scheduler

KEY = "test-key"
PROMPTS = ["Hello", "The quick brown fox", "Once upon a time", "1 2 3 4", "ferris", "A", "Why is the sky blue?",
           "def main():"]


class Server:
    """`ferrisres-serve` in a subprocess on a free port; its stderr is kept (drained, so it never blocks)."""

    def __init__(self, path: Path, *flags: str):
        tool = Path(sys.executable).parent / "ferrisres-serve"
        self.proc = subprocess.Popen([str(tool), str(path), "--port", "0", *flags], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        first = self.proc.stderr.readline()  # "ferrisres-serve: serving NAME on http://HOST:PORT (...)"
        found = re.search(r"http://([\d.]+):(\d+)", first)
        assert found, first + self.proc.stderr.read()
        self.host, self.port = found.group(1), int(found.group(2))
        self.url = f"http://{self.host}:{self.port}"
        self.stderr = [first]
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def request(self, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
        """(status, parsed JSON body) of one request."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=raw if raw is not None else None if body is None else json.dumps(body),
                     headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, json.loads(data)

    def health(self) -> dict:
        return self.request("GET", "/health", key=None)[1]

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """The tiny student with Gemma 4 IT's chat template (rounded to nearest: calibration adds nothing here)."""
    out = tmp_path_factory.mktemp("serve") / "tiny-chat.tern"
    convert(FIXTURES / "tiny_gemma4", out, Options(method="rtn", chat_template=str(FIXTURES / "gemma4_it" / "chat_template.jinja")),
            progress=False)
    return out


@pytest.fixture(scope="module")
def server(artifact):
    s = Server(artifact, "--api-key", KEY, "--max-context", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def one_slot(artifact):
    """A server that runs one request at a time and queues none: a second request meanwhile gets 503."""
    s = Server(artifact, "--max-batch", "1", "--max-queue", "0")
    yield s
    s.stop()


def run_greedy(artifact: Path, prompt: str, max_tokens: int, raw: bool) -> tuple[str, int, int]:
    """ferrisres-run --greedy: (text, prompt tokens, generated tokens)."""
    result = run_tool("ferrisres-run", str(artifact), "-p", prompt, "--greedy", "-n", str(max_tokens),
                      *(["--raw"] if raw else []))
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    counts = re.search(r"prompt (\d+) tokens.*generated (\d+) tokens", summary)
    text = result.stdout[:-1] if result.stdout.endswith("\n") else result.stdout  # the line ferrisres-run ends
    return text, int(counts.group(1)), int(counts.group(2))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_greedy_replies_equal_ferrisres_run_greedy(server, artifact, chat, stream):
    client = server.client()
    for prompt, max_tokens in (("Hello", 12), ("Why is the sky blue?", 20)):
        text, prompt_tokens, generated = run_greedy(artifact, prompt, max_tokens, raw=not chat)
        options = dict(model="tiny", max_tokens=max_tokens, temperature=0)
        if chat:
            call = lambda **kw: client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)  # noqa: E731
        else:
            call = lambda **kw: client.completions.create(prompt=prompt, **kw)  # noqa: E731
        if stream:
            pieces, finish, usage = [], None, None
            for chunk in call(stream=True, stream_options={"include_usage": True}, **options):
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    pieces.append((choice.delta.content if chat else choice.text) or "")
                    finish = choice.finish_reason or finish
            got = "".join(pieces)
        else:
            reply = call(**options)
            choice, usage, finish = reply.choices[0], reply.usage, reply.choices[0].finish_reason
            got = choice.message.content if chat else choice.text
        assert got == text
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, generated)
        assert finish == ("length" if generated == max_tokens else "stop")


def test_eight_concurrent_streams_each_get_the_text_they_get_alone(server):
    client = server.client()

    def stream(i: int) -> str:
        chunks = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=24, temperature=1.0,
                                           seed=i, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)

    alone = [stream(i) for i in range(8)]
    assert len(set(alone)) > 4  # sampled at temperature 1 from different prompts: they differ
    before = server.health()["steps"]
    together: list[str | None] = [None] * 8
    start = threading.Barrier(8)

    def run(i: int) -> None:
        start.wait()
        together[i] = stream(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    # one at a time they took 8 x (1 prefill + 23 decode) forward passes; batched, far fewer
    assert server.health()["steps"] - before < 8 * 24 / 2


def test_a_seed_gives_the_same_text_and_no_seed_a_new_draw(server):
    client = server.client()

    def text(**seed) -> str:
        return client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=1.0, **seed).choices[0].text

    assert text(seed=7) == text(seed=7)
    assert len({text() for _ in range(3)}) > 1


def test_stop_strings_end_the_reply_before_them(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=1.0, seed=3).choices[0]
    stop = full.text[5:7]
    assert len(stop) == 2
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=1.0, seed=3, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_and_health(server, artifact):
    status, body = server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [artifact.stem]
    assert [m.id for m in server.client().models.list()] == [m["id"] for m in body["data"]]
    health = server.health()
    assert health["status"] == "ok" and health["max_batch"] == 8 and health["active"] == 0


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no key", "wrong key"])
def test_a_missing_or_wrong_api_key_gets_401(server, key):
    for method, path, body in (("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        status, reply = server.request(method, path, body, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong-key").completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert server.health()["status"] == "ok"  # a load balancer's health check needs no key


TOO_LONG = "word " * 600  # more tokens than the server's --max-context 512


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": TOO_LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "temperature": 5e-324}, 400, "temperature"),  # NaN probabilities
    ("/v1/completions", {"prompt": "Hi \udcff"}, 400, "prompt"),  # a lone surrogate: no UTF-8 for the tokenizer
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "top_k": 1.5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "Hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "Hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, 400, "messages"),
    ("/v1/completions", b"x" * ((4 << 20) + 1), 413, None),
    ("/v1/nothing", {}, 404, None),
])
def test_bad_requests_get_the_documented_status_and_json(server, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, reply = server.request("POST", path, None if raw else body, raw=raw)
    assert got == status, reply
    error = reply["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"] and error["param"] == param
    assert server.health()["active"] == 0  # nothing was left running


def test_a_full_server_answers_503_and_serves_again_when_free(one_slot):
    with open_stream(one_slot, max_tokens=400):
        status, reply = one_slot.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and reply["error"]["code"] == "queue_full"
    wait_until_idle(one_slot)
    assert one_slot.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_requests_past_the_open_request_limit_get_the_json_503_and_are_served_again_when_closed(one_slot):
    """one_slot holds max batch 1 + queue 0 + SPARE_REQUESTS requests open at once: that many clients still
    sending their bodies fill it, and one more gets the API's JSON 503 (not the web server's plain text)."""
    from ferrisres.runtime.serve import SPARE_REQUESTS

    held = []
    try:
        for _ in range(1 + SPARE_REQUESTS):
            sock = socket.create_connection((one_slot.host, one_slot.port), timeout=30)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")  # the rest of the body never comes
            held.append(sock)
        deadline = time.monotonic() + 30
        while (reply := one_slot.request("GET", "/health", key=None))[0] == 200:  # until every one is in
            assert time.monotonic() < deadline, "the held requests never filled the server"
            time.sleep(0.01)
        status, body = reply
        assert status == 503 and body["error"]["code"] == "too_many_requests" and body["error"]["message"]
        status, body = one_slot.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and body["error"]["code"] == "too_many_requests"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30
    while (status := one_slot.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0]) == 503:
        assert time.monotonic() < deadline, "the closed requests still count"
        time.sleep(0.05)
    assert status == 200


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_frees_its_slot(one_slot, stream):
    """The request asks for 2048 tokens; its client leaves after the first (or at once, not streaming):
    the slot is free long before 2048 steps, and the next request is served."""
    before = one_slot.health()["steps"]
    with open_stream(one_slot, max_tokens=2048, stream=stream):
        assert one_slot.health()["active"] == 1
    wait_until_idle(one_slot)
    status, reply = one_slot.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    assert one_slot.health()["steps"] - before < 1024


class open_stream:
    """A raw request for `max_tokens` tokens, running while the block runs; the connection is then dropped."""

    def __init__(self, server: Server, max_tokens: int, stream: bool = True):
        self.server, self.max_tokens, self.stream = server, max_tokens, stream

    def __enter__(self):
        body = json.dumps({"prompt": "Hello", "max_tokens": self.max_tokens, "temperature": 0,  # greedy: no early EOS
                           "stream": self.stream}).encode()
        self.sock = socket.create_connection((self.server.host, self.server.port), timeout=30)
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while self.stream and b"data: " not in received:  # generating
            received += self.sock.recv(4096)
        deadline = time.monotonic() + 30
        while self.server.health()["active"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.sock.close()


def wait_until_idle(server: Server, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while server.health()["active"] != 0:
        assert time.monotonic() < deadline, "the server still runs the request of a client that left"
        time.sleep(0.01)


def test_the_server_refuses_bad_flags_in_one_line(artifact, tmp_path):
    for flags, fragment in ((["--max-batch", "0"], "--max-batch"), (["--port", "70000"], "--port"),
                            (["--timeout", "nan"], "--timeout")):
        result = run_tool("ferrisres-serve", str(artifact), *flags)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and fragment in result.stderr
    missing = run_tool("ferrisres-serve", str(tmp_path / "missing.tern"), "--port", "0")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = run_tool("ferrisres-serve", str(artifact), "--port", str(busy.getsockname()[1]))
    assert taken.returncode == 1 and "cannot listen on" in taken.stderr and taken.stderr.count("\n") == 1


# The scheduler in process: step by step, without its thread.

def test_a_long_prompt_is_prefilled_in_chunks_beside_the_others_decode_steps(artifact):
    model = load(artifact)
    rng = np.random.default_rng(0)
    short, long = rng.integers(5, model.config.vocab_size, 3).tolist(), rng.integers(5, model.config.vocab_size, 37).tolist()
    scheduler = Scheduler(model, max_batch=2, max_queue=0, prefill_chunk=4)
    fed, prefills = [], []  # tokens fed per sequence, each forward pass; the passes that wanted no logits
    forward_batch, prefill_batch = model.decoder.forward_batch, model.decoder.prefill_batch

    def recorded(sequences, *args, **kwargs):
        fed.append([len(ids) for ids, _ in sequences])
        return forward_batch(sequences, *args, **kwargs)

    def recorded_prefill(sequences):
        prefills.append(len(fed))
        fed.append([len(ids) for ids, _ in sequences])
        return prefill_batch(sequences)

    model.decoder.forward_batch, model.decoder.prefill_batch = recorded, recorded_prefill
    events = {"short": [], "long": []}

    def submit(name: str, ids: list[int]) -> None:
        generation = Generation(model, ids, model.default_sampling(temperature=0), 16, model.config.eos_token_ids)
        scheduler.submit(generation, events[name].append)

    submit("short", short)
    scheduler.step()  # the short prompt, whole
    submit("long", long)
    while scheduler.step():
        pass
    assert fed[0] == [3]
    prefill = fed[1:11]  # 37 tokens in chunks of 4, each step also decoding the short sequence
    assert prefill == [[1, 4]] * 9 + [[1, 1]] and fed[11] == [1, 1] and prefills == []
    for name, ids in (("short", short), ("long", long)):
        *steps, end = events[name]
        alone = model.generate(ids, max_tokens=16, temperature=0)
        assert [s.token for s in steps] == [s.token for s in alone]
        assert isinstance(end, Finished) and (end.stop_reason, end.completion_tokens) == (alone.stop_reason, len(alone.tokens))
    # with no one decoding, a prompt goes in the longer chunks that prefill faster, and the chunks before
    # its last compute no logits (as a lone generation's): the same tokens
    fed.clear()
    alone = rng.integers(5, model.config.vocab_size, 2 * ALONE_CHUNK + 5).tolist()
    events["alone"] = []
    submit("alone", alone)
    while scheduler.step():
        pass
    assert fed[:3] == [[ALONE_CHUNK], [ALONE_CHUNK], [5]] and prefills == [0, 1]
    assert [e.token for e in events["alone"][:-1]] == [s.token for s in model.generate(alone, max_tokens=16, temperature=0)]


def test_a_cancelled_sequence_leaves_at_once_with_its_cache(artifact):
    model = load(artifact)
    scheduler = Scheduler(model, max_batch=2, max_queue=2)
    generations = [Generation(model, [2, 100 + i], model.default_sampling(temperature=0), 100, ()) for i in range(3)]
    events = []
    sequences = [scheduler.submit(g, events.append) for g in generations]
    scheduler.step()
    assert scheduler.status()["active"] == 2 and scheduler.status()["waiting"] == 1
    cache = weakref.ref(generations[0].cache)
    scheduler.cancel(sequences[0])
    assert scheduler.status()["active"] == 1
    scheduler.step()  # the waiting one takes the free slot
    assert scheduler.active == sequences[1:]
    del generations[0], sequences[0]
    gc.collect()
    assert cache() is None  # nothing of the scheduler holds the cancelled sequence's cache


def test_a_request_past_the_timeout_ends_with_finish_reason_length(artifact):
    s = Server(artifact, "--timeout", "1")
    try:
        start = time.monotonic()
        status, reply = s.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2048, "temperature": 0},
                                  key=None)
        assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
        assert 0 < reply["usage"]["completion_tokens"] < 2048 and time.monotonic() - start < 10
        wait_until_idle(s)
    finally:
        s.stop()


def test_a_shutdown_ends_a_stream_still_generating_with_its_finish_reason_and_done(artifact):
    """SIGTERM while a reply of 2048 tokens streams: after --grace it ends as a timeout does (finish_reason
    length, usage, [DONE]) rather than being cut, and the server exits."""
    s = Server(artifact, "--grace", "0.5")
    try:
        body = json.dumps({"prompt": "Hello", "max_tokens": 2048, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        sock = socket.create_connection((s.host, s.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"data: " not in received:  # generating
            received += sock.recv(4096)
        s.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while chunk := sock.recv(65536):
            received += chunk
        ended = time.monotonic() - signalled
        sock.close()
        events = re.findall(r"data: (.*?)\n\n", received.decode())  # one SSE event per HTTP chunk
        assert events[-1] == "[DONE]", events[-3:]
        finish, counts = json.loads(events[-3]), json.loads(events[-2])
        assert finish["choices"][0]["finish_reason"] == "length"
        assert 0 < counts["usage"]["completion_tokens"] < 2048 and ended < 10
        s.proc.wait(timeout=30)
    finally:
        if s.proc.poll() is None:
            s.stop()


def test_a_hostile_chat_template_is_refused_in_its_sandbox(tmp_path):
    """The template reaches for Python internals: the sandbox refuses, the request gets 400, the server goes on."""
    template = tmp_path / "hostile.jinja"
    template.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    path = tmp_path / "hostile.tern"
    convert(FIXTURES / "tiny_gemma4", path, Options(method="rtn", chat_template=str(template)), progress=False)
    s = Server(path)
    try:
        status, reply = s.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
        assert status == 400 and "chat template" in reply["error"]["message"] and reply["error"]["param"] == "messages"
        assert s.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
    finally:
        s.stop()
