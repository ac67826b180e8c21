"""Chat prompts: an OpenAI conversation rendered with the model's chat template (sandboxed)."""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenwire.client.client import ModelInfo
from tokenwire.edge.errors import EdgeError

# Used when the model ships no chat template: role-tagged turns, then the assistant's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def chat_prompt(turns: list[dict[str, str]], info: ModelInfo) -> str:
    """The turns rendered with the model's chat template (or the default one)."""
    template = info.chat_template or DEFAULT_CHAT_TEMPLATE
    try:
        rendered = _jinja.from_string(template).render(
            messages=turns,
            add_generation_prompt=True,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
        )
    except TemplateError as exc:
        # Model templates refuse some conversations (roles not alternating, ...).
        raise EdgeError.invalid(
            "messages", f"the model's chat template refused them: {exc}"
        ) from None
    return str(rendered)
