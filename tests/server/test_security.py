"""Bearer tokens on every RPC and the HTTP render endpoint; TLS and mutual TLS; hostile requests to every method."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from render_client import RenderClient, UnauthenticatedError, UnavailableError, build_training_sample, tls_credentials
from render_wire.errors import MAX_DETAILS_BYTES
from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.methods import METHODS, call, post
from tests.support import ServerProcess, running_server, tool

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
FILE_TOKEN = "file-token-0123456789"
ENV_TOKEN = "env-token-abcdef"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens.txt"
    tokens.write_text(f"# tokens for tests\n\n{FILE_TOKEN}\nanother-token\n")
    with running_server(
        "--workers", "1", "--auth-tokens-file", str(tokens), env={"RENDER_SERVICE_TOKENS": f"x-token, {ENV_TOKEN}"}
    ) as server:
        yield server


def http(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize("token", [None, "wrong-token", FILE_TOKEN[:-1], "Bearer"])
def test_calls_without_a_valid_token_are_refused(guarded: ServerProcess, token: str | None) -> None:
    with RenderClient(guarded.target, token=token, timeout=30) as client:
        with pytest.raises(UnauthenticatedError) as caught:
            build_training_sample(client.renderer("qwen3"), MESSAGES)
        assert caught.value.details == "missing or invalid bearer token"
        with pytest.raises(UnauthenticatedError):
            client.list_models()
        with pytest.raises(UnauthenticatedError):
            list(client.render_many([client.renderer("qwen3").request(MESSAGES)]))
    if token:
        assert token not in caught.value.details
    listed = subprocess.run(
        [tool("grpcurl"), "-plaintext", guarded.target, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode != 0 and "Unauthenticated" in listed.stderr


@pytest.mark.parametrize("token", [FILE_TOKEN, ENV_TOKEN])
def test_tokens_from_the_file_and_the_environment_are_accepted(guarded: ServerProcess, token: str) -> None:
    with RenderClient(guarded.target, token=token, timeout=30) as client:
        assert build_training_sample(client.renderer("qwen3"), MESSAGES).token_ids
        assert [sample.token_ids for sample in client.render_many([client.renderer("qwen3").request(MESSAGES)])]
    listed = subprocess.run(
        [tool("grpcurl"), "-plaintext", "-H", f"authorization: Bearer {token}", guarded.target, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and "render.v1.RenderService" in listed.stdout


def test_health_and_metrics_stay_open_and_the_http_render_is_guarded(guarded: ServerProcess) -> None:
    with grpc.insecure_channel(guarded.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert http(f"{guarded.http}/healthz")[0] == 200 and http(f"{guarded.http}/metrics")[0] == 200
    body = json.dumps({"model": "qwen3", "messages": [{"role": "user", "text": "hi"}]}).encode()
    status, answer_body = http(f"{guarded.http}/v1/render_training_sample", body)
    assert status == 401 and json.loads(answer_body)["code"] == "UNAUTHENTICATED"
    status, _ = http(f"{guarded.http}/v1/render_training_sample", body, {"Authorization": "Bearer nope"})
    assert status == 401
    status, answer_body = http(
        f"{guarded.http}/v1/render_training_sample", body, {"Authorization": f"Bearer {ENV_TOKEN}"}
    )
    assert status == 200 and json.loads(answer_body)["sample"]["token_ids"]


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN={name}", cwd=folder)  # fmt: skip


def make_cert(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_cert(folder, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    make_cert(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_cert(folder, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return folder


def tls_args(certs: Path, mutual: bool) -> list[str]:
    args = ["--workers", "1", "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    return [*args, "--tls-client-ca", str(certs / "ca.pem")] if mutual else args


def renders(target: str, credentials: grpc.ChannelCredentials | None) -> bool:
    try:
        with RenderClient(target, credentials=credentials, timeout=10) as client:
            return bool(build_training_sample(client.renderer("qwen3"), MESSAGES).token_ids)
    except UnavailableError:
        return False


def test_tls(certs: Path) -> None:
    with running_server(*tls_args(certs, mutual=False)) as server:
        assert renders(server.target, tls_credentials(ca=certs / "ca.pem"))
        assert not renders(server.target, None)  # plaintext to a TLS port
        assert not renders(server.target, tls_credentials(ca=certs / "other-ca.pem"))  # untrusted server
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        assert http(f"https://127.0.0.1:{server.http_port}/healthz", context=context)[0] == 200


def test_mutual_tls(certs: Path) -> None:
    with running_server(*tls_args(certs, mutual=True)) as server:
        ca = certs / "ca.pem"
        assert renders(server.target, tls_credentials(ca=ca, cert=certs / "client.pem", key=certs / "client.key"))
        assert not renders(server.target, tls_credentials(ca=ca))  # no client certificate
        assert not renders(
            server.target, tls_credentials(ca=ca, cert=certs / "stranger.pem", key=certs / "stranger.key")
        )
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(certs / "client.pem", certs / "client.key")
        assert http(f"https://127.0.0.1:{server.http_port}/healthz", context=context)[0] == 200
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            http(f"https://127.0.0.1:{server.http_port}/healthz", context=ssl.create_default_context(cafile=str(ca)))


def test_the_raw_stream_needs_a_token_too(guarded: ServerProcess) -> None:
    with grpc.insecure_channel(guarded.target) as channel:
        calls = RenderServiceStub(channel).RenderTrainingSamples(iter([pb.RenderTrainingSamplesRequest()]), timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            list(calls)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------------------
# Hostile requests to every method (tests/methods.py), over gRPC and JSON
# ---------------------------------------------------------------------------

BIG = 100_000


def _messages_field(request: Any) -> str | None:
    return next((name for name in ("messages", "new_messages") if name in request.DESCRIPTOR.fields_by_name), None)


def _with(request: Any, **fields: Any) -> Any | None:
    """A copy of `request` with `fields` set; None where it has no such field."""
    if any(name not in request.DESCRIPTOR.fields_by_name for name in fields):
        return None
    changed = type(request)()
    changed.CopyFrom(request)
    for name, value in fields.items():
        setattr(changed, name, value)
    return changed


def _with_role(request: Any, role: str) -> Any | None:
    field = _messages_field(request)
    if field is None:
        return None
    changed = type(request)()
    changed.CopyFrom(request)
    getattr(changed, field)[0].role = role
    return changed


# Each: the request made hostile (None: the method has no such field), its status, and how its message starts
# ({field}: the method's messages field). Messages must stay short whatever the input echoed: "...]" marks
# the part cut (before, a message echoing 100 KiB passed gRPC's header limit, and the caller got
# RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead).
HOSTILE: dict[str, tuple[Callable[[Any], Any | None], grpc.StatusCode, str, bool]] = {
    "100 KiB model id": (
        lambda request: _with(request, model="x" * BIG),
        grpc.StatusCode.NOT_FOUND,
        "model: no model 'xxxxx",
        True,
    ),
    "100 KiB role": (
        lambda request: _with_role(request, "r" * BIG),
        grpc.StatusCode.INVALID_ARGUMENT,
        "{field}[0].role: 'rrrrr",
        True,
    ),
    "2000 unknown chat-template kwargs": (
        lambda request: _with(request, chat_template_kwargs_json=json.dumps({f"k{i}": i for i in range(2000)})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chat_template_kwargs: Unsupported chat_template_kwargs for 'qwen3': ['k0', 'k1', ",
        True,
    ),
    "a 100 KiB chat-template kwarg name": (
        lambda request: _with(request, chat_template_kwargs_json=json.dumps({"k" * BIG: 1})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chat_template_kwargs: Unsupported chat_template_kwargs for 'qwen3': ['kkkkk",
        True,
    ),
    "a 100 KiB value for a renderer option": (  # pydantic's refusal echoes it, and its errors go in a trailer
        lambda request: _with(request, chat_template_kwargs_json=json.dumps({"enable_thinking": "x" * BIG})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chat_template_kwargs.enable_thinking: Input should be a valid boolean, unable to interpret input (got 'xxx",
        True,
    ),
    "tools nested 100000 deep": (
        lambda request: _with(request, tools_json="[" * BIG + "]" * BIG),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tools_json: JSON nested too deeply",
        False,
    ),
    "kwargs that are no JSON object": (
        lambda request: _with(request, chat_template_kwargs_json="[1]"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chat_template_kwargs_json: must be a JSON object",
        False,
    ),
}
HTTP_STATUS = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400}
CASES = [
    (method, case)
    for method in METHODS.values()
    for case, (make, _, _, _) in HOSTILE.items()
    if make(method.example) is not None
]


@pytest.mark.parametrize(("method", "case"), CASES, ids=[f"{method.name}-{case}" for method, case in CASES])
def test_hostile_requests_get_their_own_status_with_a_short_message(
    server: ServerProcess, method: Any, case: str
) -> None:
    make, code, start, echoes = HOSTILE[case]
    request = make(method.example)
    start = start.format(field=_messages_field(request))
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        got, details = call(channel, method, request.SerializeToString())
        assert (got, details[: len(start)]) == (code, start), details[:300]
        assert len(details.encode()) <= MAX_DETAILS_BYTES
        assert ("characters cut...]" in details) == echoes
        if method.route:
            status, answer = post(server.http, method.route, json_format.MessageToJson(request).encode())
            assert (status, answer["code"], answer["message"]) == (HTTP_STATUS[code], code.name, details)
        # The server goes on serving.
        assert call(channel, method, method.example.SerializeToString()) == (grpc.StatusCode.OK, "")
