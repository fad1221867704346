"""Server factory: bearer auth on every RPC kind (constant-time compare), health exempt, TLS, message limits,
error mapping, settings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cfrseg.errors import ConfigError, InputError, NotFoundError
from services.common.auth import bearer, token_ok
from services.common.errors import ServiceError, status_of, stream, unary
from services.common.server import Server, channel
from services.common.settings import Settings

TOKEN = "s3cret-token"


class _Echo:
    @unary
    def Unary(self, req: bytes, ctx):
        if req == b"missing":
            raise NotFoundError("no such thing")
        if req == b"boom":
            raise RuntimeError("unexpected")
        return req

    @stream
    def ServerStream(self, req: bytes, ctx):
        yield req
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "stop here")


def _handlers(svc: _Echo) -> grpc.GenericRpcHandler:
    ident = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(svc.Unary, **ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(svc.ServerStream, **ident),
        "ClientStream": grpc.stream_unary_rpc_method_handler(lambda it, ctx: b"".join(it), **ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(lambda it, ctx: (x for x in it), **ident),
    })


def _server(**kw) -> Server:
    s = Settings.from_env({}, port=1, **kw)  # port replaced below
    from dataclasses import replace

    srv = Server(replace(s, port=_free()), tokens=[TOKEN, "other"], service_names=["test.Echo"])
    srv.grpc.add_generic_rpc_handlers((_handlers(_Echo()),))
    srv.start()
    return srv


def _free() -> int:
    from tests.servers import free_port

    return free_port()


def _calls(ch: grpc.Channel) -> dict:
    return {
        "unary": lambda: ch.unary_unary("/test.Echo/Unary")(b"x", timeout=5),
        "server_stream": lambda: list(ch.unary_stream("/test.Echo/ServerStream")(b"x", timeout=5))[:1],
        "client_stream": lambda: ch.stream_unary("/test.Echo/ClientStream")(iter([b"a", b"b"]), timeout=5),
        "bidi": lambda: list(ch.stream_stream("/test.Echo/Bidi")(iter([b"a"]), timeout=5)),
        "unknown": lambda: ch.unary_unary("/test.Echo/Nope")(b"x", timeout=5),
    }


@pytest.fixture
def server():
    srv = _server()
    yield srv
    srv.stop(0)


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1]])
def test_every_rpc_kind_needs_a_valid_token(server: Server, token) -> None:
    with channel(f"127.0.0.1:{server.port}", token or "") as ch:
        for name, call in _calls(ch).items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name


def test_valid_tokens_pass_and_errors_map(server: Server) -> None:
    for tok in (TOKEN, "other"):
        with channel(f"127.0.0.1:{server.port}", tok) as ch:
            c = _calls(ch)
            assert c["unary"]() == b"x" and c["client_stream"]() == b"ab" and c["bidi"]() == [b"a"]
            with pytest.raises(grpc.RpcError) as e:
                list(ch.unary_stream("/test.Echo/ServerStream")(b"x", timeout=5))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/test.Echo/Unary")(b"missing", timeout=5)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no such thing" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/test.Echo/Unary")(b"boom", timeout=5)
            assert e.value.code() == grpc.StatusCode.INTERNAL and "id " in e.value.details()
            assert "unexpected" not in e.value.details()  # no internals leak
            with pytest.raises(grpc.RpcError) as e:
                c["unknown"]()
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_is_served_without_token_and_goes_not_serving(server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "test.Echo"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        server.health.enter_graceful_shutdown()
        r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_message_limit(server: Server) -> None:
    with channel(f"127.0.0.1:{server.port}", TOKEN) as ch:
        big = b"x" * (8 << 20)  # above gRPC's 4 MiB default, below our 16 MiB
        assert len(ch.unary_unary("/test.Echo/Unary")(big, timeout=10)) == len(big)
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/test.Echo/Unary")(b"x" * (17 << 20), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_tls(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    srv = _server(tls_cert=str(crt), tls_key=str(key))
    try:
        with channel(f"localhost:{srv.port}", TOKEN, ca_cert=str(crt)) as ch:
            assert ch.unary_unary("/test.Echo/Unary")(b"tls", timeout=5) == b"tls"
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0)


def test_no_token_refuses_to_start() -> None:
    with pytest.raises(SystemExit, match="no token"):
        Server(Settings.from_env({}, port=_free()), tokens=[], service_names=[])


def test_helpers_and_settings(tmp_path: Path) -> None:
    assert bearer([("authorization", "Bearer abc")]) == "abc" and bearer([("authorization", "Basic abc")]) == ""
    assert bearer(None) == "" and token_ok("a", ["b", "a"]) and not token_ok("", ["a"])
    assert status_of(InputError("bad"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(ConfigError("bad"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    (tmp_path / "tokens").write_text("# users\nt1\n\nt2\n")
    (tmp_path / "internal").write_text("i1\n")
    s = Settings.from_env({"CFRSEG_TOKEN_FILE": str(tmp_path / "tokens"), "CFRSEG_TOKEN": "ignored",
                           "CFRSEG_INTERNAL_TOKEN_FILE": str(tmp_path / "internal"), "CFRSEG_PORT": "7000",
                           "CFRSEG_RETRAIN_ADDR": "retrain:50051", "CFRSEG_S3_SECURE": "true"})
    assert s.tokens == ("t1", "t2") and s.internal_token == "i1" and s.port == 7000 and s.s3_secure
    assert s.addrs == {"retrain": "retrain:50051"}
    assert Settings.from_env({"CFRSEG_TOKEN": "a, b"}).tokens == ("a", "b")
    for bad in ({"CFRSEG_TLS_CERT": "x"}, {"CFRSEG_PORT": "abc"}, {"CFRSEG_S3_SECURE": "maybe"},
                {"CFRSEG_TOKEN_FILE": str(tmp_path / "missing")}):
        with pytest.raises(ConfigError):
            Settings.from_env(bad)
