"""Input that only the wire can carry: ids gRPC metadata cannot echo, bytes that are not a
message. Each is INVALID_ARGUMENT before anything reaches the engine, and logs no raw value."""

from __future__ import annotations

import grpc
import pytest
from structlog.testing import capture_logs

from tests.conftest import RunningServer, collect, greedy
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

GENERATE = "/tokenwire.v1.GenerationService/Generate"


async def _raw_generate(target: str, body: bytes) -> grpc.aio.AioRpcError:
    """Send body as the Generate request, unparsed, and return the error it ends with."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_stream(GENERATE)(body, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    return caught.value


@pytest.mark.parametrize("request_id", ["é", "id\x07bell", "tab\there", "\u2028", "日本"])
async def test_request_id_outside_printable_ascii_is_invalid_argument(
    stub: pb_grpc.GenerationServiceStub, request_id: str
) -> None:
    """Ids gRPC metadata cannot carry are refused with INVALID_ARGUMENT naming request_id."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, greedy("a", max_tokens=2, request_id=request_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request_id:")


async def test_refused_request_id_never_reaches_the_engine(
    stub: pb_grpc.GenerationServiceStub, served: RunningServer
) -> None:
    """A refused id leaves no trace in the engine: it finishes nothing under that id."""
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(stub, greedy("a", max_tokens=2, request_id="é"))
    assert served.observer is not None
    assert "é" not in served.observer.finished  # type: ignore[attr-defined]


async def test_longest_printable_ascii_request_id_is_echoed(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """128 printable ASCII characters (space and ~ included) are accepted and echoed."""
    request_id = (" ~" + "".join(chr(c) for c in range(0x21, 0x7F)))[:128].ljust(128, "x")
    messages = await collect(stub, greedy("a", max_tokens=2, request_id=request_id))
    assert messages[-2].usage.request_id == request_id


async def test_cancel_with_a_non_ascii_id_is_invalid_argument(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Cancel checks its id like Generate: "é" is INVALID_ARGUMENT naming request_id."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Cancel(pb.CancelRequest(request_id="é"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request_id:")


async def test_cancel_with_an_empty_id_is_invalid_argument(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """Cancel needs an id: an empty one is INVALID_ARGUMENT, not a silent no-op."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Cancel(pb.CancelRequest(request_id=""), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_malformed_protobuf_is_invalid_argument(served: RunningServer) -> None:
    """Bytes that are not a GenerateRequest get INVALID_ARGUMENT naming the request."""
    error = await _raw_generate(served.target, b"\xff\xff\xff\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request:")


SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
async def test_every_method_answers_malformed_bytes_with_invalid_argument(
    served: RunningServer, method: str
) -> None:
    """Each GenerationService method in the proto (so a new one too) refuses corrupt bytes
    with INVALID_ARGUMENT, never UNKNOWN."""
    path = f"/{SERVICE.full_name}/{method}"
    streaming = SERVICE.methods_by_name[method].server_streaming
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _send_raw(served.target, path, b"\xff\xff\xff\xff", streaming=streaming)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _send_raw(target: str, path: str, body: bytes, *, streaming: bool) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        if streaming:
            async for _ in channel.unary_stream(path)(body, timeout=10):
                pass
        else:
            await channel.unary_unary(path)(body, timeout=10)


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(served: RunningServer) -> None:
    """A prompt whose bytes are not UTF-8 (here a lone surrogate) is INVALID_ARGUMENT."""
    prompt = "a\ud800b".encode("utf-8", "surrogatepass")
    error = await _raw_generate(served.target, b"\x0a" + bytes([len(prompt)]) + prompt)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rejected_log_line_names_the_field_not_the_value(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """request.rejected carries the field and the rule; the caller's value is not logged."""
    marker = "LEAK\u00e9" * 3
    with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError):
        await collect(stub, greedy("a", max_tokens=2, request_id=marker))
    rejected = [entry for entry in logs if entry["event"] == "request.rejected"]
    assert rejected
    assert rejected[0]["field"] == "request_id"
    assert all("LEAK" not in str(entry) for entry in logs)
