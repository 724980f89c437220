#!/usr/bin/env python3
"""A synthetic Gemma 4 E2B checkpoint: the exact published text shapes, names and file layout, random weights.

    python bench/make_synthetic_e2b.py [--scale full|half|tiny] [--seed 0] [--cache bench/.cache] [--force]

prints the folder it wrote (or found: a complete folder for the same parameters is reused). No real
Gemma 4 weights can be shipped, but speed and memory depend only on the shapes, so this folder stands in
for `google/gemma-4-E2B-it` in `make bench` (bench/run.py).

What is in the folder (scale `full`; the shapes are in docs/gemma4-math.md, "E2B's shapes"):
- `config.json` in the published spelling: model_type "gemma4", architectures
  ["Gemma4ForConditionalGeneration"], a `text_config` with `global_head_dim` 512 and
  `num_global_key_value_heads` null; 35 layers, (4 sliding + 1 full) x 7, hidden 1536, 8 heads, 1 KV
  head, head_dim 256 / 512, 20 KV-shared layers with double-wide MLPs (12288), PLE 256, vocab 262144,
  sliding window 512, soft-cap 30.
- `model.safetensors`: one file, every text tensor as `model.language_model.*` in bf16, including the
  unused k_proj/v_proj/k_norm of the KV-shared layers 15-34 (the real file has them), plus the two
  small vision/audio embedding projections. The vision and audio towers themselves (~0.6 G parameters,
  skipped by the converter) are left out. Written straight to disk, header first and then each tensor
  a block of rows at a time, so memory stays at one block (64 MiB) however big the table (the PLE
  table is 262144 x 8960 = 4.7 GB).
- Random weights at plausible scales, seeded per tensor name: linear N(0, 1/fan_in); norm weights
  1 + 0.05 N(0,1); layer_scalar U(0.5, 1); embed_tokens N(0, 1/hidden) (x sqrt(hidden) -> unit RMS);
  embed_tokens_per_layer N(0, 1/P). The two tables are drawn from a seeded pool (see `_pool`) to save time.
- `tokenizer.json`: a Gemma-style tokenizer (BPE + byte fallback, ' ' -> '▁') with the real vocabulary
  size 262144: Gemma's special ids (0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>, 105 <|turn>,
  106 <turn|>), byte tokens <0x00>..<0xFF> at 238-493 as in Gemma, then ~261k pieces (common English
  words and pseudo-words with all their prefixes) and every merge that makes each piece from two others.
- `tokenizer_config.json`, `generation_config.json` (eos [1, 106], Gemma 4 IT's sampling defaults).

Reduced scales for the scaling table (same vocabulary and tokenizer): `half` = 20 layers ((4+1) x 4, 12
shared), hidden 768, 4 heads, MLP 3072 (6144 double-wide); `tiny` = 10 layers ((4+1) x 2, 5 shared),
hidden 384, 2 heads, MLP 1536, PLE 128.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"
GENERATOR_VERSION = 2  # bump when the output of this script changes: cached folders are then rebuilt
BLOCK_ELEMENTS = 32 << 20  # values generated per block (64 MiB of bf16)
VOCAB = 262144
PREFIX = "model.language_model."

SCALES = {
    "full": dict(layers=35, hidden=1536, heads=8, intermediate=6144, kv_shared=20, ple=256, pattern_repeats=7),
    "half": dict(layers=20, hidden=768, heads=4, intermediate=3072, kv_shared=12, ple=256, pattern_repeats=4),
    "tiny": dict(layers=10, hidden=384, heads=2, intermediate=1536, kv_shared=5, ple=128, pattern_repeats=2),
}
HEAD_DIM, GLOBAL_HEAD_DIM, KV_HEADS, SLIDING_WINDOW = 256, 512, 1, 512


# ---------------------------------------------------------------------------------------------- config


def text_config(scale: str) -> dict:
    s = SCALES[scale]
    layer_types = (["sliding_attention"] * 4 + ["full_attention"]) * s["pattern_repeats"]
    assert len(layer_types) == s["layers"]
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_k_eq_v": False,
        "bos_token_id": 2,
        "dtype": "bfloat16",
        "enable_moe_block": False,
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "global_head_dim": GLOBAL_HEAD_DIM,
        "head_dim": HEAD_DIM,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": s["hidden"],
        "hidden_size_per_layer_input": s["ple"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "layer_types": layer_types,
        "max_position_embeddings": 131072,
        "model_type": "gemma4_text",
        "moe_intermediate_size": None,
        "num_attention_heads": s["heads"],
        "num_experts": None,
        "num_global_key_value_heads": None,
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": KV_HEADS,
        "num_kv_shared_layers": s["kv_shared"],
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": SLIDING_WINDOW,
        "tie_word_embeddings": True,
        "top_k_experts": None,
        "use_bidirectional_attention": None,
        "use_cache": True,
        "use_double_wide_mlp": True,
        "vocab_size": VOCAB,
        "vocab_size_per_layer_input": VOCAB,
    }


def full_config(scale: str) -> dict:
    """config.json as google/gemma-4-E2B-it publishes it (towers' configs abbreviated to their main sizes)."""
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "audio_config": {"hidden_size": 1024, "model_type": "gemma4_audio", "num_attention_heads": 8,
                         "num_hidden_layers": 12, "output_proj_dims": 1536, "use_clipped_linears": True},
        "audio_token_id": 258881,
        "boa_token_id": 256000,
        "boi_token_id": 255999,
        "dtype": "bfloat16",
        "eoa_token_index": 258883,
        "eoi_token_id": 258882,
        "eos_token_id": [1, 106],
        "image_token_id": 258880,
        "initializer_range": 0.02,
        "model_type": "gemma4",
        "text_config": text_config(scale),
        "tie_word_embeddings": True,
        "transformers_version": "5.24.0",
        "video_token_id": 258884,
        "vision_config": {"head_dim": 64, "hidden_size": 768, "intermediate_size": 3072, "model_type": "gemma4_vision",
                          "num_attention_heads": 12, "num_hidden_layers": 16, "pooling_kernel_size": 3,
                          "use_clipped_linears": True},
    }


GENERATION_CONFIG = {"bos_token_id": 2, "do_sample": True, "eos_token_id": [1, 106], "pad_token_id": 0,
                     "temperature": 1.0, "top_k": 64, "top_p": 0.95, "transformers_version": "5.24.0"}
TOKENIZER_CONFIG = {"add_bos_token": False, "add_eos_token": False, "backend": "tokenizers", "bos_token": "<bos>",
                    "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
                    "model_max_length": 1000000000000000019884624838656, "padding_side": "left",
                    "tokenizer_class": "GemmaTokenizer"}


# --------------------------------------------------------------------------------------------- tensors


def tensor_specs(scale: str) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(name, shape, kind, std) for every tensor: kind 'normal', 'table' (pooled normal), 'norm', 'scalar'."""
    s = SCALES[scale]
    H, L, P, I = s["hidden"], s["layers"], s["ple"], s["intermediate"]
    nh = s["heads"]
    types = text_config(scale)["layer_types"]
    first_shared = L - s["kv_shared"]
    specs = [
        ("embed_tokens.weight", (VOCAB, H), "table", H**-0.5),
        ("embed_tokens_per_layer.weight", (VOCAB, L * P), "table", P**-0.5),
        ("per_layer_model_projection.weight", (L * P, H), "normal", H**-0.5),
        ("per_layer_projection_norm.weight", (P,), "norm", 0),
        ("norm.weight", (H,), "norm", 0),
    ]
    for i in range(L):
        p = f"layers.{i}."
        hd = GLOBAL_HEAD_DIM if types[i] == "full_attention" else HEAD_DIM
        inter = 2 * I if i >= first_shared else I  # use_double_wide_mlp on the KV-shared layers
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            specs.append((p + norm + ".weight", (H,), "norm", 0))
        specs += [
            (p + "layer_scalar", (1,), "scalar", 0),
            (p + "self_attn.q_proj.weight", (nh * hd, H), "normal", H**-0.5),
            (p + "self_attn.q_norm.weight", (hd,), "norm", 0),
            # present in the real file for the KV-shared layers too, although never used
            (p + "self_attn.k_proj.weight", (KV_HEADS * hd, H), "normal", H**-0.5),
            (p + "self_attn.v_proj.weight", (KV_HEADS * hd, H), "normal", H**-0.5),
            (p + "self_attn.k_norm.weight", (hd,), "norm", 0),
            (p + "self_attn.o_proj.weight", (H, nh * hd), "normal", (nh * hd) ** -0.5),
            (p + "mlp.gate_proj.weight", (inter, H), "normal", H**-0.5),
            (p + "mlp.up_proj.weight", (inter, H), "normal", H**-0.5),
            (p + "mlp.down_proj.weight", (H, inter), "normal", inter**-0.5),
            (p + "per_layer_input_gate.weight", (P, H), "normal", H**-0.5),
            (p + "per_layer_projection.weight", (H, P), "normal", P**-0.5),
        ]
    out = [(PREFIX + n, shape, kind, std) for n, shape, kind, std in specs]
    # The multimodal checkpoint's embedding projections of the towers (the towers themselves are left out).
    out += [("model.embed_audio.embedding_projection.weight", (H, 1536), "normal", 1536**-0.5),
            ("model.embed_vision.embedding_projection.weight", (H, 768), "normal", 768**-0.5)]
    return out


def _blocks(name: str, shape: tuple[int, ...], kind: str, std: float, seed: int):
    """The tensor's values as bf16 bit patterns (uint16), in blocks of whole rows, from its own seeded stream."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if kind == "norm":
        yield _bf16(1 + 0.05 * rng.standard_normal(shape, dtype=np.float32))
        return
    if kind == "scalar":
        yield _bf16(rng.uniform(0.5, 1.0, shape).astype(np.float32))
        return
    cols = int(np.prod(shape[1:]))
    rows = max(1, BLOCK_ELEMENTS // cols)
    pool = _pool(rng, std) if kind == "table" else None
    for r0 in range(0, shape[0], rows):
        n = min(rows, shape[0] - r0)
        if pool is None:
            block = rng.standard_normal((n, cols), dtype=np.float32)
            block *= np.float32(std)
            yield _bf16(block)
        else:
            yield _from_pool(pool, rng, n, cols)


POOL_ELEMENTS = 1 << 24
PIECE = 1 << 20


def _pool(rng, std: float) -> np.ndarray:
    """The embedding tables (3.1 G values at E2B size) are drawn as 1 Mi-value pieces of one 16 Mi-value
    N(0, std) pool, each at a random offset with a random sign: the same distribution, ~20x faster."""
    pool = _bf16(rng.standard_normal(POOL_ELEMENTS, dtype=np.float32) * np.float32(std))
    return np.concatenate([pool, pool[:PIECE]])


def _from_pool(pool: np.ndarray, rng, n: int, cols: int) -> np.ndarray:
    out = np.empty(n * cols, dtype=np.uint16)
    starts = rng.integers(0, POOL_ELEMENTS, (n * cols + PIECE - 1) // PIECE)
    signs = rng.integers(0, 2, len(starts)).astype(np.uint16) << np.uint16(15)
    for k, (start, sign) in enumerate(zip(starts, signs)):
        piece = out[k * PIECE : (k + 1) * PIECE]
        np.bitwise_xor(pool[start : start + len(piece)], sign, out=piece)
    return out.reshape(n, cols)


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest (ties away; the values are random anyway)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u += np.uint32(0x8000)
    np.right_shift(u, np.uint32(16), out=u)
    return u.astype(np.uint16)


def write_safetensors(path: Path, specs, seed: int) -> None:
    """Header, then each tensor's bytes in header order, one block at a time."""
    header, offset = {}, 0
    for name, shape, _, _ in specs:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, kind, std in specs:
            for block in _blocks(name, shape, kind, std, seed):
                f.write(memoryview(block).cast("B"))
        size = f.tell()
    assert size == 8 + len(raw) + offset, (size, offset)


# ------------------------------------------------------------------------------------------- tokenizer

SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 105: "<|turn>", 106: "<turn|>"}
NORMAL_LOW = {107: "\n", 108: "\n\n"}  # ordinary pieces among the control ids, as in Gemma
FIRST_BYTE = 238  # <0x00> .. <0xFF> at 238..493, as in Gemma
WORDS = """the of and to a in is it you that he was for on are with as his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their time if
will way about many then them write would like so these her long make thing see him two has look more day could go
come did number sound no most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every good me give our under name
very through just form sentence great think say help low line differ turn cause much mean before move right boy old
too same tell does set three want air well also play small end put home read hand port large spell add even land here
must big high such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow study still learn
plant cover food sun four between state keep eye never last let thought city tree cross farm hard start might story saw
far sea draw left late run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car feet care second book
carry took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood
main enough plain girl usual young ready above ever red list though feel talk bird soon body dog family direct pose
leave song measure door product black short numeral class wind question happen complete ship area half rock order fire
south problem piece told knew pass since top whole king space heard best hour better true during hundred five remember
step early hold west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel
toward war lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct
able pound done beauty drive stood contain front teach week final gave green quick brown fox jumps lazy develop ocean
warm free minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full
force blue object decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east paint
language among capital france paris once upon model token generate benchmark memory speed""".split()
LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
LETTER_WEIGHTS = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0,
                           2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07])


def tokenizer_pieces(seed: int) -> list[str]:
    """The ordinary pieces (ids 494..262143), every piece's prefixes before it."""
    rng = np.random.default_rng([seed, 7])
    singles = list("\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`")
    pieces: dict[str, None] = dict.fromkeys(singles)
    lower = "abcdefghijklmnopqrstuvwxyz"

    def add_with_prefixes(word: str) -> None:
        for k in range(2, len(word) + 1):
            pieces.setdefault(word[:k])

    for w in WORDS:
        add_with_prefixes("\u2581" + w)
        add_with_prefixes("\u2581" + w.capitalize())
        add_with_prefixes(w)
        add_with_prefixes(w.capitalize())
    for a in lower:
        add_with_prefixes("\u2581" + a)
        for b in lower:
            add_with_prefixes("\u2581" + a + b)
            add_with_prefixes(a + b)
    for ch in "0123456789.,;:!?'\"()-":
        add_with_prefixes("\u2581" + ch)
    target = VOCAB - (FIRST_BYTE + 256)
    probs = LETTER_WEIGHTS / LETTER_WEIGHTS.sum()
    order = list(pieces)
    stems = [p for p in order if len(p) >= 3]
    while len(pieces) < target:  # grow pseudo-words: extend an existing piece of >= 3 characters by one letter
        parents = rng.integers(0, len(stems), 8192)
        letters = rng.choice(len(LETTERS), 8192, p=probs)
        for parent, letter in zip(parents, letters):
            new = stems[parent] + LETTERS[letter]
            if new not in pieces and len(new) <= 16:
                pieces[new] = None
                stems.append(new)
                if len(pieces) == target:
                    break
    return list(pieces)


def tokenizer_json(seed: int) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab: dict[str, int] = {}
    for i in range(FIRST_BYTE):
        vocab[SPECIALS.get(i) or NORMAL_LOW.get(i) or f"<unused{i}>"] = i
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = FIRST_BYTE + b
    pieces = tokenizer_pieces(seed)
    for p in pieces:
        vocab[p] = len(vocab)
    assert len(vocab) == VOCAB, len(vocab)
    # Every way of making each piece from two shorter pieces, shorter results first (as BPE merge ranks go).
    merges = []
    for p in sorted((p for p in pieces if len(p) > 1), key=lambda p: (len(p), vocab[p])):
        for k in range(1, len(p)):
            if p[:k] in vocab and p[k:] in vocab:
                merges.append((p[:k], p[k:]))
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(SPECIALS[i], special=True, normalized=False) for i in sorted(SPECIALS)])
    return tk.to_str()


def check_tokenizer(text: str) -> dict:
    from tokenizers import Tokenizer

    start = time.perf_counter()
    tk = Tokenizer.from_str(text)
    load_s = time.perf_counter() - start
    sample = "The quick brown fox jumps over the lazy dog. The capital of France is Paris.\nžal 😊 東京"
    ids = tk.encode(sample, add_special_tokens=False).ids
    back = tk.decode(ids)
    assert back == sample, (back, sample)
    assert tk.get_vocab_size() == VOCAB, tk.get_vocab_size()
    assert all(0 <= i < VOCAB for i in ids)
    return {"from_str_seconds": round(load_s, 3), "json_mb": round(len(text.encode()) / 1e6, 1),
            "sample_tokens": len(ids), "sample_words": len(sample.split())}


# ---------------------------------------------------------------------------------------------- driver


def folder_name(scale: str, seed: int) -> str:
    return f"e2b-{scale}-seed{seed}-v{GENERATOR_VERSION}"


def build(scale: str, seed: int = 0, cache: Path = DEFAULT_CACHE, force: bool = False, quiet: bool = False) -> Path:
    """The checkpoint folder for (scale, seed), made if missing; returns its path."""
    folder = cache / folder_name(scale, seed)
    stamp = folder / "COMPLETE"
    if stamp.is_file() and not force:
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / (folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    start = time.perf_counter()
    tok = _shared_tokenizer(cache, seed, log)
    shutil.copyfile(tok, tmp / "tokenizer.json")
    (tmp / "config.json").write_text(json.dumps(full_config(scale), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    specs = tensor_specs(scale)
    total = sum(2 * int(np.prod(s[1])) for s in specs)
    log(f"writing {len(specs)} bf16 tensors, {total / 1e9:.2f} GB, to {folder} ...")
    write_safetensors(tmp / "model.safetensors", specs, seed)
    info = {"scale": scale, "seed": seed, "generator_version": GENERATOR_VERSION, "tensors": len(specs),
            "safetensors_bytes": (tmp / "model.safetensors").stat().st_size,
            "build_seconds": round(time.perf_counter() - start, 1), **SCALES[scale]}
    (tmp / "SYNTHETIC.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    stamp.write_text(json.dumps(info) + "\n")
    log(f"done in {info['build_seconds']} s")
    return folder


def _shared_tokenizer(cache: Path, seed: int, log) -> Path:
    """tokenizer.json is the same for every scale: built once per seed."""
    path = cache / f"tokenizer-seed{seed}-v{GENERATOR_VERSION}.json"
    if not path.is_file():
        start = time.perf_counter()
        text = tokenizer_json(seed)
        check = check_tokenizer(text)
        tmp = path.with_suffix(".partial")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        log(f"tokenizer: {check} (built in {time.perf_counter() - start:.1f} s)")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete folder exists")
    ap.add_argument("--check-tokenizer", action="store_true", help="time Tokenizer.from_str on the folder's tokenizer.json")
    args = ap.parse_args(argv)
    folder = build(args.scale, args.seed, args.cache, args.force)
    if args.check_tokenizer:
        print(json.dumps(check_tokenizer((folder / "tokenizer.json").read_text(encoding="utf-8"))), file=sys.stderr)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
