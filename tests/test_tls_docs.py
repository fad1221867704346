"""docs/tls.md's openssl commands, run as written, make files that work: a server with the gateway certificate
and mTLS accepts the documented client certificate (by IP and by name), and the healthcheck's defaults (the
server's own chain as CA, its own certificate as client certificate) pass. Also: what a TLS client sees against
a plaintext server."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.healthcheck import channel_for
from services.common.server import Server
from services.common.settings import Settings
from services.sdk import Client
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def _docs_script() -> str:
    text = (ROOT / "docs" / "tls.md").read_text()
    m = re.search(r"<!-- tests/test_tls_docs.py runs this block.*?-->\n```sh\n(.*?)```", text, re.DOTALL)
    assert m, "the tested openssl block is missing from docs/tls.md"
    return m.group(1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", _docs_script()], cwd=d, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return d


def _server(**kw) -> Server:
    s = replace(Settings.from_env({}), port=free_port(), **kw)
    srv = Server(s, tokens=["tok"], service_names=["test.Svc"])
    srv.start()
    return srv


def test_documented_certificates_work_with_mtls(pki):
    srv = _server(tls_cert=str(pki / "gateway.pem"), tls_key=str(pki / "gateway.key"),
                  tls_client_ca=str(pki / "ca.pem"))
    try:
        addr = f"127.0.0.1:{srv.port}"
        for name in (None, "cfrseg.hospital.example", "localhost"):
            with Client(addr, "tok", str(pki / "ca.pem"), str(pki / "alice.pem"), str(pki / "alice.key"),
                        server_name=name) as c:
                assert c.health(include_components=False).serving
        with Client(addr, "tok", str(pki / "ca.pem")) as c, pytest.raises(grpc.RpcError) as e:
            c.health(include_components=False)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # the healthcheck's defaults: CA = the server's chain, client certificate = the server's own
        env = {"CFRSEG_TLS_CERT": str(pki / "gateway.pem"), "CFRSEG_TLS_KEY": str(pki / "gateway.key"),
               "CFRSEG_TLS_CLIENT_CA": str(pki / "ca.pem")}
        for extra, ok in (({}, True), ({"CFRSEG_HEALTHCHECK_NAME": "cfrseg.hospital.example"}, True),
                          ({"CFRSEG_HEALTHCHECK_NAME": "elsewhere.example"}, False)):
            with channel_for(addr, {**env, **extra}) as ch:
                try:
                    st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    got = st == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    got = False
            assert got == ok, extra
    finally:
        srv.stop(0)


def test_tls_client_against_a_plaintext_server(pki):
    srv = _server()
    try:
        with Client(f"127.0.0.1:{srv.port}", "tok", str(pki / "ca.pem")) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.health(include_components=False)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "plaintext" in c.explain(e.value), (e.value.details(), c.explain(e.value))
    finally:
        srv.stop(0)


def test_tls_settings_are_checked_and_the_old_name_is_an_alias(pki, caplog):
    from cfrseg.errors import ConfigError

    ca = str(pki / "ca.pem")
    with caplog.at_level("WARNING", logger="cfrseg.services.settings"):
        s = Settings.from_env({"CFRSEG_TLS_CA": ca})
    assert s.internal_ca == ca and "CFRSEG_TLS_CA is deprecated" in caplog.text
    assert Settings.from_env({"CFRSEG_TLS_CA": ca, "CFRSEG_INTERNAL_CA": str(pki / "gateway.pem")}).internal_ca \
        == str(pki / "gateway.pem")
    with pytest.raises(ConfigError, match="CFRSEG_TLS_CLIENT_CA .mTLS. needs TLS"):
        Settings.from_env({"CFRSEG_TLS_CLIENT_CA": ca})
    with pytest.raises(ConfigError, match="CFRSEG_INTERNAL_CA='/nonexistent/ca.pem': no readable file"):
        Settings.from_env({"CFRSEG_INTERNAL_CA": "/nonexistent/ca.pem"})
    with pytest.raises(ConfigError, match="CFRSEG_TLS_CERT .* not a PEM file"):
        from services.common.tls import server_credentials

        server_credentials(str(pki / "gateway.ext"), str(pki / "gateway.key"))
