"""The repository stands alone: nothing in it points outside itself or at the machine it was made on."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = {".git", ".venv", ".cache", ".oracle-venv", "out", "build", "__pycache__", ".pytest_cache"}
# a folder beside the repository, or an absolute path of a build machine's home or work folders
OUTSIDE = re.compile(r"\.\.[/]shared\b|(?<![\w.])/(?:work|home|root|Users|tmp/pytest-of)/")


def text_files():
    for path in sorted(ROOT.rglob("*")):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and not parts & SKIPPED and not any(p.endswith(".egg-info") for p in parts) \
                and "bench/.cache" not in path.relative_to(ROOT).as_posix():
            data = path.read_bytes()
            if b"\0" not in data[:8192]:  # text, not a weight file
                yield path, data.decode("utf-8", errors="replace")


def test_no_file_points_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for path, text in text_files() for m in OUTSIDE.finditer(text)]
    assert found == []
