"""Helpers of the stack tests: small synthetic datasets, the local stack with the fake stage double, waiting."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cfrseg.data.io import write_volume
from cfrseg.data.volume import Volume

FAKE_ENV = {"CFRSEG_STAGE_IMPL": "tests.fake_stages:run", "CFRSEG_SEGMENT_IMPL": "tests.fake_stages:segment"}
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def need_servers() -> None:
    from services.stack import _exe

    for exe in ("redis-server", "nanio"):
        try:
            _exe(exe)
        except SystemExit:
            pytest.skip(f"{exe} not installed (scripts/setup.sh --services)")


def volume(shape=(24, 24, 16), seed: int = 0, spacing=(1.0, 1.0, 1.0)) -> Volume:
    a = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return Volume(a, spacing, (0.0, 0.0, 0.0), IDENTITY)


def label_of(v: Volume, value: int = 1) -> Volume:
    lab = np.zeros(v.shape, np.uint8)
    x, y, z = (s // 3 for s in v.shape)
    lab[x:2 * x, y:2 * y, z:2 * z] = value
    return v.with_array(lab)


def make_dataset(root: Path, n: int = 3, shape=(24, 24, 16)) -> Path:
    """``root/images/c{i}.nii.gz`` + ``root/labels/c{i}.nii.gz`` (n cases, all labeled)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        v = volume(shape, seed=i)
        write_volume(v, root / "images" / f"c{i}.nii.gz")
        write_volume(label_of(v), root / "labels" / f"c{i}.nii.gz", label=True)
    return root


def wait_until(check: Callable[[], Any], timeout: float, what: str, period: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = check()
        if r:
            return r
        time.sleep(period)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def start_stack(d: Path, env: dict[str, str] | None = None, **kw: Any):
    from services.stack import LocalStack

    need_servers()
    st = LocalStack(d, env={**FAKE_ENV, **(env or {})}, **kw)
    st.up()
    return st


def dump_logs(st) -> str:
    return "\n".join(f"----- {n}\n{st.tail(n, 4000)}" for n in ("gateway", "worker", "finetune", "pseudolabel",
                                                               "retrain"))


def cleanup(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)


def cfrseg(*args: str, timeout: float = 180, env: dict[str, str] | None = None):
    """``python -m cfrseg.cli ARGS`` as a user runs it (a subprocess; text output)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    full = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cfrseg.cli", *args], cwd=root, env=full, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout, check=False)


# A fake-step stack tuned for fault tests: short steps, a short Celery visibility timeout and watchdog, so that
# killed workers and lost messages are noticed within seconds (tests/test_orchestrator_faults.py,
# tests/test_stack_reliability.py).
FAULT_ENV = {"CFRSEG_FAKE_STEPS": "8", "CFRSEG_FAKE_STEP_S": "0.4", "CFRSEG_VISIBILITY_TIMEOUT_S": "10",
             "CFRSEG_WATCHDOG_S": "2", "CFRSEG_STALE_S": "12"}


def fault_stack(tmp_path_factory, name: str, **kw: Any):
    """Generator for a module fixture: a started fault-test stack (``kw`` go to :func:`start_stack`), torn down
    and removed afterwards."""
    d = tmp_path_factory.mktemp(name)
    st = start_stack(d / "stack", env=dict(FAULT_ENV), **kw)
    yield st
    st.down()
    cleanup(d / "stack")


def small_dataset(client, tmp_path_factory, name: str):
    """Three small binary cases uploaded through ``client``: 1 labeled, 1 unlabeled, 1 held out."""
    return client.create_dataset(make_dataset(tmp_path_factory.mktemp("data") / "set", n=3), labeled=1,
                                 holdout=1, name=name, num_classes=2)
