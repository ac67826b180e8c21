"""The sync client against a scripted channel (grpcio-testing): typed events, typed errors."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import tokenwire.client
from tokenwire.client import (
    Completion,
    GenerateOptions,
    InvalidArgument,
    Overloaded,
    Token,
    TokenwireClient,
    Usage,
    errors,
)
from tokenwire.v1 import generate_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]
GENERATE = SERVICE.methods_by_name["Generate"]


@pytest.fixture
def channel() -> grpc_testing.Channel:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


def _serve_once(
    channel: grpc_testing.Channel, script: Callable[[Any, pb.GenerateRequest], None]
) -> threading.Thread:
    """Play the server side of one Generate call on another thread."""

    def play() -> None:
        _metadata, request, rpc = channel.take_unary_stream(GENERATE)
        rpc.send_initial_metadata(())
        script(rpc, request)

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return thread


def _collect(client: TokenwireClient, options: GenerateOptions) -> Iterator[object]:
    return client.generate("hi", options)


def test_client_yields_typed_events_in_order(channel: grpc_testing.Channel) -> None:
    """Token, Usage and Completion messages become Token, Usage and Completion objects."""

    def script(rpc: Any, request: pb.GenerateRequest) -> None:
        rpc.send_response(pb.GenerateResponse(token=pb.Token(text="he", id=5, index=0)))
        rpc.send_response(pb.GenerateResponse(token=pb.Token(text="llo", id=9, index=1)))
        usage = pb.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3, request_id="r")
        rpc.send_response(pb.GenerateResponse(usage=usage))
        done = pb.Completion(finish_reason=pb.FINISH_REASON_LENGTH)
        rpc.send_response(pb.GenerateResponse(completion=done))
        rpc.terminate((), grpc.StatusCode.OK, "")

    thread = _serve_once(channel, script)
    events = list(_collect(TokenwireClient(channel=channel), GenerateOptions(max_tokens=2)))
    thread.join(5)
    assert not thread.is_alive(), "the scripted server side never finished"
    assert events[:2] == [Token("he", 5, 0), Token("llo", 9, 1)]
    assert isinstance(events[2], Usage)
    assert events[2].total_tokens == 3
    assert events[3] == Completion("length", "")


def test_client_sends_the_options_it_was_given(channel: grpc_testing.Channel) -> None:
    """Unset sampling options stay unset on the wire; set ones arrive with their values."""
    seen: list[pb.GenerateRequest] = []

    def script(rpc: Any, request: pb.GenerateRequest) -> None:
        seen.append(request)
        done = pb.Completion(finish_reason=pb.FINISH_REASON_LENGTH)
        rpc.send_response(pb.GenerateResponse(completion=done))
        rpc.terminate((), grpc.StatusCode.OK, "")

    thread = _serve_once(channel, script)
    options = GenerateOptions(max_tokens=7, temperature=0.0, seed=3, stop=("\n\n",))
    list(_collect(TokenwireClient(channel=channel), options))
    thread.join(5)
    assert not thread.is_alive(), "the scripted server side never finished"
    request = seen[0]
    assert request.max_tokens == 7
    assert request.sampling.HasField("temperature")
    assert request.sampling.temperature == 0.0
    assert request.sampling.seed == 3
    assert not request.sampling.HasField("top_p")
    assert list(request.stop) == ["\n\n"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"seed": 2**64}, "sampling.seed"),
        ({"top_k": 2**32}, "sampling.top_k"),
        ({"prompt_ids": (1, 2**32)}, "prompt_ids[1]"),
        ({"logit_bias": ((7, 1.0), (-5, 1.0))}, "sampling.logit_bias[-5]"),
    ],
)
def test_an_integer_the_wire_cannot_carry_is_invalid_argument(
    fields: dict[str, Any], field: str
) -> None:
    """Options holding an integer outside its protobuf type raise InvalidArgument naming the
    field, as the server's refusals do, not protobuf's ValueError."""
    with pytest.raises(InvalidArgument) as caught:
        GenerateOptions(**fields)
    assert caught.value.field == field


def test_a_token_biased_twice_is_invalid_argument_naming_it() -> None:
    """Two biases for one token are refused naming the token (the wire's map would keep one
    of them silently)."""
    with pytest.raises(InvalidArgument) as caught:
        GenerateOptions(logit_bias=((5, 1.0), (7, 2.0), (5, -1.0)))
    assert caught.value.field == "sampling.logit_bias[5]"


@pytest.mark.parametrize("request_id", ["é", "a\x01b", "x" * 129])
def test_a_request_id_metadata_cannot_carry_is_invalid_argument(request_id: str) -> None:
    """An id that x-request-id metadata cannot carry is refused as InvalidArgument naming
    request_id when the options are made, as the server refuses it, instead of failing inside
    grpc as INTERNAL."""
    with pytest.raises(InvalidArgument) as caught:
        GenerateOptions(request_id=request_id)
    assert caught.value.field == "request_id"
    assert caught.value.message.startswith("request_id: must be non-empty, at most 128 printable")


def test_model_mismatch_is_a_public_error_type() -> None:
    """ModelMismatch, which a failover can raise, is exported with the client's other errors,
    as a kind of Unavailable."""
    assert tokenwire.client.ModelMismatch is errors.ModelMismatch
    assert "ModelMismatch" in tokenwire.client.__all__
    assert issubclass(tokenwire.client.ModelMismatch, tokenwire.client.Unavailable)


def _rich(code: int, message: str, detail: Any) -> tuple[tuple[str, bytes], ...]:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status = status_pb2.Status(code=code, message=message, details=[packed])
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_invalid_argument_becomes_invalid_argument_naming_the_field(
    channel: grpc_testing.Channel,
) -> None:
    """INVALID_ARGUMENT with a BadRequest detail raises InvalidArgument with .field set."""
    violation = error_details_pb2.BadRequest.FieldViolation(field="sampling.top_p")
    detail = error_details_pb2.BadRequest(field_violations=[violation])
    message = "sampling.top_p: must be in (0, 1], got 1.5"

    def script(rpc: Any, request: pb.GenerateRequest) -> None:
        trailers = _rich(code_pb2.INVALID_ARGUMENT, message, detail)
        rpc.terminate(trailers, grpc.StatusCode.INVALID_ARGUMENT, message)

    thread = _serve_once(channel, script)
    with pytest.raises(InvalidArgument) as caught:
        list(_collect(TokenwireClient(channel=channel), GenerateOptions(top_p=1.5)))
    thread.join(5)
    assert not thread.is_alive(), "the scripted server side never finished"
    assert caught.value.field == "sampling.top_p"
    assert "(0, 1]" in caught.value.message


def test_resource_exhausted_becomes_overloaded_with_retry_hint(
    channel: grpc_testing.Channel,
) -> None:
    """RESOURCE_EXHAUSTED with RetryInfo raises Overloaded carrying retry_after_s."""
    detail = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))

    def script(rpc: Any, request: pb.GenerateRequest) -> None:
        trailers = _rich(code_pb2.RESOURCE_EXHAUSTED, "busy", detail)
        rpc.terminate(trailers, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")

    thread = _serve_once(channel, script)
    with pytest.raises(Overloaded) as caught:
        list(_collect(TokenwireClient(channel=channel), GenerateOptions()))
    thread.join(5)
    assert not thread.is_alive(), "the scripted server side never finished"
    assert caught.value.retry_after_s == 2.0
