"""Translation between protobuf messages and domain types. Nothing else touches protobuf."""

from __future__ import annotations

import uuid

from tokenwire.common import model_identity, request_ids
from tokenwire.server.domain import (
    CompletionEvent,
    DetokenizeRequest,
    Event,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    TokenEvent,
    TokenizeRequest,
    Tokens,
    UsageEvent,
)
from tokenwire.server.engine import Engine
from tokenwire.v1 import generate_pb2 as pb

_FINISH_TO_PB: dict[FinishReason, pb.FinishReason.ValueType] = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE_EXCEEDED: pb.FINISH_REASON_DEADLINE_EXCEEDED,
}


def check_request_id(request_id: str) -> str:
    """request_id as gRPC metadata can carry it (tokenwire.common.request_ids)."""
    if not request_ids.carried(request_id):
        raise InvalidRequest("request_id", request_id, request_ids.RULE)
    return request_id


def choose_request_id(field: str, header: str | None) -> str:
    """The request's own id, else the x-request-id header, else a fresh one; checked."""
    return check_request_id(field or header or uuid.uuid4().hex)


def sampling_from_pb(msg: pb.GenerateRequest) -> SamplingParams:
    if not msg.HasField("sampling"):
        return SamplingParams()
    s = msg.sampling
    return SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
        min_p=s.min_p if s.HasField("min_p") else 0.0,
        logit_bias=tuple(sorted(s.logit_bias.items())),
    )


def request_from_pb(
    msg: pb.GenerateRequest, request_id: str, deadline: float | None
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt=msg.prompt,
        max_tokens=msg.max_tokens,
        sampling=sampling_from_pb(msg),
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        deadline=deadline,
        add_special_tokens=msg.add_special_tokens if msg.HasField("add_special_tokens") else True,
        continuation=tuple(msg.continuation_ids),
        retry=msg.retry,
        prompt_ids=tuple(msg.prompt_ids),
        top_logprobs=msg.top_logprobs,
        stop_token_ids=tuple(msg.stop_token_ids),
        min_tokens=msg.min_tokens,
    )


def event_to_pb(event: Event) -> pb.GenerateResponse:
    if isinstance(event, TokenEvent):
        # Filled in place (no sub-message copied in): this runs once per streamed token.
        message = pb.GenerateResponse()
        token = message.token
        token.text = event.text
        token.id = event.token_id
        token.index = event.index
        if event.logprob is not None:
            token.logprob = event.logprob
        if event.token_text is not None:
            token.token_text = event.token_text
        if event.token_bytes is not None:
            token.token_bytes = event.token_bytes
        if event.top_logprobs:
            token.top_logprobs.extend(
                pb.TopLogprob(
                    id=t.token_id, logprob=t.logprob, text=t.text, token_bytes=t.token_bytes
                )
                for t in event.top_logprobs
            )
        return message
    if isinstance(event, UsageEvent):
        return pb.GenerateResponse(usage=usage_to_pb(event))
    return pb.GenerateResponse(completion=completion_to_pb(event))


def usage_to_pb(event: UsageEvent) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.total_tokens,
        queue_time_ms=event.queue_time_s * 1000,
        time_to_first_token_ms=event.time_to_first_token_s * 1000,
        decode_time_ms=event.decode_time_s * 1000,
        total_time_ms=event.total_time_s * 1000,
        request_id=event.request_id,
    )


def completion_to_pb(event: CompletionEvent) -> pb.Completion:
    return pb.Completion(
        finish_reason=_FINISH_TO_PB[event.finish_reason], stop_sequence=event.stop_sequence
    )


def model_header(engine: Engine) -> str:
    """The x-tokenwire-model value of the served model (tokenwire.common.model_identity)."""
    spec = engine.model.spec
    return model_identity.model_header(spec.name, spec.vocab_size, spec.eos_token_ids)


def model_info_to_pb(engine: Engine) -> pb.GetModelInfoResponse:
    spec = engine.model.spec
    return pb.GetModelInfoResponse(
        model=spec.name,
        # What a request may hold: the model's context, or the KV budget where it is smaller.
        context_length=engine.limits.context_length,
        vocab_size=spec.vocab_size,
        eos_token_ids=sorted(spec.eos_token_ids),
        provider=engine.model.provider,
        max_tokens_limit=engine.config.max_tokens_limit,
        default_max_tokens=engine.config.default_max_tokens,
        max_batch_size=engine.max_rows,
        chat_template=spec.chat_template,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        template_tokens=spec.template_tokens,
        max_requests=engine.max_rows + engine.config.max_queue,
    )


def tokenize_from_pb(msg: pb.TokenizeRequest) -> TokenizeRequest:
    return TokenizeRequest(
        text=msg.text,
        add_special_tokens=msg.add_special_tokens if msg.HasField("add_special_tokens") else True,
        with_pieces=msg.with_pieces,
    )


def tokens_to_pb(tokens: Tokens, context_length: int) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(
        token_ids=tokens.ids,
        pieces=tokens.pieces,
        piece_bytes=tokens.piece_bytes,
        context_length=context_length,
    )


def detokenize_from_pb(msg: pb.DetokenizeRequest) -> DetokenizeRequest:
    return DetokenizeRequest(tuple(msg.token_ids), msg.skip_special_tokens)
