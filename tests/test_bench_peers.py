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
    row = {"llama_cpp": tests, "ferrisres_numpy": {"decode_tok_s": tests["tg64@d64"]["tok_s"] / 2,
                                                    "prefill_tok_s": tests["pp256"]["tok_s"] * 2},
           "ferrisres_fast": {"decode_tok_s": None}}
    return {"plan": PEERS, "setup_s": 60.0, "total_s": 600.0, "artifact_bytes": 3.8e9,
            "build": {"commit": "0c1e57098bba", "llama_cpp_python": "0.3.36", "build_s": 600.0, "sdist_bytes": 7.6e7,
                      "source_bytes": 3e8, "build_bytes": 2e8, "reused": False},
            "gguf": {"bytes": 2.5e9, "f16_bytes": 1e10, "convert_s": 300.0, "quantize_s": 200.0,
                     "tensor_types": {"TQ2_0": {"tensors": 300, "bytes": 1e9}},
                     "special_tensor_types": {"token_embd.weight": "Q6_K"}},
            "by_threads": {"1": {"cpus": "0", **row}, "2": {"cpus": "0,1", **copy.deepcopy(row)}}}


def test_report_puts_llama_cpp_beside_ferrisres_with_the_ratios():
    lines = peers_section(_peers_result())
    header = next(line for line in lines if line.startswith("| measurement"))
    column = {name: i for i, name in enumerate(c.strip() for c in header.strip("|").split("|"))}
    table = [line for line in lines if line.startswith("| decode") or line.startswith("| prefill")]
    assert len(table) == 4  # decode and prefill, at 1 and 2 threads
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells[0][1] == "1 (0)" and cells[0][column["numpy / llama.cpp"]] == "0.50x"
    assert cells[0][column["fast / llama.cpp"]] == cells[0][column["int8 / llama.cpp"]] == "–"  # not measured: no ratio
    assert cells[2][column["numpy / llama.cpp"]] == "2.00x"  # prefill: ferrisres twice the peer here
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
