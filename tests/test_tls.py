"""TLS end to end through the real CLI and the SDK against real local gateways (fake stage functions).

One stack, started with ``cfrseg stack up --mtls`` (every gRPC hop over TLS with a private CA; the gateway
requires client certificates), plus a second gateway process on the same backend with server-only TLS and a
certificate that is valid only for a hospital host name (not localhost, not 127.0.0.1). Certificates are made in
the test (services.common.certs), never committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.common.certs import CertFiles, make_ca, make_cert
from services.sdk import FINAL, Client, state_name
from tests.servers import free_port, wait_for
from tests.stack_helpers import FAKE_ENV, cfrseg, make_dataset, need_servers

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parent.parent
HOSPITAL = "cfrseg.hospital.test"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_servers()
    d = tmp_path_factory.mktemp("tls") / ".stack"
    env = [a for k, v in {**FAKE_ENV, "CFRSEG_FAKE_STEPS": "3", "CFRSEG_FAKE_STEP_S": "0.1"}.items()
           for a in ("--env", f"{k}={v}")]
    r = cfrseg("stack", "up", "--dir", str(d), "--free-ports", "--mtls", *env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(mTLS)" in r.stdout
    yield d
    r = cfrseg("stack", "down", "--dir", str(d))
    assert r.returncode == 0, r.stderr


def _state(d: Path) -> dict:
    return json.loads((d / "stack.json").read_text())


def _other_ca(tmp: Path) -> tuple[CertFiles, CertFiles]:
    """A CA the gateway does not know, and a client certificate it signed."""
    ca = make_ca(tmp / "other", cn="someone else's CA")
    return ca, make_cert(ca, tmp / "other", "client", names=("intruder",), server=False)


def test_cli_over_mtls(stack, tmp_path):
    st = _state(stack)
    tls = st["tls"]
    assert tls["client_required"] and Path(tls["ca"]).is_file()
    assert (stack / "tls" / "server.key").stat().st_mode & 0o077 == 0
    data = make_dataset(tmp_path / "set", n=3)
    r = cfrseg("client", "--stack-dir", str(stack), "upload-dataset", str(data), "--labeled", "1", "--holdout", "1",
               "--num-classes", "2")
    assert r.returncode == 0, r.stderr
    ds_id = r.stdout.split()[1].rstrip(":")
    # options after the command; the stack's CA and client certificate are picked up from stack.json
    r = cfrseg("client", "submit", "--dataset", ds_id, "--profile", "tiny", "--watch", "--stack-dir", str(stack))
    assert r.returncode == 0, r.stderr
    assert "SUCCEEDED" in r.stdout.splitlines()[-1]

    gw, token_file = st["gateway"], str(stack / "token")
    nostack = str(tmp_path / "no-stack")
    base = ["client", "--stack-dir", nostack, "--address", gw, "--token-file", token_file]
    # env fallbacks for the client's TLS files
    env = {"CFRSEG_CLIENT_CA": tls["ca"], "CFRSEG_CLIENT_CERT": tls["client_cert"],
           "CFRSEG_CLIENT_KEY": tls["client_key"]}
    r = cfrseg(*base, "list", env=env)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stderr
    # refused: no client certificate, plaintext, a CA that did not sign the gateway's certificate, a client
    # certificate from another CA
    other_ca, intruder = _other_ca(tmp_path)
    cases = {
        "no client cert": ([*base, "--tls-ca", tls["ca"], "list"], "client certificate"),
        "plaintext": ([*base, "list"], "pass --tls-ca"),
        "wrong CA": ([*base, "--tls-ca", str(other_ca.cert), "--tls-cert", tls["client_cert"], "--tls-key",
                      tls["client_key"], "list"], "not signed by the CA you trust"),
        "foreign client cert": ([*base, "--tls-ca", tls["ca"], "--tls-cert", str(intruder.cert), "--tls-key",
                                 str(intruder.key), "list"], "client certificate"),
    }
    for what, (args, hint) in cases.items():
        r = cfrseg(*args, timeout=60)
        assert r.returncode == 2, (what, r.stdout, r.stderr)
        assert r.stderr.startswith("error: UNAVAILABLE"), (what, r.stderr)
        assert hint in r.stderr, (what, r.stderr)

    # health with reasons, through the CLI, over mTLS
    r = cfrseg("client", "health", "--stack-dir", str(stack))
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("gateway", "finetune", "pseudolabel", "retrain", "s3", "redis"):
        assert name in r.stdout


def _healthcheck(port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CFRSEG_")}
    full.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "services.common.healthcheck", "--port", str(port)], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=60, check=False)


def test_healthcheck_under_mtls_uses_the_servers_own_certificate(stack):
    st = _state(stack)
    port = st["ports"]["gateway"]
    tls = stack / "tls"
    env = {"CFRSEG_TLS_CERT": str(tls / "server.pem"), "CFRSEG_TLS_KEY": str(tls / "server.key"),
           "CFRSEG_TLS_CLIENT_CA": str(tls / "ca.pem")}
    r = _healthcheck(port, env)
    assert r.returncode == 0 and "SERVING" in r.stdout, r.stderr
    r = _healthcheck(port, {**env, "CFRSEG_HEALTHCHECK_NAME": "not-this-host.example"})
    assert r.returncode == 1 and "unhealthy: UNAVAILABLE" in r.stderr


def _second_gateway(stack: Path, tmp: Path, cert: CertFiles) -> tuple[subprocess.Popen, int]:
    """Another gateway on the stack's backend: server-only TLS with ``cert``."""
    from services.stack import LocalStack

    st = _state(stack)
    ls = LocalStack(stack, ports=dict(st["ports"]), token=(stack / "token").read_text().strip(),
                    internal_token=(stack / "internal_token").read_text().strip(),
                    s3_secret_key=(stack / "s3_secret_key").read_text().strip(), tls=True)
    port = free_port()
    env = {**ls.service_env("gateway"), "CFRSEG_TLS_CERT": str(cert.cert), "CFRSEG_TLS_KEY": str(cert.key),
           "CFRSEG_WATCHDOG_S": "0"}
    env.pop("CFRSEG_TLS_CLIENT_CA", None)
    log = tmp / "gateway2.log"
    p = subprocess.Popen([sys.executable, "-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port)],
                         cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return p, port


def test_sdk_over_tls_with_a_hospital_certificate(stack, tmp_path):
    st = _state(stack)
    tls = st["tls"]
    ca = CertFiles(Path(tls["ca"]), stack / "tls" / "ca.key")
    hospital = make_cert(ca, tmp_path / "hospital", "gateway", names=(HOSPITAL,))
    proc, port = _second_gateway(stack, tmp_path, hospital)
    addr = f"127.0.0.1:{port}"
    token = (stack / "token").read_text().strip()
    try:
        ok = Client(addr, token, tls["ca"], server_name=HOSPITAL)
        wait_for(lambda: ok.health(include_components=False, timeout=2).serving, 60, "second gateway", proc,
                 tmp_path / "gateway2.log")
        # a run submitted and watched over TLS
        ds = ok.create_dataset(make_dataset(tmp_path / "set", n=3), labeled=1, holdout=1, name="tls", num_classes=2)
        run = ok.submit_run(ds.dataset_id, profile="tiny")
        events = list(ok.watch_run(run.run_id, timeout=120))
        assert events and events[-1].state in FINAL
        assert state_name(ok.get_run(run.run_id).state) == "SUCCEEDED"

        # refused: the name dialed is not in the certificate, plaintext, a wrong CA
        other_ca, _ = _other_ca(tmp_path)
        refused = {"name mismatch": Client(addr, token, tls["ca"]), "plaintext": Client(addr, token),
                   "wrong CA": Client(addr, token, str(other_ca.cert), server_name=HOSPITAL)}
        for what, c in refused.items():
            with pytest.raises(grpc.RpcError) as e:
                c.list_runs()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, what
            assert c.explain(e.value), what
            c.close()
        # the container healthcheck: the default name (localhost) fails on this certificate, the configured
        # name passes
        env = {"CFRSEG_TLS_CERT": str(hospital.cert), "CFRSEG_TLS_KEY": str(hospital.key),
               "CFRSEG_HEALTHCHECK_CA": tls["ca"]}
        assert _healthcheck(port, env).returncode == 1
        r = _healthcheck(port, {**env, "CFRSEG_HEALTHCHECK_NAME": HOSPITAL})
        assert r.returncode == 0, r.stderr
        ok.close()
    finally:
        proc.terminate()
        proc.wait(20)

    # mTLS gateway of the stack: the SDK with and without a client certificate
    gw = st["gateway"]
    with Client(gw, token, tls["ca"], tls["client_cert"], tls["client_key"]) as c:
        assert any(r.run_id == run.run_id for r in c.list_runs())
    c = Client(gw, token, tls["ca"])
    with pytest.raises(grpc.RpcError) as e:
        c.list_runs()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "client certificate" in c.explain(e.value)
    c.close()
