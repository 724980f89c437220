"""The HTTP side of `ferrisres-serve` (runtime/serve.py): a Starlette application that speaks the OpenAI
API (runtime/openai_api.py) and hands every generation to the continuous-batching scheduler
(runtime/scheduler.py). Each request's events cross from the scheduler's thread into the event loop
through an asyncio queue; a request whose client goes away, or whose time is up, is cancelled there
and then, which frees its slot and its KV cache.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import time
from dataclasses import dataclass

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .generate import Generation, Step
from .model import Model
from .openai_api import FINISH_REASONS, ApiError, CompletionRequest, chunk_body, parse_request, reply_body, usage
from .scheduler import Finished, QueueFull, Scheduler

MAX_BODY_BYTES = 4 << 20  # a request body: far more text than a 131,072-token context holds (~0.5 MB)
BODY_SECONDS = 30.0  # to send a request body: a client that trickles it holds a connection for nothing
WAKE_SECONDS = 1.0  # a reply waiting for its next token looks at its deadline (which a shutdown brings forward) this often


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    max_context: int
    timeout: float
    max_requests: int  # HTTP requests in the application at once (generating, waiting, or sending a body)


class Shutdown:
    """The deadline a shutdown gives every reply still generating (none until it begins): at the deadline
    each ends as a timeout does, with finish_reason "length" (and [DONE] when streamed), not cut off."""

    def __init__(self):
        self.deadline = math.inf

    def begin(self, grace: float) -> None:
        """Called from a signal handler: one float assignment, nothing the event loop could be in the middle of."""
        self.deadline = min(self.deadline, time.monotonic() + grace)


def create_app(model: Model, scheduler: Scheduler, limits: Limits, api_key: str | None, shutdown: Shutdown):
    """The Starlette application serving `model` through `scheduler`; `shutdown` ends its replies when told."""
    model_id = model.artifact.path.stem
    created = int(model.artifact.path.stat().st_mtime)

    def refused(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    def authorized(request) -> bool:
        given = request.headers.get("authorization", "")
        return api_key is None or hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def health(request):
        return JSONResponse({"status": "ok", **scheduler.status()})

    async def models(request):
        if not authorized(request):
            return refused(_bad_key())
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                                         "owned_by": "ferrisres"}]})

    def endpoint(chat: bool):
        async def handle(request):
            try:
                if not authorized(request):
                    raise _bad_key()
                parsed = parse_request(await _json_body(request), chat)
                generation = await _generation(model, parsed, limits)
                reply = Reply(scheduler, generation, limits.timeout, shutdown)
            except ApiError as e:
                return refused(e)
            rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
            shape = (chat, rid, int(time.time()), model_id)
            if parsed.stream:
                return ReplyStream(reply, _sse(reply, shape, parsed.include_usage))
            return await _whole(request, reply, shape)

        return handle

    async def http_error(request, e: HTTPException):
        return refused(ApiError(e.status_code, e.detail, code="not_found" if e.status_code == 404 else None))

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", endpoint(chat=True), methods=["POST"]),
              Route("/v1/completions", endpoint(chat=False), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                     middleware=[Middleware(RequestLimit, limit=limits.max_requests)])


class RequestLimit:
    """ASGI middleware: at most `limit` HTTP requests in the application at once; one more is answered at
    once with the API's JSON 503. (uvicorn's own limit, limit_concurrency, answers in plain text, which
    OpenAI clients cannot read, and counts idle keep-alive connections as requests.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            busy = ApiError(503, f"the server is busy ({self.limit} requests open): try again later",
                            code="too_many_requests", kind="server_error")
            return await JSONResponse(busy.body(), status_code=503)(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _bad_key() -> ApiError:  # a new one each time: a raised exception keeps its traceback, which would grow
    return ApiError(401, "invalid API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


def _too_large() -> ApiError:
    return ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")


async def _json_body(request):
    """The request's JSON, read to MAX_BODY_BYTES (413 beyond) within BODY_SECONDS."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise _too_large()

    async def read() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise _too_large()
        return bytes(data)

    try:
        data = await asyncio.wait_for(read(), BODY_SECONDS)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_SECONDS:.0f} s") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # (not UTF-8 is a ValueError too)
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:100]})") from None


async def _generation(model: Model, request: CompletionRequest, limits: Limits) -> Generation:
    """The request's Generation, its prompt rendered (chat template, in its sandbox) and tokenized off the
    event loop: either may take a while."""
    if request.max_tokens is not None and request.max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is at most {limits.max_tokens} on this server, got {request.max_tokens}",
                       "max_tokens")
    sampling = {"seed": secrets.randbelow(2**63), **request.sampling}  # no seed given: a new draw each time
    try:
        params = model.default_sampling(**sampling)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split(" ", 1)[0]) from None

    def prompt_ids() -> list[int]:
        if request.chat:
            return model.encode(model.render_chat(request.messages))
        if isinstance(request.prompt, str):
            return model.encode(request.prompt)
        return model.checked_ids(request.prompt).tolist()

    try:
        ids = await anyio.to_thread.run_sync(prompt_ids)
        return Generation(model, ids, params, request.max_tokens or limits.max_tokens, model.config.eos_token_ids,
                          request.stop, max_context=limits.max_context)
    except ValueError as e:  # (ChatTemplateError is one) no template, a template's refusal, a prompt too long
        raise ApiError(400, str(e), "messages" if request.chat else "prompt") from None


class Reply:
    """The events of one submitted generation, received in the server's event loop."""

    def __init__(self, scheduler: Scheduler, generation: Generation, timeout: float, shutdown: Shutdown):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def listener(event) -> None:  # called from the scheduler's thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop has closed: the server is stopping
                pass

        self.scheduler, self.generation, self.shutdown = scheduler, generation, shutdown
        self.deadline = time.monotonic() + timeout
        try:
            self.sequence = scheduler.submit(generation, listener)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}): try again later", code="queue_full",
                           kind="server_error") from None

    async def events(self):
        """Each Step, then Finished (or the error the generation failed with, raised)."""
        while True:
            left = min(self.deadline, self.shutdown.deadline) - time.monotonic()
            try:
                event = await asyncio.wait_for(self.queue.get(), max(0.0, min(left, WAKE_SECONDS)))
            except asyncio.TimeoutError:
                if left > WAKE_SECONDS:
                    continue
                self.cancel()
                g = self.generation
                yield Finished("timeout", len(g.prompt_ids), len(g.tokens))
                return
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, Finished):
                return

    def cancel(self) -> None:
        """Stop generating (nothing, if it has finished): its slot and KV cache are let go."""
        self.scheduler.cancel(self.sequence)


async def _whole(request, reply: Reply, shape: tuple):
    """The reply of a request that does not stream; the generation is cancelled if the client goes away."""
    pieces, end = [], None

    async def collect() -> None:
        nonlocal end
        async for event in reply.events():
            if isinstance(event, Step):
                pieces.append(event.text)
            else:
                end = event

    try:
        async with anyio.create_task_group() as group:
            async def watch() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch)
            await collect()
            group.cancel_scope.cancel()
    except Exception as e:  # noqa: BLE001 - the generation failed (out of memory, non-finite logits)
        return JSONResponse(ApiError(500, f"generation failed: {e}", kind="server_error").body(), status_code=500)
    finally:
        reply.cancel()
    if end is None:  # the client went away
        return JSONResponse({}, status_code=499)
    counts = usage(end.prompt_tokens, end.completion_tokens)
    return JSONResponse(reply_body(*shape, "".join(pieces), FINISH_REASONS[end.stop_reason], counts))


async def _sse(reply: Reply, shape: tuple, include_usage: bool):
    """The reply as server-sent events: a chunk per piece of text, the finish reason, usage if asked, [DONE]."""
    chat = shape[0]

    def event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        yield event(chunk_body(*shape, role=True))
    try:
        async for item in reply.events():
            if isinstance(item, Step):
                if item.text:
                    yield event(chunk_body(*shape, text=item.text))
                continue
            yield event(chunk_body(*shape, text="" if not chat else None, finish=FINISH_REASONS[item.stop_reason]))
            if include_usage:
                yield event(chunk_body(*shape, counts=usage(item.prompt_tokens, item.completion_tokens)))
    except Exception as e:  # noqa: BLE001 - the status is sent: the failure goes in the stream
        yield event(ApiError(500, f"generation failed: {e}", kind="server_error").body())
    yield "data: [DONE]\n\n"


class ReplyStream(StreamingResponse):
    """A streamed reply whose generation is cancelled when the response ends for any reason: Starlette
    stops the stream as soon as the client disconnects, before or during it."""

    def __init__(self, reply: Reply, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.reply = reply

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.cancel()
