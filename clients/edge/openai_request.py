"""Reading an OpenAI request: which fields are honoured, which are refused, and the options of
each of its `n` generations.

Nothing is silently ignored. A field is either honoured, accepted because it cannot change the
answer (`user`, `metadata`, ...), accepted at the one value that asks for nothing (`tools: []`,
`best_of: 1`, `response_format: {"type": "text"}`), or refused with a 400 naming it.
The objects inside a request (`stream_options`, `response_format`, a message, a content part)
are read the same way: a key the edge does not read is a 400 naming its path
(`stream_options.bogus`, `messages[0].content[1].bogus`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tokenwire.client.messages import GenerateOptions, ModelInfo
from tokenwire.edge.body import UINT32_MAX, UINT64_MAX, Fields, IntRange
from tokenwire.edge.errors import EdgeError, as_request_errors
from tokenwire.edge.jsonsafe import OutOfRange
from tokenwire.edge.openai_prompts import completion_prompts

# Read below (or by the route); the extensions top_k, repetition_penalty, ignore_eos and
# stop_token_ids are the native API's, as vLLM accepts them too.
HONOURED = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "n",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "logprobs",
        "top_k",
        "repetition_penalty",
        "ignore_eos",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "min_p",
        "min_tokens",
        "stop_token_ids",
    }
)
HONOURED_BY_ROUTE = {
    True: frozenset({"messages", "max_completion_tokens", "top_logprobs"}),
    False: frozenset({"prompt"}),
}
# Accepted as sent: they label, store or route the request but cannot change its answer.
# Each must still have its JSON type: a string, `store` a boolean, `metadata` an object of
# strings.
NEUTRAL = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
)
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
"""OpenAI's processing tiers: each is served alike here, any other is a 400 as at OpenAI."""


def _empty(value: Any) -> bool:
    return bool(value == [])


def _zero(value: Any) -> bool:
    return not isinstance(value, bool) and value == 0


def _no_tools(value: Any) -> bool:
    return bool(value == "none")


def _text_format(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


def _text_only(value: Any) -> bool:
    return bool(value == ["text"])


def _one(value: Any) -> bool:
    return not isinstance(value, bool) and value == 1


def _false(value: Any) -> bool:
    return value is False


def _no_suffix(value: Any) -> bool:
    return bool(value == "")


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _true(value: Any) -> bool:
    return value is True


def _no_kwargs(value: Any) -> bool:
    return bool(value == {})


# Not supported: accepted only at the value that asks for nothing (null is always fine). vLLM's
# extensions are here at their defaults, which are what this edge does (special tokens are
# left out of the text, a stop string too), so a client that always sends them keeps working.
IDLE_VALUE: dict[str, Callable[[Any], bool]] = {
    "skip_special_tokens": _true,
    "include_stop_str_in_output": _false,
}
IDLE_BY_ROUTE: dict[bool, dict[str, Callable[[Any], bool]]] = {
    True: {
        "add_generation_prompt": _true,
        "continue_final_message": _false,
        "chat_template_kwargs": _no_kwargs,
        "tools": _empty,
        "functions": _empty,
        "tool_choice": _no_tools,
        "function_call": _no_tools,
        "parallel_tool_calls": _boolean,  # meaningless without tools, which are refused
        "response_format": _text_format,
        "modalities": _text_only,
    },
    False: {"echo": _false, "suffix": _no_suffix, "best_of": _one},
}
# The JSON type each of them has at OpenAI: a value of another type is 400 invalid_type naming
# the field, whatever it holds (`tools: {}` is no list of tools, `best_of: 1.0` no integer).
IDLE_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "tools": ((list,), "must be a list"),
    "functions": ((list,), "must be a list"),
    "modalities": ((list,), "must be a list"),
    "tool_choice": ((str, dict), "must be a string or an object"),
    "function_call": ((str, dict), "must be a string or an object"),
    "parallel_tool_calls": ((bool,), "must be true or false"),
    "response_format": ((dict,), "must be an object"),
    "echo": ((bool,), "must be true or false"),
    "suffix": ((str,), "must be a string"),
    "best_of": ((int, OutOfRange), "must be an integer"),
    "skip_special_tokens": ((bool,), "must be true or false"),
    "include_stop_str_in_output": ((bool,), "must be true or false"),
    "add_generation_prompt": ((bool,), "must be true or false"),
    "continue_final_message": ((bool,), "must be true or false"),
    "chat_template_kwargs": ((dict,), "must be an object"),
}
MAX_N = 8
COMPLETIONS_MAX_TOKENS = 16
"""max_tokens of a completions request that sets none: OpenAI's default (and vLLM's)."""
MAX_TOKENS = IntRange(1, UINT32_MAX)
"""max_tokens and max_completion_tokens as OpenAI takes them (then the server's cap)."""

# The keys of the request's objects the edge reads (null is always fine, as at the top level);
# any other is a 400 naming its path. `include_obfuscation` asks OpenAI to pad each delta with
# a random `obfuscation` string (against length side-channels); this edge adds none, whichever
# value is sent, so a client library that sends OpenAI's default, true, keeps working.
KEYS_OF: dict[str, frozenset[str]] = {
    "stream_options": frozenset({"include_usage", "include_obfuscation"}),
    # The only format accepted, {"type": "text"}, has no other key.
    "response_format": frozenset({"type"}),
}
# A text content part's keys, as OpenAI defines them: `prompt_cache_breakpoint` marks where a
# cacheable prefix ends, which cannot change the answer (as `prompt_cache_key` cannot).
TEXT_PART_KEYS = frozenset({"type", "text", "prompt_cache_breakpoint"})

# The roles a conversation may use, as the model's chat template sees them: OpenAI's
# `developer` is the system role under its newer name (templates know only `system`). Tool
# turns answer tool calls, which need tools, which are refused.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
# Message fields that belong to tools or audio: accepted only where they ask for nothing.
IDLE_IN_MESSAGE: dict[str, Callable[[Any], bool]] = {
    "tool_calls": _empty,
    "function_call": lambda value: False,
    "tool_call_id": lambda value: False,
    "audio": lambda value: False,
    "refusal": lambda value: False,
}


@dataclasses.dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """What one OpenAI request asks for, checked; `choices` holds one option set per choice."""

    chat: bool
    model: str
    stream: bool
    include_usage: bool
    choices: tuple[GenerateOptions, ...]
    """One option set per generation: `n` for each prompt, prompt by prompt."""
    names: dict[str, str]
    """Server field -> the OpenAI field this request used for it (errors name the latter)."""
    n: int
    """Choices per prompt."""
    texts: tuple[str, ...]
    """Each prompt's text (empty where it is token ids, and for chat, whose prompt is its
    rendered conversation)."""
    batch: bool = False
    """The completions prompt was a list of prompts (a batch, even of one): a refusal names
    its entry (`prompt[0]`)."""

    def names_for(self, generation: int | None) -> dict[str, str]:
        """`names`, with a batch's prompt named by its place (`prompt[2]`) for a refusal of
        `generation`."""
        if generation is None or not self.batch:
            return self.names
        where = f"prompt[{generation // self.n}]"
        return self.names | {"prompt": where, "prompt_ids": where}

    def for_model(self, info: ModelInfo) -> OpenAIRequest:
        """The request as the served model takes it: a chat rendered with the default template
        (the model has none) holds none of the special tokens the model expects, so its
        tokenizer adds them (BOS), as it does to the same text sent as a completions prompt."""
        if not self.chat or info.chat_template:
            return self
        added = tuple(dataclasses.replace(c, add_special_tokens=None) for c in self.choices)
        return dataclasses.replace(self, choices=added)

    def prompts(self, chat_prompt: str = "") -> list[str]:
        """The prompt text of each generation, in the order of `choices`."""
        texts = (chat_prompt,) if self.chat else self.texts
        return [texts[g // self.n] for g in range(len(self.choices))]


def check_fields(fields: Fields, *, chat: bool) -> None:
    """400 for any field the edge does not honour at the value sent, naming the field, and for
    any key of its objects (KEYS_OF) the edge does not read, naming the key's path."""
    idle = IDLE_VALUE | IDLE_BY_ROUTE[chat]
    known = HONOURED | HONOURED_BY_ROUTE[chat] | NEUTRAL
    for name in fields.names():
        value = fields.raw(name)
        if value is None:
            continue
        if name not in known:
            _check_idle(name, value, idle)
        if name in NEUTRAL:
            _check_neutral(name, value)
        if name in KEYS_OF and isinstance(value, dict):
            _check_keys(value, KEYS_OF[name], name)


def _check_neutral(name: str, value: Any) -> None:
    """400 invalid_type for a field accepted as sent whose JSON type is not its own."""
    if name == "store":
        if not isinstance(value, bool):
            raise EdgeError.invalid(name, "must be true or false", "invalid_type")
    elif name == "metadata":
        if not isinstance(value, dict):
            raise EdgeError.invalid(name, "must be an object of strings", "invalid_type")
        for key, item in value.items():
            if not isinstance(item, str):
                raise EdgeError.invalid(f"{name}.{key}", "must be a string", "invalid_type")
    elif not isinstance(value, str):
        raise EdgeError.invalid(name, "must be a string", "invalid_type")
    elif name == "service_tier" and value not in SERVICE_TIERS:
        raise EdgeError.invalid(name, f"must be one of {', '.join(SERVICE_TIERS)}")


def _check_idle(name: str, value: Any, idle: dict[str, Callable[[Any], bool]]) -> None:
    """400 unless `name` is a field not supported, sent at the value that asks for nothing."""
    if name not in idle:
        raise EdgeError.invalid(
            name, "unrecognized request argument for this route", "unknown_parameter"
        )
    types, reason = IDLE_TYPES[name]
    if not _of_type(value, types):
        raise EdgeError.invalid(name, reason, "invalid_type")
    if not idle[name](value):
        raise EdgeError.invalid(
            name, f"is not supported by this server (only {_idle_hint(name)})", _code(name)
        )


def _of_type(value: Any, types: tuple[type, ...]) -> bool:
    """Whether `value` is of one of the JSON `types` (true and false are no integers)."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _check_keys(value: dict[str, Any], known: frozenset[str], where: str) -> None:
    """400 unknown_parameter naming `where.key` for a key of the object `value` that is not
    `known` and not null (a null key asks for nothing, as a null field does)."""
    for key, item in value.items():
        if key not in known and item is not None:
            raise EdgeError.invalid(
                f"{where}.{key}", "unrecognized argument in this object", "unknown_parameter"
            )


def _idle_hint(name: str) -> str:
    hints = {
        "tools": "[]",
        "functions": "[]",
        "tool_choice": '"none"',
        "function_call": '"none"',
        "response_format": '{"type": "text"}',
        "modalities": '["text"]',
        "logit_bias": "{}",
        "echo": "false",
        "suffix": '""',
        "best_of": "1",
        "skip_special_tokens": "true",
        "include_stop_str_in_output": "false",
        "add_generation_prompt": "true",
        "continue_final_message": "false",
        "chat_template_kwargs": "{}",
    }
    return f"{hints.get(name, '0')} or null is accepted"


def _code(name: str) -> str:
    """unsupported_parameter for features, unsupported_value for numbers with a no-op value."""
    numeric = {"presence_penalty", "frequency_penalty", "top_logprobs", "best_of"}
    return "unsupported_value" if name in numeric else "unsupported_parameter"


def read_request(fields: Fields, request_id: str, *, chat: bool) -> OpenAIRequest:
    """Check every field and build the options of each generation: `n` per prompt (a
    completions request may send a batch of prompts), with distinct ids and seeds."""
    check_fields(fields, chat=chat)
    n = fields.integer("n", 1) or 1
    if not chat and fields.has("best_of") and n > 1:
        # best_of is 1 here (check_fields): OpenAI and vLLM need best_of >= n.
        raise EdgeError.invalid("best_of", f"must be at least n ({n})")
    prompts, batch = ((("", ()),), False) if chat else completion_prompts(fields, n)
    base, names = _options(fields, request_id, chat=chat)
    total = len(prompts) * n
    choices = tuple(
        _choice(dataclasses.replace(base, prompt_ids=ids), request_id, k * n + i, total, i)
        for k, (_, ids) in enumerate(prompts)
        for i in range(n)
    )
    include_usage = _include_usage(fields)
    stream = fields.boolean("stream")
    if fields.raw("stream_options") is not None and not stream:
        # As OpenAI and vLLM answer: the options of a stream need a stream.
        raise EdgeError.invalid("stream_options", "is only allowed when `stream` is true")
    model = fields.string("model")
    texts = tuple(text for text, _ in prompts)
    with_usage = stream and include_usage
    return OpenAIRequest(chat, model, stream, with_usage, choices, names, n, texts, batch)


def _include_usage(fields: Fields) -> bool:
    """stream_options.include_usage; its other key, include_obfuscation, must be a boolean
    too, and either value asks for nothing (see KEYS_OF)."""
    options = fields.raw("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise EdgeError.invalid("stream_options", "must be an object", "invalid_type")
    for key in ("include_usage", "include_obfuscation"):
        if not isinstance(options.get(key), bool | None):
            raise EdgeError.invalid(
                f"stream_options.{key}", "must be true or false", "invalid_type"
            )
    return bool(options.get("include_usage"))


def _choice(
    base: GenerateOptions, request_id: str, index: int, total: int, nth: int
) -> GenerateOptions:
    """Generation `index` of `total`, the `nth` choice of its prompt: its own request id and,
    with a seed, its own seed (seed + nth: each prompt of a batch samples as it would alone)."""
    if total == 1:
        return base
    # Room for the suffix (at most MAX_GENERATIONS - 1) within the 128-character bound on ids.
    own_id = f"{request_id[:124]}-{index}"
    seed = None if base.seed is None else (base.seed + nth) % (UINT64_MAX + 1)
    return dataclasses.replace(base, request_id=own_id, seed=seed)


def _max_tokens(fields: Fields, *, chat: bool) -> tuple[int, str]:
    """The token cap and the field that gave it; OpenAI's rule: at least 1 (0, the native
    API's "the server's default", is no cap here)."""
    name = "max_completion_tokens" if chat and fields.has("max_completion_tokens") else "max_tokens"
    if name != "max_tokens" and fields.has("max_tokens"):
        raise EdgeError.invalid("max_tokens", "give max_tokens or max_completion_tokens, not both")
    sent = fields.raw(name)
    if isinstance(sent, int) and not isinstance(sent, bool) and sent < 1:
        raise EdgeError.invalid(name, f"must be at least 1, got {sent}", "integer_below_min_value")
    value = fields.integer(name, allowed=MAX_TOKENS)
    if value is None:
        # OpenAI's defaults: 16 for completions (as vLLM takes it too); chat has none of its
        # own, so the server's default_max_tokens applies.
        return (0 if chat else COMPLETIONS_MAX_TOKENS), name
    return value, name


def _logprobs(fields: Fields, *, chat: bool) -> tuple[bool, int]:
    """Whether to return log-probabilities, and how many alternatives per position. Chat:
    `logprobs` (bool) and `top_logprobs` (0..20, needs logprobs). Completions: `logprobs` N
    (0..5) returns the chosen tokens' and the N most likely at each position."""
    if chat:
        wanted, top = fields.boolean("logprobs"), fields.integer("top_logprobs", 0) or 0
        if top and not wanted:
            raise EdgeError.invalid("top_logprobs", "needs logprobs: true")
        return wanted, top
    value = fields.integer("logprobs")
    return (False, 0) if value is None else (True, value)


def _options(
    fields: Fields, request_id: str, *, chat: bool
) -> tuple[GenerateOptions, dict[str, str]]:
    max_tokens, max_name = _max_tokens(fields, chat=chat)
    logprobs, top_logprobs = _logprobs(fields, chat=chat)
    with as_request_errors():
        options = GenerateOptions(
            max_tokens=max_tokens,
            temperature=fields.number("temperature"),
            top_k=fields.top_k(),
            top_p=fields.number("top_p"),
            repetition_penalty=fields.number("repetition_penalty"),
            seed=fields.seed(),
            stop=fields.strings("stop"),
            stop_token_ids=fields.token_ids("stop_token_ids"),
            ignore_eos=fields.boolean("ignore_eos"),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            presence_penalty=fields.number("presence_penalty"),
            frequency_penalty=fields.number("frequency_penalty"),
            min_p=fields.number("min_p"),
            logit_bias=fields.token_biases("logit_bias"),
            min_tokens=fields.integer("min_tokens", 0) or 0,
            request_id=request_id,
            # A rendered chat template already holds the special tokens (BOS) the model
            # expects (without a template of the model's own, see OpenAIRequest.for_model).
            add_special_tokens=False if chat else None,
        )
    prompt = "messages" if chat else "prompt"
    names = {"max_tokens": max_name, "prompt": prompt, "prompt_ids": prompt} | fields.as_sent()
    return options, names


def check_model(model: str, info: ModelInfo, aliases: tuple[str, ...]) -> None:
    """404 model_not_found unless `model` is the served model or an alias. Like vLLM, a request
    that names no model gets the served one."""
    if not model or model == info.model or model in aliases:
        return
    raise model_not_found(model, info.model)


def check_max_tokens(request: OpenAIRequest, info: ModelInfo) -> None:
    """A max_tokens above the server's cap is refused as OpenAI refuses an integer out of its
    range (`integer_above_max_value`), naming the field the request used."""
    asked, limit = request.choices[0].max_tokens, info.max_tokens_limit
    if limit and asked > limit:
        name = request.names["max_tokens"]
        raise EdgeError.invalid(
            name, f"must be at most {limit}, got {asked}", "integer_above_max_value"
        )


def model_not_found(name: str, served: str) -> EdgeError:
    """OpenAI's 404 for a model id this edge does not serve."""
    return EdgeError(
        404,
        "NOT_FOUND",
        f"The model `{name[:200]}` does not exist (this server serves `{served}`)",
        param="model",
        openai_code="model_not_found",
        openai_type="invalid_request_error",
    )


def _content(content: Any, index: int) -> str | list[dict[str, str]]:
    """A message's content: a string, or text parts (`{"type": "text", "text"}`, kept as
    parts: the chat template reads them as it reads content, see openai_template)."""
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    reason = "must be a string or text parts"
    if not isinstance(content, list):
        # null (no content) is a value the edge does not take; a number, an object... a type.
        raise EdgeError.invalid(where, reason, None if content is None else "invalid_type")
    if not content:
        raise EdgeError.invalid(where, "must hold at least one text part", "empty_array")
    for part in content:
        if not isinstance(part, dict) or (
            part.get("type") == "text" and not isinstance(part.get("text"), str)
        ):
            raise EdgeError.invalid(where, reason, "invalid_type")
        if part.get("type") != "text":  # an image, audio or file part
            raise EdgeError.invalid(where, reason)
    for i, part in enumerate(content):
        _check_keys(part, TEXT_PART_KEYS, f"{where}[{i}]")
    return [{"type": "text", "text": str(part["text"])} for part in content]


def chat_turns(fields: Fields) -> list[dict[str, Any]]:
    """The conversation as the model's chat template takes it: role, content and, where the
    caller named the speaker, name."""
    messages = fields.raw("messages")
    if not isinstance(messages, list) or not messages:
        wrong_type = messages is not None and not isinstance(messages, list)
        raise EdgeError.invalid(
            "messages", "must be a non-empty list", "invalid_type" if wrong_type else None
        )
    return [_turn(message, i) for i, message in enumerate(messages)]


def _turn(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        # An object without a role lacks a value; anything else has a wrong type.
        missing = isinstance(message, dict) and message.get("role") is None
        raise EdgeError.invalid(
            where, "must be an object with a string role", None if missing else "invalid_type"
        )
    role = CHAT_ROLES.get(message["role"])
    if role is None:
        raise EdgeError.invalid(
            f"{where}.role",
            f"must be one of {', '.join(CHAT_ROLES)} (tools are not supported), "
            f"got {message['role'][:40]!r}",
        )
    for key, value in message.items():
        if key in MESSAGE_FIELDS or value is None:
            continue
        if key not in IDLE_IN_MESSAGE:
            raise EdgeError.invalid(
                f"{where}.{key}", "unrecognized message field", "unknown_parameter"
            )
        if key == "tool_calls" and not isinstance(value, list):
            raise EdgeError.invalid(f"{where}.{key}", "must be a list", "invalid_type")
        if not IDLE_IN_MESSAGE[key](value):
            raise EdgeError.invalid(
                f"{where}.{key}",
                "is not supported by this server (tools are not; only [] or null is accepted)"
                if key == "tool_calls"
                else "is not supported by this server (only null is accepted)",
                "unsupported_parameter",
            )
    # An empty tool_calls (anything else is refused above) means no tool call, as clients
    # send it on plain assistant turns: it does not reach the template, where a test for the
    # key (Mistral v0.3's) would render an empty tool call in place of the turn's text.
    turn: dict[str, Any] = {"role": role, "content": _content(message.get("content"), index)}
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise EdgeError.invalid(f"{where}.name", "must be a string", "invalid_type")
        turn["name"] = name
    return turn
