"""What the fuzz test's parts share: the tools it runs, the outcome classes, and the datasets and mutants
they talk about (`fuzz_mutants.py` makes the mutants, `fuzz_driver.py` runs them, `test_fuzz.py` judges)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RUN, INSPECT = "ferrisres-run", "ferrisres-inspect"
TOOL_ARGS = {RUN: ["-p", "Hi", "-n", "2", "--raw"], INSPECT: ["--verify"]}
TOOL_TIMEOUT = 30.0  # seconds per tool run (a normal one takes ~0.05 s)

# What a mutant may do to the pair of tools (see test_fuzz.py)
REFUSED = "refused"
VERIFY_FAILS = "runs, verify fails"
INTACT = "intact"
RUN_REFUSES = "run refuses, inspect ok"
INSPECT_REFUSES = "inspect refuses, run ok"


@dataclass(frozen=True)
class Dataset:
    group: str  # "meta" or "tensors"
    name: str
    offset: int
    nbytes: int
    encoding: str
    shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    digest: str
    header: int  # address of its HDF5 object header

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


def layout(path: Path) -> dict[str, Dataset]:
    """Every dataset of a valid artifact, by `group/name`, in file order."""
    import h5py
    from h5py import h5o

    from ferrisres.format import Artifact

    out = {}
    with Artifact.open(path, check_model=False) as a, h5py.File(path, "r") as f:
        for group, items in (("meta", a.documents), ("tensors", a.tensors)):
            for name, info in items.items():
                header = h5o.get_info(f[group][name].id).addr
                out[f"{group}/{name}"] = Dataset(group, name, info.offset, info.nbytes, info.encoding, info.shape,
                                                 info.stored_shape, info.digest, header)
    return dict(sorted(out.items(), key=lambda kv: kv[1].offset))


@dataclass
class Mutant:
    name: str
    family: str
    base: str | None  # which base artifact it starts from (None: made from nothing)
    make: Callable[[Path | None, Path], None]  # (base artifact, mutant path) -> writes the mutant
    expect: frozenset[str]
    words: tuple[str, ...] = ()  # must all appear in the error line of a refusing tool
    verify: tuple[str, ...] | None = None  # exactly what `--verify` must name when it fails
    keep: bool = False  # kept for the cross-check with the real console scripts
    same_data: bool = True  # every tensor and document keeps its bytes unless --verify says otherwise
