"""`ferrisres-serve MODEL.tern`: an OpenAI-compatible HTTP server over one artifact, with continuous batching.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models, GET /health. Every request that is generating shares one forward
pass per step (runtime/scheduler.py). Binds 127.0.0.1 unless told otherwise; --api-key (or the
FERRISRES_API_KEY variable) makes every /v1 request need "Authorization: Bearer KEY".
Needs the serve extra: pip install 'ferrisres[serve]'.
"""

import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Optional

from ferrisres.cli import parse_args, run_main
from ferrisres.format import ArtifactError

from .chat_template import ChatTemplateError
from .cli import checked_threads
from .kernels import set_threads, threads
from .model import KERNELS, load
from .scheduler import Scheduler

PROG = "ferrisres-serve"
SERVE_EXTRA = "pip install 'ferrisres[serve]'"
SPARE_REQUESTS = 16  # open requests beyond max batch + queue: health checks, bodies being read
SHUTDOWN_MARGIN = 5  # after the grace: for the replies just ended to send their last events


@dataclass
class Args:
    model: str = field(metadata={"args": ["model"], "help": "the .tern artifact"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)"})
    port: int = field(default=8080, metadata={"help": "TCP port (default 8080; 0 picks a free one)"})
    max_batch: int = field(default=8, metadata={"help": "requests generating at once, in one forward pass per step (default 8)"})
    max_queue: int = field(default=32, metadata={"help": "requests waiting for a slot; beyond, 503 (default 32)"})
    max_tokens: int = field(default=2048, metadata={"help": "most new tokens per request, and the default (default 2048)"})
    max_context: Optional[int] = field(default=None, metadata={"help": "context limit per request in tokens (default: the model's)"})
    timeout: float = field(default=600.0, metadata={"help": "seconds a request may take, waiting included; then its reply ends with finish_reason length (default 600)"})
    api_key: Optional[str] = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' (default: the FERRISRES_API_KEY variable, else none)"})
    threads: Optional[int] = field(default=None, metadata={"help": "threads that split each matrix's rows (default: the physical cores this process may use, within its CPU quota; on a machine busy with other work, fewer can be faster)"})
    kernel: str = field(default="auto", metadata={"choices": list(KERNELS), "help": "matrix products: numpy, fast (pip install 'ferrisres[fast]'), int8 (fast with int8 inputs: faster, not equal to numpy), auto (default: int8 where it can run, else fast, else numpy)"})
    grace: float = field(default=10.0, metadata={"help": "on SIGTERM or Ctrl-C, seconds the replies still generating get to finish; then each ends with finish_reason length (default 10)"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, PROG, __doc__, argv)
    return run_main(PROG, lambda: _serve(args), (ArtifactError, ValueError, ChatTemplateError))


def _serve(args: Args) -> int:
    _check(args)
    notes = []
    thread_count = checked_threads(args.threads, notes)
    try:
        import uvicorn

        from .server import Limits, Shutdown, create_app
    except ImportError as e:
        raise ValueError(f"ferrisres-serve needs uvicorn and starlette ({e}): {SERVE_EXTRA}") from None
    set_threads(thread_count)
    model = load(args.model, kernel=args.kernel)
    model.tokenizer  # parsed now, not in the first request
    limits = Limits(args.max_tokens, min(args.max_context or model.config.max_position_embeddings,
                                         model.config.max_position_embeddings), args.timeout,
                    args.max_batch + args.max_queue + SPARE_REQUESTS)
    listener = _listen(args.host, args.port)
    scheduler = Scheduler(model, args.max_batch, args.max_queue).start()
    shutdown = Shutdown()
    app = create_app(model, scheduler, limits, args.api_key or os.environ.get("FERRISRES_API_KEY") or None, shutdown)
    host, port = listener.getsockname()[:2]
    print(f"{PROG}: serving {model.artifact.path.name} on http://{host}:{port} (kernel {model.kernel}, "
          f"threads {threads()}, max batch {args.max_batch})", file=sys.stderr, flush=True)
    for note in notes:  # after the line that says where it listens, which scripts read first
        print(f"{PROG}: note: {note}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5,
                            timeout_graceful_shutdown=args.grace + SHUTDOWN_MARGIN)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM or Ctrl-C: stop accepting, let the replies end
            shutdown.begin(args.grace)
            super().handle_exit(sig, frame)

    try:
        Server(config).run(sockets=[listener])
    finally:
        scheduler.stop()
    return 0


def _check(args: Args) -> None:
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-tokens", args.max_tokens, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be >= 1, got {args.max_context}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if not 0 <= args.grace < float("inf"):
        raise ValueError(f"--grace must be a number of seconds >= 0, got {args.grace}")


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model's first request can arrive (a busy port is one line)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


if __name__ == "__main__":
    sys.exit(main())
