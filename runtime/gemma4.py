"""The Gemma 4 text decoder in numpy, exactly as Hugging Face transformers computes it (and Gemma 3's,
which is the same decoder without per-layer embeddings, KV sharing, V norm and layer scalars).

Reference: transformers 5.24 `models/gemma4/modeling_gemma4.py`, summarised with line numbers in
../shared/reference/gemma4-transformers.md §4. Weights are views into the memory-mapped artifact;
projections are `Linear`s that decode their stored encoding chunk by chunk.
"""

from __future__ import annotations

import numpy as np

from ferrisres.format import HEAD, Artifact, RopeConfig
from ferrisres.format.schema import SCALE_SUFFIX, SCALED_ENCODINGS, TABLE_SCALE_ENCODINGS
from ferrisres.format.tables import INT4_GROUPS, decode_table_rows

from .kernels import Int4Linear, Linear
from .kv_cache import KVCache

def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """Gemma 4's RMSNorm multiplies by `weight` itself (not 1 + weight, unlike Gemma 3)."""
    y = x * (np.mean(np.square(x), axis=-1, keepdims=True) + eps) ** -0.5
    return y if weight is None else y * weight


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * (x * x * x))))  # x*x*x: x**3 is a slow pow


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Rotation frequencies of the `head_dim / 2` pairs (j, j + head_dim/2).

    "proportional" (full layers) rotates only the first `partial_rotary_factor * head_dim / 2` pairs, with
    exponents over the whole head_dim; the other pairs get frequency 0 and pass through unrotated.
    """
    half = head_dim // 2
    rotated = int(rope.partial_rotary_factor * head_dim // 2) if rope.rope_type == "proportional" else half
    exponents = np.arange(0, 2 * rotated, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.zeros(half, dtype=np.float32)
    inv_freq[:rotated] = np.float32(1) / np.float32(rope.theta) ** exponents
    return inv_freq / np.float32(rope.factor)  # factor is 1 unless "linear" or "proportional" scaling sets it


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, hd]; NeoX half-split pairs: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention(q, keys, values, q_positions, k_positions, window: int | None, scale: float = 1.0,
              softcap: float | None = None) -> np.ndarray:
    """Causal (optionally sliding-window) grouped-query attention. Gemma 4's scale is 1.0 (its q/k norms
    fix the scores' size); Gemma 3's is query_pre_attn_scalar ** -0.5.

    q [T, nH, hd]; keys/values [S, kvh, hd]; query head j reads kv head j // (nH // kvh). Returns [T, nH*hd].
    """
    T, n_heads, hd = q.shape
    kv_heads = keys.shape[1]
    group = n_heads // kv_heads
    qg = q.reshape(T, kv_heads, group, hd).transpose(1, 2, 0, 3).reshape(kv_heads, group * T, hd)
    scores = (qg @ keys.transpose(1, 2, 0)) * scale  # [kvh, group*T, S]
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    visible = (k_positions[None, :] <= q_positions[:, None]) & (k_positions[None, :] >= 0)
    if window is not None:
        visible &= k_positions[None, :] > q_positions[:, None] - window
    scores = np.where(np.tile(visible, (group, 1)), scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs @ values.transpose(1, 0, 2)  # [kvh, group*T, hd]
    return out.reshape(kv_heads, group, T, hd).transpose(2, 0, 1, 3).reshape(T, n_heads * hd)


class Gemma4:
    """Weights and forward pass of one artifact's model (already validated against its config on open)."""

    def __init__(self, artifact: Artifact):
        self.config = c = artifact.config
        self._artifact = artifact
        self.embed_scale = np.float32(np.sqrt(c.hidden_size))
        if c.ple_dim:
            self.ple_projection = self._linear("per_layer_model_projection")
            self.ple_projection_norm = artifact.tensor("per_layer_projection_norm")
        self.layers = [self._layer(i) for i in range(c.num_layers)]
        self.norm = artifact.tensor("norm")
        self.head = self._linear(HEAD if HEAD in artifact.tensors else "embed_tokens")  # else tied: the table is the head
        self.inv_freq = {t: rope_inv_freq(c.rope[t], c.head_dims[i]) for i, t in enumerate(c.layer_types)}
        # Layers from here to the last only read earlier layers' keys/values (None: no such tail).
        tail = [i for i in range(c.num_layers) if all(not c.has_own_kv(j) for j in range(i, c.num_layers))]
        self.first_shared_layer = tail[0] if tail else None
        # Block AttnRes with every gate 0 adds exactly nothing: skip it then.
        self.attnres_gates = artifact.tensor("attnres_gates") if c.attnres else None
        self.attnres = self.attnres_gates is not None and bool(np.any(self.attnres_gates))

    def linears(self):
        """Every Linear of the model (for options that change how they are kept, e.g. --cache int8)."""
        for layer in self.layers:
            for value in layer.values():
                yield from (value if isinstance(value, list) else [value] if isinstance(value, Linear) else [])
        if self.config.ple_dim:
            yield self.ple_projection

    def _table_rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of an embedding table as float32: only those rows (and their scales) are read."""
        info = self._artifact.tensors[name]
        scale = self._artifact.rows(name + SCALE_SUFFIX, ids) if info.encoding in TABLE_SCALE_ENCODINGS else None
        return decode_table_rows(self._artifact.rows(name, ids), info.encoding, scale, info.shape[1])

    def _linear(self, name: str) -> Linear:
        info = self._artifact.tensors[name]
        scaled = info.encoding in SCALED_ENCODINGS or info.encoding in TABLE_SCALE_ENCODINGS
        scale = self._artifact.tensor(name + SCALE_SUFFIX) if scaled else None
        kind = Int4Linear if info.encoding in INT4_GROUPS else Linear  # int4: a tied head over an int4 table
        return kind(self._artifact.tensor(name), info.encoding, info.shape, scale)

    def _stacked_linears(self, name: str) -> list[Linear]:
        """A 3-D tensor [experts, out, in] (Gemma 4's MoE block) as one Linear per expert."""
        info = self._artifact.tensors[name]
        data = self._artifact.tensor(name)
        scale = self._artifact.tensor(name + SCALE_SUFFIX) if info.encoding in SCALED_ENCODINGS else None
        per_row = scale is not None and scale.size > 1
        return [Linear(data[e], info.encoding, info.shape[1:], scale[e] if per_row else scale)
                for e in range(info.shape[0])]

    def _layer(self, i: int) -> dict:
        """Layer i's weights by their name within the layer: vectors as arrays, matrices as Linears."""
        prefix = f"layers.{i}."
        weights = {}
        for name, info in self._artifact.tensors.items():
            if name.startswith(prefix) and not name.endswith(SCALE_SUFFIX):
                load = {1: self._artifact.tensor, 2: self._linear, 3: self._stacked_linears}[len(info.shape)]
                weights[name[len(prefix):]] = load(name)
        return weights

    # -- the forward pass --

    def forward(self, ids: np.ndarray, cache: KVCache, last_only: bool = False,
                hidden_states: list | None = None) -> np.ndarray:
        """Logits float32 [T, vocab] for `ids` following the tokens already in `cache` (which is extended).

        With `last_only`, only the last position's logits are computed ([1, vocab]): all decoding needs.
        `hidden_states`, if given, receives each layer's output [T, hidden] (for evaluation tools).
        """
        # Broken weights may overflow: the sampler refuses non-finite logits with one clear error, so
        # numpy's warnings would only add noise.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._forward(ids, cache, last_only, hidden_states)

    def _forward(self, ids: np.ndarray, cache: KVCache, last_only: bool, hidden_states: list | None) -> np.ndarray:
        c = self.config
        ids = np.asarray(ids, dtype=np.int64)
        positions = np.arange(cache.length, cache.length + len(ids))
        # Activations are float64 (Linear returns float64): they are vectors, so this costs little, and it
        # keeps float32 rounding from compounding over the layers. The matrix products stay float32.
        x = (self._table_rows("embed_tokens", ids) * self.embed_scale).astype(np.float64)
        ple = self._per_layer_inputs(ids, x) if c.ple_dim else None
        rope = {}
        for t, inv_freq in self.inv_freq.items():
            freqs = positions[:, None].astype(np.float32) * inv_freq[None, :]
            emb = np.concatenate([freqs, freqs], axis=-1)
            rope[t] = (np.cos(emb), np.sin(emb))
        shared_kv = {}  # layer index -> (keys, values, key positions) of this step
        attnres = BlockAttnRes(c, cache, x) if self.attnres else None
        # From the first KV-shared layer on no layer writes the cache, so when only the last position's
        # logits are wanted the other positions can be dropped there: exact, and it skips most of a
        # prefill's work (E2B: layers 15-34, the double-wide ones). AttnRes needs every position.
        shortcut = last_only and attnres is None and hidden_states is None and len(ids) > 1
        for i, layer in enumerate(self.layers):
            if shortcut and i == self.first_shared_layer:
                x, positions, ple = x[-1:], positions[-1:], None if ple is None else ple[-1:]
                rope = {t: (cos[-1:], sin[-1:]) for t, (cos, sin) in rope.items()}
            x = self._layer_forward(i, layer, x, positions, rope[c.layer_types[i]], ple, cache, shared_kv)
            if attnres is not None:
                x = attnres.after_layer(i, x, self.attnres_gates)
            if hidden_states is not None:
                hidden_states.append(x)
        if attnres is not None:
            cache.attnres_sums = attnres.sums
        cache.length += len(ids)
        if last_only:
            x = x[-1:]
        return self.logits_of(x)

    def logits_of(self, x: np.ndarray) -> np.ndarray:
        """float32 logits [T, vocab] of last-layer hidden states x [T, hidden]: final norm, head, soft-cap."""
        logits = self.head(rms_norm(x, self.norm, self.config.rms_norm_eps))
        if self.config.final_logit_softcapping:
            cap = self.config.final_logit_softcapping
            logits = cap * np.tanh(logits / cap)
        return logits.astype(np.float32)

    def _per_layer_inputs(self, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Per-layer embeddings (PLE): [T, L, P], layer i's input in [:, i]."""
        c = self.config
        T, L, P = len(ids), c.num_layers, c.ple_dim
        tokens = self._table_rows("embed_tokens_per_layer", ids).reshape(T, L, P) * np.sqrt(P)
        projected = self.ple_projection(x) * c.hidden_size**-0.5
        projected = rms_norm(projected.reshape(T, L, P), self.ple_projection_norm, c.rms_norm_eps)
        return (projected + tokens) * 2**-0.5

    def _layer_forward(self, i, w, x, positions, rope, ple, cache, shared_kv) -> np.ndarray:
        c = self.config
        eps, hd, T = c.rms_norm_eps, c.head_dims[i], len(x)
        cos, sin = rope

        h = rms_norm(x, w["input_layernorm"], eps)
        q = w["self_attn.q_proj"](h).reshape(T, c.num_heads, hd)
        q = apply_rope(rms_norm(q, w["self_attn.q_norm"], eps), cos, sin)
        if c.has_own_kv(i):
            k_raw = w["self_attn.k_proj"](h).reshape(T, c.kv_heads[i], hd)
            v = w["self_attn.v_proj"](h).reshape(T, c.kv_heads[i], hd) if c.has_v_proj(i) else k_raw
            k = apply_rope(rms_norm(k_raw, w["self_attn.k_norm"], eps), cos, sin)
            shared_kv[i] = cache.layers[i].update(k, rms_norm(v, None, eps) if c.value_norm else v, positions)
        keys, values, key_positions = shared_kv[c.kv_sources[i]]
        window = None if c.is_full(i) else c.sliding_window
        att = attention(q, keys, values, positions, key_positions, window, c.attention_scale, c.attn_logit_softcapping)
        x = x + rms_norm(w["self_attn.o_proj"](att), w["post_attention_layernorm"], eps)

        h = rms_norm(x, w["pre_feedforward_layernorm"], eps)
        h = self._expert_mlp(w, h) if c.mlp_experts else mlp(w, "mlp.", h)
        if c.moe_block:
            h = rms_norm(h, w["post_feedforward_layernorm_1"], eps) + rms_norm(
                self._moe_block(w, x), w["post_feedforward_layernorm_2"], eps)
        x = x + rms_norm(h, w["post_feedforward_layernorm"], eps)

        if ple is not None:
            g = gelu_tanh(w["per_layer_input_gate"](x)) * ple[:, i, :]
            x = x + rms_norm(w["per_layer_projection"](g), w["post_per_layer_input_norm"], eps)
        return x * w["layer_scalar"] if c.layer_scalars else x

    def _expert_mlp(self, w: dict, h: np.ndarray) -> np.ndarray:
        """The student's MoE expansion: softmax router over all experts, top-k renormalized to sum 1."""
        c = self.config
        probs = softmax(w["mlp.router"](h).astype(np.float64))
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, : c.mlp_top_k]
        weights = np.take_along_axis(probs, chosen, axis=-1)
        weights /= weights.sum(axis=-1, keepdims=True)
        return routed(h, chosen, weights, lambda e, x: mlp(w, f"mlp.experts.{e}.", x))

    def _moe_block(self, w: dict, residual: np.ndarray) -> np.ndarray:
        """Gemma 4's own MoE block (26B-A4B): routed on the post-attention residual stream."""
        c = self.config
        r = rms_norm(residual, None, c.rms_norm_eps) * w["router.scale"] * c.hidden_size**-0.5
        probs = softmax(w["router.proj"](r).astype(np.float64))
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, : c.top_k_experts]
        weights = np.take_along_axis(probs, chosen, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True) * w["router.per_expert_scale"][chosen]
        xin = rms_norm(residual, w["pre_feedforward_layernorm_2"], c.rms_norm_eps)
        gate_up, down = w["experts.gate_up_proj"], w["experts.down_proj"]

        def expert(e: int, x: np.ndarray) -> np.ndarray:
            gate, up = np.split(gate_up[e](x), 2, axis=-1)
            return down[e](gelu_tanh(gate) * up)

        return routed(xin, chosen, weights, expert)


def mlp(w: dict, prefix: str, h: np.ndarray) -> np.ndarray:
    """Gemma's gated MLP: down(gelu_tanh(gate(h)) * up(h))."""
    return w[prefix + "down_proj"](gelu_tanh(w[prefix + "gate_proj"](h)) * w[prefix + "up_proj"](h))


def routed(x: np.ndarray, chosen: np.ndarray, weights: np.ndarray, expert) -> np.ndarray:
    """Sum over each token's chosen experts of weight * expert(token). The tokens routed to an expert
    are processed together, so in a prefill each expert's weights are unpacked once."""
    out = np.zeros(x.shape, dtype=np.float64)
    for e in np.unique(chosen):
        tokens, slot = np.nonzero(chosen == e)
        out[tokens] += weights[tokens, slot, None] * expert(int(e), x[tokens])
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


class BlockAttnRes:
    """Block AttnRes (design.md §2) over one forward step, made causal with prefix means.

    r_0(t) is the mean over s <= t of the scaled input embedding; r_b(t), for block b, the mean over
    s <= t of its layers' outputs, averaged over those layers. At the end of block b the hidden state
    attends over R_i = rmsnorm(r_i), i = 0..b: h += g_b * sum_i softmax_i(h . R_i / sqrt(H)) R_i.
    The sums over earlier positions come from the cache, so a decode step equals a full recompute.
    """

    def __init__(self, config, cache: KVCache, x0: np.ndarray):
        self.config = config
        self.block_of = {i: b for b, block in enumerate(config.attnres_blocks()) for i in block}
        self.blocks = config.attnres_blocks()
        self.counts = (cache.length + np.arange(1, len(x0) + 1))[:, None]  # positions s <= t
        self.sums = cache.attnres_sums.copy()
        self.reps = [self._rep(0, x0, 1)]
        self.block_sum = None

    def _rep(self, row: int, values: np.ndarray, layers: int) -> np.ndarray:
        """rmsnorm of the prefix mean of `values` (summed over `layers` layers), continuing the cached sum."""
        prefix = self.sums[row] + np.cumsum(values, axis=0)
        self.sums[row] = prefix[-1]
        return rms_norm(prefix / (self.counts * layers), None, self.config.rms_norm_eps)

    def after_layer(self, i: int, x: np.ndarray, gates: np.ndarray) -> np.ndarray:
        b = self.block_of[i]
        block = self.blocks[b]
        self.block_sum = x if i == block.start else self.block_sum + x
        if i != block.stop - 1:
            return x
        self.reps.append(self._rep(b + 1, self.block_sum, len(block)))
        reps = np.stack(self.reps)  # [b + 2, T, H]
        scores = np.einsum("th,nth->tn", x, reps) / np.sqrt(self.config.hidden_size)
        weights = softmax(scores)
        return x + np.float64(gates[b]) * np.einsum("tn,nth->th", weights, reps)
