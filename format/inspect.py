"""`ferrisres-inspect MODEL.tern [--verify] [--json]`: what an artifact holds, and whether it is intact."""

import json
import sys
from dataclasses import dataclass, field

from ferrisres.cli import parse_args, run_main

from .errors import ArtifactError
from .model_config import FULL
from .sizes import bytes_by_kind, teacher_bf16_bytes
from .reader import Artifact

PROG = "ferrisres-inspect"


@dataclass
class Args:
    model: str = field(metadata={"args": ["model"], "help": "the .tern artifact"})
    verify: bool = field(default=False, metadata={"help": "recompute every dataset's digest (reads the whole file)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of text"})


def describe(artifact: Artifact) -> dict:
    config = artifact.config
    documents = {name: artifact.json(name) for name in ("student_config.json", "provenance.json",
                                                         "generation_config.json", "tokenizer_config.json")}
    return {
        "path": str(artifact.path),
        "format_version": "%d.%d" % artifact.version,
        "file_bytes": artifact.path.stat().st_size,
        "model": {
            "architecture": config.architecture,
            "layers": config.num_layers,
            "full_attention_layers": [i for i, t in enumerate(config.layer_types) if t == FULL],
            "hidden_size": config.hidden_size,
            "heads": config.num_heads,
            "kv_heads": sorted(set(config.kv_heads)),
            "head_dims": sorted(set(config.head_dims)),
            "vocab_size": config.vocab_size,
            "sliding_window": config.sliding_window,
            "per_layer_embedding_dim": config.ple_dim,
            "kv_shared_layers": sum(1 for i in range(config.num_layers) if not config.has_own_kv(i)),
            "eos_token_ids": list(config.eos_token_ids),
        },
        "student": documents.get("student_config.json"),
        "chat_template": _chat_template_source(artifact, documents.get("tokenizer_config.json")),
        "bytes_by_kind": bytes_by_kind(artifact),
        "teacher_bf16_bytes": teacher_bf16_bytes(artifact),
        "tensors": len(artifact.tensors),
        "provenance": documents.get("provenance.json"),
    }


def _chat_template_source(artifact: Artifact, tokenizer_config) -> str | None:
    """The document the runtime takes the chat template from (as ferrisres.runtime does), None if none."""
    if "chat_template.jinja" in artifact.documents:
        return "chat_template.jinja"
    if isinstance(tokenizer_config, dict) and tokenizer_config.get("chat_template"):
        return "tokenizer_config.json"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, PROG, __doc__, argv)
    return run_main(PROG, lambda: _inspect(args), (ArtifactError,))


def _inspect(args: Args) -> int:
    with Artifact.open(args.model) as artifact:
        report = describe(artifact)
        bad = artifact.verify() if args.verify else None
    if args.verify:
        report["verify"] = {"tensors": len(artifact.tensors), "documents": len(artifact.documents), "mismatched": bad}
    print(json.dumps(report, indent=2) if args.json else _text(report))
    if bad:
        print(f"{PROG}: error: digest mismatch in {', '.join(bad)}: the file is corrupt", file=sys.stderr)
        return 1
    return 0


_PACKINGS = {"2bit": "2-bit packing (4 codes per byte)", "base3": "base-3 packing (5 codes per byte)"}


def _quantization(s: dict) -> str:
    """How the ternary weights were made, e.g. "gptq, 2 planes (3 in the MLP down projections), tied scales,
    group 64, rotate 64, base-3 packing (5 codes per byte), calibrated on teacher (8192 tokens)" or "scheme
    absmean-row" (the original per-row student)."""
    if s.get("scheme") or s.get("method") is None:
        return f"scheme {s.get('scheme')}"
    text = f"{s.get('method')}, {s.get('planes')} plane{'' if s.get('planes') == 1 else 's'}"
    if s.get("down_planes") not in (None, s.get("planes")):  # recorded since format 1.3
        text += f" ({s['down_planes']} in the MLP down projections)"
    if isinstance(s.get("plane_scales"), str):  # recorded since commit 3ad4971
        text += f", {s['plane_scales']} scales"
    text += f", group {s.get('group')}, rotate {s.get('rotate') or 'none'}"
    if s.get("packing"):  # recorded since format 1.2
        packing = s["packing"]  # shown as recorded when it is not one we know (a list: not a key)
        text += ", " + (_PACKINGS.get(packing, packing) if isinstance(packing, str) else repr(packing))
    calibration = s.get("calibration")
    if isinstance(calibration, dict):
        text += f", calibrated on {calibration.get('source')} ({calibration.get('tokens')} tokens)"
    return text


def _text(r: dict) -> str:
    m, s = r["model"], r["student"] if isinstance(r["student"], dict) else {}
    lines = [
        f"{r['path']}: .tern {r['format_version']}, {r['file_bytes'] / 1e6:.1f} MB, {r['tensors']} tensors",
        f"model    {m['architecture']}: {m['layers']} layers (full attention at {m['full_attention_layers']}), "
        f"hidden {m['hidden_size']}, {m['heads']} heads / {m['kv_heads']} kv, head dims {m['head_dims']}, "
        f"vocab {m['vocab_size']}, window {m['sliding_window']}, PLE {m['per_layer_embedding_dim']}, "
        f"{m['kv_shared_layers']} KV-shared layers, EOS {m['eos_token_ids']}",
        f"student  quant {s.get('quant')}, {_quantization(s)}, head {s.get('head')}, {_tables(s.get('tables'))}, "
        f"{_moe(s.get('moe'))}, "
        f"{_attnres(s.get('attnres'))}" + (f", LoRA {s['lora']} merged" if s.get("lora") else ""),
        "bytes by kind:",
    ]
    lines += [f"  {kind:<40} {n:>15,}" for kind, n in r["bytes_by_kind"].items()]
    total = sum(r["bytes_by_kind"].values())
    lines.append(f"  {'all weights':<40} {total:>15,}  (the bf16 teacher: {r['teacher_bf16_bytes']:,})")
    template = r["chat_template"]
    lines.append(f"chat     template from {template}" if template else
                 "chat     no chat template: prompts run as raw text (ferrisres-convert --chat-template FILE adds one)")
    p = r["provenance"] if isinstance(r["provenance"], dict) else {}
    sources = p.get("source_files")
    lines.append(f"made by  {p.get('converter')} from " + (", ".join(map(str, sources)) if isinstance(sources, dict) else "?"))
    if "verify" in r:
        v = r["verify"]
        lines.append(f"verify   {v['tensors']} tensors and {v['documents']} documents: "
                     + ("all digests match" if not v["mismatched"] else f"{len(v['mismatched'])} MISMATCHED"))
    return "\n".join(lines)


def _moe(moe) -> str:
    if not isinstance(moe, dict):
        return "dense MLPs" if not moe else f"MoE {moe!r}"
    return f"MoE {moe.get('experts')} experts top-{moe.get('top_k')} (noise {moe.get('noise')}, seed {moe.get('seed')})"


def _tables(tables) -> str:
    if not isinstance(tables, dict):
        return "tables not recorded"  # artifacts of format 1.0
    return "tables " + " / ".join(f"{name} {encoding}" for name, encoding in tables.items())


def _attnres(attnres) -> str:
    return f"Block AttnRes gate {attnres.get('gate')}" if isinstance(attnres, dict) else "no AttnRes"


if __name__ == "__main__":
    sys.exit(main())
