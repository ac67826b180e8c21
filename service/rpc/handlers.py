"""GenerationService's method table, registered with deserializers that tolerate bad bytes.

grpc answers a request its deserializer cannot parse with UNKNOWN. Parsing here instead turns
a malformed message into a Malformed value, which the servicer answers with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from tokenwire.server.domain import InvalidRequest
from tokenwire.v1 import generate_pb2 as pb

M = TypeVar("M")


class Malformed:
    """A request body that is not a valid message of its type (bad wire format or UTF-8)."""

    def __init__(self, message_type: str, size: int) -> None:
        self.message_type = message_type
        self.size = size

    def error(self) -> InvalidRequest:
        return InvalidRequest(
            "request",
            f"{self.size} bytes",
            f"must be a valid {self.message_type} (protobuf wire format, UTF-8 strings)",
        )


def lenient(message: type[M]) -> Callable[[bytes], M | Malformed]:
    """A deserializer for message that returns Malformed instead of raising."""
    parse: Callable[[bytes], M] = message.FromString  # type: ignore[attr-defined]
    name: str = message.DESCRIPTOR.full_name  # type: ignore[attr-defined]

    def deserialize(data: bytes) -> M | Malformed:
        try:
            return parse(data)
        except DecodeError:
            return Malformed(name, len(data))

    return deserialize


class Servicer(Protocol):
    """What the method table calls; GenerationServicer implements it."""

    @property
    def Generate(self) -> Callable[..., Any]: ...
    @property
    def GetModelInfo(self) -> Callable[..., Any]: ...
    @property
    def Cancel(self) -> Callable[..., Any]: ...
    @property
    def Tokenize(self) -> Callable[..., Any]: ...
    @property
    def Detokenize(self) -> Callable[..., Any]: ...


SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


UNARY: dict[str, tuple[type[Message], type[Message]]] = {
    "GetModelInfo": (pb.GetModelInfoRequest, pb.GetModelInfoResponse),
    "Cancel": (pb.CancelRequest, pb.CancelResponse),
    "Tokenize": (pb.TokenizeRequest, pb.TokenizeResponse),
    "Detokenize": (pb.DetokenizeRequest, pb.DetokenizeResponse),
}
"""The service's unary methods: request and response types by name."""


def register(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Add GenerationService to server, as the generated add_..._to_server would."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
    }
    for name, (request, response) in UNARY.items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=lenient(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
