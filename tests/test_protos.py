"""The committed gRPC stubs match the protos (scripts/gen_protos.py), import as a package without clashing with
the core ``cfrseg``, and expose the API the services and the gateway rely on."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "scripts" / "gen_protos.py"


def _load_gen():
    spec = importlib.util.spec_from_file_location("gen_protos", GEN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stubs_are_not_stale() -> None:
    gen = _load_gen()
    wanted = gen.generate(gen.DEFAULT_OUT)
    stale = gen.stale_files(gen.DEFAULT_OUT, wanted)
    assert not stale, f"generated stubs are stale, run scripts/gen_protos.py: {stale}"


def test_check_flag_detects_stale_copy(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    ok = subprocess.run([sys.executable, str(GEN), "--quiet", "--out", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    check = [sys.executable, str(GEN), "--check", "--quiet", "--out", str(out)]
    assert subprocess.run(check, capture_output=True).returncode == 0
    stub = out / "cfrseg" / "v1" / "common_pb2.py"
    stub.write_text(stub.read_text() + "\n# hand edit\n")
    bad = subprocess.run(check, capture_output=True, text=True)
    assert bad.returncode == 1 and "common_pb2.py" in bad.stderr
    # a second generation repairs it and then changes nothing
    subprocess.run([sys.executable, str(GEN), "--quiet", "--out", str(out)], check=True)
    again = subprocess.run([sys.executable, str(GEN), "--out", str(out)], capture_output=True, text=True)
    assert "0 file(s) updated" in again.stdout


def test_stubs_import_next_to_core_package() -> None:
    import cfrseg.store  # the core package must stay importable alongside the stubs
    from services.gen.cfrseg.v1 import common_pb2, gateway_pb2, retrain_pb2

    assert cfrseg.store.LocalStore is not None
    ref = common_pb2.ObjectRef(key="runs/r1/retrain/model.pt", sha256="ab" * 32, size=3)
    job = common_pb2.StageJob(run_id="r1", stage="retrain", state=common_pb2.STAGE_STATE_RUNNING, outputs=[ref])
    assert common_pb2.StageJob.FromString(job.SerializeToString()) == job
    ev = common_pb2.ProgressEvent(run_id="r1", stage="finetune", step=3, total=10, losses={"loss": 0.5})
    assert not ev.HasField("eta_s")
    assert gateway_pb2.RunEvent(progress=ev).progress.losses["loss"] == 0.5
    assert retrain_pb2.SegmentVolumeRequest(model_id="r1", volume=ref).volume.key == ref.key


def _methods(module: str, service: str) -> dict[str, tuple[bool, bool]]:
    from services.gen.cfrseg.v1 import common_pb2  # noqa: F401  (registers the file descriptors)

    importlib.import_module(f"services.gen.cfrseg.v1.{module}")
    from google.protobuf import descriptor_pool

    svc = descriptor_pool.Default().FindServiceByName(f"cfrseg.v1.{service}")
    return {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}


@pytest.mark.parametrize("module,service", [("finetune_pb2", "FinetuneService"),
                                            ("pseudolabel_pb2", "PseudolabelService"),
                                            ("retrain_pb2", "RetrainService")])
def test_stage_services_share_one_shape(module: str, service: str) -> None:
    m = _methods(module, service)
    assert m["Start"] == (False, False) and m["Get"] == (False, False) and m["Cancel"] == (False, False)
    assert m["Watch"] == (False, True)
    if service == "RetrainService":
        assert m["Segment"] == (False, False)  # volumes by object ref only


def test_gateway_api() -> None:
    m = _methods("gateway_pb2", "Gateway")
    assert m["UploadVolume"] == (True, False)
    assert m["WatchRun"] == (False, True)
    assert m["Segment"] == (True, True)
    assert m["DownloadArtifact"] == (False, True)
    for unary in ("CreateDataset", "GetDataset", "SubmitRun", "GetRun", "ListRuns", "CancelRun", "ListModels"):
        assert m[unary] == (False, False), unary
