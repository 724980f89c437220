"""An artifact's weights as the decoder uses them: matrices as `Linear`s over the memory map, vectors as
arrays, the embedding tables as `Table`s. After `Artifact.open`, the only code that reads the artifact."""

from __future__ import annotations

import numpy as np

from ferrisres.format import HEAD, Artifact
from ferrisres.format.encodings import GROUPED_TERNARY
from ferrisres.format.schema import SCALE_SUFFIX, SCALED_ENCODINGS, TABLE_SCALE_ENCODINGS
from ferrisres.format.tables import GROUPED_TABLES, decode_table_rows

from .kernels import Linear


class Table:
    """An embedding table, read a step's rows at a time (with their scales, when it is quantized)."""

    def __init__(self, artifact: Artifact, name: str):
        self._artifact, self.name = artifact, name
        self.info = artifact.tensors[name]
        self._scaled = self.info.encoding in TABLE_SCALE_ENCODINGS

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), n]: only those rows are read, with file reads (see `Artifact.rows`)."""
        scale = self._artifact.rows(self.name + SCALE_SUFFIX, ids) if self._scaled else None
        return decode_table_rows(self._artifact.rows(self.name, ids), self.info.encoding, scale, self.info.shape[1])


class Weights:
    """Every weight of one artifact's model (already validated against its config on open)."""

    def __init__(self, artifact: Artifact):
        c = artifact.config
        self._artifact = artifact
        self.embed_tokens = Table(artifact, "embed_tokens")
        if c.ple_dim:
            self.embed_tokens_per_layer = Table(artifact, "embed_tokens_per_layer")
            self.ple_projection = self._linear("per_layer_model_projection")
            self.ple_projection_norm = artifact.tensor("per_layer_projection_norm")
        self.layers = [self._layer(i) for i in range(c.num_layers)]
        self.norm = artifact.tensor("norm")
        self.head = self._linear(HEAD if HEAD in artifact.tensors else "embed_tokens")  # else tied: the table is the head
        self.attnres_gates = artifact.tensor("attnres_gates") if c.attnres else None

    def linears(self):
        """Every Linear of the model (for options that change how they are kept, e.g. --cache int8)."""
        for layer in self.layers:
            for value in layer.values():
                yield from (value if isinstance(value, list) else [value] if isinstance(value, Linear) else [])
        if self._artifact.config.ple_dim:
            yield self.ple_projection

    def linears_of(self, name: str) -> list[Linear]:
        """A weight as Linears: one for a matrix [out, in], one per expert for [experts, out, in]
        (Gemma 4's MoE block)."""
        artifact = self._artifact
        info = artifact.tensors[name]
        data = artifact.tensor(name)
        scales = artifact.tensor(name + SCALE_SUFFIX) if name + SCALE_SUFFIX in artifact.tensors else None
        whole_tensor_scale = scales is not None and info.encoding in SCALED_ENCODINGS and scales.shape == (1,)
        if len(info.shape) == 2:
            data, scales = data[None], None if scales is None or whole_tensor_scale else scales[None]
        linears = []
        for e in range(len(data)):
            scale = group_scale = None
            if info.encoding in GROUPED_TERNARY:
                group_scale = scales[e]
            elif info.encoding in SCALED_ENCODINGS:
                scale = artifact.tensor(name + SCALE_SUFFIX) if whole_tensor_scale else scales[e]
            linears.append(Linear(data[e], info.encoding, info.shape[-2:], scale, group_scale, info.rotation))
        return linears

    def _linear(self, name: str) -> Linear:
        info = self._artifact.tensors[name]
        if info.encoding in GROUPED_TABLES:
            return self._grouped_table_head(name)
        return self.linears_of(name)[0]

    def _grouped_table_head(self, name: str) -> Linear:
        """The tied head over an int4 or int6 table: its packed rows, float16 group scales [rows, groups],
        as one plane (`load` unpacks it to int8 unless the int8 kernel reads it packed)."""
        info = self._artifact.tensors[name]
        return Linear(self._artifact.tensor(name)[:, None, :], info.encoding, info.shape,
                      group_scale=self._artifact.tensor(name + SCALE_SUFFIX)[:, None, :])

    def _layer(self, i: int) -> dict:
        """Layer i's weights by their name within the layer: vectors as arrays, matrices as Linears."""
        prefix = f"layers.{i}."
        weights = {}
        for name, info in self._artifact.tensors.items():
            if name.startswith(prefix) and not name.endswith(SCALE_SUFFIX):
                load = {1: self._artifact.tensor, 2: self._linear, 3: self.linears_of}[len(info.shape)]
                weights[name[len(prefix):]] = load(name)
        return weights

