"""Chat templates that would build gigabytes or never end (class 2 of issue 13). Every construct is
bounded the same way: the render runs in a child process under an address-space limit, its output is
counted, and it is killed when its time is up; the rendered prompt is refused before tokenizing when
it cannot fit the context. Nothing is built at compile time, in the unbounded parent."""

from __future__ import annotations

import time

import pytest

from ferrisres.runtime import chat_template
from ferrisres.runtime.chat_template import ChatTemplateError, render_chat
from hostile import refused, run_boxed, with_documents

MESSAGES = [{"role": "user", "content": "Hi"}]
SECONDS = 2.0  # RENDER_SECONDS in these tests


@pytest.fixture(autouse=True)
def short_render_time(monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", SECONDS)


def _refused_quickly(template: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=message):
        render_chat(template, MESSAGES)
    assert time.monotonic() - start < SECONDS + 3


TOO_LARGE = "renders more than|needs more than"


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",  # a loop
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",  # ~
    "{{ '%2000000000d' % 1 }}",  # %, folded at compile time before
    "{{ '%-2000000000s'|format('x') }}",  # the format filter's width
    "{{ '{:>2000000000}'.format(1) }}",  # str.format's width
    "{{ messages|tojson(indent=100000000) }}",
    "{{ 'x'|center(2000000000) }}",
    "{{ 'a\nb'|indent(2000000000) }}",
    "{{ range(10)|join('x' * 10000000) }}",
    "{% for i in range(10000) %}{{ strftime_now('%c' * 1000) }}{% endfor %}",
], ids=["loop", "tilde-doubling", "percent", "format-filter", "str-format", "tojson-indent", "center", "indent",
        "join", "strftime_now"])
def test_output_and_memory_are_bounded_for_every_construct(template):
    # building up to the memory bound may outlast the time bound on a loaded machine: either bound may stop it
    _refused_quickly(template, TOO_LARGE + "|did not finish")


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # nested loops, no output
    "{{ lipsum(n=10000000) }}",
    "{% macro f(n) %}{% for i in range(100000) %}{{ f(n) if false }}{% endfor %}{% endmacro %}"
    "{% for i in range(100000) %}{{ f(1) }}{% endfor %}",
], ids=["nested-loops", "lipsum", "macro-loops"])
def test_render_time_is_bounded(template):
    _refused_quickly(template, f"rendering did not finish in {SECONDS:.0f} s")


def test_errors_and_plain_templates_still_come_back_from_the_child():
    assert render_chat("{{ messages[0]['content'] }}|{{ x }}", MESSAGES, x="\udcff") == "Hi|\udcff"
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        render_chat("{{ 1 // 0 }}", MESSAGES)


@pytest.fixture(scope="module")
def base(converted):
    return converted("tiny_gemma4")


def test_a_template_that_never_ends_stops_the_run_in_one_line(base, tmp_path):
    bad = with_documents(base, tmp_path / "loop.tern",
                         chat_template_jinja="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                             "{% endfor %}")
    run = run_boxed("ferrisres-run", str(bad), "-p", "Hi", "-n", "2", timeout=60)
    refused(run, "chat template rendering did not finish in 10 s")


def test_a_prompt_longer_than_the_context_is_refused_before_tokenizing(base, tmp_path):
    # 10^7 characters: within the render's bound, but no 131,072 tokens of this vocabulary hold them
    bad = with_documents(base, tmp_path / "long.tern",
                         chat_template_jinja="{% for i in range(100) %}{{ 'x' * 100000 }}{% endfor %}")
    run = run_boxed("ferrisres-run", str(bad), "-p", "Hi", "-n", "2")
    refused(run, "the prompt has 10000000 characters, more than 131072 tokens of context can hold")
    assert run.seconds < 20


def test_a_template_that_renders_a_lone_surrogate_is_one_line(base, tmp_path):
    bad = with_documents(base, tmp_path / "surrogate.tern", chat_template_jinja='{{ "\\udcff" }}{{ messages[0]["content"] }}')
    refused(run_boxed("ferrisres-run", str(bad), "-p", "Hi", "-n", "2"),
            "the text is not valid Unicode: a lone surrogate at character 0")
