"""Chat prompts: an OpenAI conversation rendered with the model's chat template (sandboxed), in
the environment transformers' `apply_chat_template` gives templates: `break`/`continue`, the
`{% generation %}` tag, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII
text and takes `indent`."""

from __future__ import annotations

import datetime
import enum
import functools
import json
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenwire.client.messages import ModelInfo
from tokenwire.edge.errors import EdgeError

# Used when the model ships no chat template: role-tagged turns, then the assistant's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's tokens
    with it for training masks; rendering a prompt keeps its body as it is."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class TemplateRefusal(TemplateError):
    """The template refused the conversation (`raise_exception`): the caller's to change."""


def _raise_exception(message: str) -> None:
    raise TemplateRefusal(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


_jinja = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation]
)
_jinja.filters["tojson"] = _tojson
_jinja.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """Compiled once per template text (a model's template is compiled by its first chat)."""
    try:
        return _jinja.from_string(template)
    except TemplateSyntaxError as exc:
        # The model's template, not the request, is at fault: a server-side error.
        raise EdgeError(
            500,
            "INTERNAL",
            f"the model's chat template is not valid Jinja (line {exc.lineno}: {exc.message})",
            openai_type="server_error",
        ) from None


def _is_content(node: jinja2.nodes.Node) -> bool:
    """`x['content']` or `x.content`, filters applied to it or not."""
    while isinstance(node, jinja2.nodes.Filter) and node.node is not None:
        node = node.node
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    return isinstance(node, jinja2.nodes.Getattr) and node.attr == "content"


class Reading(enum.Enum):
    """How a template reads a message's content."""

    STRING = "string"
    """As one string (it never loops over content)."""
    PARTS = "parts"
    """As OpenAI's list of text parts, only (SmolVLM's, llava's): a string is one part."""
    AS_SENT = "as sent"
    """A string as a string, parts as parts: it tests `content is string` (Gemma 3's,
    Llama 4's, Qwen2-VL's), and prints a string as transformers gives it (Llama 4's trims
    each part, not a string)."""


@functools.lru_cache(maxsize=8)
def content_reading(template: str) -> Reading:
    """Whether the template loops over a message's content, directly or through a variable
    set from it (it then reads content as text parts, as vLLM tells the two apart), and
    whether it also reads a string content as one (`is string`)."""
    try:
        tree = _jinja.parse(template)
    except TemplateSyntaxError:
        return Reading.STRING
    names = {
        node.target.name
        for node in tree.find_all(jinja2.nodes.Assign)
        if isinstance(node.target, jinja2.nodes.Name) and _is_content(node.node)
    }

    def content(node: jinja2.nodes.Node) -> bool:
        return _is_content(node) or (isinstance(node, jinja2.nodes.Name) and node.name in names)

    if not any(content(loop.iter) for loop in tree.find_all(jinja2.nodes.For)):
        return Reading.STRING
    tests = tree.find_all(jinja2.nodes.Test)
    if any(test.name == "string" and content(test.node) for test in tests):
        return Reading.AS_SENT
    return Reading.PARTS


class _TextParts(list[dict[str, str]]):
    """A content as text parts, for a template that loops over content. Printed whole (some
    templates loop over the user's content but print the system turn's, `{{ content }}` or
    `| trim`), it reads as its texts joined by newlines, not as a Python list."""

    def __str__(self) -> str:
        return _joined(self)


def _joined(content: str | list[dict[str, str]]) -> str:
    """A content as one string: text parts joined by newlines (as vLLM joins them: two parts
    read as two lines, not one run-on word)."""
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


def _as_parts(content: str | list[dict[str, str]]) -> _TextParts:
    """A content as text parts: a string is one text part (as vLLM gives it to such templates:
    a template that reads only parts would otherwise loop over the string's characters and
    print none of its text)."""
    return _TextParts([{"type": "text", "text": content}] if isinstance(content, str) else content)


def _as_template_reads(turns: list[dict[str, Any]], reading: Reading) -> list[dict[str, Any]]:
    """The turns with each content as the template reads content: every turn's as text parts
    (a string as one part), every turn's as one string, or strings as strings and parts as
    parts."""
    read: Callable[[str | list[dict[str, str]]], str | list[dict[str, str]]] = _as_sent
    if reading is Reading.PARTS:
        read = _as_parts
    elif reading is Reading.STRING:
        read = _joined
    return [{**turn, "content": read(turn["content"])} for turn in turns]


def _as_sent(content: str | list[dict[str, str]]) -> str | list[dict[str, str]]:
    return content if isinstance(content, str) else _as_parts(content)


def chat_prompt(
    turns: list[dict[str, Any]], info: ModelInfo, *, add_generation_prompt: bool = True
) -> str:
    """The turns rendered with the model's chat template (or the default one), by default
    followed by the assistant turn's start (add_generation_prompt). A template that loops over
    content (see content_reading) gets every turn's content as text parts, sent as a
    string or not; any other gets every turn's as one string."""
    source = info.chat_template or DEFAULT_CHAT_TEMPLATE
    template = _compiled(source)
    context: dict[str, Any] = {
        # Each special token by name, as transformers passes its special_tokens_map (a server
        # that sends no template_tokens sends bos_token and eos_token alone).
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        **info.template_tokens,
        # Passed as transformers passes them: `tools is not none` must be false.
        "tools": None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }
    reading = content_reading(source)
    try:
        try:
            rendered = template.render(messages=_as_template_reads(turns, reading), **context)
        except TemplateRefusal:
            raise
        except Exception:
            if reading is Reading.STRING:
                raise
            # A template that loops over some turns' content may still read others' as one
            # string (Mistral Small 3.1 prefixes the system turn's): it gets every turn's as one.
            messages = _as_template_reads(turns, Reading.STRING)
            rendered = template.render(messages=messages, **context)
    except TemplateRefusal as exc:
        # Model templates refuse some conversations (roles not alternating, ...).
        raise EdgeError.invalid(
            "messages", f"the model's chat template refused them: {exc}"
        ) from None
    except Exception as exc:  # the template's own fault (a TypeError in its code, an
        # undefined name, what the sandbox forbids, ...)
        raise EdgeError(
            500,
            "INTERNAL",
            f"the model's chat template failed on these messages: {type(exc).__name__}: {exc}",
            openai_type="server_error",
        ) from None
    return str(rendered)
