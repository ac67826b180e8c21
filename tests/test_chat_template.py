"""Chat templates render as transformers' apply_chat_template renders them: the helpers and
tags published templates use are there, a template's own refusal is the request's 400, and a
template that does not compile is the server's fault, not the request's."""

from __future__ import annotations

import dataclasses
import datetime
import json

import pytest

from tokenwire.client.messages import ModelInfo
from tokenwire.edge.errors import EdgeError
from tokenwire.edge.openai_template import chat_prompt

TURNS = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi"}]


def _info(template: str) -> ModelInfo:
    return ModelInfo(
        model="m",
        context_length=512,
        vocab_size=320,
        eos_token_ids=(1,),
        provider="CPUExecutionProvider",
        max_tokens_limit=256,
        default_max_tokens=16,
        max_batch_size=4,
        chat_template=template,
        bos_token="<s>",
        eos_token="</s>",
    )


def test_raise_exception_refuses_the_conversation_with_the_templates_message() -> None:
    """A template's raise_exception (Mistral's "roles must alternate") is a 400 naming
    messages that carries the template's own message."""
    template = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('need a system turn') }}{% endif %}"
    )
    with pytest.raises(EdgeError) as caught:
        chat_prompt(TURNS, _info(template))
    assert (caught.value.status, caught.value.param) == (400, "messages")
    assert caught.value.message.endswith("need a system turn")


def test_loop_controls_are_available() -> None:
    """{% break %} and {% continue %} (jinja2's loopcontrols, which transformers enables)."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% break %}{% endif %}"
        "[{{ m['content'] }}]{% endfor %}"
    )
    assert chat_prompt(TURNS, _info(template)) == "[héllo]"


def test_the_generation_tag_renders_its_body() -> None:
    """{% generation %}...{% endgeneration %} (training masks in transformers) keeps its body."""
    template = (
        "{% for m in messages %}{% generation %}<{{ m['content'] }}>{% endgeneration %}{% endfor %}"
    )
    assert chat_prompt(TURNS, _info(template)) == "<héllo><hi>"


def test_tojson_keeps_text_and_takes_an_indent() -> None:
    """tojson writes non-ASCII text as it is (no HTML escaping) and takes indent."""
    template = "{{ messages[0] | tojson(indent=2) }}"
    assert chat_prompt(TURNS, _info(template)) == json.dumps(TURNS[0], ensure_ascii=False, indent=2)


def test_strftime_now_gives_todays_date() -> None:
    """strftime_now, which Llama 3 templates call for the date, formats the local time."""
    before = datetime.datetime.now().strftime("%Y-%m-%d")
    got = chat_prompt(TURNS, _info("{{ strftime_now('%Y-%m-%d') }}"))
    assert got in {before, datetime.datetime.now().strftime("%Y-%m-%d")}


def test_a_template_that_does_not_compile_is_a_server_error() -> None:
    """A template with a syntax error is a 500 naming the template and its line, not a 400
    blaming the messages."""
    with pytest.raises(EdgeError) as caught:
        chat_prompt(TURNS, _info("ok\n{% for m in messages %}"))
    assert caught.value.status == 500
    assert caught.value.param is None
    assert "chat template is not valid Jinja (line 2" in caught.value.message


def test_tools_and_documents_are_none_as_transformers_passes_them() -> None:
    """`tools` and `documents` are none (not undefined): a template that tests `is not none`
    renders its no-tools branch."""
    template = "{% if tools is not none or documents is not none %}T{% else %}plain{% endif %}"
    assert chat_prompt(TURNS, _info(template)) == "plain"


def test_a_template_that_fails_in_its_own_code_is_a_server_error() -> None:
    """A template that raises outside Jinja's errors (iterating None, as some tool-use
    templates do) is a 500 with a message, not an unhandled exception."""
    with pytest.raises(EdgeError) as caught:
        chat_prompt(TURNS, _info("{% for t in tools %}{{ t }}{% endfor %}"))
    assert caught.value.status == 500
    assert "chat template failed on these messages: TypeError" in caught.value.message


@pytest.mark.parametrize(
    "template",
    [
        "{{ settings.name }}",  # an undefined name's attribute
        "{{ ''.__class__.__mro__ }}",  # what the sandbox forbids
    ],
)
def test_a_template_that_breaks_jinjas_rules_is_a_server_error(template: str) -> None:
    """A template fault that Jinja reports as its own error (an undefined name, what the
    sandbox forbids) is a 500, as transformers fails on it too, not a 400 blaming the
    messages."""
    with pytest.raises(EdgeError) as caught:
        chat_prompt(TURNS, _info(template))
    assert caught.value.status == 500
    assert "chat template failed on these messages" in caught.value.message


PARTS = [
    {
        "role": "user",
        "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
    }
]


def test_text_parts_reach_a_template_that_reads_content_as_a_string_one_line_each() -> None:
    """A template that prints content as one string gets a message's text parts joined by
    newlines (as vLLM joins them), not the Python list."""
    assert chat_prompt(PARTS, _info("{{ messages[0]['content'] }}")) == "first\nsecond"


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}"
        "{% endfor %}",
        "{% for m in messages %}{% set c = m.content %}{% for p in c %}[{{ p.text }}]{% endfor %}"
        "{% endfor %}",
        "{% for m in messages %}{% for p in m['content'] | selectattr('type', 'equalto', 'text') %}"
        "[{{ p['text'] }}]{% endfor %}{% endfor %}",
    ],
)
def test_text_parts_reach_a_template_that_loops_over_content_as_parts(template: str) -> None:
    """A template that loops over a message's content (Gemma 3's) gets the text parts as they
    were sent, as transformers passes them, not one string of joined lines."""
    assert chat_prompt(PARTS, _info(template)) == "[first][second]"


def test_a_template_that_reads_some_turns_content_as_a_string_gets_them_joined() -> None:
    """A template that loops over the user's content parts but adds the system turn's content
    to a string (Mistral Small 3.1's) fails on parts there: it is rendered again with every
    turn's text parts joined, not answered with a 500."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ '[SYS]' + m['content'] }}"
        "{% elif m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endif %}"
        "{% endfor %}"
    )
    turns = [{"role": "system", "content": PARTS[0]["content"]}, *PARTS]
    assert chat_prompt(turns, _info(template)) == "[SYS]first\nsecondfirst\nsecond"


def test_the_template_sees_each_template_token_by_name() -> None:
    """Each special token the server names (unk_token, a named extra such as image_token, ...)
    is a variable of the template under its name, as transformers passes the tokenizer's
    special_tokens_map."""
    info = dataclasses.replace(
        _info("{{ unk_token }}|{{ image_token }}|{{ bos_token }}"),
        template_tokens={"bos_token": "<s>", "unk_token": "<unk>", "image_token": "<image>"},
    )
    assert chat_prompt(TURNS, info) == "<unk>|<image>|<s>"


# SmolVLM-Instruct's template (Idefics3's): it reads content only as a list of parts.
SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# llava-1.5-hf's template: it reads content only as a list of parts, through selectattr.
LLAVA = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
STRING_TURNS = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            SMOLVLM,
            "<|im_start|>System: Be terse.<end_of_utterance>\n"
            "User: What is 2+2?<end_of_utterance>\nAssistant:",
        ),
        (LLAVA, "Be terse. USER: What is 2+2? ASSISTANT:"),
    ],
    ids=["smolvlm", "llava"],
)
@pytest.mark.parametrize("user_as_parts", [False, True], ids=["all-strings", "mixed"])
def test_string_content_reaches_a_template_that_reads_only_parts_as_one_text_part(
    template: str, expected: str, user_as_parts: bool
) -> None:
    """A template that reads content only as parts (no `is string` branch: SmolVLM's,
    llava's) renders the text of every turn sent as a string, whether or not another turn was
    sent as parts, not an empty turn from looping over the string's characters."""
    turns = [dict(turn) for turn in STRING_TURNS]
    if user_as_parts:
        turns[1]["content"] = [{"type": "text", "text": "What is 2+2?"}]
    assert chat_prompt(turns, _info(template)) == expected


# Gemma 3's way of reading content: as a string where it is one, else part by part.
STRING_OR_PARTS = (
    "{% for m in messages %}<{{ m['role'] }}>"
    "{% if m['content'] is string %}{{ m['content'] | trim }}"
    "{% else %}{% for item in m['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}</{{ m['role'] }}>"
    "{% endfor %}"
)


def test_a_template_that_reads_strings_or_parts_renders_string_content_as_it_did() -> None:
    """A template with a branch for string content and one for parts (Gemma 3's, Qwen2-VL's)
    renders string turns' text as its string branch does: the same prompt as before string
    content reached such templates as parts."""
    turns = [*STRING_TURNS, {"role": "assistant", "content": " 4 "}]
    assert chat_prompt(turns, _info(STRING_OR_PARTS)) == (
        "<system>Be terse.</system><user>What is 2+2?</user><assistant>4</assistant>"
    )


# Llama 4's way: a string printed as it is, each text part trimmed.
STRING_AS_IS_OR_PARTS_TRIMMED = (
    "{% for m in messages %}<{{ m['role'] }}>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for item in m['content'] %}{{ item['text'] | trim }}{% endfor %}{% endif %}"
    "</{{ m['role'] }}>{% endfor %}"
)


def test_a_template_with_a_string_branch_gets_string_content_as_a_string() -> None:
    """A template that prints string content as it is and trims each text part (Llama 4's)
    keeps the spaces and newlines of a turn sent as a string, as transformers renders it, and
    trims the parts of a turn sent as parts."""
    turns = [
        {"role": "user", "content": "  padded \n"},
        {"role": "assistant", "content": [{"type": "text", "text": " part "}]},
    ]
    assert chat_prompt(turns, _info(STRING_AS_IS_OR_PARTS_TRIMMED)) == (
        "<user>  padded \n</user><assistant>part</assistant>"
    )


def test_a_template_that_prints_one_turns_content_whole_renders_its_text() -> None:
    """A template that loops over the user's content but prints the system turn's whole
    (`{{ content }}`, `| trim`) renders that turn's text, its parts joined by newlines, not
    the Python form of a list of parts."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}[{{ m['content'] }}|"
        "{{ m['content'] | trim }}]{% else %}{% for p in m['content'] %}{{ p['text'] }}"
        "{% endfor %}{% endif %}{% endfor %}"
    )
    turns = [{"role": "system", "content": PARTS[0]["content"]}, *STRING_TURNS[1:]]
    assert chat_prompt(turns, _info(template)) == "[first\nsecond|first\nsecond]What is 2+2?"


def test_a_template_that_fails_on_parts_renders_string_content_as_it_did() -> None:
    """A template that loops over the user's content parts but adds the system turn's content
    to a string (Mistral Small 3.1's) renders a conversation sent as strings as it did before
    string content reached such templates as parts: as strings, not answered with a 500."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ '[SYS]' + m['content'] }}"
        "{% elif m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endif %}"
        "{% endfor %}"
    )
    assert chat_prompt(STRING_TURNS, _info(template)) == "[SYS]Be terse.What is 2+2?"
