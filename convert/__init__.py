"""Offline converter: a Hugging Face Gemma 4 checkpoint -> a ternary student in one `.tern` artifact."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ferrisres")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
