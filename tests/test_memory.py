"""What a loaded model keeps resident: reading the tokenizer leaves no freed heap behind.

Gemma's tokenizer.json is parsed by the tokenizers library (after the check of its fields, in a child
process), which frees most of what it allocates, and glibc keeps freed heap for the life of the process unless asked to give it back.
On the E2B tokenizer (the synthetic one of bench/make_synthetic_e2b.py, with the real vocabulary size)
that was 241 MB of resident memory, measured, a sixth of what decoding the one-plane E2B student keeps.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

# In a fresh process: the synthetic E2B tokenizer's text, then resident memory around Model.tokenizer's
# parse (through the property's own function, with a stand-in artifact and no check in a child: the parse
# is what is measured).
_PARSE = """
import sys, types
sys.path.insert(0, "bench")
import make_synthetic_e2b
from ferrisres.runtime.model import Model

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

text = make_synthetic_e2b.tokenizer_json(0)
before = resident()
artifact = types.SimpleNamespace(document=lambda name: text, path="synthetic")
tokenizer = Model.tokenizer.func(types.SimpleNamespace(artifact=artifact, _check_tokenizer_document=lambda: None))
assert tokenizer.get_vocab_size() > 260_000
parsed = resident()
model = types.SimpleNamespace(tokenizer=tokenizer)
assert Model._longest_token.func(model) > 1  # encode's bound: it copies the whole vocabulary once
print(parsed - before, resident() - parsed)
"""


def test_reading_the_tokenizer_leaves_no_freed_heap_resident():
    p = subprocess.run([sys.executable, "-c", _PARSE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    parse, vocabulary = map(int, p.stdout.split())
    # 241 MB without giving the freed heap back, 5 MB with it (measured): the line sits between them, far
    # from both, as the tokenizer object itself is the only thing that has to stay
    assert parse < 100e6, f"parsing the tokenizer left the process {parse / 1e6:.0f} MB larger"
    # 50 MB without, under 1 MB with it (measured)
    assert vocabulary < 25e6, f"measuring the longest token left the process {vocabulary / 1e6:.0f} MB larger"
