#!/usr/bin/env python3
"""Where a decode step's time goes: `python bench/profile_decode.py ARTIFACT [--context 64] [--steps 4] [--kernel K]`.

Two views of the same steady-state decode steps (after a prefill of `context` random token ids and one
warm-up step), through `Model.generate` as a user runs it:
1. by kernel: every weight matrix the decoder calls is wrapped with a timer, grouped by what it is
   (q/k/v/o projections, MLP gate/up/down, per-layer-input gate/projection, PLE projection, output head),
   with the bytes each group reads and the rate it reads them at; the runtime's leaf functions
   (attention, rms_norm, apply_rope, gelu_tanh) and the per-token work outside the decoder (sampling,
   detokenizing, KV-cache snapshot) likewise; the rest of the step is "other".
2. cProfile over the same number of steps without the timers: the top functions by own time.
The wrappers find the weights through `model.decoder` (its `layers` dicts, `head`, `ple_projection`):
anything it cannot find is simply not broken out and ends up in "other".
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import re
import sys
import time
from collections import defaultdict

import numpy as np


class _Timed:
    """Stands in for a weight matrix (or function): same call, with its time added to `totals[kind]`."""

    def __init__(self, inner, kind: str, totals: dict, nbytes: int = 0):
        self.inner, self.kind, self.totals, self.nbytes = inner, kind, totals, nbytes

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.inner(*a, **k)
        finally:
            entry = self.totals[self.kind]
            entry[0] += time.perf_counter() - t
            entry[1] += 1
            entry[2] += self.nbytes

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _weight_kind(name: str, obj) -> str:
    base = re.sub(r"^(self_attn|mlp(\.experts\.\d+)?)\.", "", name)
    shape = f"{getattr(obj, 'out_features', '?')}x{getattr(obj, 'in_features', '?')}"
    return f"{base} [{shape}]"


def _nbytes(obj) -> int:
    n = 0
    for attr in ("data", "scale"):
        v = getattr(obj, attr, None)
        if isinstance(v, np.ndarray):
            n += v.nbytes
    return n


def _is_weight(obj) -> bool:
    return callable(obj) and isinstance(getattr(obj, "data", None), np.ndarray)


def _instrument(model, totals: dict) -> list:
    """Wrap the decoder's weights and leaf functions; returns the undo list."""
    from ferrisres.runtime import gemma4, generate, kv_cache

    undo = []
    weights = model.weights
    for layer in weights.layers:
        for name, obj in list(layer.items()):
            if _is_weight(obj):
                layer[name] = _Timed(obj, _weight_kind(name, obj), totals, _nbytes(obj))
                undo.append((layer.__setitem__, name, obj))
            elif isinstance(obj, list) and obj and all(_is_weight(o) for o in obj):  # stacked experts
                layer[name] = [_Timed(o, _weight_kind(name, o), totals, _nbytes(o)) for o in obj]
                undo.append((layer.__setitem__, name, obj))
    for attr, kind in (("head", "output head"), ("ple_projection", "per_layer_model_projection")):
        obj = getattr(weights, attr, None)
        if obj is not None and _is_weight(obj):
            setattr(weights, attr, _Timed(obj, f"{kind} [{obj.out_features}x{obj.in_features}] {obj.encoding}",
                                          totals, _nbytes(obj)))
            undo.append((lambda n, v: setattr(weights, n, v), attr, obj))
    for module, fname, kind in ((gemma4, "attention", "fn attention (scores, softmax, values)"),
                                (gemma4, "rms_norm", "fn rms_norm"), (gemma4, "apply_rope", "fn apply_rope"),
                                (gemma4, "gelu_tanh", "fn gelu_tanh"),
                                (generate, "sample", "outside decoder: sampling")):
        f = getattr(module, fname)  # a name that moved must fail here, not go unmeasured
        setattr(module, fname, _Timed(f, kind, totals))
        undo.append((lambda n, v, m=module: setattr(m, n, v), fname, f))
    for cls, meth, kind in ((generate.Generation, "_update_text", "outside decoder: detokenize"),
                            (kv_cache.KVCache, "snapshot", "outside decoder: KV-cache snapshot")):
        f = getattr(cls, meth)

        def wrapped(self, *a, _f=f, _kind=kind, **k):
            t = time.perf_counter()
            try:
                return _f(self, *a, **k)
            finally:
                e = totals[_kind]
                e[0] += time.perf_counter() - t
                e[1] += 1
        setattr(cls, meth, wrapped)
        undo.append((lambda n, v, c=cls: setattr(c, n, v), meth, f))
    return undo


def profile(path: str, context: int = 64, steps: int = 4, top: int = 25, kernel: str = "numpy", threads: int = 1) -> dict:
    from ferrisres.runtime import load, set_threads

    set_threads(threads)
    model = load(path, kernel=kernel)
    model.tokenizer
    rng = np.random.default_rng([0, context])
    ids = [2] + rng.integers(494, model.config.vocab_size, context - 1).tolist()
    gen = model.generate(ids, max_tokens=2 * steps + 3, temperature=0.0)
    it = iter(gen)
    next(it)  # prefill
    next(it)  # one warm-up decode step

    totals: dict = defaultdict(lambda: [0.0, 0, 0])
    undo = _instrument(model, totals)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    timed_wall = time.perf_counter() - start
    for setter, name, value in undo:
        setter(name, value)

    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        next(it)
    prof.disable()
    profiled_wall = time.perf_counter() - start

    step_ms = 1000 * timed_wall / steps
    groups = sorted(((k, v) for k, v in totals.items()), key=lambda kv: -kv[1][0])
    accounted = sum(v[0] for k, v in totals.items())
    rows = []
    for kind, (sec, calls, nbytes) in groups:
        ms = 1000 * sec / steps
        rows.append({"kind": kind, "ms_per_step": ms, "share": sec / timed_wall, "calls_per_step": calls / steps,
                     "mb_per_step": nbytes / steps / 1e6, "gbps": (nbytes / sec / 1e9) if sec and nbytes else None})
    rows.append({"kind": "other (Python glue, residual adds, PLE lookup, RoPE tables, ...)",
                 "ms_per_step": 1000 * (timed_wall - accounted) / steps, "share": 1 - accounted / timed_wall,
                 "calls_per_step": None, "mb_per_step": 0, "gbps": None})

    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(top)
    text_tottime = s.getvalue()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(top)
    text_cum = s.getvalue()
    top_rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        top_rows.append({"function": f"{_short(file)}:{line}({fn})", "calls_per_step": nc / steps,
                         "tottime_ms_per_step": 1000 * tt / steps, "cumtime_ms_per_step": 1000 * ct / steps})

    md = [f"{steps} decode steps after a {context}-token context (`--kernel {model.kernel}`, {_threads(threads)}), {step_ms:.0f} ms per step "
          f"with the timers ({steps / timed_wall:.2f} tok/s), {1000 * profiled_wall / steps:.0f} ms under cProfile.", "",
          "By kernel (wall time inside each group; MB = weight bytes the group reads per step):", "",
          "| what | ms/step | share | calls/step | MB/step | GB/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        calls = "" if r["calls_per_step"] is None else f"{r['calls_per_step']:.0f}"
        gbps = "" if r["gbps"] is None else f"{r['gbps']:.2f}"
        md.append(f"| {r['kind']} | {r['ms_per_step']:.1f} | {r['share']:.1%} | {calls} | {r['mb_per_step']:.1f} | {gbps} |")
    md += ["", f"cProfile, top {top} by own time (per step):", "",
           "| function | calls/step | own ms/step | cumulative ms/step |", "|---|---|---|---|"]
    for r in top_rows:
        md.append(f"| `{r['function']}` | {r['calls_per_step']:.0f} | {r['tottime_ms_per_step']:.1f} | {r['cumtime_ms_per_step']:.1f} |")
    return {"context": context, "steps": steps, "kernel": model.kernel, "threads": threads, "step_ms": step_ms,
            "profiled_step_ms": 1000 * profiled_wall / steps, "kernels": rows, "cprofile_top": top_rows,
            "cprofile_tottime": text_tottime, "cprofile_cumulative": text_cum,
            "markdown": "\n".join(md)}


def _threads(n: int) -> str:
    return "one thread" if n == 1 else f"{n} threads"


def _short(file: str) -> str:
    for marker in ("/main/", "site-packages/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--kernel", default="numpy", help="numpy (default), fast or int8")
    ap.add_argument("--threads", type=int, default=1, help="threads that split each product (default 1)")
    ap.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = ap.parse_args(argv)
    result = profile(args.artifact, args.context, args.steps, kernel=args.kernel, threads=args.threads)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(result["markdown"])
        print()
        print(result["cprofile_cumulative"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
