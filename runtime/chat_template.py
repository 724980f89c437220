"""Chat templates: the checkpoint's Jinja template turns a list of messages into the prompt text.

Rendered as Hugging Face transformers renders them (`apply_chat_template`): the same Jinja options,
filters and globals, so a template gives the same text here as there. Templates come inside
artifacts, which may come from anyone, so they run in Jinja's immutable sandbox: no attribute
access to Python internals, no file or module access, and no mutation of the data passed in.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template is malformed or refused the messages (its `raise_exception`)."""


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]); `variables` are what the
    template may read besides (bos_token, eos_token, ... as transformers passes its special tokens)."""
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None


@lru_cache(maxsize=4)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


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
