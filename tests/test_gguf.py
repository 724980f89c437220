"""GGUF input (convert/gguf_source.py, convert/gguf_tokenizer.py) on small GGUF files written here with
gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes Gemma 3: llama.cpp tensor names,
dimensions fastest-first, norm weights stored as w + 1.

The real Gemma 3 270M GGUF is used only by the last tests, which skip when it is not in the cache folder
(`scripts/fetch_gemma3.py` puts it there, as `.ci/run` and `make real-demo` run it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import GEMMA3_GGUF, GEMMA3_MISSING, run_tool

gguf = pytest.importorskip("gguf")
from safetensors.numpy import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from ferrisres.convert.build import Options, convert  # noqa: E402
from ferrisres.convert.errors import ConversionError  # noqa: E402
from ferrisres.convert.gguf_source import GGUFSource  # noqa: E402
from ferrisres.convert.names import GEMMA3_BLOCK, GEMMA3_GLOBAL  # noqa: E402
from ferrisres.format import Artifact  # noqa: E402

Q = gguf.GGMLQuantizationType

# A tiny SentencePiece-style vocabulary, in Gemma 3's layout: control tokens first, user-defined pieces
# (llama.cpp writes their '▁' as ' '), the 256 byte pieces, then normal pieces whose score is -rank.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "  "]  # as llama.cpp stores them: "  " is SentencePiece's "▁▁"
MERGED = ["ll", "He", "llo", "Hello", "▁w", "or", "▁wor", "ld", "▁world", "bc", "ab", "▁h", "▁hi"]  # in rank order
CHARS = ["▁", "H", "e", "l", "o", "w", "r", "d", "a", "b", "c", "h", "i", "é"]


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens, scores, types = [], [], []
    for t in SPECIALS:
        tokens.append(t), scores.append(-1000.0), types.append(3)
    for t in USER_DEFINED:
        tokens.append(t), scores.append(-1000.0), types.append(4)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>"), scores.append(0.0), types.append(6)
    # "ab" gets the lower id but the lower score: the merge order must follow scores, not ids
    normal = ["ab", "ll", "He", "llo", "Hello", "▁w", "or", "▁wor", "ld", "▁world", "bc", "▁h", "▁hi", *CHARS]
    for t in normal:
        rank = MERGED.index(t) if t in MERGED else len(MERGED) + CHARS.index(t)
        tokens.append(t), scores.append(-float(rank)), types.append(1)
    return tokens, scores, types


TOKENS, SCORES, TYPES = tiny_vocab()
ID = {t: i for i, t in enumerate(TOKENS)}
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, WINDOW, CONTEXT = len(TOKENS), 64, 256, 2, 2, 1, 32, 16, 128

# GGUF type of each tensor of the tiny model (llama.cpp name within a block -> type); norms are F32.
BLOCK_TYPES = {"attn_q": Q.F16, "attn_k": Q.Q8_0, "attn_v": Q.F32, "attn_output": Q.F16,
               "ffn_gate": Q.Q8_0, "ffn_up": Q.F32, "ffn_down": Q.Q4_K}


def hf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny Gemma 3's weights under Hugging Face names; norms are multiples of 1/256 (so w + 1 is exact)."""
    rng = np.random.default_rng(seed)
    H, I, QD, KD = HIDDEN, INTER, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, H)), "model.norm.weight": rng.integers(-256, 256, H) / 256}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (QD, H), "self_attn.k_proj": (KD, H), "self_attn.v_proj": (KD, H),
                  "self_attn.o_proj": (H, QD), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
        for name, shape in shapes.items():
            out[p + name + ".weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        for name, size in (("input_layernorm", H), ("post_attention_layernorm", H), ("pre_feedforward_layernorm", H),
                           ("post_feedforward_layernorm", H), ("self_attn.q_norm", HEAD_DIM), ("self_attn.k_norm", HEAD_DIM)):
            out[p + name + ".weight"] = rng.integers(-512, 512, size) / 256
    return {k: v.astype(np.float32) for k, v in out.items()}


def to_gguf_name(hf: str) -> str:
    inverse = {v: k for k, v in GEMMA3_GLOBAL.items()}
    if hf in inverse:
        return inverse[hf]
    _, _, i, rest = hf.split(".", 3)
    block = {v: k for k, v in GEMMA3_BLOCK.items()}[rest.removesuffix(".weight")]
    return f"blk.{i}.{block}.weight"


def q4_k_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid random Q4_K data (gguf-py cannot quantize to K types): 144-byte blocks of 256 values with
    finite f16 scales d and dmin."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, *, arch: str = "gemma3", tensors: dict | None = None, metadata: dict | None = None,
               tokenizer: bool = True, chat_template: str | None = None) -> dict[str, np.ndarray]:
    """A GGUF file of the tiny model as llama.cpp writes it; returns the HF tensors its values decode to."""
    tensors = hf_tensors() if tensors is None else tensors
    w = gguf.GGUFWriter(str(path), arch)
    base = {"context_length": CONTEXT, "embedding_length": HIDDEN, "block_count": LAYERS, "feed_forward_length": INTER,
            "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "attention.key_length": HEAD_DIM,
            "attention.value_length": HEAD_DIM, "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e6,
            "attention.sliding_window": WINDOW}
    for key, value in {**base, **(metadata or {})}.items():
        add = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string, list: w.add_array}[type(value)]
        add(f"{arch}.{key}", value)
    if tokenizer:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_scores(SCORES)
        w.add_token_types(TYPES)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        if chat_template:
            w.add_chat_template(chat_template)
    decoded = {}
    for hf, value in tensors.items():
        name = to_gguf_name(hf)
        stored = value + np.float32(1) if name.endswith("norm.weight") else value  # llama.cpp's Gemma3Model
        if name.startswith("blk."):
            qtype = BLOCK_TYPES.get(name.split(".")[2], Q.F32)
        else:
            qtype = Q.Q8_0 if name == "token_embd.weight" else Q.F32
        if value.dtype.kind == "i":  # a type gguf cannot dequantize
            w.add_tensor(name, value)
            decoded[hf] = value
        elif qtype == Q.F32:
            w.add_tensor(name, stored)
            decoded[hf] = value
        elif qtype == Q.F16:
            w.add_tensor(name, stored.astype(np.float16))
            decoded[hf] = stored.astype(np.float16).astype(np.float32)
        else:
            raw = q4_k_rows(*stored.shape, seed=len(decoded)) if qtype == Q.Q4_K else gguf.quants.quantize(stored, qtype)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            decoded[hf] = gguf.quants.dequantize(raw, qtype).reshape(value.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    return path, write_gguf(path, chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")


# ---- tensors ---------------------------------------------------------------------------------------------------


def test_name_table_agrees_with_the_gguf_package():
    """Our GGUF -> HF table is the inverse of gguf-py's own HF -> GGUF table for gemma3."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.GEMMA3, 4)
    for gguf_name, hf in GEMMA3_GLOBAL.items():
        assert names.get_name(hf.removesuffix(".weight")) == gguf_name.removesuffix(".weight")
    for block, hf in GEMMA3_BLOCK.items():
        assert names.get_name(f"model.layers.3.{hf}") == f"blk.3.{block}"


def test_tensors_round_trip_to_hugging_face_names_shapes_and_values(tiny_gguf):
    path, expected = tiny_gguf
    source = GGUFSource(path)
    original = hf_tensors()
    assert set(source.tensors) == set(expected)
    types = {}
    for name, want in expected.items():
        t = source.tensors[name]
        assert t.shape == want.shape, name  # GGUF dims reversed back
        got = source.read_f32(name, want.shape)
        assert got.dtype == np.float32 and np.array_equal(got, want), name
        types[t.dtype] = types.get(t.dtype, 0) + 1
        if name.endswith("norm.weight"):
            assert np.array_equal(got, original[name]), name  # the +1 llama.cpp folded in is undone exactly
        else:  # quantization error only
            peak = float(np.abs(original[name]).max())
            tol = {
                "F32": 0,
                "F16": peak * 2.0**-11,  # rounding to the nearest f16: half an ulp, 2^-11 relative
                # half a step of the block's max|w| / 127, plus the f16 scale's rounding carried by 127 codes
                "Q8_0": peak * (1 / 254 + 2.0**-11),
            }.get(t.dtype)
            # Q4_K holds random blocks, not a quantization of the original (see q4_k_rows): its decoded
            # values were checked above against gguf-py's dequantizer, exactly
            if tol is not None:
                assert np.abs(got - original[name]).max() <= tol, name
        if len(want.shape) == 2:  # row blocks (how the converter streams big tables) match the whole tensor
            assert np.array_equal(source.read_f32(name, want.shape, rows=(1, 3)), want[1:3]), name
    assert types == {"F32": 1 + 8 * LAYERS, "F16": 2 * LAYERS, "Q8_0": 1 + 2 * LAYERS, "Q4_K": LAYERS}


def test_text_config_is_what_gemma3_text_config_would_hold(tiny_gguf):
    c = GGUFSource(tiny_gguf[0]).text_config
    assert c["model_type"] == "gemma3_text"
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (VOCAB, HIDDEN, INTER, LAYERS)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert c["rms_norm_eps"] == 1e-6  # the decimal, not float32's 9.99999997e-07
    assert (c["rope_theta"], c["rope_local_base_freq"], c["query_pre_attn_scalar"]) == (1e6, 1e4, HEAD_DIM)
    assert (c["sliding_window"], c["max_position_embeddings"], c["sliding_window_pattern"]) == (WINDOW, CONTEXT, 6)
    assert c["final_logit_softcapping"] is None and c["attn_logit_softcapping"] is None and c["rope_scaling"] is None
    assert c["tie_word_embeddings"] is True and c["hidden_activation"] == "gelu_pytorch_tanh"
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (2, 1, 0)


def test_layer_pattern_rope_scaling_and_softcaps_from_metadata(tmp_path):
    def config(**metadata):
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.gguf"
        write_gguf(path, metadata=metadata,
                   tensors={"model.embed_tokens.weight": hf_tensors()["model.embed_tokens.weight"]})
        return GGUFSource(path).text_config

    S, F = "sliding_attention", "full_attention"
    assert config()["layer_types"] == [S, S]  # 2 layers: both below the first global layer (pattern 6)
    c = config(block_count=12)
    assert c["layer_types"] == [S] * 5 + [F] + [S] * 5 + [F]  # llama.cpp's gemma3 pattern
    assert config(**{"attention.sliding_window_pattern": [True, False]})["layer_types"] == [S, F]
    c = config(**{"rope.scaling.type": "linear", "rope.scaling.factor": 8.0, "final_logit_softcapping": 30.0,
                  "rope.freq_base_swa": 5000.0})
    assert c["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert (c["final_logit_softcapping"], c["rope_local_base_freq"]) == (30.0, 5000.0)
    assert config(block_count=62, embedding_length=64, **{"attention.head_count": 4})["query_pre_attn_scalar"] == 16


def test_gguf_converts_to_the_same_artifact_as_the_hugging_face_folder(tiny_gguf, tmp_path):
    """The GGUF and a Gemma 3 checkpoint folder with the same (dequantized) weights and a hand-written
    config.json give the same model config and the same tensors, bit for bit."""
    path, expected = tiny_gguf
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(expected, folder / "model.safetensors")
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": VOCAB,
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "max_position_embeddings": CONTEXT, "query_pre_attn_scalar": HEAD_DIM, "sliding_window": WINDOW,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
              "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))
    for name, content in GGUFSource(path).documents().items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    artifacts = {}
    for kind, source in (("gguf", path), ("hf", folder)):
        artifacts[kind] = tmp_path / f"{kind}.tern"
        convert(source, artifacts[kind], Options(quant="f32"), progress=False)
    with Artifact.open(artifacts["gguf"]) as a, Artifact.open(artifacts["hf"]) as b:
        assert json.loads(a.document("model_config.json")) == json.loads(b.document("model_config.json"))
        for doc in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert json.loads(a.document(doc)) == json.loads(b.document(doc)), doc
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            assert np.array_equal(a.tensor(name), b.tensor(name)), name
        provenance = json.loads(a.document("provenance.json"))
        assert list(provenance["source_files"]) == [path.name]


def test_ternary_student_from_gguf_is_reproducible(tiny_gguf, tmp_path):
    outputs = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        outputs.append(tmp_path / folder / "student.tern")
        convert(tiny_gguf[0], outputs[-1], Options(), progress=False)
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    with Artifact.open(outputs[0]) as a:
        assert a.tensors["layers.0.mlp.down_proj"].encoding == "ternary-g3"  # the down projections' third plane
        assert json.loads(a.document("generation_config.json"))["eos_token_id"] == [1, ID["<end_of_turn>"]]


# ---- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_rebuilt_from_a_tiny_vocabulary(tiny_gguf):
    docs = GGUFSource(tiny_gguf[0]).documents()
    tok = Tokenizer.from_str(docs["tokenizer.json"])

    def ids(text):
        return tok.encode(text, add_special_tokens=False).ids

    assert ids("Hello world") == [ID["Hello"], ID["▁world"]]  # merges in score order
    assert ids("abc") == [ID["a"], ID["bc"]]  # "bc" outranks "ab" although "ab" has the lower id
    assert ids("a  b") == [ID["a"], ID["  "], ID["b"]]  # user-defined "▁▁" is atomic, its '▁' restored
    assert tok.id_to_token(ID["  "]) == "▁▁"
    assert ids("a\n\nb\nc") == [ID["a"], ID["\n\n"], ID["b"], ID["\n"], ID["c"]]  # longest user-defined match
    assert ids(" hi") == [ID["▁hi"]]  # no prefix space is added, a leading space stays
    assert ids("<start_of_turn>hi<end_of_turn>") == [ID["<start_of_turn>"], ID["h"], ID["i"], ID["<end_of_turn>"]]
    assert ids("x😊") == [ID["<0x78>"], *(ID[f"<0x{b:02X}>"] for b in "😊".encode())]  # byte fallback
    assert tok.encode("Hello").ids == [2, ID["Hello"]]  # add_bos_token
    for text in ("Hello world", "a  b", "a\n\nb\nc", " hi", "x😊 é", "  Hello\n\nworld  "):
        assert tok.decode(ids(text)) == text
    assert tok.decode(ids("<start_of_turn>hi"), skip_special_tokens=False) == "<start_of_turn>hi"

    config = docs["tokenizer_config.json"]
    specials = (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"])
    assert specials == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["chat_template"].startswith("{{ bos_token }}")
    assert docs["generation_config.json"] == {"bos_token_id": 2, "eos_token_id": [1, ID["<end_of_turn>"]], "pad_token_id": 0}


# ---- what is refused -------------------------------------------------------------------------------------------


def one_line_error(source: Path, tmp_path: Path) -> str:
    with pytest.raises(ConversionError) as e:
        convert(source, tmp_path / "out.tern", Options(quant="f32"), progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert not (tmp_path / "out.tern").exists()
    return message


@pytest.mark.parametrize("arch", ["llama", "gemma4", "gemma2"])
def test_unsupported_architecture_is_one_line(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch=arch, tensors={"model.embed_tokens.weight": hf_tensors()["model.embed_tokens.weight"]})
    message = one_line_error(path, tmp_path)
    assert f"architecture '{arch}' is not supported" in message and "gemma3" in message


def test_unsupported_tensor_type_is_one_line(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.1.mlp.up_proj.weight"] = np.ones(tensors["model.layers.1.mlp.up_proj.weight"].shape, np.int32)
    path = tmp_path / "i32.gguf"
    write_gguf(path, tensors=tensors)
    message = one_line_error(path, tmp_path)
    assert "blk.1.ffn_up.weight" in message and "I32" in message and "cannot dequantize" in message

    result = run_tool("ferrisres-convert", str(path), "-o", str(tmp_path / "cli.tern"))  # what a user sees
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if "I32" in line] and "Traceback" not in result.stderr


def test_bad_files_are_one_line(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    assert "GGUF" in one_line_error(truncated, tmp_path)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\0" * 64)
    assert "not a folder" in one_line_error(not_gguf, tmp_path)
    no_tokenizer = tmp_path / "no-tokenizer.gguf"
    write_gguf(no_tokenizer, tokenizer=False)
    assert "no tokenizer" in one_line_error(no_tokenizer, tmp_path)


# ---- the real Gemma 3 270M (skipped without the cached file) ---------------------------------------------------

needs_real = pytest.mark.skipif(not GEMMA3_GGUF.is_file(), reason=GEMMA3_MISSING)


@pytest.fixture(scope="module")
def real_source():
    return GGUFSource(GEMMA3_GGUF)


@needs_real
def test_real_gguf_config(real_source):
    c = real_source.text_config
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (262144, 640, 2048, 18)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["query_pre_attn_scalar"]) == (4, 1, 256, 256)
    assert (c["sliding_window"], c["max_position_embeddings"], c["rms_norm_eps"]) == (512, 32768, 1e-6)
    assert (c["rope_theta"], c["rope_local_base_freq"]) == (1e6, 1e4)
    assert [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert real_source.generation_config == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
    norm = real_source.read_f32("model.layers.0.input_layernorm.weight", (640,))
    assert np.all((norm.view(np.uint32) & 0xFFFF) == 0)  # w (not w + 1) is what the bf16 checkpoint held


@needs_real
def test_real_gguf_tokenizer_reproduces_published_gemma3_encodings(real_source):
    tok = Tokenizer.from_str(real_source.documents()["tokenizer.json"])
    cases = {"Hello world": [9259, 1902], "a  b": [236746, 138, 236763], "tab\there": [4823, 255968, 8472],
             "😊 東京": [240782, 86459],
             "<start_of_turn>user\nWrite a poem about Machine Learning.<end_of_turn>\n<start_of_turn>model\n":
                 [105, 2364, 107, 6974, 496, 27355, 1003, 15313, 19180, 236761, 106, 107, 105, 4368, 107]}
    for text, expected in cases.items():
        assert tok.encode(text, add_special_tokens=False).ids == expected, text
        assert tok.decode(expected, skip_special_tokens=False) == text
    assert tok.encode("Hello").ids[0] == 2


def test_conversion_says_what_it_reads_before_the_slow_part(tiny_gguf, tmp_path):
    """gguf-py parses a real vocabulary for ~25 s before anything else: the first line says so at once."""
    result = run_tool("ferrisres-convert", str(tiny_gguf[0]), "-o", str(tmp_path / "g.tern"))
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("ferrisres-convert: reading ") and "GGUF" in first, result.stderr
