"""The measurements of `make bench`, one per process: `python bench/workers.py KIND ARGS_JSON` prints one
result line (RESULT_MARK + JSON). bench/run.py starts them, so that each has its own peak RSS.

The product code is imported inside each worker, after its memory sampler has started.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time

from plan import COPY_PARAGRAPH, GB

RESULT_MARK = "@@RESULT "


class RssSampler(threading.Thread):
    """Polls /proc/self/status: the peaks of VmRSS, RssAnon (heap) and RssFile (mapped files)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> dict:
        now = _status()
        for k in self.FIELDS:
            self.peak[k] = max(self.peak[k], now.get(k, 0))
        return now

    def reset(self):
        self.peak = dict.fromkeys(self.FIELDS, 0)
        _reset_hwm()
        self.sample()

    def stop(self) -> dict:
        self._done.set()
        self.join()
        self.sample()
        status = _status()
        return {"peak_rss_bytes": self.peak["VmRSS"], "peak_rss_anon_bytes": self.peak["RssAnon"],
                "peak_rss_file_bytes": self.peak["RssFile"], "vm_hwm_bytes": status.get("VmHWM", 0),
                "end_rss_bytes": status.get("VmRSS", 0)}


def _status(pid: int | str = "self") -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def _reset_hwm() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _result(obj: dict) -> None:
    print(RESULT_MARK + json.dumps(obj), flush=True)


def _context_ids(vocab: int, n: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng([seed, n])
    return [2] + rng.integers(494, vocab, n - 1).tolist()  # BOS, then ordinary pieces (no specials or bytes)


def worker_bandwidth(args: dict) -> None:
    """BLAS sgemv over a 1 GiB float32 matrix: DRAM read GB/s (threads as the environment sets them)."""
    import numpy as np

    rows, cols = 1 << 18, 1024  # 1 GiB
    a = np.empty((rows, cols), dtype=np.float32)
    a.fill(1.0)
    x = np.ones(cols, dtype=np.float32)
    y = np.empty(rows, dtype=np.float32)
    np.dot(a, x, out=y)
    times = []
    for _ in range(args.get("repeats", 7)):
        t = time.perf_counter()
        np.dot(a, x, out=y)
        times.append(time.perf_counter() - t)
    _result({"bytes": a.nbytes, "seconds": times, "gbps": a.nbytes / statistics.median(times) / GB,
             "best_gbps": a.nbytes / min(times) / GB})


def worker_convert(args: dict) -> None:
    """One conversion through the converter's own entry point; wall time and memory of this process."""
    sampler = RssSampler(0.1)
    sampler.start()
    from ferrisres.convert.cli import main as convert_main

    start = time.perf_counter()
    rc = convert_main([args["source"], "-o", args["out"], "--force", "--quiet", *args.get("extra", [])])
    seconds = time.perf_counter() - start
    mem = sampler.stop()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    _result({"rc": rc, "seconds": seconds, "ru_maxrss_bytes": ru.ru_maxrss * 1024, "user_s": ru.ru_utime,
             "sys_s": ru.ru_stime, "size_bytes": os.path.getsize(args["out"]) if rc == 0 else None, **mem})


def worker_load(args: dict) -> None:
    """Open -> ready to generate (artifact opened and validated, tokenizer parsed), then one token."""
    t0 = time.perf_counter()
    from ferrisres.runtime import load

    t1 = time.perf_counter()
    model = load(args["path"], kernel=args.get("kernel", "numpy"))
    t2 = time.perf_counter()
    model.tokenizer  # parsed on first use; generating text needs it
    t3 = time.perf_counter()
    gen = model.generate([2, 1000, 2000], max_tokens=1, temperature=0.0)
    for _ in gen:
        pass
    t4 = time.perf_counter()
    _result({"import_s": t1 - t0, "open_s": t2 - t1, "kernels_s": model.compile_seconds, "tokenizer_s": t3 - t2,
             "load_s": t3 - t1, "first_token_s": t4 - t3, "kernel": model.kernel, "peak_rss_bytes": _status().get("VmHWM", 0)})


def _load(args: dict):
    """The artifact loaded as a user would run it: `threads` (default 1) and
    `kernel` ("numpy", the reference path, unless named), tokenizer parsed."""
    from ferrisres.runtime import load, set_threads

    set_threads(args.get("threads", 1))
    model = load(args["path"], kernel=args.get("kernel", "numpy"))
    model.tokenizer
    return model


def worker_prefill(args: dict) -> None:
    """Prompt processing rate: generate(max_tokens=1) on random prompts, its prefill time."""
    model = _load(args)
    vocab = model.config.vocab_size

    def prefill(ids) -> float:
        gen = model.generate(ids, max_tokens=1, temperature=0.0)
        for _ in gen:
            pass
        return gen.prefill_seconds

    prefill(_context_ids(vocab, 8, 99))  # warm-up: maps every weight page
    out = {}
    for n in args["lengths"]:
        times = [prefill(_context_ids(vocab, n, r)) for r in range(args["repeats"])]
        out[str(n)] = {"seconds": times, "tok_s": n / statistics.median(times)}
    out["peak_rss_bytes"] = _status().get("VmHWM", 0)
    _result(out)


def _forward_rate(gen) -> float | None:
    """Tokens per second of the forward passes alone (the Generation's own timing)."""
    return gen.decode_tokens / gen.decode_seconds if gen.decode_tokens and gen.decode_seconds else None


def _timed_generation(model, ids, new: int, **options) -> dict:
    """Decode `new` tokens after prefilling `ids`; per-token wall times (sampling and detokenizing included)."""
    gen = model.generate(ids, max_tokens=new, temperature=0.0, **options)
    stamps, tokens = [], []
    for step in gen:
        stamps.append(time.perf_counter())
        tokens.append(step.token)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    steps = len(gaps)
    wall = stamps[-1] - stamps[0] if steps else float("nan")
    return {"prefill_s": gen.prefill_seconds, "decoded": steps, "wall_s": wall,
            "tok_s": steps / wall if steps else None,
            "median_step_tok_s": 1 / statistics.median(gaps) if steps else None,
            "forward_tok_s": _forward_rate(gen),
            "stop_reason": gen.stop_reason, "tokens": tokens,
            "drafted": gen.drafted, "accepted": gen.accepted}


def worker_decode(args: dict) -> None:
    """Decode after a random context; peak RSS of the decode phase (VmHWM reset after the prefill)."""
    sampler = RssSampler(0.05)
    sampler.start()
    model = _load(args)
    ids = _context_ids(model.config.vocab_size, args["context"], args.get("seed", 0))
    before_decode = {}

    def reset():  # after the prefill: what decoding itself needs
        before_decode.update(peak_rss_prefill_bytes=sampler.peak["VmRSS"], vm_hwm_prefill_bytes=_status().get("VmHWM", 0))
        sampler.reset()

    gen = model.generate(ids, max_tokens=args["new"] + 1, temperature=0.0)
    stamps, tokens = [], []
    for step in gen:
        stamps.append(time.perf_counter())
        tokens.append(step.token)
        if len(stamps) == 1:
            reset()
    mem = sampler.stop()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    steps = len(gaps)
    wall = stamps[-1] - stamps[0] if steps else float("nan")
    _result({"context": args["context"], "prefill_s": gen.prefill_seconds, "decoded": steps, "wall_s": wall,
             "tok_s": steps / wall if steps else None,
             "median_step_tok_s": 1 / statistics.median(gaps) if steps else None,
             "forward_tok_s": _forward_rate(gen),
             "stop_reason": gen.stop_reason, "tokens_head": tokens[:8], "kernel": model.kernel, **before_decode, **mem})


def worker_batch(args: dict) -> None:
    """Batched decoding: `sequences` generations of `new` tokens after their own random `context`-token
    prompts, advanced together by the server's scheduler (one forward per step for all of them). The
    first step prefills every prompt (each fits one chunk) and picks every first token; the rate is the
    tokens of the steps after it over their wall time."""
    from ferrisres.runtime.scheduler import Scheduler

    model = _load(args)
    n = args["sequences"]
    generations = [model.generate(_context_ids(model.config.vocab_size, args["context"], args.get("seed", 0) * n + i),
                                  max_tokens=args["new"], temperature=0.0) for i in range(n)]
    scheduler = Scheduler(model, max_batch=n, max_queue=0)
    for g in generations:
        scheduler.submit(g, lambda event: None)
    scheduler.step()
    first = [len(g.tokens) for g in generations]
    start, steps = time.perf_counter(), 0
    while scheduler.step():
        steps += 1
    wall = time.perf_counter() - start
    decoded = sum(len(g.tokens) for g in generations) - sum(first)
    _result({"sequences": n, "context": args["context"], "decoded": decoded, "steps": steps, "wall_s": wall,
             "tok_s": decoded / wall if decoded else None, "first_step_tokens": first})


def worker_draft(args: dict) -> None:
    """Plain greedy vs `draft="ngram"` greedy on a copy-heavy prompt, interleaved; same tokens required."""
    model = _load(args)
    verify = _verify_cost(model)
    para = model.encode(COPY_PARAGRAPH, add_bos=False)
    ids = [2] + para * 3 + para[: len(para) // 2]
    _timed_generation(model, ids[:16], 2)  # warm-up
    runs = {"plain": [], "ngram": []}
    for _ in range(args["repeats"]):
        runs["plain"].append(_timed_generation(model, ids, args["new"]))
        runs["ngram"].append(_timed_generation(model, ids, args["new"], draft="ngram"))
    plain = statistics.median(r["tok_s"] for r in runs["plain"])
    ngram = statistics.median(r["tok_s"] for r in runs["ngram"])
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["plain"], runs["ngram"]))
    for rs in runs.values():
        for r in rs:
            r["tokens"] = r["tokens"][:16]
    _result({"prompt_tokens": len(ids), "plain_tok_s": plain, "ngram_tok_s": ngram,
             "speedup": ngram / plain, "same_tokens": same, "runs": runs, "verify": verify, "kernel": model.kernel})


def _verify_cost(model, context: int = 64, sizes=(1, 4, 11), repeats: int = 3) -> dict:
    """What speculative decoding can gain at most: the time of one forward over k new tokens (all their
    logits) relative to k = 1, at `context`. k tokens accepted per forward would give k / ratio."""
    from ferrisres.runtime.kv_cache import KVCache

    cache = KVCache(model.config)
    model.forward(_context_ids(model.config.vocab_size, context, 5), cache, last_only=True)
    out = {}
    for k in sizes:
        times = []
        for r in range(repeats + 1):
            state = cache.snapshot()
            t = time.perf_counter()
            model.forward(_context_ids(model.config.vocab_size, k + 1, r)[1:], cache)
            times.append(time.perf_counter() - t)
            cache.restore(state)
        out[str(k)] = statistics.median(times[1:])
    return {"context": context, "seconds": out,
            "ideal_speedup": {k: int(k) * out["1"] / v for k, v in out.items()}}


def worker_profile(args: dict) -> None:
    import profile_decode

    _result(profile_decode.profile(args["path"], context=args.get("context", 64), steps=args.get("steps", 4),
                                   kernel=args.get("kernel", "numpy")))


def worker_serve(args: dict) -> None:
    """ferrisres-serve on the artifact, in its own process: N streaming clients at once (N = 1, 2, 4, 8),
    each a random prompt and `new` greedy tokens; aggregate tokens/s and each stream's time to first
    token; then the time to first token of one request joining `max(streams) - 1` streams mid-decode. The
    server runs `threads` threads (default 1, as every measurement of the run unless named)."""
    import subprocess

    server = subprocess.Popen([sys.executable, "-m", "ferrisres.runtime.serve", args["path"], "--port", "0",
                               "--max-batch", str(max(args["streams"])), "--kernel", args.get("kernel", "numpy"),
                               "--threads", str(args.get("threads", 1))],
                              stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        address = line.split(" on http://")[1].split()[0]
        threading.Thread(target=server.stderr.read, daemon=True).start()  # drained, so the server never blocks
        from ferrisres.format import Artifact

        with Artifact.open(args["path"]) as a:
            vocab = a.config.vocab_size
        _stream(address, _context_ids(vocab, args["prompt"], 99), 2)  # warm-up: maps every weight page
        out = {"prompt": args["prompt"], "new": args["new"], "by_streams": {}}
        for n in args["streams"]:
            prompts = [_context_ids(vocab, args["prompt"], 1000 * n + i) for i in range(n)]
            start = time.perf_counter()
            runs = _concurrently([lambda p=p: _stream(address, p, args["new"]) for p in prompts])
            wall = time.perf_counter() - start
            tokens = sum(r["tokens"] for r in runs)
            out["by_streams"][str(n)] = {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
                                         "ttft_median_s": statistics.median(r["ttft_s"] for r in runs),
                                         "ttft_max_s": max(r["ttft_s"] for r in runs),
                                         "per_stream_tok_s": statistics.median(r["decode_tok_s"] for r in runs)}
        busy = max(args["streams"]) - 1
        started = threading.Event()
        background = [lambda i=i: _stream(address, _context_ids(vocab, args["prompt"], 5000 + i), args["new"] * 2,
                                          started if i == 0 else None) for i in range(busy)]
        runner = threading.Thread(target=_concurrently, args=(background,))
        runner.start()
        started.wait(timeout=3600)
        time.sleep(1.0)  # the others are decoding by now
        out["ttft_joining_s"] = _stream(address, _context_ids(vocab, args["prompt"], 7777), 1)["ttft_s"]
        out["joining_busy_streams"] = busy
        runner.join()
        out["server_peak_rss_bytes"] = _status(server.pid).get("VmHWM", 0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    _result(out)


def _stream(address: str, prompt: list[int], new: int, first_token: threading.Event | None = None) -> dict:
    """One streamed /v1/completions request of `new` greedy tokens: time to first token, tokens, decode rate."""
    import http.client

    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=3600)
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"ferrisres-serve answered {response.status}: {response.read()[:300]!r}")
    first = last = None
    tokens = 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        now = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif first is None:
            first = now
            if first_token is not None:
                first_token.set()
        last = now
    conn.close()
    return {"ttft_s": first - start, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else None}


def _concurrently(calls: list) -> list:
    """Each call's result, all started at once, each in its own thread."""
    results = [None] * len(calls)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, calls[i]())) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        raise RuntimeError("a stream failed (see its traceback above)")
    return results


WORKERS = {"bandwidth": worker_bandwidth, "convert": worker_convert, "load": worker_load,
           "prefill": worker_prefill, "decode": worker_decode, "draft": worker_draft, "profile": worker_profile,
           "serve": worker_serve, "batch": worker_batch}


if __name__ == "__main__":
    WORKERS[sys.argv[1]](json.loads(sys.argv[2]))
