"""Tokenize and Detokenize: a text's token ids as Generate feeds them to the model, and the text
of ids. Neither generates anything, so neither counts in tokenwire_requests_total; each call
logs one line (`request.tokenize` or `request.detokenize`, else `request.rejected`), never its
text or ids."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import structlog

from tokenwire.server.domain import InvalidRequest, TokenwireError, Unavailable
from tokenwire.server.engine import Engine
from tokenwire.server.engine.engine import LONG_PROMPT_CHARS
from tokenwire.server.engine.request_checks import check_encoded
from tokenwire.server.rpc import convert
from tokenwire.server.rpc.auth import ANONYMOUS
from tokenwire.server.rpc.errors import abort, log_rejected
from tokenwire.server.rpc.handlers import Malformed
from tokenwire.server.telemetry import ms
from tokenwire.server.tokenizer import LongInputs, detokenize, tokenize
from tokenwire.v1 import generate_pb2 as pb

log = structlog.get_logger("tokenwire.rpc")

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


class TokenCalls:
    """The two calls, on the engine `engine_of` gives (Unavailable while the model loads). A
    text over LONG_PROMPT_CHARS characters (over as many ids, to decode) goes to the engine's
    tokenizer thread, queued with Generate's long prompts; at most as many wait as the server
    holds requests (GetModelInfoResponse.max_requests), more are Overloaded."""

    def __init__(self, engine_of: Callable[[], Engine]) -> None:
        self._engine_of = engine_of
        self._long = LongInputs()

    async def tokenize(
        self, request: pb.TokenizeRequest | Malformed, context: Context, principal: str
    ) -> pb.TokenizeResponse:
        started = time.perf_counter()
        try:
            if isinstance(request, Malformed):
                raise request.error()
            engine = self._open_engine()
            asked = convert.tokenize_from_pb(request)
            asked.check(engine.limits)
            long = len(asked.text) > LONG_PROMPT_CHARS
            job = functools.partial(tokenize, engine.tokenizer, asked, released=long)
            tokens = await self._run(engine, job) if long else job()
            _check_in_model(tokens.ids, engine)
        except TokenwireError as exc:
            await _refuse(context, exc)
            raise
        _log("request.tokenize", len(tokens.ids), started, principal, context)
        return convert.tokens_to_pb(tokens, engine.limits.context_length)

    async def detokenize(
        self, request: pb.DetokenizeRequest | Malformed, context: Context, principal: str
    ) -> pb.DetokenizeResponse:
        started = time.perf_counter()
        try:
            if isinstance(request, Malformed):
                raise request.error()
            engine = self._open_engine()
            asked = convert.detokenize_from_pb(request)
            # The ids the engine takes as prompt_ids: those both the model and the tokenizer have.
            asked.check(engine.id_limit, engine.limits.max_prompt_bytes)
            job = functools.partial(detokenize, engine.tokenizer, asked)
            text = (
                await self._run(engine, job) if len(asked.token_ids) > LONG_PROMPT_CHARS else job()
            )
        except TokenwireError as exc:
            await _refuse(context, exc)
            raise
        _log("request.detokenize", len(asked.token_ids), started, principal, context)
        return pb.DetokenizeResponse(text=text)

    def _open_engine(self) -> Engine:
        """The engine, while it takes requests: Unavailable while loading and draining, as
        Generate is."""
        engine = self._engine_of()
        if not engine.accepting:
            raise Unavailable("the server is not accepting requests (starting or draining)")
        return engine

    async def _run(self, engine: Engine, job: Callable[[], T]) -> T:
        """job's result from the engine's tokenizer thread, where at most as many of these
        wait as the engine holds requests."""
        limit = engine.max_rows + engine.config.max_queue
        return await self._long.run(
            job,
            engine.on_tokenizer_thread,
            limit=limit,
            retry_after_s=engine.config.retry_after_s,
        )

    def shutdown(self) -> None:
        """Refuse later long inputs (the server has stopped taking calls)."""
        self._long.shutdown()


def _check_in_model(ids: tuple[int, ...], engine: Engine) -> None:
    """A text that encodes to an added token the model has no row for is refused, as Generate
    refuses such a prompt."""
    vocab = engine.model.spec.vocab_size
    if not ids or max(ids) < vocab:
        return
    beyond = {i: engine.tokenizer.inner.id_to_token(i) or "" for i in ids if i >= vocab}
    try:
        check_encoded(list(ids), beyond, vocab)
    except InvalidRequest as exc:
        raise InvalidRequest("text", exc.value, exc.reason) from None


async def _refuse(context: Context, exc: TokenwireError) -> None:
    """One request.rejected line (the field and the rule, never the value; the caller's peer),
    then the status."""
    log_rejected(exc, peer=context.peer())
    await abort(context, exc)


def _log(event: str, tokens: int, started: float, principal: str, context: Context) -> None:
    fields: dict[str, object] = {
        "tokens": tokens,
        "duration_ms": ms(time.perf_counter() - started),
        "peer": context.peer(),
    }
    if principal != ANONYMOUS:
        fields["principal"] = principal
    log.info(event, **fields)
