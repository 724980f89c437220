"""A plain numpy (float64) Gemma 4 text decoder forward pass, no KV cache: the tests' "fake-quant" reference.

Written straight from docs/gemma4-math.md and independent of ferrisres.runtime:
rung 2 of the correctness ladder compares the runtime's output on a ternary artifact with this function
applied to the artifact's dequantized weights. Every position is recomputed from scratch on every call.

`weights` maps artifact names (the HF names without the "model." prefix and ".weight" suffix, see
`ferrisres.format.weight_shapes`) to float arrays in HF [out, in] layout; an optional "lm_head" entry
replaces the tied embedding as the output matrix.

Beyond the dense decoder it computes, with plain loops over tokens and experts so the code reads as the
definition:
- the student's MoE expansion (config.mlp_experts, docs/design.md): a router [N, H] on the MLP input,
  softmax over all experts, top-k renormalized to sum 1, weighted sum of the chosen experts' MLPs;
- Gemma 4's own MoE block (config.moe_block, 26B-A4B, docs/gemma4-math.md), beside the dense MLP;
- Block AttnRes (config.attnres, docs/design.md) with explicit prefix means over s <= t at every position.
"""

from __future__ import annotations

import numpy as np

from ferrisres.format import FULL, ModelConfig

f64 = np.float64  # exact math: the reference carries no rounding of its own worth measuring
U32 = 2.0**-24  # float32 unit roundoff
_float32_signs: np.random.Generator | None = None  # set by float32_bounds(): products take float32 error


def product(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x @ m.T, exact; inside float32_bounds(), moved by as much as float32 rounding may move it.

    A product of reduction length n whose two inputs are rounded to float32, summed in float32 in any
    order (any BLAS kernel, FMA or not) and rounded again takes n + 3 roundings of relative size <= u.
    Independent roundings grow as sqrt(n + 3) u (|x| @ |m|.T), not as the worst case (n + 3) u, which
    needs every one of them to go the same way (Higham and Mary, "A new approach to probabilistic
    rounding error analysis", SIAM J. Sci. Comput. 2019). Each element moves by that bound with a seeded
    random sign, so the network's depth carries it as it carries real rounding (docs/design.md)."""
    y = x @ m.T
    if _float32_signs is None:
        return y
    k = m.shape[-1] + 3
    bound = np.sqrt(k) * U32 * (np.abs(x) @ np.abs(m).T)
    return y + bound * _float32_signs.choice(f64([-1, 1]), size=np.shape(y))


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """x * (mean(x^2) + eps)^-0.5 over the last axis, times the plain weight (not 1 + w); None = no weight."""
    x = x.astype(f64)
    y = x * (np.mean(x * x, axis=-1, keepdims=True) + f64(eps)) ** f64(-0.5)
    return y if weight is None else y * weight.astype(f64)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (gelu_pytorch_tanh)."""
    return f64(0.5) * x * (f64(1.0) + np.tanh(f64(np.sqrt(2.0 / np.pi)) * (x + f64(0.044715) * x**3)))


def rope_inv_freq(rope, head_dim: int) -> np.ndarray:
    """The head_dim/2 rotation frequencies of one layer type, in float32 as transformers computes them."""
    f32 = np.float32
    if rope.rope_type in ("default", "linear"):
        # every pair (j, j + hd/2) rotates; "linear" scaling divides the frequencies by its factor
        inv = f32(1) / f32(rope.theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))
        return inv / f32(rope.factor if rope.rope_type == "linear" else 1)
    if rope.rope_type == "proportional":
        # only the first n pairs rotate; the exponent's denominator is the FULL head_dim; the rest do not rotate
        n = int(rope.partial_rotary_factor * head_dim // 2)
        rotated = f32(1) / f32(rope.theta) ** (np.arange(0, 2 * n, 2, dtype=f32) / f32(head_dim)) / f32(rope.factor)
        return np.concatenate([rotated, np.zeros(head_dim // 2 - n, dtype=f32)])
    raise ValueError(f"rope type {rope.rope_type!r}")


def rope(x: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """NeoX half-split rotary embedding of x [T, heads, hd] at positions 0..T-1. The cos/sin tables are
    float32, as transformers builds them; the rotation itself is exact."""
    T, half = x.shape[0], x.shape[-1] // 2
    angles = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]  # [T, hd/2], float32
    cos = np.cos(np.concatenate([angles, angles], axis=-1)).astype(f64)[:, None, :]  # [T, 1, hd]
    sin = np.sin(np.concatenate([angles, angles], axis=-1)).astype(f64)[:, None, :]
    rotate_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotate_half * sin).astype(f64)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None, scale: float = 1.0,
              softcap: float | None = None) -> np.ndarray:
    """Causal softmax(scale * q k^T) v (Gemma 4: scale 1.0; Gemma 3: query_pre_attn_scalar**-0.5, optional
    soft-cap of the scores); q [T, nH, hd], k/v [T, kvh, hd] -> [T, nH, hd].

    Key j is visible to query i iff j <= i (and j > i - window on sliding layers). GQA: query head h
    uses kv head h // (nH // kvh).
    """
    T, nH, _ = q.shape
    group = nH // k.shape[1]
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    out = np.empty_like(q)
    for h in range(nH):
        scores = scale * product(q[:, h, :], k[:, h // group, :])  # [T, T]
        if softcap:
            scores = softcap * np.tanh(scores / softcap)
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h, :] = product(p, v[:, h // group, :].T)
    return out


def own_kv(w, c: ModelConfig, i: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys (k_norm, RoPE) and values (weightless v_norm) of a layer with its own k/v, from its normed input h."""
    T, hd, kvh = h.shape[0], c.head_dims[i], c.kv_heads[i]
    p = f"layers.{i}.self_attn."
    k_raw = product(h, w(p + "k_proj")).reshape(T, kvh, hd)
    v_raw = product(h, w(p + "v_proj")).reshape(T, kvh, hd) if c.has_v_proj(i) else k_raw  # k_eq_v: V = raw K
    k = rope(rms_norm(k_raw, w(p + "k_norm"), c.rms_norm_eps), rope_inv_freq(c.rope[c.layer_types[i]], hd))
    v = rms_norm(v_raw, None, c.rms_norm_eps) if c.value_norm else v_raw  # Gemma 3 has no V norm
    return k, v


def layer(w, c: ModelConfig, i: int, x: np.ndarray, ple_i: np.ndarray | None, kv: dict) -> np.ndarray:
    """Decoder layer i on the stream x [T, H]. kv maps a producer layer to its (k, v); this layer adds its own."""
    T, hd, eps = x.shape[0], c.head_dims[i], c.rms_norm_eps
    p = f"layers.{i}."
    full = c.layer_types[i] == FULL

    # attention
    h = rms_norm(x, w(p + "input_layernorm"), eps)
    q = product(h, w(p + "self_attn.q_proj")).reshape(T, c.num_heads, hd)
    q = rope(rms_norm(q, w(p + "self_attn.q_norm"), eps), rope_inv_freq(c.rope[c.layer_types[i]], hd))
    if c.kv_sources[i] == i:
        kv[i] = own_kv(w, c, i, h)
    k, v = kv[c.kv_sources[i]]
    att = attention(q, k, v, None if full else c.sliding_window, c.attention_scale, c.attn_logit_softcapping)
    att = att.reshape(T, c.num_heads * hd)
    x = x + rms_norm(product(att, w(p + "self_attn.o_proj")), w(p + "post_attention_layernorm"), eps)

    # MLP (the double-wide MLP of KV-shared layers is just a wider matrix), or the student's experts
    res = x
    h = rms_norm(x, w(p + "pre_feedforward_layernorm"), eps)
    h = student_moe(w, c, i, h) if c.mlp_experts else mlp(w, p + "mlp.", h)
    if c.moe_block:  # Gemma 4's own MoE block runs beside the dense MLP, routed on the residual stream
        h = (rms_norm(h, w(p + "post_feedforward_layernorm_1"), eps)
             + rms_norm(moe_block(w, c, i, res), w(p + "post_feedforward_layernorm_2"), eps))
    x = res + rms_norm(h, w(p + "post_feedforward_layernorm"), eps)

    # per-layer input (PLE) branch
    if ple_i is not None:
        g = gelu_tanh(product(x, w(p + "per_layer_input_gate"))) * ple_i
        x = x + rms_norm(product(g, w(p + "per_layer_projection")), w(p + "post_per_layer_input_norm"), eps)

    return x * w(p + "layer_scalar") if c.layer_scalars else x  # scales the whole stream, residual included


def mlp(w, prefix: str, h: np.ndarray) -> np.ndarray:
    """Gemma's gated MLP down(gelu_tanh(gate h) * up h) with the weights {prefix}{gate,up,down}_proj."""
    return product(gelu_tanh(product(h, w(prefix + "gate_proj"))) * product(h, w(prefix + "up_proj")), w(prefix + "down_proj"))


def softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - np.max(z))
    return p / np.sum(p)


def top_k(probs: np.ndarray, k: int) -> list[int]:
    """The k most probable experts (a tie goes to the lower index)."""
    return sorted(range(len(probs)), key=lambda e: (-probs[e], e))[:k]


def student_moe(w, c: ModelConfig, i: int, h: np.ndarray) -> np.ndarray:
    """The student's MoE expansion of layer i's MLP on its input h [T, H] (the pre_feedforward_layernorm output).

    Per token: softmax of the router logits over ALL experts, keep the top-k, renormalize those k
    probabilities to sum 1, output the so-weighted sum of the chosen experts' MLPs.
    """
    p = f"layers.{i}.mlp."
    router = w(p + "router")  # [N, H]
    assert router.shape == (c.mlp_experts, c.hidden_size)
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        probs = softmax(product(h[t], router))
        chosen = top_k(probs, c.mlp_top_k)
        total = sum(probs[e] for e in chosen)
        for e in chosen:
            out[t] += (probs[e] / total) * mlp(w, f"{p}experts.{e}.", h[t : t + 1])[0]
    return out


def moe_block(w, c: ModelConfig, i: int, res: np.ndarray) -> np.ndarray:
    """Gemma 4's own MoE block (26B-A4B) of layer i on the post-attention residual stream res [T, H].

    r = rmsnorm(res) (no weight) * router.scale * H^-0.5; probs = softmax(router.proj r) over all E
    experts; keep the top-k; weight = prob / sum(top-k probs) * router.per_expert_scale[e]. Expert e on
    xin = rmsnorm(res, pre_feedforward_layernorm_2): gate, up = halves of gate_up_proj[e] xin;
    out += weight * down_proj[e] (gelu_tanh(gate) * up).
    """
    p = f"layers.{i}."
    E, k, I, H = c.num_experts, c.top_k_experts, c.moe_intermediate_size, c.hidden_size
    proj, scale, per_expert = w(p + "router.proj"), w(p + "router.scale"), w(p + "router.per_expert_scale")
    gate_up, down = w(p + "experts.gate_up_proj"), w(p + "experts.down_proj")
    assert proj.shape == (E, H) and gate_up.shape == (E, 2 * I, H) and down.shape == (E, H, I)
    r = rms_norm(res, None, c.rms_norm_eps) * scale * f64(H**-0.5)
    xin = rms_norm(res, w(p + "pre_feedforward_layernorm_2"), c.rms_norm_eps)
    out = np.zeros_like(res)
    for t in range(res.shape[0]):
        probs = softmax(product(r[t], proj))
        chosen = top_k(probs, k)
        total = sum(probs[e] for e in chosen)
        for e in chosen:
            weight = probs[e] / total * per_expert[e]
            both = product(xin[t], gate_up[e])
            gate, up = both[:I], both[I:]
            out[t] += weight * product(gelu_tanh(gate) * up, down[e])
    return out


def prefix_mean(v: np.ndarray) -> np.ndarray:
    """[T, H] -> [T, H]: row t is the mean of v over positions s <= t (causal)."""
    return np.stack([np.mean(v[: t + 1], axis=0) for t in range(v.shape[0])])


def attnres(x: np.ndarray, reps: list[np.ndarray], gate: float, c: ModelConfig) -> np.ndarray:
    """Block AttnRes at a block's end: for every position t, R_i = rmsnorm(r_i(t)) (no weight) for every
    representation so far, w = softmax_i(h(t) . R_i / sqrt(H)), h(t) += gate * sum_i w_i R_i."""
    out = x.copy()
    for t in range(x.shape[0]):
        R = [rms_norm(r[t], None, c.rms_norm_eps) for r in reps]
        weights = softmax(np.array([x[t] @ Ri for Ri in R]) / np.sqrt(f64(c.hidden_size)))
        out[t] = x[t] + f64(gate) * sum(wi * Ri for wi, Ri in zip(weights, R))
    return out


def per_layer_inputs(w, c: ModelConfig, ids: np.ndarray, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PLE inputs: (token part [T, L, P], combined [T, L, P]); x0 is the scaled embedding."""
    T, L, P = len(ids), c.num_layers, c.ple_dim
    tok = (w("embed_tokens_per_layer")[ids] * f64(np.sqrt(P))).reshape(T, L, P)
    proj = product(x0, w("per_layer_model_projection")) * f64(c.hidden_size**-0.5)
    proj = rms_norm(proj.reshape(T, L, P), w("per_layer_projection_norm"), c.rms_norm_eps)
    return tok, (proj + tok) * f64(2.0**-0.5)


def forward(weights: dict[str, np.ndarray], config: ModelConfig, ids) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits [T, vocab] and the intermediates (embeds, ple_token, ple, layer_XX, final_norm), all float64."""
    c = config
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=f64)

    x = w("embed_tokens")[ids] * f64(np.sqrt(c.hidden_size))
    inter = {"embeds": x}
    ple = None
    if c.ple_dim:
        inter["ple_token"], ple = per_layer_inputs(w, c, ids, x)
        inter["ple"] = ple
    kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if c.attnres:
        # Block AttnRes (docs/design.md): r_0(t) = prefix mean of the scaled embedding; each block (ending at
        # a full-attention layer) adds r(t) = sum over its layers of the prefix mean of the layer's output,
        # divided by its number of layers; at its end the stream attends over rmsnorm of all r's so far.
        gates = w("attnres_gates")
        blocks = c.attnres_blocks()
        assert len(gates) == len(blocks) and [j for block in blocks for j in block] == list(range(c.num_layers))
        reps = [prefix_mean(x)]
        accumulated = None
    for i in range(c.num_layers):
        x = layer(w, c, i, x, None if ple is None else ple[:, i, :], kv)
        inter[f"layer_{i:02d}"] = x
        if c.attnres:
            b = next(n for n, block in enumerate(blocks) if i in block)
            mean = prefix_mean(x)
            accumulated = mean if i == blocks[b].start else accumulated + mean
            if i == blocks[b].stop - 1:
                reps.append(accumulated / len(blocks[b]))
                x = attnres(x, reps, gates[b], c)
                inter[f"attnres_{b}"] = x
    x = rms_norm(x, w("norm"), c.rms_norm_eps)
    inter["final_norm"] = x
    head = w("lm_head") if "lm_head" in weights else w("embed_tokens")
    logits = product(x, head)
    if c.final_logit_softcapping:
        cap = f64(c.final_logit_softcapping)
        logits = cap * np.tanh(logits / cap)
    return logits.astype(f64), inter


def reference_logits(weights: dict[str, np.ndarray], config: ModelConfig, ids) -> np.ndarray:
    """Float32 logits [T, vocab] for token ids (positions 0..T-1), recomputed from scratch."""
    return forward(weights, config, ids)[0]


def float32_bounds(weights: dict[str, np.ndarray], config: ModelConfig, ids, seeds=(0, 1)) -> dict[str, float]:
    """How far any float32 implementation's logits (key "logits") and intermediates may be from this exact
    forward: the largest move of each over `seeds` draws of the worst-case product rounding (see
    `product`). It grows with the reduction lengths and the depth, and no BLAS kernel can exceed it
    except by a sign pattern more adversarial than chance, so it is the tolerance of every comparison
    with the float32 runtime or transformers' float32 outputs."""
    global _float32_signs
    exact_logits, exact = forward(weights, config, ids)
    exact["logits"] = exact_logits
    bounds = dict.fromkeys(exact, 0.0)
    for seed in seeds:
        _float32_signs = np.random.default_rng(seed)
        try:
            logits, moved = forward(weights, config, ids)
        finally:
            _float32_signs = None
        moved["logits"] = logits
        for key in bounds:
            bounds[key] = max(bounds[key], float(np.abs(moved[key] - exact[key]).max()))
    return bounds
