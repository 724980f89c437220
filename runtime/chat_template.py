"""Chat templates: the checkpoint's Jinja template turns a list of messages into the prompt text.

Rendered as Hugging Face transformers renders them (`apply_chat_template`): the same Jinja options,
filters and globals, so a template gives the same text here as there. Templates come inside
artifacts, which may come from anyone, so they run in Jinja's immutable sandbox: no attribute
access to Python internals, no file or module access, and no mutation of the data passed in.

The sandbox bounds what a template may reach, not how much it may compute: loops, `~`, `%`, format
widths, `tojson(indent=...)` or `lipsum` can build gigabytes or run for ever, and no hook sees every
one of them. So the render runs in a forked child process under an address-space limit, its output
counted as it is produced, and killed when its time is up (`ferrisres.format.isolated`): every
construct, known or not, ends in one `ChatTemplateError` within RENDER_SECONDS and RENDER_MEMORY.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ferrisres.format.isolated import run_isolated


class ChatTemplateError(ValueError):
    """The template is malformed or refused the messages (its `raise_exception`)."""


MAX_OUTPUT = 1 << 24  # characters: a template may not build strings or lists larger than this
RENDER_SECONDS = 10.0  # a chat template renders in milliseconds; this is for ones that never end
RENDER_MEMORY = 1 << 30  # bytes of address space a render may add to the process's own


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]); `variables` are what the
    template may read besides (bos_token, eos_token, enable_thinking, tools, ...)."""
    variables.setdefault("tools", None)  # as transformers passes them: a template tests `tools is not none`
    variables.setdefault("documents", None)
    compiled = _compile(template)
    return run_isolated(lambda: _render(compiled, messages=messages, add_generation_prompt=add_generation_prompt,
                                        **variables),
                        seconds=RENDER_SECONDS, memory=RENDER_MEMORY, error=ChatTemplateError,
                        what="chat template rendering")


def _render(compiled: jinja2.Template, **context) -> str:
    pieces, size = [], 0
    try:
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise ChatTemplateError(f"chat template renders more than {MAX_OUTPUT} characters")
            pieces.append(piece)
    except ChatTemplateError:
        raise
    except MemoryError:
        raise ChatTemplateError(f"chat template needs more than {RENDER_MEMORY >> 20} MiB of memory") from None
    except Exception as e:  # a broken or hostile template fails in many ways (1/0, recursion, ...): all are its fault
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    return "".join(pieces)


@lru_cache(maxsize=4)
def _compile(template: str) -> jinja2.Template:
    # Jinja evaluates constant expressions while compiling, here, outside the bounded child (`{{ '%2000000000d'
    # % 1 }}` would build its 2 GB at compile time): optimized=False and _RuntimeOutput leave them to the render.
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag],
                          optimized=False)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except Exception as e:
        raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from e


class _RuntimeOutput(CodeGenerator):
    """Jinja's code generator, except that it never computes an output expression at compile time."""

    def _output_child_to_const(self, node, frame, finalize):
        raise nodes.Impossible()


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus a bound on `*` and `**` so a template cannot exhaust memory."""

    intercepted_binops = frozenset(["*", "**"])
    code_generator_class = _RuntimeOutput

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_OUTPUT:
                    raise SecurityError("chat template builds a sequence too large")
        if operator == "**" and isinstance(right, int) and abs(right) > 1000:
            raise SecurityError("chat template raises to too large a power")
        return super().call_binop(context, operator, left, right)


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks assistant text; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # As transformers: Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise jinja2.TemplateError(message)


def special_token_variables(tokenizer_config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... from tokenizer_config.json (plain strings or {"content": ...} objects)."""
    out = {}
    for key, value in tokenizer_config.items():
        if key.endswith("_token"):
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


def template_of(tokenizer_config: dict, chat_template_file: str | None) -> str | None:
    """The checkpoint's default chat template: chat_template.jinja, else tokenizer_config's entry."""
    if chat_template_file:
        return chat_template_file
    value = tokenizer_config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None
