"""BENCHMARKS.md from a benchmark's results (bench/results.json): targets beside measurements, the
bandwidth bound, and the detail, table-encoding, bytes-per-token and scaling tables."""

from __future__ import annotations

import statistics

from plan import GB, LLAMA_CPP_TQ2_0_BYTES, TABLE_VARIANTS, TARGETS


def _fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if unit == "GB":
        return f"{v / GB:.2f} GB"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.2f} {unit}".strip()


def _met(key, value):
    if value is None or isinstance(value, str):
        return "–"
    op, goal, _, stretch = TARGETS[key]
    ok = value >= goal if op == ">=" else value <= goal
    s = "yes" if ok else "**no**"
    if stretch is not None and value >= stretch:
        s += " (stretch too)"
    return s


def _g(obj, *path):
    """obj[path...] or None if anything on the way is missing or failed."""
    for k in path:
        if not isinstance(obj, dict) or "error" in obj or k not in obj:
            return None
        obj = obj[k]
    return obj


def report(r: dict) -> str:
    m = r["machine"]
    bw1, bwn = r["bandwidth"]["one_thread_gbps"], r["bandwidth"]["default_threads_gbps"]
    scale = r["plan"]["scale"]
    bpt = r.get("bytes_per_token", {})
    dec = r.get("decode", {})

    def bound(name, ctx, bw=bw1):
        b = _g(bpt, name, str(ctx), "total")
        return None if b is None else bw * GB / b

    draft = r.get("draft", {})
    if "error" in draft:
        draft_v = "failed (see results.json)"
    elif not draft.get("same_tokens"):
        draft_v = f"{draft['speedup']:.2f}x but different tokens"
    else:
        draft_v = draft["speedup"]
    serve = r.get("serve", {})
    streams = _g(serve, "by_streams") or {}
    one, eight = _g(streams, "1", "tok_s"), _g(streams, "8", "tok_s")
    ran = _g(r, "load", "dense", "kernel")  # recorded by the workers since the runtime ran with --kernel auto
    kernel = f" (`--kernel {ran}`)" if ran else ""
    rows = [
        (f"decode, dense ternary, context 64{kernel}", "decode_dense", _g(dec, "dense", "64", "tok_s"), bound("dense", 64)),
        (f"decode, 2-expert top-2 MoE, context 64{kernel}", "decode_moe", _g(dec, "moe2", "64", "tok_s"), bound("moe2", 64)),
        ("decode with `draft=\"ngram\"`, copy-heavy prompt, vs plain", "draft_speedup", draft_v, None),
        ("prefill, 256-token prompt (dense)", "prefill_256", _g(r, "prefill", "dense", "256", "tok_s"), None),
        ("load: open -> ready to generate, tokenizer included (dense)", "load", _g(r, "load", "dense", "load_s"), None),
        ("peak RSS while decoding the dense student (context 64)", "decode_rss", _g(dec, "dense", "64", "decode_peak_rss_bytes"), None),
        ("peak RSS prefilling a 16384-token prompt, then decoding (dense)", "prefill_16k_rss",
         _g(dec, "dense", "16384", "process_peak_rss_bytes"), None),
        (f"conversion of the {scale} checkpoint (dense ternary), wall time", "convert_time", _g(r, "convert", "dense", "seconds"), None),
        ("conversion peak RSS (ru_maxrss, dense ternary)", "convert_rss", _g(r, "convert", "dense", "ru_maxrss_bytes"), None),
        ("ferrisres-serve: aggregate tok/s at 8 streams / at 1 stream", "serve_8_streams",
         eight / one if one and eight else None, None),
    ]
    env = ", ".join(f"{k}={v}" for k, v in sorted(m["openblas_env"].items())) or "none set"
    dirty = r["code"]["dirty"]
    lines = [
        f"# Benchmarks at {'E2B' if scale == 'full' else scale + ' (reduced E2B)'} scale",
        "",
        f"Measured by `make bench{' QUICK=1' if r['mode'] == 'quick' else ''}` (bench/run.py) on a synthetic checkpoint with "
        f"the exact Gemma 4 E2B text shapes and random weights (bench/make_synthetic_e2b.py, scale `{scale}`). "
        "Every number is a median over runs, each in its own process."
        + (f" The runtime runs as `ferrisres-run` and `ferrisres-serve` do by default, `--kernel {r['plan']['kernel']}`, "
           f"which picked `{ran}` here (`make` installs the fast extra)." if ran else ""),
        f"Code: commit {r['code']['commit'][:12]}" + (f" + uncommitted changes in {len(dirty)} product files" if dirty else "")
        + f" (product code digest {r['code']['product_code_digest']}, run from a snapshot of it); {m['date']}.",
        "",
        f"Machine: {m['cpu'].get('model name')} (family {m['cpu'].get('cpu family')} model {m['cpu'].get('model')}; "
        f"{', '.join(m['cpu'].get('flags', []))}), {m['cores']} cores, L3 {m['l3']}, {m['ram_bytes'] / 2**30:.1f} GiB RAM; "
        f"Python {m['python']}, numpy {m['numpy']}, {m['blas']['name']} {m['blas']['version']} (kernel core {m['blas']['corename']}). "
        f"OpenBLAS environment: {env} (left as found).",
        f"Load average (1/5/15 min) at start {_la(m['loadavg'])}, at end {_la(m.get('loadavg_end'))}"
        + (": the machine was shared with other jobs, so these numbers are pessimistic" if m["loadavg"][0] > 1.5 else "")
        + "; each measurement's load average is in results.json.",
        "",
        f"DRAM read bandwidth (BLAS sgemv over a 1 GiB float32 matrix, median of 7): **{bw1:.1f} GB/s on 1 thread**, "
        f"{bwn:.1f} GB/s with OpenBLAS's default threads. The bandwidth bound is the 1-thread bandwidth divided by the "
        "bytes a decode step reads (table below): the speed if decoding did nothing but stream its weights once.",
        "",
        "## Targets",
        "",
        *(["**Quick run: a tiny model to check the harness. The targets are for the full E2B size; "
           "the 'met' column means nothing here.**", ""] if r["mode"] == "quick" else []),
        "| target | goal | measured (median) | bandwidth bound | measured / bound | met |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, value, bnd in rows:
        op, goal, unit, stretch = TARGETS[key]
        goal_s = f"{op} {_fmt(goal, unit)}" + (f" (stretch {_fmt(stretch, unit)})" if stretch else "")
        value_s = _fmt(value, unit if not isinstance(value, str) else "")
        ratio = f"{value / bnd:.1%}" if bnd and isinstance(value, (int, float)) else "–"
        lines.append(f"| {label} | {goal_s} | {value_s} | {_fmt(bnd, 'tok/s') if bnd else '–'} | {ratio} | {_met(key, value)} |")

    lines += ["", "Details:", ""]
    for name in ("dense", "moe2", "bf16"):
        cv = _g(r, "convert", name)
        if cv is None:
            lines.append(f"- conversion {name}: failed (see results.json)")
            continue
        lines.append(f"- conversion {name}: {cv['seconds']:.0f} s, peak RSS {cv['ru_maxrss_bytes'] / GB:.2f} GB "
                     f"(mapped files {cv['peak_rss_file_bytes'] / GB:.2f} GB + heap {cv['peak_rss_anon_bytes'] / GB:.2f} GB), "
                     f"artifact {cv['size_bytes'] / GB:.2f} GB")
    ld = _g(r, "load", "dense")
    if ld:
        kernels = f" + fast kernels from numba's cache {ld['kernels_s']:.3f} s" if ld.get("kernels_s") else ""
        lines.append(f"- load (dense): open + validate {ld['open_s']:.3f} s{kernels} + tokenizer.json parse {ld['tokenizer_s']:.3f} s "
                     f"(a {r['tokenizer']['json_mb']} MB tokenizer.json, vocabulary 262144); before that, importing the "
                     f"runtime {ld['import_s']:.2f} s; the first token after load {ld['first_token_s']:.2f} s (maps the weights in)")
    dd = _g(dec, "dense", "64")
    if dd:
        lines.append(f"- decode memory (dense, context 64): peak RSS while decoding {dd['decode_peak_rss_bytes'] / GB:.2f} GB "
                     f"(mapped artifact pages {dd['decode_peak_rss_file_bytes'] / GB:.2f} GB + heap {dd['decode_peak_rss_anon_bytes'] / GB:.2f} GB); "
                     f"whole process including the prefill {dd['process_peak_rss_bytes'] / GB:.2f} GB")
    by_kernel = {k: _g(v, "tok_s") for k, v in r.get("decode_kernels", {}).items()}
    if by_kernel:
        lines.append("- decode dense, context 64, by kernel (a run each): "
                     + ", ".join(f"`--kernel {k}` {_fmt(v, 'tok/s') if v else 'failed'}" for k, v in by_kernel.items())
                     + f"; the default{kernel} {_fmt(_g(dec, 'dense', '64', 'tok_s'), 'tok/s')} (above)")
    for name in ("moe2", "bf16"):
        for ctx, v in dec.get(name, {}).items():
            if "error" in v:
                lines.append(f"- decode {name}, context {ctx}: failed (see results.json)")
                continue
            lines.append(f"- decode {name}, context {ctx}: {_fmt(v['tok_s'], 'tok/s')} (bound {_fmt(bound(name, int(ctx)), 'tok/s')}), "
                         f"peak RSS while decoding {v['decode_peak_rss_bytes'] / GB:.2f} GB")
    for name, p in r.get("prefill", {}).items():
        if "error" in p:
            lines.append(f"- prefill {name}: failed (see results.json)")
            continue
        lines.append(f"- prefill {name}: " + ", ".join(f"{n} tokens {v['tok_s']:.1f} tok/s" for n, v in p.items() if n.isdigit()))
    if "speedup" in draft:
        lines.append(f"- draft: plain {draft['plain_tok_s']:.2f} tok/s, ngram {draft['ngram_tok_s']:.2f} tok/s on a "
                     f"{draft['prompt_tokens']}-token copy-heavy prompt (a paragraph 3.5 times); same tokens: {draft['same_tokens']}; "
                     f"drafted/accepted per run: {[(x.get('drafted'), x.get('accepted')) for x in draft['runs']['ngram']]}. "
                     "Random weights need not copy the paragraph, so the acceptance rate here says little about a real model.")
    if draft.get("verify"):
        v = draft["verify"]
        lines.append("- draft ceiling: one forward over k new tokens (all logits) at context 64 takes "
                     + ", ".join(f"{1000 * t:.0f} ms (k={k})" for k, t in v["seconds"].items())
                     + "; if every draft were accepted that is at most "
                     + ", ".join(f"{x:.1f}x (k={k})" for k, x in v["ideal_speedup"].items()) + " plain decoding")
    for f in r.get("failures", []):
        lines.append(f"- **failed**: {f['kind']} {f['label']}: `{f['error'].strip().splitlines()[-1][:200]}`")

    lines += _serving(serve)
    lines += peers_section(r.get("peers"))

    lines += tables_section(r)

    lines += ["", "### Bytes read per decoded token", "",
              "| artifact | layers | head | embedding rows | other | KV cache @64 | total @64 | bound @64 (1 thread / default threads) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, per_ctx in bpt.items():
        b = per_ctx["64"]
        p = b["parts"]
        head = p.get("head", 0) + p.get("head (tied embedding)", 0)
        lines.append(f"| {name} | {p.get('layers', 0) / 1e6:.0f} MB | {head / 1e6:.0f} MB | {p.get('embedding rows', 0) / 1e3:.0f} kB "
                     f"| {p.get('other', 0) / 1e6:.1f} MB | {b['kv_cache'] / 1e6:.1f} MB | {b['total'] / 1e6:.0f} MB "
                     f"| {bw1 * GB / b['total']:.1f} / {bwn * GB / b['total']:.1f} tok/s |")
    lines += ["", "Layers: every ternary projection with its scales, norms and layer scalars (MoE: top_k/experts of the experts); "
              "head: the tied token table as the kernel that ran reads it (the int6 table as stored with `--kernel int8`, else "
              "the int8 copy made at load), with its scales, or the whole tied bf16 embedding for the teacher; other: the PLE projection "
              "and final norm; KV cache: float32 keys and values every layer attends over."]

    lines += ["", "## Scaling", "", "Decode (dense ternary) vs context length (random-token context, then greedy decoding):", "",
              "| context | decode tok/s (wall) | per-step median | forward passes only | bytes/token | bound | measured / bound "
              "| prefill of the context | peak RSS, prefill and decode |",
              "|---|---|---|---|---|---|---|---|---|"]
    for ctx, v in dec.get("dense", {}).items():
        if "error" in v:
            lines.append(f"| {ctx} | failed | | | | | | | |")
            continue
        bnd = bound("dense", ctx)
        lines.append(f"| {ctx} | {_fmt(v['tok_s'])} | {_fmt(v['median_step_tok_s'])} | {_fmt(v['forward_tok_s'])} "
                     f"| {bpt['dense'][ctx]['total'] / 1e6:.0f} MB | {bnd:.1f} | {v['tok_s'] / bnd:.1%} "
                     f"| {v['prefill_s']:.1f} s ({int(ctx) / v['prefill_s']:.1f} tok/s) | {v['process_peak_rss_bytes'] / GB:.2f} GB |")
    lines += ["", "Conversion (dense ternary) vs model size: the main scale with the calibrated default (the conversion "
              "targets), the others rounded to nearest (`--method rtn`, the same encodings):", "",
              "| scale | source checkpoint | method | conversion | peak RSS (ru_maxrss) | mapped files | heap | artifact | decode tok/s @64 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s, v in r.get("scaling_convert", {}).items():
        ck = r["checkpoints"][s]
        sd = _g(r, "scaling_decode", s, "tok_s")
        head = (f"| {s} ({ck['layers']} layers, hidden {ck['hidden']}) | {ck['safetensors_bytes'] / GB:.2f} GB "
                f"| {'calibrated' if s == scale else 'rtn'} ")
        if "error" in v:
            lines.append(head + "| failed | | | | | |")
            continue
        lines.append(head + f"| {v['seconds']:.0f} s | {v['ru_maxrss_bytes'] / GB:.2f} GB | {v['peak_rss_file_bytes'] / GB:.2f} GB "
                     f"| {v['peak_rss_anon_bytes'] / GB:.2f} GB | {v['size_bytes'] / GB:.2f} GB | {_fmt(sd)} |")
    prof = r.get("profile")
    if prof and "markdown" in prof:
        lines += ["", "## Profile of decode steps (dense, context 64)", "", "From bench/profile_decode.py.", "", prof["markdown"]]
    lines += ["", f"Total benchmark time {r['total_seconds'] / 60:.1f} min. Raw data: "
              f"{'bench/results.json' if r['mode'] == 'full' else 'bench/.cache/quick/results.json'}.", ""]
    return "\n".join(lines)


def _serving(serve: dict) -> list[str]:
    """The ferrisres-serve table: aggregate and per-stream rates, time to first token, by concurrent streams."""
    if not serve:
        return []
    if "error" in serve:
        return ["", "### Serving", "", "ferrisres-serve: failed (see results.json)"]
    lines = ["", "### Serving", "",
             f"`ferrisres-serve` on the dense student (one process, `--max-batch 8`, continuous batching): N clients "
             f"stream at once, each a {serve['prompt']}-token random prompt and {serve['new']} greedy tokens over HTTP "
             "(server-sent events). Aggregate: all the streams' tokens over the wall time from the first request to "
             "the last token; time to first token: from sending the request to its first chunk of text.", "",
             "| streams | aggregate tok/s | vs 1 stream | per-stream decode tok/s | time to first token (median / max) |",
             "|---|---|---|---|---|"]
    one = serve["by_streams"].get("1", {}).get("tok_s")
    for n, v in serve["by_streams"].items():
        lines.append(f"| {n} | {v['tok_s']:.2f} | {v['tok_s'] / one:.2f}x | {_fmt(v['per_stream_tok_s'])} "
                     f"| {v['ttft_median_s']:.2f} s / {v['ttft_max_s']:.2f} s |")
    lines += ["", f"Under load: a request arriving while {serve['joining_busy_streams']} streams decode gets its first "
              f"token after {serve['ttft_joining_s']:.2f} s (it joins at the next step and prefills beside them). "
              f"Server peak RSS {serve['server_peak_rss_bytes'] / GB:.2f} GB."]
    return lines


def peers_section(p: dict | None) -> list[str]:
    """`make bench PEERS=1`: llama.cpp's TQ2_0 beside ferrisres, side by side at each thread count, with the ratios."""
    if not p:
        return []
    plan = p["plan"]
    lines = ["", "## Peers: llama.cpp TQ2_0", ""]
    if "error" in p:
        return lines + [f"llama.cpp could not be built or could not convert the checkpoint: `{p['error'].strip().splitlines()[-1][:200]}`"]
    b, g = p["build"], p["gguf"]
    special = ", ".join(f"{n} {t}" for n, t in sorted(g.get("special_tensor_types", {}).items()))
    types = ", ".join(f"{t} {v['tensors']} tensors {v['bytes'] / GB:.2f} GB" for t, v in
                      sorted((g.get("tensor_types") or {}).items(), key=lambda kv: -kv[1]["bytes"]))
    m = p.get("machine")
    lines += [
        "`make bench PEERS=1` (bench/peers.py; `python bench/run.py --only peers` runs this part alone and adds it to "
        "results.json) fetches the llama-cpp-python sdist from the package registry (`pip download`), builds llama-bench "
        "and llama-quantize from the llama.cpp it vendors, makes a bench-only venv (CPU torch pinned) for its "
        "`convert_hf_to_gguf.py`, converts and quantizes the checkpoint, then measures both sides. All of it is cached in "
        "bench/.cache/peers/, keyed by the sdist version and the llama.cpp commit: a rerun only measures.",
        "",
        f"llama.cpp {b['commit'][:9]} (vendored in the package registry's llama-cpp-python {b['llama_cpp_python']} sdist), "
        "built CPU only, Release, `-DGGML_NATIVE=ON` (for this machine's instruction set, as a user would), "
        "OpenMP; the same checkpoint converted by its `convert_hf_to_gguf.py` (f16) then `llama-quantize ... TQ2_0` "
        f"with its defaults: **{g['bytes'] / GB:.2f} GB** GGUF ({types}; outside the layers: {special}). "
        f"ferrisres: {p.get('ferrisres_artifact', 'the dense student')}.",
        "",
        f"Each side pinned to the same cores with taskset, at 1 and 2 threads (ferrisres: `set_threads(n)`; "
        f"llama-bench: `-t n`), alternating llama.cpp and ferrisres at each thread count. Decode: {plan['new']} tokens "
        f"after a {plan['context']}-token context (llama-bench tg{plan['new']} at depth {plan['context']}; ferrisres's "
        f"decode worker); prefill: a {plan['prompt']}-token prompt (pp{plan['prompt']}). Medians of {plan['repetitions']} "
        "repetitions (llama-bench's per-repetition rates; ferrisres's runs, each its own process). "
        "Decoding is measured with each kernel named (`--kernel int8`: its ternary products and the tied head over the int6 table take int8 inputs); "
        f"prefill with {', '.join(f'`--kernel {k}`' for k in plan.get('prefill_kernels', ['numpy']))} (numpy's sgemm over "
        "the whole prompt; the int8 kernel takes a prompt 16 tokens at a time; `--kernel fast` prefills through numpy). "
        "Each ratio is ferrisres's rate over llama.cpp's at the same thread count.",
        "",
    ]
    lines += _peers_table(p, f"decode tok/s ({plan['new']} after {plan['context']})", f"tg{plan['new']}@d{plan['context']}", decode=True)
    lines += [""] + _peers_table(p, f"prefill tok/s ({plan['prompt']} tokens)", f"pp{plan['prompt']}", decode=False)
    if "batch" in plan:
        lines += [""] + _batching_table(p)
    lines += ["", "Rates in parentheses: the lowest and highest of the repetitions. Where they are far apart, the "
              "other jobs on the machine took the cores from one side for part of a run (two threads on two shared cores "
              "wait for each other at every step)."]
    setup = [f"build {b['build_s'] / 60:.1f} min", f"GGUF conversion {g['convert_s'] / 60:.1f} min + quantization "
             f"{g['quantize_s'] / 60:.1f} min"]
    reused = [what for what, rec in (("build", b), ("GGUF", g)) if rec.get("reused")]
    lines += ["", f"Cost of the peer, once: {'; '.join(setup)} ("
              + (f"the {' and '.join(reused)} made by an earlier run and reused here; " if reused else "")
              + f"this run's setup {p['setup_s'] / 60:.1f} min, "
              f"the whole peer comparison {p['total_s'] / 60:.1f} min); on disk (bench/.cache/peers/) the sdist "
              f"{b['sdist_bytes'] / GB:.2f} GB, its tree {b['source_bytes'] / GB:.2f} GB, the build {b['build_bytes'] / GB:.2f} GB, "
              f"the GGUF {g['bytes'] / GB:.2f} GB (the f16 intermediate, {g['f16_bytes'] / GB:.2f} GB, is deleted), "
              + (f"the convert venv {p['venv']['bytes'] / GB:.2f} GB (made in {p['venv']['seconds'] / 60:.1f} min; torch "
                 f"{p['venv']['torch']}, transformers {p['venv']['transformers']})." if p.get("venv") else "and the convert venv.")]
    if m:
        lines += ["", f"Measured {m['date']} (code {p['code']['commit'][:12]}) on {m['cpu'].get('model name')} "
                  f"({', '.join(m['cpu'].get('flags', []))}), {m['cores']} cores; load average at start {_la(m['loadavg'])}, "
                  f"at end {_la(m.get('loadavg_end'))}"
                  + (": the machine was shared with another job, so both sides' numbers are pessimistic" if m["loadavg"][0] > 1.5 else "")
                  + "."]
    for f in p.get("failures", []):
        lines.append(f"- **failed**: {f['kind']} {f['label']}: `{f['error'].strip().splitlines()[-1][:200]}`")
    return lines


def _peers_table(p: dict, what: str, test: str, decode: bool) -> list[str]:
    """One measurement of the peer comparison (`decode`, or prefill): llama.cpp's row, then a row per student
    and kernel (decode: with its peak RSS), a column per thread count with the ratio to llama.cpp there."""
    threads = p["by_threads"]
    head = f"| {what} | size | " + " | ".join(f"{n} thread{'s' if n != '1' else ''} ({row['cpus']})" for n, row in threads.items())
    head += " | peak RSS decoding, 1 thread |" if decode else " |"
    lines = [head, "|---|---|" + "---|" * (len(threads) + decode)]
    peer = {n: _g(row, "llama_cpp", test, "tok_s") for n, row in threads.items()}
    gguf = _fmt(_g(p, "gguf", "bytes"), "GB")
    lines.append(f"| llama.cpp TQ2_0 | {gguf} | " + " | ".join(
        f"{_fmt(peer[n])}{_spread(_g(row, 'llama_cpp', test, 'samples_ts'))}" for n, row in threads.items())
        + (" | – |" if decode else " |"))
    for student, kernels in p["plan"]["students"].items():
        size = _fmt(_g(p, "artifact_bytes", student), "GB")
        for kernel in (kernels if decode else p["plan"].get("prefill_kernels", ["numpy"])):
            label = f"{student}, `--kernel {kernel}`"
            cells = []
            for n, row in threads.items():
                side = _g(row, "ferrisres", student, *([kernel] if decode else ["prefill", kernel])) or {}
                rate, rates = (side.get("decode_tok_s"), _decode_rates(side)) if decode else (side.get("tok_s"), _prefill_rates(side))
                cells.append(f"{_fmt(rate)}{_spread(rates)}, **{_ratio(rate, peer[n])}**" if rate else "–")
            rss = ""
            if decode:
                one = _g(threads.get("1", {}), "ferrisres", student, kernel) or {}
                rss_runs = [r["peak_rss_bytes"] for r in one.get("decode_runs", []) if "peak_rss_bytes" in r]
                rss = " | " + _fmt(statistics.median(rss_runs) if rss_runs else None, "GB")
            lines.append(f"| {label} | {size} | " + " | ".join(cells) + rss + " |")
    return lines


def _batching_table(p: dict) -> list[str]:
    """What `batch` tokens per forward gain over one: llama-bench's pp`batch` against pp1, and ferrisres's
    scheduler advancing `batch` sequences against one (aggregate decode tok/s), per thread count."""
    plan, threads, b = p["plan"], p["by_threads"], str(p["plan"]["batch"])

    def cell(one, many) -> str:
        return f"{_fmt(one)} → {_fmt(many)} (**{_ratio(many, one)}**)" if one and many else "–"

    lines = [f"Batching: {b} tokens per forward against 1 (llama.cpp: `llama-bench -p 1,{b}`, one sequence's prompt; "
             f"ferrisres: the server's scheduler advancing {b} sequences against one, "
             f"{plan['batch_new']} tokens each after a {plan['context']}-token prompt, `--kernel {plan['batch_kernel']}`, "
             "aggregate tok/s; medians):", "",
             "| tok/s, 1 → " + b + " per forward | " + " | ".join(f"{n} thread{'s' if n != '1' else ''}" for n in threads) + " |",
             "|---|" + "---|" * len(threads)]
    lines.append("| llama.cpp TQ2_0 | " + " | ".join(
        cell(_g(row, "llama_cpp", "pp1", "tok_s"), _g(row, "llama_cpp", f"pp{b}", "tok_s")) for row in threads.values()) + " |")
    for student in plan["students"]:
        lines.append(f"| {student} | " + " | ".join(
            cell(_g(row, "ferrisres", student, "batch", "1", "tok_s"), _g(row, "ferrisres", student, "batch", b, "tok_s"))
            for row in threads.values()) + " |")
    return lines


def tables_section(r: dict) -> list[str]:
    """The dense student beside its table-encoding variants (plan.TABLE_VARIANTS): from `--only tables`
    when it has run (its own machine and code), else from the full run."""
    gguf_bytes = _g(r, "peers", "gguf", "bytes")
    gguf_size = (f"{gguf_bytes / GB:.2f} GB, measured by `make bench PEERS=1`" if gguf_bytes else
                 f"{LLAMA_CPP_TQ2_0_BYTES / GB:.2f} GB: not measured in this run, a fallback figure from an earlier measurement")
    t = r.get("tables")
    if t:
        m = t["machine"]
        intro = (f"`python bench/run.py --only tables` (measured {m['date']}, code {t['code']['commit'][:12]}, "
                 f"load average at start {_la(m['loadavg'])}, at end {_la(m.get('loadavg_end'))}): the dense student "
                 f"{t['dense']}, and the same checkpoint converted with other table encodings (`--tables`, "
                 "`--per-layer-table`) and as one-plane (1.58-bit) students, decoded in numpy after a 64-token "
                 "context, the repeats alternated between the students")
        convert, decode = t["convert"], t["decode"]
    elif "dense-bf16-tables" in r.get("convert", {}):  # a full run from before they moved to `--only tables`
        intro = ("The dense student of this run (the default tables of its commit, above) and the same student with "
                 "other table encodings (`--tables`, `--per-layer-table`), and the one-plane (1.58-bit) student")
        convert, decode = r.get("convert", {}), r.get("decode", {})
    else:
        return ["", "### Embedding tables", "", "Not measured yet: `python bench/run.py --only tables` converts and "
                "decodes the table-encoding variants and adds them here."]
    lines = ["", "### Embedding tables", "", f"{intro}, beside llama.cpp's TQ2_0 GGUF ({gguf_size}):", "",
             "| student | options | artifact | decode tok/s @64 | peak RSS while decoding |", "|---|---|---|---|---|"]
    for name in ("dense-bf16-tables", "dense-int8-tables", "dense", "dense-int4-per-layer", *(
            n for n in TABLE_VARIANTS if n.startswith("one-plane"))):
        options = " ".join(TABLE_VARIANTS.get(name, ["--method", "rtn"] if t else ["(the default options)"]))
        cv, dv = _g(convert, name), _g(decode, name, "64")
        if name not in convert:  # results of a run from before the variant was added
            lines.append(f"| {name} | `{options}` | not measured in this run | | |")
        elif cv is None or dv is None:
            lines.append(f"| {name} | `{options}` | failed (see results.json) | | |")
        else:
            lines.append(f"| {name} | `{options}` | {cv['size_bytes'] / GB:.2f} GB | {_fmt(dv['tok_s'], 'tok/s')} "
                         f"| {dv['decode_peak_rss_bytes'] / GB:.2f} GB |")
    return lines


def _ratio(a, b) -> str:
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and b):
        return "–"
    return f"{a / b:.2f}x" if a / b >= 0.1 else f"{a / b:.3f}x"


def _decode_rates(side: dict) -> list:
    """The per-run rates behind a ferrisres decode median (one per worker)."""
    return [r["tok_s"] for r in side.get("decode_runs", []) if "error" not in r]


def _prefill_rates(side: dict) -> list:
    """The per-repeat rates behind a ferrisres prefill median (one worker's repeats)."""
    run = side.get("run") or {}
    n = next((k for k in run if k.isdigit()), None)
    return [int(n) / t for t in run[n]["seconds"]] if n else []


def _spread(rates) -> str:
    return f" ({min(rates):.2f}–{max(rates):.2f})" if rates and len(rates) > 1 else ""


def _la(la) -> str:
    return "–" if la is None else " / ".join(f"{x:.1f}" for x in la)
