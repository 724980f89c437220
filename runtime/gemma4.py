"""The Gemma 4 text decoder in numpy, exactly as Hugging Face transformers computes it (and Gemma 3's,
which is the same decoder without per-layer embeddings, KV sharing, V norm and layer scalars).

Reference: transformers 5.24 `models/gemma4/modeling_gemma4.py`; the math as implemented here is
docs/gemma4-math.md. The weights come from `weights.py`: projections are `Linear`s that decode their
stored encoding chunk by chunk, the embedding tables are read a step's rows at a time.
"""

from __future__ import annotations

import numpy as np

from ferrisres.format import ModelConfig, RopeConfig

from .kv_cache import KVCache
from .weights import Weights


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """Gemma 4's RMSNorm multiplies by `weight` itself (not 1 + weight, unlike Gemma 3)."""
    # np.mean's own arithmetic (a sum, then a division by the count) without its Python layers: a decoded
    # token runs 242 of these norms, and np.mean cost as much as the rest of them
    mean_square = np.add.reduce(np.square(x), axis=-1, keepdims=True) / x.shape[-1]
    y = x * (mean_square + eps) ** -0.5
    return y if weight is None else y * weight


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in one temporary (a prompt's MLP activations are
    the largest arrays of a forward; x*x*x: x**3 is a slow pow)."""
    y = x * x
    y *= x
    y *= 0.044715
    y += x
    y *= np.sqrt(2 / np.pi)
    np.tanh(y, out=y)
    y += 1
    y *= x
    y *= 0.5
    return y


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


SCORES_BYTES = 32 << 20  # attention scores held at once, whatever the prompt's length


def attention(q, keys, values, q_positions, k_positions, window: int | None, scale: float = 1.0,
              softcap: float | None = None) -> np.ndarray:
    """Causal (optionally sliding-window) grouped-query attention. Gemma 4's scale is 1.0 (its q/k norms
    fix the scores' size); Gemma 3's is query_pre_attn_scalar ** -0.5.

    q [T, nH, hd]; keys/values [S, kvh, hd]; query head j reads kv head j // (nH // kvh). Returns [T, nH*hd].
    The queries are taken in chunks of rows (each row's softmax is its own, so the result is the same):
    all scores of a long prompt at once would grow with its square (14k tokens: gigabytes). On a sliding
    layer whose keys are mostly out of every query's window (a long prompt), a chunk of at most `window`
    queries reads only the keys its window reaches: the work grows with the prompt times the window, not
    with its square (the keys left out would have had weight exactly 0).
    """
    windowed = window is not None and len(keys) > 2 * window
    rows = max(1, SCORES_BYTES // (8 * q.shape[1] * (2 * window if windowed else len(keys))))  # float64 scores
    rows = min(rows, window) if windowed else rows
    parts = []
    for r in range(0, len(q), rows):
        qp = q_positions[r : r + rows]
        near = (k_positions > qp.min() - window) & (k_positions <= qp.max()) if windowed else slice(None)
        parts.append(_attention(q[r : r + rows], keys[near], values[near], qp, k_positions[near], window, scale, softcap))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _attention(q, keys, values, q_positions, k_positions, window, scale, softcap) -> np.ndarray:
    T, n_heads, hd = q.shape
    kv_heads = keys.shape[1]
    group = n_heads // kv_heads
    # The two products run in float32, as the projections' do and as BLAS can: the cache is float32, and a
    # float64 query times float32 keys left BLAS for numpy's own loop (E2B at 4096 tokens: 10 ms a full
    # layer, more than its projections). The softmax between them stays float64.
    qg = q.reshape(T, kv_heads, group, hd).transpose(1, 2, 0, 3).reshape(kv_heads, group * T, hd).astype(np.float32)
    scores = np.multiply(qg @ keys.transpose(1, 2, 0), scale, dtype=np.float64)  # [kvh, group*T, S]
    # in place from here: a long prompt's scores are the largest arrays of a forward (SCORES_BYTES a chunk)
    if softcap:
        scores /= softcap
        np.tanh(scores, out=scores)
        scores *= softcap
    visible = (k_positions[None, :] <= q_positions[:, None]) & (k_positions[None, :] >= 0)
    if window is not None:
        visible &= k_positions[None, :] > q_positions[:, None] - window
    if not visible.all():  # [T, S], for every head of the query: scores as [kvh, group, T, S]
        np.copyto(scores.reshape(kv_heads, group, T, -1), -np.inf, where=~visible)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores.astype(np.float32) @ values.transpose(1, 0, 2)  # [kvh, group*T, hd]
    return out.reshape(kv_heads, group, T, hd).transpose(2, 0, 1, 3).reshape(T, n_heads * hd).astype(np.float64)


class Gemma4:
    """The forward pass of one artifact's model over its weights (`weights.py`)."""

    def __init__(self, config: ModelConfig, weights: Weights):
        self.config = c = config
        self.weights = weights
        self.layers = weights.layers  # each layer's weights by name; calibration swaps some in and out
        self.embed_scale = np.float32(np.sqrt(c.hidden_size))
        self.inv_freq = {t: rope_inv_freq(c.rope[t], c.head_dims[i]) for i, t in enumerate(c.layer_types)}
        # Layers from here to the last only read earlier layers' keys/values (None: no such tail).
        tail = [i for i in range(c.num_layers) if all(not c.has_own_kv(j) for j in range(i, c.num_layers))]
        self.first_shared_layer = tail[0] if tail else None
        # Block AttnRes with every gate 0 adds exactly nothing: skip it then.
        self.attnres = weights.attnres_gates is not None and bool(np.any(weights.attnres_gates))
        # The layers a step must run to extend the caches: AttnRes's running sums take every layer's output.
        self.cache_layers = len(self.layers) if self.attnres or not tail else tail[0]
        # The last layer that reads each layer's keys/values in a step: after it, they can be let go.
        self.last_reader = {source: i for i, source in enumerate(c.kv_sources)}

    def forward(self, ids: np.ndarray, cache: KVCache, last_only: bool = False,
                hidden_states: list | None = None) -> np.ndarray:
        """Logits float32 [T, vocab] for `ids` following the tokens already in `cache` (which is extended).

        With `last_only`, only the last position's logits are computed ([1, vocab]): all decoding needs.
        `hidden_states`, if given, receives each layer's output [T, hidden] (for evaluation tools).
        """
        return self.forward_batch([(ids, cache)], last_only, hidden_states)[0]

    def forward_batch(self, sequences: list[tuple[np.ndarray, KVCache]], last_only: bool = False,
                      hidden_states: list | None = None) -> list[np.ndarray]:
        """`forward` for several independent sequences at once, each (ids, its own cache), in one pass:
        every weight is decoded once for all their tokens. Returns each sequence's logits."""
        # Broken weights may overflow: the sampler refuses non-finite logits with one clear error, so
        # numpy's warnings would only add noise.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            tokens = self.embed(sequences)
            for i in range(len(self.layers)):
                self.layer_step(i, tokens, last_only and hidden_states is None)
                if hidden_states is not None:
                    hidden_states.append(tokens.x)
            tokens.finish()
            if last_only:
                tokens.keep_last()
            logits = self.logits_of(tokens.x)
        return [logits[s.start : s.stop] for s in tokens.segments]

    def prefill_batch(self, sequences: list[tuple[np.ndarray, KVCache]]) -> None:
        """Extend each cache with its ids without computing logits (a long prompt's chunks but the last):
        only the layers up to the last that writes a cache run. Exact: the later ones only read it."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # as in forward_batch
            tokens = self.embed(sequences)
            for i in range(self.cache_layers):
                self.layer_step(i, tokens)
            tokens.finish()

    def embed(self, sequences: list[tuple[np.ndarray, KVCache]]) -> "Tokens":
        """The decoder's input for the new tokens of `sequences`: scaled embeddings, per-layer inputs, RoPE."""
        c = self.config
        tokens = Tokens(sequences)
        if self.attnres and len(sequences) > 1:
            raise ValueError("Block AttnRes keeps one running sum per sequence: forward one sequence at a time")
        # Activations are float64 (Linear returns float64): they are vectors, so this costs little, and it
        # keeps float32 rounding from compounding over the layers. The matrix products stay float32.
        ids = tokens.ids
        x = (self.weights.embed_tokens.rows(ids) * self.embed_scale).astype(np.float64)
        tokens.x = x
        tokens.ple = self._per_layer_inputs(ids, x) if c.ple_dim else None
        for t, inv_freq in self.inv_freq.items():
            freqs = tokens.positions[:, None].astype(np.float32) * inv_freq[None, :]
            emb = np.concatenate([freqs, freqs], axis=-1)
            tokens.rope[t] = (np.cos(emb), np.sin(emb))
        tokens.attnres = BlockAttnRes(c, sequences[0][1], x) if self.attnres else None
        return tokens

    def layer_step(self, i: int, tokens: "Tokens", last_only: bool = False) -> None:
        """Run layer i on `tokens` (in place). From the first KV-shared layer on no layer writes the
        cache, so when only each sequence's last logits are wanted the other positions are dropped
        there: exact, and it skips most of a prefill's work (E2B: layers 15-34, the double-wide ones).
        AttnRes needs every position."""
        if last_only and i == self.first_shared_layer and tokens.attnres is None:
            tokens.keep_last()
        tokens.x = self._layer_forward(i, self.layers[i], tokens)
        for s in tokens.segments:
            for source in [j for j in s.shared_kv if self.last_reader[j] == i]:
                del s.shared_kv[source]
        if tokens.attnres is not None:
            tokens.x = tokens.attnres.after_layer(i, tokens.x, self.weights.attnres_gates)

    def logits_of(self, x: np.ndarray) -> np.ndarray:
        """float32 logits [T, vocab] of last-layer hidden states x [T, hidden]: final norm, head, soft-cap."""
        # float32 throughout: in float64 the soft-cap over 262144 logits a token cost a few percent of a
        # decode step, and more than the head's own product in a batched step of eight
        logits = self.weights.head(rms_norm(x, self.weights.norm, self.config.rms_norm_eps), np.float32)
        if self.config.final_logit_softcapping:
            cap = np.float32(self.config.final_logit_softcapping)
            logits /= cap
            np.tanh(logits, out=logits)
            logits *= cap
        return logits

    def _per_layer_inputs(self, ids: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Per-layer embeddings (PLE): [T, L, P], layer i's input in [:, i]."""
        c = self.config
        T, L, P = len(ids), c.num_layers, c.ple_dim
        w = self.weights
        tokens = w.embed_tokens_per_layer.rows(ids).reshape(T, L, P) * np.sqrt(P)
        projected = w.ple_projection(x) * c.hidden_size**-0.5
        projected = rms_norm(projected.reshape(T, L, P), w.ple_projection_norm, c.rms_norm_eps)
        return (projected + tokens) * 2**-0.5

    def _layer_forward(self, i: int, w: dict, tokens: "Tokens") -> np.ndarray:
        c = self.config
        eps, hd, x = c.rms_norm_eps, c.head_dims[i], tokens.x
        T = len(x)
        cos, sin = tokens.rope[c.layer_types[i]]

        h = rms_norm(x, w["input_layernorm"], eps)
        q = w["self_attn.q_proj"](h).reshape(T, c.num_heads, hd)
        q = apply_rope(rms_norm(q, w["self_attn.q_norm"], eps), cos, sin)
        if c.has_own_kv(i):
            k_raw = w["self_attn.k_proj"](h).reshape(T, c.kv_heads[i], hd)
            v = w["self_attn.v_proj"](h).reshape(T, c.kv_heads[i], hd) if c.has_v_proj(i) else k_raw
            k = apply_rope(rms_norm(k_raw, w["self_attn.k_norm"], eps), cos, sin)
            v = rms_norm(v, None, eps) if c.value_norm else v
        window = None if c.is_full(i) else c.sliding_window
        for s in tokens.segments:
            if c.has_own_kv(i):
                s.shared_kv[i] = s.cache.layers[i].update(k[s.start : s.stop], v[s.start : s.stop],
                                                          tokens.positions[s.start : s.stop])
        att = self._attention(i, q, tokens, window)
        x = x + rms_norm(w["self_attn.o_proj"](att), w["post_attention_layernorm"], eps)

        h = rms_norm(x, w["pre_feedforward_layernorm"], eps)
        h = self._expert_mlp(w, h) if c.mlp_experts else mlp(w, "mlp.", h)
        if c.moe_block:
            h = rms_norm(h, w["post_feedforward_layernorm_1"], eps) + rms_norm(
                self._moe_block(w, x), w["post_feedforward_layernorm_2"], eps)
        x = x + rms_norm(h, w["post_feedforward_layernorm"], eps)

        if tokens.ple is not None:
            g = gelu_tanh(w["per_layer_input_gate"](x)) * tokens.ple[:, i, :]
            x = x + rms_norm(w["per_layer_projection"](g), w["post_per_layer_input_norm"], eps)
        return x * w["layer_scalar"] if c.layer_scalars else x

    def _attention(self, i: int, q: np.ndarray, tokens: "Tokens", window: int | None) -> np.ndarray:
        """Each sequence's queries attend to its own keys only. Sequences at the same positions (a batch
        of equal prompts, or of equal lengths, as calibration runs) are one call: their heads side by
        side, each query head still reading its own sequence's key heads."""
        c = self.config
        segments = tokens.segments
        sources = [s.shared_kv[c.kv_sources[i]] for s in segments]
        rows = segments[0].stop - segments[0].start
        aligned = (len(segments) > 1 and len(q) == rows * len(segments)
                   and all(s.stop - s.start == rows and len(kv[2]) == len(sources[0][2]) for s, kv in zip(segments, sources))
                   and (tokens.positions.reshape(-1, rows) == tokens.positions[:rows]).all()
                   and (np.stack([kv[2] for kv in sources]) == sources[0][2]).all())
        if aligned:
            B, (S, kvh, hd) = len(segments), sources[0][0].shape
            heads = q.reshape(B, rows, c.num_heads, hd).transpose(1, 0, 2, 3).reshape(rows, B * c.num_heads, hd)
            keys = np.stack([kv[0] for kv in sources], axis=1).reshape(S, B * kvh, hd)
            values = np.stack([kv[1] for kv in sources], axis=1).reshape(S, B * kvh, hd)
            out = attention(heads, keys, values, tokens.positions[:rows], sources[0][2], window,
                            c.attention_scale, c.attn_logit_softcapping)
            return out.reshape(rows, B, -1).transpose(1, 0, 2).reshape(B * rows, -1)
        att = np.empty((len(q), c.num_heads * q.shape[-1]))
        for s, (keys, values, key_positions) in zip(segments, sources):
            att[s.start : s.stop] = attention(q[s.start : s.stop], keys, values, tokens.positions[s.start : s.stop],
                                              key_positions, window, c.attention_scale, c.attn_logit_softcapping)
        return att

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
    activation = gelu_tanh(w[prefix + "gate_proj"](h))
    activation *= w[prefix + "up_proj"](h)
    return w[prefix + "down_proj"](activation)


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


class Segment:
    """One sequence's rows [start, stop) of a forward step's tokens, its cache, and the keys/values
    its layers computed in this step (KV-shared layers read them)."""

    def __init__(self, start: int, stop: int, cache: KVCache):
        self.start, self.stop, self.cache = start, stop, cache
        self.shared_kv: dict[int, tuple] = {}


class Tokens:
    """The tokens of one forward step, the new tokens of one or more sequences one after the other:
    the hidden states x [T, hidden] and what every layer needs of them."""

    def __init__(self, sequences: list[tuple[np.ndarray, KVCache]]):
        self.segments, ids, positions = [], [], []
        for seq_ids, cache in sequences:
            seq_ids = np.asarray(seq_ids, dtype=np.int64).reshape(-1)
            start = sum(len(a) for a in ids)
            self.segments.append(Segment(start, start + len(seq_ids), cache))
            ids.append(seq_ids)
            positions.append(np.arange(cache.length, cache.length + len(seq_ids)))
        self.ids, self.positions = np.concatenate(ids), np.concatenate(positions)
        self.x: np.ndarray | None = None
        self.ple: np.ndarray | None = None  # per-layer inputs [T, L, P]
        self.rope: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # cos, sin by layer type
        self.attnres: BlockAttnRes | None = None

    def keep_last(self) -> None:
        """Keep only each sequence's last token (its cache already holds the others' keys and values)."""
        last = np.asarray([s.stop - 1 for s in self.segments])
        self.x, self.positions = self.x[last], self.positions[last]
        self.ple = None if self.ple is None else self.ple[last]
        self.rope = {t: (cos[last], sin[last]) for t, (cos, sin) in self.rope.items()}
        for j, s in enumerate(self.segments):
            s.start, s.stop = j, j + 1

    def finish(self) -> None:
        """The step is done: each cache now holds its sequence's new tokens."""
        if self.attnres is not None:
            self.segments[0].cache.attnres_sums = self.attnres.sums
        for s in self.segments:
            s.cache.length = int(self.positions[s.stop - 1]) + 1


class BlockAttnRes:
    """Block AttnRes (docs/design.md, "The student") over one forward step, made causal with prefix means.

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
