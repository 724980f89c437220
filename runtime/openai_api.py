"""The OpenAI API's completion requests and replies, as `ferrisres-serve` speaks them.

`parse_request` checks a request body (`/v1/chat/completions` or `/v1/completions`) into a
`CompletionRequest`, or raises `ApiError` naming the parameter; the other functions build the JSON
of replies, stream chunks and errors in the shapes the `openai` client reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 4  # as the OpenAI API
MAX_STOP_CHARACTERS = 1024  # per stop string: each is searched for in the text after every token
# Generation.stop_reason -> the API's finish_reason; "timeout" is the server's own (--timeout)
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "max_tokens": "length", "context_full": "length",
                  "timeout": "length"}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools")  # refused rather than silently ignored


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    """What a request asks for: a chat (`messages`) or a raw `prompt` (text or token ids)."""

    chat: bool
    messages: list[dict] | None
    prompt: str | list[int] | None
    max_tokens: int | None  # None: as many as the server allows
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    sampling: dict = field(default_factory=dict)  # SAMPLING_FIELDS given (None: the artifact's default)


def parse_request(body, chat: bool) -> CompletionRequest:
    """The request in `body` (parsed JSON), checked; ApiError(400) naming the first bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = _messages(body.get("messages")) if chat else None
    prompt = None if chat else _prompt(body.get("prompt"))
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: one choice per request", "n")
    for unsupported in UNSUPPORTED:
        if body.get(unsupported) not in (None, False):  # (False == 0: logprobs 0 asks for nothing either)
            raise ApiError(400, f"{unsupported} is not supported", unsupported)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ApiError(400, f"max_tokens must be an integer >= 1, got {str(max_tokens)[:40]}", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options must be an object with a boolean include_usage", "stream_options")
    sampling = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    for name, value in sampling.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ApiError(400, f"{name} must be a number, got {str(value)[:40]}", name)
    return CompletionRequest(chat, messages, prompt, max_tokens, _stop(body.get("stop")), stream,
                             options.get("include_usage", False), sampling)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role", "messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(content, i: int) -> str:
    """A message's text: a string, or an array of text parts (joined); no other kind of part."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", "messages")


def _prompt(prompt) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < 2**31 for t in prompt):
        return prompt
    raise ApiError(400, "prompt must be a string or an array of token ids (one prompt per request)", "prompt")


def _stop(stop) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARACTERS for s in stops):
        raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARACTERS} "
                            "characters", "stop")
    return tuple(stops)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def reply_body(chat: bool, rid: str, created: int, model: str, text: str, finish: str, counts: dict) -> dict:
    """The whole reply of a request that did not stream."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": counts}


def chunk_body(chat: bool, rid: str, created: int, model: str, text: str | None = None,
               finish: str | None = None, role: bool = False, counts: dict | None = None) -> dict:
    """One streamed chunk: new text, the finish reason, the assistant role (a chat's first chunk), or with
    `counts` the usage chunk (no choices)."""
    if counts is not None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else {"content": text} if text is not None else {}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}
    if counts is not None:
        body["usage"] = counts
    return body
