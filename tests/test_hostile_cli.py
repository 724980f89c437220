"""Hostile command-line values (class 9 of issue 13): numbers far out of range and bytes that are not
UTF-8 end in one line naming the flag, exit 1, before any work; numpy's warning lines never appear."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hostile import ran, refused, run_boxed

HUGE = str(10**23)


@pytest.fixture(scope="module")
def base(converted):
    return converted("tiny_gemma4")


@pytest.mark.parametrize("flags, fragment", [
    (["--top-k", HUGE, "--temperature", "1"], "--top-k must be an integer in [0, 2^31)"),
    (["--seed", HUGE], "--seed must be an integer in [0, 2^64)"),
    (["--threads", "1000000000"], "--threads must be in [1, 256]"),
    (["--threads", "0"], "--threads must be in [1, 256]"),
    (["--temperature", "1e300"], "--temperature must be 0 or in [1e-6, 1e6]"),
    (["--temperature", "5e-324"], "--temperature must be 0 or in [1e-6, 1e6]"),  # NaN probabilities
    (["--repetition-penalty", "1e-300", "--temperature", "1"], "--repetition-penalty must be"),
    (["--min-p", "nan", "--temperature", "1"], "--min-p must be"),
    ([b"--stop", b"\xff"], "--stop is not valid UTF-8"),
    ([b"--system", b"\xfe\xff"], "--system is not valid UTF-8"),
], ids=["top-k", "seed", "threads-huge", "threads-0", "temperature", "temperature-tiny", "repetition-penalty", "min-p-nan", "stop",
        "system"])
def test_out_of_range_flags_are_refused_naming_the_flag(base, flags, fragment):
    refused(run_boxed("ferrisres-run", str(base), "-p", "Hi", "-n", "2", *flags), fragment)


def test_a_prompt_of_bytes_that_are_not_utf8_is_refused(base):
    refused(run_boxed("ferrisres-run", str(base), "--raw", "-n", "2", "-p", b"\xff\xfeHi"), "--prompt is not valid UTF-8")


def test_huge_weights_end_in_one_line_without_numpy_warnings(converted, tmp_path):
    """Weights that overflow float32 make the logits non-finite: the runtime says so in one line, and
    numpy's 'overflow encountered' warnings, which came before it, do not appear."""
    bad = tmp_path / "overflow.tern"
    bad.write_bytes(converted("tiny_gemma4", quant="f32").read_bytes())
    with h5py.File(bad, "r+") as f:
        norm = f["tensors/norm"]
        data = np.full(norm.shape, 3e38, dtype=np.float32)
        norm[...] = data
        from ferrisres.format.spec import digest
        norm.attrs["blake2b"] = digest(data)
    line = refused(run_boxed("ferrisres-run", str(bad), "-p", "Hi", "-n", "2", "--raw"), "non-finite")
    assert "Warning" not in line


def test_sane_flags_still_run(base):
    ran(run_boxed("ferrisres-run", str(base), "-p", "Hi", "-n", "2", "--raw", "--top-k", str(2**31 - 1),
                  "--temperature", "1", "--seed", str(2**64 - 1), "--threads", "2"))


def test_a_prompt_file_that_never_ends_is_read_to_a_bound(base):
    run = run_boxed("ferrisres-run", str(base), "--prompt-file", "/dev/zero", "-n", "1")
    refused(run, "prompt from /dev/zero is larger than 64 MiB")
    assert run.peak_mb < 400


@pytest.mark.parametrize("flags, fragment", [
    (["--moe-experts", "2", "--moe-noise", "1e300"], "--moe-noise must be in [0, 1]"),  # wrote Inf weights
    (["--moe-experts", "2", "--moe-noise", "nan"], "--moe-noise must be in [0, 1]"),
    (["--moe-experts", "4", "--moe-top-k", HUGE], "--moe-top-k must be between 1 and --moe-experts"),
    (["--moe-experts", "1000000000"], "mlp_experts must be an integer in [0, 1024]"),
])
def test_out_of_range_converter_flags_write_nothing(tmp_path, flags, fragment):
    from conftest import FIXTURES

    out = tmp_path / "out.tern"
    refused(run_boxed("ferrisres-convert", str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet", *flags), fragment)
    assert not out.exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--ids", HUGE + ",1"], f"token id {HUGE} is outside the vocabulary"),
    (["--ids", "1"], "at least 2 tokens"),  # divided by zero
    (["--ids", "a,b"], "--ids must be comma-separated integers"),
    (["--text", "/dev/zero"], "text from /dev/zero is larger than 64 MiB"),
])
def test_evaluation_inputs_are_checked(base, flags, fragment):
    refused(run_boxed("ferrisres-eval", str(base), str(base), *flags), fragment)


@pytest.mark.parametrize("tool, flags, fragment", [
    ("ferrisres-run", ["--promt", "Hi"], "unrecognized arguments: --promt Hi"),
    ("ferrisres-run", ["-p"], "argument -p/--prompt: expected one argument"),
    ("ferrisres-run", ["-p", "Hi", "--kernel", "cuda"], "argument --kernel: invalid choice: 'cuda'"),
    ("ferrisres-serve", ["--prot", "9000"], "unrecognized arguments: --prot 9000"),
    ("ferrisres-inspect", ["--verfy"], "unrecognized arguments: --verfy"),
    ("ferrisres-eval", ["--text"], "argument --text: expected one argument"),
    ("ferrisres-convert", ["-o", "x.tern", "--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
])
def test_a_flag_the_parser_refuses_is_one_line(base, tool, flags, fragment):
    # argparse would print its usage block first, a dozen lines above the one that says what is wrong
    run = run_boxed(tool, str(base), *flags)
    lines = run.stderr.splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: ") and fragment in lines[0], run.stderr
