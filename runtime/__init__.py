"""Minimal runtime: memory-maps a `.tern` artifact and generates text with numpy.

    from ferrisres.runtime import load
    model = load("model.tern")
    for step in model.generate("The capital of France is", max_tokens=32):
        print(step.text, end="", flush=True)

Needs only numpy, h5py and tokenizers.
"""

from .kernels import set_threads
from .model import Model, load

__all__ = ["Model", "load", "set_threads"]
