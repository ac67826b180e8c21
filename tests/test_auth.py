"""Bearer-key auth on the gRPC server: who may call, and streams bound to their principal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from tests.conftest import RunningServer, greedy, start_edge, start_server
from tests.procs import ServerProcess
from tokenwire.client import AsyncTokenwireClient, ChannelSecurity, Completion, GenerateOptions
from tokenwire.client.errors import Unauthenticated
from tokenwire.edge.server import warn_about_keys
from tokenwire.edge.settings import EdgeSettings
from tokenwire.server.config import Settings, SettingsError, all_api_keys
from tokenwire.server.engine import OnnxCausalLM
from tokenwire.server.tokenizer import Tokenizer
from tokenwire.v1 import generate_pb2 as pb
from tokenwire.v1 import generate_pb2_grpc as pb_grpc

K1, K2 = "k1-secret-one", "k2-secret-two"
SHORT = GenerateOptions(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture
async def keyed(onnx_model: OnnxCausalLM, tokenizer: Tokenizer) -> AsyncIterator[RunningServer]:
    running = await start_server(onnx_model, tokenizer, api_keys=(K1, K2))
    yield running
    await running.server.drain()


async def _rest(
    call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse],
) -> list[pb.GenerateResponse]:
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _code(target: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(
            greedy("x", max_tokens=1), metadata=metadata, timeout=10
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_generate_without_a_key_is_unauthenticated(keyed: RunningServer) -> None:
    """With keys configured, a call with no authorization metadata gets UNAUTHENTICATED."""
    assert await _code(keyed.target, ()) == grpc.StatusCode.UNAUTHENTICATED


async def test_generate_with_a_wrong_key_is_unauthenticated(keyed: RunningServer) -> None:
    """A bearer key that is not configured gets UNAUTHENTICATED."""
    assert await _code(keyed.target, _bearer("k1-secret-onE")) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_refused_key_is_one_rejected_log_line_without_the_key(
    keyed: RunningServer,
) -> None:
    """A Generate refused for its key logs one request.rejected line, as every other refused
    request does, and the line does not hold the key it brought."""
    with capture_logs() as logs:
        await _code(keyed.target, _bearer("k1-secret-onE"))
    rejected = [e for e in logs if e["event"] == "request.rejected"]
    assert [e["code"] for e in rejected] == ["Unauthenticated"]
    assert "k1-secret-onE" not in str(rejected)


async def test_generate_with_a_configured_key_streams(keyed: RunningServer) -> None:
    """The Python client with api_key set streams a full completion."""
    security = ChannelSecurity(api_key=K2)
    async with AsyncTokenwireClient(keyed.target, security=security, timeout_s=10) as client:
        events = [event async for event in client.generate("def f():", SHORT)]
    assert isinstance(events[-1], Completion)


async def test_client_without_a_key_raises_unauthenticated(keyed: RunningServer) -> None:
    """The client maps UNAUTHENTICATED to its Unauthenticated error, for unary calls too."""
    async with AsyncTokenwireClient(keyed.target, timeout_s=10) as client:
        with pytest.raises(Unauthenticated):
            await client.model_info()


async def test_health_needs_no_key(keyed: RunningServer) -> None:
    """grpc.health.v1 stays open so Kubernetes probes (which send no headers) work."""
    async with grpc.aio.insecure_channel(keyed.target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_needs_a_key(keyed: RunningServer) -> None:
    """Server reflection describes the API only to callers with a key."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async with grpc.aio.insecure_channel(keyed.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.ServerReflectionInfo(iter([request]), timeout=10):
                pass
        replies = [
            r
            async for r in stub.ServerReflectionInfo(
                iter([request]), metadata=_bearer(K1), timeout=10
            )
        ]
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert replies[0].list_services_response.service


@pytest.mark.parametrize(
    "method",
    ["/tokenwire.v1.GenerationService/NoSuchMethod", "/grpc.reflection.v1.ServerReflection/X"],
)
async def test_a_method_the_server_lacks_is_unauthenticated_without_a_key(
    keyed: RunningServer, method: str
) -> None:
    """Without a key, a method the server does not have is UNAUTHENTICATED as every other
    method but health is, so which methods exist is not told; with a key it is UNIMPLEMENTED."""
    async with grpc.aio.insecure_channel(keyed.target) as channel:
        call = channel.unary_unary(method)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(b"", timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await call(b"", metadata=_bearer(K1), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_cancel_of_another_principals_stream_answers_like_an_unknown_id(
    keyed: RunningServer,
) -> None:
    """Key k2 cancelling k1's live stream gets cancelled=false, as for an id nobody uses,
    and k1's stream runs on to its normal end."""
    async with grpc.aio.insecure_channel(keyed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.Generate(
            greedy("def f():", max_tokens=200, request_id="owned"), metadata=_bearer(K1)
        )
        await call.read()
        foreign = await stub.Cancel(pb.CancelRequest(request_id="owned"), metadata=_bearer(K2))
        unknown = await stub.Cancel(pb.CancelRequest(request_id="nobody"), metadata=_bearer(K2))
        messages = await _rest(call)
    assert foreign == unknown == pb.CancelResponse(cancelled=False)
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH


async def test_cancel_by_the_owner_cancels(keyed: RunningServer) -> None:
    """The key that started a stream can cancel it by its id."""
    async with grpc.aio.insecure_channel(keyed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        call = stub.Generate(
            greedy("def f():", max_tokens=400, request_id="mine"), metadata=_bearer(K1)
        )
        await call.read()
        reply = await stub.Cancel(pb.CancelRequest(request_id="mine"), metadata=_bearer(K1))
        messages = await _rest(call)
    assert reply.cancelled
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_CANCELLED


async def test_two_principals_may_use_the_same_request_id(keyed: RunningServer) -> None:
    """Ids are scoped per key: k2 reusing k1's live id is accepted (no existence oracle),
    and each Usage echoes the id its caller chose."""
    async with grpc.aio.insecure_channel(keyed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = greedy("def f():", max_tokens=300, request_id="same")
        first = stub.Generate(request, metadata=_bearer(K1))
        await first.read()
        second = [m async for m in stub.Generate(request, metadata=_bearer(K2), timeout=10)]
        rest = await _rest(first)
    assert second[-2].usage.request_id == rest[-2].usage.request_id == "same"


async def test_a_duplicate_request_id_is_refused_naming_the_callers_own_id(
    keyed: RunningServer,
) -> None:
    """A key reusing its own live request id gets INVALID_ARGUMENT showing the id it sent,
    never the server's key-scoped form of it."""
    async with grpc.aio.insecure_channel(keyed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = greedy("def f():", max_tokens=300, request_id="dup")
        first = stub.Generate(request, metadata=_bearer(K1))
        await first.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request, metadata=_bearer(K1), timeout=10).read()
        first.cancel()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith("request_id: ")
    assert details.endswith("got 'dup'")


async def test_cancel_without_auth_works_from_any_caller(served: RunningServer) -> None:
    """With no keys configured, Cancel from another connection stops the stream as before."""
    async with (
        grpc.aio.insecure_channel(served.target) as a,
        grpc.aio.insecure_channel(served.target) as b,
    ):
        call = pb_grpc.GenerationServiceStub(a).Generate(
            greedy("def f():", max_tokens=400, request_id="open-cancel")
        )
        await call.read()
        reply = await pb_grpc.GenerationServiceStub(b).Cancel(
            pb.CancelRequest(request_id="open-cancel")
        )
        messages = await _rest(call)
    assert reply.cancelled
    assert messages[-1].completion.finish_reason == pb.FINISH_REASON_CANCELLED


async def test_edge_presents_its_upstream_key(keyed: RunningServer) -> None:
    """An edge with upstream_api_key set streams from a keyed server."""
    edge = await start_edge(keyed.target, upstream_api_key=K1)
    try:
        import httpx

        async with httpx.AsyncClient(timeout=20) as http:
            response = await http.post(
                f"http://127.0.0.1:{edge.edge.port}/v1/completions",
                json={"prompt": "def f():", "max_tokens": 3, "temperature": 0},
            )
    finally:
        await edge.edge.stop()
    assert response.status_code == 200, response.text


async def test_an_edge_with_only_a_keys_file_guards_its_routes_and_sends_a_key(
    keyed: RunningServer, tmp_path: Path
) -> None:
    """An edge given the server's keys as a file (as `tokenwire up` passes them) needs a key
    from it on its routes, and sends the file's first key upstream."""
    import httpx

    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# ops\n{K1}\n{K2}\n")
    edge = await start_edge(keyed.target, api_keys_file=keys_file)
    body = {"prompt": "def f():", "max_tokens": 3, "temperature": 0}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.edge.port}") as http:
            anonymous = await http.post("/v1/completions", json=body)
            keyed_reply = await http.post(
                "/v1/completions", json=body, headers={"Authorization": f"Bearer {K2}"}
            )
    finally:
        await edge.edge.stop()
    assert anonymous.status_code == 401
    assert keyed_reply.status_code == 200, keyed_reply.text


def test_the_edge_refuses_a_key_it_could_never_match() -> None:
    """An edge key with a space (no Authorization header can carry it) is a settings error
    that does not show the key."""
    with pytest.raises(SettingsError, match="api_keys") as caught:
        EdgeSettings.from_env({"TOKENWIRE_API_KEYS": "good-key,has space"})
    assert "has space" not in str(caught.value)


def test_keys_come_from_the_environment_and_a_file(tmp_path: Path) -> None:
    """TOKENWIRE_API_KEYS (comma-separated) and TOKENWIRE_API_KEYS_FILE (one a line, #
    comments) are combined."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\nfile-key-1\n\nfile-key-2\n")
    env = {"TOKENWIRE_API_KEYS": "env-a, env-b", "TOKENWIRE_API_KEYS_FILE": str(keys_file)}
    settings = Settings.from_env(env)
    assert all_api_keys(settings) == ("env-a", "env-b", "file-key-1", "file-key-2")
    assert "env-a" not in repr(settings)


def test_a_bad_key_in_the_file_is_named_by_its_line(tmp_path: Path) -> None:
    """A key with a space is refused naming its line in the file (comments and blank lines
    counted), never the key itself."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\n\ngood-key\nbad key\n")
    with pytest.raises(SettingsError, match="<key on line 4>") as caught:
        Settings.from_env({"TOKENWIRE_API_KEYS_FILE": str(keys_file)})
    assert "bad key" not in str(caught.value)


def test_a_keys_variable_of_only_commas_is_a_settings_error() -> None:
    """TOKENWIRE_API_KEYS="," names no key: refused, rather than read as no keys, which would
    turn authentication off."""
    with pytest.raises(SettingsError, match="TOKENWIRE_API_KEYS"):
        Settings.from_env({"TOKENWIRE_API_KEYS": " , "})


def test_a_keys_file_emptied_after_the_check_still_refuses(tmp_path: Path) -> None:
    """A keys file emptied between the settings check and the server reading its keys is an
    error there too, not authentication turned off."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("only-key\n")
    settings = Settings.from_env({"TOKENWIRE_API_KEYS_FILE": str(keys_file)})
    keys_file.write_text("# rotated away\n")
    with pytest.raises(SettingsError, match="api_keys_file"):
        all_api_keys(settings)


def test_an_empty_keys_file_is_a_settings_error(tmp_path: Path) -> None:
    """A keys file without keys would silently disable auth: refused, naming the setting."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("# nothing yet\n")
    with pytest.raises(SettingsError, match="api_keys_file"):
        Settings.from_env({"TOKENWIRE_API_KEYS_FILE": str(keys_file)})


@pytest.mark.parametrize(
    ("host", "keys", "upstream", "warnings"),
    [
        ("0.0.0.0", (), "", ["edge.unauthenticated"]),
        ("127.0.0.1", (), "", []),
        ("0.0.0.0", ("k1", "k2"), "", ["edge.upstream_key_is_a_callers"]),
        ("0.0.0.0", ("k1", "k2"), "edge-only", []),
        ("0.0.0.0", ("k1",), "", []),
    ],
)
def test_the_edge_warns_at_start_where_its_keys_leave_it_open(
    host: str, keys: tuple[str, ...], upstream: str, warnings: list[str]
) -> None:
    """An edge on an address beyond this machine without keys warns `edge.unauthenticated`;
    one whose upstream key is one of several callers' keys warns
    `edge.upstream_key_is_a_callers`; a loopback edge, a dedicated upstream key or a single
    caller's key warn of nothing."""
    settings = EdgeSettings(
        port=0, grpc_target="127.0.0.1:1", host=host, api_keys=keys, upstream_api_key=upstream
    )
    with capture_logs() as logs:
        warn_about_keys(settings)
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == warnings


@pytest.mark.parametrize(("env", "warned"), [({}, True), ({"TOKENWIRE_API_KEYS": "k1"}, False)])
def test_a_server_on_every_address_without_keys_warns_at_start(
    env: dict[str, str], warned: bool
) -> None:
    """`tokenwire serve --host 0.0.0.0` without keys (or client certificates) logs
    `server.unauthenticated` before it starts serving; with keys it does not."""
    server = ServerProcess("--host", "0.0.0.0", "--metrics-port", "0", env=env)
    try:
        server.wait_for("server.started")
    finally:
        server.stop()
        server.close()
    assert any(r["event"] == "server.unauthenticated" for r in server.records) is warned
