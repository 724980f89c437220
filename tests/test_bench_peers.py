"""`make bench PEERS=1` without building llama.cpp: llama-bench's JSON output into the results fields,
the command that pins it, and the report's side-by-side table and GGUF size (measured or the fallback)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from plan import LLAMA_CPP_TQ2_0_BYTES, PEERS  # noqa: E402
from report import peers_section, report  # noqa: E402

# Real `llama-bench -o json` output: bench/peers.py's two commands at 1 thread on the E2B TQ2_0 GGUF,
# joined (model_filename without the measuring machine's folder)
SAMPLE = Path(__file__).parent / "fixtures" / "llama_bench_sample.json"


def test_llama_bench_json_is_parsed_into_medians_of_its_repetitions():
    raw = json.loads(SAMPLE.read_text())
    tests = peers.parse_llama_bench(SAMPLE.read_text())
    assert [t["test"] for t in tests] == ["pp256", "tg64@d64"]
    for t, r in zip(tests, raw):
        samples = sorted(r["samples_ts"])
        assert t["tok_s"] == samples[len(samples) // 2]  # an odd number of repetitions: the middle one
        assert t["avg_ts"] == r["avg_ts"] and t["n_threads"] == r["n_threads"]
        assert t["model_size"] == r["model_size"] > 0


def test_llama_bench_is_pinned_with_taskset_and_asked_for_json():
    cmd = peers.llama_bench_command(Path("m.gguf"), 2, "0,1", 0, 64, 64, 3)
    assert cmd[:3] == ["taskset", "-c", "0,1"]
    args = dict(zip(cmd[4::2], cmd[5::2]))
    assert args == {"-m": "m.gguf", "-t": "2", "-p": "0", "-n": "64", "-d": "64", "-r": "3", "-o": "json"}


def _peers_result() -> dict:
    tests = {t["test"]: t for t in peers.parse_llama_bench(SAMPLE.read_text())}
    decode = {"decode_tok_s": tests["tg64@d64"]["tok_s"] / 2, "decode_runs": [{"tok_s": 1.0, "peak_rss_bytes": 1.2e9}]}
    row = {"llama_cpp": tests,
           "ferrisres": {"default": {"numpy": decode, "fast": {"decode_tok_s": None}, "int8": {"decode_tok_s": None},
                                     "prefill": {"numpy": {"tok_s": tests["pp256"]["tok_s"] * 2}, "int8": {"tok_s": None}}},
                         "one-plane": {"fast": {"decode_tok_s": None}, "int8": {"decode_tok_s": tests["tg64@d64"]["tok_s"]},
                                       "prefill": {}, "batch": {"1": {"tok_s": 10.0}, "8": {"tok_s": 12.5}}}}}
    return {"plan": PEERS, "setup_s": 60.0, "total_s": 600.0, "artifact_bytes": {"default": 3.8e9, "one-plane": 2.8e9},
            "build": {"commit": "0c1e57098bba", "llama_cpp_python": "0.3.36", "build_s": 600.0, "sdist_bytes": 7.6e7,
                      "source_bytes": 3e8, "build_bytes": 2e8, "reused": False},
            "gguf": {"bytes": 2.5e9, "f16_bytes": 1e10, "convert_s": 300.0, "quantize_s": 200.0,
                     "tensor_types": {"TQ2_0": {"tensors": 300, "bytes": 1e9}},
                     "special_tensor_types": {"token_embd.weight": "Q6_K"}},
            "by_threads": {"1": {"cpus": "0", **row}, "2": {"cpus": "0,1", **copy.deepcopy(row)}}}


def test_report_puts_llama_cpp_beside_each_student_with_the_ratios():
    lines = peers_section(_peers_result())
    prefill_at = lines.index(next(x for x in lines if x.startswith("| prefill tok/s")))
    batching_at = lines.index(next(x for x in lines if x.startswith("| tok/s, 1 → 8")))

    def table(start, end):
        return {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
                for line in lines[start:end] if line.startswith("| ")}

    rows, prefill = table(0, prefill_at), table(prefill_at, batching_at)
    assert rows["llama.cpp TQ2_0"][1] == "2.50 GB"
    numpy_row = rows["default, `--kernel numpy`"]
    assert numpy_row[1] == "3.80 GB" and numpy_row[2].endswith("**0.50x**") and numpy_row[4] == "1.20 GB"
    assert rows["default, `--kernel fast`"][2] == "–"  # not measured: no rate, no ratio
    assert rows["one-plane, `--kernel int8`"][1] == "2.80 GB" and rows["one-plane, `--kernel int8`"][3].endswith("**1.00x**")
    assert prefill["default, `--kernel numpy`"][2].endswith("**2.00x**")  # ferrisres twice the peer here
    assert prefill["default, `--kernel int8`"][2] == prefill["one-plane, `--kernel numpy`"][2] == "–"
    batching = [line for line in lines[batching_at:] if line.startswith("| ")]
    assert batching[2] == "| default | – | – |"  # not measured
    assert batching[3] == "| one-plane | 10.00 → 12.50 (**1.25x**) | 10.00 → 12.50 (**1.25x**) |"
    assert any("2.50 GB" in line and "token_embd.weight Q6_K" in line for line in lines)


def test_report_takes_the_measured_gguf_size_and_labels_the_constant_as_a_fallback():
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results.pop("peers", None)
    without = report(results)
    assert f"{LLAMA_CPP_TQ2_0_BYTES / 1e9:.2f} GB: not measured in this run, a fallback" in without
    results["peers"] = _peers_result()
    with_peers = report(results)
    assert "2.50 GB, measured by `make bench PEERS=1`" in with_peers and "fallback" not in with_peers


@pytest.mark.parametrize("bad", ["[{}]", "not json"])
def test_llama_bench_output_that_is_not_its_json_is_refused(bad):
    with pytest.raises((KeyError, ValueError)):
        peers.parse_llama_bench(bad)
