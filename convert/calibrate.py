"""Calibrated conversion (`--method gptq`): each decoder linear is quantized by GPTQ against the inputs it
really sees, layer by layer, each layer fed by the layers below it as already quantized.

1. The float student (the teacher, with any MoE expansion, AttnRes or LoRA of the options) is written to a
   temporary bf16 artifact beside the output and opened with the runtime, so calibration runs exactly
   the model the runtime computes.
2. Calibration sequences: sampled from that float student itself (temperature 1, seeded, EOS never
   chosen, all sequences advanced together in one batched forward per token), or cut from a text file.
3. Layer by layer, over all calibration tokens at once: each linear that becomes ternary accumulates
   H = X^T X from its input when the forward reaches it, is quantized (`gptq.gptq_planes`), and computes
   its output with the quantized weight. So o_proj sees the quantized q/k/v's attention, down_proj the
   quantized gate/up's activations, and layer i + 1 the quantized layer i ("sequential" calibration).
   Only one layer's Hessians and quantized weights are in memory at a time.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ferrisres.format.encodings import rotate_blocks
from ferrisres.runtime.kv_cache import KVCache
from ferrisres.runtime.model import Model

from .errors import ConversionError
from .gptq import gptq_planes
from .quantize import TritPlanes, group_size_for, rotation_for
from .student import SEQUENCE_TOKENS

log = logging.getLogger("ferrisres.convert")


def calibration_sequences(model: Model, source: str, tokens: int, seed: int) -> list[np.ndarray]:
    """`tokens` calibration token ids in sequences of SEQUENCE_TOKENS: sampled from `model` ("teacher")
    or cut from the UTF-8 text file `source`."""
    count = max(1, tokens // SEQUENCE_TOKENS)
    if source == "teacher":
        return sample_sequences(model, count, SEQUENCE_TOKENS, seed)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"--calibration {source}: cannot read it as UTF-8 text ({e})") from None
    ids = np.asarray(model.encode(text, add_bos=False), dtype=np.int64)
    length = SEQUENCE_TOKENS - 1
    if len(ids) < length:
        raise ConversionError(f"--calibration {source}: {len(ids)} tokens, fewer than one sequence of {length}")
    starts = range(0, min(len(ids) - length, (count - 1) * length) + 1, length)
    return [np.concatenate([[model.config.bos_token_id], ids[s : s + length]]) for s in starts]


def sample_sequences(model: Model, count: int, length: int, seed: int) -> list[np.ndarray]:
    """`count` sequences of `length` tokens (BOS first) sampled from `model` at temperature 1."""
    rng = np.random.default_rng([seed, 1 << 21])
    eos = [t for t in model.config.eos_token_ids if 0 <= t < model.config.vocab_size]
    caches = [KVCache(model.config) for _ in range(count)]
    sequences = np.full((count, length), model.config.bos_token_id, dtype=np.int64)
    start = time.perf_counter()
    for t in range(1, length):
        logits = model.decoder.forward_batch([(seq[t - 1 : t], cache) for seq, cache in zip(sequences, caches)],
                                             last_only=True)
        sequences[:, t] = draw(np.concatenate(logits), rng, excluded=eos)
        model.artifact.release_pages()  # each step reads the whole model: its pages need not stay resident
        if t % 16 == 0:
            log.info("sampling calibration text: %d/%d tokens of %d sequences (%.0f s)", t + 1, length, count,
                     time.perf_counter() - start)
    return list(sequences)


def draw(logits: np.ndarray, rng: np.random.Generator, excluded: list[int]) -> np.ndarray:
    """One token per row of logits [B, vocab], drawn from softmax(logits) with the `excluded` ids (EOS:
    calibration text runs the whole length) never drawn. A row at a time: each is a few MB in float64."""
    if not np.isfinite(logits).all():
        raise ConversionError("the float student produced non-finite logits (NaN or Inf): its weights are broken")
    tokens = np.empty(len(logits), dtype=np.int64)
    for b, row in enumerate(logits):
        z = row.astype(np.float64)
        z[excluded] = -np.inf
        cumulative = np.cumsum(np.exp(z - z.max()))
        threshold = (1 - rng.random()) * cumulative[-1]  # in (0, total]
        tokens[b] = min(int(np.searchsorted(cumulative, threshold)), len(z) - 1)
    return tokens


class Calibration:
    """Runs the float student layer by layer over the calibration tokens, quantizing as it goes.
    `quantized(name)` returns a ternary linear's trit-planes, running the layers up to its own."""

    def __init__(self, model: Model, weights, ternary_names: set[str], sequences: list[np.ndarray],
                 planes_of, group: int, rotate: int, tied: bool):
        self.model, self.weights, self.ternary_names = model, weights, ternary_names
        self.planes_of, self.group, self.rotate = planes_of, group, rotate  # planes_of(name): a linear's planes
        self.tied = tied  # the planes' scales tied (quantize.fit_plane_scales)
        caches = [KVCache(model.config) for _ in sequences]
        self.tokens = model.decoder.embed(list(zip(sequences, caches)))
        self.hessians = HessianCache()
        self.next_layer = 0
        self.done: dict[str, list[TritPlanes]] = {}
        self.started = time.perf_counter()

    def quantized(self, name: str) -> list[TritPlanes]:
        """The trit-planes of artifact tensor `name`: one entry, or one per expert of a 3-D tensor."""
        layer = int(name.split(".")[1])
        while self.next_layer <= layer:
            self._calibrate_layer(self.next_layer)
            self.next_layer += 1
        return self.done.pop(name)

    def _calibrate_layer(self, i: int) -> None:
        decoder = self.model.decoder
        weights, prefix = decoder.layers[i], f"layers.{i}."
        originals = dict(weights)
        pending = []
        for key in originals:
            name = prefix + key
            if name not in self.ternary_names:
                continue
            source = self.weights.read(name, self.model.artifact.tensors[name].shape)
            matrices = source if source.ndim == 3 else source[None]
            calibrating = [CalibratingLinear(m, self.planes_of(name), self.group, self.rotate, self.tied, self.hessians)
                           for m in matrices]
            weights[key] = calibrating if source.ndim == 3 else calibrating[0]
            pending.append((name, calibrating))
        for keys in SHARED_INPUT:
            CalibratingLinear.share_input([weights[k] for k in keys if isinstance(weights.get(k), CalibratingLinear)])
        decoder.layer_step(i, self.tokens)
        weights.update(originals)  # the float linears back: nothing else runs this layer again
        self.hessians.clear()
        self.model.artifact.release_pages()  # this layer's float weights are not read again
        for name, calibrating in pending:
            self.done[name] = [c.result() for c in calibrating]
        log.info("calibrated layer %d/%d (%.0f s)", i + 1, len(decoder.layers), time.perf_counter() - self.started)


# Linears of a layer that read the same input: quantized together, as one matrix of their stacked rows
# (GPTQ treats rows independently given H), so they share one factorization and one pass over the columns.
SHARED_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


class CalibratingLinear:
    """Stands in for one linear during its layer's calibration pass: on its (single) call it measures
    its input's Hessian, quantizes its weight with GPTQ and returns the quantized weight's output.
    Linears that share their input (`share_input`) are quantized together on the first one's call."""

    def __init__(self, w: np.ndarray, planes: int, group: int, rotate: int, tied: bool, hessians: "HessianCache"):
        self.w = w
        self.hessians = hessians
        self.planes, self.tied = planes, tied
        self.group = group_size_for(w.shape[1], group or w.shape[1])
        self.rotation = rotation_for(w.shape[1], rotate) if rotate else 0
        self.planes_result: TritPlanes | None = None
        self.quantized_for: np.ndarray | None = None  # the Hessian planes_result was computed against
        self.siblings = [self]

    @staticmethod
    def share_input(linears: list["CalibratingLinear"]) -> None:
        for linear in linears:
            linear.siblings = linears

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # Big factorizations and products: BLAS threads pay off (the runtime pins BLAS to one thread)
        with threadpool_limits(os.cpu_count(), user_api="blas"):
            h = self.hessians.of(x)
            if self.quantized_for is not h:  # a sibling called with another input is quantized on its own
                together = [s for s in self.siblings if s.quantized_for is None] if self.quantized_for is None else [self]
                stacked = gptq_planes(np.concatenate([s.w for s in together]), h, self.planes, self.group, self.rotation,
                                      tied=self.tied)
                ends = np.cumsum([len(s.w) for s in together])[:-1]
                for s, codes, scales in zip(together, np.split(stacked.codes, ends), np.split(stacked.scales, ends)):
                    s.planes_result = TritPlanes(codes, scales, stacked.rotation)
                    s.quantized_for = h
            # float32, unlike the runtime's float64: the layer's activations over all calibration tokens are
            # its largest arrays (8192 x 12288 for E2B's wide MLPs), and calibration measures them in float32
            return self.hessians.input32 @ self.effective_weight().T.astype(np.float32)

    def effective_weight(self) -> np.ndarray:
        """The quantized weight in the basis of the unrotated input (float64)."""
        w = self.planes_result.dequantized()
        return rotate_blocks(w, self.rotation) if self.rotation else w

    def result(self) -> TritPlanes:
        """The trit-planes, once the layer's pass is over; a linear its pass never called (an expert no
        calibration token chose) is quantized as if its inputs were uncorrelated, H = I: round-to-nearest.
        Lets go of the weight, the Hessian and the siblings: siblings refer to each other, a reference
        cycle that only Python's cyclic collector frees, and numpy-heavy code seldom triggers it, so
        every layer's Hessians and weights would stay resident (E2B: 0.3-0.5 GB per layer)."""
        if self.planes_result is None:
            with threadpool_limits(os.cpu_count(), user_api="blas"):
                self.planes_result = gptq_planes(self.w, np.eye(self.w.shape[1]), self.planes, self.group,
                                                 self.rotation, tied=self.tied)
        self.w = self.quantized_for = self.hessians = None
        self.siblings = []
        return self.planes_result


class HessianCache:
    """X^T X / N of the last input seen: q/k/v (and gate/up) share one input, measured once."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.input = self.input32 = self.hessian = None

    def of(self, x: np.ndarray) -> np.ndarray:
        """float32 products: GPTQ's damping (1% of the mean diagonal) dwarfs their rounding, and GPTQ
        widens H to float64 only to factor it. `input32` keeps the input in float32, as the linears
        multiply it."""
        if self.input is not x:
            self.clear()  # the previous input and Hessian go before the new ones are made
            self.input, self.input32 = x, x.astype(np.float32, copy=False)
            self.hessian = self.input32.T @ self.input32
            self.hessian /= max(1, len(x))
        return self.hessian
